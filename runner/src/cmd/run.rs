//! `huse-run EXPERIMENT.yaml` (and `run`, `validate`): compile an experiment file, then run
//! it here or hand it to the cluster launcher; prints the stages' summaries and the
//! outcome of each run.

use std::path::PathBuf;

use anyhow::{Context as _, Result};
use clap::Args;
use huse_exec::cache::Cache;
use huse_exec::progress::Display;
use huse_exec::{self as exec, RunOptions};
use huse_registry::Registry;
use huse_report::table::{self, Cell, Format, Table};
use huse_stage_api::CancelToken;
use huse_store::{Location, RunStatus, Store};
use tracing::{error, info, warn};

use super::{Global, cluster, compile, store_options};

/// How to run an experiment.
#[derive(Args, Debug, Clone, Default)]
pub struct RunArgs {
    /// The experiment file.
    pub experiment: Option<PathBuf>,
    /// Override a key: `train.alpha=0.3` (a stage's `with:` key), `seed=7`, `stages.x.uses=y`.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub set: Vec<String>,
    /// Sweep a key over values, as a grid axis added to the file's sweep (repeatable; the
    /// axes combine): `train.beta=0,0.5,1` or `train.beta=[0, 0.5, 1]`.
    #[arg(long = "sweep", value_name = "KEY=V1,V2,...")]
    pub sweep: Vec<String>,
    /// Search a key over a distribution, added to the file's `search:` (repeatable):
    /// `train.beta=uniform(0,1)`, `train.optimizer.lr=log_uniform(1e-4,3e-3)`,
    /// `train.epochs=int(10,30)`, `graph.uses=choice(graph,graph-tree)`.
    #[arg(long = "search", value_name = "KEY=DIST(ARGS)")]
    pub search: Vec<String>,
    /// Run each sweep point with this many seeds (seed, seed+1, ...).
    #[arg(long)]
    pub repeat: Option<u32>,
    /// Stages that may run at the same time (default: number of CPUs; 1 to 4096); for a
    /// `tpe` search, trials at a time (default 1), each on its share of the CPUs.
    #[arg(short, long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub jobs: Option<u32>,
    /// Threads of every stage (default: the CPUs shared among the stages ready to run, never more in all than the CPUs)
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub threads_per_job: Option<u32>,
    /// Stages that may compute on one GPU at the same time (trainings of a sweep share it;
    /// the CPU cores are shared out among all the stages running).
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub gpu_slots: u32,
    /// Check the content hash of every cached output before using it (sizes are always checked).
    #[arg(long)]
    pub verify: bool,
    /// Refuse experiments with more runs than this (sweep points x seeds).
    #[arg(long, value_name = "N", default_value_t = huse_config::MAX_RUNS)]
    pub max_runs: usize,
    /// Recompute this stage even if its output is cached (repeatable).
    #[arg(long, value_name = "STAGE")]
    pub force: Vec<String>,
    /// Recompute every stage (and refresh the cache).
    #[arg(long)]
    pub no_cache: bool,
    /// Load stage kinds from this plugin library (repeatable), besides the experiment's `plugins:`.
    #[arg(long = "plugin", value_name = "PATH")]
    pub plugins: Vec<PathBuf>,
    /// Where the runs go: `local` (this machine) or `slurm` (submit to the cluster; settings
    /// in the file's `launcher:` block). Default: the block's `kind`, else local.
    #[arg(long, value_name = "local|slurm")]
    pub launcher: Option<String>,
    /// With the SLURM launcher: return once the jobs are submitted (print their ids);
    /// `huse-run status` and `huse-run wait` follow them.
    #[arg(long)]
    pub detach: bool,
}

/// `validate`: compile the file and say how many runs it makes, or print its errors.
pub fn validate(a: &RunArgs) -> Result<i32> {
    let file = a.experiment.clone().context("validate needs an experiment file")?;
    match compile(&file, a) {
        Ok((exp, _, _)) => {
            println!("{}: ok ({} run(s), {} stage(s) each)", file.display(), exp.runs.len(), exp.runs[0].stages.len());
            Ok(0)
        }
        Err(d) => {
            eprintln!("{d}");
            Ok(2)
        }
    }
}

/// Runs the experiment of `a` here, or submits it to the cluster.
pub async fn run(g: &Global, a: RunArgs, display: &Display) -> Result<i32> {
    let file = a.experiment.clone().context("no experiment file given")?;
    // Everything is validated before the database or the cache is touched.
    let (exp, registry, source) = match compile(&file, &a) {
        Ok(x) => x,
        Err(d) => {
            eprintln!("{d}");
            return Ok(2);
        }
    };
    let adaptive = exp.search.as_ref().is_some_and(|s| s.adaptive());
    match cluster::launcher_of(&source, &a) {
        Ok(Some(_)) if adaptive => {
            eprintln!(
                "error: {}: a `tpe` search runs its trials on this machine for now (`--launcher local`); `random` and `grid` searches go to the cluster",
                file.display()
            );
            return Ok(2);
        }
        Ok(Some(cfg)) => return cluster::launch(g, &a, &exp, &registry, &cfg, display).await,
        Ok(None) => {}
        Err(e) => {
            eprintln!("{e}");
            return Ok(2);
        }
    }
    let jobs = a.jobs.map(|j| j as usize).unwrap_or_else(huse_exec::Cores::available);
    let opts = RunOptions {
        jobs,
        force: a.force.clone(),
        no_cache: a.no_cache,
        verify: a.verify,
        threads_per_job: a.threads_per_job.map(|t| t as usize),
        gpu_slots: a.gpu_slots as usize,
        auto_gpu: huse_stage_kit::auto_gpu(),
        ..RunOptions::default()
    };
    if adaptive {
        let code = super::trials::run(g, &a, &file, &exp, &opts, display).await?;
        if code != 2 {
            super::study::show(g, &exp).await?;
        }
        return Ok(code);
    }
    run_compiled(g, &g.db, &exp, &registry, &opts, display).await
}

/// Runs a compiled experiment on this machine against the database at `db`, prints the
/// summaries and the outcome table; returns the exit code.
pub async fn run_compiled(
    g: &Global,
    db: &Location,
    exp: &huse_config::Experiment,
    registry: &Registry,
    opts: &RunOptions,
    display: &Display,
) -> Result<i32> {
    let cancel = CancelToken::new();
    spawn_signal_handler(cancel.clone());
    let cache = Cache::open(&g.cache)?;
    let store = Store::open(db, store_options(g)?).await?;
    let reaped = store.reap_dead_runs().await?;
    if reaped > 0 {
        warn!("marked {reaped} run(s) of dead processes as interrupted");
    }
    let outcome = exec::execute(exp, registry, &store, &cache, opts, display, &cancel).await?;
    let outcomes = &outcome.runs;
    // From the database (not when it could not take the results): one run's stage summaries
    // (e.g. the evaluation tables); for a sweep, one table across its points instead.
    if outcome.results_incomplete.is_none() {
        if outcomes.len() > 1 {
            let summary = sweep_summary(&store, exp, registry, outcomes).await.unwrap_or_default();
            display.suspend(|| print!("{summary}"));
        } else {
            for o in outcomes {
                let text = table::summaries_text(&store, o.id).await.unwrap_or_default();
                if !text.is_empty() {
                    display.suspend(|| println!("run {} ({}):\n{text}", o.id, o.name));
                }
            }
        }
    }
    store.close().await;

    let mut t = Table {
        headers: vec!["run".into(), "name".into(), "status".into(), "computed".into(), "cached".into(), "error".into()],
        rows: vec![],
    };
    for o in outcomes {
        t.rows.push(vec![
            Cell::Int(o.id),
            Cell::Text(o.name.clone()),
            Cell::Text(o.status.to_string()),
            Cell::Int(o.computed as i64),
            Cell::Int(o.cached as i64),
            Cell::Text(o.error.clone().unwrap_or_default()),
        ]);
    }
    display.suspend(|| print!("{}", t.render(Format::Table)));
    if let Some(why) = &outcome.results_incomplete {
        error!("not every result reached the database: {why}");
        return Ok(1);
    }
    info!("results in {db}; `huse-run show RUN` for details");
    Ok(if cancel.is_cancelled() || outcomes.iter().any(|o| o.status == RunStatus::Interrupted) {
        130
    } else if outcomes.iter().any(|o| o.status == RunStatus::Failed) {
        1
    } else {
        0
    })
}

/// The end of a sweep: its runs grouped by point (mean ± std over seeds) with the stages'
/// headline metrics, fitted to the terminal.
async fn sweep_summary(
    store: &Store,
    exp: &huse_config::Experiment,
    registry: &Registry,
    outcomes: &[exec::RunOutcome],
) -> Result<String> {
    let ids: std::collections::HashSet<i64> = outcomes.iter().map(|o| o.id).collect();
    let filter = huse_store::Filter { experiment: Some(exp.name.clone()), ..Default::default() };
    let runs: Vec<_> = store.load_runs(&filter).await?.into_iter().filter(|r| ids.contains(&r.id)).collect();
    let mut t = table::runs_table(&runs, &table::patterns(&registry.headline())?, true);
    t.remove_column("experiment");
    t.fit(super::terminal_width(), 2);
    Ok(format!(
        "{} runs of {}, by sweep point (mean ± std over seeds):\n{}(`huse-run show RUN`: a run's tables; `huse-run runs -e {} --group --all`: every metric)\n",
        runs.len(),
        exp.name,
        t.render(Format::Table),
        exp.name
    ))
}

/// First SIGINT/SIGTERM: cancel running stages and let the run end cleanly. Second: exit now.
pub fn spawn_signal_handler(cancel: CancelToken) {
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut int), Ok(mut term)) = (signal(SignalKind::interrupt()), signal(SignalKind::terminate())) else {
            warn!("cannot install signal handlers");
            return;
        };
        for n in 0.. {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
            if n == 0 {
                warn!("interrupted: cancelling running stages (press Ctrl-C again to exit at once)");
                cancel.cancel();
            } else {
                eprintln!("interrupted twice: exiting now");
                std::process::exit(130);
            }
        }
    });
}
