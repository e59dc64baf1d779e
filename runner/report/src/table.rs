//! Results as tables: `runs`, `compare`, `best` and `show`, rendered as a terminal table,
//! CSV, JSON or Markdown. Built from [`huse_store::RunRow`]s; no SQL here.

use std::borrow::Borrow;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use anyhow::{Result, bail};
use huse_store::{RunRow, Store};

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// A box-drawn terminal table.
    Table,
    /// Comma-separated values, `mean ± std` split into two columns.
    Csv,
    /// A JSON array of objects.
    Json,
    /// A Markdown table.
    Markdown,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> Result<Format, String> {
        match s {
            "table" => Ok(Format::Table),
            "csv" => Ok(Format::Csv),
            "json" => Ok(Format::Json),
            "markdown" | "md" => Ok(Format::Markdown),
            _ => Err(format!("unknown format `{s}` (table, csv, json or markdown)")),
        }
    }
}

/// A table cell.
#[derive(Debug, Clone, PartialEq)]
pub enum Cell {
    /// Text, left-aligned.
    Text(String),
    /// An integer.
    Int(i64),
    /// A number (None: missing, shown empty).
    Num(Option<f64>),
    /// mean, sample standard deviation, count
    MeanStd(f64, f64, usize),
    /// Nothing.
    Empty,
}

impl Cell {
    /// The cell as a reader sees it (numbers in fixed decimals, `mean ± std`).
    pub fn text(&self) -> String {
        match self {
            Cell::Text(s) => s.clone(),
            Cell::Int(i) => i.to_string(),
            Cell::Num(Some(v)) => fmt_num(*v),
            Cell::Num(None) => "NaN".into(),
            Cell::MeanStd(m, s, _) => format!("{} ± {}", fmt_num(*m), fmt_num(*s)),
            Cell::Empty => String::new(),
        }
    }
    /// How a sorted column orders two cells: numbers (and text that is one) before other
    /// text, empty cells last; `desc` reverses within each of the three.
    pub fn order(&self, other: &Cell, desc: bool) -> std::cmp::Ordering {
        let (x, y) = (self.sort_key(), other.sort_key());
        let o = x.0.cmp(&y.0).then(x.1.total_cmp(&y.1)).then(x.2.cmp(&y.2));
        if desc && x.0 == y.0 { o.reverse() } else { o }
    }

    fn sort_key(&self) -> (u8, f64, String) {
        match self {
            Cell::Int(i) => (0, *i as f64, String::new()),
            Cell::Num(Some(v)) | Cell::MeanStd(v, _, _) => (0, *v, String::new()),
            Cell::Text(s) => match s.parse::<f64>() {
                Ok(v) => (0, v, String::new()),
                Err(_) => (1, 0.0, s.clone()),
            },
            _ => (2, 0.0, String::new()),
        }
    }
}

/// Fixed decimals a reader compares down a column: whole numbers as they are, 1,000 and
/// more with one decimal, smaller values with four; only values below 0.001 (or too large
/// for fixed notation) in scientific notation.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if v == v.trunc() && a < 1e15 {
        format!("{v:.0}")
    } else if a >= 1e15 || (a < 1e-3 && a > 0.0) {
        format!("{v:.3e}")
    } else if a >= 1000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

/// A whole number in a column of fractions: with [`fmt_num`]'s decimals for its size.
fn fmt_decimals(v: f64) -> String {
    let a = v.abs();
    if a >= 1e15 {
        format!("{v:.3e}")
    } else if a >= 1000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.4}")
    }
}

/// Orders names as a reader does: runs of digits by their value (`r1 < r5 < r10`).
pub fn natural_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for (x, y) in pa.iter().zip(&pb) {
        let o = match (x, y) {
            ((true, x), (true, y)) => {
                x.parse::<u128>().unwrap_or(u128::MAX).cmp(&y.parse::<u128>().unwrap_or(u128::MAX)).then(x.cmp(y))
            }
            ((_, x), (_, y)) => x.cmp(y),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

/// A rectangular result, rendered in any [`Format`].
#[derive(Debug, Clone, Default)]
pub struct Table {
    /// Column headers.
    pub headers: Vec<String>,
    /// Rows of cells, one per header.
    pub rows: Vec<Vec<Cell>>,
}

impl Table {
    /// Removes the column `name`, if there is one.
    pub fn remove_column(&mut self, name: &str) {
        if let Some(i) = self.headers.iter().position(|h| h == name) {
            self.headers.remove(i);
            for r in &mut self.rows {
                if i < r.len() {
                    r.remove(i);
                }
            }
        }
    }

    /// Keeps only the columns `names`, in that order; an unknown name is an error that lists
    /// the nearest ones there are.
    pub fn select(&mut self, names: &[String]) -> Result<()> {
        let mut idx = Vec::new();
        for n in names {
            match self.headers.iter().position(|h| h == n) {
                Some(i) => idx.push(i),
                None => {
                    let mut near: Vec<&String> = self.headers.iter().collect();
                    near.sort_by_key(|a| strsim::levenshtein(n, a));
                    let near: Vec<&str> = near.iter().take(5).map(|s| s.as_str()).collect();
                    anyhow::bail!("no column `{n}` (nearest: {})", near.join(", "));
                }
            }
        }
        self.headers = idx.iter().map(|&i| self.headers[i].clone()).collect();
        for r in &mut self.rows {
            *r = idx.iter().map(|&i| r.get(i).cloned().unwrap_or(Cell::Empty)).collect();
        }
        Ok(())
    }

    /// Removes the columns among `names` whose cells are equal in every row (two rows or
    /// more) and returns them as (header, the shared cell's text), in column order.
    pub fn fold_constant(&mut self, names: &BTreeSet<&String>) -> Vec<(String, String)> {
        if self.rows.len() < 2 {
            return Vec::new();
        }
        let mut folded = Vec::new();
        for (i, h) in self.headers.iter().enumerate() {
            if names.contains(h) && self.rows.iter().all(|r| r.get(i) == self.rows[0].get(i)) {
                folded.push((h.clone(), self.rows[0].get(i).map(Cell::text).unwrap_or_default()));
            }
        }
        for (h, _) in &folded {
            self.remove_column(h);
        }
        folded
    }

    /// The widest line of the table drawn for a terminal, in characters.
    pub fn width(&self) -> usize {
        self.render(Format::Table).lines().map(|l| l.chars().count()).max().unwrap_or(0)
    }

    /// Drops columns from the right, never the first `keep`, until the drawn table is at
    /// most `width` characters wide; returns the dropped columns' names, in order.
    pub fn fit(&mut self, width: usize, keep: usize) -> Vec<String> {
        let mut dropped = Vec::new();
        while self.headers.len() > keep && self.width() > width {
            let name = self.headers.last().cloned().unwrap_or_default();
            self.remove_column(&name);
            dropped.insert(0, name);
        }
        dropped
    }

    /// Sorts rows by the column `key` (numbers before text, see [`Cell::order`]).
    pub fn sort_by(&mut self, key: &str, desc: bool) -> Result<()> {
        let Some(i) = self.headers.iter().position(|h| h == key) else {
            bail!("cannot sort by `{key}`: no such column (columns: {})", self.headers.join(", "));
        };
        self.rows.sort_by(|a, b| a[i].order(&b[i], desc));
        Ok(())
    }

    /// Renders the table.
    pub fn render(&self, format: Format) -> String {
        match format {
            Format::Table | Format::Markdown => {
                let mut t = comfy_table::Table::new();
                t.load_style(if format == Format::Table {
                    comfy_table::presets::UTF8_FULL_CONDENSED
                } else {
                    comfy_table::presets::ASCII_MARKDOWN
                });
                // What reaches a terminal never carries the data's control characters (an
                // escape sequence in a title could retitle the window or hide text).
                t.set_header(self.headers.iter().map(|h| printable(h)).collect::<Vec<_>>());
                // A column with fractions writes its whole numbers with the same decimals
                // (`3.0000` under `1.5000`), so its digits line up.
                let fractional: Vec<bool> = (0..self.headers.len())
                    .map(|i| {
                        self.rows.iter().any(|r| match r.get(i) {
                            Some(Cell::Num(Some(v))) | Some(Cell::MeanStd(v, _, _)) => v.fract() != 0.0,
                            _ => false,
                        })
                    })
                    .collect();
                for r in &self.rows {
                    t.add_row(
                        r.iter()
                            .enumerate()
                            .map(|(i, c)| match c {
                                Cell::Num(Some(v)) if fractional.get(i) == Some(&true) && v.fract() == 0.0 => {
                                    printable(&fmt_decimals(*v))
                                }
                                _ => printable(&c.text()),
                            })
                            .collect::<Vec<_>>(),
                    );
                }
                format!("{t}\n")
            }
            Format::Csv => {
                let mut w = csv::Writer::from_writer(Vec::new());
                let (headers, rows) = self.expanded();
                w.write_record(&headers).unwrap();
                for r in rows {
                    w.write_record(r.iter().map(|c| match c {
                        Cell::Num(Some(v)) => v.to_string(),
                        other => other.text(),
                    }))
                    .unwrap();
                }
                String::from_utf8(w.into_inner().unwrap()).unwrap()
            }
            Format::Json => {
                let (headers, rows) = self.expanded();
                let arr: Vec<serde_json::Value> = rows
                    .iter()
                    .map(|r| {
                        let obj: serde_json::Map<String, serde_json::Value> = headers
                            .iter()
                            .zip(r)
                            .map(|(h, c)| {
                                let v = match c {
                                    Cell::Text(s) => serde_json::json!(s),
                                    Cell::Int(i) => serde_json::json!(i),
                                    Cell::Num(v) => serde_json::json!(v),
                                    Cell::Empty => serde_json::Value::Null,
                                    Cell::MeanStd(..) => unreachable!("expanded"),
                                };
                                (h.clone(), v)
                            })
                            .collect();
                        serde_json::Value::Object(obj)
                    })
                    .collect();
                format!("{}\n", serde_json::to_string_pretty(&arr).unwrap())
            }
        }
    }

    /// For machine formats: a `mean ± std` column becomes `key` (mean) and `key.std`.
    fn expanded(&self) -> (Vec<String>, Vec<Vec<Cell>>) {
        let split: Vec<bool> =
            (0..self.headers.len()).map(|i| self.rows.iter().any(|r| matches!(r[i], Cell::MeanStd(..)))).collect();
        let mut headers = Vec::new();
        for (h, s) in self.headers.iter().zip(&split) {
            headers.push(h.clone());
            if *s {
                headers.push(format!("{h}.std"));
            }
        }
        let rows = self
            .rows
            .iter()
            .map(|r| {
                let mut out = Vec::new();
                for (c, s) in r.iter().zip(&split) {
                    match (c, s) {
                        (Cell::MeanStd(m, sd, _), _) => {
                            out.push(Cell::Num(Some(*m)));
                            out.push(Cell::Num(Some(*sd)));
                        }
                        (c, true) => {
                            out.push(c.clone());
                            out.push(Cell::Empty);
                        }
                        (c, false) => out.push(c.clone()),
                    }
                }
                out
            })
            .collect();
        (headers, rows)
    }
}

/// Whether `key` matches any of the glob patterns (all keys match when there are none).
fn selected(key: &str, patterns: &[glob::Pattern]) -> bool {
    patterns.is_empty() || patterns.iter().any(|p| p.matches(key))
}

/// The params whose value is not the same in every run (`seed` last).
pub fn varying_params<R: Borrow<RunRow>>(runs: &[R]) -> Vec<String> {
    let keys: BTreeSet<&String> = runs.iter().flat_map(|r| r.borrow().params.keys()).collect();
    let first = runs.first().map(|r| r.borrow());
    let mut out: Vec<String> = keys
        .into_iter()
        .filter(|k| {
            // Varies when some run's value (or its absence) differs from the first run's.
            let v0 = first.and_then(|r| r.params.get(*k));
            runs.iter().any(|r| r.borrow().params.get(*k) != v0)
        })
        .cloned()
        .collect();
    if let Some(i) = out.iter().position(|k| k == "seed") {
        let s = out.remove(i);
        out.push(s);
    }
    out
}

/// The columns of [`runs_table`]'s rows: the params that vary, and the metrics
/// `metric_globs` select (all when none) in natural order.
pub fn runs_columns<R: Borrow<RunRow>>(runs: &[R], metric_globs: &[glob::Pattern]) -> (Vec<String>, Vec<String>) {
    (varying_params(runs), metric_columns(runs, metric_globs))
}

/// The metrics of the runs that `metric_globs` select (all when none), in natural order.
pub fn metric_columns<R: Borrow<RunRow>>(runs: &[R], metric_globs: &[glob::Pattern]) -> Vec<String> {
    let keys: BTreeSet<&str> = runs.iter().flat_map(|r| r.borrow().metrics.keys().map(String::as_str)).collect();
    let mut metrics: Vec<String> = keys.into_iter().filter(|k| selected(k, metric_globs)).map(String::from).collect();
    metrics.sort_by(|a, b| natural_cmp(a, b));
    metrics
}

/// A run's cell in the column `col` of [`runs_rows`] (a field, a param or a metric).
pub fn run_cell(r: &RunRow, col: &str) -> Cell {
    match col {
        "id" => Cell::Int(r.id),
        "experiment" => Cell::Text(r.experiment.clone()),
        "name" => Cell::Text(r.name.clone()),
        "status" => Cell::Text(r.status.to_string()),
        _ => match r.params.get(col) {
            Some(v) => Cell::Text(v.clone()),
            None => r.metrics.get(col).map(|v| Cell::Num(*v)).unwrap_or(Cell::Empty),
        },
    }
}

/// One row per run (id, experiment, name, status, then the given params and metrics), as
/// [`runs_table`] builds them when not grouping.
pub fn runs_rows<R: Borrow<RunRow>>(runs: &[R], params: &[String], metrics: &[String]) -> Table {
    let mut t = Table {
        headers: ["id", "experiment", "name", "status"].iter().map(|s| s.to_string()).collect(),
        ..Table::default()
    };
    t.headers.extend(params.iter().cloned());
    t.headers.extend(metrics.iter().cloned());
    for r in runs {
        let r = r.borrow();
        let mut row = vec![
            Cell::Int(r.id),
            Cell::Text(r.experiment.clone()),
            Cell::Text(r.name.clone()),
            Cell::Text(r.status.to_string()),
        ];
        row.extend(params.iter().map(|p| r.params.get(p).map(|v| Cell::Text(v.clone())).unwrap_or(Cell::Empty)));
        row.extend(metrics.iter().map(|m| r.metrics.get(m).map(|v| Cell::Num(*v)).unwrap_or(Cell::Empty)));
        t.rows.push(row);
    }
    t
}

/// Compiles `--metric` globs.
pub fn patterns(globs: &[String]) -> Result<Vec<glob::Pattern>> {
    globs
        .iter()
        .map(|g| glob::Pattern::new(g).map_err(|e| anyhow::anyhow!("bad --metric pattern `{g}`: {e}")))
        .collect()
}

/// The `runs` table: one row per run, or one per param group with mean ± std when `group`.
pub fn runs_table<R: Borrow<RunRow>>(runs: &[R], metric_globs: &[glob::Pattern], group: bool) -> Table {
    let (params, metrics) = runs_columns(runs, metric_globs);
    if !group {
        return runs_rows(runs, &params, &metrics);
    }
    let by: Vec<String> = params.into_iter().filter(|p| p != "seed").collect();
    group_rows(runs, &by, &metrics)
}

/// One row per experiment and combination of the params `by` (the other params pooled):
/// the run count and each metric's mean ± std over the group's runs.
pub fn group_rows<R: Borrow<RunRow>>(runs: &[R], by: &[String], metrics: &[String]) -> Table {
    let mut t = Table::default();
    let mut groups: BTreeMap<(String, Vec<Option<String>>), Vec<&RunRow>> = BTreeMap::new();
    for r in runs {
        let r = r.borrow();
        let key = (r.experiment.clone(), by.iter().map(|p| r.params.get(p).cloned()).collect());
        groups.entry(key).or_default().push(r);
    }
    t.headers = vec!["experiment".into()];
    t.headers.extend(by.iter().cloned());
    t.headers.push("runs".into());
    t.headers.extend(metrics.iter().cloned());
    for ((exp, vals), members) in groups {
        let mut row = vec![Cell::Text(exp)];
        row.extend(vals.into_iter().map(|v| v.map(Cell::Text).unwrap_or(Cell::Empty)));
        row.push(Cell::Int(members.len() as i64));
        for m in metrics {
            let xs: Vec<f64> = members.iter().filter_map(|r| r.metrics.get(m).copied().flatten()).collect();
            row.push(if xs.is_empty() {
                Cell::Empty
            } else {
                let (mean, sd) = mean_std(&xs);
                Cell::MeanStd(mean, sd, xs.len())
            });
        }
        t.rows.push(row);
    }
    t
}

/// Mean and sample standard deviation (0 for a single value).
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

/// `compare`: differing params and the metrics, one column per run.
/// `only_differing`: leave out the metrics whose value is the same in every run. The columns
/// are headed by the runs' ids (`#14`): the params that tell them apart are the first rows.
pub fn compare_table(runs: &[RunRow], metric_globs: &[glob::Pattern], only_differing: bool) -> Table {
    let mut t = Table { headers: vec!["".into(), "key".into()], rows: Vec::new() };
    t.headers.extend(runs.iter().map(|r| format!("#{}", r.id)));
    for p in varying_params(runs) {
        let mut row = vec![Cell::Text("param".into()), Cell::Text(p.clone())];
        row.extend(runs.iter().map(|r| r.params.get(&p).map(|v| Cell::Text(v.clone())).unwrap_or(Cell::Empty)));
        t.rows.push(row);
    }
    let mut status = vec![Cell::Text("run".into()), Cell::Text("status".into())];
    status.extend(runs.iter().map(|r| Cell::Text(r.status.to_string())));
    t.rows.push(status);
    for m in compared_metrics(runs, metric_globs, only_differing) {
        let mut row = vec![Cell::Text("metric".into()), Cell::Text(m.clone())];
        row.extend(runs.iter().map(|r| r.metrics.get(m).map(|v| Cell::Num(*v)).unwrap_or(Cell::Empty)));
        t.rows.push(row);
    }
    t
}

/// The metrics [`compare_table`] shows, in natural order: those `metric_globs` select and,
/// with `only_differing`, whose value (or absence) is not the same in every run.
pub fn compared_metrics<'a>(
    runs: &'a [RunRow],
    metric_globs: &[glob::Pattern],
    only_differing: bool,
) -> Vec<&'a String> {
    let metrics: BTreeSet<&String> =
        runs.iter().flat_map(|r| r.metrics.keys()).filter(|k| selected(k, metric_globs)).collect();
    let mut out: Vec<&String> = metrics
        .into_iter()
        .filter(|m| {
            !only_differing || {
                let first = runs.first().and_then(|r| r.metrics.get(*m));
                runs.iter().any(|r| r.metrics.get(*m) != first)
            }
        })
        .collect();
    out.sort_by(|a, b| natural_cmp(a, b));
    out
}

/// Everything about one run, as sections of (title, table).
pub async fn show(store: &Store, id: i64) -> Result<Vec<(String, Table)>> {
    let r = store.run(id).await?;
    let mut sections = Vec::new();
    let mut info = Table { headers: vec!["field".into(), "value".into()], rows: Vec::new() };
    let mut fields: Vec<(&str, Cell)> = vec![
        ("id", Cell::Int(r.id)),
        ("experiment", Cell::Text(r.experiment.clone())),
        ("name", Cell::Text(r.name.clone())),
        ("status", Cell::Text(r.status.to_string())),
        ("started", Cell::Text(r.started_at.clone())),
        (
            "duration_s",
            match r.running_for_s() {
                Some(s) => Cell::Text(format!("{} so far (running)", fmt_num(s))),
                None => r.duration_s.map_or(Cell::Empty, |d| Cell::Num(Some(d))),
            },
        ),
        ("seed", Cell::Int(r.seed)),
        ("sweep point", Cell::Text(r.point.clone())),
        ("git commit", Cell::Text(r.git_commit.clone().unwrap_or_default())),
        ("error", Cell::Text(r.error.clone().unwrap_or_default())),
    ];
    if let Some(log) = &r.log {
        // Runs that ran as cluster jobs: where their output went.
        fields.push(("log", Cell::Text(log.clone())));
    }
    for (k, v) in fields {
        info.rows.push(vec![Cell::Text(k.into()), v]);
    }
    sections.push(("run".to_string(), info));
    let mut params = Table { headers: vec!["param".into(), "value".into()], rows: Vec::new() };
    for (k, v) in &r.params {
        params.rows.push(vec![Cell::Text(k.clone()), Cell::Text(v.clone())]);
    }
    sections.push(("params".to_string(), params));
    let mut stages = Table {
        headers: ["stage", "kind", "status", "cached", "seconds", "cache key", "error"]
            .iter()
            .map(|s| s.to_string())
            .collect(),
        rows: Vec::new(),
    };
    for s in store.stage_runs(id).await? {
        stages.rows.push(vec![
            Cell::Text(s.stage),
            Cell::Text(s.kind),
            Cell::Text(s.status.to_string()),
            Cell::Text(if s.cached { "yes".into() } else { "no".into() }),
            Cell::Num(s.duration_s),
            Cell::Text(s.cache_key),
            Cell::Text(s.error.unwrap_or_default()),
        ]);
    }
    sections.push(("stages".to_string(), stages));
    let mut metrics =
        Table { headers: vec!["stage".into(), "metric".into(), "step".into(), "value".into()], rows: Vec::new() };
    for (stage, key, step, value) in store.final_metrics(id).await? {
        metrics.rows.push(vec![Cell::Text(stage), Cell::Text(key), Cell::Int(step), Cell::Num(value)]);
    }
    sections.push(("metrics (last step)".to_string(), metrics));
    Ok(sections)
}

/// The run's stage summaries (`*.md` outputs such as evaluate's tables) as text.
pub async fn summaries_text(store: &Store, id: i64) -> Result<String> {
    let mut out = String::new();
    for s in store.summaries(id).await? {
        writeln!(out, "── {}: {} ──\n", s.stage, s.name).unwrap();
        out.push_str(&s.text);
        if !s.text.ends_with('\n') {
            out.push('\n');
        }
    }
    Ok(out)
}

/// Renders `show`'s sections: titled tables, or one JSON object.
pub fn render_sections(sections: &[(String, Table)], format: Format) -> String {
    if format == Format::Json {
        let obj: serde_json::Map<String, serde_json::Value> = sections
            .iter()
            .map(|(title, t)| (title.clone(), serde_json::from_str(&t.render(Format::Json)).unwrap()))
            .collect();
        return format!("{}\n", serde_json::to_string_pretty(&obj).unwrap());
    }
    let mut out = String::new();
    for (title, t) in sections {
        match format {
            Format::Markdown => writeln!(out, "### {title}\n").unwrap(),
            Format::Csv => writeln!(out, "# {title}").unwrap(),
            _ => writeln!(out, "{title}:").unwrap(),
        }
        out.push_str(&t.render(format));
        out.push('\n');
    }
    out
}

/// The best run by a metric (max, or min when `minimize`).
pub fn best_table(runs: &[RunRow], metric: &str, minimize: bool) -> Result<Table> {
    let with: Vec<(&RunRow, f64)> =
        runs.iter().filter_map(|r| r.metrics.get(metric).copied().flatten().map(|v| (r, v))).collect();
    let Some(&(best, value)) =
        with.iter().max_by(|a, b| if minimize { b.1.total_cmp(&a.1) } else { a.1.total_cmp(&b.1) })
    else {
        // A key two stages log is stored under its qualified name (`stage.key`): name those.
        let mut similar: Vec<&str> = runs
            .iter()
            .flat_map(|r| r.metrics.keys())
            .filter(|k| k.ends_with(&format!(".{metric}")) || k.starts_with(&format!("{metric}.")))
            .map(String::as_str)
            .collect();
        similar.sort_unstable();
        similar.dedup();
        if similar.is_empty() {
            bail!("no run has a value for metric `{metric}`");
        }
        bail!("no run has a value for metric `{metric}`; metrics with that name: {}", similar.join(", "));
    };
    let params = varying_params(runs);
    let mut t =
        Table { headers: vec!["id".into(), "experiment".into(), "name".into(), metric.to_string()], rows: Vec::new() };
    t.headers.extend(params.iter().cloned());
    let mut row = vec![
        Cell::Int(best.id),
        Cell::Text(best.experiment.clone()),
        Cell::Text(best.name.clone()),
        Cell::Num(Some(value)),
    ];
    row.extend(params.iter().map(|p| best.params.get(p).map(|v| Cell::Text(v.clone())).unwrap_or(Cell::Empty)));
    t.rows.push(row);
    Ok(t)
}

/// The best sweep point by a metric's mean over the point's runs (its seeds): one row of the
/// grouped `runs` table — the point's params, how many runs, and mean ± std.
pub fn best_group_table(runs: &[RunRow], metric: &str, minimize: bool) -> Result<Table> {
    best_table(runs, metric, minimize)?; // the same errors when no run has the metric
    let exact = glob::Pattern::new(&glob::Pattern::escape(metric))?;
    let mut t = runs_table(runs, &[exact], true);
    let col = t.headers.iter().position(|h| h == metric).ok_or_else(|| anyhow::anyhow!("no run has `{metric}`"))?;
    let mean = |r: &Vec<Cell>| match r.get(col) {
        Some(Cell::MeanStd(m, _, _)) => Some(*m),
        _ => None,
    };
    let best = t
        .rows
        .iter()
        .filter(|r| mean(r).is_some())
        .max_by(|a, b| {
            let (x, y) = (mean(a).unwrap_or(f64::NAN), mean(b).unwrap_or(f64::NAN));
            if minimize { y.total_cmp(&x) } else { x.total_cmp(&y) }
        })
        .cloned()
        .ok_or_else(|| anyhow::anyhow!("no run has a value for metric `{metric}`"))?;
    t.rows = vec![best];
    Ok(t)
}

/// `s` with every control character (C0 but line breaks and tabs, DEL, C1) and bidirectional override written as a
/// visible escape (`\x1b`, `\u{202e}`), so text from data cannot drive a terminal.
pub fn printable(s: &str) -> String {
    if !s.chars().any(is_unsafe) {
        return s.to_string();
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if is_unsafe(c) {
            let n = c as u32;
            if n < 0x100 { out.push_str(&format!("\\x{n:02x}")) } else { out.push_str(&format!("\\u{{{n:x}}}")) }
        } else {
            out.push(c);
        }
    }
    out
}

/// Line breaks and tabs stay (a multi-line cell, e.g. an error); every other control
/// character is escaped.
fn is_unsafe(c: char) -> bool {
    (c.is_control() && c != '\n' && c != '\t')
        || matches!(c, '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}' | '\u{200e}' | '\u{200f}')
}

/// The keys of `conds` that no run in `runs` has as a param or a metric, each with the
/// closest existing key when one is near (a misspelt `-w` key matches nothing silently).
pub fn unknown_keys(runs: &[RunRow], keys: &[&str]) -> Vec<(String, Option<String>)> {
    let known: std::collections::BTreeSet<&str> = runs
        .iter()
        .flat_map(|r| r.params.keys().chain(r.metrics.keys()))
        .map(String::as_str)
        .chain(["id", "name", "status", "seed"])
        .collect();
    keys.iter()
        // A key two stages log is known by its qualified names (`left.mean`): the query says so itself.
        .filter(|k| !known.contains(**k) && !known.iter().any(|c| c.ends_with(&format!(".{k}"))))
        .map(|k| {
            let near = known
                .iter()
                .map(|c| (strsim::levenshtein(k, c), *c))
                .filter(|(d, _)| *d <= 2.max(k.len() / 4))
                .min()
                .map(|(_, c)| c.to_string());
            (k.to_string(), near)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_fits_a_width_by_dropping_columns_from_the_right() {
        let mut t = Table {
            headers: (0..12).map(|i| format!("column-{i}")).collect(),
            rows: vec![(0..12).map(Cell::Int).collect()],
        };
        assert!(t.width() > 80);
        let dropped = t.fit(80, 3);
        assert!(t.width() <= 80, "{}", t.render(Format::Table));
        assert_eq!(t.headers.len() + dropped.len(), 12);
        assert_eq!(dropped.last().unwrap(), "column-11");
        assert_eq!(t.headers[..3], ["column-0", "column-1", "column-2"]);
        // Never below `keep`, however narrow.
        t.fit(5, 3);
        assert_eq!(t.headers.len(), 3);
    }

    #[test]
    fn numbers_read_down_a_column_and_names_sort_naturally() {
        assert_eq!(fmt_num(5572.34), "5572.3");
        assert_eq!(fmt_num(0.91234), "0.9123");
        assert_eq!(fmt_num(42.0), "42");
        assert_eq!(fmt_num(0.00012), "1.200e-4");
        let mut names = vec!["test.t2i.r10", "test.t2i.r5", "test.t2i.r1", "test.hp10.i2i", "test.hp2.i2i"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(names, ["test.hp2.i2i", "test.hp10.i2i", "test.t2i.r1", "test.t2i.r5", "test.t2i.r10"]);
    }

    #[test]
    fn control_characters_never_reach_the_terminal() {
        let t = Table {
            headers: vec!["title".into()],
            rows: vec![vec![Cell::Text("a\x1b]0;pwned\x07b\x1b[31mred\u{202e}x".into())]],
        };
        for f in [Format::Table, Format::Markdown] {
            let out = t.render(f);
            assert!(!out.chars().any(|c| c == '\x1b' || c == '\x07' || c == '\u{202e}'), "{out:?}");
            assert!(out.contains("a\\x1b]0;pwned\\x07b\\x1b[31mred\\u{202e}x"), "{out}");
        }
        assert_eq!(printable("plain ✓"), "plain ✓");
    }

    #[test]
    fn unknown_condition_keys_are_named_with_the_nearest() {
        let mut r = RunRow {
            run: huse_store::Run {
                id: 1,
                experiment: "e".into(),
                name: "e".into(),
                status: huse_store::RunStatus::Succeeded,
                started_at: String::new(),
                ended_at: None,
                duration_s: None,
                point: String::new(),
                seed: 0,
                device: "cpu".into(),
                git_commit: None,
                error: None,
                host: None,
                pid: None,
                log: None,
            },
            params: Default::default(),
            metrics: Default::default(),
        };
        r.params.insert("train.beta".into(), "0.5".into());
        r.metrics.insert("sum".into(), Some(1.0));
        let u = unknown_keys(&[r], &["sun", "train.beta", "zzzzzz"]);
        assert_eq!(u, vec![("sun".to_string(), Some("sum".to_string())), ("zzzzzz".to_string(), None)]);
    }

    #[test]
    fn mean_std_is_sample_std() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!(m, 2.5);
        assert!((s - 1.2909944487358056).abs() < 1e-12);
        assert_eq!(mean_std(&[3.0]), (3.0, 0.0));
    }

    #[test]
    fn renders_all_formats() {
        let t = Table {
            headers: vec!["k".into(), "v".into()],
            rows: vec![vec![Cell::Text("a,b".into()), Cell::MeanStd(0.5, 0.25, 3)]],
        };
        assert!(t.render(Format::Table).contains("0.5000 ± 0.2500"));
        assert!(t.render(Format::Markdown).contains("| a,b | 0.5000 ± 0.2500 |"));
        assert_eq!(t.render(Format::Csv), "k,v,v.std\n\"a,b\",0.5,0.25\n");
        let j: serde_json::Value = serde_json::from_str(&t.render(Format::Json)).unwrap();
        assert_eq!(j, serde_json::json!([{"k": "a,b", "v": 0.5, "v.std": 0.25}]));
    }
}
