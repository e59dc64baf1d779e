//! `status`, `wait` and `slurm-task`: the SLURM side of the command line — `--launcher
//! slurm` (submit, then follow or detach), `status`, `wait` and the jobs' own entry point
//! (`slurm-task`). The planning,
//! the scripts and the queue queries are in `huse-slurm`; this module wires them to the
//! compiler, the cache, the scheduler and the store.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, Result};
use huse_config::{Experiment, Source};
use huse_exec::RunOptions;
use huse_exec::cache::Cache;
use huse_exec::progress::Display;
use huse_registry::Registry;
use huse_report::table::{Cell, Format, Table};
use huse_slurm::{CompileArgs, DbRun, Launch, LauncherConfig, Submission};
use huse_stage_api::{CancelToken, Progress as _};
use huse_store::{Filter, Location, Store};
use tracing::{info, warn};

use super::run::{RunArgs, run_compiled, spawn_signal_handler};
use super::{Global, compile};

/// The file's `launcher:` block, checked; errors name the file, line and key.
fn launcher_block(source: &Source) -> Result<Option<LauncherConfig>, String> {
    source
        .launcher()
        .map(|(v, origin)| {
            LauncherConfig::from_json(&v).map_err(|e| format!("{}:{}: {e}", source.display, origin_text(&origin)))
        })
        .transpose()
}

/// The launcher a run command asks for: `None` runs here; `Some` submits to SLURM with
/// these settings. Errors name the file, line and key (or the flag).
pub fn launcher_of(source: &Source, a: &RunArgs) -> Result<Option<LauncherConfig>, String> {
    let block = launcher_block(source)?;
    let slurm = match a.launcher.as_deref() {
        Some("local") => false,
        Some("slurm") => true,
        Some(other) => return Err(format!("--launcher {other}: unknown launcher (local or slurm)")),
        None => block.as_ref().is_some_and(LauncherConfig::is_slurm),
    };
    if !slurm {
        return Ok(None);
    }
    if !a.force.is_empty() || a.no_cache {
        return Err("--force and --no-cache are not supported with the SLURM launcher (a resubmission would recompute again); run those stages locally, or remove their cache entries".into());
    }
    Ok(Some(block.unwrap_or_default()))
}

fn origin_text(o: &huse_config::yaml::Origin) -> String {
    match o {
        huse_config::yaml::Origin::File { line, column } => format!("{line}:{column}"),
        other => format!("{other:?}"),
    }
}

fn log_root(cfg: &LauncherConfig) -> PathBuf {
    let root = cfg.log_dir.clone().unwrap_or_else(|| PathBuf::from(".huse/slurm"));
    std::path::absolute(&root).unwrap_or(root)
}

/// The run names of the earlier launches of `exp` whose tasks are still queued or running.
fn active_runs(launches: &[Launch], states: &BTreeMap<String, String>) -> HashSet<String> {
    let mut out = HashSet::new();
    for l in launches {
        let Some(a) = &l.array else { continue };
        for (t, name) in a.runs.iter().enumerate() {
            let st = states.get(&format!("{}_{t}", a.job_id)).or_else(|| states.get(&format!("{}_*", a.job_id)));
            if st.is_some_and(|s| huse_slurm::is_active(s)) {
                out.insert(name.clone());
            }
        }
    }
    out
}

fn all_job_ids(launches: &[Launch]) -> Vec<String> {
    launches.iter().flat_map(Launch::job_ids).filter(|i| !i.is_empty()).collect()
}

/// Submits the runs of `exp` that still have work; then follows them until they end
/// (Ctrl-C cancels them), or returns at once with `--detach`.
pub async fn launch(
    g: &Global,
    a: &RunArgs,
    exp: &Experiment,
    registry: &Registry,
    cfg: &LauncherConfig,
    display: &Display,
) -> Result<i32> {
    let cache_dir = std::path::absolute(&g.cache)?;
    let cache = Cache::open(&cache_dir)?;
    let opts = RunOptions::default();
    let survey = huse_exec::survey(exp, registry, &cache, &opts)?;
    let root = log_root(cfg);
    let earlier = Launch::all(&root, &exp.name)?;
    let states = huse_slurm::states(&all_job_ids(&earlier))?;
    let active = active_runs(&earlier, &states);
    let plan = huse_slurm::plan(exp, &survey, &active);
    info!(
        "experiment `{}`: {} run(s): {} cached, {} still queued by an earlier launch, {} to submit ({} shared stage job(s))",
        exp.name,
        exp.runs.len(),
        plan.cached.len(),
        plan.queued.len(),
        plan.array.len(),
        plan.shared.len()
    );
    if plan.array.is_empty() {
        println!(
            "nothing to submit: every run of `{}` is cached or already queued; `huse-run status` shows them",
            exp.name
        );
        return Ok(0);
    }
    if let Location::Sqlite(p) = &g.db {
        warn!(
            "the results database is a SQLite file ({}): every node must see it on a shared filesystem, and SQLite's locks are not reliable over NFS; a PostgreSQL server (--db postgres://...) is what many nodes should write",
            p.display()
        );
    }
    let file = std::path::absolute(a.experiment.as_ref().context("no experiment file given")?)?;
    let compile_args = CompileArgs {
        file,
        set: a.set.clone(),
        sweep: a.sweep.clone(),
        search: a.search.clone(),
        repeat: a.repeat,
        max_runs: a.max_runs,
        plugins: a.plugins.iter().map(|p| std::path::absolute(p).unwrap_or_else(|_| p.clone())).collect(),
    };
    let sub = Submission {
        exp,
        compile: compile_args,
        config: &LauncherConfig { log_dir: Some(root.clone()), ..cfg.clone() },
        binary: std::env::current_exe().context("locating the huse-run binary")?,
        db: g.db.to_arg(),
        cache: cache_dir,
    };
    let launched = tokio::task::block_in_place(|| huse_slurm::submit(&plan, &sub))?;
    for s in &launched.shared {
        println!("submitted shared stage `{}` as job {} (log {})", s.stage, s.job_id, s.log.display());
    }
    let array = launched.array.as_ref().expect("runs to submit");
    println!(
        "submitted {} run(s) as job array {} (logs {}/run-{}_N.out)",
        array.runs.len(),
        array.job_id,
        launched.dir.display(),
        array.job_id
    );
    if a.detach {
        println!(
            "detached; follow with `huse-run status {}` or `huse-run wait {}`",
            a.experiment.as_ref().unwrap().display(),
            a.experiment.as_ref().unwrap().display()
        );
        return Ok(0);
    }
    // Attached: follow the jobs; Ctrl-C cancels them.
    let cancel = CancelToken::new();
    spawn_signal_handler(cancel.clone());
    let ids = launched.job_ids();
    let bar = display.stage(&format!("slurm {}", array.job_id));
    bar.start("runs finished", Some(array.runs.len() as u64), "run");
    let mut done = 0u64;
    loop {
        let st = huse_slurm::states(&ids)?;
        let active = active_runs(std::slice::from_ref(&launched), &st);
        let shared_active = launched.shared.iter().any(|s| st.get(&s.job_id).is_some_and(|x| huse_slurm::is_active(x)));
        let now_done = (array.runs.len() - active.len()) as u64;
        if now_done > done {
            bar.inc(now_done - done);
            done = now_done;
        }
        if active.is_empty() && !shared_active {
            break;
        }
        if cancel.is_cancelled() {
            warn!("cancelling the launch's jobs ({})", ids.join(", "));
            huse_slurm::cancel(&ids)?;
            bar.finish();
            print_status(g, exp, &root).await?;
            return Ok(130);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    bar.finish();
    let rows = print_status(g, exp, &root).await?;
    Ok(exit_code(&rows, &launched))
}

fn exit_code(rows: &[huse_slurm::RunState], launch: &Launch) -> i32 {
    let names: HashSet<&String> = launch.array.iter().flat_map(|a| a.runs.iter()).collect();
    let bad = rows.iter().filter(|r| names.contains(&r.run)).any(|r| r.status != "succeeded");
    i32::from(bad)
}

/// Reads what the database has of `exp`'s runs, empty when there is no database yet.
async fn db_runs(db: &Location, experiment: &str) -> Result<Vec<DbRun>> {
    if let Location::Sqlite(p) = db
        && !p.exists()
    {
        return Ok(Vec::new());
    }
    let store = Store::open_read_only(db).await?;
    let runs = store.load_runs(&Filter { experiment: Some(experiment.to_string()), ..Default::default() }).await?;
    store.close().await;
    Ok(runs.into_iter().map(|r| r.run).collect())
}

async fn print_status(g: &Global, exp: &Experiment, root: &Path) -> Result<Vec<huse_slurm::RunState>> {
    let launches = Launch::all(root, &exp.name)?;
    let states = huse_slurm::states(&all_job_ids(&launches))?;
    let db = db_runs(&g.db, &exp.name).await?;
    let mut names: Vec<String> = exp.runs.iter().map(|r| r.name.clone()).collect();
    for l in &launches {
        for n in l.array.iter().flat_map(|a| a.runs.iter()) {
            if !names.contains(n) {
                names.push(n.clone());
            }
        }
    }
    let rows = huse_slurm::run_states(&names, &launches, &states, &db);
    let mut t = Table {
        headers: ["run", "name", "status", "job", "log", "error"].iter().map(|s| s.to_string()).collect(),
        rows: vec![],
    };
    for r in &rows {
        let show_log = !matches!(r.status.as_str(), "succeeded" | "pending");
        t.rows.push(vec![
            r.run_id.map(Cell::Int).unwrap_or(Cell::Text(String::new())),
            Cell::Text(r.run.clone()),
            Cell::Text(r.status.clone()),
            Cell::Text(r.job.clone().unwrap_or_default()),
            Cell::Text(if show_log {
                r.log.as_ref().map(|p| p.display().to_string()).unwrap_or_default()
            } else {
                String::new()
            }),
            Cell::Text(r.error.clone().unwrap_or_default()),
        ]);
    }
    print!("{}", t.render(Format::Table));
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &rows {
        *counts.entry(r.status.as_str()).or_default() += 1;
    }
    println!("{}", counts.iter().map(|(k, v)| format!("{v} {k}")).collect::<Vec<_>>().join(", "));
    Ok(rows)
}

/// `status` (and `wait`, which first blocks until no job of the experiment's launches is
/// queued or running).
pub async fn status(g: &Global, a: &RunArgs, wait: bool) -> Result<i32> {
    let file = a.experiment.clone().context("status needs the experiment file")?;
    let (exp, _, source) = match compile(&file, a) {
        Ok(x) => x,
        Err(d) => {
            eprintln!("{d}");
            return Ok(2);
        }
    };
    // Only where the launches are: the block's `log_dir`, or the default.
    let cfg = match launcher_block(&source) {
        Ok(c) => c.unwrap_or_default(),
        Err(e) => {
            eprintln!("{e}");
            return Ok(2);
        }
    };
    let root = log_root(&cfg);
    if wait {
        let cancel = CancelToken::new();
        spawn_signal_handler(cancel.clone());
        loop {
            let launches = Launch::all(&root, &exp.name)?;
            let states = huse_slurm::states(&all_job_ids(&launches))?;
            if !states.values().any(|s| huse_slurm::is_active(s)) {
                break;
            }
            if cancel.is_cancelled() {
                return Ok(130);
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    let rows = print_status(g, &exp, &root).await?;
    Ok(if wait && rows.iter().any(|r| r.status != "succeeded") { 1 } else { 0 })
}

/// The entry point of a SLURM job: compiles the experiment as the submitting host did, and
/// runs one shared stage (no run recorded: its runs record it when they find it cached)
/// or one run (the array task), against the shared cache and database.
pub async fn task(g: &Global, launch_file: &Path, shared: Option<usize>, display: &Display) -> Result<i32> {
    let launch = Launch::read(launch_file)?;
    let c = &launch.compile;
    let args = RunArgs {
        experiment: Some(c.file.clone()),
        set: c.set.clone(),
        sweep: c.sweep.clone(),
        search: c.search.clone(),
        repeat: c.repeat,
        max_runs: c.max_runs,
        plugins: c.plugins.clone(),
        launcher: Some("local".into()),
        ..Default::default()
    };
    let (exp, registry, _) = match compile(&c.file, &args) {
        Ok(x) => x,
        Err(d) => {
            eprintln!("{d}");
            return Ok(2);
        }
    };
    let jobs = launch.jobs_per_task.max(1) as usize;
    let find = |name: &str| {
        exp.runs.iter().position(|r| r.name == name).with_context(|| {
            format!("the experiment no longer has run `{name}` (was the file changed after the launch?)")
        })
    };
    match shared {
        Some(i) => {
            let job = launch.shared.get(i).with_context(|| format!("the launch has no shared job {i}"))?;
            let trimmed = huse_slurm::trim(&exp, find(&job.run)?, Some(&job.stage))?;
            info!("shared stage `{}` (and what it needs) of run {}", job.stage, job.run);
            // Not a run: computed into the cache only; a scratch database takes the rows.
            let scratch = tempfile::tempdir()?;
            let db = Location::Sqlite(scratch.path().join("shared.sqlite"));
            let opts = RunOptions { jobs, auto_gpu: huse_stage_kit::auto_gpu(), ..RunOptions::default() };
            run_compiled(g, &db, &trimmed, &registry, &opts, display).await
        }
        None => {
            let array = launch.array.as_ref().context("the launch has no job array")?;
            let task: usize = std::env::var("SLURM_ARRAY_TASK_ID")
                .context("SLURM_ARRAY_TASK_ID is not set (slurm-task runs inside a SLURM array job)")?
                .parse()
                .context("SLURM_ARRAY_TASK_ID is not a number")?;
            let job_id = std::env::var("SLURM_ARRAY_JOB_ID").unwrap_or_else(|_| array.job_id.clone());
            let name = array.runs.get(task).with_context(|| format!("the launch's array has no task {task}"))?;
            let trimmed = huse_slurm::trim(&exp, find(name)?, None)?;
            let log = launch.task_log(&job_id, task).display().to_string();
            info!("run {name} (task {task} of array {job_id}; log {log})");
            let opts =
                RunOptions { jobs, run_log: Some(log), auto_gpu: huse_stage_kit::auto_gpu(), ..RunOptions::default() };
            run_compiled(g, &g.db, &trimmed, &registry, &opts, display).await
        }
    }
}
