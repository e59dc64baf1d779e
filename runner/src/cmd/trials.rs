//! The study loop of an adaptive search (`sampler: { kind: tpe }`): the experiment compiles
//! to one trial at a time, so the runner reads the study from the results database, asks
//! the search for the next trial with what has finished, runs it, and goes on until
//! `trials` have begun and ended. With `--jobs N`, N trials run at once, each on its share
//! of the cores, and a new one starts as soon as any ends (no batches). Rerunning the file
//! continues the study: finished trials are told, never rerun; a trial whose runs were
//! interrupted (Ctrl-C, a killed process) runs again under its own label, with its own
//! values, so none is lost and none is doubled. With `pruner: asha`, the executor asks
//! [`AshaPruner`] at the end of each epoch a stage reports whether the run goes on; a
//! stopped run is recorded `pruned` with the values of the epochs it ran; the sampler is told
//! it ranked below every complete trial (later epochs first), and it is not run again.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use huse_config::Experiment;
use huse_config::pruner::promotable;
use huse_config::search::{Asha, History, SearchRequest, SearchSpec, Told};
use huse_exec::cache::Cache;
use huse_exec::progress::Display;
use huse_exec::{self as exec, RunOptions};
use huse_stage_api::CancelToken;
use huse_store::{Filter, RunRow, RunStatus, Store};
use tracing::{error, info, warn};

use super::run::{RunArgs, spawn_signal_handler};
use super::{Global, compile_with, store_options};

/// What the database says of a study's trials.
#[derive(Debug, Default)]
struct Study {
    /// Every trial recorded (its point label).
    begun: BTreeSet<String>,
    /// The trials whose every seed succeeded with every objective logged.
    told: Vec<Told>,
    /// Trials to run again: interrupted (or cut short before all their seeds ran), with
    /// their recorded values.
    redo: Vec<(String, BTreeMap<String, String>)>,
}

/// The recorded trials: each point, in the order it began, with the latest run of each of
/// its run names.
pub(super) fn recorded_trials(rows: &[RunRow]) -> Vec<(&str, Vec<&RunRow>)> {
    let mut latest: BTreeMap<&str, &RunRow> = BTreeMap::new();
    for r in rows {
        if latest.get(r.name.as_str()).is_none_or(|x| x.id < r.id) {
            latest.insert(&r.name, r);
        }
    }
    let mut sorted: Vec<&RunRow> = latest.into_values().collect();
    sorted.sort_by_key(|r| r.id);
    let mut points: Vec<(&str, Vec<&RunRow>)> = Vec::new();
    for r in sorted {
        match points.iter_mut().find(|(p, _)| *p == r.point) {
            Some((_, runs)) => runs.push(r),
            None => points.push((&r.point, vec![r])),
        }
    }
    points
}

/// The study from the experiment's recorded runs (the latest run of each name). A trial
/// counts as running while one of its runs is running in a live process.
fn study_of(rows: &[RunRow], spec: &SearchSpec, seeds: usize) -> Study {
    let mut s = Study::default();
    for (point, runs) in recorded_trials(rows) {
        s.begun.insert(point.to_string());
        let values: BTreeMap<String, String> =
            spec.params.iter().filter_map(|k| runs[0].params.get(k).map(|v| (k.clone(), v.clone()))).collect();
        let count = |st: RunStatus| runs.iter().filter(|r| r.status == st).count();
        if count(RunStatus::Running) > 0 || count(RunStatus::Failed) > 0 {
            continue;
        }
        if count(RunStatus::Pruned) > 0 {
            // Told as pruned, at the latest epoch one of its runs reached ("... pruned after step N").
            let step = runs
                .iter()
                .filter_map(|r| r.error.as_deref()?.rsplit_once("pruned after step ")?.1.trim().parse::<i64>().ok())
                .max()
                .unwrap_or(0);
            s.told.push(Told { values, objectives: Vec::new(), pruned_at: Some(step) });
            continue;
        }
        if count(RunStatus::Succeeded) < seeds {
            s.redo.push((point.to_string(), values));
            continue;
        }
        let objectives: Option<Vec<f64>> = spec
            .objectives
            .iter()
            .map(|o| {
                let xs: Vec<f64> = runs.iter().filter_map(|r| r.metrics.get(&o.metric).copied().flatten()).collect();
                (xs.len() == runs.len()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
            })
            .collect();
        match objectives {
            Some(objectives) => s.told.push(Told { values, objectives, pruned_at: None }),
            None => warn!("trial {point} did not log every objective: it is left out of the search's history"),
        }
    }
    s
}

/// ASHA over the runs of a study: each rung's values so far, per run.
#[derive(Debug)]
struct AshaPruner {
    asha: Asha,
    metrics: Vec<String>,
    maximize: Vec<bool>,
    rungs: Mutex<BTreeMap<i64, BTreeMap<i64, Vec<(f64, bool)>>>>,
}

impl AshaPruner {
    /// The pruner of `spec`, with the rung values the study's earlier runs logged.
    async fn new(asha: Asha, spec: &SearchSpec, store: &Store, rows: &[RunRow]) -> Result<AshaPruner> {
        let p = AshaPruner {
            asha,
            metrics: spec.objectives.iter().map(|o| o.metric.clone()).collect(),
            maximize: spec.objectives.iter().map(|o| o.maximize).collect(),
            rungs: Mutex::new(BTreeMap::new()),
        };
        for r in rows.iter().filter(|r| r.status != RunStatus::Running) {
            let mut at: BTreeMap<i64, BTreeMap<String, f64>> = BTreeMap::new();
            for (key, step, value) in store.metric_series(r.id).await? {
                if let Some(v) = value.filter(|_| p.asha.is_rung(step) && p.metrics.contains(&key)) {
                    at.entry(step).or_default().insert(key, v);
                }
            }
            for (step, values) in at {
                if let Some(v) = p.objectives(&values) {
                    p.rungs.lock().unwrap().entry(step).or_default().insert(r.id, v);
                }
            }
        }
        Ok(p)
    }

    /// The objectives the stage logged at this step: (value, maximise) of each one present.
    /// A rung judges those (train logs `val.acc.*` per epoch, evaluate the retrieval figures
    /// once); None when there is none.
    fn objectives(&self, values: &BTreeMap<String, f64>) -> Option<Vec<(f64, bool)>> {
        let present: Vec<(f64, bool)> =
            self.metrics.iter().zip(&self.maximize).filter_map(|(m, max)| values.get(m).map(|v| (*v, *max))).collect();
        (!present.is_empty() && present.iter().all(|(v, _)| v.is_finite())).then_some(present)
    }
}

impl exec::Pruner for AshaPruner {
    fn keep(&self, run_id: i64, step: i64, values: &BTreeMap<String, f64>) -> bool {
        if !self.asha.is_rung(step) {
            return true;
        }
        // A stage that does not log the objectives at its epochs cannot be judged.
        let Some(mine) = self.objectives(values) else { return true };
        let mut rungs = self.rungs.lock().unwrap();
        let rung = rungs.entry(step).or_default();
        rung.insert(run_id, mine);
        // Every run at a rung logged the same objectives (the same stage at the same epoch).
        let maximize: Vec<bool> = rung[&run_id].iter().map(|(_, m)| *m).collect();
        let all: Vec<Vec<f64>> =
            rung.values().filter(|v| v.len() == maximize.len()).map(|v| v.iter().map(|(x, _)| *x).collect()).collect();
        let me = rung.iter().filter(|(_, v)| v.len() == maximize.len()).position(|(r, _)| *r == run_id).expect("mine");
        let keep = promotable(&all, me, &maximize, self.asha.reduction);
        if !keep {
            info!(
                "run {run_id}: pruned at step {step} (not in the top 1/{} of the {} runs at this rung)",
                self.asha.reduction,
                all.len()
            );
        }
        keep
    }
}

/// Runs the study of `first` (an adaptive search, compiled from `file` with `a`); returns
/// the exit code.
pub async fn run(
    g: &Global,
    a: &RunArgs,
    file: &Path,
    first: &Experiment,
    opts: &RunOptions,
    display: &Display,
) -> Result<i32> {
    let spec = first.search.clone().expect("an adaptive search");
    let seeds = first.runs.len();
    let parallel = a.jobs.unwrap_or(1).max(1) as usize;
    // Each trial runs its stages one at a time on its share of the cores.
    let mut trial_opts = RunOptions {
        jobs: 1,
        threads_per_job: opts.threads_per_job.or((parallel > 1).then(|| (exec::Cores::available() / parallel).max(1))),
        ..opts.clone()
    };
    let cancel = CancelToken::new();
    spawn_signal_handler(cancel.clone());
    let cache = Cache::open(&g.cache)?;
    let store = Store::open(&g.db, store_options(g)?).await?;
    let reaped = store.reap_dead_runs().await?;
    if reaped > 0 {
        warn!("marked {reaped} run(s) of dead processes as interrupted");
    }
    let filter = Filter { experiment: Some(first.name.clone()), ..Default::default() };
    if let Some(asha) = &spec.pruner {
        let pruner = AshaPruner::new(asha.clone(), &spec, &store, &store.load_runs(&filter).await?).await?;
        trial_opts.pruner = Some(Arc::new(pruner));
    }
    let mut flying: BTreeSet<String> = BTreeSet::new();
    let mut in_flight: tokio::task::JoinSet<(String, Result<exec::Outcome>)> = tokio::task::JoinSet::new();
    let (mut ended, mut failed, mut pruned, mut incomplete) = (0usize, 0usize, 0usize, None::<String>);
    let mut any_ended = false;
    let mut code = 0;
    loop {
        let study = study_of(&store.load_runs(&filter).await?, &spec, seeds);
        // The first trial computes the stages every trial shares (data, features) alone.
        let limit = if any_ended || !study.told.is_empty() { parallel } else { 1 };
        let mut redo: Vec<&(String, BTreeMap<String, String>)> =
            study.redo.iter().filter(|(p, _)| !flying.contains(p)).rev().collect();
        while in_flight.len() < limit && !cancel.is_cancelled() {
            let begun = study.begun.union(&flying).count() as u64;
            let request = match redo.pop() {
                Some((label, values)) => SearchRequest::Point { label: label.clone(), values: values.clone() },
                None if (begun as usize) < spec.trials => {
                    SearchRequest::Next(History { begun, told: study.told.clone() })
                }
                None => break,
            };
            let (trial, trial_registry) = match compile_with(file, a, Some(request)) {
                Ok((exp, registry, _)) => (exp, registry),
                Err(d) => {
                    eprintln!("{d}");
                    code = 2;
                    cancel.cancel();
                    break;
                }
            };
            let label = trial.runs[0].point.clone();
            if !flying.insert(label.clone()) {
                break;
            }
            info!("trial {label} ({} of {})", begun.min(spec.trials as u64 - 1) + 1, spec.trials);
            // A task of its own: a trial goes on while this loop waits for the database.
            let (store, cache, cancel, opts, display) =
                (store.clone(), cache.clone(), cancel.clone(), trial_opts.clone(), display.clone());
            in_flight.spawn(async move {
                let out = exec::execute(&trial, &trial_registry, &store, &cache, &opts, &display, &cancel).await;
                (label, out)
            });
        }
        let Some(joined) = in_flight.join_next().await else { break };
        let (label, out) =
            joined.unwrap_or_else(|e| (String::new(), Err(anyhow::anyhow!("a trial's task ended abnormally: {e}"))));
        flying.remove(&label);
        any_ended = true;
        match out {
            Ok(o) => {
                ended += 1;
                failed += o.runs.iter().filter(|r| r.status == RunStatus::Failed).count();
                pruned += o.runs.iter().filter(|r| r.status == RunStatus::Pruned).count();
                if o.runs.iter().any(|r| r.status == RunStatus::Interrupted) {
                    cancel.cancel();
                }
                if let Some(why) = o.results_incomplete {
                    // Without its results the search cannot go on: stop starting trials.
                    incomplete = Some(why);
                    cancel.cancel();
                }
            }
            Err(e) => {
                error!("trial {label}: {e:#}");
                code = 1;
                cancel.cancel();
            }
        }
    }
    store.close().await;
    display.suspend(|| {
        println!(
            "{ended} trial(s) ran in this invocation ({pruned} pruned run(s), {failed} failed); `huse-run study {}` shows the study",
            file.display()
        )
    });
    if let Some(why) = incomplete {
        error!("not every result reached the database: {why}");
        return Ok(1);
    }
    Ok(if code != 0 {
        code
    } else if cancel.is_cancelled() {
        130
    } else if failed > 0 {
        1
    } else {
        0
    })
}
