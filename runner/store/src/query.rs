//! Reading results back: runs with their params and final metrics, filtered by
//! `--where` conditions, and the per-run details `show`, `report` and `export` need.
//!
//! A condition (`train.beta=0.5`, `test.t2i.r1>0.6`) is parsed into a key, an operator
//! from a fixed list and a value; params are filtered in SQL with key and value bound as
//! parameters, never pasted into the SQL text. A key that is a param of some run filters
//! on params; any other key filters on the run's final metric value (its highest step).
//!
//! Metric keys are shown as logged, except where two stages of a run log the same key
//! (both toy-scale stages log `mean`): there each is qualified by its stage (`left.mean`,
//! `right.mean`) — in `runs`, `best`, `--group`, `--where`, the report and exports alike.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;

use anyhow::{Result, bail};
use sqlx::Row;

use crate::{RUN_COLUMNS, Run, RunStatus, StageStatus, Store, Summary};

/// A comparison operator of a `--where` condition or of the search language.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `=` (or `==`)
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
}

impl Op {
    /// The SQL operator.
    pub fn sql(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
        }
    }
}

/// A parsed `--where` condition.
#[derive(Debug, Clone, PartialEq)]
pub struct Cond {
    /// A param key or a metric key.
    pub key: String,
    /// The comparison.
    pub op: Op,
    /// The value compared with (numerically when it parses as a number).
    pub value: String,
}

impl std::str::FromStr for Cond {
    type Err = String;
    fn from_str(s: &str) -> Result<Cond, String> {
        let i = s
            .find(['<', '>', '=', '!'])
            .ok_or_else(|| format!("`{s}`: expected KEY OP VALUE with OP one of = != < <= > >="))?;
        let (key, rest) = s.split_at(i);
        let (op, value) = if let Some(v) = rest.strip_prefix(">=") {
            (Op::Ge, v)
        } else if let Some(v) = rest.strip_prefix("<=") {
            (Op::Le, v)
        } else if let Some(v) = rest.strip_prefix("!=") {
            (Op::Ne, v)
        } else if let Some(v) = rest.strip_prefix("==") {
            (Op::Eq, v)
        } else if let Some(v) = rest.strip_prefix('=') {
            (Op::Eq, v)
        } else if let Some(v) = rest.strip_prefix('>') {
            (Op::Gt, v)
        } else if let Some(v) = rest.strip_prefix('<') {
            (Op::Lt, v)
        } else {
            return Err(format!("`{s}`: unknown operator (use = != < <= > >=)"));
        };
        let key = key.trim();
        if key.is_empty() {
            return Err(format!("`{s}`: missing key before the operator"));
        }
        let value = value.trim();
        if value.is_empty() {
            return Err(format!("`{s}`: missing value after the operator"));
        }
        if value.starts_with(['<', '>', '=', '!']) {
            return Err(format!("`{s}`: malformed operator (use one of = != < <= > >=)"));
        }
        Ok(Cond { key: key.to_string(), op, value: value.to_string() })
    }
}

/// Which runs to load.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    /// Only runs of this experiment.
    pub experiment: Option<String>,
    /// Only runs with this status.
    pub status: Option<RunStatus>,
    /// Conditions that must all hold.
    pub conds: Vec<Cond>,
}

/// One experiment at a glance, for the results app's first page.
#[derive(Debug, Clone, PartialEq)]
pub struct ExperimentSummary {
    /// The experiment's name.
    pub name: String,
    /// Its runs per state (`succeeded`, `running`, ...).
    pub by_state: Vec<(String, i64)>,
    /// The latest start or end of any of its runs (RFC 3339).
    pub last_activity: Option<String>,
}

/// Why a run left `running` by an ended process shows as failed.
pub const SPOOLED: &str = "its process ended with records the database could not take; they wait in the spool and `huse-run db replay` writes them and the run's real status";

/// A run with its params and final metrics (the run's own columns through [`Run`], which it
/// dereferences to: `row.name`).
#[derive(Debug, Clone)]
pub struct RunRow {
    /// The `runs` row.
    pub run: Run,
    /// Every param, as text.
    pub params: BTreeMap<String, String>,
    /// The final (highest-step) value of every metric; None for NaN/inf.
    pub metrics: BTreeMap<String, Option<f64>>,
}

impl std::ops::Deref for RunRow {
    type Target = Run;
    fn deref(&self) -> &Run {
        &self.run
    }
}

impl std::ops::DerefMut for RunRow {
    fn deref_mut(&mut self) -> &mut Run {
        &mut self.run
    }
}

/// One recorded stage of a run, for `show`.
#[derive(Debug, Clone)]
pub struct StageRunInfo {
    /// Stage name.
    pub stage: String,
    /// Stage kind.
    pub kind: String,
    /// How it ended.
    pub status: StageStatus,
    /// Taken from the cache.
    pub cached: bool,
    /// Seconds it ran.
    pub duration_s: Option<f64>,
    /// Its cache key.
    pub cache_key: String,
    /// Why it did not succeed.
    pub error: Option<String>,
    /// Its output folder in the cache (succeeded stages).
    pub output_dir: Option<String>,
}

enum Bind {
    Text(String),
    Num(f64),
}

fn compare(v: f64, op: Op, n: f64) -> bool {
    match op {
        Op::Eq => v == n,
        Op::Ne => v != n,
        Op::Lt => v < n,
        Op::Le => v <= n,
        Op::Gt => v > n,
        Op::Ge => v >= n,
    }
}

/// The shown name of each (stage, key) of one run: the key, or `stage.key` where several
/// stages of the run log that key.
pub fn qualified<'a>(pairs: impl Iterator<Item = (&'a str, &'a str)> + Clone) -> Vec<String> {
    let mut count: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for (stage, key) in pairs.clone() {
        count.entry(key).or_default().insert(stage);
    }
    pairs.map(|(stage, key)| if count[key].len() > 1 { format!("{stage}.{key}") } else { key.to_string() }).collect()
}

/// What [`Store::runs_slice`] reads.
#[derive(Debug, Clone)]
pub struct Slice {
    /// Only runs of this experiment.
    pub experiment: Option<String>,
    /// Only these runs.
    pub ids: Option<Vec<i64>>,
    /// Only the final values of these metric keys (as logged, unqualified); None: all.
    pub keys: Option<Vec<String>>,
    /// The runs' fields and params too (false: only their metrics, in rows that carry only
    /// the run's id).
    pub with_runs: bool,
}

impl Default for Slice {
    fn default() -> Slice {
        Slice { experiment: None, ids: None, keys: None, with_runs: true }
    }
}

/// How [`Store::metric_aggregates`] sums up a metric's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Agg {
    /// The smallest value.
    Min,
    /// The largest value.
    Max,
    /// The mean of the values.
    Mean,
}

/// What [`Store::changes_since`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Changes {
    /// The runs recorded or that logged metrics since, by id.
    pub runs: Vec<i64>,
    /// The newest run id now.
    pub run_id: i64,
    /// The newest metric row id now.
    pub metric_id: i64,
}

/// The params of the runs `scope` (a JOIN/WHERE on `params x`) selects, by run and key.
fn params_sql(scope: &str) -> String {
    format!("SELECT x.run_id, x.key, x.value FROM params x {scope} ORDER BY x.run_id, x.key")
}

/// The final value of each (run, stage, key) of the metrics `scope` and `cond` select: its row
/// of the highest step (then the latest id), as the `final_metrics` view defines it.
fn finals_sql(scope: &str, cond: &str) -> String {
    format!(
        "SELECT run_id, stage, key, value FROM (SELECT x.run_id, x.stage, x.key, x.value, \
         ROW_NUMBER() OVER (PARTITION BY x.run_id, x.stage, x.key ORDER BY x.step DESC, x.id DESC) AS nth \
         FROM metrics x {scope}{cond}) finals WHERE nth = 1 ORDER BY run_id, key, stage"
    )
}

/// A run's row, its params and final metrics as a [`RunRow`] (the metric keys qualified by
/// stage where several of its stages log one); a run left `running` by a process that has
/// ended with records spooled (it could not even mark it failed: a full disk) shows as failed.
fn assemble(
    r: &sqlx::any::AnyRow,
    params: Vec<(String, String)>,
    finals: &[(String, String, Option<f64>)],
    spooled: &BTreeSet<i64>,
) -> Result<RunRow> {
    let metrics: BTreeMap<String, Option<f64>> = qualified(finals.iter().map(|(s, k, _)| (s.as_str(), k.as_str())))
        .into_iter()
        .zip(finals)
        .map(|(name, (_, _, v))| (name, *v))
        .collect();
    let mut run = Run::from_row(r)?;
    if run.status == RunStatus::Running && spooled.contains(&run.id) {
        run.status = RunStatus::Failed;
        run.error = Some(format!("results incomplete: {SPOOLED}"));
    }
    // Shown and compared with the params, as the setting it is (stored once, as a column).
    let mut params: BTreeMap<String, String> = params.into_iter().collect();
    params.insert("device".into(), run.device.clone());
    Ok(RunRow { run, params, metrics })
}

impl Store {
    /// The names of the experiments in the database, sorted.
    pub async fn experiments(&self) -> Result<Vec<String>> {
        let rows = self.q("SELECT name FROM experiments ORDER BY name").fetch_all(&self.pool).await?;
        Ok(rows.iter().map(|r| r.get::<String, _>(0)).collect())
    }

    /// Per experiment: its runs by state and its last activity (the latest start or end).
    pub async fn experiment_summaries(&self) -> Result<Vec<ExperimentSummary>> {
        let rows = self
            .q("SELECT e.name, r.status, count(r.id), max(coalesce(r.ended_at, r.started_at)) \
                FROM experiments e LEFT JOIN runs r ON r.experiment_id = e.id GROUP BY e.name, r.status ORDER BY e.name")
            .fetch_all(&self.pool)
            .await?;
        let mut out: Vec<ExperimentSummary> = Vec::new();
        for r in rows {
            let name: String = r.get(0);
            let status: Option<String> = r.get(1);
            let n: i64 = r.get(2);
            let last: Option<String> = r.get(3);
            if out.last().is_none_or(|s| s.name != name) {
                out.push(ExperimentSummary { name: name.clone(), by_state: Vec::new(), last_activity: None });
            }
            let s = out.last_mut().expect("pushed");
            if let Some(st) = status {
                s.by_state.push((st, n));
            }
            if last > s.last_activity {
                s.last_activity = last;
            }
        }
        Ok(out)
    }

    /// A fingerprint of the database's results that changes whenever a run is recorded,
    /// changes state or logs a metric (the results app polls it to update a page live).
    pub async fn version(&self) -> Result<String> {
        let r = self
            .q("SELECT (SELECT count(*) FROM runs), (SELECT CAST(coalesce(max(id), 0) AS BIGINT) FROM metrics), \
                (SELECT count(*) FROM runs WHERE status = 'running'), \
                (SELECT max(coalesce(ended_at, started_at)) FROM runs)")
            .fetch_one(&self.pool)
            .await?;
        let last: Option<String> = r.get(3);
        Ok(format!("{}-{}-{}-{}", r.get::<i64, _>(0), r.get::<i64, _>(1), r.get::<i64, _>(2), last.unwrap_or_default()))
    }

    /// An error naming the experiments there are, unless `name` is one of them.
    pub async fn check_experiment(&self, name: &str) -> Result<()> {
        let all = self.experiments().await?;
        if all.iter().any(|e| e == name) {
            return Ok(());
        }
        anyhow::bail!(
            "no experiment `{name}` in {} (experiments: {})",
            self.location,
            if all.is_empty() { "none yet".to_string() } else { all.join(", ") }
        )
    }

    /// Loads the runs that pass `filter`, oldest first.
    pub async fn load_runs(&self, filter: &Filter) -> Result<Vec<RunRow>> {
        let mut text =
            format!("SELECT {RUN_COLUMNS} FROM runs r JOIN experiments e ON e.id = r.experiment_id WHERE 1 = 1");
        if filter.experiment.is_some() {
            text.push_str(" AND e.name = ?");
        }
        if filter.status.is_some() {
            // `running` rows too: one whose results wait in a spool shows as failed (below).
            text.push_str(" AND (r.status = ? OR r.status = 'running')");
        }
        let param_keys: BTreeSet<String> =
            self.q("SELECT DISTINCT key FROM params").fetch_all(&self.pool).await?.iter().map(|r| r.get(0)).collect();
        let mut binds: Vec<Bind> = Vec::new();
        let mut metric_conds = Vec::new();
        for c in &filter.conds {
            let num = c.value.parse::<f64>().ok();
            let op = c.op.sql();
            if c.key == "device" {
                // The run's own column (not a param).
                write!(text, " AND r.device {op} ?").unwrap();
                binds.push(Bind::Text(c.value.clone()));
            } else if param_keys.contains(&c.key) {
                let col = if num.is_some() { "p.value_num" } else { "p.value" };
                write!(
                    text,
                    " AND EXISTS (SELECT 1 FROM params p WHERE p.run_id = r.id AND p.key = ? AND {col} {op} ?)"
                )
                .unwrap();
                binds.push(Bind::Text(c.key.clone()));
                binds.push(match num {
                    Some(n) => Bind::Num(n),
                    None => Bind::Text(c.value.clone()),
                });
            } else {
                let Some(n) = num else {
                    bail!(
                        "`--where {}{}{}`: `{}` is no param of any run, and metrics compare with numbers only",
                        c.key,
                        op,
                        c.value,
                        c.key
                    );
                };
                metric_conds.push((c, n));
            }
        }
        text.push_str(" ORDER BY r.id");
        let mut q = crate::q_owned(self.backend, text);
        if let Some(e) = &filter.experiment {
            q = q.bind(e.clone());
        }
        if let Some(s) = &filter.status {
            q = q.bind(s.as_str());
        }
        for b in binds {
            q = match b {
                Bind::Text(t) => q.bind(t),
                Bind::Num(n) => q.bind(n),
            };
        }
        let rows = q.fetch_all(&self.pool).await?;
        // The params and final metrics of every run of the experiment (or of all), two queries
        // in all rather than two per run: the final value of each (run, stage, key) is its row
        // of the highest step (then the latest id), as the `final_metrics` view defines it.
        let scope = if filter.experiment.is_some() {
            "JOIN runs r ON r.id = x.run_id JOIN experiments e ON e.id = r.experiment_id WHERE e.name = ?"
        } else {
            ""
        };
        let mut pq = crate::q_owned(self.backend, params_sql(scope));
        let mut mq = crate::q_owned(self.backend, finals_sql(scope, ""));
        if let Some(e) = &filter.experiment {
            pq = pq.bind(e.clone());
            mq = mq.bind(e.clone());
        }
        let mut all_params: HashMap<i64, Vec<(String, String)>> = HashMap::new();
        for p in pq.fetch_all(&self.pool).await? {
            all_params.entry(p.get(0)).or_default().push((p.get(1), p.get(2)));
        }
        let mut all_finals: HashMap<i64, Vec<(String, String, Option<f64>)>> = HashMap::new();
        for m in mq.fetch_all(&self.pool).await? {
            all_finals.entry(m.get(0)).or_default().push((m.get(1), m.get(2), m.get(3)));
        }
        let spooled = self.spool.lock().await.spooled_runs();
        let mut out = Vec::new();
        for r in rows {
            let id: i64 = r.get("id");
            let finals: Vec<(String, String, Option<f64>)> = all_finals.remove(&id).unwrap_or_default();
            let row = assemble(&r, all_params.remove(&id).unwrap_or_default(), &finals, &spooled)?;
            let metrics = &row.metrics;
            let mut keep = true;
            for (c, n) in &metric_conds {
                let value = match metrics.get(&c.key) {
                    Some(v) => *v,
                    None => {
                        let stages: Vec<&str> =
                            finals.iter().filter(|(_, k, _)| *k == c.key).map(|(s, _, _)| s.as_str()).collect();
                        if stages.len() > 1 {
                            bail!(
                                "`--where {}{}{}`: metric `{}` is logged by several stages of run {id} ({}); name one, e.g. `{}.{}`",
                                c.key,
                                c.op.sql(),
                                c.value,
                                c.key,
                                stages.join(", "),
                                stages[0],
                                c.key
                            );
                        }
                        None
                    }
                };
                keep &= value.is_some_and(|v| compare(v, c.op, *n));
            }
            if !keep {
                continue;
            }
            if filter.status.is_some_and(|s| s != row.status) {
                continue;
            }
            out.push(row);
        }
        Ok(out)
    }

    /// The runs of [`Slice`]: their params and the final values of only the metric keys it
    /// names (all when `keys` is None), oldest first. Unlike [`Store::load_runs`] it filters
    /// nothing else, and reads only the rows asked for (the results app's cache loads
    /// columns and changed runs with it).
    pub async fn runs_slice(&self, slice: &Slice) -> Result<Vec<RunRow>> {
        let ids = slice.ids.as_ref().map(|ids| ids.iter().map(i64::to_string).collect::<Vec<_>>().join(","));
        if ids.as_deref() == Some("") || (!slice.with_runs && slice.keys.as_ref().is_some_and(|k| k.is_empty())) {
            return Ok(Vec::new());
        }
        let mut scope =
            String::from("JOIN runs r ON r.id = x.run_id JOIN experiments e ON e.id = r.experiment_id WHERE 1 = 1");
        if slice.experiment.is_some() {
            scope.push_str(" AND e.name = ?");
        }
        if let Some(ids) = &ids {
            write!(scope, " AND x.run_id IN ({ids})").unwrap();
        }
        let runs_sql = format!(
            "SELECT {RUN_COLUMNS} FROM runs r JOIN experiments e ON e.id = r.experiment_id WHERE 1 = 1{}{} ORDER BY r.id",
            if slice.experiment.is_some() { " AND e.name = ?" } else { "" },
            ids.as_ref().map(|i| format!(" AND r.id IN ({i})")).unwrap_or_default()
        );
        let key_cond = match &slice.keys {
            Some(keys) if keys.is_empty() => " AND 1 = 0".to_string(),
            Some(keys) => format!(" AND x.key IN ({})", vec!["?"; keys.len()].join(", ")),
            None => String::new(),
        };
        let mut rq = crate::q_owned(self.backend, runs_sql);
        let mut pq = crate::q_owned(self.backend, params_sql(&scope));
        let mut mq = crate::q_owned(self.backend, finals_sql(&scope, &key_cond));
        if let Some(e) = &slice.experiment {
            rq = rq.bind(e.clone());
            pq = pq.bind(e.clone());
            mq = mq.bind(e.clone());
        }
        for k in slice.keys.iter().flatten() {
            mq = mq.bind(k.clone());
        }
        let rows = if slice.with_runs { rq.fetch_all(&self.pool).await? } else { Vec::new() };
        let mut all_params: HashMap<i64, Vec<(String, String)>> = HashMap::new();
        if slice.with_runs {
            for p in pq.fetch_all(&self.pool).await? {
                all_params.entry(p.get(0)).or_default().push((p.get(1), p.get(2)));
            }
        }
        let mut all_finals: HashMap<i64, Vec<(String, String, Option<f64>)>> = HashMap::new();
        if slice.keys.as_ref().is_none_or(|k| !k.is_empty()) {
            for m in mq.fetch_all(&self.pool).await? {
                all_finals.entry(m.get(0)).or_default().push((m.get(1), m.get(2), m.get(3)));
            }
        }
        if !slice.with_runs {
            // Only the metrics: as rows of their own (fields and params left default).
            let mut out: Vec<RunRow> = Vec::new();
            let mut ids: Vec<i64> = all_finals.keys().copied().collect();
            ids.sort_unstable();
            for id in ids {
                let finals = &all_finals[&id];
                let metrics = qualified(finals.iter().map(|(s, k, _)| (s.as_str(), k.as_str())))
                    .into_iter()
                    .zip(finals)
                    .map(|(name, (_, _, v))| (name, *v))
                    .collect();
                out.push(RunRow {
                    run: Run { id, ..Run::starting("", "", "", 0, "") },
                    params: BTreeMap::new(),
                    metrics,
                });
            }
            return Ok(out);
        }
        let spooled = self.spool.lock().await.spooled_runs();
        let mut out = Vec::new();
        for r in rows {
            let id: i64 = r.get("id");
            let finals = all_finals.remove(&id).unwrap_or_default();
            out.push(assemble(&r, all_params.remove(&id).unwrap_or_default(), &finals, &spooled)?);
        }
        Ok(out)
    }

    /// Per run of `experiment`, each metric of `keys` summed up over its whole history by
    /// `agg` (`min`, `max` or `mean`; NaN and infinite values left out): (run, stage, key, value).
    pub async fn metric_aggregates(
        &self,
        experiment: &str,
        keys: &[String],
        agg: Agg,
    ) -> Result<Vec<(i64, String, String, Option<f64>)>> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let f = match agg {
            Agg::Min => "min",
            Agg::Max => "max",
            Agg::Mean => "avg",
        };
        let text = format!(
            "SELECT x.run_id, x.stage, x.key, {f}(x.value) FROM metrics x JOIN runs r ON r.id = x.run_id \
             JOIN experiments e ON e.id = r.experiment_id WHERE e.name = ? AND x.key IN ({}) \
             GROUP BY x.run_id, x.stage, x.key ORDER BY x.run_id, x.key, x.stage",
            vec!["?"; keys.len()].join(", ")
        );
        let mut q = crate::q_owned(self.backend, text).bind(experiment.to_string());
        for k in keys {
            q = q.bind(k.clone());
        }
        Ok(q.fetch_all(&self.pool).await?.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect())
    }

    /// Every (experiment, stage, metric key) logged by the runs of `experiment` (all when
    /// None), or of the runs `ids`.
    pub async fn metric_keys(
        &self,
        experiment: Option<&str>,
        ids: Option<&[i64]>,
    ) -> Result<Vec<(String, String, String)>> {
        let mut text = String::from(
            "SELECT DISTINCT e.name, x.stage, x.key FROM metrics x JOIN runs r ON r.id = x.run_id \
             JOIN experiments e ON e.id = r.experiment_id WHERE 1 = 1",
        );
        if experiment.is_some() {
            text.push_str(" AND e.name = ?");
        }
        if let Some(ids) = ids {
            if ids.is_empty() {
                return Ok(Vec::new());
            }
            write!(text, " AND x.run_id IN ({})", ids.iter().map(i64::to_string).collect::<Vec<_>>().join(","))
                .unwrap();
        }
        text.push_str(" ORDER BY 1, 2, 3");
        let mut q = crate::q_owned(self.backend, text);
        if let Some(e) = experiment {
            q = q.bind(e.to_string());
        }
        Ok(q.fetch_all(&self.pool).await?.iter().map(|r| (r.get(0), r.get(1), r.get(2))).collect())
    }

    /// What changed since a reader's last look: the runs recorded after run `run_id` or that
    /// logged a metric after metric row `metric_id`, with the newest run and metric row ids
    /// (`i64::MAX` for both gives only the newest ids). On PostgreSQL a row id may commit after
    /// a higher one: a reader that rereads the runs still running misses nothing a run logs.
    pub async fn changes_since(&self, run_id: i64, metric_id: i64) -> Result<Changes> {
        let top = self
            .q("SELECT (SELECT CAST(coalesce(max(id), 0) AS BIGINT) FROM runs), (SELECT CAST(coalesce(max(id), 0) AS BIGINT) FROM metrics)")
            .fetch_one(&self.pool)
            .await?;
        let (last_run, last_metric): (i64, i64) = (top.get(0), top.get(1));
        let mut runs: BTreeSet<i64> = self
            .q("SELECT id FROM runs WHERE id > ?")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| r.get::<i64, _>(0))
            .collect();
        runs.extend(
            self.q("SELECT DISTINCT run_id FROM metrics WHERE id > ? AND id <= ?")
                .bind(metric_id)
                .bind(last_metric)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|r| r.get::<i64, _>(0)),
        );
        Ok(Changes { runs: runs.into_iter().collect(), run_id: last_run, metric_id: last_metric })
    }

    /// One run by id.
    pub async fn run(&self, id: i64) -> Result<RunRow> {
        match self.runs_slice(&Slice { ids: Some(vec![id]), ..Slice::default() }).await?.pop() {
            Some(r) => Ok(r),
            None => bail!("no run with id {id}"),
        }
    }

    /// Whether a run with this id is recorded.
    pub async fn run_exists(&self, id: i64) -> Result<bool> {
        Ok(self.q("SELECT count(*) FROM runs WHERE id = ?").bind(id).fetch_one(&self.pool).await?.get::<i64, _>(0) > 0)
    }

    /// The recorded stages of a run, in the order they were recorded.
    pub async fn stage_runs(&self, run_id: i64) -> Result<Vec<StageRunInfo>> {
        let rows = self.q("SELECT stage, kind, status, cached, duration_s, cache_key, error, output_dir FROM stage_runs WHERE run_id = ? ORDER BY id")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?;
        rows.iter()
            .map(|s| {
                Ok(StageRunInfo {
                    stage: s.get(0),
                    kind: s.get(1),
                    status: s.get::<String, _>(2).parse().map_err(anyhow::Error::msg)?,
                    cached: s.get::<i64, _>(3) != 0,
                    duration_s: s.get(4),
                    cache_key: s.get(5),
                    error: s.get(6),
                    output_dir: s.get(7),
                })
            })
            .collect()
    }

    /// The last step of every metric of a run: (stage, key, step, value), by stage and key.
    pub async fn final_metrics(&self, run_id: i64) -> Result<Vec<(String, String, i64, Option<f64>)>> {
        Ok(self
            .q("SELECT stage, key, step, value FROM final_metrics WHERE run_id = ? ORDER BY stage, key")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|m| (m.get(0), m.get(1), m.get(2), m.get(3)))
            .collect())
    }

    /// Every logged value of every metric of a run: (shown key, step, value), by key, step
    /// and logging order; the key qualified by its stage where several stages log it; None
    /// for NaN/inf.
    pub async fn metric_series(&self, run_id: i64) -> Result<Vec<(String, i64, Option<f64>)>> {
        let rows: Vec<(String, String, i64, Option<f64>)> = self
            .q("SELECT stage, key, step, value FROM metrics WHERE run_id = ? ORDER BY key, stage, step, id")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|m| (m.get(0), m.get(1), m.get(2), m.get(3)))
            .collect();
        let names = qualified(rows.iter().map(|(s, k, _, _)| (s.as_str(), k.as_str())));
        Ok(names.into_iter().zip(rows).map(|(name, (_, _, step, v))| (name, step, v)).collect())
    }

    /// The summaries of a run, in the order they were recorded.
    pub async fn summaries(&self, run_id: i64) -> Result<Vec<Summary>> {
        let text = match self.backend {
            crate::Backend::Sqlite => {
                "SELECT stage, name, text FROM summaries WHERE run_id = ? AND printed <> 0 ORDER BY rowid"
            }
            crate::Backend::Postgres => {
                "SELECT stage, name, text FROM summaries WHERE run_id = ? AND printed <> 0 ORDER BY seq"
            }
        };
        Ok(self
            .q(text)
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| Summary { stage: r.get(0), name: r.get(1), text: r.get(2) })
            .collect())
    }

    /// The attachment called `name` of a run (the first stage's, in recording order).
    pub async fn attachment(&self, run_id: i64, name: &str) -> Result<Option<Summary>> {
        let text = match self.backend {
            crate::Backend::Sqlite => {
                "SELECT stage, name, text FROM summaries WHERE run_id = ? AND name = ? AND printed = 0 ORDER BY rowid LIMIT 1"
            }
            crate::Backend::Postgres => {
                "SELECT stage, name, text FROM summaries WHERE run_id = ? AND name = ? AND printed = 0 ORDER BY seq LIMIT 1"
            }
        };
        Ok(self.q(text).bind(run_id).bind(name).fetch_optional(&self.pool).await?.map(|r| Summary {
            stage: r.get(0),
            name: r.get(1),
            text: r.get(2),
        }))
    }

    /// The resolved config (YAML) and git commit of a run.
    pub async fn run_config(&self, run_id: i64) -> Result<(String, Option<String>)> {
        let row = self
            .q("SELECT config_yaml, git_commit FROM runs WHERE id = ?")
            .bind(run_id)
            .fetch_optional(&self.pool)
            .await?;
        match row {
            Some(r) => Ok((r.get(0), r.get(1))),
            None => bail!("no run with id {run_id}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_conditions() {
        let c: Cond = "train.beta=0.5".parse().unwrap();
        assert_eq!((c.key.as_str(), c.op, c.value.as_str()), ("train.beta", Op::Eq, "0.5"));
        let c: Cond = "test.t2i.r1 >= 0.6".parse().unwrap();
        assert_eq!((c.key.as_str(), c.op, c.value.as_str()), ("test.t2i.r1", Op::Ge, "0.6"));
        assert_eq!("a!=x".parse::<Cond>().unwrap().op, Op::Ne);
        assert_eq!("a<1".parse::<Cond>().unwrap().op, Op::Lt);
        assert!("abc".parse::<Cond>().is_err());
        assert!("=1".parse::<Cond>().is_err());
    }

    #[test]
    fn malformed_conditions_are_rejected() {
        for bad in ["left.factor<=>1", "a=", "a<>1", "a>=<2", "a!==1"] {
            assert!(bad.parse::<Cond>().is_err(), "{bad} must be rejected");
        }
    }

    #[test]
    fn keys_logged_by_two_stages_are_qualified() {
        let pairs = [("left", "mean"), ("left", "loss"), ("right", "mean")];
        assert_eq!(qualified(pairs.iter().copied()), ["left.mean", "loss", "right.mean"]);
    }
}
