//! `huse-run study FILE`: a search's trials, from the results database — how many ran, each
//! trial's objectives (mean ± std over its seeds), the best trial of each objective and the
//! Pareto front (the trials no other trial beats on every objective).

use std::collections::BTreeMap;

use anyhow::Result;
use huse_config::sampler::pareto_front;
use huse_report::table::{Cell, Format, Table, mean_std};
use huse_store::{Filter, RunRow};

use super::run::RunArgs;
use super::{Global, compile, open_for_queries};

/// One trial: its point, its runs' states, and its objectives' mean and std.
struct Trial {
    point: String,
    runs: usize,
    done: usize,
    states: BTreeMap<String, usize>,
    objectives: Vec<Option<(f64, f64)>>,
}

/// `study`'s arguments: the experiment as a run takes it, and where to write its page.
#[derive(clap::Args, Debug, Clone)]
pub struct StudyArgs {
    /// The experiment and its overrides, as for a run.
    #[command(flatten)]
    pub run: RunArgs,
    /// Also write the study's page (optimisation history, Pareto front, each parameter
    /// against each objective; `index.html` and SVG figures) into this folder.
    #[arg(long, value_name = "DIR")]
    pub report: Option<std::path::PathBuf>,
}

/// Prints the study of the experiment file `a.run.experiment`.
pub async fn run(g: &Global, sa: &StudyArgs) -> Result<i32> {
    let a = &sa.run;
    let Some(file) = a.experiment.clone() else {
        eprintln!("error: study needs the experiment file");
        return Ok(2);
    };
    let (exp, _, _) = match compile(&file, a) {
        Ok(x) => x,
        Err(d) => {
            eprintln!("{d}");
            return Ok(2);
        }
    };
    if exp.search.is_none() {
        eprintln!(
            "error: {} has no `search:` block (`huse-run runs -e {} --group` shows a sweep)",
            file.display(),
            exp.name
        );
        return Ok(2);
    }
    let trials = show(g, &exp).await?;
    if let Some(dir) = &sa.report {
        let spec = exp.search.as_ref().expect("checked");
        let page = huse_report::study::StudySpec {
            name: exp.name.clone(),
            objectives: spec.objectives.iter().map(|o| (o.metric.clone(), o.maximize)).collect(),
            params: spec.params.clone(),
        };
        let figs = huse_report::study::study_report(dir, &page, &trials)?;
        println!("{} ({} figures)", dir.join("index.html").display(), figs.len());
    }
    Ok(0)
}

/// Prints the study of `exp` (an experiment with a `search:`) from the database.
pub async fn show(g: &Global, exp: &huse_config::Experiment) -> Result<Vec<huse_report::study::StudyTrial>> {
    let spec = exp.search.as_ref().expect("a search");
    let store = open_for_queries(g).await?;
    let rows = store.load_runs(&Filter { experiment: Some(exp.name.clone()), ..Default::default() }).await?;
    store.close().await;
    // The latest recorded run of each name.
    let by_name: BTreeMap<&str, &RunRow> = rows.iter().map(|r| (r.name.as_str(), r)).collect();
    // A fixed search's runs are known in advance (pending ones too); an adaptive search's
    // trials are the ones recorded, in the order they began.
    let mut planned: Vec<(&str, &str)> = exp.runs.iter().map(|r| (r.point.as_str(), r.name.as_str())).collect();
    if spec.adaptive() {
        planned = super::trials::recorded_trials(&rows)
            .into_iter()
            .flat_map(|(point, runs)| runs.into_iter().map(move |r| (point, r.name.as_str())))
            .collect();
    }
    let n_runs = planned.len();
    let mut trials: Vec<Trial> = Vec::new();
    for (point, name) in planned {
        if trials.last().is_none_or(|t| t.point != point) {
            trials.push(Trial {
                point: point.to_string(),
                runs: 0,
                done: 0,
                states: BTreeMap::new(),
                objectives: Vec::new(),
            });
        }
        let t = trials.last_mut().expect("pushed");
        t.runs += 1;
        let state = by_name.get(name).map(|x| x.status.to_string()).unwrap_or_else(|| "pending".into());
        if state == "succeeded" {
            t.done += 1;
        }
        *t.states.entry(state).or_default() += 1;
    }
    for t in &mut trials {
        let members: Vec<&RunRow> = by_name
            .values()
            .copied()
            .filter(|r| r.point == t.point)
            .filter(|r| r.status.to_string() == "succeeded")
            .collect();
        t.objectives = spec
            .objectives
            .iter()
            .map(|o| {
                let xs: Vec<f64> = members.iter().filter_map(|r| r.metrics.get(&o.metric).copied().flatten()).collect();
                (!xs.is_empty()).then(|| mean_std(&xs))
            })
            .collect();
    }
    // The front among the trials with every objective.
    let maximize: Vec<bool> = spec.objectives.iter().map(|o| o.maximize).collect();
    let complete: Vec<usize> =
        (0..trials.len()).filter(|&i| trials[i].objectives.iter().all(Option::is_some)).collect();
    let values: Vec<Vec<f64>> =
        complete.iter().map(|&i| trials[i].objectives.iter().map(|o| o.expect("complete").0).collect()).collect();
    let front: Vec<usize> = pareto_front(&values, &maximize).into_iter().map(|k| complete[k]).collect();
    let mut states: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &trials {
        for (s, n) in &t.states {
            *states.entry(s.as_str()).or_default() += n;
        }
    }
    let states: Vec<String> = states.iter().map(|(s, n)| format!("{n} {s}")).collect();
    println!(
        "study `{}` ({} sampler, seed {}): {} trial(s) of {}, {} run(s): {}",
        exp.name,
        spec.sampler,
        spec.seed,
        trials.len(),
        spec.trials,
        n_runs,
        states.join(", ")
    );
    let mut t = Table { headers: vec!["trial".into(), "runs".into()], rows: Vec::new() };
    for o in &spec.objectives {
        t.headers.push(format!("{} ({})", o.metric, if o.maximize { "max" } else { "min" }));
    }
    t.headers.push("front".into());
    for (i, tr) in trials.iter().enumerate() {
        let mut row = vec![Cell::Text(tr.point.clone()), Cell::Text(format!("{}/{}", tr.done, tr.runs))];
        row.extend(tr.objectives.iter().map(|o| match o {
            Some((m, s)) if tr.done > 1 => Cell::MeanStd(*m, *s, tr.done),
            Some((m, _)) => Cell::Num(Some(*m)),
            None => Cell::Empty,
        }));
        row.push(Cell::Text(if front.contains(&i) { "*".into() } else { String::new() }));
        t.rows.push(row);
    }
    print!("{}", t.render(Format::Table));
    for (k, o) in spec.objectives.iter().enumerate() {
        let best = complete.iter().copied().max_by(|&x, &y| {
            let (a, b) = (trials[x].objectives[k].expect("complete").0, trials[y].objectives[k].expect("complete").0);
            if o.maximize { a.total_cmp(&b) } else { b.total_cmp(&a) }
        });
        if let Some(b) = best {
            let (m, s) = trials[b].objectives[k].expect("complete");
            println!("best {}: {m:.4} ± {s:.4} at {}", o.metric, trials[b].point);
        }
    }
    println!(
        "Pareto front: {} trial(s) (marked *; no other trial is as good on every objective and better on one)",
        front.len()
    );
    Ok(trials
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let row = by_name.values().find(|r| r.point == t.point);
            huse_report::study::StudyTrial {
                label: t.point.clone(),
                state: t.states.iter().map(|(s, n)| format!("{n} {s}")).collect::<Vec<_>>().join(", "),
                params: spec.params.iter().map(|k| row.and_then(|r| r.params.get(k).cloned())).collect(),
                objectives: t.objectives.iter().map(|o| o.map(|(m, _)| m)).collect(),
                pruned: spec
                    .objectives
                    .iter()
                    .map(|o| {
                        let xs: Vec<f64> = by_name
                            .values()
                            .filter(|r| r.point == t.point && r.status == huse_store::RunStatus::Pruned)
                            .filter_map(|r| r.metrics.get(&o.metric).copied().flatten())
                            .collect();
                        (!xs.is_empty()).then(|| xs.iter().sum::<f64>() / xs.len() as f64)
                    })
                    .collect(),
                front: front.contains(&i),
            }
        })
        .collect())
}
