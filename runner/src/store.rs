//! The results database: experiments, runs, params, stage runs, metrics, artifacts.
//!
//! SQLite through sqlx, WAL journal, a busy timeout, and migrations embedded in the
//! binary (`runner/migrations/`). Several `huse-run` processes may write one database at
//! once: migrations run under an exclusive file lock, and write transactions start with
//! `BEGIN IMMEDIATE` so they wait for each other instead of failing. All values are bound
//! as parameters; no user text is ever pasted into SQL.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, query};

use crate::config::RunSpec;

/// One metric row to insert.
#[derive(Debug, Clone)]
pub struct MetricRow {
    pub run_id: i64,
    pub stage: String,
    pub key: String,
    pub step: i64,
    pub value: f64,
}

/// One stage run to record.
#[derive(Debug, Clone)]
pub struct StageRunRow {
    pub run_id: i64,
    pub stage: String,
    pub kind: String,
    pub version: String,
    pub source: String,
    pub cache_key: String,
    pub cached: bool,
    pub status: &'static str,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub duration_s: Option<f64>,
    pub output_dir: Option<String>,
    pub error: Option<String>,
    /// (artifact name, path, bytes)
    pub artifacts: Vec<(String, String, Option<i64>)>,
    /// (artifact name, text) of `*.md` outputs.
    pub summaries: Vec<(String, String)>,
}

/// A handle on the results database.
#[derive(Clone)]
pub struct Store {
    pub pool: SqlitePool,
    pub path: PathBuf,
}

/// Now, as an RFC 3339 UTC timestamp with milliseconds.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

impl Store {
    /// Opens (creating if needed) the database at `path` and brings its schema up to date.
    pub async fn open(path: &Path) -> Result<Store> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let opts = SqliteConnectOptions::from_str(&format!("sqlite://{}", path.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .busy_timeout(Duration::from_secs(60))
            .foreign_keys(true);
        let pool = SqlitePoolOptions::new()
            .max_connections(4)
            .connect_with(opts)
            .await
            .with_context(|| format!("opening results database {}", path.display()))?;
        // Concurrent first runs must not race on the migrations: hold a file lock meanwhile.
        let lock_path = path.with_extension("migrate.lock");
        let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path)?;
        let lock = tokio::task::spawn_blocking(move || lock.lock().map(|_| lock)).await??;
        let migrated = sqlx::migrate!("./migrations").run(&pool).await;
        drop(lock);
        migrated.with_context(|| format!("migrating results database {}", path.display()))?;
        Ok(Store { pool, path: path.to_path_buf() })
    }

    /// Opens an existing database for queries; a missing file is an error, not a new database.
    pub async fn open_existing(path: &Path) -> Result<Store> {
        if !path.exists() {
            bail!("no results database at {} (run an experiment first, or pass --db)", path.display());
        }
        Store::open(path).await
    }

    /// Marks runs of this host whose process is gone (killed, crashed) as interrupted.
    pub async fn reap_dead_runs(&self) -> Result<u64> {
        let rows = query("SELECT id, pid FROM runs WHERE status = 'running' AND host = ?")
            .bind(host())
            .fetch_all(&self.pool)
            .await?;
        let mut n = 0;
        for r in rows {
            let pid: Option<i64> = r.get("pid");
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists() && p as u32 != std::process::id());
            if !alive {
                let id: i64 = r.get("id");
                n += query("UPDATE runs SET status = 'interrupted', ended_at = ?, error = 'the process ended without finishing (killed or crashed)' WHERE id = ? AND status = 'running'")
                    .bind(now())
                    .bind(id)
                    .execute(&self.pool)
                    .await?
                    .rows_affected();
            }
        }
        Ok(n)
    }

    /// The id of the experiment called `name`, created if new.
    pub async fn experiment(&self, name: &str, file: &str) -> Result<i64> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        query("INSERT INTO experiments (name, file, created_at) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET file = excluded.file")
            .bind(name)
            .bind(file)
            .bind(now())
            .execute(&mut *tx)
            .await?;
        let id: i64 = query("SELECT id FROM experiments WHERE name = ?").bind(name).fetch_one(&mut *tx).await?.get(0);
        tx.commit().await?;
        Ok(id)
    }

    /// Records a new run (status `running`) with its params; returns its id.
    pub async fn insert_run(&self, experiment_id: i64, run: &RunSpec, git_commit: Option<&str>) -> Result<i64> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let id: i64 = query(
            "INSERT INTO runs (experiment_id, name, status, started_at, config_yaml, sweep_point, seed, device, git_commit, host, pid)
             VALUES (?, ?, 'running', ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(experiment_id)
        .bind(&run.name)
        .bind(now())
        .bind(&run.resolved_yaml)
        .bind(&run.point)
        .bind(run.seed as i64)
        .bind(run.device.to_string())
        .bind(git_commit)
        .bind(host())
        .bind(std::process::id() as i64)
        .fetch_one(&mut *tx)
        .await?
        .get(0);
        for (k, v) in &run.params {
            let (text, num) = match v {
                serde_json::Value::String(s) => (s.clone(), s.parse::<f64>().ok()),
                serde_json::Value::Number(n) => (n.to_string(), n.as_f64()),
                serde_json::Value::Bool(b) => (b.to_string(), Some(f64::from(u8::from(*b)))),
                other => (other.to_string(), None),
            };
            query("INSERT OR REPLACE INTO params (run_id, key, value, value_num) VALUES (?, ?, ?, ?)")
                .bind(id)
                .bind(k)
                .bind(text)
                .bind(num)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(id)
    }

    /// Sets a run's final status.
    pub async fn finish_run(&self, run_id: i64, status: &str, error: Option<&str>) -> Result<()> {
        query(
            "UPDATE runs SET status = ?, error = ?, ended_at = ?,
             duration_s = (julianday(?) - julianday(started_at)) * 86400.0 WHERE id = ?",
        )
        .bind(status)
        .bind(error)
        .bind(now())
        .bind(now())
        .bind(run_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records one stage run and its artifacts.
    pub async fn insert_stage_run(&self, r: &StageRunRow) -> Result<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        query(
            "INSERT INTO stage_runs (run_id, stage, kind, version, source, cache_key, cached, status, started_at, ended_at, duration_s, output_dir, error)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(r.run_id)
        .bind(&r.stage)
        .bind(&r.kind)
        .bind(&r.version)
        .bind(&r.source)
        .bind(&r.cache_key)
        .bind(r.cached)
        .bind(r.status)
        .bind(&r.started_at)
        .bind(&r.ended_at)
        .bind(r.duration_s)
        .bind(&r.output_dir)
        .bind(&r.error)
        .execute(&mut *tx)
        .await?;
        for (name, text) in &r.summaries {
            query("INSERT OR REPLACE INTO summaries (run_id, stage, name, text) VALUES (?, ?, ?, ?)")
                .bind(r.run_id)
                .bind(&r.stage)
                .bind(name)
                .bind(text)
                .execute(&mut *tx)
                .await?;
        }
        for (name, path, bytes) in &r.artifacts {
            query("INSERT OR REPLACE INTO artifacts (run_id, stage, name, path, bytes) VALUES (?, ?, ?, ?, ?)")
                .bind(r.run_id)
                .bind(&r.stage)
                .bind(name)
                .bind(path)
                .bind(bytes)
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// Inserts metric rows in one transaction.
    pub async fn insert_metrics(&self, rows: &[MetricRow]) -> Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        for m in rows {
            query("INSERT INTO metrics (run_id, stage, key, step, value) VALUES (?, ?, ?, ?, ?)")
                .bind(m.run_id)
                .bind(&m.stage)
                .bind(&m.key)
                .bind(m.step)
                .bind(m.value.is_finite().then_some(m.value))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(())
    }

    /// The summaries of a run, in stage order of recording.
    pub async fn summaries(&self, run_id: i64) -> Result<Vec<(String, String, String)>> {
        Ok(query("SELECT stage, name, text FROM summaries WHERE run_id = ? ORDER BY rowid")
            .bind(run_id)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1), r.get(2)))
            .collect())
    }

    pub async fn close(self) {
        self.pool.close().await
    }
}
