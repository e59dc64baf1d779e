//! `huse-slurm`: runs a sweep on a SLURM cluster instead of this machine.
//!
//! The submitting host compiles and validates every run first (the caller does; nothing
//! reaches the queue if one point is invalid), then [`plan`]s from the cache survey:
//!
//! - every stage job that several runs share (ingest, encode, graph) and that is not
//!   cached becomes one SLURM job, depending (`afterok`) on the shared jobs it reads;
//! - every run that still has work becomes one task of a job array, depending on the
//!   shared jobs, with `%N` array parallelism; runs whose stages are all cached are not
//!   submitted, nor are runs an earlier launch still has queued or running.
//!
//! Each job runs the same `huse-run` binary (`huse-run slurm-task LAUNCH.json ...`)
//! against the shared cache directory and results database (their locations travel in
//! `HUSE_CACHE` / `HUSE_DB`, so a password never lands in a script), so outputs, metrics
//! and failures land exactly as in a local run. What was submitted is written to a
//! [`Launch`] file in the launch's log folder (`<log_dir>/<experiment>/<launch id>/`),
//! beside one log per job and task; `status` and `wait` read these back and ask
//! `squeue`, `scontrol` and (where accounting is on) `sacct` about the jobs.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{Context as _, Result, bail};
use huse_config::Experiment;
use huse_exec::Survey;
use serde::{Deserialize, Serialize};

/// The `launcher:` block of an experiment file (every key optional), or the flags that
/// override it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LauncherConfig {
    /// `slurm` (the only cluster launcher) or `local`.
    #[serde(default)]
    pub kind: Option<String>,
    /// `--partition`.
    #[serde(default)]
    pub partition: Option<String>,
    /// `--cpus-per-task` (default 1): also the number of stages a task runs at a time.
    #[serde(default)]
    pub cpus: Option<u32>,
    /// `--mem`, e.g. `8G`.
    #[serde(default)]
    pub mem: Option<String>,
    /// `--gres`, e.g. `gpu:1`.
    #[serde(default)]
    pub gres: Option<String>,
    /// `--time`, e.g. `02:00:00`.
    #[serde(default)]
    pub time: Option<String>,
    /// `--account`.
    #[serde(default)]
    pub account: Option<String>,
    /// At most this many array tasks at once (`--array=0-N%P`).
    #[serde(default)]
    pub parallelism: Option<u32>,
    /// Extra `#SBATCH` lines, e.g. `--qos=short` (with or without the `#SBATCH` prefix).
    #[serde(default)]
    pub extra: Vec<String>,
    /// Where launch folders (manifest and logs) go (default `.huse/slurm`); must be on the
    /// filesystem the nodes share.
    #[serde(default)]
    pub log_dir: Option<PathBuf>,
}

impl LauncherConfig {
    /// Reads the file's `launcher:` block; errors name the key.
    pub fn from_json(v: &serde_json::Value) -> Result<LauncherConfig, String> {
        let c: LauncherConfig = serde_json::from_value(v.clone()).map_err(|e| format!("launcher: {e}"))?;
        if let Some(k) = &c.kind
            && k != "slurm"
            && k != "local"
        {
            return Err(format!("launcher.kind: unknown launcher `{k}` (slurm or local)"));
        }
        if c.cpus == Some(0) {
            return Err("launcher.cpus: expected at least 1".into());
        }
        if c.parallelism == Some(0) {
            return Err("launcher.parallelism: expected at least 1".into());
        }
        for (i, line) in c.extra.iter().enumerate() {
            if line.contains('\n') {
                return Err(format!("launcher.extra.{i}: one #SBATCH option per entry (no line breaks)"));
            }
        }
        Ok(c)
    }

    /// Whether this block asks for SLURM.
    pub fn is_slurm(&self) -> bool {
        self.kind.as_deref() == Some("slurm")
    }

    fn sbatch_lines(&self) -> Vec<String> {
        let mut out = vec![format!("--cpus-per-task={}", self.cpus.unwrap_or(1))];
        let opt = |name: &str, v: &Option<String>| v.as_ref().map(|v| format!("--{name}={v}"));
        out.extend(opt("partition", &self.partition));
        out.extend(opt("mem", &self.mem));
        out.extend(opt("gres", &self.gres));
        out.extend(opt("time", &self.time));
        out.extend(opt("account", &self.account));
        out.extend(self.extra.iter().map(|l| l.trim().trim_start_matches("#SBATCH").trim().to_string()));
        out
    }
}

/// What to submit.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Plan {
    /// Shared stage jobs in dependency order.
    pub shared: Vec<SharedJob>,
    /// The runs (indices into the experiment's runs) that become array tasks.
    pub array: Vec<usize>,
    /// Runs left out because every stage is cached.
    pub cached: Vec<usize>,
    /// Runs left out because an earlier launch has them queued or running.
    pub queued: Vec<usize>,
}

/// A stage job several runs share, computed once by its own SLURM job.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedJob {
    /// The run whose stages compute it.
    pub run: usize,
    /// The stage's name.
    pub stage: String,
    /// Indices (into [`Plan::shared`]) of the shared jobs it waits for.
    pub after: Vec<usize>,
}

/// Splits the work of `survey` into shared jobs and array tasks; `active` are the names of
/// runs that an earlier launch still has queued or running.
pub fn plan(exp: &Experiment, survey: &Survey, active: &HashSet<String>) -> Plan {
    let mut p = Plan::default();
    let mut todo_runs = Vec::new();
    for (ri, run) in exp.runs.iter().enumerate() {
        if survey.run_cached(ri) {
            p.cached.push(ri);
        } else if active.contains(&run.name) {
            p.queued.push(ri);
        } else {
            todo_runs.push(ri);
        }
    }
    let todo: HashSet<usize> = todo_runs.iter().copied().collect();
    // A job is shared when runs of this launch (two or more) use it; computed once.
    let mut shared_of_job: HashMap<usize, usize> = HashMap::new();
    for (ji, job) in survey.jobs.iter().enumerate() {
        if job.cached {
            continue;
        }
        let users: Vec<&(usize, String)> = job.users.iter().filter(|(ri, _)| todo.contains(ri)).collect();
        let distinct: HashSet<usize> = users.iter().map(|(ri, _)| *ri).collect();
        if distinct.len() < 2 {
            continue;
        }
        let (run, stage) = users[0].clone();
        // Waits for the shared jobs among its (transitive) upstream jobs.
        let mut after = Vec::new();
        let mut stack = job.needs.clone();
        let mut seen = HashSet::new();
        while let Some(d) = stack.pop() {
            if !seen.insert(d) {
                continue;
            }
            match shared_of_job.get(&d) {
                Some(s) => after.push(*s),
                None => stack.extend(survey.jobs[d].needs.iter().copied()),
            }
        }
        after.sort_unstable();
        after.dedup();
        shared_of_job.insert(ji, p.shared.len());
        p.shared.push(SharedJob { run, stage, after });
    }
    p.array = todo_runs;
    p
}

/// `exp` cut down to run `ri` alone, keeping only `stage` and the stages it needs
/// (transitively) when `stage` is given.
pub fn trim(exp: &Experiment, ri: usize, stage: Option<&str>) -> Result<Experiment> {
    let mut run = exp.runs.get(ri).with_context(|| format!("the experiment has no run {ri}"))?.clone();
    if let Some(stage) = stage {
        let mut keep: HashSet<String> = HashSet::new();
        let mut stack = vec![stage.to_string()];
        while let Some(s) = stack.pop() {
            if keep.insert(s.clone()) {
                let spec = run
                    .stages
                    .iter()
                    .find(|x| x.name == s)
                    .with_context(|| format!("run {} has no stage `{s}`", run.name))?;
                stack.extend(spec.needs.iter().cloned());
            }
        }
        run.stages.retain(|s| keep.contains(&s.name));
    }
    Ok(Experiment { file: exp.file.clone(), name: exp.name.clone(), runs: vec![run], search: exp.search.clone() })
}

/// How the experiment was compiled on the submitting host: each task compiles it the
/// same way.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CompileArgs {
    /// The experiment file (absolute).
    pub file: PathBuf,
    /// `--set` overrides.
    pub set: Vec<String>,
    /// `--sweep` axes (absent from launch files written before it existed).
    #[serde(default)]
    pub sweep: Vec<String>,
    /// `--search` parameters (absent from launch files written before it existed).
    #[serde(default)]
    pub search: Vec<String>,
    /// `--repeat`.
    pub repeat: Option<u32>,
    /// `--max-runs`.
    pub max_runs: usize,
    /// `--plugin` libraries (absolute).
    pub plugins: Vec<PathBuf>,
}

/// A submitted shared job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchedShared {
    /// Name of the run whose stages compute it.
    pub run: String,
    /// The stage.
    pub stage: String,
    /// SLURM job id.
    pub job_id: String,
    /// Its log file.
    pub log: PathBuf,
}

/// A submitted job array: task `i` runs `runs[i]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LaunchedArray {
    /// SLURM job id of the array.
    pub job_id: String,
    /// Run names by task index.
    pub runs: Vec<String>,
}

/// Everything one launch submitted (`launch.json` in its folder).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Launch {
    /// `YYYYmmddTHHMMSS-pid`.
    pub id: String,
    /// Experiment name.
    pub experiment: String,
    /// How to compile it again.
    pub compile: CompileArgs,
    /// The cache directory (absolute).
    pub cache: PathBuf,
    /// The working directory of the submission.
    pub cwd: PathBuf,
    /// The launch folder (manifest and logs).
    pub dir: PathBuf,
    /// Stages a task runs at a time.
    pub jobs_per_task: u32,
    /// Shared jobs.
    pub shared: Vec<LaunchedShared>,
    /// The array, unless every run was cached or queued.
    pub array: Option<LaunchedArray>,
    /// RFC 3339.
    pub submitted_at: String,
}

impl Launch {
    /// The manifest file of a launch folder.
    pub fn file_in(dir: &Path) -> PathBuf {
        dir.join("launch.json")
    }

    /// Reads a launch manifest.
    pub fn read(path: &Path) -> Result<Launch> {
        let text =
            std::fs::read_to_string(path).with_context(|| format!("reading launch manifest {}", path.display()))?;
        serde_json::from_str(&text).with_context(|| format!("{}: not a launch manifest", path.display()))
    }

    /// Writes it (to a temporary file, then renamed).
    pub fn write(&self) -> Result<()> {
        let path = Self::file_in(&self.dir);
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(self)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))
    }

    /// Every job id of the launch.
    pub fn job_ids(&self) -> Vec<String> {
        let mut ids: Vec<String> = self.shared.iter().map(|s| s.job_id.clone()).collect();
        ids.extend(self.array.as_ref().map(|a| a.job_id.clone()));
        ids
    }

    /// The log of array task `task`.
    pub fn task_log(&self, job_id: &str, task: usize) -> PathBuf {
        self.dir.join(format!("run-{job_id}_{task}.out"))
    }

    /// Every launch of `experiment` under `log_dir`, oldest first.
    pub fn all(log_dir: &Path, experiment: &str) -> Result<Vec<Launch>> {
        let dir = log_dir.join(safe_name(experiment));
        let Ok(entries) = std::fs::read_dir(&dir) else { return Ok(Vec::new()) };
        let mut out = Vec::new();
        for e in entries.flatten() {
            let f = Self::file_in(&e.path());
            if f.is_file() {
                out.push(Self::read(&f)?);
            }
        }
        out.sort_by(|a, b| a.submitted_at.cmp(&b.submitted_at).then(a.id.cmp(&b.id)));
        Ok(out)
    }
}

/// A name safe as one path component.
pub fn safe_name(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.".contains(c) { c } else { '_' }).collect()
}

fn command_output(cmd: &mut Command, what: &str) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running `{what}` (is SLURM installed and on PATH?)"))?;
    if !out.status.success() {
        bail!("`{what}` failed ({}): {}", out.status, String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Submits `script` with `sbatch --parsable`; returns the job id.
fn sbatch(script: &str, env: &[(&str, String)]) -> Result<String> {
    let mut child = Command::new("sbatch")
        .arg("--parsable")
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("running `sbatch` (is SLURM installed and on PATH?)")?;
    child.stdin.take().expect("piped").write_all(script.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!("sbatch refused the job: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    let text = String::from_utf8_lossy(&out.stdout);
    // `--parsable` prints `JOBID` or `JOBID;CLUSTER`.
    let id = text.trim().split(';').next().unwrap_or("").to_string();
    if id.is_empty() || !id.chars().all(|c| c.is_ascii_digit()) {
        bail!("sbatch printed no job id: `{}`", text.trim());
    }
    Ok(id)
}

fn shell_quote(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,@%+".contains(c)) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

/// What [`submit`] needs besides the plan.
pub struct Submission<'a> {
    /// The compiled experiment.
    pub exp: &'a Experiment,
    /// How it was compiled.
    pub compile: CompileArgs,
    /// Launcher settings.
    pub config: &'a LauncherConfig,
    /// The `huse-run` binary the jobs run (on the shared filesystem).
    pub binary: PathBuf,
    /// The results database as `--db` takes it (passed in `HUSE_DB`).
    pub db: String,
    /// The cache directory (absolute; passed in `HUSE_CACHE`).
    pub cache: PathBuf,
}

/// Submits `plan`: the shared jobs in order, then the array. On an sbatch failure, the
/// jobs already submitted are cancelled. Returns the launch, already written to its folder.
pub fn submit(plan: &Plan, s: &Submission) -> Result<Launch> {
    let cwd = std::env::current_dir()?;
    let log_root = s.config.log_dir.clone().unwrap_or_else(|| PathBuf::from(".huse/slurm"));
    let log_root = if log_root.is_absolute() { log_root } else { cwd.join(log_root) };
    let id = format!("{}-{}", chrono::Utc::now().format("%Y%m%dT%H%M%S%.3f"), std::process::id());
    let dir = log_root.join(safe_name(&s.exp.name)).join(&id);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating launch folder {}", dir.display()))?;
    let mut launch = Launch {
        id,
        experiment: s.exp.name.clone(),
        compile: s.compile.clone(),
        cache: s.cache.clone(),
        cwd: cwd.clone(),
        dir: dir.clone(),
        jobs_per_task: s.config.cpus.unwrap_or(1),
        shared: Vec::new(),
        array: None,
        submitted_at: chrono::Utc::now().to_rfc3339(),
    };
    // The manifest exists before any job can start (tasks read it).
    launch.write()?;
    let env = [("HUSE_DB", s.db.clone()), ("HUSE_CACHE", s.cache.display().to_string())];
    let manifest = Launch::file_in(&dir);
    let header = |name: &str, output: &Path| {
        let mut text = String::from("#!/bin/bash\n");
        text.push_str(&format!("#SBATCH --job-name={}\n", safe_name(name)));
        text.push_str(&format!("#SBATCH --output={}\n", output.display()));
        text.push_str(&format!("#SBATCH --chdir={}\n", cwd.display()));
        for l in s.config.sbatch_lines() {
            text.push_str(&format!("#SBATCH {l}\n"));
        }
        text
    };
    let exe = shell_quote(&s.binary.display().to_string());
    let result: Result<()> = (|| {
        for (i, job) in plan.shared.iter().enumerate() {
            let log = dir.join(format!("shared-{}-%j.out", safe_name(&job.stage)));
            let mut script = header(&format!("huse-{}-{}", s.exp.name, job.stage), &log);
            let after: Vec<&str> = job.after.iter().map(|a| launch.shared[*a].job_id.as_str()).collect();
            if !after.is_empty() {
                script.push_str(&format!(
                    "#SBATCH --dependency=afterok:{}\n#SBATCH --kill-on-invalid-dep=yes\n",
                    after.join(":")
                ));
            }
            script.push_str(&format!(
                "exec {exe} slurm-task {} --shared {i}\n",
                shell_quote(&manifest.display().to_string())
            ));
            let job_id = sbatch(&script, &env).with_context(|| format!("submitting shared stage `{}`", job.stage))?;
            let log = dir.join(format!("shared-{}-{job_id}.out", safe_name(&job.stage)));
            launch.shared.push(LaunchedShared {
                run: s.exp.runs[job.run].name.clone(),
                stage: job.stage.clone(),
                job_id,
                log,
            });
            launch.write()?;
        }
        if !plan.array.is_empty() {
            let log = dir.join("run-%A_%a.out");
            let mut script = header(&format!("huse-{}", s.exp.name), &log);
            let n = plan.array.len();
            let par = s.config.parallelism.map(|p| format!("%{p}")).unwrap_or_default();
            script.push_str(&format!("#SBATCH --array=0-{}{par}\n", n - 1));
            let after: Vec<&str> = launch.shared.iter().map(|j| j.job_id.as_str()).collect();
            if !after.is_empty() {
                script.push_str(&format!(
                    "#SBATCH --dependency=afterok:{}\n#SBATCH --kill-on-invalid-dep=yes\n",
                    after.join(":")
                ));
            }
            script.push_str(&format!("exec {exe} slurm-task {}\n", shell_quote(&manifest.display().to_string())));
            // Written before submitting, so that no task can start without its run list.
            let runs: Vec<String> = plan.array.iter().map(|ri| s.exp.runs[*ri].name.clone()).collect();
            launch.array = Some(LaunchedArray { job_id: String::new(), runs });
            launch.write()?;
            let job_id = sbatch(&script, &env).context("submitting the job array")?;
            launch.array.as_mut().expect("set above").job_id = job_id;
            launch.write()?;
        }
        Ok(())
    })();
    if let Err(e) = result {
        let ids = launch.job_ids().into_iter().filter(|i| !i.is_empty()).collect::<Vec<_>>();
        if !ids.is_empty() {
            let _ = cancel(&ids);
        }
        if launch.array.as_ref().is_some_and(|a| a.job_id.is_empty()) {
            launch.array = None;
            let _ = launch.write();
        }
        return Err(e);
    }
    Ok(launch)
}

/// Cancels jobs (`scancel`).
pub fn cancel(job_ids: &[String]) -> Result<()> {
    if job_ids.is_empty() {
        return Ok(());
    }
    command_output(Command::new("scancel").args(job_ids), "scancel").map(|_| ())
}

/// A SLURM job (or array task) state, as SLURM names it (`PENDING`, `RUNNING`,
/// `COMPLETED`, `FAILED`, `CANCELLED`, `TIMEOUT`, ...).
pub type JobState = String;

/// Whether a state is still in the queue (not finished).
pub fn is_active(state: &str) -> bool {
    matches!(
        state,
        "PENDING"
            | "RUNNING"
            | "CONFIGURING"
            | "COMPLETING"
            | "SUSPENDED"
            | "REQUEUED"
            | "RESIZING"
            | "SIGNALING"
            | "STAGE_OUT"
    )
}

/// The state of each job and array task of `job_ids`, keyed `JOBID` for plain jobs and
/// `JOBID_TASK` for array tasks: the queue (`squeue`) for active ones, then `scontrol`
/// (jobs SLURM still remembers) and `sacct` (where accounting is on) for finished ones.
/// A pending array whose tasks have not been split yet is keyed `JOBID_*`.
pub fn states(job_ids: &[String]) -> Result<BTreeMap<String, JobState>> {
    let mut out = BTreeMap::new();
    let ids: Vec<&String> = job_ids.iter().filter(|i| !i.is_empty()).collect();
    if ids.is_empty() {
        return Ok(out);
    }
    let list = ids.iter().map(|s| s.as_str()).collect::<Vec<_>>().join(",");
    // squeue refuses ids it no longer knows when given alone; ask per user instead and filter.
    let q = command_output(Command::new("squeue").args(["-h", "-r", "-o", "%i|%T", "--jobs", &list]), "squeue");
    let q = match q {
        Ok(t) => t,
        Err(_) => command_output(Command::new("squeue").args(["-h", "-r", "-o", "%i|%T"]), "squeue")?,
    };
    let wanted: HashSet<&str> = ids.iter().map(|s| s.as_str()).collect();
    for line in q.lines() {
        if let Some((id, state)) = line.trim().split_once('|') {
            let base = id.split('_').next().unwrap_or(id);
            if wanted.contains(base) {
                let key = if id.contains("_[") { format!("{base}_*") } else { id.to_string() };
                out.insert(key, state.to_string());
            }
        }
    }
    for id in &ids {
        // A plain job the queue listed needs no second question.
        if out.contains_key(id.as_str()) {
            continue;
        }
        if let Ok(text) = command_output(Command::new("scontrol").args(["-o", "show", "job", id]), "scontrol") {
            for line in text.lines() {
                let field = |name: &str| {
                    line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{name}=")[..]).map(str::to_string))
                };
                let (Some(state), Some(job)) = (field("JobState"), field("JobId")) else { continue };
                let key = match (field("ArrayJobId"), field("ArrayTaskId")) {
                    // 4294967294 (NO_VAL) is the record of the tasks not yet split off a
                    // pending array, like a non-numeric range `6-17%2`.
                    (Some(a), Some(t)) if t.parse::<u64>().is_ok_and(|n| n < 4_000_000_000) => format!("{a}_{t}"),
                    (Some(a), Some(_)) => format!("{a}_*"),
                    _ => job,
                };
                out.entry(key).or_insert(state);
            }
        }
    }
    // Finished jobs SLURM has forgotten: accounting, when the cluster keeps it (asked only
    // about the jobs neither the queue nor scontrol knew).
    let unknown: Vec<&str> = ids
        .iter()
        .map(|s| s.as_str())
        .filter(|id| !out.keys().any(|k| k == id || k.starts_with(&format!("{id}_"))))
        .collect();
    if unknown.is_empty() {
        return Ok(out);
    }
    if let Ok(text) = command_output(
        Command::new("sacct").args(["-n", "-P", "-X", "-o", "JobID,State", "-j", &unknown.join(",")]),
        "sacct",
    ) {
        for line in text.lines() {
            if let Some((id, state)) = line.split_once('|') {
                let state = state.split_whitespace().next().unwrap_or(state).to_string();
                out.entry(id.to_string()).or_insert(state);
            }
        }
    }
    Ok(out)
}

/// One row of `huse-run status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunState {
    /// Run name.
    pub run: String,
    /// pending, running, succeeded, failed, cancelled or interrupted.
    pub status: String,
    /// Its SLURM job (`JOBID_TASK`), when it was launched.
    pub job: Option<String>,
    /// Its log, when launched.
    pub log: Option<PathBuf>,
    /// Id in the database, once the task started.
    pub run_id: Option<i64>,
    /// Why it failed.
    pub error: Option<String>,
}

/// A run as the database has it (the newest row of that name): the store's own row type.
pub use huse_store::Run as DbRun;

/// The state of every run of an experiment: the run list of `exp` (all its runs), the
/// launches that submitted them (the newest launch of each run counts), the job states,
/// and the database rows. A run that was never launched and is not in the database is
/// `missing`.
pub fn run_states(
    run_names: &[String],
    launches: &[Launch],
    jobs: &BTreeMap<String, JobState>,
    db: &[DbRun],
) -> Vec<RunState> {
    let mut launched: HashMap<&str, (&Launch, String, PathBuf, Option<String>)> = HashMap::new();
    for l in launches {
        if let Some(a) = &l.array {
            // A shared job that failed or was cancelled keeps its dependants from starting.
            let shared_problem = l.shared.iter().find_map(|s| match jobs.get(&s.job_id).map(String::as_str) {
                Some(st) if !is_active(st) && st != "COMPLETED" => {
                    Some(format!("shared stage `{}` {} (log {})", s.stage, st.to_lowercase(), s.log.display()))
                }
                _ => None,
            });
            for (t, name) in a.runs.iter().enumerate() {
                let key = format!("{}_{t}", a.job_id);
                launched.insert(name.as_str(), (l, key, l.task_log(&a.job_id, t), shared_problem.clone()));
            }
        }
    }
    let newest_db: HashMap<&str, &DbRun> = db.iter().map(|r| (r.name.as_str(), r)).collect();
    let mut out = Vec::new();
    for name in run_names {
        let row = newest_db.get(name.as_str()).copied();
        let Some((_, key, log, shared_problem)) = launched.get(name.as_str()) else {
            out.push(RunState {
                run: name.clone(),
                status: row.map(|r| r.status.to_string()).unwrap_or_else(|| "missing".into()),
                job: None,
                log: row.and_then(|r| r.log.clone()).map(PathBuf::from),
                run_id: row.map(|r| r.id),
                error: row.and_then(|r| r.error.clone()),
            });
            continue;
        };
        let job_id = key.split('_').next().unwrap_or_default();
        let state = jobs.get(key).or_else(|| jobs.get(&format!("{job_id}_*"))).cloned();
        // The database row of this launch's task, if it started (its log names the task).
        let log_text = log.display().to_string();
        let this_row = row.filter(|r| r.log.as_deref() == Some(log_text.as_str()));
        let (status, error) = match (state.as_deref(), this_row) {
            (Some(st), None) if !is_active(st) && shared_problem.is_some() => {
                ("failed".to_string(), shared_problem.clone())
            }
            (Some("CANCELLED"), r) if r.is_none_or(|r| r.status != huse_store::RunStatus::Succeeded) => {
                ("cancelled".to_string(), Some("cancelled (scancel)".to_string()))
            }
            (Some(st), None) if is_active(st) => {
                (if st == "PENDING" { "pending" } else { "running" }.to_string(), None)
            }
            (_, Some(r)) => (r.status.to_string(), r.error.clone()),
            (Some(st), None) => {
                let why = shared_problem.clone().unwrap_or_else(|| {
                    format!("job {key} ended {} before its run was recorded; see its log", st.to_lowercase())
                });
                ("failed".to_string(), Some(why))
            }
            (None, None) => match row {
                // The job is forgotten by SLURM; an older row is all there is.
                Some(r) => (r.status.to_string(), r.error.clone()),
                None => (
                    "unknown".to_string(),
                    Some(format!("SLURM no longer knows job {key} and the run never reached the database")),
                ),
            },
        };
        out.push(RunState {
            run: name.clone(),
            status,
            job: Some(key.clone()),
            log: Some(log.clone()),
            run_id: this_row.map(|r| r.id),
            error,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn launcher_block_is_checked_key_by_key() {
        let ok = LauncherConfig::from_json(
            &serde_json::json!({"kind": "slurm", "cpus": 2, "parallelism": 4, "extra": ["--qos=short"]}),
        )
        .unwrap();
        assert!(ok.is_slurm());
        assert_eq!(ok.sbatch_lines(), vec!["--cpus-per-task=2", "--qos=short"]);
        let e = LauncherConfig::from_json(&serde_json::json!({"kind": "slurm", "partitoin": "gpu"})).unwrap_err();
        assert!(e.contains("unknown field `partitoin`") && e.contains("partition"), "{e}");
        assert!(LauncherConfig::from_json(&serde_json::json!({"kind": "pbs"})).unwrap_err().contains("launcher.kind"));
        assert!(LauncherConfig::from_json(&serde_json::json!({"cpus": 0})).unwrap_err().contains("launcher.cpus"));
        assert!(
            LauncherConfig::from_json(&serde_json::json!({"extra": ["a\nb"]}))
                .unwrap_err()
                .contains("launcher.extra.0")
        );
    }

    #[test]
    fn quoting() {
        assert_eq!(shell_quote("/a/b-c.json"), "/a/b-c.json");
        assert_eq!(shell_quote("/a b/it's"), r"'/a b/it'\''s'");
    }

    fn launch(shared: &[(&str, &str)], array: (&str, &[&str])) -> Launch {
        Launch {
            id: "x".into(),
            experiment: "e".into(),
            compile: CompileArgs::default(),
            cache: "/c".into(),
            cwd: "/".into(),
            dir: "/logs".into(),
            jobs_per_task: 1,
            shared: shared
                .iter()
                .map(|(s, id)| LaunchedShared {
                    run: "r".into(),
                    stage: s.to_string(),
                    job_id: id.to_string(),
                    log: format!("/logs/shared-{s}-{id}.out").into(),
                })
                .collect(),
            array: Some(LaunchedArray {
                job_id: array.0.into(),
                runs: array.1.iter().map(|s| s.to_string()).collect(),
            }),
            submitted_at: "t".into(),
        }
    }

    #[test]
    fn states_merge_the_queue_and_the_database() {
        let l = launch(&[("source", "10")], ("11", &["a", "b", "c", "d", "e"]));
        let jobs: BTreeMap<String, String> = [
            ("10", "COMPLETED"),
            ("11_0", "COMPLETED"),
            ("11_1", "FAILED"),
            ("11_2", "RUNNING"),
            ("11_3", "CANCELLED"),
            ("11_4", "PENDING"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let row = |id: i64, name: &str, status: huse_store::RunStatus, log: &str, error: Option<&str>| DbRun {
            id,
            experiment: "e".into(),
            name: name.into(),
            status,
            started_at: String::new(),
            ended_at: None,
            duration_s: None,
            point: String::new(),
            seed: 0,
            device: "cpu".into(),
            git_commit: None,
            error: error.map(String::from),
            host: None,
            pid: None,
            log: Some(log.into()),
        };
        let db = vec![
            row(1, "a", huse_store::RunStatus::Succeeded, "/logs/run-11_0.out", None),
            row(2, "b", huse_store::RunStatus::Failed, "/logs/run-11_1.out", Some("stage `x` failed")),
        ];
        let names: Vec<String> = ["a", "b", "c", "d", "e", "f"].iter().map(|s| s.to_string()).collect();
        let s = run_states(&names, &[l], &jobs, &db);
        let st: Vec<&str> = s.iter().map(|r| r.status.as_str()).collect();
        assert_eq!(st, ["succeeded", "failed", "running", "cancelled", "pending", "missing"]);
        assert_eq!(s[1].log.as_deref(), Some(Path::new("/logs/run-11_1.out")));
        assert_eq!(s[1].error.as_deref(), Some("stage `x` failed"));
    }

    #[test]
    fn a_failed_shared_job_fails_its_runs_with_its_log() {
        let l = launch(&[("source", "10")], ("11", &["a"]));
        let jobs: BTreeMap<String, String> =
            [("10", "FAILED"), ("11_*", "CANCELLED")].iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let s = run_states(&["a".to_string()], std::slice::from_ref(&l), &jobs, &[]);
        assert_eq!(s[0].status, "failed", "SLURM cancels the dependants of a failed job; the cause is the shared job");
        let jobs: BTreeMap<String, String> =
            [("10", "FAILED"), ("11_0", "FAILED")].iter().map(|(a, b)| (a.to_string(), b.to_string())).collect();
        let s = run_states(&["a".to_string()], &[l], &jobs, &[]);
        assert_eq!(s[0].status, "failed");
        assert!(
            s[0].error.as_deref().unwrap().contains("shared stage `source` failed (log /logs/shared-source-10.out)"),
            "{:?}",
            s[0].error
        );
    }
}
