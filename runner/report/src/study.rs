//! A study's page (`huse-run study FILE --report DIR`): the optimisation history of each
//! objective (every trial's value and the best so far), the Pareto front of the first two
//! objectives over all trials, and each searched parameter against each objective, as SVG
//! figures beside an `index.html` with the trials' table.

use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};
use plotters::prelude::*;

use crate::html::{PAGE_STYLE, esc, range, xy_chart};

/// One trial, as the study command gathered it.
#[derive(Debug, Clone)]
pub struct StudyTrial {
    /// Its point label (`trial=3,train.beta=0.5`).
    pub label: String,
    /// How its runs ended (`2 succeeded`, `1 pruned`).
    pub state: String,
    /// Each searched parameter's value, as recorded (text), in the order of the study's params.
    pub params: Vec<Option<String>>,
    /// Each objective's mean over the trial's finished runs.
    pub objectives: Vec<Option<f64>>,
    /// A pruned trial's objectives at the epoch it stopped (those its stage logged then).
    pub pruned: Vec<Option<f64>>,
    /// On the Pareto front.
    pub front: bool,
}

/// What the page is about: the study's name, objectives (metric, maximise) and params.
#[derive(Debug, Clone)]
pub struct StudySpec {
    /// The experiment's name.
    pub name: String,
    /// (metric, larger is better).
    pub objectives: Vec<(String, bool)>,
    /// The searched keys.
    pub params: Vec<String>,
}

/// Writes `index.html` and the figures into `out`; returns the figure file names.
pub fn study_report(out: &Path, spec: &StudySpec, trials: &[StudyTrial]) -> Result<Vec<String>> {
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let mut figures = Vec::new();
    let mut html = String::new();
    write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>huse-run study: {e}</title><style>{PAGE_STYLE} \
         .front{{font-weight:bold;background:#e6f4e6}}</style></head><body>\
         <h1>Study <code>{e}</code></h1><p>{n} trial(s); objectives: {o}.</p>",
        e = esc(&spec.name),
        n = trials.len(),
        o = spec
            .objectives
            .iter()
            .map(|(m, max)| format!("<code>{}</code> ({})", esc(m), if *max { "max" } else { "min" }))
            .collect::<Vec<_>>()
            .join(", ")
    )?;
    html.push_str("<h2>Optimisation history</h2><div>");
    for (k, (metric, max)) in spec.objectives.iter().enumerate() {
        let name = format!("history-{k}.svg");
        if history(&out.join(&name), metric, *max, trials, k)? {
            write!(html, "<img src=\"{name}\" alt=\"history of {}\" width=\"420\">", esc(metric))?;
            figures.push(name);
        }
    }
    html.push_str("</div>");
    if spec.objectives.len() >= 2 {
        let name = "front.svg".to_string();
        if front(&out.join(&name), spec, trials)? {
            write!(html, "<h2>Pareto front</h2><img src=\"{name}\" alt=\"Pareto front\" width=\"560\">")?;
            figures.push(name);
        }
    }
    html.push_str("<h2>Parameters against objectives</h2><div>");
    for (p, param) in spec.params.iter().enumerate() {
        for (k, (metric, _)) in spec.objectives.iter().enumerate() {
            let name = format!("param-{p}-{k}.svg");
            if param_plot(&out.join(&name), param, metric, trials, p, k)? {
                write!(html, "<img src=\"{name}\" alt=\"{} against {}\" width=\"360\">", esc(metric), esc(param))?;
                figures.push(name);
            }
        }
    }
    html.push_str("</div><h2>Trials</h2><table><tr><th>trial</th><th>state</th>");
    for p in &spec.params {
        write!(html, "<th>{}</th>", esc(p))?;
    }
    for (m, _) in &spec.objectives {
        write!(html, "<th>{}</th>", esc(m))?;
    }
    html.push_str("<th>front</th></tr>");
    for (i, t) in trials.iter().enumerate() {
        write!(html, "<tr{}><td>{i}</td><td>{}</td>", if t.front { " class=\"front\"" } else { "" }, esc(&t.state))?;
        for v in &t.params {
            write!(html, "<td>{}</td>", esc(v.as_deref().unwrap_or("")))?;
        }
        for v in &t.objectives {
            write!(html, "<td>{}</td>", v.map(|x| format!("{x:.4}")).unwrap_or_default())?;
        }
        write!(html, "<td>{}</td></tr>", if t.front { "*" } else { "" })?;
    }
    html.push_str("</table></body></html>\n");
    std::fs::write(out.join("index.html"), html).with_context(|| format!("writing {}", out.display()))?;
    Ok(figures)
}

/// Objective `k` of every trial against its index, and the best so far as a step line.
fn history(path: &Path, metric: &str, max: bool, trials: &[StudyTrial], k: usize) -> Result<bool> {
    let pts: Vec<(f64, f64)> =
        trials.iter().enumerate().filter_map(|(i, t)| t.objectives[k].map(|v| (i as f64, v))).collect();
    if pts.is_empty() {
        return Ok(false);
    }
    let mut best = Vec::new();
    for &(x, v) in &pts {
        let b = match best.last() {
            Some(&(_, b)) if (max && b >= v) || (!max && b <= v) => b,
            _ => v,
        };
        best.push((x, b));
    }
    let root = SVGBackend::new(path, (420, 280)).into_drawing_area();
    root.fill(&WHITE)?;
    let x = range([0.0, (trials.len().max(2) - 1) as f64].into_iter());
    let (y0, y1) = range(pts.iter().map(|p| p.1).chain(trials.iter().filter_map(|t| t.pruned[k])));
    let caption = format!("{metric} (hollow: pruned, when stopped)");
    let mut chart = xy_chart(&root, &caption, (x, (y0, y1)), "trial", "")?;
    chart.draw_series(pts.iter().map(|p| Circle::new(*p, 3, BLUE.filled())))?;
    // Pruned trials: their value when stopped, hollow (they do not count as the best).
    let grey = RGBColor(140, 140, 140);
    chart.draw_series(
        trials
            .iter()
            .enumerate()
            .filter_map(|(i, t)| t.pruned[k].filter(|v| (y0..=y1).contains(v)).map(|v| (i as f64, v)))
            .map(|p| Circle::new(p, 3, grey.stroke_width(1))),
    )?;
    let steps: Vec<(f64, f64)> = best.windows(2).flat_map(|w| [w[0], (w[1].0, w[0].1), w[1]]).collect();
    chart.draw_series(LineSeries::new(if steps.is_empty() { best } else { steps }, RED.stroke_width(2)))?;
    root.present()?;
    Ok(true)
}

/// The first two objectives of every trial; the front's trials red and joined.
fn front(path: &Path, spec: &StudySpec, trials: &[StudyTrial]) -> Result<bool> {
    let pts: Vec<(f64, f64, bool)> = trials
        .iter()
        .filter_map(|t| match (t.objectives[0], t.objectives[1]) {
            (Some(a), Some(b)) => Some((a, b, t.front)),
            _ => None,
        })
        .collect();
    if pts.is_empty() {
        return Ok(false);
    }
    let root = SVGBackend::new(path, (560, 380)).into_drawing_area();
    root.fill(&WHITE)?;
    let axes = (range(pts.iter().map(|p| p.0)), range(pts.iter().map(|p| p.1)));
    let caption = "trials (grey) and their Pareto front (red)";
    let mut chart = xy_chart(&root, caption, axes, &spec.objectives[0].0, &spec.objectives[1].0)?;
    chart.draw_series(
        pts.iter().filter(|p| !p.2).map(|p| Circle::new((p.0, p.1), 3, RGBColor(150, 150, 150).filled())),
    )?;
    let mut on: Vec<(f64, f64)> = pts.iter().filter(|p| p.2).map(|p| (p.0, p.1)).collect();
    on.sort_by(|a, b| a.0.total_cmp(&b.0));
    chart.draw_series(LineSeries::new(on.clone(), RED.stroke_width(1)))?;
    chart.draw_series(on.iter().map(|p| Circle::new(*p, 4, RED.filled())))?;
    root.present()?;
    Ok(true)
}

/// Objective `k` against parameter `p` (a choice's values at 0, 1, ... in order of appearance).
fn param_plot(path: &Path, param: &str, metric: &str, trials: &[StudyTrial], p: usize, k: usize) -> Result<bool> {
    let raw: Vec<(&str, f64)> = trials
        .iter()
        .filter_map(|t| match (&t.params[p], t.objectives[k]) {
            (Some(x), Some(v)) => Some((x.as_str(), v)),
            _ => None,
        })
        .collect();
    if raw.is_empty() {
        return Ok(false);
    }
    let numeric = raw.iter().all(|(x, _)| x.parse::<f64>().is_ok());
    let mut names: Vec<&str> = Vec::new();
    let pts: Vec<(f64, f64)> = raw
        .iter()
        .map(|(x, v)| {
            if numeric {
                (x.parse().expect("numeric"), *v)
            } else {
                let i = names.iter().position(|n| n == x).unwrap_or_else(|| {
                    names.push(x);
                    names.len() - 1
                });
                (i as f64, *v)
            }
        })
        .collect();
    let root = SVGBackend::new(path, (360, 260)).into_drawing_area();
    root.fill(&WHITE)?;
    let axes = (range(pts.iter().map(|q| q.0)), range(pts.iter().map(|q| q.1)));
    let desc = if numeric { param.to_string() } else { format!("{param}: {}", names.join(", ")) };
    let mut chart = xy_chart(&root, metric, axes, &desc, "")?;
    chart.draw_series(pts.iter().map(|q| Circle::new(*q, 3, BLUE.filled())))?;
    root.present()?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_study_page_has_its_figures_and_table() {
        let dir = tempfile::tempdir().unwrap();
        let spec = StudySpec {
            name: "s".into(),
            objectives: vec![("val.a".into(), true), ("val.b".into(), false)],
            params: vec!["train.beta".into(), "graph.uses".into()],
        };
        let trials: Vec<StudyTrial> = (0..6)
            .map(|i| StudyTrial {
                label: format!("trial={i}"),
                state: if i == 5 { "1 pruned".into() } else { "1 succeeded".into() },
                params: vec![Some(format!("0.{i}")), Some(if i % 2 == 0 { "graph" } else { "graph-tree" }.into())],
                objectives: if i == 5 { vec![None, None] } else { vec![Some(i as f64), Some((i * i) as f64)] },
                pruned: if i == 5 { vec![Some(0.5), None] } else { vec![None, None] },
                front: i == 0 || i == 4,
            })
            .collect();
        let figs = study_report(dir.path(), &spec, &trials).unwrap();
        assert_eq!(figs.len(), 2 + 1 + 4, "{figs:?}");
        for f in &figs {
            let svg = std::fs::read_to_string(dir.path().join(f)).unwrap();
            assert!(svg.contains("<svg") && svg.contains("circle"), "{f}");
        }
        let html = std::fs::read_to_string(dir.path().join("index.html")).unwrap();
        assert_eq!(html.matches("class=\"front\"").count(), 2);
        assert!(html.contains("1 pruned") && html.contains("graph-tree") && html.contains("front.svg"));
    }
}
