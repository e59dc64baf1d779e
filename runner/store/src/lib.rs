//! `huse-store`: the results database of `huse-run` — experiments, runs, params, stage
//! runs, metrics, artifacts and summaries — and every query over it.
//!
//! [`Store`] is the only door to the database: the scheduler records through
//! [`Store::insert_run`], [`Store::insert_stage_run`], [`Store::insert_metrics`] and
//! [`Store::finish_run`]; the query commands and the report read through
//! [`Store::load_runs`] and the other typed readers in [`query`]. No other crate writes
//! SQL, and the connection pool is private, which is also the seam a second backend
//! plugs into.
//!
//! SQLite through sqlx, WAL journal, a busy timeout, and migrations embedded in the
//! binary (`runner/store/migrations/`). Several `huse-run` processes may write one
//! database at once: migrations run under an exclusive file lock, and write transactions
//! start with `BEGIN IMMEDIATE` so they wait for each other instead of failing. All
//! values are bound as parameters; no user text is ever pasted into SQL.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let store = huse_store::Store::open_existing(std::path::Path::new(".huse/runs.sqlite")).await?;
//! for run in store.load_runs(&huse_store::Filter::default()).await? {
//!     println!("{} {} {}", run.id, run.name, run.status);
//! }
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{Context as _, Result, bail};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Row, query as sql};

pub mod query;

pub use query::{Cond, Filter, Op, RunRow, StageRunInfo};

/// The state of a run, as stored in `runs.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RunStatus {
    /// Started and not finished (or its process died; see [`Store::reap_dead_runs`]).
    Running,
    /// Every stage succeeded.
    Succeeded,
    /// A stage failed.
    Failed,
    /// Cancelled (Ctrl-C, SIGTERM) or its process ended without finishing.
    Interrupted,
}

/// The state of one stage of a run, as stored in `stage_runs.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StageStatus {
    /// Computed or taken from the cache.
    Succeeded,
    /// The stage returned an error.
    Failed,
    /// Not run because an upstream stage did not succeed.
    Skipped,
    /// Cancelled before or while running.
    Interrupted,
}

macro_rules! status_strings {
    ($t:ty { $($v:ident => $s:literal),* $(,)? }) => {
        impl $t {
            /// The name stored in the database.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$v => $s),* }
            }
            /// Every value, in declaration order.
            pub const ALL: &[$t] = &[$(Self::$v),*];
        }
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok(Self::$v),)*
                    _ => Err(format!("unknown status `{s}` (expected one of {})", [$($s),*].join(", "))),
                }
            }
        }
    };
}
status_strings!(RunStatus { Running => "running", Succeeded => "succeeded", Failed => "failed", Interrupted => "interrupted" });
status_strings!(StageStatus { Succeeded => "succeeded", Failed => "failed", Skipped => "skipped", Interrupted => "interrupted" });

/// A run to record: what the scheduler knows of it when it starts.
#[derive(Debug, Clone)]
pub struct NewRun {
    /// `EXPERIMENT@point/seed=N`.
    pub name: String,
    /// The sweep assignments (`train.beta=0.5,...`), empty without a sweep.
    pub point: String,
    /// The run's seed.
    pub seed: u64,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// The resolved config as YAML.
    pub config_yaml: String,
    /// Every leaf of the resolved config, flattened (`train.alpha`, `seed`, ...).
    pub params: Vec<(String, serde_json::Value)>,
    /// The git commit of the experiment file's repository (`-dirty` when changed).
    pub git_commit: Option<String>,
}

/// One metric row to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct MetricRow {
    /// The run it belongs to.
    pub run_id: i64,
    /// The stage (name in the experiment) that logged it.
    pub stage: String,
    /// Metric key, e.g. `train.loss`.
    pub key: String,
    /// Step (epoch for curves, 0 for single values).
    pub step: i64,
    /// The value; NaN and infinities are stored as NULL.
    pub value: f64,
}

/// A text summary a stage published (e.g. evaluate's tables), stored with the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Summary {
    /// Stage name.
    pub stage: String,
    /// The output's name (e.g. `tables.md`).
    pub name: String,
    /// Its text.
    pub text: String,
}

/// One stage run to record.
#[derive(Debug, Clone)]
pub struct StageRunRow {
    /// The run it belongs to.
    pub run_id: i64,
    /// Stage name in the experiment.
    pub stage: String,
    /// Stage kind (`uses:`).
    pub kind: String,
    /// The kind's version.
    pub version: String,
    /// `builtin` or `plugin:<path>@<version>`.
    pub source: String,
    /// The cache key of its output.
    pub cache_key: String,
    /// Whether the output came from the cache (or from another run of this invocation).
    pub cached: bool,
    /// How it ended.
    pub status: StageStatus,
    /// RFC 3339 start time (computed stages only).
    pub started_at: Option<String>,
    /// RFC 3339 end time (computed stages only).
    pub ended_at: Option<String>,
    /// Seconds it ran (computed stages only).
    pub duration_s: Option<f64>,
    /// Its output directory in the cache.
    pub output_dir: Option<String>,
    /// Why it failed, was skipped or interrupted.
    pub error: Option<String>,
    /// (artifact name, path, bytes)
    pub artifacts: Vec<(String, String, Option<i64>)>,
    /// (output name, text) of the outputs the stage declares as summaries.
    pub summaries: Vec<(String, String)>,
}

/// A handle on the results database.
#[derive(Clone)]
pub struct Store {
    pool: SqlitePool,
    path: PathBuf,
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

    /// Where the database lives.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Marks runs of this host whose process is gone (killed, crashed) as interrupted.
    pub async fn reap_dead_runs(&self) -> Result<u64> {
        let rows = sql("SELECT id, pid FROM runs WHERE status = ? AND host = ?")
            .bind(RunStatus::Running.as_str())
            .bind(host())
            .fetch_all(&self.pool)
            .await?;
        let mut n = 0;
        for r in rows {
            let pid: Option<i64> = r.get("pid");
            let alive = pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists() && p as u32 != std::process::id());
            if !alive {
                let id: i64 = r.get("id");
                n += sql("UPDATE runs SET status = ?, ended_at = ?, error = 'the process ended without finishing (killed or crashed)' WHERE id = ? AND status = ?")
                    .bind(RunStatus::Interrupted.as_str())
                    .bind(now())
                    .bind(id)
                    .bind(RunStatus::Running.as_str())
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
        sql("INSERT INTO experiments (name, file, created_at) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET file = excluded.file")
            .bind(name)
            .bind(file)
            .bind(now())
            .execute(&mut *tx)
            .await?;
        let id: i64 = sql("SELECT id FROM experiments WHERE name = ?").bind(name).fetch_one(&mut *tx).await?.get(0);
        tx.commit().await?;
        Ok(id)
    }

    /// Records a new run (status `running`) with its params; returns its id.
    pub async fn insert_run(&self, experiment_id: i64, run: &NewRun) -> Result<i64> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        let id: i64 = sql(
            "INSERT INTO runs (experiment_id, name, status, started_at, config_yaml, sweep_point, seed, device, git_commit, host, pid)
             VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
        )
        .bind(experiment_id)
        .bind(&run.name)
        .bind(RunStatus::Running.as_str())
        .bind(now())
        .bind(&run.config_yaml)
        .bind(&run.point)
        .bind(run.seed as i64)
        .bind(&run.device)
        .bind(&run.git_commit)
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
            sql("INSERT OR REPLACE INTO params (run_id, key, value, value_num) VALUES (?, ?, ?, ?)")
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
    pub async fn finish_run(&self, run_id: i64, status: RunStatus, error: Option<&str>) -> Result<()> {
        sql(
            "UPDATE runs SET status = ?, error = ?, ended_at = ?,
             duration_s = (julianday(?) - julianday(started_at)) * 86400.0 WHERE id = ?",
        )
        .bind(status.as_str())
        .bind(error)
        .bind(now())
        .bind(now())
        .bind(run_id)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// Records one stage run, its artifacts and its summaries.
    pub async fn insert_stage_run(&self, r: &StageRunRow) -> Result<()> {
        let mut tx = self.pool.begin_with("BEGIN IMMEDIATE").await?;
        sql(
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
        .bind(r.status.as_str())
        .bind(&r.started_at)
        .bind(&r.ended_at)
        .bind(r.duration_s)
        .bind(&r.output_dir)
        .bind(&r.error)
        .execute(&mut *tx)
        .await?;
        for (name, text) in &r.summaries {
            sql("INSERT OR REPLACE INTO summaries (run_id, stage, name, text) VALUES (?, ?, ?, ?)")
                .bind(r.run_id)
                .bind(&r.stage)
                .bind(name)
                .bind(text)
                .execute(&mut *tx)
                .await?;
        }
        for (name, path, bytes) in &r.artifacts {
            sql("INSERT OR REPLACE INTO artifacts (run_id, stage, name, path, bytes) VALUES (?, ?, ?, ?, ?)")
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
            sql("INSERT INTO metrics (run_id, stage, key, step, value) VALUES (?, ?, ?, ?, ?)")
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

    /// Closes the connections (waits for them to finish).
    pub async fn close(self) {
        self.pool.close().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        for s in RunStatus::ALL {
            assert_eq!(s.as_str().parse::<RunStatus>().unwrap(), *s);
        }
        for s in StageStatus::ALL {
            assert_eq!(s.to_string().parse::<StageStatus>().unwrap(), *s);
        }
        assert!("done".parse::<RunStatus>().unwrap_err().contains("running, succeeded"));
    }

    #[tokio::test]
    async fn records_and_reads_back_a_run() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&d.path().join("r.sqlite")).await.unwrap();
        let e = store.experiment("exp", "exp.yaml").await.unwrap();
        let run = NewRun {
            name: "exp@a=1".into(),
            point: "a=1".into(),
            seed: 3,
            device: "cpu".into(),
            config_yaml: "name: exp\n".into(),
            params: vec![("a".into(), serde_json::json!(1)), ("s.uses".into(), serde_json::json!("toy"))],
            git_commit: Some("abc".into()),
        };
        let id = store.insert_run(e, &run).await.unwrap();
        let m = |key: &str, step, value| MetricRow { run_id: id, stage: "s".into(), key: key.into(), step, value };
        store.insert_metrics(&[m("loss", 1, 2.0), m("loss", 2, 1.0), m("acc", 0, f64::NAN)]).await.unwrap();
        store
            .insert_stage_run(&StageRunRow {
                run_id: id,
                stage: "s".into(),
                kind: "toy".into(),
                version: "1".into(),
                source: "builtin".into(),
                cache_key: "k".into(),
                cached: false,
                status: StageStatus::Succeeded,
                started_at: None,
                ended_at: None,
                duration_s: Some(1.5),
                output_dir: None,
                error: None,
                artifacts: vec![],
                summaries: vec![("t.md".into(), "| a |".into())],
            })
            .await
            .unwrap();
        store.finish_run(id, RunStatus::Succeeded, None).await.unwrap();

        let runs = store.load_runs(&Filter::default()).await.unwrap();
        assert_eq!(runs.len(), 1);
        let r = &runs[0];
        assert_eq!((r.status.as_str(), r.seed, r.point.as_str()), ("succeeded", 3, "a=1"));
        assert_eq!(r.params["a"], "1");
        assert_eq!(r.metrics["loss"], Some(1.0), "the final value is the highest step's");
        assert_eq!(r.metrics["acc"], None, "NaN is stored as NULL");
        let filtered = store.load_runs(&Filter { conds: vec!["a>=1".parse().unwrap()], ..Default::default() }).await.unwrap();
        assert_eq!(filtered.len(), 1);
        let none = store.load_runs(&Filter { conds: vec!["loss<0.5".parse().unwrap()], ..Default::default() }).await.unwrap();
        assert!(none.is_empty());
        assert_eq!(store.metric_series(id).await.unwrap().len(), 3);
        assert_eq!(store.stage_runs(id).await.unwrap()[0].status, StageStatus::Succeeded);
        assert_eq!(store.summaries(id).await.unwrap()[0].text, "| a |");
        assert_eq!(store.run_config(id).await.unwrap(), ("name: exp\n".to_string(), Some("abc".to_string())));
    }
}
