//! `huse-run report`: a static HTML page with SVG figures, made from the results database
//! alone (so it can be regenerated at any time, after the cache is gone).
//!
//! The page holds, for an experiment:
//! * one chart per metric logged at more than one step (training curves), every run
//!   overlaid: per sweep point a mean line with a min-max band when seeds repeat, a plain
//!   line otherwise (an 8-run sweep draws one chart per metric, not one per run and metric);
//! * for a sweep, each selected final metric against the swept params: a line (mean over
//!   seeds, with min-max whiskers) for one param, a heatmap for two;
//! * the runs table (varying params + selected final metrics; the best value of each
//!   metric in bold), each run's stage summaries (e.g. the paper's tables), resolved
//!   config and git commit;
//! * a retrieval gallery when the runs were evaluated: for the evaluate stage's fixed test
//!   queries (item titles), the 5 nearest product photos of each run (one run per sweep
//!   point), a green frame where the class is the query's; the thumbnails are copied into
//!   the report folder, so the page stands alone.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};
use huse_store::{Filter, RunRow, Store};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

use crate::table::{self, mean_std};

/// `s` safe inside HTML text and quoted attributes.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;").replace('\'', "&#39;")
}

/// `s` percent-encoded for a URL path segment or query value (unreserved bytes kept).
pub fn url_enc(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

fn fmt(v: f64) -> String {
    if v == v.trunc() && v.abs() < 1e12 { format!("{v:.0}") } else { format!("{v:.4}") }
}

/// The style every static page here shares (body, tables, figures).
pub(crate) const PAGE_STYLE: &str = "body{font-family:sans-serif;margin:2em;max-width:1400px} \
     table{border-collapse:collapse;font-size:13px} td,th{border:1px solid #ccc;padding:3px 6px;text-align:right} \
     th{background:#f3f3f3} img{margin:4px;border:1px solid #eee}";

/// Writes `index.html` and the figures into `out`; returns the figure file names.
pub async fn report(store: &Store, experiment: &str, out: &Path, metric_globs: &[String]) -> Result<Vec<String>> {
    let runs = store.load_runs(&Filter { experiment: Some(experiment.to_string()), ..Default::default() }).await?;
    if runs.is_empty() {
        bail!("no runs of experiment `{experiment}` in {}", store.location());
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    let globs = if metric_globs.is_empty() {
        let any_test = runs.iter().any(|r| r.metrics.keys().any(|k| k.starts_with("test.")));
        vec![if any_test { "test.*".to_string() } else { "*".to_string() }]
    } else {
        metric_globs.to_vec()
    };
    let patterns = table::patterns(&globs)?;
    let selected: Vec<String> = runs
        .iter()
        .flat_map(|r| r.metrics.keys())
        .filter(|k| patterns.iter().any(|p| p.matches(k)))
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let swept: Vec<String> = {
        let keys: BTreeSet<&String> = runs.iter().flat_map(|r| r.params.keys()).collect();
        keys.into_iter()
            .filter(|k| *k != "seed" && runs.iter().map(|r| r.params.get(*k)).collect::<BTreeSet<_>>().len() > 1)
            .cloned()
            .collect()
    };
    let mut figures = Vec::new();
    let mut html = String::new();
    write!(
        html,
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>huse-run report: {e}</title><style>{PAGE_STYLE} \
         .best{{font-weight:bold;background:#e6f4e6}} pre{{background:#f8f8f8;padding:8px;overflow:auto}} \
         .scroll{{overflow-x:auto;max-width:100%}} .md table{{margin:6px 0}}</style></head><body>\
         <h1>Experiment <code>{e}</code></h1><p>{n} run(s), generated from <code>{db}</code>.</p>",
        e = esc(experiment),
        n = runs.len(),
        db = esc(&store.location().to_string())
    )?;

    // Sweep figures.
    if !swept.is_empty() && swept.len() <= 2 {
        html.push_str("<h2>Metrics against the swept parameters</h2><div>");
        for (i, m) in selected.iter().enumerate() {
            let name = format!("sweep-{i}.svg");
            let ok = if swept.len() == 1 {
                sweep_line(&out.join(&name), &runs, &swept[0], m)?
            } else {
                sweep_heatmap(&out.join(&name), &runs, &swept[0], &swept[1], m)?
            };
            if ok {
                write!(html, "<img src=\"{name}\" alt=\"{}\" width=\"420\">", esc(m))?;
                figures.push(name);
            }
        }
        html.push_str("</div>");
    }

    // The runs table, best values marked.
    html.push_str("<h2>Runs</h2><div class=\"scroll\"><table><tr><th>id</th><th>name</th><th>status</th>");
    for p in &swept {
        write!(html, "<th>{}</th>", esc(p))?;
    }
    for m in &selected {
        write!(html, "<th>{}</th>", esc(m))?;
    }
    html.push_str("</tr>");
    let best: BTreeMap<&String, f64> = selected
        .iter()
        .filter_map(|m| {
            runs.iter().filter_map(|r| r.metrics.get(m).copied().flatten()).reduce(f64::max).map(|b| (m, b))
        })
        .collect();
    for r in &runs {
        write!(
            html,
            "<tr><td>{}</td><td style=\"text-align:left\">{}</td><td>{}</td>",
            r.id,
            esc(&r.name),
            esc(r.status.as_str())
        )?;
        for p in &swept {
            write!(html, "<td>{}</td>", esc(r.params.get(p).map(String::as_str).unwrap_or("")))?;
        }
        for m in &selected {
            match r.metrics.get(m).copied().flatten() {
                Some(v) if best.get(m) == Some(&v) => write!(html, "<td class=\"best\">{}</td>", fmt(v))?,
                Some(v) => write!(html, "<td>{}</td>", fmt(v))?,
                None => html.push_str("<td></td>"),
            }
        }
        html.push_str("</tr>");
    }
    html.push_str("</table></div><p>Bold: the best (highest) value of each metric.</p>");

    // Training curves: one chart per metric, every run overlaid, grouped by sweep point.
    let mut by_metric: BTreeMap<String, BTreeMap<String, Vec<Vec<(f64, f64)>>>> = BTreeMap::new();
    for r in &runs {
        let label = if r.point.is_empty() { r.name.clone() } else { r.point.clone() };
        for (key, points) in curves(store, r.id).await? {
            by_metric.entry(key).or_default().entry(label.clone()).or_default().push(points);
        }
    }
    if !by_metric.is_empty() {
        html.push_str("<h2>Training curves</h2><p>One line per sweep point: the mean over its seeds, with the min-max band when seeds repeat.</p><div>");
        for (key, groups) in &by_metric {
            let name = format!("curve-{}.svg", key.replace(|c: char| !c.is_ascii_alphanumeric(), "_"));
            overlay(&out.join(&name), key, groups)?;
            write!(html, "<img src=\"{name}\" alt=\"{}\" width=\"460\">", esc(key))?;
            figures.push(name);
        }
        html.push_str("</div>");
    }

    // Retrieval gallery: the evaluate stage's fixed test queries, top 5 images per run.
    gallery(store, &runs, out, &mut html).await?;

    // Per run: summaries, config.
    for r in &runs {
        write!(html, "<h2>Run {} — {}</h2>", r.id, esc(&r.name))?;
        for s in store.summaries(r.id).await? {
            let body = if s.name.ends_with(".md") { markdown(&s.text) } else { format!("<pre>{}</pre>", esc(&s.text)) };
            write!(html, "<h3>{} — {}</h3><div class=\"md scroll\">{body}</div>", esc(&s.stage), esc(&s.name))?;
        }
        let (yaml, commit) = store.run_config(r.id).await?;
        write!(
            html,
            "<details><summary>resolved config, git commit <code>{}</code></summary><pre>{}</pre></details>",
            esc(commit.as_deref().unwrap_or("unknown")),
            esc(&yaml)
        )?;
    }
    html.push_str("</body></html>\n");
    std::fs::write(out.join("index.html"), html)?;
    Ok(figures)
}

/// The gallery section (nothing when no run has a gallery).
async fn gallery(store: &Store, runs: &[RunRow], out: &Path, html: &mut String) -> Result<()> {
    let mut shown: Vec<(&RunRow, serde_json::Value)> = Vec::new();
    let mut points = BTreeSet::new();
    // One run per sweep point: the first that has a gallery (runs that were interrupted
    // before evaluate have none).
    for r in runs {
        if shown.len() == 6 || points.contains(&r.point) {
            continue;
        }
        if let Some(a) = store.attachment(r.id, "gallery.json").await?
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(&a.text)
        {
            points.insert(r.point.clone());
            shown.push((r, v));
        }
    }
    let Some((_, first)) = shown.first() else { return Ok(()) };
    let queries = first.as_array().cloned().unwrap_or_default();
    let thumbs = out.join("thumbs");
    std::fs::create_dir_all(&thumbs)?;
    html.push_str("<h2>Retrieval gallery</h2><p>For fixed test items, the 5 product photos nearest to the item's title in each run (one run per sweep point; green frame: the query's class).</p><table><tr><th>query</th>");
    for (r, _) in &shown {
        write!(html, "<th>{}</th>", esc(&r.name))?;
    }
    html.push_str("</tr>");
    for (qi, q) in queries.iter().enumerate() {
        let qclass = q["class"].as_str().unwrap_or("");
        write!(
            html,
            "<tr><td style=\"text-align:left;max-width:220px\">{}<br><small>{}</small></td>",
            esc(q["text"].as_str().unwrap_or("")),
            esc(qclass)
        )?;
        for (_, g) in &shown {
            html.push_str("<td style=\"white-space:nowrap\">");
            for h in g[qi]["hits"].as_array().into_iter().flatten() {
                let (id, src) = (h["id"].as_str().unwrap_or(""), Path::new(h["image"].as_str().unwrap_or("")));
                let ext = src.extension().and_then(|e| e.to_str()).unwrap_or("jpg");
                let safe: String = id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_').collect();
                let name = format!("thumbs/{safe}.{ext}");
                if !out.join(&name).exists() && std::fs::copy(src, out.join(&name)).is_err() {
                    continue; // the dataset is gone: the row shows what is left
                }
                let frame = if h["class"].as_str() == Some(qclass) { "#2a2" } else { "#ddd" };
                write!(
                    html,
                    "<img src=\"{name}\" title=\"{}\" style=\"height:80px;border:3px solid {frame};margin:1px\">",
                    esc(h["class"].as_str().unwrap_or(""))
                )?;
            }
            html.push_str("</td>");
        }
        html.push_str("</tr>");
    }
    html.push_str("</table>");
    Ok(())
}

/// Every metric of a run logged at more than one step: key -> (step, value).
/// A run's multi-step metrics (its curves): key -> (step, value), NaN steps left out.
pub async fn curves(store: &Store, run: i64) -> Result<BTreeMap<String, Vec<(f64, f64)>>> {
    let mut m: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for (key, step, value) in store.metric_series(run).await? {
        if let Some(v) = value {
            m.entry(key).or_default().push((step as f64, v));
        }
    }
    m.retain(|_, v| v.len() > 1);
    Ok(m)
}

pub(crate) fn range(vals: impl Iterator<Item = f64> + Clone) -> (f64, f64) {
    let lo = vals.clone().fold(f64::INFINITY, f64::min);
    let hi = vals.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    if (hi - lo).abs() <= 1e-12 * lo.abs().max(hi.abs()) || hi == lo {
        // One value: a range around it of its own size (0.001 stays 0.001, not a dot at 0
        // on a -0.5..0.5 axis).
        let pad = if lo == 0.0 { 0.5 } else { 0.5 * lo.abs() };
        (lo - pad, hi + pad)
    } else {
        (lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    }
}

/// An axis tick: at most four significant digits, scientific notation below 0.001 and from
/// 1e6, no trailing zeros.
pub(crate) fn tick(v: &f64) -> String {
    let v = *v;
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let a = v.abs();
    if !(1e-3..1e6).contains(&a) {
        let s = format!("{v:.3e}");
        let (m, e) = s.split_once('e').unwrap_or((&s, "0"));
        let m = if m.contains('.') { m.trim_end_matches('0').trim_end_matches('.') } else { m };
        return format!("{m}e{e}");
    }
    let decimals = (3 - a.log10().floor() as i32).max(0) as usize;
    let s = format!("{v:.decimals$}");
    if s.contains('.') { s.trim_end_matches('0').trim_end_matches('.').to_string() } else { s }
}

/// Per step: mean, min and max over the series (steps in order; a step some series lack
/// uses those that have it).
pub fn band(series: &[Vec<(f64, f64)>]) -> Vec<(f64, f64, f64, f64)> {
    let mut at: BTreeMap<i64, Vec<f64>> = BTreeMap::new();
    for s in series {
        for (x, y) in s {
            at.entry(*x as i64).or_default().push(*y);
        }
    }
    at.into_iter()
        .map(|(x, ys)| {
            let lo = ys.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = ys.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            (x as f64, mean_std(&ys).0, lo, hi)
        })
        .collect()
}

const PALETTE: [RGBColor; 8] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
];

/// One metric, every group (sweep point) overlaid: mean line, min-max band over seeds.
fn overlay(path: &Path, key: &str, groups: &BTreeMap<String, Vec<Vec<(f64, f64)>>>) -> Result<()> {
    std::fs::write(path, overlay_svg(key, groups)?)?;
    Ok(())
}

/// One metric, every group (a run or a sweep point) overlaid, as an SVG document: the mean
/// line of each group and the min-max band of its series, the legend beside the chart.
pub fn overlay_svg(key: &str, groups: &BTreeMap<String, Vec<Vec<(f64, f64)>>>) -> Result<String> {
    let mut svg = String::new();
    overlay_draw(&mut svg, key, groups)?;
    Ok(svg)
}

fn overlay_draw(svg: &mut String, key: &str, groups: &BTreeMap<String, Vec<Vec<(f64, f64)>>>) -> Result<()> {
    let bands: Vec<(&String, Vec<(f64, f64, f64, f64)>)> = groups.iter().map(|(l, s)| (l, band(s))).collect();
    // Several groups: their legend beside the chart, never over the curves.
    let legend_width = if bands.len() > 1 {
        (bands.iter().map(|(l, _)| l.chars().count()).max().unwrap_or(0) as u32 * 6 + 30).min(320)
    } else {
        0
    };
    let whole = SVGBackend::with_string(svg, (460 + legend_width, 300)).into_drawing_area();
    whole.fill(&WHITE)?;
    let (root, legend) = whole.split_horizontally(460);
    let (x0, x1) = range(bands.iter().flat_map(|(_, b)| b.iter().map(|p| p.0)));
    let (y0, y1) = range(bands.iter().flat_map(|(_, b)| b.iter().flat_map(|p| [p.2, p.3])));
    let mut chart = ChartBuilder::on(&root)
        .caption(key, ("sans-serif", 14))
        .margin(6)
        .x_label_area_size(24)
        .y_label_area_size(48)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc("step")
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .label_style(("sans-serif", 10))
        .draw()?;
    for (i, (label, b)) in bands.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        if groups[*label].len() > 1 {
            let mut poly: Vec<(f64, f64)> = b.iter().map(|p| (p.0, p.3)).collect();
            poly.extend(b.iter().rev().map(|p| (p.0, p.2)));
            chart.draw_series(std::iter::once(Polygon::new(poly, color.mix(0.18).filled())))?;
        }
        chart.draw_series(LineSeries::new(b.iter().map(|p| (p.0, p.1)), color.stroke_width(2)))?;
        if bands.len() > 1 {
            let y = 30 + 14 * i as i32;
            legend.draw(&PathElement::new(vec![(4, y), (18, y)], color.stroke_width(2)))?;
            legend.draw(&Text::new(label.to_string(), (22, y - 5), ("sans-serif", 10).into_font()))?;
        }
    }
    whole.present()?;
    Ok(())
}

fn num(s: &str) -> Option<f64> {
    s.parse().ok()
}

/// A chart with numbers on both axes as the figures here draw them: a caption, short tick
/// labels, the axes described.
pub(crate) fn xy_chart<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    caption: &str,
    (x, y): ((f64, f64), (f64, f64)),
    x_desc: &str,
    y_desc: &str,
) -> Result<ChartContext<'a, SVGBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>> {
    let mut chart = ChartBuilder::on(root)
        .caption(caption, ("sans-serif", 14))
        .margin(8)
        .x_label_area_size(32)
        .y_label_area_size(if y_desc.is_empty() { 50 } else { 56 })
        .build_cartesian_2d(x.0..x.1, y.0..y.1)?;
    chart
        .configure_mesh()
        .x_desc(x_desc)
        .y_desc(y_desc)
        .x_label_formatter(&tick)
        .y_label_formatter(&tick)
        .label_style(("sans-serif", 11))
        .draw()?;
    Ok(chart)
}

/// One swept param: mean of `metric` over the runs at each value, with min-max whiskers.
fn sweep_line(path: &Path, runs: &[RunRow], param: &str, metric: &str) -> Result<bool> {
    let mut by: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for r in runs {
        if let (Some(p), Some(Some(v))) = (r.params.get(param), r.metrics.get(metric)) {
            by.entry(p.clone()).or_default().push(*v);
        }
    }
    if by.is_empty() {
        return Ok(false);
    }
    let numeric = by.keys().all(|k| num(k).is_some());
    let xs: Vec<(f64, String)> = if numeric {
        by.keys().map(|k| (num(k).unwrap(), k.clone())).collect()
    } else {
        by.keys().enumerate().map(|(i, k)| (i as f64, k.clone())).collect()
    };
    let pts: Vec<(f64, f64, f64, f64)> = xs
        .iter()
        .map(|(x, k)| {
            let v = &by[k];
            (
                *x,
                mean_std(v).0,
                v.iter().copied().fold(f64::INFINITY, f64::min),
                v.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            )
        })
        .collect();
    let root = SVGBackend::new(path, (420, 280)).into_drawing_area();
    root.fill(&WHITE)?;
    let axes = (range(pts.iter().map(|p| p.0)), range(pts.iter().flat_map(|p| [p.2, p.3])));
    let mut chart = xy_chart(&root, metric, axes, param, "")?;
    chart.draw_series(LineSeries::new(pts.iter().map(|p| (p.0, p.1)), &BLUE))?;
    chart.draw_series(pts.iter().map(|p| PathElement::new(vec![(p.0, p.2), (p.0, p.3)], BLACK)))?;
    chart.draw_series(pts.iter().map(|p| Circle::new((p.0, p.1), 3, BLUE.filled())))?;
    root.present()?;
    Ok(true)
}

/// Two swept params: a heatmap of the mean of `metric`, with the values written in the cells.
fn sweep_heatmap(path: &Path, runs: &[RunRow], pa: &str, pb: &str, metric: &str) -> Result<bool> {
    let mut cells: BTreeMap<(String, String), Vec<f64>> = BTreeMap::new();
    for r in runs {
        if let (Some(a), Some(b), Some(Some(v))) = (r.params.get(pa), r.params.get(pb), r.metrics.get(metric)) {
            cells.entry((a.clone(), b.clone())).or_default().push(*v);
        }
    }
    if cells.is_empty() {
        return Ok(false);
    }
    let sort = |v: BTreeSet<String>| -> Vec<String> {
        let mut v: Vec<String> = v.into_iter().collect();
        v.sort_by(|x, y| match (num(x), num(y)) {
            (Some(a), Some(b)) => a.total_cmp(&b),
            _ => x.cmp(y),
        });
        v
    };
    let xa = sort(cells.keys().map(|k| k.0.clone()).collect());
    let yb = sort(cells.keys().map(|k| k.1.clone()).collect());
    let means: BTreeMap<(String, String), f64> = cells.iter().map(|(k, v)| (k.clone(), mean_std(v).0)).collect();
    let (lo, hi) = range(means.values().copied());
    let root = SVGBackend::new(path, (420, 300)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(metric, ("sans-serif", 15))
        .margin(8)
        .x_label_area_size(30)
        .y_label_area_size(50)
        .build_cartesian_2d(0f64..xa.len() as f64, 0f64..yb.len() as f64)?;
    let (xl, yl) = (xa.clone(), yb.clone());
    chart
        .configure_mesh()
        .disable_mesh()
        .x_desc(pa)
        .y_desc(pb)
        .x_labels(xa.len() * 2 + 1)
        .y_labels(yb.len() * 2 + 1)
        .x_label_formatter(&|v| {
            if (v.fract() - 0.5).abs() < 1e-6 {
                xl.get(*v as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .y_label_formatter(&|v| {
            if (v.fract() - 0.5).abs() < 1e-6 {
                yl.get(*v as usize).cloned().unwrap_or_default()
            } else {
                String::new()
            }
        })
        .label_style(("sans-serif", 11))
        .draw()?;
    for (i, a) in xa.iter().enumerate() {
        for (j, b) in yb.iter().enumerate() {
            let Some(v) = means.get(&(a.clone(), b.clone())) else { continue };
            let t = ((v - lo) / (hi - lo)).clamp(0.0, 1.0);
            // Light (worst) to dark blue (best); the value written in the cell.
            let lerp = |a: f64, b: f64| (a + (b - a) * t) as u8;
            let color = RGBColor(lerp(239.0, 8.0), lerp(243.0, 69.0), lerp(255.0, 148.0));
            chart.draw_series(std::iter::once(Rectangle::new(
                [(i as f64, j as f64), (i as f64 + 1.0, j as f64 + 1.0)],
                color.filled(),
            )))?;
            let ink = if t > 0.55 { WHITE } else { BLACK };
            chart.draw_series(std::iter::once(Text::new(
                fmt(*v),
                (i as f64 + 0.3, j as f64 + 0.5),
                ("sans-serif", 12).into_font().color(&ink),
            )))?;
        }
    }
    root.present()?;
    Ok(true)
}

/// A stage's Markdown summary (evaluate's `tables.md`) as HTML: tables as tables. Raw HTML
/// in it is shown as text, never interpreted (it may carry the data's strings).
pub fn markdown(text: &str) -> String {
    use pulldown_cmark::{Event, Options, Parser};
    let events = Parser::new_ext(text, Options::ENABLE_TABLES).map(|e| match e {
        Event::Html(h) | Event::InlineHtml(h) => Event::Text(h),
        other => other,
    });
    let mut out = String::new();
    pulldown_cmark::html::push_html(&mut out, events);
    out
}

/// Default report directory.
pub fn default_out(experiment: &str) -> PathBuf {
    PathBuf::from(format!("report-{experiment}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn axes_keep_small_constant_values_readable() {
        let (lo, hi) = range([0.001, 0.001].into_iter());
        assert!(lo > 0.0 && hi < 0.002 && lo < 0.001 && hi > 0.001, "{lo} {hi}");
        assert_eq!(range([0.0].into_iter()), (-0.5, 0.5));
        let (lo, hi) = range([1.0, 3.0].into_iter());
        assert!((lo - 0.9).abs() < 1e-12 && (hi - 3.1).abs() < 1e-12);
        let t: Vec<String> = [0.0005, 0.00125, 0.5, 2.0, 1234.5678, 1.6192e-5, 0.0].iter().map(tick).collect();
        assert_eq!(t, ["5e-4", "0.00125", "0.5", "2", "1235", "1.619e-5", "0"]);
    }

    #[test]
    fn markdown_tables_become_html_and_raw_html_stays_text() {
        let h = markdown("### Table 1\n\n| query | R@1 |\n|---|---|\n| <script>x</script> | 0.91 |\n");
        assert!(h.contains("<table>") && h.contains("<th>query</th>") && h.contains("<td>0.91</td>"), "{h}");
        assert!(!h.contains("<script>") && h.contains("&lt;script&gt;"), "{h}");
    }

    #[test]
    fn bands_are_mean_min_max_per_step() {
        let b = band(&[vec![(1.0, 1.0), (2.0, 4.0)], vec![(1.0, 3.0), (2.0, 2.0)], vec![(1.0, 2.0)]]);
        assert_eq!(b, vec![(1.0, 2.0, 1.0, 3.0), (2.0, 3.0, 2.0, 4.0)]);
    }
}
