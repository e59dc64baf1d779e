//! Whole runs as data: [`Store::dump_runs`] reads every row of a run (the run, its params,
//! stage runs with their artifacts and summaries, metrics in logging order),
//! [`Store::import_run`] writes one into another store in one transaction, through the
//! same writer that records a running run, and [`copy`] moves runs between
//! stores (`huse-run db copy SRC DST`: a laptop's SQLite into the group's PostgreSQL)
//! without duplicating them.
//!
//! A run is the same run in two stores when its experiment name, run name, start time,
//! host and process id agree — ids differ between stores and are never copied.

use anyhow::{Context as _, Result};
use sqlx::Row;

use crate::{Backend, MetricRow, RUN_COLUMNS, Record, Run, RunStatus, StageRunRow, Store, q};

/// One run, every row of it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RunDump {
    /// The `runs` row (`id` 0: ids belong to a store); the dump dereferences to it.
    pub run: Run,
    /// The experiment's file.
    pub experiment_file: String,
    /// The resolved config.
    pub config_yaml: String,
    /// (key, value, value_num), by key.
    pub params: Vec<(String, String, Option<f64>)>,
    /// Stage runs in recording order, each with its artifacts, summaries and attachments
    /// (`run_id` is 0: ids belong to a store).
    pub stage_runs: Vec<StageRunRow>,
    /// (stage, key, step, value) in logging order.
    pub metrics: Vec<(String, String, i64, Option<f64>)>,
}

impl std::ops::Deref for RunDump {
    type Target = Run;
    fn deref(&self) -> &Run {
        &self.run
    }
}

impl std::ops::DerefMut for RunDump {
    fn deref_mut(&mut self) -> &mut Run {
        &mut self.run
    }
}

/// What [`copy`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Copied {
    /// Runs written into the destination.
    pub copied: usize,
    /// Runs the destination already had.
    pub skipped: usize,
    /// Runs left out because they are still running.
    pub running: usize,
}

impl Store {
    /// Every run (of `experiment`, when given), oldest first, with all its rows.
    pub async fn dump_runs(&self, experiment: Option<&str>) -> Result<Vec<RunDump>> {
        let rows = crate::q_owned(
            self.backend,
            format!(
                "SELECT {RUN_COLUMNS}, e.file, r.config_yaml FROM runs r JOIN experiments e ON e.id = r.experiment_id
                 WHERE (? IS NULL OR e.name = ?) ORDER BY r.id"
            ),
        )
        .bind(experiment)
        .bind(experiment)
        .fetch_all(&self.pool)
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.get("id");
            let params = self
                .q("SELECT key, value, value_num FROM params WHERE run_id = ? ORDER BY key")
                .bind(id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|p| (p.get(0), p.get(1), p.get(2)))
                .collect();
            let mut stage_runs: Vec<StageRunRow> = Vec::new();
            for st in self
                .q("SELECT stage, kind, version, source, cache_key, cached, status, started_at, ended_at, duration_s, output_dir, error
                    FROM stage_runs WHERE run_id = ? ORDER BY id")
                .bind(id)
                .fetch_all(&self.pool)
                .await?
            {
                stage_runs.push(StageRunRow {
                    run_id: 0,
                    stage: st.get(0),
                    kind: st.get(1),
                    version: st.get(2),
                    source: st.get(3),
                    cache_key: st.get(4),
                    cached: st.get::<i64, _>(5) != 0,
                    status: st.get::<String, _>(6).parse().map_err(anyhow::Error::msg)?,
                    started_at: st.get(7),
                    ended_at: st.get(8),
                    duration_s: st.get(9),
                    output_dir: st.get(10),
                    error: st.get(11),
                    artifacts: Vec::new(),
                    summaries: Vec::new(),
                    attachments: Vec::new(),
                });
            }
            // Artifacts and texts go with the (first) row of their stage, as they were recorded.
            for a in self
                .q("SELECT stage, name, path, bytes FROM artifacts WHERE run_id = ? ORDER BY stage, name")
                .bind(id)
                .fetch_all(&self.pool)
                .await?
            {
                if let Some(r) = of_stage(&mut stage_runs, &a.get::<String, _>(0)) {
                    r.artifacts.push((a.get(1), a.get(2), a.get(3)));
                }
            }
            let summaries_sql = match self.backend {
                Backend::Sqlite => "SELECT stage, name, text, printed FROM summaries WHERE run_id = ? ORDER BY rowid",
                Backend::Postgres => "SELECT stage, name, text, printed FROM summaries WHERE run_id = ? ORDER BY seq",
            };
            for t in self.q(summaries_sql).bind(id).fetch_all(&self.pool).await? {
                if let Some(r) = of_stage(&mut stage_runs, &t.get::<String, _>(0)) {
                    let entry = (t.get(1), t.get(2));
                    if t.get::<i64, _>(3) != 0 { r.summaries.push(entry) } else { r.attachments.push(entry) }
                }
            }
            let metrics = self
                .q("SELECT stage, key, step, value FROM metrics WHERE run_id = ? ORDER BY id")
                .bind(id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|m| (m.get(0), m.get(1), m.get(2), m.get(3)))
                .collect();
            out.push(RunDump {
                run: Run { id: 0, ..Run::from_row(&r)? },
                experiment_file: r.get("file"),
                config_yaml: r.get("config_yaml"),
                params,
                stage_runs,
                metrics,
            });
        }
        Ok(out)
    }

    /// Writes `run` (all its rows, one transaction) unless this store already has it;
    /// returns whether it was written.
    pub async fn import_run(&self, run: &RunDump) -> Result<bool> {
        anyhow::ensure!(!self.read_only, "the results database was opened read-only");
        let b = self.backend;
        transaction!(self, |conn| {
            let exists: i64 = q(
                b,
                "SELECT count(*) FROM runs r JOIN experiments e ON e.id = r.experiment_id
                 WHERE e.name = ? AND r.name = ? AND r.started_at = ? AND coalesce(r.host, '') = ? AND coalesce(r.pid, -1) = ?",
            )
            .bind(&run.experiment)
            .bind(&run.name)
            .bind(&run.started_at)
            .bind(run.host.clone().unwrap_or_default())
            .bind(run.pid.unwrap_or(-1))
            .fetch_one(&mut *conn)
            .await?
            .get(0);
            if exists > 0 {
                false
            } else {
                q(b, "INSERT INTO experiments (name, file, created_at) VALUES (?, ?, ?) ON CONFLICT(name) DO NOTHING")
                    .bind(&run.experiment)
                    .bind(&run.experiment_file)
                    .bind(crate::now())
                    .execute(&mut *conn)
                    .await?;
                let exp: i64 = q(b, "SELECT id FROM experiments WHERE name = ?")
                    .bind(&run.experiment)
                    .fetch_one(&mut *conn)
                    .await?
                    .get(0);
                let id: i64 = q(
                    b,
                    "INSERT INTO runs (experiment_id, name, status, started_at, ended_at, duration_s, config_yaml, sweep_point, seed, device, git_commit, error, host, pid, log)
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                )
                .bind(exp)
                .bind(&run.name)
                .bind(run.status.as_str())
                .bind(&run.started_at)
                .bind(&run.ended_at)
                .bind(run.duration_s)
                .bind(&run.config_yaml)
                .bind(&run.point)
                .bind(run.seed)
                .bind(&run.device)
                .bind(&run.git_commit)
                .bind(&run.error)
                .bind(&run.host)
                .bind(run.pid)
                .bind(&run.log)
                .fetch_one(&mut *conn)
                .await?
                .get(0);
                for (k, v, n) in &run.params {
                    q(b, "INSERT INTO params (run_id, key, value, value_num) VALUES (?, ?, ?, ?)")
                        .bind(id)
                        .bind(k)
                        .bind(v)
                        .bind(*n)
                        .execute(&mut *conn)
                        .await?;
                }
                // The same writer as a run being recorded.
                for st in &run.stage_runs {
                    Store::write_record(
                        b,
                        &mut *conn,
                        &Record::StageRun(Box::new(StageRunRow { run_id: id, ..st.clone() })),
                    )
                    .await?;
                }
                let metrics = run
                    .metrics
                    .iter()
                    .map(|(stage, key, step, value)| MetricRow {
                        run_id: id,
                        stage: stage.clone(),
                        key: key.clone(),
                        step: *step,
                        value: value.unwrap_or(f64::NAN),
                    })
                    .collect();
                Store::write_record(b, &mut *conn, &Record::Metrics(metrics)).await?;
                true
            }
        })
    }
}

/// The first recorded row of `stage`.
fn of_stage<'a>(rows: &'a mut [StageRunRow], stage: &str) -> Option<&'a mut StageRunRow> {
    rows.iter_mut().find(|r| r.stage == stage)
}

/// Copies the finished runs of `src` (of `experiment`, when given) that `dst` lacks into
/// `dst`, each in its own transaction; runs still running are left out (copy again later).
pub async fn copy(src: &Store, dst: &Store, experiment: Option<&str>) -> Result<Copied> {
    let mut done = Copied::default();
    for run in src.dump_runs(experiment).await? {
        if run.status == RunStatus::Running {
            done.running += 1;
            continue;
        }
        let written =
            dst.import_run(&run).await.with_context(|| format!("copying run {} into {}", run.name, dst.location()))?;
        if written {
            done.copied += 1;
        } else {
            done.skipped += 1;
        }
    }
    Ok(done)
}
