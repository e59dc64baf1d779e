//! `huse-config`: experiment files — parse, override, expand sweeps, validate — before
//! anything runs.
//!
//! An experiment file is read once into a positioned YAML tree ([`yaml::Node`]) held by a
//! [`Source`]; [`Source::plugins`] lists the plugin libraries it names (the binary loads
//! them into the [`Registry`] before compiling), and [`compile`] turns it into an
//! [`Experiment`]: one [`RunSpec`] per sweep point and seed, each with its stages in
//! topological order and the resolved artifact edges ([`Edge`]: which output of which
//! stage feeds which input) that the scheduler wires. Every problem found on the way is
//! collected as a [`Diagnostic`] naming file, line, column and key path; nothing runs
//! unless the list is empty.
//!
//! The passes, in order: top-level keys ([`compile`]), `--set` overrides, sweep points
//! ([`sweep`]), then per point: interpolation, run settings, stage entries, order, wiring
//! and each stage's own validation ([`stages`]); finally params and the resolved YAML
//! ([`resolved`]).
//!
//! ```
//! let mut registry = huse_registry::Registry::default();
//! for s in huse_stage_toy::stages() {
//!     registry.add(std::sync::Arc::from(s), "builtin");
//! }
//! let text = "name: t\nstages:\n  src: { uses: toy-source }\n  sum: { uses: toy-sum, needs: [src] }\n";
//! let err = huse_config::compile_str(text, "t.yaml", &Default::default(), &registry, &|_| None).unwrap_err();
//! assert!(err.to_string().contains("t.yaml:4:3: stages.sum.needs: stage `sum` (toy-sum) takes artifact `scaled.json`"));
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::path::{Path, PathBuf};

use huse_registry::Registry;
use huse_stage_api::DeviceSpec;

pub mod pruner;
pub mod resolved;
pub mod sampler;
pub mod search;
pub mod stages;
pub mod sweep;
pub mod yaml;

use yaml::{Node, Origin, Value};

/// A positioned problem in an experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    /// The experiment file as the user named it.
    pub file: String,
    /// Line and column, or the command-line argument.
    pub origin: Origin,
    /// Dotted key path, e.g. `stages.train.with.alpha`.
    pub path: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = if self.path.is_empty() { String::new() } else { format!(" {}:", self.path) };
        match &self.origin {
            Origin::File { line, column } => write!(f, "{}:{line}:{column}:{at} {}", self.file, self.message),
            Origin::Arg(a) => write!(f, "{} (command line `{a}`):{at} {}", self.file, self.message),
            Origin::Default => write!(f, "{}:{at} {}", self.file, self.message),
        }
    }
}

/// All the diagnostics of a failed compilation.
#[derive(Debug)]
pub struct Diagnostics(pub Vec<Diagnostic>);

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, d) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "error: {d}")?;
        }
        write!(f, "\n{} error(s) in experiment; nothing was run", self.0.len())
    }
}

impl std::error::Error for Diagnostics {}

/// Command-line changes to the experiment.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    /// `KEY=VALUE` pairs from `--set`.
    pub set: Vec<String>,
    /// `KEY=V1,V2,...` (or `KEY=[V1, V2]`) from `--sweep`: grid axes added to the file's
    /// sweep (an axis of the same key in the file is replaced).
    pub sweep: Vec<String>,
    /// `KEY=uniform(0,1)` (or `log_uniform(a,b)`, `int(a,b)`, `choice(x,y,...)`) from
    /// `--search`: parameters added to the file's `search:` (a parameter of the same key in
    /// the file is replaced).
    pub search_params: Vec<String>,
    /// `--repeat N`.
    pub repeat: Option<u32>,
    /// `--force STAGE` names (checked against the experiment's stages).
    pub force: Vec<String>,
    /// `--max-runs N`: the largest sweep accepted (default [`MAX_RUNS`]).
    pub max_runs: Option<usize>,
    /// An adaptive search's trial to compile (the runner's study loop); None: its first.
    pub search: Option<search::SearchRequest>,
}

/// The default limit on the runs of one experiment (sweep points x seeds).
pub const MAX_RUNS: usize = 100_000;
/// The largest `repeat`.
pub const MAX_REPEAT: u32 = 10_000;

/// One artifact edge: the input `artifact` of a stage is the output of the same name of
/// stage `from` (one of its `needs`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Edge {
    /// Artifact name.
    pub artifact: String,
    /// The upstream stage (name in the experiment) that gives it.
    pub from: String,
}

/// One stage of one run, resolved.
#[derive(Debug, Clone)]
pub struct StageSpec {
    /// Name in the experiment (the key under `stages:`).
    pub name: String,
    /// Stage kind (`uses:`).
    pub kind: String,
    /// Upstream stages, in file order.
    pub needs: Vec<String>,
    /// Where each declared input comes from, in the order the stage declares its inputs
    /// (an input that several stages give has one edge per provider, in `needs` order).
    pub inputs: Vec<Edge>,
    /// The `with:` mapping as JSON (null when absent).
    pub config: serde_json::Value,
}

/// One run: a sweep point with one seed.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// `EXPERIMENT`, `EXPERIMENT@k=v,...`, plus `/seed=N` with `repeat`.
    pub name: String,
    /// Sweep assignments of this run, e.g. `train.beta=0.5,train.gamma=1` (empty without a sweep).
    pub point: String,
    /// The run's seed.
    pub seed: u64,
    /// Where to compute.
    pub device: DeviceSpec,
    /// Stages in a topological order.
    pub stages: Vec<StageSpec>,
    /// Every leaf config key, flattened (`seed`, `train.alpha`, `train.uses`, ...; not the device, which is [`Self::device`]).
    pub params: Vec<(String, serde_json::Value)>,
    /// The resolved config as YAML.
    pub resolved_yaml: String,
}

/// A compiled experiment.
#[derive(Debug, Clone)]
pub struct Experiment {
    /// The experiment file.
    pub file: PathBuf,
    /// Its `name:`.
    pub name: String,
    /// Every run, in sweep order.
    pub runs: Vec<RunSpec>,
    /// The `search:` block's objectives and sampler (None for a sweep or a single point).
    pub search: Option<search::SearchSpec>,
}

/// A plugin library an experiment names (`plugins:`), resolved against the file's folder.
#[derive(Debug, Clone)]
pub struct PluginRef {
    /// The library's path.
    pub path: PathBuf,
    /// Where the entry is.
    pub origin: Origin,
    /// Its key path, `plugins.N`.
    pub key: String,
}

/// An experiment file read and parsed once (the plugin list and the compile both use the
/// same tree).
#[derive(Debug)]
pub struct Source {
    /// The file.
    pub file: PathBuf,
    /// How the file is named in messages.
    pub display: String,
    /// The parsed tree, or the syntax error.
    root: Result<Node, Diagnostic>,
}

/// Top-level keys of an experiment file.
pub const TOP_KEYS: &[&str] =
    &["name", "description", "seed", "device", "repeat", "stages", "sweep", "search", "plugins", "launcher"];
/// Keys of a stage entry.
pub const STAGE_KEYS: &[&str] = &["uses", "needs", "with"];

/// Collects diagnostics while compiling.
pub(crate) struct Ctx<'a> {
    pub file: String,
    pub diags: Vec<Diagnostic>,
    pub registry: &'a Registry,
    /// Every error reported, repeats included (the list keeps one of each): passes compare
    /// this count, since a sweep point can repeat an earlier point's error.
    pub errors: usize,
}

impl Ctx<'_> {
    pub fn err(&mut self, origin: &Origin, path: &str, message: impl Into<String>) {
        self.errors += 1;
        let d = Diagnostic {
            file: self.file.clone(),
            origin: origin.clone(),
            path: path.to_string(),
            message: message.into(),
        };
        if !self.diags.contains(&d) {
            self.diags.push(d);
        }
    }
}

/// "did you mean `x`?" for the closest candidate, if it is close enough.
pub fn did_you_mean<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> String {
    // Close by edit distance (typos, swapped letters) or by shared prefix (Jaro-Winkler).
    let best = candidates
        .into_iter()
        .filter(|c| *c != word)
        .map(|c| (strsim::damerau_levenshtein(word, c), strsim::jaro_winkler(word, c), c))
        .filter(|(d, jw, c)| *jw > 0.85 || (*d <= 2 && *d * 3 <= c.len().max(word.len())))
        .min_by(|a, b| a.0.cmp(&b.0).then(b.1.total_cmp(&a.1)))
        .map(|(d, jw, c)| (d as f64 - jw, c));
    match best {
        Some((_, c)) => format!("; did you mean `{c}`?"),
        None => String::new(),
    }
}

/// Top-level keys a sweep or `--set` may change.
const SETTABLE_TOP: &[&str] = &["seed", "device", "description"];

/// The tree path a sweep or `--set` key addresses, or why it addresses nothing settable
/// (with a did-you-mean over the stage names and settable top-level keys).
pub(crate) fn settable_path(key: &str, stage_names: &BTreeSet<String>) -> Result<Vec<String>, String> {
    let path = override_path(key, stage_names);
    let ok = match path.first().map(String::as_str) {
        Some("stages") => path.get(1).is_some_and(|s| stage_names.contains(s)),
        Some(first) => SETTABLE_TOP.contains(&first),
        None => false,
    };
    if ok {
        return Ok(path);
    }
    let first = key.split('.').next().unwrap_or("");
    let hint = did_you_mean(first, stage_names.iter().map(String::as_str).chain(SETTABLE_TOP.iter().copied()));
    let known =
        stage_names.iter().map(String::as_str).chain(SETTABLE_TOP.iter().copied()).collect::<Vec<_>>().join(", ");
    Err(format!("`{key}` names no stage or settable top-level key{hint} (stages and keys: {known})"))
}

/// Maps an override key to its place in the tree: `train.beta` -> `stages.train.with.beta`.
pub fn override_path(key: &str, stage_names: &BTreeSet<String>) -> Vec<String> {
    let parts: Vec<String> = key.split('.').map(String::from).collect();
    match parts.split_first() {
        Some((first, rest)) if stage_names.contains(first) && !rest.is_empty() => {
            let mut p = vec!["stages".to_string(), first.clone()];
            if !STAGE_KEYS.contains(&rest[0].as_str()) {
                p.push("with".into());
            }
            p.extend(rest.iter().cloned());
            p
        }
        _ => parts,
    }
}

fn diag(display: &str, origin: Origin, message: String) -> Diagnostic {
    Diagnostic { file: display.to_string(), origin, path: String::new(), message }
}

impl Source {
    /// Reads an experiment file.
    pub fn read(file: &Path) -> Result<Source, Diagnostics> {
        let display = file.display().to_string();
        let text = std::fs::read_to_string(file).map_err(|e| {
            Diagnostics(vec![diag(&display, Origin::Default, format!("cannot read experiment file: {e}"))])
        })?;
        Ok(Source::from_text(&text, &display, file))
    }

    /// An experiment given as text; `display` names it in messages, `file` is where its
    /// relative paths (plugins) are resolved from.
    pub fn from_text(text: &str, display: &str, file: &Path) -> Source {
        let root = Node::parse(text).map_err(|e| {
            diag(display, Origin::File { line: e.line, column: e.column }, format!("invalid YAML: {}", e.message))
        });
        Source { file: file.to_path_buf(), display: display.to_string(), root }
    }

    /// The `launcher:` block (where and how a sweep is submitted, e.g. to SLURM) as JSON,
    /// with where it is; `None` when the file has none (or does not parse: [`compile`]
    /// reports that). It is not part of any run's config or cache key.
    pub fn launcher(&self) -> Option<(serde_json::Value, Origin)> {
        let root = self.tree().ok()?;
        let n = root.get("launcher")?;
        Some((n.to_json(), n.origin.clone()))
    }

    fn tree(&self) -> Result<&Node, Diagnostics> {
        self.root.as_ref().map_err(|d| Diagnostics(vec![d.clone()]))
    }

    /// The plugin libraries the file lists (`plugins:`), relative paths resolved against the
    /// file's folder, `${VAR}`s interpolated with `env`. A malformed list is reported by
    /// [`compile`], not here.
    pub fn plugins(&self, env: &dyn Fn(&str) -> Option<String>) -> Vec<PluginRef> {
        let Ok(root) = self.tree() else { return Vec::new() };
        let Some(Node { value: Value::Seq(items), .. }) = root.get("plugins") else { return Vec::new() };
        let base = self.file.parent().unwrap_or(Path::new("."));
        let mut out = Vec::new();
        for (i, it) in items.iter().enumerate() {
            if let Value::Str(p) = &it.value {
                let mut errs = Vec::new();
                let mut node = it.clone();
                node.interpolate(env, &mut Vec::new(), &mut errs);
                let p = if errs.is_empty() { node.to_string() } else { p.clone() };
                out.push(PluginRef { path: base.join(p), origin: it.origin.clone(), key: format!("plugins.{i}") });
            }
        }
        out
    }
}

/// Overrides, expands and validates an experiment against the stage kinds of `registry`;
/// `env` looks up `${VAR}`s.
pub fn compile(
    src: &Source,
    overrides: &Overrides,
    registry: &Registry,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Experiment, Diagnostics> {
    let mut cx = Ctx { file: src.display.clone(), diags: Vec::new(), registry, errors: 0 };
    let root = src.tree()?;
    let Some(map) = root.as_map() else {
        cx.err(&root.origin, "", format!("an experiment must be a mapping, found {}", root.value.type_name()));
        return Err(Diagnostics(cx.diags));
    };
    for (k, _) in map {
        if !TOP_KEYS.contains(&k.name.as_str()) {
            let hint = did_you_mean(&k.name, TOP_KEYS.iter().copied());
            cx.err(&k.origin, &k.name, format!("unknown key `{}`{hint} (known keys: {})", k.name, TOP_KEYS.join(", ")));
        }
    }
    check_plugins_list(&mut cx, root);
    let stage_names: BTreeSet<String> = root
        .get("stages")
        .and_then(Node::as_map)
        .map(|m| m.iter().map(|(k, _)| k.name.clone()).collect())
        .unwrap_or_default();
    let sets = parse_sets(&mut cx, &overrides.set, &stage_names);
    for f in &overrides.force {
        if !stage_names.contains(f) {
            let hint = did_you_mean(f, stage_names.iter().map(String::as_str));
            let known = stage_names.iter().map(String::as_str).collect::<Vec<_>>().join(", ");
            cx.err(
                &Origin::Arg(format!("--force {f}")),
                "",
                format!("no stage `{f}` in this experiment{hint} (stages: {known})"),
            );
        }
    }
    let repeat = repeat_count(&mut cx, root, overrides.repeat);
    let with_cli_sweep;
    let root = if overrides.sweep.is_empty() {
        root
    } else {
        with_cli_sweep = cli_sweeps(&mut cx, root, &overrides.sweep, &stage_names);
        &with_cli_sweep
    };
    let with_cli_search;
    let root = if overrides.search_params.is_empty() {
        root
    } else {
        with_cli_search = search::cli_params(&mut cx, root, &overrides.search_params, &stage_names);
        &with_cli_search
    };
    let max_runs = overrides.max_runs.unwrap_or(MAX_RUNS);
    let (points, search_spec) =
        match search::points(&mut cx, root, &stage_names, repeat, max_runs, overrides.search.as_ref()) {
            Some((points, spec)) => (points, Some(spec)),
            None => (sweep::points(&mut cx, root, &stage_names, repeat, max_runs), None),
        };
    let name = experiment_name(&mut cx, root, env);

    let mut runs = Vec::new();
    for (label, assignments) in &points {
        let mut tree = root.clone();
        let mut ok = true;
        for (path, value) in assignments.iter().chain(sets.iter()) {
            if let Err(e) = tree.set(path, value.clone()) {
                cx.err(&value.origin, &path.join("."), e);
                ok = false;
            }
        }
        if !ok {
            continue;
        }
        let mut errs = Vec::new();
        tree.interpolate(env, &mut Vec::new(), &mut errs);
        for (path, origin, msg) in errs {
            cx.err(&origin, &path.join("."), msg);
        }
        let Some((base_seed, device, stages)) = stages::compile_tree(&mut cx, &tree) else { continue };
        if base_seed.checked_add(u64::from(repeat) - 1).is_none_or(|last| last > i64::MAX as u64) {
            let origin = tree.get("seed").map(|n| n.origin.clone()).unwrap_or(Origin::Default);
            cx.err(
                &origin,
                "seed",
                format!(
                    "seed {base_seed} with repeat {repeat} gives seeds above {} (the largest the database stores)",
                    i64::MAX
                ),
            );
            continue;
        }
        for r in 0..u64::from(repeat) {
            let seed = base_seed + r;
            let mut run_tree = tree.clone();
            let _ = run_tree.set(&["seed".to_string()], Node::new(Value::Int(seed as i64), Origin::Default));
            let mut run_name = name.clone();
            if !label.is_empty() {
                run_name = format!("{run_name}@{label}");
            }
            if repeat > 1 {
                run_name = format!("{run_name}/seed={seed}");
            }
            runs.push(RunSpec {
                name: run_name,
                point: label.clone(),
                seed,
                device,
                stages: stages.clone(),
                params: resolved::params_of(&run_tree),
                resolved_yaml: resolved::yaml(&run_tree),
            });
        }
    }
    if !cx.diags.is_empty() {
        return Err(Diagnostics(cx.diags));
    }
    Ok(Experiment { file: src.file.clone(), name, runs, search: search_spec })
}

/// [`compile`] of an experiment given as text (`display` names it in messages).
pub fn compile_str(
    text: &str,
    display: &str,
    overrides: &Overrides,
    registry: &Registry,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Experiment, Diagnostics> {
    compile(&Source::from_text(text, display, Path::new(display)), overrides, registry, env)
}

fn check_plugins_list(cx: &mut Ctx, root: &Node) {
    let Some(pl) = root.get("plugins") else { return };
    match &pl.value {
        Value::Seq(items) => {
            for (i, it) in items.iter().enumerate() {
                if !matches!(it.value, Value::Str(_)) {
                    cx.err(
                        &it.origin,
                        &format!("plugins.{i}"),
                        format!("expected the path of a plugin library, found {}", it.value.type_name()),
                    );
                }
            }
        }
        _ => cx.err(&pl.origin, "plugins", "expected a list of plugin library paths"),
    }
}

/// The experiment with the `--sweep KEY=V1,V2,...` axes added to its `sweep:` (into its
/// `grid:` when the file's sweep has the `grid:`/`points:` form), replacing an axis of the
/// same key. Values are YAML scalars (`0.5`, `adamw`, `'a,b'`); `KEY=[...]` takes a YAML list.
fn cli_sweeps(cx: &mut Ctx, root: &Node, sweeps: &[String], stage_names: &BTreeSet<String>) -> Node {
    let mut root = root.clone();
    for s in sweeps {
        let arg = format!("--sweep {s}");
        let Some((k, v)) = s.split_once('=') else {
            cx.err(&Origin::Arg(arg), "", "expected KEY=V1,V2,... (or KEY=[V1, V2])");
            continue;
        };
        let key = k.trim();
        if let Err(why) = settable_path(key, stage_names) {
            cx.err(&Origin::Arg(arg), "", format!("--sweep key {why}"));
            continue;
        }
        let values = if v.trim_start().starts_with('[') {
            Node::parse_arg(v, &arg)
        } else {
            v.split(',')
                .map(|part| Node::parse_arg(part.trim(), &arg))
                .collect::<Result<Vec<Node>, String>>()
                .map(|items| Node::new(Value::Seq(items), Origin::Arg(arg.clone())))
        };
        let values = match values {
            Ok(n) if matches!(&n.value, Value::Seq(items) if !items.is_empty()) => n,
            Ok(n) => {
                cx.err(
                    &Origin::Arg(arg),
                    key,
                    format!("expected a non-empty list of values, found {}", n.value.type_name()),
                );
                continue;
            }
            Err(e) => {
                cx.err(&Origin::Arg(arg), key, format!("invalid value: {e}"));
                continue;
            }
        };
        let explicit = root
            .get("sweep")
            .and_then(Node::as_map)
            .is_some_and(|m| m.iter().any(|(k, _)| k.name == "grid" || k.name == "points"));
        let mut path = vec!["sweep".to_string()];
        if explicit {
            path.push("grid".into());
        }
        path.push(key.to_string());
        if let Err(e) = root.set(&path, values) {
            cx.err(&Origin::Arg(arg), key, format!("cannot add to the file's sweep: {e}"));
        }
    }
    root
}

/// `--set KEY=VALUE` pairs as (tree path, value); applied to every run after the sweep point.
fn parse_sets(cx: &mut Ctx, set: &[String], stage_names: &BTreeSet<String>) -> Vec<(Vec<String>, Node)> {
    let mut sets = Vec::new();
    for s in set {
        let arg = format!("--set {s}");
        let Some((k, v)) = s.split_once('=') else {
            cx.err(&Origin::Arg(arg), "", "expected KEY=VALUE");
            continue;
        };
        let path = match settable_path(k.trim(), stage_names) {
            Ok(p) => p,
            Err(why) => {
                cx.err(&Origin::Arg(arg), "", format!("--set key {why}"));
                continue;
            }
        };
        match Node::parse_arg(v, &arg) {
            Ok(n) => sets.push((path, n)),
            Err(e) => cx.err(&Origin::Arg(arg), k, format!("invalid value: {e}")),
        }
    }
    sets
}

fn repeat_count(cx: &mut Ctx, root: &Node, cli: Option<u32>) -> u32 {
    match (cli, root.get("repeat")) {
        (Some(r), _) if (1..=MAX_REPEAT).contains(&r) => r,
        (Some(r), _) => {
            cx.err(&Origin::Arg(format!("--repeat {r}")), "repeat", format!("expected 1 to {MAX_REPEAT}"));
            1
        }
        (None, None) => 1,
        (None, Some(n)) => match n.value {
            Value::Int(r) if r >= 1 && r <= i64::from(MAX_REPEAT) => r as u32,
            _ => {
                cx.err(&n.origin, "repeat", format!("expected an integer from 1 to {MAX_REPEAT}, found {}", n));
                1
            }
        },
    }
}

fn experiment_name(cx: &mut Ctx, root: &Node, env: &dyn Fn(&str) -> Option<String>) -> String {
    let mut node = root.get("name").cloned();
    if let Some(n) = &mut node {
        let mut errs = Vec::new();
        n.interpolate(env, &mut vec!["name".into()], &mut errs);
        for (path, origin, msg) in errs {
            cx.err(&origin, &path.join("."), msg);
        }
    }
    match node.as_ref() {
        Some(Node { value: Value::Str(s), .. }) if valid_name(s) => s.clone(),
        Some(n) => {
            cx.err(
                &n.origin,
                "name",
                format!("expected a name of letters, digits, `-`, `_` or `.` (not starting with `.`), found {n}"),
            );
            String::new()
        }
        None => {
            cx.err(&root.origin, "name", "missing required key `name`");
            String::new()
        }
    }
}

/// Letters, digits, `-`, `_` and `.`, not starting with `.`: a name is used as a folder
/// name (logs, reports, launches), so `.` and `..` must never pass.
pub(crate) fn valid_name(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('.') && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn registry() -> Registry {
        let mut r = Registry::default();
        for s in huse_stage_toy::stages() {
            r.add(std::sync::Arc::from(s), "builtin");
        }
        r
    }

    pub fn compile_ok(text: &str, set: &[&str]) -> Experiment {
        let o = Overrides { set: set.iter().map(|s| s.to_string()).collect(), ..Default::default() };
        compile_str(text, "e.yaml", &o, &registry(), &|k| (k == "HOME_OF_DATA").then(|| "/data".to_string()))
            .unwrap_or_else(|d| panic!("{d}"))
    }

    pub fn compile_err(text: &str, set: &[&str]) -> Vec<String> {
        let o = Overrides { set: set.iter().map(|s| s.to_string()).collect(), ..Default::default() };
        compile_str(text, "e.yaml", &o, &registry(), &|_| None).unwrap_err().0.iter().map(|d| d.to_string()).collect()
    }

    pub const DIAMOND: &str = "\
name: d
seed: 3
stages:
  source: { uses: toy-source, with: { count: 4 } }
  left:   { uses: toy-scale, needs: [source], with: { factor: 2.0 } }
  right:  { uses: toy-scale, needs: [source] }
  total:  { uses: toy-sum, needs: [left, right] }
";

    #[test]
    fn top_level_keys_name_and_repeat() {
        let e = compile_err("name: x y\nstagez: {}\nrepeat: 0\n", &[]);
        assert!(
            e.iter().any(|d| d.starts_with("e.yaml:2:1: stagez: unknown key `stagez`; did you mean `stages`?")),
            "{e:?}"
        );
        assert!(e.iter().any(|d| d.contains("e.yaml:1:7: name: expected a name")), "{e:?}");
        assert!(e.iter().any(|d| d.contains("repeat: expected an integer from 1 to 10000, found 0")), "{e:?}");
        let e = compile_err("- a\n", &[]);
        assert!(e[0].contains("an experiment must be a mapping"), "{e:?}");
        let e = compile_err("name: [\n", &[]);
        assert!(e[0].contains("invalid YAML"), "{e:?}");
    }

    #[test]
    fn sets_apply_after_the_file_and_are_positioned() {
        let e = compile_ok(DIAMOND, &["left.factor=5", "seed=9"]);
        assert_eq!(e.runs.len(), 1);
        let left = e.runs[0].stages.iter().find(|s| s.name == "left").unwrap();
        assert_eq!(left.config["factor"], 5.0);
        assert_eq!(e.runs[0].seed, 9);
        let e = compile_err(DIAMOND, &["left.factor"]);
        assert_eq!(e[0], "e.yaml (command line `--set left.factor`): expected KEY=VALUE");
        let e = compile_err(DIAMOND, &["left.factor=abc"]);
        assert!(
            e[0].starts_with("e.yaml (command line `--set left.factor=abc`): stages.left.with.factor: invalid type"),
            "{e:?}"
        );
    }

    #[test]
    fn set_keys_and_force_names_must_exist() {
        for (set, want) in [
            ("lefft.factor=7", "`lefft.factor` names no stage or settable top-level key; did you mean `left`?"),
            ("sed=7", "`sed` names no stage or settable top-level key; did you mean `seed`?"),
            ("name=other", "`name` names no stage"),
            ("repeat=3", "`repeat` names no stage"),
        ] {
            let e = compile_err(DIAMOND, &[set]);
            assert!(
                e[0].starts_with(&format!("e.yaml (command line `--set {set}`): --set key {want}")),
                "{set}: {e:?}"
            );
        }
        let o = Overrides { force: vec!["lfet".into()], ..Default::default() };
        let e = compile_str(DIAMOND, "e.yaml", &o, &registry(), &|_| None).unwrap_err().to_string();
        assert!(
            e.contains("(command line `--force lfet`): no stage `lfet` in this experiment; did you mean `left`?"),
            "{e}"
        );
    }

    #[test]
    fn integers_are_range_checked() {
        let e = compile_err(&format!("{DIAMOND}repeat: 4294967296\n"), &[]);
        assert!(e[0].contains("repeat: expected an integer from 1 to 10000, found 4294967296"), "{e:?}");
        assert_eq!(
            compile_ok(&DIAMOND.replace("seed: 3", "seed: 9223372036854775807"), &[]).runs[0].seed,
            i64::MAX as u64
        );
        let e = compile_err(&format!("{}repeat: 2\n", DIAMOND.replace("seed: 3", "seed: 9223372036854775807")), &[]);
        assert!(e[0].contains("seed 9223372036854775807 with repeat 2 gives seeds above"), "{e:?}");
        let o = Overrides { repeat: Some(0), ..Default::default() };
        let e = compile_str(DIAMOND, "e.yaml", &o, &registry(), &|_| None).unwrap_err().to_string();
        assert!(e.contains("(command line `--repeat 0`): repeat: expected 1 to 10000"), "{e}");
    }

    #[test]
    fn the_name_is_interpolated() {
        let text = DIAMOND.replace("name: d", "name: \"d-${UNSET_HERE:-x}\"");
        assert_eq!(compile_ok(&text, &[]).name, "d-x");
    }

    #[test]
    fn interpolation_fills_strings_and_reports_unset_variables() {
        let text = "name: i\nstages:\n  s: { uses: toy-source }\n  t: { uses: toy-scale, needs: [s], with: { fail: \"${HOME_OF_DATA}/x\" } }\n";
        let e = compile_ok(text, &[]);
        assert_eq!(e.runs[0].stages[1].config["fail"], "/data/x");
        let e = compile_err(text, &[]);
        assert!(e[0].starts_with("e.yaml:4:51: stages.t.with.fail:") && e[0].contains("HOME_OF_DATA"), "{e:?}");
    }
}
