//! The `search:` block, the alternative to `sweep:`: a study's parameters (distributions),
//! its objectives (validation metrics only) and its sampler.
//!
//! ```yaml
//! search:
//!   params:
//!     train.beta:  { uniform: [0.0, 1.0] }
//!     train.optimizer.lr: { log_uniform: [1.0e-4, 3.0e-3] }
//!     train.epochs: { int: [10, 30] }
//!     graph.uses:  { choice: [graph, graph-tree] }
//!   objectives: [ { metric: val.acc.both, goal: max }, { metric: val.t2i.r1, goal: max } ]
//!   trials: 20
//!   sampler: { kind: random, seed: 0 }     # random | grid
//! ```
//!
//! The non-adaptive samplers expand into points here, as a sweep does: `random` draws
//! `trials` points (the same ones for the same seed), `grid` runs every combination of
//! `choice` and `int` parameters. The adaptive sampler (`tpe`, [`crate::sampler`]) compiles
//! to one trial at a time: the runner asks for the next point with what has finished
//! ([`SearchRequest`]) until `trials` have begun; its trials may be pruned (`pruner: asha`,
//! [`crate::pruner`]).

use std::collections::BTreeSet;

use rand::SeedableRng;

pub use crate::pruner::Asha;
pub use crate::sampler::{History, SearchRequest, Told};
use crate::sampler::{Param, draw, tpe_point};
use crate::sweep::{Assignment, Axis, Point, label, product};
use crate::yaml::{Key, Node, Origin, Value};
use crate::{Ctx, did_you_mean, settable_path};

/// A search's objectives and sampler, as compiled.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct SearchSpec {
    /// What the study optimises, in the file's order.
    pub objectives: Vec<Objective>,
    /// `random`, `grid` or `tpe`.
    pub sampler: String,
    /// The sampler's seed.
    pub seed: u64,
    /// The searched keys, as written (`train.beta`; a run records them as params of the same names).
    pub params: Vec<String>,
    /// How many trials (points) the study runs; for a grid, its size.
    pub trials: usize,
    /// `tpe`: random trials before the estimator takes over.
    pub startup: usize,
    /// `pruner: asha`: stop unpromising trials at rungs (with `tpe`).
    pub pruner: Option<Asha>,
}

impl SearchSpec {
    /// Whether the sampler needs results back: the experiment then holds one trial, and the
    /// runner compiles the next with [`SearchRequest::Next`] (see [`crate::Overrides::search`]).
    pub fn adaptive(&self) -> bool {
        self.sampler == "tpe"
    }
}

/// One objective: a validation metric and its direction.
#[derive(Debug, Clone, PartialEq)]
pub struct Objective {
    /// The metric (`val.*`).
    pub metric: String,
    /// Larger is better (`goal: max`).
    pub maximize: bool,
}

/// Where a parameter's values come from.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Dist {
    Uniform(f64, f64),
    LogUniform(f64, f64),
    Int(i64, i64),
    Choice(Vec<Node>),
}

const KEYS: [&str; 5] = ["params", "objectives", "trials", "sampler", "pruner"];

fn number(n: &Node) -> Option<f64> {
    match n.value {
        Value::Int(i) => Some(i as f64),
        Value::Float(f) if f.is_finite() => Some(f),
        _ => None,
    }
}

fn dist(cx: &mut Ctx, key: &str, n: &Node) -> Option<Dist> {
    let at = format!("search.params.{key}");
    let kinds = ["uniform", "log_uniform", "int", "choice"];
    let Some([(k, v)]) = n.as_map() else {
        cx.err(&n.origin, &at, format!("expected one of {{ {}: [...] }}", kinds.join(": [...] }, { ")));
        return None;
    };
    let items = match &v.value {
        Value::Seq(items) if !items.is_empty() => items,
        _ => {
            cx.err(&v.origin, &format!("{at}.{}", k.name), format!("expected a list, found {}", v.value.type_name()));
            return None;
        }
    };
    let pair = |cx: &mut Ctx| -> Option<(f64, f64)> {
        match items.as_slice() {
            [a, b] => match (number(a), number(b)) {
                (Some(a), Some(b)) if a < b => Some((a, b)),
                (Some(_), Some(_)) => {
                    cx.err(&v.origin, &format!("{at}.{}", k.name), "expected [low, high] with low < high");
                    None
                }
                _ => {
                    cx.err(&v.origin, &format!("{at}.{}", k.name), "expected two numbers [low, high]");
                    None
                }
            },
            _ => {
                cx.err(&v.origin, &format!("{at}.{}", k.name), "expected two numbers [low, high]");
                None
            }
        }
    };
    match k.name.as_str() {
        "uniform" => pair(cx).map(|(a, b)| Dist::Uniform(a, b)),
        "log_uniform" => match pair(cx) {
            Some((a, b)) if a > 0.0 => Some(Dist::LogUniform(a, b)),
            Some(_) => {
                cx.err(&v.origin, &format!("{at}.log_uniform"), "needs low > 0");
                None
            }
            None => None,
        },
        "int" => match items.as_slice() {
            [Node { value: Value::Int(a), .. }, Node { value: Value::Int(b), .. }] if a <= b => Some(Dist::Int(*a, *b)),
            _ => {
                cx.err(&v.origin, &format!("{at}.int"), "expected two integers [low, high] with low <= high");
                None
            }
        },
        "choice" => Some(Dist::Choice(items.clone())),
        other => {
            cx.err(
                &k.origin,
                &format!("{at}.{other}"),
                format!("unknown distribution `{other}`{} ({})", did_you_mean(other, kinds), kinds.join(", ")),
            );
            None
        }
    }
}

/// The search's points and its spec; None without a `search:` block.
pub(crate) fn points(
    cx: &mut Ctx,
    root: &Node,
    stage_names: &BTreeSet<String>,
    repeat: u32,
    max_runs: usize,
    request: Option<&SearchRequest>,
) -> Option<(Vec<Point>, SearchSpec)> {
    let search = root.get("search")?;
    if root.get("sweep").is_some() {
        let origin = root.key("search").map(|k| k.origin.clone()).unwrap_or_else(|| search.origin.clone());
        cx.err(&origin, "search", "an experiment has a `sweep:` or a `search:`, not both");
        return Some((Vec::new(), SearchSpec::default()));
    }
    let empty = (Vec::new(), SearchSpec::default());
    let Some(map) = search.as_map() else {
        cx.err(&search.origin, "search", format!("expected a mapping, found {}", search.value.type_name()));
        return Some(empty);
    };
    unknown_keys(cx, map, "search", &KEYS);
    // Parameters.
    let mut params: Vec<Param> = Vec::new();
    match search.get("params").and_then(Node::as_map) {
        Some(m) if !m.is_empty() => {
            for (k, v) in m {
                let path = match settable_path(&k.name, stage_names) {
                    Ok(p) => p,
                    Err(why) => {
                        cx.err(&k.origin, &format!("search.params.{}", k.name), format!("search key {why}"));
                        continue;
                    }
                };
                if let Some(d) = dist(cx, &k.name, v) {
                    params.push((k.clone(), path, d));
                }
            }
        }
        _ => cx.err(&search.origin, "search.params", "expected a mapping of key: { distribution: [...] }"),
    }
    // Objectives: validation metrics only.
    let mut objectives = Vec::new();
    match search.get("objectives") {
        Some(Node { value: Value::Seq(items), .. }) if !items.is_empty() => {
            for (i, o) in items.iter().enumerate() {
                let at = format!("search.objectives.{i}");
                let metric =
                    o.get("metric").and_then(|m| if let Value::Str(s) = &m.value { Some(s.clone()) } else { None });
                let goal =
                    o.get("goal").and_then(|g| if let Value::Str(s) = &g.value { Some(s.clone()) } else { None });
                match (metric, goal.as_deref()) {
                    (Some(m), _) if !m.starts_with("val.") => cx.err(
                        &o.origin,
                        &format!("{at}.metric"),
                        format!("`{m}` is not a validation metric: objectives are `val.*` metrics, the test split is never used to choose"),
                    ),
                    (Some(m), Some("max" | "min")) => {
                        objectives.push(Objective { metric: m, maximize: goal.as_deref() == Some("max") })
                    }
                    (Some(_), _) => cx.err(&o.origin, &format!("{at}.goal"), "expected `goal: max` or `goal: min`"),
                    (None, _) => cx.err(&o.origin, &at, "expected { metric: val..., goal: max|min }"),
                }
            }
        }
        Some(o) => cx.err(&o.origin, "search.objectives", "expected a non-empty list of { metric, goal }"),
        None => cx.err(&search.origin, "search.objectives", "missing required key `objectives`"),
    }
    // Sampler and pruner.
    let sampler = search.get("sampler");
    let kind = sampler.and_then(|s| s.get("kind")).map(|k| k.to_string()).unwrap_or_else(|| "random".into());
    let sampler_at = sampler.map(|s| s.origin.clone()).unwrap_or_else(|| search.origin.clone());
    let sampler_keys: &[&str] = if kind == "tpe" { &["kind", "seed", "startup"] } else { &["kind", "seed"] };
    for (k, _) in sampler.and_then(Node::as_map).unwrap_or_default() {
        if !sampler_keys.contains(&k.name.as_str()) {
            let hint = did_you_mean(&k.name, ["kind", "seed", "startup"]);
            cx.err(
                &k.origin,
                &format!("search.sampler.{}", k.name),
                format!("unknown key `{}`{hint} for sampler `{kind}` ({})", k.name, sampler_keys.join(", ")),
            );
        }
    }
    let seed = int_key(cx, sampler, "search.sampler", "seed", 0).unwrap_or(0) as u64;
    let startup = int_key(cx, sampler, "search.sampler", "startup", 1).unwrap_or(10) as usize;
    match kind.as_str() {
        "random" | "grid" | "tpe" => {}
        other => cx.err(
            &sampler_at,
            "search.sampler.kind",
            format!(
                "unknown sampler `{other}`{} (random | grid | tpe)",
                did_you_mean(other, ["random", "grid", "tpe"])
            ),
        ),
    }
    let pruner = search.get("pruner").and_then(|p| asha(cx, p, &kind));
    let trials = search.get("trials");
    let mut spec = SearchSpec {
        objectives,
        sampler: kind.clone(),
        seed,
        params: params.iter().map(|(k, _, _)| k.name.clone()).collect(),
        trials: 0,
        startup,
        pruner,
    };
    let mut pts: Vec<Vec<Assignment>> = Vec::new();
    if kind == "grid" {
        if let Some(t) = trials {
            cx.err(&t.origin, "search.trials", "a grid runs every combination: `trials` is for `random` and `tpe`");
        }
        let mut axes: Vec<Axis> = Vec::new();
        let mut total: usize = 1;
        for (k, path, d) in &params {
            let values: Vec<Node> = match d {
                Dist::Choice(v) => v.clone(),
                Dist::Int(a, b) if b - a < 10_000 => {
                    (*a..=*b).map(|i| Node::new(Value::Int(i), k.origin.clone())).collect()
                }
                _ => {
                    cx.err(
                        &k.origin,
                        &format!("search.params.{}", k.name),
                        "a grid takes `choice` and `int` parameters",
                    );
                    continue;
                }
            };
            total = total.saturating_mul(values.len());
            if total.saturating_mul(repeat as usize) > max_runs {
                cx.err(
                    &search.origin,
                    "search",
                    format!("the grid makes more than {max_runs} runs (raise it with --max-runs)"),
                );
                return Some((Vec::new(), spec));
            }
            axes.push((k.name.clone(), path.clone(), values));
        }
        pts = product(&axes);
        spec.trials = pts.len();
    } else {
        let n = match trials {
            Some(Node { value: Value::Int(i), .. }) if *i >= 1 => *i as usize,
            Some(t) => {
                cx.err(&t.origin, "search.trials", "expected a positive integer");
                0
            }
            None => {
                cx.err(&search.origin, "search.trials", "missing required key `trials` (how many points to draw)");
                0
            }
        };
        if n.saturating_mul(repeat as usize) > max_runs {
            cx.err(
                &search.origin,
                "search.trials",
                format!("{n} trials make more than {max_runs} runs (raise it with --max-runs)"),
            );
            return Some((Vec::new(), spec));
        }
        spec.trials = n;
        if kind == "random" {
            let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
            for _ in 0..n {
                pts.push(
                    params
                        .iter()
                        .map(|(k, path, d)| (k.name.clone(), path.clone(), draw(d, &mut rng, &k.origin)))
                        .collect(),
                );
            }
        } else if kind == "tpe" && cx.errors == 0 {
            // One trial: the one asked for, or the next one.
            let maximize: Vec<bool> = spec.objectives.iter().map(|o| o.maximize).collect();
            let point = match request {
                Some(SearchRequest::Point { label, values }) => {
                    let mut point = Vec::new();
                    for (k, path, _) in &params {
                        let arg = format!("the recorded trial {label}");
                        match values.get(&k.name).map(|v| Node::parse_arg(v, &arg)) {
                            Some(Ok(v)) => point.push((path.clone(), v)),
                            _ => cx.err(
                                &k.origin,
                                &format!("search.params.{}", k.name),
                                format!("the recorded trial `{label}` has no value for this key"),
                            ),
                        }
                    }
                    (label.clone(), point)
                }
                Some(SearchRequest::Next(h)) => tpe_trial(&params, h, &maximize, seed, startup),
                None => tpe_trial(&params, &History::default(), &maximize, seed, startup),
            };
            return Some((vec![point], spec));
        }
    }
    let points = pts
        .into_iter()
        .enumerate()
        .map(|(i, p)| {
            let values = label(&p);
            let label = if kind == "random" { format!("trial={i},{values}") } else { values };
            (label, p.into_iter().map(|(_, path, v)| (path, v)).collect())
        })
        .collect();
    Some((points, spec))
}

/// The experiment with the `--search KEY=uniform(0,1)` parameters added to its `search:`
/// (replacing a parameter of the same key). The file must have a `search:` block: its
/// objectives and sampler are what the command line cannot say.
pub(crate) fn cli_params(cx: &mut Ctx, root: &Node, args: &[String], stage_names: &BTreeSet<String>) -> Node {
    let mut root = root.clone();
    let kinds = ["uniform", "log_uniform", "int", "choice"];
    for s in args {
        let arg = format!("--search {s}");
        let origin = Origin::Arg(arg.clone());
        if root.get("search").is_none() {
            cx.err(
                &origin,
                "search",
                "the file has no `search:` block: --search adds parameters to one (its objectives and sampler come from the file; --sweep makes a grid without)",
            );
            return root;
        }
        let parsed = s.split_once('=').and_then(|(k, v)| {
            let v = v.trim();
            let open = v.find('(')?;
            v.ends_with(')').then(|| (k.trim(), &v[..open], &v[open + 1..v.len() - 1]))
        });
        let Some((key, kind, inner)) = parsed else {
            cx.err(
                &origin,
                "",
                format!("expected KEY=DIST(ARGS), DIST one of {}: `train.beta=uniform(0,1)`", kinds.join(", ")),
            );
            continue;
        };
        if let Err(why) = settable_path(key, stage_names) {
            cx.err(&origin, "", format!("--search key {why}"));
            continue;
        }
        if !kinds.contains(&kind) {
            cx.err(
                &origin,
                key,
                format!("unknown distribution `{kind}`{} ({})", did_you_mean(kind, kinds), kinds.join(", ")),
            );
            continue;
        }
        let values =
            inner.split(',').map(|part| Node::parse_arg(part.trim(), &arg)).collect::<Result<Vec<Node>, String>>();
        let values = match values {
            Ok(v) => v,
            Err(e) => {
                cx.err(&origin, key, format!("invalid value: {e}"));
                continue;
            }
        };
        let dist = Node::new(
            Value::Map(vec![(
                Key { name: kind.to_string(), origin: origin.clone() },
                Node::new(Value::Seq(values), origin.clone()),
            )]),
            origin.clone(),
        );
        if let Err(e) = root.set(&["search".to_string(), "params".to_string(), key.to_string()], dist) {
            cx.err(&origin, key, format!("cannot add to the file's search: {e}"));
        }
    }
    root
}

/// An error for each key of `map` (the mapping at `at`) that is not one of `known`.
fn unknown_keys(cx: &mut Ctx, map: &[(Key, Node)], at: &str, known: &[&str]) {
    for (k, _) in map {
        if !known.contains(&k.name.as_str()) {
            let hint = did_you_mean(&k.name, known.iter().copied());
            cx.err(
                &k.origin,
                &format!("{at}.{}", k.name),
                format!("unknown key `{}`{hint} ({})", k.name, known.join(", ")),
            );
        }
    }
}

/// The integer at `parent.key` (None when absent), with an error unless it is >= `min`.
fn int_key(cx: &mut Ctx, parent: Option<&Node>, at: &str, key: &str, min: i64) -> Option<i64> {
    match parent.and_then(|p| p.get(key)) {
        None => None,
        Some(Node { value: Value::Int(i), .. }) if *i >= min => Some(*i),
        Some(n) => {
            cx.err(&n.origin, &format!("{at}.{key}"), format!("expected an integer >= {min}"));
            None
        }
    }
}

/// `pruner:` as compiled: `{ kind: asha, min_epochs, max_epochs, reduction }` or `{ kind: none }`.
fn asha(cx: &mut Ctx, p: &Node, sampler: &str) -> Option<Asha> {
    let keys = ["kind", "min_epochs", "max_epochs", "reduction"];
    let Some(map) = p.as_map() else {
        cx.err(&p.origin, "search.pruner", "expected { kind: asha, min_epochs: N, max_epochs: N, reduction: N }");
        return None;
    };
    unknown_keys(cx, map, "search.pruner", &keys);
    let kind = p.get("kind").map(|k| k.to_string()).unwrap_or_default();
    match kind.as_str() {
        "none" => return None,
        "asha" => {}
        other => {
            cx.err(
                &p.origin,
                "search.pruner.kind",
                format!("unknown pruner `{other}`{} (asha | none)", did_you_mean(other, ["asha", "none"])),
            );
            return None;
        }
    }
    if sampler != "tpe" {
        cx.err(&p.origin, "search.pruner", "pruning runs in the study loop of `sampler: { kind: tpe }` (random and grid searches run every trial to the end)");
    }
    let min_epochs = int_key(cx, Some(p), "search.pruner", "min_epochs", 1).unwrap_or(1);
    let reduction = int_key(cx, Some(p), "search.pruner", "reduction", 2).unwrap_or(3);
    let max_epochs = int_key(cx, Some(p), "search.pruner", "max_epochs", 1);
    if let Some(m) = max_epochs.filter(|m| *m <= min_epochs) {
        cx.err(
            &p.origin,
            "search.pruner.max_epochs",
            format!("{m} leaves no rung: expected more than min_epochs ({min_epochs})"),
        );
    }
    Some(Asha { min_epochs, max_epochs, reduction })
}

/// Trial `h.begun` of a TPE search, labelled `trial=N,key=value,...`.
fn tpe_trial(params: &[Param], h: &History, maximize: &[bool], seed: u64, startup: usize) -> Point {
    let p = tpe_point(params, &h.told, maximize, seed, startup, h.begun);
    (format!("trial={},{}", h.begun, label(&p)), p.into_iter().map(|(_, path, v)| (path, v)).collect())
}

#[cfg(test)]
mod tests {
    use crate::tests::{DIAMOND, compile_err, compile_ok};

    fn value(run: &crate::RunSpec, stage: &str, key: &str) -> serde_json::Value {
        run.stages.iter().find(|s| s.name == stage).unwrap().config[key].clone()
    }

    const RANDOM: &str = "search:\n  params:\n    left.factor: { uniform: [0.0, 1.0] }\n    right.offset: { log_uniform: [0.001, 1.0] }\n    \
                          source.count: { int: [3, 5] }\n  objectives: [ { metric: val.sum, goal: max } ]\n  trials: 6\n";

    #[test]
    fn random_search_draws_its_trials_in_their_ranges_the_same_for_a_seed() {
        let exp = compile_ok(&format!("{DIAMOND}{RANDOM}  sampler: {{ kind: random, seed: 3 }}\n"), &[]);
        assert_eq!(exp.runs.len(), 6);
        assert!(exp.runs[0].point.starts_with("trial=0,left.factor="), "{}", exp.runs[0].point);
        for r in &exp.runs {
            let f = value(r, "left", "factor").as_f64().unwrap();
            let o = value(r, "right", "offset").as_f64().unwrap();
            let c = value(r, "source", "count").as_i64().unwrap();
            assert!((0.0..1.0).contains(&f) && (0.001..1.0).contains(&o) && (3..=5).contains(&c), "{}", r.point);
        }
        let spec = exp.search.as_ref().unwrap();
        assert_eq!((spec.sampler.as_str(), spec.seed, spec.objectives.len()), ("random", 3, 1));
        assert!(spec.objectives[0].maximize && spec.objectives[0].metric == "val.sum");
        // The same seed, the same points; another seed, others.
        let again = compile_ok(&format!("{DIAMOND}{RANDOM}  sampler: {{ kind: random, seed: 3 }}\n"), &[]);
        let other = compile_ok(&format!("{DIAMOND}{RANDOM}  sampler: {{ kind: random, seed: 4 }}\n"), &[]);
        let points = |e: &crate::Experiment| e.runs.iter().map(|r| r.point.clone()).collect::<Vec<_>>();
        assert_eq!(points(&exp), points(&again));
        assert_ne!(points(&exp), points(&other));
        // Log-uniform draws spread over the decades: some below 0.03, some above (6 draws of
        // three decades; the fixed seed makes this a fact, not a chance).
        let offsets: Vec<f64> = exp.runs.iter().map(|r| value(r, "right", "offset").as_f64().unwrap()).collect();
        assert!(offsets.iter().any(|o| *o < 0.03) && offsets.iter().any(|o| *o > 0.03), "{offsets:?}");
    }

    #[test]
    fn a_grid_search_runs_every_combination_of_choices_and_integers() {
        let exp = compile_ok(
            &format!(
                "{DIAMOND}search:\n  params:\n    source.count: {{ int: [3, 4] }}\n    left.factor: {{ choice: [1.0, 2.0, 5.0] }}\n  \
                 objectives: [ {{ metric: val.sum, goal: min }} ]\n  sampler: {{ kind: grid }}\n"
            ),
            &[],
        );
        assert_eq!(exp.runs.len(), 6);
        assert_eq!(exp.runs[0].point, "source.count=3,left.factor=1.0");
        assert!(!exp.search.unwrap().objectives[0].maximize);
    }

    #[test]
    fn a_tpe_search_compiles_one_trial_at_a_time_the_one_asked_for() {
        use super::{History, SearchRequest, Told};
        use crate::{Overrides, tests::registry};
        let text = format!("{DIAMOND}{RANDOM}  sampler: {{ kind: tpe, seed: 5, startup: 2 }}\nrepeat: 2\n");
        let compile = |req: Option<SearchRequest>| {
            let o = Overrides { search: req, ..Default::default() };
            crate::compile_str(&text, "e.yaml", &o, &registry(), &|_| None).unwrap()
        };
        let first = compile(None);
        let spec = first.search.clone().unwrap();
        assert!(spec.adaptive());
        assert_eq!((spec.trials, spec.startup, spec.params.len()), (6, 2, 3));
        // One trial, its seeds; labelled by its index.
        assert_eq!(first.runs.len(), 2);
        assert!(first.runs[0].point.starts_with("trial=0,left.factor="), "{}", first.runs[0].point);
        assert_eq!(
            compile(Some(SearchRequest::Next(History::default()))).runs[1].resolved_yaml,
            first.runs[1].resolved_yaml
        );
        // Trial 3 after three finished ones: another point, the same for the same history.
        let told: Vec<Told> = (0..3)
            .map(|i| Told {
                values: [
                    ("left.factor", format!("0.{i}5")),
                    ("right.offset", "0.01".into()),
                    ("source.count", "4".into()),
                ]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
                objectives: vec![f64::from(i)],
                pruned_at: None,
            })
            .collect();
        let next = compile(Some(SearchRequest::Next(History { begun: 3, told: told.clone() })));
        assert!(next.runs[0].point.starts_with("trial=3,"), "{}", next.runs[0].point);
        assert_ne!(next.runs[0].point, first.runs[0].point);
        assert_eq!(compile(Some(SearchRequest::Next(History { begun: 3, told }))).runs[0].point, next.runs[0].point);
        // A recorded trial again: its label and values as they were.
        let values = [("left.factor", "0.25"), ("right.offset", "0.5"), ("source.count", "3")]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let again = compile(Some(SearchRequest::Point { label: "trial=1,x".into(), values }));
        assert_eq!(again.runs[0].point, "trial=1,x");
        assert_eq!(value(&again.runs[1], "left", "factor"), serde_json::json!(0.25));
        assert_eq!(value(&again.runs[1], "source", "count"), serde_json::json!(3));
    }

    #[test]
    fn search_params_from_the_command_line_join_or_replace_the_files() {
        use crate::{Overrides, tests::registry};
        let compile = |args: &[&str], text: &str| {
            let o = Overrides { search_params: args.iter().map(|s| s.to_string()).collect(), ..Default::default() };
            crate::compile_str(text, "e.yaml", &o, &registry(), &|_| None)
        };
        let text = format!("{DIAMOND}{RANDOM}");
        // Replaces left.factor's range, adds right.factor with a choice.
        let exp = compile(&["left.factor=uniform(5, 6)", "right.factor=choice(1, 2)"], &text).unwrap();
        assert_eq!(
            exp.search.as_ref().unwrap().params,
            ["left.factor", "right.offset", "source.count", "right.factor"]
        );
        for r in &exp.runs {
            let f = value(r, "left", "factor").as_f64().unwrap();
            assert!((5.0..6.0).contains(&f), "{f}");
            assert!([1.0, 2.0].contains(&value(r, "right", "factor").as_f64().unwrap()));
        }
        // Mistakes name the argument.
        let err = |args: &[&str], text: &str| compile(args, text).unwrap_err().to_string();
        let e = err(&["left.factor=normal(0,1)"], &text);
        assert!(e.contains("--search left.factor=normal(0,1)") && e.contains("unknown distribution `normal`"), "{e}");
        let e = err(&["left.factor=uniform(1,0)"], &text);
        assert!(e.contains("expected [low, high] with low < high"), "{e}");
        let e = err(&["left.factr=uniform(0,1)"], &text);
        assert!(e.contains("factr"), "{e}");
        let e = err(&["left.factor"], &text);
        assert!(e.contains("expected KEY=DIST(ARGS)"), "{e}");
        let e = err(&["left.factor=uniform(0,1)"], DIAMOND);
        assert!(e.contains("has no `search:` block"), "{e}");
    }

    #[test]
    fn search_mistakes_are_positioned_errors() {
        use super::Asha;
        let e = compile_err(&format!("{DIAMOND}sweep:\n  left.factor: [1, 2]\n{RANDOM}"), &[]);
        assert!(e.iter().any(|d| d.contains("search: an experiment has a `sweep:` or a `search:`, not both")), "{e:?}");
        let test_metric = RANDOM.replace("val.sum", "test.sum");
        let e = compile_err(&format!("{DIAMOND}{test_metric}"), &[]);
        assert!(
            e.iter().any(|d| d.contains("search.objectives.0.metric") && d.contains("not a validation metric")),
            "{e:?}"
        );
        let e = compile_err(&format!("{DIAMOND}{}", RANDOM.replace("{ uniform:", "{ uniformm:")), &[]);
        assert!(
            e.iter().any(|d| d.contains("unknown distribution `uniformm`") && d.contains("did you mean `uniform`")),
            "{e:?}"
        );
        let e = compile_err(&format!("{DIAMOND}{}", RANDOM.replace("[0.0, 1.0]", "[1.0, 0.5]")), &[]);
        assert!(
            e.iter().any(|d| d.contains("search.params.left.factor.uniform: expected [low, high] with low < high")),
            "{e:?}"
        );
        let e = compile_err(&format!("{DIAMOND}{}", RANDOM.replace("[0.001, 1.0]", "[0.0, 1.0]")), &[]);
        assert!(e.iter().any(|d| d.contains("log_uniform: needs low > 0")), "{e:?}");
        let e = compile_err(&format!("{DIAMOND}{}  sampler: {{ kind: tpe, startup: 0, seeds: 2 }}\n", RANDOM), &[]);
        assert!(
            e.iter().any(|d| d.contains("search.sampler.startup") && d.contains("expected an integer >= 1")),
            "{e:?}"
        );
        assert!(e.iter().any(|d| d.contains("unknown key `seeds`") && d.contains("did you mean `seed`")), "{e:?}");
        let e = compile_err(&format!("{DIAMOND}{}  sampler: {{ kind: random, startup: 3 }}\n", RANDOM), &[]);
        assert!(e.iter().any(|d| d.contains("unknown key `startup` for sampler `random`")), "{e:?}");
        let e = compile_err(&format!("{DIAMOND}{RANDOM}  pruner: {{ kind: asha, min_epochs: 4 }}\n"), &[]);
        assert!(
            e.iter().any(|d| d.contains("search.pruner") && d.contains("study loop of `sampler: { kind: tpe }`")),
            "{e:?}"
        );
        let tpe = format!("{DIAMOND}{RANDOM}  sampler: {{ kind: tpe }}\n");
        let e =
            compile_err(&format!("{tpe}  pruner: {{ kind: asha, min_epochs: 4, max_epochs: 3, reduce: 2 }}\n"), &[]);
        assert!(e.iter().any(|d| d.contains("search.pruner.max_epochs") && d.contains("leaves no rung")), "{e:?}");
        assert!(
            e.iter().any(|d| d.contains("unknown key `reduce`") && d.contains("did you mean `reduction`")),
            "{e:?}"
        );
        let e = compile_err(&format!("{tpe}  pruner: {{ kind: hyperband }}\n"), &[]);
        assert!(e.iter().any(|d| d.contains("unknown pruner `hyperband`")), "{e:?}");
        let ok = compile_ok(&format!("{tpe}  pruner: {{ kind: asha, min_epochs: 2, reduction: 2 }}\n"), &[]);
        assert_eq!(ok.search.unwrap().pruner, Some(Asha { min_epochs: 2, max_epochs: None, reduction: 2 }));
        let e = compile_err(&format!("{DIAMOND}{}", RANDOM.replace("  trials: 6\n", "  trails: 6\n")), &[]);
        assert!(e.iter().any(|d| d.contains("unknown key `trails`") && d.contains("did you mean `trials`")), "{e:?}");
        assert!(e.iter().any(|d| d.contains("missing required key `trials`")), "{e:?}");
        let e = compile_err(&format!("{DIAMOND}{}", RANDOM.replace("left.factor:", "lefft.factor:")), &[]);
        assert!(e.iter().any(|d| d.contains("search.params.lefft.factor: search key")), "{e:?}");
        // Positioned: the line of the offending entry.
        let e = compile_err(&format!("{DIAMOND}{test_metric}"), &[]);
        assert!(e.iter().any(|d| d.starts_with("e.yaml:") && d.contains("search.objectives.0.metric")), "{e:?}");
    }
}
