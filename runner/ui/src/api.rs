//! What the pages' scripts ask for: the chart library and the app's own script (built into
//! the binary), the database's version (for live updates) and a set of runs' curves.

use std::collections::BTreeMap;

use axum::extract::{Path as UrlPath, RawQuery, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use huse_report::table::{Cell, Table, varying_params};
use huse_store::{RunRow, Slice};
use serde::Serialize;

use crate::{Problem, Shared, internal, query_pairs, run_ids};

/// The most runs one curves request reads.
pub const CURVE_RUNS: usize = 500;
/// The most rows of a view the page's charts get.
pub const CHART_ROWS: usize = 2000;

/// The files under `/assets/`: the chart library (a custom Apache ECharts build, see
/// `assets/build/`), its licences, and the app's script. Nothing else is served.
const ASSETS: [(&str, &str, &[u8]); 5] = [
    ("echarts.js", "text/javascript; charset=utf-8", include_bytes!("../assets/echarts.js")),
    ("app.js", "text/javascript; charset=utf-8", include_bytes!("../assets/app.js")),
    ("LICENSE-echarts", "text/plain; charset=utf-8", include_bytes!("../assets/LICENSE-echarts")),
    ("NOTICE-echarts", "text/plain; charset=utf-8", include_bytes!("../assets/NOTICE-echarts")),
    ("LICENSE-zrender", "text/plain; charset=utf-8", include_bytes!("../assets/LICENSE-zrender")),
];

pub(crate) async fn asset(UrlPath(name): UrlPath<String>) -> Response {
    match ASSETS.iter().find(|(n, _, _)| *n == name) {
        Some((_, kind, bytes)) => {
            ([(header::CONTENT_TYPE, *kind), (header::CACHE_CONTROL, "max-age=3600")], *bytes).into_response()
        }
        None => Problem(StatusCode::NOT_FOUND, format!("no asset `{name}`")).into_response(),
    }
}

/// `/api/version`: changes whenever a run is recorded, changes state or logs a metric.
pub(crate) async fn version(State(app): State<Shared>) -> Result<Response, Problem> {
    let v = app.store.version().await.map_err(internal)?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8"), (header::CACHE_CONTROL, "no-store")], v).into_response())
}

/// One line of a curves chart: a run, or a group of runs (mean and min-max band per step).
#[derive(Debug, Serialize)]
struct Series {
    name: String,
    runs: Vec<i64>,
    /// [step, mean, min, max]
    points: Vec<[f64; 4]>,
}

#[derive(Debug, Serialize)]
struct Curves {
    /// Every multi-step metric of the runs, in natural order.
    keys: Vec<String>,
    /// The one drawn (asked for, else the first).
    key: Option<String>,
    series: Vec<Series>,
    /// Runs asked for beyond [`CURVE_RUNS`], left out.
    left_out: usize,
}

/// `/api/curves?exp=NAME&ids=1,2,3[&key=K][&group=1[&by=P,Q]]`: the runs' curves of one
/// metric, each run its own line, or with `group` one line per combination of the params `by`
/// (every varying one but the seed when none; the rest pooled: mean and min-max band).
pub(crate) async fn curves(State(app): State<Shared>, RawQuery(raw): RawQuery) -> Result<Response, Problem> {
    let (mut exp, mut ids, mut key, mut group, mut by) = (None, Vec::new(), None, false, Vec::<String>::new());
    for (k, v) in raw.as_deref().map(query_pairs).unwrap_or_default() {
        match k.as_str() {
            "exp" => exp = Some(v),
            "ids" => ids.extend(run_ids(&v)?),
            "key" if !v.is_empty() => key = Some(v),
            "group" => group = v == "1",
            "by" => by.extend(v.split(',').filter(|s| !s.is_empty()).map(String::from)),
            _ => {}
        }
    }
    let left_out = ids.len().saturating_sub(CURVE_RUNS);
    ids.truncate(CURVE_RUNS);
    let slice = Slice { experiment: exp, ids: Some(ids.clone()), keys: Some(Vec::new()), with_runs: true };
    let runs = app.store.runs_slice(&slice).await.map_err(internal)?;
    let by_id: BTreeMap<i64, &RunRow> = runs.iter().map(|r| (r.id, r)).collect();
    let chosen: Vec<RunRow> = ids.iter().filter_map(|i| by_id.get(i).map(|r| (*r).clone())).collect();
    if chosen.len() < ids.len() {
        return Err(Problem(StatusCode::NOT_FOUND, "a run asked for is not there".into()));
    }
    let mut all: Vec<(i64, BTreeMap<String, Vec<(f64, f64)>>)> = Vec::new();
    for r in &chosen {
        all.push((r.id, huse_report::html::curves(&app.store, r.id).await.map_err(internal)?));
    }
    let mut keys: Vec<String> = all
        .iter()
        .flat_map(|(_, c)| c.keys().cloned())
        .collect::<std::collections::BTreeSet<_>>()
        .into_iter()
        .collect();
    keys.sort_by(|a, b| huse_report::table::natural_cmp(a, b));
    let key = key.filter(|k| keys.contains(k)).or_else(|| keys.first().cloned());
    let mut series = Vec::new();
    if let Some(k) = &key {
        // The line each run belongs to, in the order asked.
        let label: Vec<String> = if group {
            let params: Vec<String> = if by.is_empty() {
                varying_params(&chosen).into_iter().filter(|p| p != "seed").collect()
            } else {
                by.clone()
            };
            chosen
                .iter()
                .map(|r| {
                    let parts: Vec<String> = params
                        .iter()
                        .map(|p| format!("{p}={}", r.params.get(p).map(String::as_str).unwrap_or("")))
                        .collect();
                    if parts.is_empty() { "all runs".to_string() } else { parts.join(", ") }
                })
                .collect()
        } else {
            chosen.iter().map(|r| format!("#{} {}", r.id, r.name)).collect()
        };
        let mut lines: Vec<(String, Vec<i64>, Vec<Vec<(f64, f64)>>)> = Vec::new();
        for ((id, c), name) in all.iter().zip(label) {
            let Some(points) = c.get(k) else { continue };
            match lines.iter_mut().find(|(n, _, _)| *n == name) {
                Some((_, ids, s)) => {
                    ids.push(*id);
                    s.push(points.clone());
                }
                None => lines.push((name, vec![*id], vec![points.clone()])),
            }
        }
        for (name, runs, s) in lines {
            let points = huse_report::html::band(&s).into_iter().map(|(x, m, lo, hi)| [x, m, lo, hi]).collect();
            series.push(Series { name, runs, points });
        }
    }
    let body = serde_json::to_string(&Curves { keys, key, series, left_out }).map_err(|e| internal(e.into()))?;
    Ok(([(header::CONTENT_TYPE, "application/json"), (header::CACHE_CONTROL, "no-store")], body).into_response())
}

/// What the runs page's charts draw: the view's columns and rows (at most [`CHART_ROWS`]),
/// the axes worth drawing (the columns that vary), and the runs behind the view.
#[derive(Debug, Serialize)]
pub(crate) struct ViewData {
    pub exp: String,
    pub group: bool,
    /// The params a grouped view is by (empty: every varying one but the seed).
    pub by: Vec<String>,
    pub columns: Vec<String>,
    /// Per row, per column: a number, a string or null.
    pub rows: Vec<Vec<serde_json::Value>>,
    /// Per row: the run's id (None in a grouped view).
    pub ids: Vec<Option<i64>>,
    /// Columns that vary across the rows (params and metrics): the charts' default axes.
    pub axes: Vec<String>,
    /// The runs in the view, in its order (for the curves).
    pub run_ids: Vec<i64>,
    /// Rows of the view beyond [`CHART_ROWS`], left out of the charts.
    pub left_out: usize,
}

/// A cell as a chart reads it: numbers (a group's mean), text that is a number, other text.
fn value(c: &Cell) -> serde_json::Value {
    use serde_json::Value;
    let num = |v: f64| serde_json::Number::from_f64(v).map(Value::Number).unwrap_or(Value::Null);
    match c {
        Cell::Int(i) => Value::from(*i),
        Cell::Num(Some(v)) | Cell::MeanStd(v, _, _) => num(*v),
        Cell::Text(s) => {
            s.parse::<f64>().ok().filter(|v| v.is_finite()).map(num).unwrap_or_else(|| Value::from(s.clone()))
        }
        Cell::Num(None) | Cell::Empty => Value::Null,
    }
}

impl ViewData {
    /// The first [`CHART_ROWS`] rows of `t`, a view of `total` rows.
    pub fn new(exp: &str, group: bool, t: &Table, total: usize, run_ids: Vec<i64>) -> ViewData {
        let id_col = t.headers.iter().position(|h| h == "id");
        let rows: Vec<Vec<serde_json::Value>> =
            t.rows.iter().take(CHART_ROWS).map(|r| r.iter().map(value).collect()).collect();
        let ids = t
            .rows
            .iter()
            .take(CHART_ROWS)
            .map(|r| {
                id_col.and_then(|i| match r[i] {
                    Cell::Int(v) => Some(v),
                    _ => None,
                })
            })
            .collect();
        let axes = t
            .headers
            .iter()
            .enumerate()
            .filter(|(_, h)| !["id", "experiment", "name", "status", "runs"].contains(&h.as_str()))
            .filter(|(i, _)| {
                let vals: std::collections::BTreeSet<String> =
                    rows.iter().map(|r| r[*i].to_string()).filter(|v| v != "null").collect();
                // Varies, and is a number or one of a few names.
                vals.len() > 1 && (rows.iter().all(|r| !r[*i].is_string()) || vals.len() <= 30)
            })
            .map(|(_, h)| h.clone())
            .collect();
        ViewData {
            exp: exp.to_string(),
            group,
            by: Vec::new(),
            columns: t.headers.clone(),
            left_out: total.saturating_sub(CHART_ROWS),
            rows,
            ids,
            axes,
            run_ids,
        }
    }

    /// As a `<script type="application/json">` element's text (no `<` that could end it).
    pub fn script(&self) -> String {
        let json = serde_json::to_string(self).unwrap_or_else(|_| "null".into());
        format!("<script type=\"application/json\" id=\"view-data\">{}</script>", json.replace('<', "\\u003c"))
    }
}
