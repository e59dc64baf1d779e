//! `huse-exec`: the scheduler and the stage cache of `huse-run`.
//!
//! [`execute`] turns the runs of a compiled experiment into cache-keyed jobs and runs
//! them. Every (run, stage) gets a cache key ([`cache::KeyParts`]); equal keys are one job,
//! so upstream stages that several sweep runs share are computed once. Jobs run on tokio
//! as soon as their inputs are ready, at most `--jobs` at a time; stage code runs on
//! blocking threads so it never stalls the runtime. A stage's inputs are wired along the
//! edges the compiled experiment resolved. A failed stage skips its dependants;
//! cancellation (Ctrl-C) stops running stages through their `CancelToken`, and their
//! temporary outputs are removed. Runs, stage runs and metrics are recorded through
//! [`huse_store::Store`]; outputs live in the [`cache::Cache`]; [`progress`] draws the bars.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use anyhow::Result;
use huse_stage_api::{CancelToken, Context, Decision, DeviceSpec, Inputs, MetricLogger, StageError};
use tokio::sync::{Semaphore, mpsc, watch};
use tracing::{info, warn};

pub mod cache;
pub mod progress;

use cache::{Cache, KeyParts, Manifest, MetricRecord};
use huse_config::{Edge, Experiment};
use huse_registry::{Entry, Registry};
use huse_store::{self as store, MetricRow, RunStatus, StageRunRow, StageStatus, Store};
use progress::Display;

/// How to run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Stages run at most this many at a time (across the whole sweep).
    pub jobs: usize,
    /// Stage names to recompute even when cached.
    pub force: Vec<String>,
    /// Recompute everything (and refresh the cache).
    pub no_cache: bool,
    /// Check the content hash of every cached output before using it (not only its size).
    pub verify: bool,
    /// The log file of this invocation when it runs as a cluster job (recorded with its runs).
    pub run_log: Option<String>,
    /// Threads of every stage (`--threads-per-job`); None: shared out of the CPU count (see [`Cores`]).
    pub threads_per_job: Option<usize>,
    /// Stages that may compute on one GPU at the same time (`--gpu-slots`, at least 1).
    pub gpu_slots: usize,
    /// The GPU that `device: auto` means in this build on this machine (None: the CPU).
    pub auto_gpu: Option<usize>,
    /// A study's pruner, asked at the end of each step a stage reports (None: never stop).
    pub pruner: Option<Arc<dyn Pruner>>,
}

/// A study's pruner: whether a run goes on after a step its stage reported
/// ([`MetricLogger::report`]), judged from the metrics the stage logged at that step. The
/// runner's study loop implements it; stages and the executor know nothing of its rule.
pub trait Pruner: Send + Sync + std::fmt::Debug {
    /// Whether run `run_id` goes on after `step`, given the values logged at that step.
    fn keep(&self, run_id: i64, step: i64, values: &BTreeMap<String, f64>) -> bool;
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            jobs: 1,
            force: Vec::new(),
            no_cache: false,
            verify: false,
            run_log: None,
            threads_per_job: None,
            gpu_slots: 1,
            auto_gpu: None,
            pruner: None,
        }
    }
}

impl RunOptions {
    /// What job `entry` with `device` competes for (see [`Cores`]).
    fn class(&self, entry: &Entry, device: DeviceSpec) -> Class {
        if entry.stage.light() {
            return Class::Light;
        }
        match (entry.stage.uses_device(), device) {
            (true, DeviceSpec::Cuda(n)) => Class::Gpu(n),
            (true, DeviceSpec::Auto) => self.auto_gpu.map_or(Class::Cpu, Class::Gpu),
            _ => Class::Cpu,
        }
    }
}

/// What a job competes for while it runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Class {
    /// A light stage ([`huse_stage_api::Stage::light`]): one thread, never counted.
    Light,
    /// A stage computing on the CPU: a share of the cores.
    Cpu,
    /// A stage computing on GPU N ([`huse_stage_api::Stage::uses_device`] with a CUDA
    /// device): one of that GPU's slots, and a share of the cores for its host-side work.
    Gpu(usize),
}

/// The machine's cores and GPU slots, shared among the stages that run at the same time.
/// Every stage runs in a rayon pool of its budget ([`Context::threads`]). Without
/// `--threads-per-job`, a stage holds as many core tokens as threads, so the running stages
/// never have more threads than the machine has cores: a light stage gets 1; another gets
/// `cores / min(jobs, stages competing)` (at least 1), waiting for that many tokens, where the
/// stages competing are the CPU stages ready or running plus, per GPU, the GPU stages ready or
/// running up to its slot count (the others wait for a slot, not for cores). One run's
/// encode thus gets every core (the graph stage beside it is light), a sweep's trainings
/// split them (`--jobs 2` on 2 cores: 1 thread each), and 12 trainings on one GPU with 4
/// slots run 4 at a time with a quarter of the cores each.
///
/// A job counts as ready from the moment its last upstream job succeeds: that job counts
/// its dependants before it tells them (and the jobs without upstreams are counted before
/// any starts), so stages that become ready together are all counted before any of them
/// works out its share.
pub struct Cores {
    total: usize,
    jobs: usize,
    fixed: Option<usize>,
    tokens: Arc<Semaphore>,
    /// CPU stages ready or running.
    ready: std::sync::atomic::AtomicUsize,
    /// Slots per GPU, and per GPU index: its slots, its stages ready or running.
    slots: usize,
    gpus: Vec<(Arc<Semaphore>, std::sync::atomic::AtomicUsize)>,
    /// Per job: what it competes for, and whether it is counted as ready now.
    class: Vec<Class>,
    counted: Vec<AtomicBool>,
}

/// What a running stage holds: its threads, and the core tokens and GPU slot it keeps
/// until it ends.
struct Budget {
    threads: usize,
    _cores: Option<tokio::sync::OwnedSemaphorePermit>,
    _slot: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Cores {
    /// `total` cores for at most `jobs` stages at a time, `slots` stages at a time per GPU,
    /// for jobs of the given classes; `fixed` threads each if given.
    pub fn new(total: usize, jobs: usize, fixed: Option<usize>, slots: usize, class: Vec<Class>) -> Cores {
        let total = total.max(1);
        let slots = slots.max(1);
        let n_gpus =
            class.iter().filter_map(|c| if let Class::Gpu(g) = c { Some(g + 1) } else { None }).max().unwrap_or(0);
        Cores {
            total,
            jobs: jobs.max(1),
            fixed,
            tokens: Arc::new(Semaphore::new(total)),
            ready: Default::default(),
            slots,
            gpus: (0..n_gpus).map(|_| (Arc::new(Semaphore::new(slots)), Default::default())).collect(),
            counted: class.iter().map(|_| AtomicBool::new(false)).collect(),
            class,
        }
    }

    /// The CPU count this process may use (affinity and cgroup limits included).
    pub fn available() -> usize {
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
    }

    /// The ready counter of job `ji`, if it has one (light stages have none).
    fn counter(&self, ji: usize) -> Option<&std::sync::atomic::AtomicUsize> {
        match self.class[ji] {
            Class::Light => None,
            Class::Cpu => Some(&self.ready),
            Class::Gpu(g) => Some(&self.gpus[g].1),
        }
    }

    /// Counts job `ji` as ready (once; light stages are not counted).
    fn count(&self, ji: usize) {
        if let Some(c) = self.counter(ji)
            && !self.counted[ji].swap(true, std::sync::atomic::Ordering::SeqCst)
        {
            c.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Uncounts job `ji` when the guard drops (it ended, found its output cached, or was skipped).
    fn guard(&self, ji: usize) -> ReadyGuard<'_> {
        ReadyGuard(self, ji)
    }

    /// The stages competing for the cores now (see [`Cores`]).
    fn competing(&self) -> usize {
        let load = |a: &std::sync::atomic::AtomicUsize| a.load(std::sync::atomic::Ordering::SeqCst);
        load(&self.ready) + self.gpus.iter().map(|(_, r)| load(r).min(self.slots)).sum::<usize>()
    }

    /// A GPU slot for job `ji` if it computes on a GPU (waits for one); None for the others.
    async fn slot(&self, ji: usize) -> Result<Option<tokio::sync::OwnedSemaphorePermit>, ()> {
        match self.class[ji] {
            Class::Gpu(g) => self.gpus[g].0.clone().acquire_owned().await.map(Some).map_err(|_| ()),
            _ => Ok(None),
        }
    }

    /// The budget of job `ji` about to start, with the core tokens it holds while it runs
    /// (its GPU slot, if any, is taken before: see [`Cores::slot`]).
    async fn budget(&self, ji: usize, slot: Option<tokio::sync::OwnedSemaphorePermit>) -> Option<Budget> {
        if let Some(n) = self.fixed {
            return Some(Budget { threads: n.max(1), _cores: None, _slot: slot });
        }
        let n = if self.class[ji] == Class::Light { 1 } else { self.share(self.competing()) };
        let permit = self.tokens.clone().acquire_many_owned(n as u32).await.ok()?;
        Some(Budget { threads: n, _cores: Some(permit), _slot: slot })
    }

    /// Threads for a heavy stage when `ready` heavy stages compete.
    pub fn share(&self, ready: usize) -> usize {
        (self.total / self.jobs.min(ready.max(1))).max(1)
    }
}

struct ReadyGuard<'a>(&'a Cores, usize);
impl Drop for ReadyGuard<'_> {
    fn drop(&mut self) {
        if self.0.counted[self.1].swap(false, std::sync::atomic::Ordering::SeqCst)
            && let Some(c) = self.0.counter(self.1)
        {
            c.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        }
    }
}

/// What [`execute`] reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The end state of each run.
    pub runs: Vec<RunOutcome>,
    /// Set when some results could not be written to the database (they are spooled, or,
    /// if even that failed, lost): the invocation must not exit 0.
    pub results_incomplete: Option<String>,
}

/// The end state of one run.
#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// Run id in the database.
    pub id: i64,
    /// Run name.
    pub name: String,
    /// How it ended.
    pub status: RunStatus,
    /// The first failure or interruption.
    pub error: Option<String>,
    /// Stages computed for this run.
    pub computed: usize,
    /// Stages taken from the cache (or from another run of this invocation).
    pub cached: usize,
}

/// One unit of work: a stage with one plan key, used by one or more runs. Its cache key
/// is known once its inputs are: it hashes their content ([`Job::parts`]).
struct Job {
    /// The plan key: the key parts with the upstream *plan* keys in place of input content;
    /// equal plan keys mean equal work within one invocation.
    key: String,
    kind: String,
    entry: Entry,
    config: serde_json::Value,
    seed: u64,
    device: DeviceSpec,
    /// (stage name in `needs`, job index)
    needs: Vec<(String, usize)>,
    /// Where each input comes from (artifact, upstream stage name).
    inputs: Vec<Edge>,
    /// (path, identity) of the files outside the cache the stage reads.
    files: Vec<(String, String)>,
    /// (run index, stage name)
    users: Vec<(usize, String)>,
    force: bool,
}

impl Job {
    /// The job index of the upstream stage an input edge comes from.
    fn dep(&self, e: &Edge) -> usize {
        self.needs.iter().find(|(n, _)| *n == e.from).expect("an edge comes from a need").1
    }

    /// The key parts, given the content hashes of the inputs (in edge order).
    fn parts(&self, inputs: Vec<(String, String)>) -> KeyParts<'_> {
        KeyParts {
            kind: &self.kind,
            version: self.entry.stage.version(),
            source: &self.entry.source,
            config: &self.config,
            inputs,
            seed: self.entry.stage.uses_seed_for(&self.config).then_some(self.seed),
            files: self.files.clone(),
        }
    }
}

/// A finished job's output: where, its cache key, and the content hash of each output.
#[derive(Debug, Clone)]
struct Output {
    dir: PathBuf,
    key: String,
    /// Each output's recorded size and hash, from the entry's manifest.
    records: HashMap<String, cache::OutputRecord>,
}

/// Counts the runs of a sweep whose jobs have all ended, for `run k of N`.
struct RunsDone {
    progress: Option<progress::RunsProgress>,
    run_jobs: Vec<Vec<usize>>,
    names: Vec<String>,
    counted: Vec<std::sync::atomic::AtomicBool>,
    done: std::sync::atomic::AtomicUsize,
}

impl RunsDone {
    /// After `job` ended: each run it belongs to whose jobs have now all ended is counted once.
    fn job_ended(&self, job: &Job, receivers: &[watch::Receiver<State>]) {
        use std::sync::atomic::Ordering;
        let Some(progress) = &self.progress else { return };
        for (ri, _) in &job.users {
            let ended = self.run_jobs[*ri].iter().all(|j| receivers[*j].borrow().is_final());
            if ended && !self.counted[*ri].swap(true, Ordering::SeqCst) {
                let k = self.done.fetch_add(1, Ordering::SeqCst) + 1;
                let failed = self.run_jobs[*ri].iter().any(|j| !matches!(*receivers[*j].borrow(), State::Done { .. }));
                progress.run_ended(k, &self.names[*ri], !failed);
            }
        }
    }
}

#[derive(Debug, Clone)]
enum State {
    Pending,
    Done {
        out: Output,
        cached: bool,
        started: Option<String>,
        ended: Option<String>,
        secs: Option<f64>,
    },
    Failed(String),
    Skipped(String),
    Interrupted,
    /// Stopped by the study's pruner after this step.
    Pruned(i64),
}

impl State {
    fn is_final(&self) -> bool {
        !matches!(self, State::Pending)
    }
}

/// Plans the jobs of every run (cache keys, sharing). No side effects beyond reading inputs.
fn plan(
    exp: &Experiment,
    registry: &Registry,
    opts: &RunOptions,
    identity: &dyn Fn(&Path) -> Result<String>,
) -> Result<(Vec<Job>, Vec<Vec<usize>>)> {
    let mut jobs: Vec<Job> = Vec::new();
    let mut by_key: HashMap<String, usize> = HashMap::new();
    let mut identities: HashMap<PathBuf, String> = HashMap::new();
    let mut run_jobs = Vec::new();
    for (ri, run) in exp.runs.iter().enumerate() {
        let mut stage_job: HashMap<&str, usize> = HashMap::new();
        let mut this_run = Vec::new();
        for s in &run.stages {
            let entry = registry.get(&s.kind).expect("validated").clone();
            let needs: Vec<(String, usize)> = s.needs.iter().map(|n| (n.clone(), stage_job[n.as_str()])).collect();
            let mut files = Vec::new();
            for p in entry.stage.reads(&s.config) {
                let id = match identities.get(&p) {
                    Some(id) => id.clone(),
                    None => {
                        let id = identity(&p)?;
                        identities.insert(p.clone(), id.clone());
                        id
                    }
                };
                files.push((p.display().to_string(), id));
            }
            let plan_inputs: Vec<(String, String)> =
                needs.iter().map(|(n, j)| (n.clone(), jobs[*j].key.clone())).collect();
            let key = KeyParts {
                kind: &s.kind,
                version: entry.stage.version(),
                source: &entry.source,
                config: &s.config,
                inputs: plan_inputs,
                seed: entry.stage.uses_seed_for(&s.config).then_some(run.seed),
                files: files.clone(),
            }
            .key();
            let ji = *by_key.entry(key.clone()).or_insert_with(|| {
                jobs.push(Job {
                    key: key.clone(),
                    kind: s.kind.clone(),
                    entry: entry.clone(),
                    config: s.config.clone(),
                    seed: run.seed,
                    device: run.device,
                    needs: needs.clone(),
                    inputs: s.inputs.clone(),
                    files,
                    users: Vec::new(),
                    force: false,
                });
                jobs.len() - 1
            });
            jobs[ji].users.push((ri, s.name.clone()));
            jobs[ji].force |= opts.no_cache || opts.force.contains(&s.name);
            stage_job.insert(&s.name, ji);
            this_run.push(ji);
        }
        run_jobs.push(this_run);
    }
    Ok((jobs, run_jobs))
}

/// The label of an input in the key parts: `stage/artifact`.
fn input_label(e: &Edge) -> String {
    format!("{}/{}", e.from, e.artifact)
}

/// The cache key of every (run, stage) of `exp`, as (run name, stage name, key), with the
/// identity of read files given by `identity` and the content hash of an upstream output
/// given by `output_hash(upstream cache key, artifact)` (tests use stand-ins for both, to
/// get keys that do not depend on the machine's files).
pub fn cache_keys(
    exp: &Experiment,
    registry: &Registry,
    identity: &dyn Fn(&Path) -> Result<String>,
    output_hash: &dyn Fn(&str, &str) -> String,
) -> Result<Vec<(String, String, String)>> {
    let opts = RunOptions::default();
    let (jobs, run_jobs) = plan(exp, registry, &opts, identity)?;
    // Jobs come in dependency order: every need has a lower index.
    let mut keys: Vec<String> = Vec::with_capacity(jobs.len());
    for job in &jobs {
        let inputs = job.inputs.iter().map(|e| (input_label(e), output_hash(&keys[job.dep(e)], &e.artifact))).collect();
        keys.push(job.parts(inputs).key());
    }
    let mut out = Vec::new();
    for (ri, run) in exp.runs.iter().enumerate() {
        for (si, ji) in run_jobs[ri].iter().enumerate() {
            out.push((run.name.clone(), run.stages[si].name.clone(), keys[*ji].clone()));
        }
    }
    Ok(out)
}

/// What a launcher needs to know before submitting anything: the distinct stage jobs of
/// an experiment, which runs use each, and which are already in the cache.
#[derive(Debug, Clone)]
pub struct Survey {
    /// Distinct stage jobs, in dependency order (every need has a lower index).
    pub jobs: Vec<SurveyJob>,
    /// For each run, its stages' job indices in the run's stage order.
    pub run_jobs: Vec<Vec<usize>>,
}

/// One distinct stage job of a [`Survey`].
#[derive(Debug, Clone)]
pub struct SurveyJob {
    /// (run index, stage name) of every run that uses it; the first is the one whose
    /// stages a launcher runs to compute it.
    pub users: Vec<(usize, String)>,
    /// Job indices of its upstream stages.
    pub needs: Vec<usize>,
    /// Its output is in the cache (and so is every input it was computed from). Unknown
    /// (false) below a stage that is not cached: its key depends on content not yet computed.
    pub cached: bool,
}

impl Survey {
    /// Whether every stage of run `ri` is cached.
    pub fn run_cached(&self, ri: usize) -> bool {
        self.run_jobs[ri].iter().all(|j| self.jobs[*j].cached)
    }
}

/// Plans `exp` as [`execute`] would and looks each job up in the cache (sizes checked,
/// no hashing), without running or recording anything.
pub fn survey(exp: &Experiment, registry: &Registry, cache: &Cache, opts: &RunOptions) -> Result<Survey> {
    let (jobs, run_jobs) = plan(exp, registry, opts, &cache::identity)?;
    let mut outputs: Vec<Option<HashMap<String, cache::OutputRecord>>> = Vec::with_capacity(jobs.len());
    let mut out = Vec::with_capacity(jobs.len());
    for job in &jobs {
        // The input hashes, known when every upstream output is cached.
        let inputs: Option<Vec<(String, String)>> = job
            .inputs
            .iter()
            .map(|e| outputs[job.dep(e)].as_ref()?.get(&e.artifact).map(|r| (input_label(e), r.blake3.clone())))
            .collect();
        let hit = match inputs {
            Some(inputs) if !job.force && job.needs.iter().all(|(_, d)| outputs[*d].is_some()) => {
                let key = job.parts(inputs).key();
                match cache.check(&job.kind, &key, false) {
                    Ok(Some((_, m))) => Some(records_of(m)),
                    _ => None,
                }
            }
            _ => None,
        };
        out.push(SurveyJob {
            users: job.users.clone(),
            needs: job.needs.iter().map(|(_, d)| *d).collect(),
            cached: hit.is_some(),
        });
        outputs.push(hit);
    }
    Ok(Survey { jobs: out, run_jobs })
}

struct Metrics {
    tx: mpsc::UnboundedSender<Vec<MetricRow>>,
    users: Vec<(i64, String)>,
    records: Mutex<Vec<MetricRecord>>,
    pruner: Option<Arc<dyn Pruner>>,
}

impl MetricLogger for Metrics {
    fn log(&self, key: &str, step: i64, value: f64) {
        self.records.lock().unwrap().push(MetricRecord { key: key.to_string(), step, value });
        let rows = self
            .users
            .iter()
            .map(|(run_id, stage)| MetricRow {
                run_id: *run_id,
                stage: stage.clone(),
                key: key.to_string(),
                step,
                value,
            })
            .collect();
        let _ = self.tx.send(rows);
    }

    fn report(&self, step: i64) -> Decision {
        let Some(pruner) = &self.pruner else { return Decision::Continue };
        let values: BTreeMap<String, f64> =
            self.records.lock().unwrap().iter().filter(|r| r.step == step).map(|r| (r.key.clone(), r.value)).collect();
        // A job shared by several runs goes on while one of them should.
        if self.users.iter().any(|(run, _)| pruner.keep(*run, step, &values)) {
            Decision::Continue
        } else {
            Decision::Stop
        }
    }
}

/// Writes metric batches as they arrive, many rows per transaction; a batch the database
/// cannot take is spooled by the store. Returns an error only if rows could not even be
/// spooled.
async fn metric_writer(store: Store, mut rx: mpsc::UnboundedReceiver<Vec<MetricRow>>) -> Option<String> {
    let mut lost = None;
    while let Some(mut batch) = rx.recv().await {
        while batch.len() < 5000 {
            match rx.try_recv() {
                Ok(more) => batch.extend(more),
                Err(_) => break,
            }
        }
        if let Err(e) = store.insert_metrics(&batch).await {
            warn!("could not store or spool {} metric rows: {e:#}", batch.len());
            lost.get_or_insert_with(|| {
                format!("{} metric rows could be neither written nor spooled: {e:#}", batch.len())
            });
        }
    }
    lost
}

fn git_commit(file: &Path) -> Option<String> {
    let dir = file.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let out = std::process::Command::new("git").arg("-C").arg(dir).args(["rev-parse", "HEAD"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let mut commit = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let dirty = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .ok()
        .is_some_and(|o| !o.stdout.is_empty());
    if dirty {
        commit.push_str("-dirty");
    }
    Some(commit)
}

/// Runs every run of `exp`, recording them in `store`. Returns the outcome of each run.
pub async fn execute(
    exp: &Experiment,
    registry: &Registry,
    store: &Store,
    cache: &Cache,
    opts: &RunOptions,
    display: &Display,
    cancel: &CancelToken,
) -> Result<Outcome> {
    let (jobs, run_jobs) = plan(exp, registry, opts, &cache::identity)?;
    cache.sweep_stale_temps();
    let commit = git_commit(&exp.file);
    let exp_id = store.experiment(&exp.name, &exp.file.display().to_string()).await?;
    let mut run_ids = Vec::new();
    for run in &exp.runs {
        let row = store::Run {
            git_commit: commit.clone(),
            log: opts.run_log.clone(),
            ..store::Run::starting(&exp.name, &run.name, &run.point, run.seed, &run.device.to_string())
        };
        run_ids.push(store.insert_run(exp_id, &row, &run.resolved_yaml, &run.params).await?);
    }
    info!(
        "experiment `{}`: {} run(s), {} distinct stage job(s), up to {} at a time",
        exp.name,
        exp.runs.len(),
        jobs.len(),
        opts.jobs
    );

    let (mtx, mrx) = mpsc::unbounded_channel();
    let writer = tokio::spawn(metric_writer(store.clone(), mrx));
    let sem = Arc::new(Semaphore::new(opts.jobs.max(1)));
    let classes = jobs.iter().map(|j| opts.class(&j.entry, j.device)).collect();
    let cores = Arc::new(Cores::new(Cores::available(), opts.jobs, opts.threads_per_job, opts.gpu_slots, classes));
    // Jobs without upstream jobs are ready from the start: counted before any task runs.
    for (ji, job) in jobs.iter().enumerate() {
        if job.needs.is_empty() {
            cores.count(ji);
        }
    }
    let mut dependants: Vec<Vec<usize>> = vec![Vec::new(); jobs.len()];
    for (ji, job) in jobs.iter().enumerate() {
        for (_, d) in &job.needs {
            dependants[*d].push(ji);
        }
    }
    let dependants = Arc::new(dependants);
    let channels: Vec<(watch::Sender<State>, watch::Receiver<State>)> =
        jobs.iter().map(|_| watch::channel(State::Pending)).collect();
    let receivers: Vec<watch::Receiver<State>> = channels.iter().map(|(_, r)| r.clone()).collect();
    let many_runs = exp.runs.len() > 1;
    let jobs: Vec<Arc<Job>> = jobs.into_iter().map(Arc::new).collect();
    let verified: Arc<Mutex<HashSet<PathBuf>>> = Arc::default();

    let mut tasks = tokio::task::JoinSet::new();
    let (shared_jobs, shared_rx) = (Arc::new(jobs.clone()), Arc::new(receivers.clone()));
    // The sweep as a whole: `run k of N` as each run's last job ends.
    let sweep = Arc::new(RunsDone {
        progress: many_runs.then(|| display.runs(exp.runs.len() as u64)),
        run_jobs: run_jobs.clone(),
        names: exp.runs.iter().map(|r| r.name.clone()).collect(),
        counted: (0..exp.runs.len()).map(|_| std::sync::atomic::AtomicBool::new(false)).collect(),
        done: std::sync::atomic::AtomicUsize::new(0),
    });
    for (ji, (tx, _)) in channels.into_iter().enumerate() {
        let job = jobs[ji].clone();
        let deps: Vec<(String, watch::Receiver<State>)> =
            job.needs.iter().map(|(n, d)| (n.clone(), receivers[*d].clone())).collect();
        let users: Vec<(i64, String)> = job.users.iter().map(|(ri, s)| (run_ids[*ri], s.clone())).collect();
        let label = {
            let (ri, stage) = &job.users[0];
            if many_runs { format!("{}:{stage}", exp.runs[*ri].name) } else { stage.clone() }
        };
        let (store, cache, sem, cores, cancel, display, mtx, verify, verified) = (
            store.clone(),
            cache.clone(),
            sem.clone(),
            cores.clone(),
            cancel.clone(),
            display.clone(),
            mtx.clone(),
            opts.verify,
            verified.clone(),
        );
        let pruner = opts.pruner.clone();
        let (all_jobs, receivers, dependants) = (shared_jobs.clone(), shared_rx.clone(), dependants.clone());
        let sweep = sweep.clone();
        tasks.spawn(async move {
            let state = run_job(
                ji, &job, deps, &users, &label, &cache, &sem, &cores, &cancel, &display, mtx, verify, &verified, pruner,
            )
            .await;
            let lost = record(&store, &job, &users, &state).await;
            if matches!(state, State::Done { .. }) {
                // Count the dependants this success makes ready before telling them.
                for &d in &dependants[ji] {
                    let others_done = all_jobs[d]
                        .needs
                        .iter()
                        .all(|(_, n)| *n == ji || matches!(*receivers[*n].borrow(), State::Done { .. }));
                    if others_done {
                        cores.count(d);
                    }
                }
            }
            let _ = tx.send(state);
            sweep.job_ended(&job, &receivers);
            lost
        });
    }
    drop(mtx);
    let mut lost: Option<String> = None;
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok(Some(e)) => {
                lost.get_or_insert(e);
            }
            Ok(None) => {}
            Err(e) => warn!("a job task ended abnormally: {e}"),
        }
    }
    if let Ok(Some(e)) = writer.await {
        lost.get_or_insert(e);
    }

    // Final status of every run.
    let mut outcomes = Vec::new();
    for (ri, run) in exp.runs.iter().enumerate() {
        let mut status = RunStatus::Succeeded;
        let mut error = None;
        let (mut computed, mut cached) = (0, 0);
        for (si, ji) in run_jobs[ri].iter().enumerate() {
            let stage = &run.stages[si].name;
            match &*receivers[*ji].borrow() {
                State::Done { cached: c, .. } => {
                    let first_user = jobs[*ji].users[0].0 == ri;
                    if *c || !first_user { cached += 1 } else { computed += 1 }
                }
                State::Failed(e) => {
                    if status != RunStatus::Failed {
                        error = Some(format!("stage `{stage}` failed: {e}"));
                    }
                    status = RunStatus::Failed;
                }
                State::Pruned(step) => {
                    if status == RunStatus::Succeeded {
                        status = RunStatus::Pruned;
                        error = Some(format!("stage `{stage}` pruned after step {step}"));
                    }
                }
                State::Interrupted | State::Pending => {
                    if status == RunStatus::Succeeded {
                        status = RunStatus::Interrupted;
                        error = Some(format!("interrupted during or before stage `{stage}`"));
                    }
                }
                State::Skipped(_) => {}
            }
        }
        if let Err(e) = store.finish_run(run_ids[ri], status, error.as_deref()).await {
            lost.get_or_insert(format!(
                "the final status of run {} could be neither written nor spooled: {e:#}",
                run_ids[ri]
            ));
        }
        outcomes.push(RunOutcome { id: run_ids[ri], name: run.name.clone(), status, error, computed, cached });
    }
    // Whatever the database could not take is spooled: retry it now, for a while.
    let mut results_incomplete = lost;
    if let Err(e) = store.drain().await {
        let reason = format!("{e:#}");
        warn!("{reason}");
        if let Err(e2) = store.mark_incomplete(&run_ids, &reason).await {
            warn!("could not mark the runs failed either: {e2:#}");
        }
        results_incomplete.get_or_insert(reason);
    }
    Ok(Outcome { runs: outcomes, results_incomplete })
}

#[allow(clippy::too_many_arguments)]
async fn run_job(
    ji: usize,
    job: &Job,
    deps: Vec<(String, watch::Receiver<State>)>,
    users: &[(i64, String)],
    label: &str,
    cache: &Cache,
    sem: &Arc<Semaphore>,
    cores: &Cores,
    cancel: &CancelToken,
    display: &Display,
    mtx: mpsc::UnboundedSender<Vec<MetricRow>>,
    verify: bool,
    verified: &Mutex<HashSet<PathBuf>>,
    pruner: Option<Arc<dyn Pruner>>,
) -> State {
    let _ready = cores.guard(ji);
    let mut ups: HashMap<String, Output> = HashMap::new();
    for (need, mut rx) in deps {
        let state = match rx.wait_for(State::is_final).await {
            Ok(s) => s.clone(),
            Err(_) => State::Interrupted,
        };
        match state {
            State::Done { out, .. } => {
                ups.insert(need, out);
            }
            State::Failed(_) | State::Skipped(_) => {
                return State::Skipped(format!("upstream stage `{need}` did not succeed"));
            }
            State::Pruned(_) => return State::Skipped(format!("upstream stage `{need}` was pruned")),
            State::Interrupted | State::Pending => return State::Interrupted,
        }
    }
    // Ready from here on, until it ends or finds its output cached (normally counted
    // already by the upstream job that finished last).
    cores.count(ji);
    // The cache key hashes the content of the inputs, as their entries recorded it.
    let mut inputs = Inputs::default();
    let mut input_hashes = Vec::new();
    for e in &job.inputs {
        let up = &ups[&e.from];
        let Some(hash) = up.records.get(&e.artifact).map(|r| &r.blake3) else {
            return State::Failed(format!("upstream stage `{}` recorded no output `{}`", e.from, e.artifact));
        };
        inputs.insert(&e.artifact, &e.from, up.dir.join(&e.artifact));
        input_hashes.push((input_label(e), hash.clone()));
    }
    let parts = job.parts(input_hashes);
    let key = parts.key();
    if cancel.is_cancelled() {
        return State::Interrupted;
    }
    if !job.force {
        match cache.check(&job.kind, &key, verify) {
            Ok(Some((dir, m))) => {
                info!("{label}: cache hit ({}/{key})", job.kind);
                return State::Done {
                    out: Output { dir, key, records: records_of(m) },
                    cached: true,
                    started: None,
                    ended: None,
                    secs: None,
                };
            }
            Ok(None) => {}
            Err(bad) => {
                warn!("{label}: the cached entry {}/{key} is damaged ({bad}); recomputing it", job.kind);
                if let Err(e) = cache.remove(&job.kind, &key) {
                    return State::Failed(format!("removing the damaged entry {}/{key}: {e:#}", job.kind));
                }
            }
        }
    }
    // Before computing, make sure the inputs are what their entries recorded: a stage never
    // computes (and caches) a result from damaged input.
    // (Each file once per invocation: a sweep's trainings share the same encode outputs.)
    for e in &job.inputs {
        let path = ups[&e.from].dir.join(&e.artifact);
        let want = &ups[&e.from].records[&e.artifact].blake3;
        if verified.lock().unwrap().contains(&path) {
            continue;
        }
        let got = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || cache::content_hash(&path)).await
        };
        if matches!(&got, Ok(Ok(h)) if h == want) {
            verified.lock().unwrap().insert(path.clone());
        }
        match got {
            Ok(Ok(h)) if &h == want => {}
            Ok(Ok(_)) => {
                warn!(
                    "{label}: input `{}` from stage `{}` does not match its recorded hash; not computing from it",
                    e.artifact, e.from
                );
                return State::Failed(format!(
                    "input `{}` from stage `{}` ({}) no longer matches the hash recorded when it was written: the cached entry was changed or damaged. `huse-run cache verify` removes damaged entries; then run again",
                    e.artifact,
                    e.from,
                    path.display()
                ));
            }
            Ok(Err(err)) => return State::Failed(format!("input `{}` from stage `{}`: {err:#}", e.artifact, e.from)),
            Err(err) => return State::Failed(format!("hashing input `{}`: {err}", e.artifact)),
        }
    }
    // A GPU slot first (a job waiting for its GPU holds no job permit a CPU stage could
    // use), then a job permit, then the cores.
    let Ok(slot) = cores.slot(ji).await else { return State::Interrupted };
    let _permit = match sem.clone().acquire_owned().await {
        Ok(p) => p,
        Err(_) => return State::Interrupted,
    };
    let Some(budget) = cores.budget(ji, slot).await else { return State::Interrupted };
    let threads = budget.threads;
    if cancel.is_cancelled() {
        return State::Interrupted;
    }
    let why =
        if job.force { "forced".to_string() } else { cache.why_miss(&parts, tracing::enabled!(tracing::Level::DEBUG)) };
    let on_gpu = match cores.class[ji] {
        Class::Gpu(g) => format!(", a slot of GPU {g}"),
        _ => String::new(),
    };
    info!(
        "{label}: running {} (key {key}, {threads} thread{}{on_gpu}): {why}",
        job.kind,
        if threads == 1 { "" } else { "s" }
    );
    let tmp = match cache.temp_dir(&job.key) {
        Ok(t) => t,
        Err(e) => return State::Failed(format!("{e:#}")),
    };
    let work = match cache.work_dir(&job.key) {
        Ok(w) => w,
        Err(e) => return State::Failed(format!("{e:#}")),
    };
    let started = store::now();
    let clock = Instant::now();
    let metrics = Arc::new(Metrics { tx: mtx, users: users.to_vec(), records: Mutex::new(Vec::new()), pruner });
    let progress = Arc::new(display.stage(label));
    let result = {
        let (stage, config, tmp, work, cancel, metrics, progress) = (
            job.entry.stage.clone(),
            job.config.clone(),
            tmp.clone(),
            work.clone(),
            cancel.clone(),
            metrics.clone(),
            progress.clone(),
        );
        let (seed, device, name) = (job.seed, job.device, users[0].1.clone());
        tokio::task::spawn_blocking(move || {
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let ctx = Context {
                    name: &name,
                    device,
                    seed,
                    out_dir: &tmp,
                    work_dir: &work,
                    progress: progress.as_ref(),
                    metrics: metrics.as_ref(),
                    cancel: &cancel,
                    threads,
                };
                huse_stage_api::with_threads(threads, || stage.run(&ctx, &config, &inputs)).and_then(|r| r)
            }))
        })
        .await
    };
    progress.finish();
    let secs = clock.elapsed().as_secs_f64();
    let outcome: Result<(), String> = match result {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(StageError::Cancelled))) => {
            let _ = std::fs::remove_dir_all(&tmp);
            info!("{label}: cancelled");
            return State::Interrupted;
        }
        Ok(Ok(Err(StageError::Pruned(step)))) => {
            // Nothing is cached; the work directory (its checkpoints) stays for a later try.
            let _ = std::fs::remove_dir_all(&tmp);
            info!("{label}: pruned after step {step}");
            return State::Pruned(step);
        }
        Ok(Ok(Err(e))) => Err(e.to_string()),
        Ok(Err(panic)) => Err(format!(
            "stage panicked: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default()
        )),
        Err(e) => Err(format!("stage task failed: {e}")),
    };
    let finished = outcome.and_then(|()| {
        for out in job.entry.stage.outputs_for(&job.config) {
            if !tmp.join(&out.name).exists() {
                return Err(format!("stage did not write its declared output `{}`", out.name));
            }
        }
        let records = metrics.records.lock().unwrap().clone();
        let manifest = Manifest {
            schema: cache::MANIFEST_SCHEMA,
            kind: job.kind.clone(),
            version: job.entry.stage.version().to_string(),
            source: job.entry.source.clone(),
            key: key.clone(),
            config: job.config.clone(),
            seed: job.seed,
            uses_seed: job.entry.stage.uses_seed_for(&job.config),
            inputs: parts.inputs.clone(),
            files: job.files.clone(),
            created: started.clone(),
            seconds: secs,
            outputs: Vec::new(),
        };
        let names: Vec<String> = job.entry.stage.outputs_for(&job.config).into_iter().map(|o| o.name).collect();
        cache.finish(&tmp, &manifest, &names, &records, job.force).map_err(|e| format!("{e:#}"))
    });
    match finished.and_then(|dir| match cache.check(&job.kind, &key, false) {
        Ok(Some((_, m))) => Ok((dir, m)),
        Ok(None) => Err(format!("the entry {}/{key} vanished after it was written", job.kind)),
        Err(bad) => Err(format!("the entry {}/{key} is damaged right after it was written: {bad}", job.kind)),
    }) {
        Ok((dir, m)) => {
            cache.remove_work_dir(&job.key);
            info!("{label}: done in {secs:.2}s");
            State::Done {
                out: Output { dir, key, records: records_of(m) },
                cached: false,
                started: Some(started),
                ended: Some(store::now()),
                secs: Some(secs),
            }
        }
        Err(e) => {
            let _ = std::fs::remove_dir_all(&tmp);
            warn!("{label}: failed: {e}");
            State::Failed(e)
        }
    }
}

fn records_of(m: Manifest) -> HashMap<String, cache::OutputRecord> {
    m.outputs.into_iter().map(|o| (o.name.clone(), o)).collect()
}

/// Records the job's stage run for every run that uses it (and replays cached metrics).
/// Returns what could be neither written nor spooled, if anything.
async fn record(store: &Store, job: &Job, users: &[(i64, String)], state: &State) -> Option<String> {
    let mut lost = None;
    let mut replay = Vec::new();
    for (i, (run_id, stage)) in users.iter().enumerate() {
        let mut row = StageRunRow {
            run_id: *run_id,
            stage: stage.clone(),
            kind: job.kind.clone(),
            version: job.entry.stage.version().to_string(),
            source: job.entry.source.clone(),
            cache_key: match state {
                State::Done { out, .. } => out.key.clone(),
                _ => job.key.clone(),
            },
            cached: false,
            status: StageStatus::Succeeded,
            started_at: None,
            ended_at: None,
            duration_s: None,
            output_dir: None,
            error: None,
            artifacts: Vec::new(),
            summaries: Vec::new(),
            attachments: Vec::new(),
        };
        match state {
            State::Done { out: Output { dir, records, .. }, cached, started, ended, secs } => {
                row.cached = *cached || i > 0;
                if !row.cached {
                    (row.started_at, row.ended_at, row.duration_s) = (started.clone(), ended.clone(), *secs);
                }
                row.output_dir = Some(dir.display().to_string());
                for out in job.entry.stage.outputs_for(&job.config) {
                    let p = dir.join(&out.name);
                    let bytes = records.get(&out.name).map(|r| r.bytes as i64);
                    row.artifacts.push((out.name.clone(), p.display().to_string(), bytes));
                    if (out.summary || out.attachment)
                        && let Ok(text) = std::fs::read_to_string(&p)
                    {
                        if out.summary {
                            row.summaries.push((out.name.clone(), text))
                        } else {
                            row.attachments.push((out.name.clone(), text))
                        }
                    }
                }
                if *cached {
                    match cache::read_metrics(dir) {
                        Ok(ms) => replay.extend(ms.into_iter().map(|m| MetricRow {
                            run_id: *run_id,
                            stage: stage.clone(),
                            key: m.key,
                            step: m.step,
                            value: m.value,
                        })),
                        Err(e) => warn!("cached metrics of {}: {e:#}", dir.display()),
                    }
                }
            }
            State::Failed(e) => {
                row.status = StageStatus::Failed;
                row.error = Some(e.clone());
            }
            State::Skipped(why) => {
                row.status = StageStatus::Skipped;
                row.error = Some(why.clone());
            }
            State::Pruned(step) => {
                row.status = StageStatus::Pruned;
                row.error = Some(format!("pruned after step {step}"));
            }
            State::Interrupted | State::Pending => row.status = StageStatus::Interrupted,
        }
        if let Err(e) = store.insert_stage_run(&row).await {
            warn!("could not record or spool stage run {stage}: {e:#}");
            lost.get_or_insert(format!("the stage run `{stage}` could be neither written nor spooled: {e:#}"));
        }
    }
    if let Err(e) = store.insert_metrics(&replay).await {
        warn!("could not store or spool cached metrics: {e:#}");
        lost.get_or_insert(format!("{} cached metric rows could be neither written nor spooled: {e:#}", replay.len()));
    }
    lost
}
