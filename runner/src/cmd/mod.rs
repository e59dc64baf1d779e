//! One module per command: each holds its arguments (a clap `Args` struct) and one entry
//! function, `run`, that the dispatcher in [`crate::cli`] calls. What several commands
//! share — opening the database for a query, the store options, compiling an experiment
//! file, the run-id parser — is here.

use std::path::{Path, PathBuf};

use anyhow::Result;
use clap::Args;
use huse_config::{Diagnostic, Diagnostics, Overrides, Source};
use huse_registry::Registry;
use huse_store::{Cond, Filter, Location, RunStatus, Store, search_lang};
use tracing::warn;

use crate::builtin_registry;

pub mod best;
pub mod cache;
pub mod cluster;
pub mod compare;
pub mod db;
pub mod embed;
pub mod export;
pub mod list;
pub mod report;
pub mod run;
pub mod runs;
pub mod search;
pub mod serve;
pub mod show;
pub mod study;
pub mod trials;
pub mod ui;

/// The options every command takes.
#[derive(Args, Debug, Clone)]
pub struct Global {
    /// Results database: a SQLite file path (taken verbatim), sqlite://PATH, or a PostgreSQL
    /// URL (postgres://USER[:PASSWORD]@HOST[:PORT]/DB).
    #[arg(
        long = "db",
        id = "db",
        global = true,
        env = "HUSE_DB",
        default_value = ".huse/runs.sqlite",
        value_name = "DB"
    )]
    pub db_arg: String,
    /// `db_arg` parsed (by the dispatcher, so that a refused location is never echoed with its password).
    #[arg(skip = Location::Sqlite(PathBuf::new()))]
    pub db: Location,
    /// Stage cache directory.
    #[arg(long, global = true, env = "HUSE_CACHE", default_value = ".huse/cache")]
    pub cache: PathBuf,
    /// More log output (-v: debug, -vv: trace); RUST_LOG also works.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Only warnings and errors.
    #[arg(short, long, global = true)]
    pub quiet: bool,
}

/// Which runs a query is about.
#[derive(Args, Debug, Clone)]
pub struct FilterArgs {
    /// Only runs of this experiment.
    #[arg(long, short = 'e')]
    pub experiment: Option<String>,
    /// Only runs with this status (running, succeeded, failed, interrupted).
    #[arg(long)]
    pub status: Option<RunStatus>,
    /// Condition on a param or a final metric, e.g. `train.beta=0.5` or `test.t2i.r1>0.6` (repeatable, all must hold).
    #[arg(long = "where", short = 'w', value_name = "COND")]
    pub conds: Vec<Cond>,
    /// A query (runs, best) over params, final metrics and the run's fields (id, name, state, experiment,
    /// seed, device) with and, or, not, in (...) and parentheses, e.g.
    /// `test.acc.both > 0.9 and (train.beta in (0, 0.5) or state = failed)`.
    #[arg(long, value_name = "EXPR")]
    pub query: Option<String>,
}

/// A mistake in how a command was called (exit 2, not 1).
#[derive(Debug)]
pub struct UsageError(pub String);

impl std::fmt::Display for UsageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

impl FilterArgs {
    /// The store's filter.
    fn filter(&self) -> Filter {
        Filter { experiment: self.experiment.clone(), status: self.status, conds: self.conds.clone() }
    }

    /// The runs that pass the filter. An unknown `-e` experiment is an error; when no run
    /// passes, each `-w` key that no run (of that experiment) has as a param or metric gets
    /// a warning with the closest real key (a misspelt key matches nothing, silently else).
    pub async fn load(&self, store: &Store) -> Result<Vec<huse_store::RunRow>> {
        if let Some(e) = &self.experiment {
            store.check_experiment(e).await?;
        }
        let mut runs = store.load_runs(&self.filter()).await?;
        if let Some(q) = &self.query {
            let expr = search_lang::parse(q).map_err(|e| UsageError(format!("--query {}\n{}", e, e.caret(q))))?;
            let all = store.load_runs(&Filter { experiment: self.experiment.clone(), ..Default::default() }).await?;
            expr.check_names(&search_lang::known_names(&all))
                .map_err(|e| UsageError(format!("--query {}\n{}", e, e.caret(q))))?;
            runs.retain(|r| expr.eval(&|n| search_lang::value_of(r, n)));
        }
        if runs.is_empty() && !self.conds.is_empty() {
            let all = store.load_runs(&Filter { experiment: self.experiment.clone(), ..Default::default() }).await?;
            let keys: Vec<&str> = self.conds.iter().map(|c| c.key.as_str()).collect();
            for (k, near) in huse_report::table::unknown_keys(&all, &keys) {
                warn!(
                    "no run has a param or metric `{k}`{}",
                    near.map(|n| format!(" (did you mean `{n}`?)")).unwrap_or_default()
                );
            }
        }
        Ok(runs)
    }
}

/// The terminal's width in columns; 80 when standard output is not a terminal.
pub fn terminal_width() -> usize {
    console::Term::stdout().size_checked().map(|(_, cols)| usize::from(cols)).unwrap_or(80)
}

/// A run's id on the command line: a positive number, as `huse-run runs` lists them; anything
/// else (a query typed where the id goes, an experiment's name) gets an error that says so.
pub fn run_id(s: &str) -> std::result::Result<i64, String> {
    match s.trim().parse::<i64>() {
        Ok(id) if id > 0 => Ok(id),
        _ => Err(format!("a run is named by its id, a number (`huse-run runs` lists them), not '{s}'")),
    }
}

/// The candle device for `--device` (auto: a GPU when this build and machine have one).
pub fn device_arg(spec: &str) -> Result<candle_core::Device> {
    let spec: huse_stage_api::DeviceSpec = spec.parse().map_err(anyhow::Error::msg)?;
    huse_stage_kit::device_of(spec).map_err(|e| anyhow::anyhow!("{e}"))
}

/// The store options: the busy timeout and retry window from the environment, and the
/// cache's `.spool/` as the fallback spool folder.
pub fn store_options(g: &Global) -> Result<huse_store::Options> {
    let mut o = huse_store::Options::from_env()?;
    o.fallback_spool_dir = Some(g.cache.join(".spool"));
    Ok(o)
}

/// Opens the database read-only for a query, warning about records still spooled (beside
/// the database or in the cache's fallback spool) or set aside.
pub async fn open_for_queries(g: &Global) -> Result<Store> {
    let db = &g.db;
    let store = Store::open_read_only_with(db, Some(g.cache.join(".spool"))).await?;
    let n = store.spooled().await;
    if n > 0 {
        warn!("{n} record(s) are spooled and not yet in {db}; `huse-run db replay` writes them");
    }
    let aside = store.set_aside_spools().await;
    if !aside.is_empty() {
        warn!(
            "{} spool(s) of records that cannot be written to {db} were set aside; `huse-run db replay` names them",
            aside.len()
        );
    }
    Ok(store)
}

/// Reads the experiment file once, loads the plugins it and the command line name, and
/// compiles it; returns the experiment, the registry it was compiled against, and the
/// parsed file (for what is not part of a run, such as the `launcher:` block).
pub fn compile(file: &Path, a: &run::RunArgs) -> Result<(huse_config::Experiment, Registry, Source), Diagnostics> {
    compile_with(file, a, None)
}

/// [`compile`], asking an adaptive search for a given trial (see [`trials`]).
pub fn compile_with(
    file: &Path,
    a: &run::RunArgs,
    search: Option<huse_config::search::SearchRequest>,
) -> Result<(huse_config::Experiment, Registry, Source), Diagnostics> {
    let source = Source::read(file)?;
    let env = |k: &str| std::env::var(k).ok();
    let mut registry = builtin_registry();
    load_plugins(&source, &a.plugins, &mut registry, &env)?;
    let overrides = Overrides {
        set: a.set.clone(),
        sweep: a.sweep.clone(),
        search_params: a.search.clone(),
        repeat: a.repeat,
        force: a.force.clone(),
        max_runs: Some(a.max_runs),
        search,
    };
    let exp = huse_config::compile(&source, &overrides, &registry, &env)?;
    Ok((exp, registry, source))
}

/// Loads the plugins of the file's `plugins:` list and of `--plugin` flags into `registry`;
/// errors point at the list entry or the flag.
fn load_plugins(
    source: &Source,
    cli: &[PathBuf],
    registry: &mut Registry,
    env: &dyn Fn(&str) -> Option<String>,
) -> Result<(), Diagnostics> {
    let mut diags = Vec::new();
    for p in source.plugins(env) {
        if let Err(e) = registry.load_plugin(&p.path) {
            diags.push(Diagnostic { file: source.display.clone(), origin: p.origin, path: p.key, message: e });
        }
    }
    for p in cli {
        if let Err(e) = registry.load_plugin(p) {
            let origin = huse_config::yaml::Origin::Arg(format!("--plugin {}", p.display()));
            diags.push(Diagnostic { file: source.display.clone(), origin, path: String::new(), message: e });
        }
    }
    if diags.is_empty() { Ok(()) } else { Err(Diagnostics(diags)) }
}

/// Where run `run`'s dataset, features and model are, found by the artifacts its stages
/// wrote (whatever the stages' kinds), from the database.
pub async fn run_files(store: &Store, run: i64) -> Result<huse_search::RunFiles> {
    let info = store.run(run).await?;
    let stages: Vec<huse_search::StageOutput> = store
        .stage_runs(run)
        .await?
        .into_iter()
        .filter(|s| s.status == huse_store::StageStatus::Succeeded)
        .filter_map(|s| {
            Some(huse_search::StageOutput {
                stage: s.stage,
                output_dir: PathBuf::from(s.output_dir?),
                cache_key: s.cache_key,
            })
        })
        .collect();
    let (yaml, _) = store.run_config(run).await?;
    let config: serde_json::Value =
        serde_saphyr::from_str(&yaml).map_err(|e| anyhow::anyhow!("run {run}: its resolved config: {e}"))?;
    huse_search::RunFiles::locate(&format!("run {run} ({})", info.name), &stages, &config)
}
