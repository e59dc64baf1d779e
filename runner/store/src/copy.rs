//! Whole runs as data: [`Store::dump_runs`] reads every row of a run (the run, its params,
//! stage runs, metrics in logging order, artifacts, summaries), [`Store::import_run`]
//! writes one into another store in one transaction, and [`copy`] moves runs between
//! stores (`huse-run db copy SRC DST`: a laptop's SQLite into the group's PostgreSQL)
//! without duplicating them.
//!
//! A run is the same run in two stores when its experiment name, run name, start time,
//! host and process id agree — ids differ between stores and are never copied.

use anyhow::{Context as _, Result};
use sqlx::Row;

use crate::{Backend, RunStatus, Store, q};

/// One run, every row of it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct RunDump {
    /// Experiment name.
    pub experiment: String,
    /// The experiment's file.
    pub experiment_file: String,
    /// Run name.
    pub name: String,
    /// Its state.
    pub status: RunStatus,
    /// RFC 3339 start.
    pub started_at: String,
    /// RFC 3339 end.
    pub ended_at: Option<String>,
    /// Seconds.
    pub duration_s: Option<f64>,
    /// The resolved config.
    pub config_yaml: String,
    /// Sweep assignments.
    pub point: String,
    /// Seed.
    pub seed: i64,
    /// Device.
    pub device: String,
    /// Git commit.
    pub git_commit: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
    /// Host it ran on.
    pub host: Option<String>,
    /// Its process id there.
    pub pid: Option<i64>,
    /// Its cluster job log.
    pub log: Option<String>,
    /// (key, value, value_num), by key.
    pub params: Vec<(String, String, Option<f64>)>,
    /// Stage runs in recording order.
    pub stage_runs: Vec<StageDump>,
    /// (stage, key, step, value) in logging order.
    pub metrics: Vec<(String, String, i64, Option<f64>)>,
    /// (stage, name, path, bytes), by stage and name.
    pub artifacts: Vec<(String, String, String, Option<i64>)>,
    /// (stage, name, text, printed) in recording order.
    pub summaries: Vec<(String, String, String, bool)>,
}

/// One stage run row.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StageDump {
    /// Stage name.
    pub stage: String,
    /// Kind.
    pub kind: String,
    /// Kind version.
    pub version: String,
    /// builtin or plugin.
    pub source: String,
    /// Cache key.
    pub cache_key: String,
    /// From the cache.
    pub cached: bool,
    /// How it ended.
    pub status: String,
    /// Start.
    pub started_at: Option<String>,
    /// End.
    pub ended_at: Option<String>,
    /// Seconds.
    pub duration_s: Option<f64>,
    /// Output folder.
    pub output_dir: Option<String>,
    /// Error.
    pub error: Option<String>,
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
        let rows = self
            .q("SELECT r.id, e.name, e.file, r.name, r.status, r.started_at, r.ended_at, r.duration_s, r.config_yaml, r.sweep_point, r.seed,
                       r.device, r.git_commit, r.error, r.host, r.pid, r.log
                FROM runs r JOIN experiments e ON e.id = r.experiment_id WHERE (? IS NULL OR e.name = ?) ORDER BY r.id")
            .bind(experiment)
            .bind(experiment)
            .fetch_all(&self.pool)
            .await?;
        let mut out = Vec::with_capacity(rows.len());
        for r in rows {
            let id: i64 = r.get(0);
            let status: String = r.get(4);
            let params = self
                .q("SELECT key, value, value_num FROM params WHERE run_id = ? ORDER BY key")
                .bind(id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|p| (p.get(0), p.get(1), p.get(2)))
                .collect();
            let stage_runs = self
                .q("SELECT stage, kind, version, source, cache_key, cached, status, started_at, ended_at, duration_s, output_dir, error
                    FROM stage_runs WHERE run_id = ? ORDER BY id")
                .bind(id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|s| StageDump {
                    stage: s.get(0),
                    kind: s.get(1),
                    version: s.get(2),
                    source: s.get(3),
                    cache_key: s.get(4),
                    cached: s.get::<i64, _>(5) != 0,
                    status: s.get(6),
                    started_at: s.get(7),
                    ended_at: s.get(8),
                    duration_s: s.get(9),
                    output_dir: s.get(10),
                    error: s.get(11),
                })
                .collect();
            let metrics = self
                .q("SELECT stage, key, step, value FROM metrics WHERE run_id = ? ORDER BY id")
                .bind(id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|m| (m.get(0), m.get(1), m.get(2), m.get(3)))
                .collect();
            let artifacts = self
                .q("SELECT stage, name, path, bytes FROM artifacts WHERE run_id = ? ORDER BY stage, name")
                .bind(id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|a| (a.get(0), a.get(1), a.get(2), a.get(3)))
                .collect();
            let summaries_sql = match self.backend {
                Backend::Sqlite => "SELECT stage, name, text, printed FROM summaries WHERE run_id = ? ORDER BY rowid",
                Backend::Postgres => "SELECT stage, name, text, printed FROM summaries WHERE run_id = ? ORDER BY seq",
            };
            let summaries = self
                .q(summaries_sql)
                .bind(id)
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|s| (s.get(0), s.get(1), s.get(2), s.get::<i64, _>(3) != 0))
                .collect();
            out.push(RunDump {
                experiment: r.get(1),
                experiment_file: r.get(2),
                name: r.get(3),
                status: status.parse().map_err(anyhow::Error::msg)?,
                started_at: r.get(5),
                ended_at: r.get(6),
                duration_s: r.get(7),
                config_yaml: r.get(8),
                point: r.get(9),
                seed: r.get(10),
                device: r.get(11),
                git_commit: r.get(12),
                error: r.get(13),
                host: r.get(14),
                pid: r.get(15),
                log: r.get(16),
                params,
                stage_runs,
                metrics,
                artifacts,
                summaries,
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
                let exp: i64 = q(b, "SELECT id FROM experiments WHERE name = ?").bind(&run.experiment).fetch_one(&mut *conn).await?.get(0);
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
                    q(b, "INSERT INTO params (run_id, key, value, value_num) VALUES (?, ?, ?, ?)").bind(id).bind(k).bind(v).bind(*n).execute(&mut *conn).await?;
                }
                for s in &run.stage_runs {
                    q(b, "INSERT INTO stage_runs (run_id, stage, kind, version, source, cache_key, cached, status, started_at, ended_at, duration_s, output_dir, error)
                          VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
                    .bind(id)
                    .bind(&s.stage)
                    .bind(&s.kind)
                    .bind(&s.version)
                    .bind(&s.source)
                    .bind(&s.cache_key)
                    .bind(i64::from(s.cached))
                    .bind(&s.status)
                    .bind(&s.started_at)
                    .bind(&s.ended_at)
                    .bind(s.duration_s)
                    .bind(&s.output_dir)
                    .bind(&s.error)
                    .execute(&mut *conn)
                    .await?;
                }
                for (stage, key, step, value) in &run.metrics {
                    q(b, "INSERT INTO metrics (run_id, stage, key, step, value) VALUES (?, ?, ?, ?, ?)")
                        .bind(id)
                        .bind(stage)
                        .bind(key)
                        .bind(*step)
                        .bind(*value)
                        .execute(&mut *conn)
                        .await?;
                }
                for (stage, name, path, bytes) in &run.artifacts {
                    q(b, "INSERT INTO artifacts (run_id, stage, name, path, bytes) VALUES (?, ?, ?, ?, ?)")
                        .bind(id)
                        .bind(stage)
                        .bind(name)
                        .bind(path)
                        .bind(*bytes)
                        .execute(&mut *conn)
                        .await?;
                }
                for (stage, name, text, printed) in &run.summaries {
                    q(b, "INSERT INTO summaries (run_id, stage, name, text, printed) VALUES (?, ?, ?, ?, ?)")
                        .bind(id)
                        .bind(stage)
                        .bind(name)
                        .bind(text)
                        .bind(i64::from(*printed))
                        .execute(&mut *conn)
                        .await?;
                }
                true
            }
        })
    }
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
        let written = dst.import_run(&run).await.with_context(|| format!("copying run {} into {}", run.name, dst.location()))?;
        if written {
            done.copied += 1;
        } else {
            done.skipped += 1;
        }
    }
    Ok(done)
}
