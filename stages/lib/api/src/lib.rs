//! `huse-stage-api`: the one small contract between `huse-run` and every stage.
//!
//! A stage is a unit of work in an experiment's DAG (ingest, graph, encode, train,
//! evaluate, or anything a researcher adds). It implements [`Stage`]:
//!
//! * it declares its `kind` (the name YAML `uses:` refers to) and a `version`
//!   (bump it whenever the stage's output for the same config changes: it is part
//!   of the cache key);
//! * it declares the artifacts it takes ([`Input`]) and gives ([`Output`]), by
//!   name; the runner wires a stage's inputs to the outputs of the stages it `needs`.
//!   An output declared with [`Output::summary`] is a text summary (e.g. a Markdown
//!   table) that the runner also stores with the run and prints after it;
//! * it validates its own config ([`Stage::validate`]) before anything runs, and
//!   reports errors with a key path ([`ConfigError`]) that the runner turns into a
//!   file:line:column message;
//! * it runs with a [`Context`]: device, seed, output directory, progress
//!   reporter, metric logger and cancellation signal.
//!
//! A stage never sees SQL, the cache layout, or other runs: it reads input paths,
//! writes files into `ctx.out_dir`, and logs metrics through `ctx.metrics`.
//!
//! ```
//! use huse_stage_api::*;
//!
//! #[derive(serde::Deserialize)]
//! #[serde(deny_unknown_fields)]
//! struct Cfg { n: u32 }
//!
//! struct Count;
//! impl Stage for Count {
//!     fn kind(&self) -> &str { "count" }
//!     fn version(&self) -> &str { "1" }
//!     fn outputs(&self) -> Vec<Output> { vec![Output::new("count", "a JSON number")] }
//!     fn validate(&self, config: &Config) -> Result<(), ConfigError> {
//!         parse_config::<Cfg>(config).map(|_| ())
//!     }
//!     fn run(&self, ctx: &Context, config: &Config, _inputs: &Inputs) -> Result<(), StageError> {
//!         let cfg: Cfg = parse_config(config)?;
//!         std::fs::write(ctx.out_dir.join("count"), cfg.n.to_string())?;
//!         ctx.metrics.log("count", 0, cfg.n as f64);
//!         Ok(())
//!     }
//! }
//! ```
#![deny(missing_docs)]

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde::de::DeserializeOwned;

/// Version of this API. Dynamic plugins report the version they were built against.
pub const API_VERSION: u32 = 1;

/// A stage's resolved configuration: the YAML `with:` mapping, as JSON.
pub type Config = serde_json::Value;

/// One unit of work in an experiment DAG.
pub trait Stage: Send + Sync {
    /// The name YAML `uses:` refers to, e.g. `ingest`.
    fn kind(&self) -> &str;
    /// Version of the stage's behaviour; part of the cache key.
    fn version(&self) -> &str;
    /// One line saying what the stage does (shown by `huse-run list`).
    fn describe(&self) -> &str {
        ""
    }
    /// Artifacts this stage takes from the stages it `needs`.
    fn inputs(&self) -> Vec<Input> {
        Vec::new()
    }
    /// Artifacts this stage writes into `ctx.out_dir`.
    fn outputs(&self) -> Vec<Output>;
    /// Whether the run's seed changes this stage's output (then it is in the cache key).
    fn uses_seed(&self) -> bool {
        false
    }
    /// The artifacts this stage takes with `config`: [`Stage::inputs`], unless the config
    /// names them (a command stage's `inputs:`). The runner wires and checks these.
    fn inputs_for(&self, _config: &Config) -> Vec<Input> {
        self.inputs()
    }
    /// The artifacts this stage gives with `config`: [`Stage::outputs`], unless the config
    /// names them (a command stage's `outputs:`).
    fn outputs_for(&self, _config: &Config) -> Vec<Output> {
        self.outputs()
    }
    /// Whether the run's seed enters the cache key with `config`: [`Stage::uses_seed`],
    /// unless the config says (a command stage's `seeded:`).
    fn uses_seed_for(&self, _config: &Config) -> bool {
        self.uses_seed()
    }
    /// A short stage (seconds, whatever the data): the scheduler gives it one thread and
    /// leaves it out when it shares the cores among the stages ready to run.
    fn light(&self) -> bool {
        false
    }
    /// Whether the stage computes on `ctx.device` (encoders, towers, similarity blocks). When
    /// that device is a GPU, the scheduler has the stage hold one of the GPU's slots
    /// (`--gpu-slots`) while it runs; stages that only read and write files hold none.
    fn uses_device(&self) -> bool {
        false
    }
    /// The metrics (keys, or globs such as `*.acc.both`) a reader looks at first: what
    /// `huse-run runs` shows by default, so that the runner shows a short table without
    /// knowing any stage's metric names. Empty: none.
    fn headline(&self) -> Vec<String> {
        Vec::new()
    }
    /// The keys of its `with:` block as a JSON Schema — each key's type, default and `///`
    /// doc (`schemars::schema_for!(Cfg)`) — for `huse-run list --config KIND`. None: the
    /// stage does not describe them.
    fn config_schema(&self) -> Option<serde_json::Value> {
        None
    }
    /// Checks the config without running anything. Called for every run before any stage starts.
    fn validate(&self, config: &Config) -> Result<(), ConfigError>;
    /// Files and directories outside the cache that the stage reads for this config.
    /// Their identity (content hash for files, listing for directories) enters the cache key.
    fn reads(&self, _config: &Config) -> Vec<PathBuf> {
        Vec::new()
    }
    /// Does the work: reads `inputs`, writes every declared output into `ctx.out_dir`.
    fn run(&self, ctx: &Context, config: &Config, inputs: &Inputs) -> Result<(), StageError>;
}

/// An artifact a stage takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Input {
    /// Artifact name, matched against the outputs of the stages in `needs`.
    pub name: String,
    /// A missing optional input is not an error.
    pub required: bool,
    /// Whether several upstream stages may provide it (then use [`Inputs::all`]).
    pub many: bool,
}

impl Input {
    /// A required artifact that exactly one upstream stage provides.
    pub fn one(name: impl AsRef<str>) -> Self {
        Input { name: name.as_ref().into(), required: true, many: false }
    }
    /// An optional artifact, provided by at most one upstream stage.
    pub fn optional(name: impl AsRef<str>) -> Self {
        Input { name: name.as_ref().into(), required: false, many: false }
    }
    /// A required artifact that one or more upstream stages provide.
    pub fn many(name: impl AsRef<str>) -> Self {
        Input { name: name.as_ref().into(), required: true, many: true }
    }
}

/// An artifact a stage gives: a file or directory of that name inside its output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Output {
    /// File or directory name inside the stage's output directory.
    pub name: String,
    /// What it holds (documentation only).
    pub about: String,
    /// A UTF-8 text summary of the run (e.g. Markdown tables): the runner stores its text
    /// with every run that uses the output, and prints it when the run ends.
    pub summary: bool,
    /// A UTF-8 text (e.g. JSON) the runner stores with every run that uses the output, for
    /// reports made from the database alone; not printed.
    pub attachment: bool,
}

impl Output {
    /// Declares an output artifact.
    pub fn new(name: impl AsRef<str>, about: &str) -> Self {
        Output { name: name.as_ref().into(), about: about.into(), summary: false, attachment: false }
    }
    /// Declares an attachment output (see [`Output::attachment`](Output#structfield.attachment)).
    pub fn attachment(name: impl AsRef<str>, about: &str) -> Self {
        Output { attachment: true, ..Output::new(name, about) }
    }
    /// Declares a text summary output (see [`Output::summary`](Output#structfield.summary)).
    pub fn summary(name: impl AsRef<str>, about: &str) -> Self {
        Output { summary: true, ..Output::new(name, about) }
    }
}

/// The input artifacts of one stage run: artifact name -> (upstream stage name, path).
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    map: BTreeMap<String, Vec<(String, PathBuf)>>,
}

impl Inputs {
    /// Adds the artifact `name` produced by upstream stage `stage` at `path`.
    pub fn insert(&mut self, name: &str, stage: &str, path: PathBuf) {
        self.map.entry(name.to_string()).or_default().push((stage.to_string(), path));
    }
    /// The path of the single artifact called `name`.
    pub fn get(&self, name: impl AsRef<str>) -> Result<&Path, StageError> {
        let name = name.as_ref();
        match self.map.get(name).map(Vec::as_slice) {
            Some([(_, p)]) => Ok(p),
            Some([]) | None => Err(StageError::msg(format!("input artifact `{name}` was not provided"))),
            Some(many) => Err(StageError::msg(format!(
                "input artifact `{name}` is provided by {} stages ({}); expected one",
                many.len(),
                many.iter().map(|(s, _)| s.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        }
    }
    /// The path of `name` if some upstream stage provides it.
    pub fn optional(&self, name: impl AsRef<str>) -> Option<&Path> {
        self.map.get(name.as_ref()).and_then(|v| v.first()).map(|(_, p)| p.as_path())
    }
    /// Every provider of `name`, as (stage name, path), in `needs` order.
    pub fn all(&self, name: impl AsRef<str>) -> &[(String, PathBuf)] {
        self.map.get(name.as_ref()).map(Vec::as_slice).unwrap_or(&[])
    }
    /// Iterates over (artifact, stage, path).
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str, &Path)> {
        self.map.iter().flat_map(|(n, v)| v.iter().map(move |(s, p)| (n.as_str(), s.as_str(), p.as_path())))
    }
}

/// Where compute should run, as the experiment says (`auto`, `cpu`, `cuda:N`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    /// A GPU when the build and machine have one, else the CPU.
    Auto,
    /// The CPU.
    Cpu,
    /// CUDA device N.
    Cuda(usize),
}

impl std::str::FromStr for DeviceSpec {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceSpec::Auto),
            "cpu" => Ok(DeviceSpec::Cpu),
            "cuda" => Ok(DeviceSpec::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSpec::Cuda)
                .ok_or_else(|| format!("unknown device `{s}`; expected auto, cpu or cuda:N")),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeviceSpec::Auto => f.write_str("auto"),
            DeviceSpec::Cpu => f.write_str("cpu"),
            DeviceSpec::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Progress of a long stage; the runner draws it as a bar (or plain lines off a terminal).
pub trait Progress: Send + Sync {
    /// Starts a phase of `total` units (None: unknown length), e.g. `("encode images", Some(44072), "img")`.
    fn start(&self, phase: &str, total: Option<u64>, unit: &str);
    /// Advances the current phase by `n` units.
    fn inc(&self, n: u64);
    /// Replaces the bar's message (e.g. the current loss).
    fn message(&self, msg: &str);
}

/// Records metrics of a stage run; the runner stores them (stage, key, step, value).
pub trait MetricLogger: Send + Sync {
    /// Logs `value` of metric `key` at `step` (use 0 for single-valued metrics).
    fn log(&self, key: &str, step: i64, value: f64);
    /// Says that `step` (an epoch) has ended and its metrics are logged. The runner answers
    /// whether to go on: a study's pruner (`pruner: asha`) may judge from this step's values
    /// that the trial is not worth finishing. A stage that trains in epochs calls it after
    /// each epoch's checkpoint and, on [`Decision::Stop`], returns [`StageError::Pruned`];
    /// a stage that never calls it is never pruned. Outside a pruned study: always continue.
    fn report(&self, step: i64) -> Decision {
        let _ = step;
        Decision::Continue
    }
}

/// The runner's answer to [`MetricLogger::report`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Go on.
    Continue,
    /// Stop here: the trial is pruned.
    Stop,
}

/// A cancellation signal, set when the user presses Ctrl-C or the run fails elsewhere.
#[derive(Debug, Clone, Default)]
pub struct CancelToken(Arc<AtomicBool>);

impl CancelToken {
    /// A fresh, unset token.
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks every holder to stop.
    pub fn cancel(&self) {
        self.0.store(true, Ordering::SeqCst)
    }
    /// Whether cancellation was asked for.
    pub fn is_cancelled(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
    /// `Err(StageError::Cancelled)` once cancelled: call it between batches with `?`.
    pub fn check(&self) -> Result<(), StageError> {
        if self.is_cancelled() { Err(StageError::Cancelled) } else { Ok(()) }
    }
}

/// What a running stage gets from the runner.
pub struct Context<'a> {
    /// Name of the stage in the experiment (the key under `stages:`).
    pub name: &'a str,
    /// Where to compute.
    pub device: DeviceSpec,
    /// The run's seed.
    pub seed: u64,
    /// Fresh, empty directory for the outputs; moved into the cache atomically on success.
    pub out_dir: &'a Path,
    /// Directory for checkpoints that must survive an interruption: the same for every
    /// attempt at the same cache key, removed once the stage succeeds. A stage that can
    /// resume reads its last checkpoint from here.
    pub work_dir: &'a Path,
    /// Progress reporter.
    pub progress: &'a dyn Progress,
    /// Metric logger.
    pub metrics: &'a dyn MetricLogger,
    /// Cancellation signal: check it often and return [`StageError::Cancelled`].
    pub cancel: &'a CancelToken,
    /// The stage's thread budget. `run` is called inside a rayon pool of this many threads
    /// (so `par_iter`, candle's CPU ops and GEMMs use at most these); a stage that starts
    /// threads or pools of its own splits this number among them.
    pub threads: usize,
}

/// Runs `f` inside a new rayon pool of `threads` threads (at least 1): what the runner does
/// around every stage's `run`, so the stage's parallel work stays within its budget.
pub fn with_threads<R: Send>(threads: usize, f: impl FnOnce() -> R + Send) -> Result<R, StageError> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads.max(1))
        .thread_name(|i| format!("huse-stage-{i}"))
        .build()
        .map_err(|e| StageError::msg(format!("starting a pool of {threads} threads: {e}")))?;
    Ok(pool.install(f))
}

/// A config error at a key path inside the stage's `with:` mapping.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ConfigError {
    /// Path of keys (and list indices) from the `with:` mapping down to the bad value; empty for the mapping itself.
    pub path: Vec<String>,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error at `path` (keys separated by dots, e.g. `"columns.text"`; empty for the whole config).
    pub fn at(path: &str, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.split('.').filter(|s| !s.is_empty()).map(String::from).collect(),
            message: message.into(),
        }
    }
}

/// Why a stage run did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    /// The config was rejected at run time.
    #[error("config error at `{}`: {}", .0.path.join("."), .0.message)]
    Config(#[from] ConfigError),
    /// The run was cancelled through the [`CancelToken`].
    #[error("cancelled")]
    Cancelled,
    /// A study's pruner stopped the stage after this step ([`MetricLogger::report`]); its
    /// checkpoints stay in the work directory, its outputs are not cached.
    #[error("pruned after step {0}")]
    Pruned(i64),
    /// An I/O error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// Any other failure, with its message.
    #[error("{0}")]
    Failed(String),
}

impl StageError {
    /// A failure with a message.
    pub fn msg(m: impl Into<String>) -> Self {
        StageError::Failed(m.into())
    }
    /// A failure from any error, with its whole chain of causes (`{:#}`): the one adapter
    /// from library errors (`anyhow`, candle, serde, ...) to stage errors, used as
    /// `.map_err(StageError::of)`.
    pub fn of(e: impl fmt::Display) -> Self {
        StageError::Failed(format!("{e:#}"))
    }
}

/// Deserializes a stage config into `T`, turning serde's error into a [`ConfigError`] with the key path.
///
/// A missing `with:` (JSON null) deserializes as an empty mapping, so configs whose fields all
/// have defaults need no `with:` at all.
pub fn parse_config<T: DeserializeOwned>(config: &Config) -> Result<T, ConfigError> {
    let empty = serde_json::Value::Object(Default::default());
    let value = if config.is_null() { &empty } else { config };
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e
            .path()
            .iter()
            .filter_map(|seg| match seg {
                serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                serde_path_to_error::Segment::Enum { variant } => Some(variant.clone()),
                serde_path_to_error::Segment::Unknown => None,
            })
            .collect();
        ConfigError { path, message: e.into_inner().to_string() }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Cfg {
        alpha: f64,
        #[serde(default)]
        inner: Inner,
    }
    #[derive(serde::Deserialize, Debug, Default)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        n: Option<u32>,
    }

    #[test]
    fn parse_config_reports_the_key_path() {
        let e = parse_config::<Cfg>(&serde_json::json!({"alpha": "x"})).unwrap_err();
        assert_eq!(e.path, vec!["alpha"]);
        assert!(e.message.contains("expected f64"), "{}", e.message);
        let e = parse_config::<Cfg>(&serde_json::json!({"alpha": 1.0, "inner": {"n": -1}})).unwrap_err();
        assert_eq!(e.path, vec!["inner", "n"]);
        let e = parse_config::<Cfg>(&serde_json::json!({"alpha": 1.0, "bogus": 1})).unwrap_err();
        assert!(e.message.contains("unknown field `bogus`"), "{}", e.message);
    }

    #[test]
    fn device_spec_parses_and_prints() {
        for s in ["auto", "cpu", "cuda:1"] {
            assert_eq!(s.parse::<DeviceSpec>().unwrap().to_string(), s);
        }
        assert!("gpu".parse::<DeviceSpec>().is_err());
    }

    #[test]
    fn stage_error_of_keeps_the_cause_chain() {
        let e = anyhow::anyhow!("root cause").context("reading x");
        assert_eq!(StageError::of(e).to_string(), "reading x: root cause");
        assert_eq!(StageError::of("plain").to_string(), "plain");
        assert!(Output::summary("t.md", "tables").summary && !Output::new("t.md", "tables").summary);
    }

    /// Writes scratch into its work directory, then fails when `fail` is set.
    struct Scratch;
    impl Stage for Scratch {
        fn kind(&self) -> &str {
            "scratch"
        }
        fn version(&self) -> &str {
            "1"
        }
        fn outputs(&self) -> Vec<Output> {
            vec![]
        }
        fn validate(&self, _config: &Config) -> Result<(), ConfigError> {
            Ok(())
        }
        fn run(&self, ctx: &Context, config: &Config, _inputs: &Inputs) -> Result<(), StageError> {
            std::fs::write(ctx.work_dir.join("partial"), b"x")?;
            if config["fail"].as_bool() == Some(true) {
                return Err(StageError::of("asked to fail"));
            }
            Ok(())
        }
    }

    #[test]
    fn the_testing_runner_leaves_no_work_directory_behind() {
        let root = std::env::temp_dir().join(format!("huse-api-scratch-{}", std::process::id()));
        for fail in [false, true] {
            let out = root.join(format!("out-{fail}"));
            let r = testing::run(&Scratch, &serde_json::json!({"fail": fail}), &Inputs::default(), &out, 0);
            assert_eq!(r.is_err(), fail);
            assert!(out.is_dir());
            assert!(!out.with_extension("work").exists(), "{} left behind", out.with_extension("work").display());
        }
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn inputs_get_rejects_ambiguity() {
        let mut i = Inputs::default();
        i.insert("x", "a", "/a".into());
        assert_eq!(i.get("x").unwrap(), Path::new("/a"));
        i.insert("x", "b", "/b".into());
        assert!(i.get("x").unwrap_err().to_string().contains("2 stages (a, b)"));
        assert_eq!(i.all("x").len(), 2);
        assert!(i.get("y").is_err());
    }
}

/// Helpers for testing a stage outside the runner.
pub mod testing {
    use super::*;
    use std::sync::Mutex;

    /// A progress reporter that shows nothing.
    pub struct NoProgress;
    impl Progress for NoProgress {
        fn start(&self, _: &str, _: Option<u64>, _: &str) {}
        fn inc(&self, _: u64) {}
        fn message(&self, _: &str) {}
    }

    /// A metric logger that keeps every value.
    #[derive(Default, Debug)]
    pub struct Recorded(pub Mutex<Vec<(String, i64, f64)>>);
    impl MetricLogger for Recorded {
        fn log(&self, key: &str, step: i64, value: f64) {
            self.0.lock().unwrap().push((key.to_string(), step, value));
        }
    }
    impl Recorded {
        /// The last value logged for `key`.
        pub fn last(&self, key: &str) -> Option<f64> {
            self.0.lock().unwrap().iter().rev().find(|(k, _, _)| k == key).map(|(_, _, v)| *v)
        }
    }

    /// Validates `config` and runs `stage` into `out_dir` (created if missing) on the CPU.
    pub fn run(
        stage: &dyn Stage,
        config: &Config,
        inputs: &Inputs,
        out_dir: &Path,
        seed: u64,
    ) -> Result<Recorded, StageError> {
        stage.validate(config)?;
        std::fs::create_dir_all(out_dir)?;
        let metrics = Recorded::default();
        let cancel = CancelToken::new();
        // Scratch beside `out_dir` (outputs only go in `out_dir`); removed however the stage
        // returns, as the runner removes its cache's work directories, so that tests writing
        // into temporary directories leave nothing behind.
        let work_dir = out_dir.with_extension("work");
        std::fs::create_dir_all(&work_dir)?;
        let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        let ctx = Context {
            name: stage.kind(),
            device: DeviceSpec::Cpu,
            seed,
            out_dir,
            work_dir: &work_dir,
            progress: &NoProgress,
            metrics: &metrics,
            cancel: &cancel,
            threads,
        };
        let result = super::with_threads(threads, || stage.run(&ctx, config, inputs));
        let _ = std::fs::remove_dir_all(&work_dir);
        result??;
        Ok(metrics)
    }
}
