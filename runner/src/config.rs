//! Experiment files: parse, override, expand sweeps, validate — before anything runs.
//!
//! The raw YAML tree ([`crate::yaml::Node`]) is compiled into one [`RunSpec`] per sweep
//! point and seed. Every problem found on the way is collected as a [`Diagnostic`]
//! naming file, line, column and key path; nothing runs unless the list is empty.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};

use huse_stage_api::DeviceSpec;

use crate::registry::Registry;
use crate::yaml::{Key, Node, Origin, Value};

/// A positioned problem in an experiment.
#[derive(Debug, Clone, PartialEq)]
pub struct Diagnostic {
    pub file: String,
    pub origin: Origin,
    /// Dotted key path, e.g. `stages.train.with.alpha`.
    pub path: String,
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
    /// `--repeat N`.
    pub repeat: Option<u32>,
}

/// One stage of one run, resolved.
#[derive(Debug, Clone)]
pub struct StageSpec {
    pub name: String,
    pub kind: String,
    pub needs: Vec<String>,
    /// The `with:` mapping as JSON (null when absent).
    pub config: serde_json::Value,
}

/// One run: a sweep point with one seed.
#[derive(Debug, Clone)]
pub struct RunSpec {
    pub name: String,
    /// Sweep assignments of this run, e.g. `train.beta=0.5,train.gamma=1` (empty without a sweep).
    pub point: String,
    pub seed: u64,
    pub device: DeviceSpec,
    /// Stages in a topological order.
    pub stages: Vec<StageSpec>,
    /// Every leaf config key, flattened (`seed`, `device`, `train.alpha`, `train.uses`, ...).
    pub params: Vec<(String, serde_json::Value)>,
    /// The resolved config as YAML.
    pub resolved_yaml: String,
}

/// A compiled experiment.
#[derive(Debug, Clone)]
pub struct Experiment {
    pub file: PathBuf,
    pub name: String,
    pub runs: Vec<RunSpec>,
}

const TOP_KEYS: &[&str] = &["name", "description", "seed", "device", "repeat", "stages", "sweep", "plugins"];
const STAGE_KEYS: &[&str] = &["uses", "needs", "with"];

struct Ctx<'a> {
    file: String,
    diags: Vec<Diagnostic>,
    registry: &'a Registry,
}

impl Ctx<'_> {
    fn err(&mut self, origin: &Origin, path: &str, message: impl Into<String>) {
        let d = Diagnostic { file: self.file.clone(), origin: origin.clone(), path: path.to_string(), message: message.into() };
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

/// Loads the plugins an experiment lists (`plugins:`, relative to the file) and those given
/// on the command line into `registry`. Errors point at the list entry or the argument.
pub fn load_plugins(file: &Path, cli: &[PathBuf], registry: &mut Registry) -> Result<(), Diagnostics> {
    let display = file.display().to_string();
    let mut diags = Vec::new();
    if let Ok(text) = std::fs::read_to_string(file)
        && let Ok(root) = Node::parse(&text)
        && let Some(Node { value: Value::Seq(items), .. }) = root.get("plugins")
    {
        let base = file.parent().unwrap_or(Path::new("."));
        for (i, it) in items.iter().enumerate() {
            if let Value::Str(p) = &it.value {
                let mut errs = Vec::new();
                let mut node = it.clone();
                node.interpolate(&|k| std::env::var(k).ok(), &mut Vec::new(), &mut errs);
                let p = if errs.is_empty() { node.to_string() } else { p.clone() };
                if let Err(e) = registry.load_plugin(&base.join(&p)) {
                    diags.push(Diagnostic { file: display.clone(), origin: it.origin.clone(), path: format!("plugins.{i}"), message: e });
                }
            }
        }
    }
    for p in cli {
        if let Err(e) = registry.load_plugin(p) {
            diags.push(Diagnostic { file: display.clone(), origin: Origin::Arg(format!("--plugin {}", p.display())), path: String::new(), message: e });
        }
    }
    if diags.is_empty() { Ok(()) } else { Err(Diagnostics(diags)) }
}

/// Reads, overrides, expands and validates an experiment file.
pub fn compile(file: &Path, overrides: &Overrides, registry: &Registry) -> Result<Experiment, Diagnostics> {
    let display = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|e| {
        Diagnostics(vec![Diagnostic {
            file: display.clone(),
            origin: Origin::Default,
            path: String::new(),
            message: format!("cannot read experiment file: {e}"),
        }])
    })?;
    compile_str(&text, &display, file, overrides, registry, &|k| std::env::var(k).ok())
}

/// [`compile`] on text already read; `env` looks up `${VAR}`s.
pub fn compile_str(
    text: &str,
    display: &str,
    file: &Path,
    overrides: &Overrides,
    registry: &Registry,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<Experiment, Diagnostics> {
    let mut cx = Ctx { file: display.to_string(), diags: Vec::new(), registry };
    let root = match Node::parse(text) {
        Ok(n) => n,
        Err(e) => {
            cx.err(&Origin::File { line: e.line, column: e.column }, "", format!("invalid YAML: {}", e.message));
            return Err(Diagnostics(cx.diags));
        }
    };
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
    if let Some(pl) = root.get("plugins") {
        match &pl.value {
            Value::Seq(items) => {
                for (i, it) in items.iter().enumerate() {
                    if !matches!(it.value, Value::Str(_)) {
                        cx.err(&it.origin, &format!("plugins.{i}"), format!("expected the path of a plugin library, found {}", it.value.type_name()));
                    }
                }
            }
            _ => cx.err(&pl.origin, "plugins", "expected a list of plugin library paths"),
        }
    }
    let stage_names: BTreeSet<String> = root
        .get("stages")
        .and_then(Node::as_map)
        .map(|m| m.iter().map(|(k, _)| k.name.clone()).collect())
        .unwrap_or_default();

    // --set overrides: applied to every run, after the sweep point.
    let mut sets: Vec<(Vec<String>, Node)> = Vec::new();
    for s in &overrides.set {
        let arg = format!("--set {s}");
        let Some((k, v)) = s.split_once('=') else {
            cx.err(&Origin::Arg(arg), "", "expected KEY=VALUE");
            continue;
        };
        match Node::parse_arg(v, &arg) {
            Ok(n) => sets.push((override_path(k.trim(), &stage_names), n)),
            Err(e) => cx.err(&Origin::Arg(arg), k, format!("invalid value: {e}")),
        }
    }

    let points = sweep_points(&mut cx, &root, &stage_names);
    let repeat = match (overrides.repeat, root.get("repeat")) {
        (Some(r), _) => r.max(1),
        (None, None) => 1,
        (None, Some(n)) => match n.value {
            Value::Int(r) if r >= 1 => r as u32,
            _ => {
                cx.err(&n.origin, "repeat", format!("expected an integer >= 1, found {}", n));
                1
            }
        },
    };

    let mut runs = Vec::new();
    let name = match root.get("name") {
        Some(Node { value: Value::Str(s), .. }) if valid_name(s) => s.clone(),
        Some(n) => {
            cx.err(&n.origin, "name", format!("expected a name of letters, digits, `-`, `_` or `.`, found {n}"));
            String::new()
        }
        None => {
            cx.err(&root.origin, "name", "missing required key `name`");
            String::new()
        }
    };
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
        let Some((base_seed, device, stages)) = compile_tree(&mut cx, &tree) else { continue };
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
                params: params_of(&run_tree),
                resolved_yaml: resolved_yaml(&run_tree),
            });
        }
    }
    if !cx.diags.is_empty() {
        return Err(Diagnostics(cx.diags));
    }
    Ok(Experiment { file: file.to_path_buf(), name, runs })
}

fn valid_name(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
}

/// The sweep's points as (label, assignments). Without a sweep: one empty point.
fn sweep_points(cx: &mut Ctx, root: &Node, stage_names: &BTreeSet<String>) -> Vec<(String, Vec<(Vec<String>, Node)>)> {
    let Some(sweep) = root.get("sweep") else { return vec![(String::new(), Vec::new())] };
    let Some(map) = sweep.as_map() else {
        cx.err(&sweep.origin, "sweep", format!("expected a mapping, found {}", sweep.value.type_name()));
        return Vec::new();
    };
    let explicit = map.iter().any(|(k, _)| k.name == "grid" || k.name == "points");
    let mut grid: Vec<(Key, Vec<Node>)> = Vec::new();
    let mut points: Vec<Vec<(Key, Node)>> = Vec::new();
    let grid_entries = |cx: &mut Ctx, m: &[(Key, Node)], prefix: &str| {
        let mut out = Vec::new();
        for (k, v) in m {
            match &v.value {
                Value::Seq(items) if !items.is_empty() => out.push((k.clone(), items.clone())),
                _ => cx.err(&v.origin, &format!("{prefix}{}", k.name), format!("expected a non-empty list of values, found {}", v.value.type_name())),
            }
        }
        out
    };
    if explicit {
        for (k, v) in map {
            match k.name.as_str() {
                "grid" => match v.as_map() {
                    Some(m) => grid = grid_entries(cx, m, "sweep.grid."),
                    None => cx.err(&v.origin, "sweep.grid", "expected a mapping of key: [values]"),
                },
                "points" => match &v.value {
                    Value::Seq(items) => {
                        for (i, p) in items.iter().enumerate() {
                            match p.as_map() {
                                Some(m) => points.push(m.to_vec()),
                                None => cx.err(&p.origin, &format!("sweep.points.{i}"), "expected a mapping of key: value"),
                            }
                        }
                    }
                    _ => cx.err(&v.origin, "sweep.points", "expected a list of mappings"),
                },
                other => cx.err(&k.origin, &format!("sweep.{other}"), format!("unknown key `{other}`{} (a sweep with `grid:` or `points:` takes only those two)", did_you_mean(other, ["grid", "points"]))),
            }
        }
    } else {
        grid = grid_entries(cx, map, "sweep.");
    }
    // Check the keys address something in the experiment.
    let check = |cx: &mut Ctx, k: &Key, prefix: &str| {
        let path = override_path(&k.name, stage_names);
        let ok = match path.first().map(String::as_str) {
            Some("stages") => stage_names.contains(&path[1]),
            Some(first) => TOP_KEYS.contains(&first) && !["stages", "sweep", "name", "repeat", "plugins"].contains(&first),
            None => false,
        };
        if !ok {
            let hint = did_you_mean(k.name.split('.').next().unwrap_or(""), stage_names.iter().map(String::as_str));
            cx.err(&k.origin, &format!("{prefix}{}", k.name), format!("sweep key `{}` names no stage or top-level setting{hint}", k.name));
        }
        path
    };
    let prefix = if explicit { "sweep.grid." } else { "sweep." };
    let grid: Vec<(Key, Vec<String>, Vec<Node>)> =
        grid.into_iter().map(|(k, v)| (k.clone(), check(cx, &k, prefix), v)).collect();
    let mut combos: Vec<Vec<(String, Vec<String>, Node)>> = vec![Vec::new()];
    for (k, path, values) in &grid {
        combos = combos
            .into_iter()
            .flat_map(|c| {
                values.iter().map(move |v| {
                    let mut c = c.clone();
                    c.push((k.name.clone(), path.clone(), v.clone()));
                    c
                })
            })
            .collect();
    }
    let mut pts: Vec<Vec<(String, Vec<String>, Node)>> = Vec::new();
    if points.is_empty() {
        pts = combos;
    } else {
        for p in &points {
            let entries: Vec<_> = p.iter().map(|(k, v)| (k.name.clone(), check(cx, k, "sweep.points."), v.clone())).collect();
            for c in &combos {
                let mut e = entries.clone();
                e.extend(c.iter().cloned());
                pts.push(e);
            }
        }
    }
    pts.into_iter()
        .map(|p| {
            let label = p.iter().map(|(k, _, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
            (label, p.into_iter().map(|(_, path, v)| (path, v)).collect())
        })
        .collect()
}

/// Validates one resolved tree; returns (seed, device, stages in topological order).
fn compile_tree(cx: &mut Ctx, tree: &Node) -> Option<(u64, DeviceSpec, Vec<StageSpec>)> {
    let before = cx.diags.len();
    let seed = match tree.get("seed") {
        None => 0,
        Some(Node { value: Value::Int(i), .. }) if *i >= 0 => *i as u64,
        Some(n) => {
            cx.err(&n.origin, "seed", format!("expected a non-negative integer, found {}", n.value.type_name()));
            0
        }
    };
    let device = match tree.get("device") {
        None => DeviceSpec::Auto,
        Some(n) => match n.to_string().parse::<DeviceSpec>() {
            Ok(d) => d,
            Err(e) => {
                cx.err(&n.origin, "device", e);
                DeviceSpec::Auto
            }
        },
    };
    if let Some(d) = tree.get("description")
        && !matches!(d.value, Value::Str(_))
    {
        cx.err(&d.origin, "description", "expected a string");
    }
    let Some(stages_node) = tree.get("stages") else {
        cx.err(&tree.origin, "stages", "missing required key `stages`");
        return None;
    };
    let Some(stage_map) = stages_node.as_map().filter(|m| !m.is_empty()) else {
        cx.err(&stages_node.origin, "stages", "expected a non-empty mapping of stage name -> { uses, needs, with }");
        return None;
    };
    let names: Vec<&str> = stage_map.iter().map(|(k, _)| k.name.as_str()).collect();
    let mut specs: Vec<StageSpec> = Vec::new();
    let mut needs_origin: BTreeMap<String, Vec<Origin>> = BTreeMap::new();
    for (k, body) in stage_map {
        let sp = format!("stages.{}", k.name);
        if !valid_name(&k.name) {
            cx.err(&k.origin, &sp, "stage names may use letters, digits, `-`, `_` and `.` only");
        }
        let Some(m) = body.as_map() else {
            cx.err(&body.origin, &sp, format!("expected a mapping with `uses`, found {}", body.value.type_name()));
            continue;
        };
        for (sk, _) in m {
            if !STAGE_KEYS.contains(&sk.name.as_str()) {
                let hint = did_you_mean(&sk.name, STAGE_KEYS.iter().copied());
                cx.err(&sk.origin, &format!("{sp}.{}", sk.name), format!("unknown key `{}`{hint} (a stage takes uses, needs, with)", sk.name));
            }
        }
        let kind = match body.get("uses") {
            Some(Node { value: Value::Str(s), origin }) => {
                if cx.registry.get(s).is_none() {
                    let hint = did_you_mean(s, cx.registry.kinds());
                    let known = cx.registry.kinds().collect::<Vec<_>>().join(", ");
                    cx.err(origin, &format!("{sp}.uses"), format!("unknown stage kind `{s}`{hint} (known kinds: {known})"));
                }
                s.clone()
            }
            Some(n) => {
                cx.err(&n.origin, &format!("{sp}.uses"), format!("expected a stage kind name, found {}", n.value.type_name()));
                continue;
            }
            None => {
                cx.err(&k.origin, &sp, "missing required key `uses`");
                continue;
            }
        };
        let mut needs = Vec::new();
        let mut origins = Vec::new();
        match body.get("needs") {
            None => {}
            Some(n) => {
                let items: Vec<&Node> = match &n.value {
                    Value::Seq(v) => v.iter().collect(),
                    Value::Str(_) => vec![n],
                    _ => {
                        cx.err(&n.origin, &format!("{sp}.needs"), format!("expected a list of stage names, found {}", n.value.type_name()));
                        vec![]
                    }
                };
                for (i, item) in items.into_iter().enumerate() {
                    let path = format!("{sp}.needs.{i}");
                    match &item.value {
                        Value::Str(s) if s == &k.name => cx.err(&item.origin, &path, format!("stage `{s}` cannot need itself")),
                        Value::Str(s) if names.contains(&s.as_str()) => {
                            needs.push(s.clone());
                            origins.push(item.origin.clone());
                        }
                        Value::Str(s) => {
                            let hint = did_you_mean(s, names.iter().copied());
                            cx.err(&item.origin, &path, format!("unknown stage `{s}` in needs{hint} (stages: {})", names.join(", ")));
                        }
                        _ => cx.err(&item.origin, &path, format!("expected a stage name, found {}", item.value.type_name())),
                    }
                }
            }
        }
        let with = body.get("with");
        if let Some(w) = with
            && !matches!(w.value, Value::Map(_) | Value::Null)
        {
            cx.err(&w.origin, &format!("{sp}.with"), format!("expected a mapping, found {}", w.value.type_name()));
            continue;
        }
        needs_origin.insert(k.name.clone(), origins);
        specs.push(StageSpec { name: k.name.clone(), kind, needs, config: with.map(Node::to_json).unwrap_or(serde_json::Value::Null) });
    }
    if cx.diags.len() > before {
        return None;
    }
    let order = match topo_order(&specs) {
        Ok(o) => o,
        Err(cycle) => {
            let first = &cycle[0];
            let origin = stage_map.iter().find(|(k, _)| &k.name == first).map(|(k, _)| k.origin.clone()).unwrap_or(Origin::Default);
            cx.err(&origin, &format!("stages.{first}.needs"), format!("dependency cycle: {}", cycle.join(" -> ")));
            return None;
        }
    };
    // Artifact wiring and each stage's own validation.
    for spec in &specs {
        let sp = format!("stages.{}", spec.name);
        let entry = cx.registry.get(&spec.kind).expect("checked above").clone();
        let key_origin = stage_map.iter().find(|(k, _)| k.name == spec.name).map(|(k, _)| k.origin.clone()).unwrap();
        for input in entry.stage.inputs() {
            let providers: Vec<&str> = spec
                .needs
                .iter()
                .filter(|n| {
                    let kind = &specs.iter().find(|s| &s.name == *n).unwrap().kind;
                    cx.registry.get(kind).is_some_and(|e| e.stage.outputs().iter().any(|o| o.name == input.name))
                })
                .map(String::as_str)
                .collect();
            if providers.is_empty() && input.required {
                let givers: Vec<&str> = cx
                    .registry
                    .entries()
                    .filter(|(_, e)| e.stage.outputs().iter().any(|o| o.name == input.name))
                    .map(|(k, _)| k)
                    .collect();
                cx.err(
                    &key_origin,
                    &format!("{sp}.needs"),
                    format!(
                        "stage `{}` ({}) takes artifact `{}`, but none of its needs [{}] gives it (kinds that give it: {})",
                        spec.name,
                        spec.kind,
                        input.name,
                        spec.needs.join(", "),
                        if givers.is_empty() { "none".to_string() } else { givers.join(", ") }
                    ),
                );
            } else if providers.len() > 1 && !input.many {
                cx.err(
                    &key_origin,
                    &format!("{sp}.needs"),
                    format!("stage `{}` takes one `{}`, but several of its needs give it: {}", spec.name, input.name, providers.join(", ")),
                );
            }
        }
        if let Err(e) = entry.stage.validate(&spec.config) {
            let mut path = vec!["stages".to_string(), spec.name.clone(), "with".to_string()];
            path.extend(e.path.iter().cloned());
            let mut message = e.message.clone();
            let mut unknown_key = false;
            // serde reports an unknown field at its parent: point at the field itself.
            if let Some(field) = message.strip_prefix("unknown field `").and_then(|r| r.split('`').next()).map(String::from) {
                let expected: Vec<String> = message
                    .split("expected ")
                    .nth(1)
                    .map(|r| r.split(['`', ',']).map(str::trim).filter(|s| !s.is_empty() && *s != "one of" && *s != "or").map(String::from).collect())
                    .unwrap_or_default();
                message = format!("{message}{}", did_you_mean(&field, expected.iter().map(String::as_str)));
                if path.last() != Some(&field) {
                    path.push(field);
                }
                unknown_key = true;
            }
            let origin = if unknown_key { tree.key_origin_of(&path) } else { tree.origin_of(&path) };
            cx.err(&origin, &path.join("."), message);
        }
    }
    if cx.diags.len() > before {
        return None;
    }
    let by_name: BTreeMap<&str, &StageSpec> = specs.iter().map(|s| (s.name.as_str(), s)).collect();
    let ordered = order.iter().map(|n| by_name[n.as_str()].clone()).collect();
    Some((seed, device, ordered))
}

/// Kahn's algorithm in file order; on a cycle returns its members `[a, b, a]`.
fn topo_order(specs: &[StageSpec]) -> Result<Vec<String>, Vec<String>> {
    let mut done: Vec<String> = Vec::new();
    let mut left: Vec<&StageSpec> = specs.iter().collect();
    while !left.is_empty() {
        let pos = left.iter().position(|s| s.needs.iter().all(|n| done.contains(n)));
        match pos {
            Some(i) => done.push(left.remove(i).name.clone()),
            None => {
                // Every remaining stage waits on another remaining one: walk until a repeat.
                let mut path = vec![left[0].name.clone()];
                loop {
                    let cur = specs.iter().find(|s| s.name == *path.last().unwrap()).unwrap();
                    let next = cur.needs.iter().find(|n| !done.contains(n)).unwrap().clone();
                    if let Some(start) = path.iter().position(|p| *p == next) {
                        let mut cycle = path[start..].to_vec();
                        cycle.push(next);
                        return Err(cycle);
                    }
                    path.push(next);
                }
            }
        }
    }
    Ok(done)
}

fn params_of(tree: &Node) -> Vec<(String, serde_json::Value)> {
    let mut out = Vec::new();
    for key in ["seed", "device"] {
        if let Some(n) = tree.get(key) {
            out.push((key.to_string(), n.to_json()));
        }
    }
    if tree.get("device").is_none() {
        out.push(("device".into(), serde_json::json!("auto")));
    }
    if let Some(stages) = tree.get("stages").and_then(Node::as_map) {
        for (k, body) in stages {
            if let Some(u) = body.get("uses") {
                out.push((format!("{}.uses", k.name), u.to_json()));
            }
            if let Some(w) = body.get("with") {
                let mut leaves = Vec::new();
                w.flatten(&k.name, &mut leaves);
                out.extend(leaves.into_iter().filter(|(p, v)| p != &k.name || !v.is_null()));
            }
        }
    }
    out
}

fn resolved_yaml(tree: &Node) -> String {
    let mut t = tree.clone();
    if let Value::Map(m) = &mut t.value {
        m.retain(|(k, _)| k.name != "sweep" && k.name != "repeat");
    }
    serde_saphyr::to_string(&ordered_json(&t)).unwrap_or_else(|_| t.to_json().to_string())
}

/// JSON that keeps the file's key order (for a readable resolved config).
fn ordered_json(n: &Node) -> OrderedJson<'_> {
    OrderedJson(n)
}

struct OrderedJson<'a>(&'a Node);

impl serde::Serialize for OrderedJson<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::{SerializeMap, SerializeSeq};
        match &self.0.value {
            Value::Map(m) => {
                let mut map = s.serialize_map(Some(m.len()))?;
                for (k, v) in m {
                    map.serialize_entry(&k.name, &OrderedJson(v))?;
                }
                map.end()
            }
            Value::Seq(v) => {
                let mut seq = s.serialize_seq(Some(v.len()))?;
                for x in v {
                    seq.serialize_element(&OrderedJson(x))?;
                }
                seq.end()
            }
            _ => self.0.to_json().serialize(s),
        }
    }
}
