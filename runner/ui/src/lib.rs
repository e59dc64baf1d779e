//! `huse-run ui`: the results app — one web page over the results database (SQLite or
//! PostgreSQL, opened read-only), built on the same pieces as the query commands:
//!
//! - `/`: the experiments, their runs by state and their last activity;
//! - `/exp/NAME`: the experiment's runs table — by default the id, name, state, the params that
//!   vary and the stages' headline metrics (`cols=` or the column picker for others, `all=1` for
//!   every one); sort by any column; a filter in the search language
//!   ([`huse_store::search_lang`], a mistake is a 400 that points at its column); grouping over
//!   seeds (or by chosen params) with mean ± std and n; each metric as its last value or its
//!   min, max or mean over the run's history; 100 rows a page; `format=csv` for the current
//!   view. The runs are kept in memory and brought up to date per request (`cache`), so a
//!   page of 100,000 runs answers in a fraction of a second;
//!   Above the table, charts of the view ([`api::ViewData`]): parallel coordinates over what
//!   varies (brushing an axis narrows the table), a scatter of any two columns, and any
//!   multi-step metric overlaid across the view's runs or groups (mean line and min-max band,
//!   log axis, smoothing). The page follows the database: new runs and growing curves appear
//!   without a reload (it polls `/api/version`);
//! - `/run/ID`: a run — its fields, params, stages (times, cache keys), final metrics, its
//!   curves as charts, its retrieval gallery, the stages' summaries (the paper's tables), its
//!   resolved config, and a search box when it has a trained model;
//! - `/compare?ids=1,2,3`: runs side by side, the rows that differ marked, curves overlaid.
//!
//! The charts are Apache ECharts (a custom build vendored in `assets/`, with its licence),
//! served from the binary: the app works offline.
//!
//! Every string from the database is escaped. With a token ([`Settings::token`]) every
//! request must carry it (`Authorization: Bearer T`, the `huse_ui_token` cookie, or `?token=T`
//! once, which sets the cookie); without it a request is a 401. The only files read are a
//! run's own dataset photos, by item id, through [`SearchApps::item_image`]; a trained run's
//! search page (`/run/ID/search`) is `huse-run serve`'s, made by [`SearchApps::app`].

mod api;
mod cache;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::sync::Arc;

pub use axum::Router;
use axum::extract::{Path as UrlPath, RawQuery, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use huse_report::html::{esc, url_enc};
use huse_report::table::{self, Cell, Format, Table};
use huse_store::{Store, search_lang};

/// Rows of the runs table per page.
pub const PAGE: usize = 100;

/// Trained runs' search pages kept loaded at once (a full-data run's index is ~180 MB).
pub const SEARCHES_KEPT: usize = 4;

/// A boxed future, as [`SearchApps`]' methods return.
pub type BoxFuture<'a, T> = std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>>;

/// Where a trained run's search page comes from. The runner provides it (it knows which stage
/// made a run's model and how to load its encoders); the app only asks.
pub trait SearchApps: Send + Sync {
    /// Whether run `id` has a trained model to search with.
    fn has_model(&self, id: i64) -> BoxFuture<'_, bool>;
    /// The search page of run `id` (`huse-run serve`'s), its links under `base`.
    fn app(&self, id: i64, base: String) -> BoxFuture<'_, anyhow::Result<Router>>;
    /// The image file of item `item` (its id) of run `id`'s dataset, if it has one.
    fn item_image(&self, id: i64, item: String) -> BoxFuture<'_, Option<std::path::PathBuf>>;
}

/// What the app is told at start.
#[derive(Clone, Default)]
pub struct Settings {
    /// The stages' headline metrics (keys or globs): the runs table's default metric columns.
    pub headline: Vec<String>,
    /// A token every request must carry (None: none needed, for loopback use).
    pub token: Option<String>,
    /// Trained runs' search pages, under `/run/ID/search` (None: no search).
    pub search: Option<Arc<dyn SearchApps>>,
}

impl std::fmt::Debug for Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settings")
            .field("headline", &self.headline)
            .field("token", &self.token.as_ref().map(|_| "***"))
            .field("search", &self.search.is_some())
            .finish()
    }
}

struct App {
    store: Store,
    settings: Settings,
    cache: cache::Cache,
    /// The search pages of the runs searched last, most recent last (each holds its run's item
    /// embeddings in memory: at most [`SEARCHES_KEPT`] are kept).
    searches: tokio::sync::Mutex<Vec<(i64, Router)>>,
}

type Shared = Arc<App>;

/// The app over `store` (open it read-only).
pub fn app(store: Store, settings: Settings) -> Router {
    let state = Arc::new(App { store, settings, cache: cache::Cache::default(), searches: Default::default() });
    Router::new()
        .route("/", get(experiments))
        .route("/exp/{name}", get(runs_page))
        .route("/run/{id}", get(run_page))
        .route("/compare", get(compare_page))
        .route("/run/{id}/search", axum::routing::any(search))
        .route("/run/{id}/photo/{item}", get(photo))
        .route("/run/{id}/search/{*rest}", axum::routing::any(search))
        .route("/assets/{name}", get(api::asset))
        .route("/api/version", get(api::version))
        .route("/api/curves", get(api::curves))
        .fallback(|| async { Problem(StatusCode::NOT_FOUND, "no such page".into()) })
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .with_state(state)
}

/// A 4xx (or 500) with a one-line reason, as a small page.
struct Problem(StatusCode, String);

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        let body = page("error", &format!("<p class=\"err\">{} — {}</p>", self.0.as_u16(), esc(&self.1)));
        (self.0, body).into_response()
    }
}

fn internal(e: anyhow::Error) -> Problem {
    Problem(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
}

/// Equal strings, in time that does not depend on where they differ.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

const COOKIE: &str = "huse_ui_token";

async fn auth(State(app): State<Shared>, req: Request, next: Next) -> Response {
    let Some(token) = &app.settings.token else { return next.run(req).await };
    let headers = req.headers();
    let bearer = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| same(t, token));
    let cookie = cookie(headers, COOKIE).is_some_and(|t| same(&t, token));
    let in_query =
        req.uri().query().map(query_pairs).is_some_and(|q| q.iter().any(|(k, v)| k == "token" && same(v, token)));
    if !(bearer || cookie || in_query) {
        return Problem(StatusCode::UNAUTHORIZED, "this server needs its token (?token=...)".into()).into_response();
    }
    let mut resp = next.run(req).await;
    if in_query && !cookie {
        let set = format!("{COOKIE}={token}; HttpOnly; SameSite=Strict; Path=/");
        if let Ok(v) = set.parse() {
            resp.headers_mut().insert(header::SET_COOKIE, v);
        }
    }
    resp
}

fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        v.split(';').find_map(|kv| kv.trim().strip_prefix(name).and_then(|r| r.strip_prefix('=')).map(String::from))
    })
}

/// `a=1&b=x+y&b=%C3%A9` -> [(a, 1), (b, x y), (b, é)]; repeated keys kept.
fn query_pairs(q: &str) -> Vec<(String, String)> {
    fn decode(s: &str) -> String {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match b[i] {
                b'+' => out.push(b' '),
                b'%' if i + 2 < b.len() => {
                    match u8::from_str_radix(std::str::from_utf8(&b[i + 1..i + 3]).unwrap_or("zz"), 16) {
                        Ok(v) => {
                            out.push(v);
                            i += 2;
                        }
                        Err(_) => out.push(b'%'),
                    }
                }
                c => out.push(c),
            }
            i += 1;
        }
        String::from_utf8_lossy(&out).into_owned()
    }
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => (decode(k), decode(v)),
            None => (decode(p), String::new()),
        })
        .collect()
}

fn page(title: &str, body: &str) -> Html<String> {
    page_with(title, body, false)
}

/// A page; with `charts`, the chart library and the app's script load after the body.
fn page_with(title: &str, body: &str, charts: bool) -> Html<String> {
    let scripts = if charts {
        "<p class=\"note\">Charts: <a href=\"https://echarts.apache.org/\">Apache ECharts</a> 5.6 \
         (<a href=\"/assets/LICENSE-echarts\">licence</a>, <a href=\"/assets/NOTICE-echarts\">notice</a>, \
         <a href=\"/assets/LICENSE-zrender\">zrender</a>).</p>\
         <script src=\"/assets/echarts.js\"></script><script src=\"/assets/app.js\"></script>"
    } else {
        ""
    };
    Html(format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>{t} — huse-run</title><style>\
         body{{font-family:sans-serif;margin:1.5em;background:#fafafa;color:#222}} a{{color:#0645ad}}\
         table{{border-collapse:collapse;font-size:13px;background:#fff}} td,th{{border:1px solid #ccc;padding:3px 6px;text-align:right;white-space:nowrap}}\
         th{{background:#f0f0f0}} td.t,th.t{{text-align:left}} .scroll{{overflow-x:auto;max-width:100%}} .err{{color:#b00}}\
         input[type=text]{{width:40em;padding:4px;font-family:monospace}} form{{margin:0.6em 0}} .note{{color:#666;font-size:13px}}\
         .pager a,.pager b{{margin-right:0.6em}} pre{{background:#f4f4f4;padding:8px;overflow:auto}} .charts img,.charts svg{{margin:4px}}\
         details{{margin:0.5em 0}} .cols label{{display:inline-block;margin-right:1em;font-size:13px}}\
         tr.diff td{{background:#fff6d5}} .chart{{width:100%;height:290px;background:#fff;border:1px solid #ddd;margin:4px 0}}\
         #charts{{display:grid;grid-template-columns:minmax(0,1fr) minmax(0,1fr);gap:0 16px}} #charts .wide{{grid-column:1/-1}}\
         .ctl{{font-size:13px;margin:4px 0}} .ctl select{{max-width:22em}} #charts h3{{margin:0.8em 0 0.2em;font-size:15px}}</style></head>\
         <body><h1><a href=\"/\">huse-run</a> — {t}</h1>{body}{scripts}</body></html>",
        t = esc(title)
    ))
}

async fn experiments(State(app): State<Shared>) -> Result<Html<String>, Problem> {
    let list = app.store.experiment_summaries().await.map_err(internal)?;
    let mut body = String::from(
        "<table><tr><th class=\"t\">experiment</th><th>runs</th><th class=\"t\">by state</th><th class=\"t\">last activity</th></tr>",
    );
    for e in &list {
        let total: i64 = e.by_state.iter().map(|(_, n)| n).sum();
        let states: Vec<String> = e.by_state.iter().map(|(s, n)| format!("{n} {}", esc(s))).collect();
        write!(
            body,
            "<tr><td class=\"t\"><a href=\"/exp/{u}\">{n}</a></td><td>{total}</td><td class=\"t\">{s}</td><td class=\"t\">{l}</td></tr>",
            u = url_enc(&e.name),
            n = esc(&e.name),
            s = states.join(", "),
            l = esc(e.last_activity.as_deref().unwrap_or(""))
        )
        .ok();
    }
    body.push_str("</table>");
    if list.is_empty() {
        body.push_str("<p class=\"note\">No experiments yet: run one (`huse-run experiments/quick.yaml`).</p>");
    }
    Ok(page("experiments", &body))
}

/// The runs table's settings, from the query string.
#[derive(Debug, Default, Clone)]
struct View {
    q: String,
    sort: Option<String>,
    desc: bool,
    page: usize,
    group: bool,
    /// Params to group by (none: every param that varies but the seed).
    by: Vec<String>,
    all: bool,
    cols: Vec<String>,
    csv: bool,
    /// Each metric's value over a run's history (None: its last).
    value: Option<huse_store::Agg>,
}

impl View {
    fn parse(raw: Option<&str>) -> View {
        let mut v = View::default();
        for (k, val) in raw.map(query_pairs).unwrap_or_default() {
            let on = ["1", "on", "true", "yes"].contains(&val.as_str());
            match k.as_str() {
                "q" => v.q = val,
                "sort" if !val.is_empty() => v.sort = Some(val),
                "desc" => v.desc = on,
                "page" => v.page = val.parse().unwrap_or(0),
                "group" => v.group = on,
                "by" => v.by.extend(val.split(',').filter(|c| !c.is_empty()).map(String::from)),
                "all" => v.all = on,
                // `cols=a,b` or one `col=` per checked box.
                "cols" => v.cols.extend(val.split(',').filter(|c| !c.is_empty()).map(String::from)),
                "col" if !val.is_empty() => v.cols.push(val),
                "format" => v.csv = val == "csv",
                "value" => {
                    v.value = match val.as_str() {
                        "min" => Some(huse_store::Agg::Min),
                        "max" => Some(huse_store::Agg::Max),
                        "mean" => Some(huse_store::Agg::Mean),
                        _ => None,
                    }
                }
                _ => {}
            }
        }
        v
    }

    /// This view's address with some settings changed.
    fn href(&self, exp: &str, change: impl FnOnce(&mut View)) -> String {
        let mut v = self.clone();
        change(&mut v);
        let mut parts = Vec::new();
        if !v.q.is_empty() {
            parts.push(format!("q={}", url_enc(&v.q)));
        }
        if let Some(s) = &v.sort {
            parts.push(format!("sort={}", url_enc(s)));
        }
        for (on, name) in [(v.desc, "desc"), (v.group, "group"), (v.all, "all"), (v.csv, "format=csv")] {
            if on {
                parts.push(if name.contains('=') { name.to_string() } else { format!("{name}=1") });
            }
        }
        if v.page > 0 {
            parts.push(format!("page={}", v.page));
        }
        if let Some(a) = v.value {
            parts.push(format!("value={}", agg_name(a)));
        }
        if v.group && !v.by.is_empty() {
            parts.push(format!("by={}", url_enc(&v.by.join(","))));
        }
        if !v.cols.is_empty() {
            parts.push(format!("cols={}", url_enc(&v.cols.join(","))));
        }
        format!("/exp/{}{}{}", url_enc(exp), if parts.is_empty() { "" } else { "?" }, parts.join("&"))
    }
}

/// A comma-separated list of run ids (`1,4`), as `ids=` takes it; a mistake is a 400.
fn run_ids(v: &str) -> Result<Vec<i64>, Problem> {
    v.split(',')
        .filter(|s| !s.is_empty())
        .map(|s| s.parse().map_err(|_| Problem(StatusCode::BAD_REQUEST, format!("`{s}` is not a run id"))))
        .collect()
}

fn agg_name(a: huse_store::Agg) -> &'static str {
    match a {
        huse_store::Agg::Min => "min",
        huse_store::Agg::Max => "max",
        huse_store::Agg::Mean => "mean",
    }
}

fn bad_request(e: anyhow::Error) -> Problem {
    Problem(StatusCode::BAD_REQUEST, format!("{e:#}"))
}

async fn runs_page(
    State(app): State<Shared>,
    UrlPath(exp): UrlPath<String>,
    RawQuery(raw): RawQuery,
) -> Result<Response, Problem> {
    let experiments = app.store.experiments().await.map_err(internal)?;
    if !experiments.contains(&exp) {
        return Err(Problem(StatusCode::NOT_FOUND, format!("no experiment `{exp}`")));
    }
    let view = View::parse(raw.as_deref());
    let bad =
        |e: search_lang::ParseError| Problem(StatusCode::BAD_REQUEST, format!("filter {e}: {}", e.caret(&view.q)));
    let expr = if view.q.trim().is_empty() { None } else { Some(search_lang::parse(&view.q).map_err(bad)?) };
    // The metrics this view shows or uses: the headline ones, and those its filter, sort and
    // columns name (every one for `all`).
    let headline = table::patterns(&app.settings.headline).map_err(bad_request)?;
    let want = if view.all {
        cache::Want::All
    } else {
        let mut names: BTreeSet<String> = view.cols.iter().chain(view.sort.iter()).cloned().collect();
        names.extend(expr.iter().flat_map(|e| e.names()).map(|(n, _)| n.to_string()));
        cache::Want::Names(names, headline.clone())
    };
    let (cached, metric_names) = app.cache.runs(&app.store, &exp, &want).await.map_err(internal)?;
    // Another value than the last: the metrics the view uses, summed up over each run's history.
    let summed: Vec<huse_store::RunRow>;
    let mut runs: Vec<&huse_store::RunRow> = if let Some(agg) = view.value {
        let names: BTreeSet<String> = match &want {
            cache::Want::All => metric_names.clone(),
            cache::Want::Names(named, patterns) => metric_names
                .iter()
                .filter(|n| named.contains(*n) || patterns.iter().any(|p| p.matches(n)))
                .cloned()
                .collect(),
        };
        let keys = app.cache.logged_keys(&names).await;
        let mut by_run: BTreeMap<i64, Vec<(String, String, Option<f64>)>> = BTreeMap::new();
        for (id, stage, key, v) in app.store.metric_aggregates(&exp, &keys, agg).await.map_err(internal)? {
            by_run.entry(id).or_default().push((stage, key, v));
        }
        summed = cached
            .iter()
            .map(|r| {
                let rows = by_run.remove(&r.id).unwrap_or_default();
                let metrics = huse_store::query::qualified(rows.iter().map(|(s, k, _)| (s.as_str(), k.as_str())))
                    .into_iter()
                    .zip(&rows)
                    .map(|(n, (_, _, v))| (n, *v))
                    .collect();
                huse_store::RunRow { run: r.run.clone(), params: r.params.clone(), metrics }
            })
            .collect();
        summed.iter().collect()
    } else {
        cached.iter().collect()
    };
    if let Some(expr) = &expr {
        let mut known: BTreeSet<String> = search_lang::RUN_FIELDS.iter().map(|s| s.to_string()).collect();
        let params: BTreeSet<&String> = runs.iter().flat_map(|r| r.params.keys()).collect();
        known.extend(params.into_iter().cloned());
        known.extend(metric_names.iter().cloned());
        expr.check_names(&known).map_err(bad)?;
        runs.retain(|r| expr.eval(&|n| search_lang::value_of(r, n)));
    }
    // Every column there is, for the picker: fields, the params that vary, every metric.
    let mut picker: Vec<String> = ["id", "name", "status"].iter().map(|s| s.to_string()).collect();
    if view.group {
        picker = vec!["runs".into()];
    }
    let varying = table::varying_params(&runs);
    picker.extend(varying.iter().filter(|p| !view.group || *p != "seed").cloned());
    let mut metric_list: Vec<&String> = metric_names.iter().collect();
    metric_list.sort_by(|a, b| table::natural_cmp(a, b));
    picker.extend(metric_list.into_iter().cloned());
    let total;
    let t = if view.group || view.csv || view.all || !view.cols.is_empty() {
        let globs: &[glob::Pattern] = if view.cols.is_empty() && !view.all { &headline } else { &[] };
        let mut t = if view.group {
            let metrics = table::metric_columns(&runs, globs);
            let by: Vec<String> = if view.by.is_empty() {
                varying.iter().filter(|p| *p != "seed").cloned().collect()
            } else {
                for b in &view.by {
                    if !runs.iter().any(|r| r.params.contains_key(b)) {
                        return Err(Problem(
                            StatusCode::BAD_REQUEST,
                            format!("cannot group by `{b}`: no run has that param (varying: {})", varying.join(", ")),
                        ));
                    }
                }
                view.by.clone()
            };
            table::group_rows(&runs, &by, &metrics)
        } else {
            table::runs_table(&runs, globs, false)
        };
        if !view.cols.is_empty() {
            t.select(&view.cols).map_err(bad_request)?;
        } else if !view.group {
            t.remove_column("experiment");
        }
        if let Some(s) = &view.sort {
            t.sort_by(s, view.desc).map_err(bad_request)?;
        }
        total = t.rows.len();
        t
    } else {
        // The default view: sort the runs themselves, then build only the rows the page and
        // its charts show (a page of 100 among 100,000 runs does not build 100,000 rows).
        let (params, metrics) = (&varying, table::metric_columns(&runs, &headline));
        if let Some(col) = &view.sort {
            let known =
                ["id", "name", "status"].iter().any(|f| f == col) || params.contains(col) || metrics.contains(col);
            if !known {
                let mut cols: Vec<String> = ["id", "name", "status"].iter().map(|s| s.to_string()).collect();
                cols.extend(params.iter().chain(&metrics).cloned());
                return Err(Problem(
                    StatusCode::BAD_REQUEST,
                    format!("cannot sort by `{col}`: no such column (columns: {})", cols.join(", ")),
                ));
            }
            let mut keyed: Vec<(Cell, &huse_store::RunRow)> =
                runs.iter().map(|r| (table::run_cell(r, col), *r)).collect();
            keyed.sort_by(|a, b| a.0.order(&b.0, view.desc));
            runs = keyed.into_iter().map(|(_, r)| r).collect();
        }
        total = runs.len();
        let shown = api::CHART_ROWS.max((view.page + 1) * PAGE).min(runs.len());
        let mut t = table::runs_rows(&runs[..shown], params, &metrics);
        t.remove_column("experiment");
        t
    };
    if view.csv {
        return Ok((
            [
                (header::CONTENT_TYPE, "text/csv; charset=utf-8"),
                (header::CONTENT_DISPOSITION, "attachment; filename=\"runs.csv\""),
            ],
            t.render(Format::Csv),
        )
            .into_response());
    }
    let pages = total.div_ceil(PAGE).max(1);
    let pg = view.page.min(pages - 1);
    // The runs behind the view, in its order, for the curves (a group pools its members).
    let run_ids: Vec<i64> = if view.group {
        runs.iter().take(api::CHART_ROWS).map(|r| r.id).collect()
    } else {
        let id_col = t.headers.iter().position(|h| h == "id");
        t.rows
            .iter()
            .take(api::CHART_ROWS)
            .filter_map(|r| id_col.and_then(|i| if let Cell::Int(v) = r[i] { Some(v) } else { None }))
            .collect()
    };
    let mut data = api::ViewData::new(&exp, view.group, &t, total, run_ids);
    data.by = view.by.clone();
    let mut body = String::new();
    // The filter and the switches.
    write!(
        body,
        "<form method=\"get\" action=\"/exp/{u}\"><input type=\"text\" name=\"q\" value=\"{q}\" placeholder=\"test.acc.both &gt; 0.9 and (train.beta in (0, 0.5) or state = failed)\"> \
         <label><input type=\"checkbox\" name=\"group\" value=\"1\"{g}> group over seeds (mean ± std)</label>{by} {value} \
         <label><input type=\"checkbox\" name=\"all\" value=\"1\"{a}> every column</label>{sort}{cols} <button type=\"submit\">show</button></form>",
        u = url_enc(&exp),
        q = esc(&view.q),
        g = if view.group { " checked" } else { "" },
        value = {
            let opts: Vec<String> = [None, Some(huse_store::Agg::Min), Some(huse_store::Agg::Max), Some(huse_store::Agg::Mean)]
                .iter()
                .map(|a| {
                    let name = a.map(agg_name).unwrap_or("last");
                    format!("<option value=\"{name}\"{s}>{name}</option>", s = if *a == view.value { " selected" } else { "" })
                })
                .collect();
            format!("<label>values: <select name=\"value\">{}</select></label>", opts.join(""))
        },
        by = {
            let params: Vec<&String> = varying.iter().filter(|p| *p != "seed").collect();
            if params.len() < 2 {
                String::new()
            } else {
                let boxes: Vec<String> = params
                    .iter()
                    .map(|p| {
                        format!(
                            "<label><input type=\"checkbox\" name=\"by\" value=\"{v}\"{c}> {v}</label>",
                            v = esc(p),
                            c = if view.by.contains(p) { " checked" } else { "" }
                        )
                    })
                    .collect();
                format!(" <span class=\"note\">by (none: all)</span> {}", boxes.join(" "))
            }
        },
        a = if view.all { " checked" } else { "" },
        sort = view
            .sort
            .as_ref()
            .map(|s| format!("<input type=\"hidden\" name=\"sort\" value=\"{}\">{}", esc(s), if view.desc { "<input type=\"hidden\" name=\"desc\" value=\"1\">" } else { "" }))
            .unwrap_or_default(),
        cols = if view.cols.is_empty() { String::new() } else { format!("<input type=\"hidden\" name=\"cols\" value=\"{}\">", esc(&view.cols.join(","))) },
    )
    .ok();
    // The column picker: every column of the full table, the shown ones checked.
    let shown: BTreeSet<&String> = t.headers.iter().collect();
    body.push_str("<details><summary>columns</summary><form method=\"get\" class=\"cols\">");
    if !view.q.is_empty() {
        write!(body, "<input type=\"hidden\" name=\"q\" value=\"{}\">", esc(&view.q)).ok();
    }
    if view.group {
        body.push_str("<input type=\"hidden\" name=\"group\" value=\"1\">");
    }
    if let Some(a) = view.value {
        write!(body, "<input type=\"hidden\" name=\"value\" value=\"{}\">", agg_name(a)).ok();
    }
    for h in &picker {
        write!(
            body,
            "<label><input type=\"checkbox\" name=\"col\" value=\"{v}\"{c}> {v}</label>",
            v = esc(h),
            c = if shown.contains(h) { " checked" } else { "" }
        )
        .ok();
    }
    body.push_str(" <button type=\"submit\">use these columns</button></form></details>");
    // The charts (drawn by app.js from the view's data), then the part that live updates swap.
    body.push_str("<div id=\"charts\"></div><div id=\"live\">");
    if !view.group {
        body.push_str("<form id=\"cmp\" method=\"get\" action=\"/compare\"><button type=\"submit\">compare the ticked runs</button></form>");
    }
    write!(
        body,
        "<p class=\"note\">{total} {what} of {n} run(s){filt}. <a href=\"{csv}\">CSV of this view</a></p>",
        what = if view.group { "group(s)" } else { "run(s)" },
        n = runs.len(),
        filt = if view.q.is_empty() { String::new() } else { " passing the filter".into() },
        csv = esc(&view.href(&exp, |v| v.csv = true)),
    )
    .ok();
    body.push_str(&html_table(&t, pg, &exp, &view));
    if pages > 1 {
        body.push_str("<p class=\"pager\">page ");
        for p in 0..pages {
            if p == pg {
                write!(body, "<b>{}</b>", p + 1).ok();
            } else {
                write!(body, "<a href=\"{}\">{}</a>", esc(&view.href(&exp, |v| v.page = p)), p + 1).ok();
            }
        }
        body.push_str("</p>");
    }
    body.push_str(&data.script());
    body.push_str("</div>");
    Ok(page_with(&format!("experiment {exp}"), &body, true).into_response())
}

/// One page of `t` as HTML: headers link to sorting by them, ids to the run's page.
fn html_table(t: &Table, pg: usize, exp: &str, view: &View) -> String {
    let mut s = String::from("<div class=\"scroll\"><table id=\"runs\"><tr>");
    for h in &t.headers {
        let (desc, mark) = match &view.sort {
            Some(cur) if cur == h => (!view.desc, if view.desc { " ▼" } else { " ▲" }),
            _ => (false, ""),
        };
        let href = view.href(exp, |v| {
            v.sort = Some(h.clone());
            v.desc = desc;
            v.page = 0;
        });
        write!(s, "<th><a href=\"{}\">{}</a>{mark}</th>", esc(&href), esc(h)).ok();
    }
    s.push_str("</tr>");
    let id_col = t.headers.iter().position(|h| h == "id");
    for (n, row) in t.rows.iter().enumerate().skip(pg * PAGE).take(PAGE) {
        write!(s, "<tr data-i=\"{n}\">").ok();
        for (i, c) in row.iter().enumerate() {
            let text = esc(&c.text());
            let class = if matches!(c, Cell::Text(_)) { " class=\"t\"" } else { "" };
            if Some(i) == id_col {
                write!(s, "<td><a href=\"/run/{text}\">{text}</a> <input type=\"checkbox\" name=\"ids\" value=\"{text}\" form=\"cmp\"></td>").ok();
            } else {
                write!(s, "<td{class}>{text}</td>").ok();
            }
        }
        s.push_str("</tr>");
    }
    s.push_str("</table></div>");
    s
}

/// `/run/ID/photo/ITEM`: the photo of an item of the run's dataset (found by its id among the
/// run's items, so no other file can be asked for), if it is a JPEG or PNG.
async fn photo(State(app): State<Shared>, UrlPath((id, item)): UrlPath<(String, String)>) -> Result<Response, Problem> {
    let id: i64 = id.parse().map_err(|_| Problem(StatusCode::BAD_REQUEST, format!("`{id}` is not a run id")))?;
    let Some(apps) = &app.settings.search else {
        return Err(Problem(StatusCode::NOT_FOUND, "this app was started without the runs' datasets".into()));
    };
    let Some(path) = apps.item_image(id, item.clone()).await else {
        return Err(Problem(StatusCode::NOT_FOUND, format!("run {id} has no item `{item}`")));
    };
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|_| Problem(StatusCode::NOT_FOUND, "the image file cannot be read".into()))?;
    let mime = if bytes.starts_with(&[0xFF, 0xD8, 0xFF]) {
        "image/jpeg"
    } else if bytes.starts_with(b"\x89PNG\r\n\x1a\n") {
        "image/png"
    } else {
        return Err(Problem(StatusCode::UNSUPPORTED_MEDIA_TYPE, "the item's file is not a JPEG or PNG image".into()));
    };
    Ok(([(header::CONTENT_TYPE, mime), (header::CACHE_CONTROL, "max-age=3600")], bytes).into_response())
}

/// The evaluate stage's retrieval gallery of a run (its `gallery.json`: fixed test queries
/// and their nearest photos) as a table of thumbnails, framed green where the class is right.
fn gallery_html(id: i64, gallery: &serde_json::Value) -> String {
    let mut s = String::from(
        "<h2>retrieval gallery</h2><p class=\"note\">For fixed test items, the product photos nearest to the item's title \
         (green frame: the query's class).</p><div class=\"scroll\"><table><tr><th class=\"t\">query</th><th class=\"t\">nearest photos</th></tr>",
    );
    for q in gallery.as_array().into_iter().flatten() {
        let class = q["class"].as_str().unwrap_or("");
        write!(
            s,
            "<tr><td class=\"t\" style=\"white-space:normal;max-width:240px\">{}<br><small>{}</small></td><td class=\"t\">",
            esc(q["text"].as_str().unwrap_or("")),
            esc(class)
        )
        .ok();
        for h in q["hits"].as_array().into_iter().flatten() {
            let frame = if h["class"].as_str() == Some(class) { "#2a2" } else { "#ddd" };
            write!(
                s,
                "<img src=\"/run/{id}/photo/{item}\" title=\"{t}\" alt=\"{t}\" style=\"height:80px;border:3px solid {frame};margin:1px\">",
                item = esc(&url_enc(h["id"].as_str().unwrap_or(""))),
                t = esc(h["class"].as_str().unwrap_or(""))
            )
            .ok();
        }
        s.push_str("</td></tr>");
    }
    s.push_str("</table></div>");
    s
}

/// `/run/ID/search/...`: the run's search page (`huse-run serve`'s), made on first use.
async fn search(State(app): State<Shared>, req: Request) -> Result<Response, Problem> {
    let path = req.uri().path().to_string();
    let rest = path.strip_prefix("/run/").unwrap_or("");
    let (id, rest) = rest.split_once('/').unwrap_or((rest, ""));
    let id: i64 = id.parse().map_err(|_| Problem(StatusCode::BAD_REQUEST, format!("`{id}` is not a run id")))?;
    let rest = rest.strip_prefix("search").unwrap_or(rest);
    let Some(apps) = &app.settings.search else {
        return Err(Problem(StatusCode::NOT_FOUND, "this app was started without search".into()));
    };
    if !app.store.run_exists(id).await.map_err(internal)? {
        return Err(Problem(StatusCode::NOT_FOUND, format!("no run {id}")));
    }
    let kept = {
        let mut made = app.searches.lock().await;
        made.iter().position(|(i, _)| *i == id).map(|at| {
            let kept = made.remove(at);
            made.push(kept.clone());
            kept.1
        })
    };
    let router = match kept {
        Some(r) => r,
        None => {
            // Made without holding the list: loading a run's index may take a while, and the
            // other runs' pages go on answering meanwhile.
            if !apps.has_model(id).await {
                return Err(Problem(StatusCode::NOT_FOUND, format!("run {id} has no trained model to search with")));
            }
            let r = apps.app(id, format!("/run/{id}/search")).await.map_err(internal)?;
            let mut made = app.searches.lock().await;
            if !made.iter().any(|(i, _)| *i == id) {
                if made.len() >= SEARCHES_KEPT {
                    drop(made.remove(0));
                }
                made.push((id, r.clone()));
            }
            r
        }
    };
    // The search page sees its own paths: the prefix taken off.
    let (mut parts, body) = req.into_parts();
    let inner = if rest.is_empty() { "/" } else { rest };
    let uri = match parts.uri.query() {
        Some(q) => format!("{inner}?{q}"),
        None => inner.to_string(),
    };
    parts.uri = uri.parse().map_err(|_| Problem(StatusCode::BAD_REQUEST, "a malformed address".into()))?;
    // A fresh request for it: the outer route's path parameters must not reach its extractors.
    parts.extensions = Default::default();
    use tower::ServiceExt as _;
    Ok(router.oneshot(Request::from_parts(parts, body)).await.unwrap_or_else(|e| match e {}))
}

async fn run_page(State(app): State<Shared>, UrlPath(id): UrlPath<String>) -> Result<Html<String>, Problem> {
    let id: i64 = id.parse().map_err(|_| Problem(StatusCode::BAD_REQUEST, format!("`{id}` is not a run id")))?;
    if !app.store.run_exists(id).await.map_err(internal)? {
        return Err(Problem(StatusCode::NOT_FOUND, format!("no run {id}")));
    }
    let store = &app.store;
    let sections = table::show(store, id).await.map_err(internal)?;
    let run = store.run(id).await.map_err(internal)?;
    let mut body = format!(
        "<p><a href=\"/exp/{u}\">experiment {e}</a></p>",
        u = url_enc(&run.experiment),
        e = esc(&run.experiment)
    );
    if let Some(apps) = &app.settings.search
        && apps.has_model(id).await
    {
        write!(
            body,
            "<h2>search its products</h2><form action=\"/run/{id}/search/search\" method=\"get\">\
             <input type=\"text\" name=\"q\" placeholder=\"red floral summer dress\"> in <select name=\"modality\">\
             <option value=\"image\">images</option><option value=\"text\">texts</option></select> \
             <button type=\"submit\">search</button> <a href=\"/run/{id}/search\">or by photo</a></form>"
        )
        .ok();
    }
    // Curves first: a picture beats a table.
    let curves = huse_report::html::curves(store, id).await.map_err(internal)?;
    if !curves.is_empty() {
        body.push_str("<h2>curves</h2><div class=\"charts\">");
        for (key, points) in &curves {
            let groups: BTreeMap<String, Vec<Vec<(f64, f64)>>> = [(format!("#{id}"), vec![points.clone()])].into();
            let svg = huse_report::html::overlay_svg(key, &groups).map_err(internal)?;
            body.push_str(&svg);
        }
        body.push_str("</div>");
    }
    if app.settings.search.is_some()
        && let Some(a) = store.attachment(id, "gallery.json").await.map_err(internal)?
        && let Ok(g) = serde_json::from_str::<serde_json::Value>(&a.text)
    {
        body.push_str(&gallery_html(id, &g));
    }
    for (title, t) in &sections {
        write!(body, "<h2>{}</h2>{}", esc(title), html_plain_table(t)).ok();
    }
    for s in store.summaries(id).await.map_err(internal)? {
        let text = if s.name.ends_with(".md") {
            huse_report::html::markdown(&s.text)
        } else {
            format!("<pre>{}</pre>", esc(&s.text))
        };
        write!(body, "<h2>{} — {}</h2><div class=\"scroll\">{text}</div>", esc(&s.stage), esc(&s.name)).ok();
    }
    let (yaml, commit) = store.run_config(id).await.map_err(internal)?;
    write!(
        body,
        "<h2>resolved config</h2><p class=\"note\">git commit {}</p><pre>{}</pre>",
        esc(commit.as_deref().unwrap_or("unknown")),
        esc(&yaml)
    )
    .ok();
    Ok(page(&format!("run {id} {}", run.name), &body))
}

/// The most runs one compare page shows.
pub const COMPARE_MAX: usize = 20;

/// `/compare?ids=1,2,3` (or `ids=1&ids=2`): the runs side by side — the params that tell
/// them apart, status and the metrics (`all=1`: the equal ones too), the rows that differ
/// marked; their curves overlaid.
async fn compare_page(State(app): State<Shared>, RawQuery(raw): RawQuery) -> Result<Html<String>, Problem> {
    let mut ids: Vec<i64> = Vec::new();
    let mut all = false;
    for (k, v) in raw.as_deref().map(query_pairs).unwrap_or_default() {
        match k.as_str() {
            "ids" => {
                for id in run_ids(&v)? {
                    if !ids.contains(&id) {
                        ids.push(id);
                    }
                }
            }
            "all" => all = v == "1",
            _ => {}
        }
    }
    if ids.len() < 2 || ids.len() > COMPARE_MAX {
        return Err(Problem(StatusCode::BAD_REQUEST, format!("compare takes 2 to {COMPARE_MAX} runs (ids=1,2)")));
    }
    let loaded = app
        .store
        .runs_slice(&huse_store::Slice { ids: Some(ids.clone()), ..Default::default() })
        .await
        .map_err(internal)?;
    let mut runs = Vec::new();
    for id in &ids {
        match loaded.iter().find(|r| r.id == *id) {
            Some(r) => runs.push(r.clone()),
            None => return Err(Problem(StatusCode::NOT_FOUND, format!("no run {id}"))),
        }
    }
    let t = table::compare_table(&runs, &[], !all);
    let joined = ids.iter().map(|i| i.to_string()).collect::<Vec<_>>().join(",");
    let mut body = format!(
        "<p class=\"note\">{n} runs; the marked rows differ. <a href=\"/compare?ids={joined}{a}\">{what}</a></p>",
        n = runs.len(),
        a = if all { "" } else { "&amp;all=1" },
        what = if all { "only what differs" } else { "the equal metrics too" },
    );
    body.push_str("<div class=\"scroll\"><table id=\"compare\"><tr>");
    for h in &t.headers {
        match h.strip_prefix('#') {
            Some(id) => write!(body, "<th><a href=\"/run/{id}\">{}</a></th>", esc(h)).ok(),
            None => write!(body, "<th class=\"t\">{}</th>", esc(h)).ok(),
        };
    }
    body.push_str("</tr>");
    for row in &t.rows {
        let vals: BTreeSet<String> = row.iter().skip(2).map(Cell::text).collect();
        body.push_str(if vals.len() > 1 { "<tr class=\"diff\">" } else { "<tr>" });
        for c in row {
            let class = if matches!(c, Cell::Text(_)) { " class=\"t\"" } else { "" };
            write!(body, "<td{class}>{}</td>", esc(&c.text())).ok();
        }
        body.push_str("</tr>");
    }
    body.push_str("</table></div><div id=\"charts\"></div>");
    let exp = if runs.iter().all(|r| r.experiment == runs[0].experiment) {
        runs[0].experiment.clone()
    } else {
        String::new()
    };
    let data = api::ViewData::new(&exp, false, &Table::default(), 0, ids.clone());
    body.push_str(&data.script());
    let names: Vec<String> = ids.iter().map(|i| format!("#{i}")).collect();
    Ok(page_with(&format!("compare {}", names.join(" ")), &body, true))
}

fn html_plain_table(t: &Table) -> String {
    let mut s = String::from("<div class=\"scroll\"><table><tr>");
    for h in &t.headers {
        write!(s, "<th>{}</th>", esc(h)).ok();
    }
    s.push_str("</tr>");
    for row in &t.rows {
        s.push_str("<tr>");
        for c in row {
            let class = if matches!(c, Cell::Text(_)) { " class=\"t\"" } else { "" };
            write!(s, "<td{class}>{}</td>", esc(&c.text())).ok();
        }
        s.push_str("</tr>");
    }
    s.push_str("</table></div>");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_strings_decode_and_keep_repeated_keys() {
        assert_eq!(
            query_pairs("q=a+%3E+0.5&col=x&col=y&bad=%zz&e=%C3%A9"),
            vec![
                ("q".to_string(), "a > 0.5".to_string()),
                ("col".into(), "x".into()),
                ("col".into(), "y".into()),
                ("bad".into(), "%zz".into()),
                ("e".into(), "é".into())
            ]
        );
        let v = View::parse(Some("q=state+%3D+failed&sort=sum&desc=1&group=on&col=id&col=sum&page=2"));
        assert_eq!(
            (v.q.as_str(), v.sort.as_deref(), v.desc, v.group, v.page),
            ("state = failed", Some("sum"), true, true, 2)
        );
        assert_eq!(v.cols, ["id", "sum"]);
        assert_eq!(
            v.href("e x", |v| v.page = 0),
            "/exp/e%20x?q=state%20%3D%20failed&sort=sum&desc=1&group=1&cols=id%2Csum"
        );
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(same("abc", "abc"));
        assert!(!same("abc", "abd") && !same("abc", "ab") && !same("", "a"));
    }
}
