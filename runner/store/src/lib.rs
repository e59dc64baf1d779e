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
//! Two backends behind one API ([`Location`]): a SQLite file (one machine; WAL journal,
//! a busy timeout) or a PostgreSQL server (a group, or many cluster nodes writing at
//! once), both through sqlx's `Any` driver with the same SQL: statements are written with
//! `?` placeholders and numbered (`$1`, `$2`, ...) for PostgreSQL, and every dialect
//! difference is a named branch here ([`Backend`]). Each backend has its own migrations
//! (`runner/store/migrations/{sqlite,postgres}/`), the same versions and the same tables
//! and columns. Several `huse-run` processes may write one database at once: SQLite
//! migrations run under an exclusive file lock (PostgreSQL's under sqlx's advisory lock),
//! and SQLite write transactions start with `BEGIN IMMEDIATE` so they wait for each other
//! instead of failing; a
//! transaction that fails is rolled back on the spot (a connection that cannot roll back
//! is closed, never reused). All values are bound as parameters; no user text is ever
//! pasted into SQL.
//!
//! Nothing is dropped when the database cannot take a write (busy past the timeout, disk
//! full): the [`Record`] goes to a spool ([`spool`]) — a JSON-lines journal beside the
//! database, or in the cache when that fails — and is retried in order
//! ([`Store::record`], [`Store::drain`]); what is still spooled when a process ends is
//! written by the next `huse-run` that opens the database for writing
//! ([`Store::replay_spools`]), exactly once. Queries open the database read-only
//! ([`Store::open_read_only`]) and never change it.
//!
//! ```no_run
//! # async fn f() -> anyhow::Result<()> {
//! let db: huse_store::Location = ".huse/runs.sqlite".parse().map_err(anyhow::Error::msg)?;
//! // or "postgres://me@dbhost/huse".parse()
//! let store = huse_store::Store::open_read_only(&db).await?;
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
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, ConnectOptions as _};
use sqlx::{AssertSqlSafe, Executor as _, Row};

pub mod query;
pub mod reserve;
pub mod search_lang;
pub mod spool;

pub use query::{Agg, Changes, Cond, ExperimentSummary, Filter, Op, RunRow, Slice, StageRunInfo};
pub use spool::{Record, RunIdent};

/// The state of a run, as stored in `runs.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RunStatus {
    /// Started and not finished (or its process died; see [`Store::reap_dead_runs`]).
    Running,
    /// Every stage succeeded.
    Succeeded,
    /// A stage failed.
    Failed,
    /// Cancelled (Ctrl-C, SIGTERM) or its process ended without finishing.
    Interrupted,
    /// Stopped early by a study's pruner (a stage returned `StageError::Pruned`): its
    /// metrics are those of the steps it ran.
    Pruned,
}

/// The state of one stage of a run, as stored in `stage_runs.status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StageStatus {
    /// Computed or taken from the cache.
    Succeeded,
    /// The stage returned an error.
    Failed,
    /// Not run because an upstream stage did not succeed.
    Skipped,
    /// Cancelled before or while running.
    Interrupted,
    /// Stopped early by a study's pruner.
    Pruned,
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
status_strings!(RunStatus {
    Running => "running",
    Succeeded => "succeeded",
    Failed => "failed",
    Interrupted => "interrupted",
    Pruned => "pruned",
});
status_strings!(StageStatus {
    Succeeded => "succeeded",
    Failed => "failed",
    Skipped => "skipped",
    Interrupted => "interrupted",
    Pruned => "pruned",
});

/// A row of the `runs` table: what the database records about a run. One type for every
/// reader — the queries ([`RunRow`] adds the params and final metrics), whole-run copies
/// between stores ([`copy::RunDump`] adds every other row) and the cluster launcher's
/// status — read by one function ([`Run::from_row`]) from one column list.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Run {
    /// Its id in this database (0 in a [`copy::RunDump`]: ids belong to a store).
    pub id: i64,
    /// The experiment's name.
    pub experiment: String,
    /// `EXPERIMENT@point/seed=N`.
    pub name: String,
    /// Its state.
    pub status: RunStatus,
    /// RFC 3339 start.
    pub started_at: String,
    /// RFC 3339 end.
    pub ended_at: Option<String>,
    /// Seconds from start to end.
    pub duration_s: Option<f64>,
    /// The sweep assignments (`train.beta=0.5,...`), empty without a sweep.
    pub point: String,
    /// The run's seed.
    pub seed: i64,
    /// `auto`, `cpu` or `cuda:N`.
    pub device: String,
    /// The git commit of the experiment file's repository (`-dirty` when changed).
    pub git_commit: Option<String>,
    /// Why it failed or was interrupted.
    pub error: Option<String>,
    /// The host it ran on.
    pub host: Option<String>,
    /// Its process id there.
    pub pid: Option<i64>,
    /// Its log file, when it ran as a cluster job.
    pub log: Option<String>,
}

/// The columns [`Run::from_row`] reads, for a query over `runs r JOIN experiments e`.
pub(crate) const RUN_COLUMNS: &str = "r.id, e.name AS experiment, r.name, r.status, r.started_at, r.ended_at, r.duration_s, \
     r.sweep_point, r.seed, r.device, r.git_commit, r.error, r.host, r.pid, r.log";

impl Run {
    /// The run of a result row that selected [`RUN_COLUMNS`].
    pub(crate) fn from_row(r: &sqlx::any::AnyRow) -> Result<Run> {
        let status: String = r.try_get("status")?;
        Ok(Run {
            id: r.try_get("id")?,
            experiment: r.try_get("experiment")?,
            name: r.try_get("name")?,
            status: status.parse().map_err(anyhow::Error::msg)?,
            started_at: r.try_get("started_at")?,
            ended_at: r.try_get("ended_at")?,
            duration_s: r.try_get("duration_s")?,
            point: r.try_get("sweep_point")?,
            seed: r.try_get("seed")?,
            device: r.try_get("device")?,
            git_commit: r.try_get("git_commit")?,
            error: r.try_get("error")?,
            host: r.try_get("host")?,
            pid: r.try_get("pid")?,
            log: r.try_get("log")?,
        })
    }

    /// Seconds it has been running, for a run still `running` (from its start to now);
    /// None for a finished run (see `duration_s`) or an unreadable start.
    pub fn running_for_s(&self) -> Option<f64> {
        if self.status != RunStatus::Running {
            return None;
        }
        let start = chrono::DateTime::parse_from_rfc3339(&self.started_at).ok()?;
        Some((chrono::Utc::now() - start.with_timezone(&chrono::Utc)).num_milliseconds() as f64 / 1000.0)
    }

    /// A run about to start, for [`Store::insert_run`]: what the scheduler knows of it. The
    /// fields the store sets when it records the run (id, state, start, host, process id) are
    /// left empty here; the rest (end, duration, error) come with [`Store::finish_run`].
    pub fn starting(experiment: &str, name: &str, point: &str, seed: u64, device: &str) -> Run {
        Run {
            id: 0,
            experiment: experiment.to_string(),
            name: name.to_string(),
            status: RunStatus::Running,
            started_at: String::new(),
            ended_at: None,
            duration_s: None,
            point: point.to_string(),
            // The config refuses seeds above i64::MAX (the largest the database stores).
            seed: i64::try_from(seed).unwrap_or(i64::MAX),
            device: device.to_string(),
            git_commit: None,
            error: None,
            host: None,
            pid: None,
            log: None,
        }
    }
}

/// One metric row to insert.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    #[serde(with = "nan_as_null")]
    pub value: f64,
}

/// JSON has no NaN: a non-finite value is written as null and read back as NaN (the
/// database stores both as NULL anyway).
mod nan_as_null {
    use serde::{Deserialize, Deserializer, Serializer};
    pub fn serialize<S: Serializer>(v: &f64, s: S) -> Result<S::Ok, S::Error> {
        if v.is_finite() { s.serialize_f64(*v) } else { s.serialize_none() }
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
        Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
    }
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
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
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
    /// (output name, text) of the outputs the stage declares as attachments (stored, not printed).
    #[serde(default)]
    pub attachments: Vec<(String, String)>,
}

/// A handle on the results database.
#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
    location: Location,
    read_only: bool,
    options: Options,
    spool: std::sync::Arc<tokio::sync::Mutex<spool::Spool>>,
    /// The database's `meta.database_id`.
    db_id: Option<String>,
    /// The identities of the runs this process recorded or looked up, for the spool (`None`:
    /// looked up once without an answer; not asked again).
    idents: std::sync::Arc<std::sync::Mutex<std::collections::HashMap<i64, Option<RunIdent>>>>,
}

/// What [`Store::replay_spools`] did.
#[derive(Debug, Default)]
pub struct Replay {
    /// Records written.
    pub written: usize,
    /// Spools set aside for good (another database's, or their runs are gone): where they
    /// went and why.
    pub set_aside: Vec<(PathBuf, String)>,
    /// Spools left in place because the database could not take them now (busy, full),
    /// with why; the next replay tries again.
    pub left: Vec<(PathBuf, String)>,
}

impl Replay {
    /// Sets `file` aside for `why`; when even that fails, notes it as left in place.
    fn set_aside_or_leave(&mut self, file: &Path, why: String) {
        match spool::Spool::set_aside(file, &why) {
            Ok(dest) => self.set_aside.push((dest, why)),
            Err(e) => self.left.push((file.to_path_buf(), format!("{why}; and it could not be set aside: {e:#}"))),
        }
    }
}

/// How patient the store is with a database that cannot take a write.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long one statement waits for another process's write lock (SQLite's busy timeout).
    pub busy_timeout: Duration,
    /// How long [`Store::drain`] keeps retrying spooled records at the end of a run.
    pub retry_window: Duration,
    /// Where to spool when the folder beside the database cannot be written (e.g. the cache).
    pub fallback_spool_dir: Option<PathBuf>,
    /// Whether [`Store::open`] replays what earlier processes left spooled (off for a caller
    /// that replays itself and reports the outcome, as `huse-run db replay` does).
    pub replay_on_open: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            busy_timeout: Duration::from_secs(60),
            retry_window: Duration::from_secs(300),
            fallback_spool_dir: None,
            replay_on_open: true,
        }
    }
}

impl Options {
    /// The defaults, with `HUSE_DB_BUSY_TIMEOUT` and `HUSE_DB_RETRY` (seconds) when set.
    pub fn from_env() -> Result<Options> {
        let mut o = Options::default();
        let secs = |name: &str| -> Result<Option<Duration>> {
            match std::env::var(name) {
                Ok(v) => {
                    let s: f64 =
                        v.trim().parse().map_err(|_| anyhow::anyhow!("{name}={v}: expected a number of seconds"))?;
                    if !(s.is_finite() && (0.0..=86_400.0).contains(&s)) {
                        bail!("{name}={v}: expected 0 to 86400 seconds");
                    }
                    Ok(Some(Duration::from_secs_f64(s)))
                }
                Err(_) => Ok(None),
            }
        };
        if let Some(d) = secs("HUSE_DB_BUSY_TIMEOUT")? {
            o.busy_timeout = d;
        }
        if let Some(d) = secs("HUSE_DB_RETRY")? {
            o.retry_window = d;
        }
        Ok(o)
    }
}

/// Where the results live, as given by `--db` / `HUSE_DB`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    /// A SQLite file.
    Sqlite(PathBuf),
    /// A PostgreSQL server: the `postgres://` (or `postgresql://`) URL as given.
    Postgres(String),
}

impl FromStr for Location {
    type Err = String;
    /// A plain argument is a file path, taken verbatim (`x?mode=rwc` is a file of that
    /// name, `%41` is not decoded); `sqlite://PATH` (or `sqlite:PATH`) names a SQLite file
    /// explicitly; `postgres://` and `postgresql://` URLs name a PostgreSQL database
    /// (schemes in any case); any other `scheme://`, and SQLite's own `file:` URIs (which
    /// could name an in-memory database that keeps nothing), are errors. Messages never
    /// show a password.
    fn from_str(s: &str) -> Result<Location, String> {
        if s.is_empty() {
            return Err("empty database path".into());
        }
        let lower = s.to_ascii_lowercase();
        for prefix in ["sqlite://", "sqlite:"] {
            if lower.starts_with(prefix) {
                let rest = &s[prefix.len()..];
                if rest.is_empty() {
                    return Err(format!("`{s}`: no file after `sqlite://`"));
                }
                return Ok(Location::Sqlite(PathBuf::from(rest)));
            }
        }
        if lower.starts_with("file:") {
            return Err(format!(
                "`{}`: SQLite `file:` URIs are not accepted (one can name an in-memory database that keeps nothing); give a file path (`./{}` for a file whose name starts with `file:`) or sqlite://PATH",
                redact(s),
                redact(s)
            ));
        }
        if let Some(i) = s.find("://") {
            let scheme = &lower[..i];
            if scheme == "postgres" || scheme == "postgresql" {
                let rest = &s[i + 3..];
                if rest.is_empty() || rest.starts_with('/') && rest.len() == 1 {
                    return Err(format!("`{}`: no host or database after `{scheme}://`", redact(s)));
                }
                // The driver matches the scheme in lower case.
                return Ok(Location::Postgres(format!("{scheme}://{rest}")));
            }
            if !scheme.is_empty() && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)) {
                return Err(format!(
                    "`{}`: unknown database scheme `{scheme}://`; give a file path, sqlite://PATH or postgres://USER@HOST/DB",
                    redact(s)
                ));
            }
        }
        Ok(Location::Sqlite(PathBuf::from(s)))
    }
}

impl fmt::Display for Location {
    /// The file path, or the URL with its password hidden.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::Sqlite(p) => write!(f, "{}", p.display()),
            Location::Postgres(url) => f.write_str(&redact(url)),
        }
    }
}

impl Location {
    /// The location as `--db` / `HUSE_DB` take it, password included (for passing it on
    /// to another `huse-run` process; never print it). A SQLite path is made absolute.
    pub fn to_arg(&self) -> String {
        match self {
            Location::Sqlite(p) => std::path::absolute(p).unwrap_or_else(|_| p.clone()).display().to_string(),
            Location::Postgres(url) => url.clone(),
        }
    }
}

/// The URL the Any driver opens a SQLite file by: every byte of the path but
/// `[A-Za-z0-9/._~-]` percent-encoded (sqlx decodes the path; `%`, `?` and `#` in a file
/// name stay literal).
fn sqlite_url(path: &Path, mode: &str) -> Result<url::Url> {
    // Absolute, so that SQLite never reads the name as a `file:` URI of its own.
    let path =
        std::path::absolute(path).with_context(|| format!("{}: cannot make the path absolute", path.display()))?;
    let bytes = path.as_os_str().as_encoded_bytes();
    let mut enc = String::with_capacity(bytes.len() + 16);
    for b in bytes {
        if b.is_ascii_alphanumeric() || b"/._~-".contains(b) {
            enc.push(*b as char);
        } else {
            enc.push_str(&format!("%{b:02X}"));
        }
    }
    url::Url::parse(&format!("sqlite://{enc}?{mode}"))
        .with_context(|| format!("{}: cannot make a database URL of this path", path.display()))
}

/// Where a PostgreSQL database's spools go under `dir` (a server has no folder beside it):
/// one sub-folder per database, named by a hash of its URL without the password.
fn pg_spool_key(dir: &Path, url: &str) -> PathBuf {
    dir.join(format!("postgres-{}", &blake3::hash(redact(url).as_bytes()).to_hex()[..16]))
}

/// `postgres://user:secret@host/db?password=x` -> `postgres://user:***@host/db?password=***`:
/// the password of the authority and of any `password=` query parameter hidden.
pub fn redact(url: &str) -> String {
    let Some(i) = url.find("://") else { return url.to_string() };
    let (scheme, rest) = url.split_at(i + 3);
    let auth_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let mut out = match rest[..auth_end].rfind('@') {
        Some(at) => match rest[..at].find(':') {
            Some(colon) => format!("{scheme}{}:***{}", &rest[..colon], &rest[at..]),
            None => url.to_string(),
        },
        None => url.to_string(),
    };
    if let Some(q) = out.find('?') {
        let (head, query) = out.split_at(q + 1);
        let hidden: Vec<String> = query
            .split('&')
            .map(|kv| match kv.split_once('=') {
                Some((k, _)) if k.eq_ignore_ascii_case("password") || k.eq_ignore_ascii_case("sslpassword") => {
                    format!("{k}=***")
                }
                _ => kv.to_string(),
            })
            .collect();
        out = format!("{head}{}", hidden.join("&"));
    }
    out
}

/// The SQL dialect of the database behind a [`Store`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// SQLite.
    Sqlite,
    /// PostgreSQL.
    Postgres,
}

/// A statement of this crate, for `backend`: `?` placeholders become `$1`, `$2`, ... for
/// PostgreSQL. (No statement here has a `?` inside a string literal.)
///
/// PostgreSQL statements are not kept prepared between executions: sqlx's `Any` driver
/// sends a NULL `f64` as a `float4` parameter, and a statement prepared with that type
/// then refuses a non-NULL `float8` ("incorrect binary data format"); an unnamed
/// statement takes each execution's parameter types afresh.
pub(crate) fn q(
    backend: Backend,
    text: &'static str,
) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
    match backend {
        Backend::Sqlite => sqlx::query(text),
        Backend::Postgres => sqlx::query(AssertSqlSafe(numbered(text))).persistent(false),
    }
}

/// Like [`q`], for a statement built at run time.
pub(crate) fn q_owned(
    backend: Backend,
    text: String,
) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
    match backend {
        Backend::Sqlite => sqlx::query(AssertSqlSafe(text)),
        Backend::Postgres => sqlx::query(AssertSqlSafe(numbered(&text))).persistent(false),
    }
}

fn numbered(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 8);
    let mut n = 0;
    for c in text.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

/// Now, as an RFC 3339 UTC timestamp with milliseconds.
pub fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_default()
}

static SQLITE_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// Whether a failed write will fail again however often it is retried (a constraint the
/// record breaks), as opposed to a busy, full or unreachable database.
fn is_permanent(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<sqlx::Error>().is_some_and(|e| match e {
            sqlx::Error::Database(d) => !matches!(d.kind(), sqlx::error::ErrorKind::Other),
            _ => false,
        })
    })
}

/// The database's identity (`meta.database_id`, written by migration 6).
async fn database_id(pool: &AnyPool, backend: Backend) -> Option<String> {
    q(backend, "SELECT value FROM meta WHERE key = 'database_id'")
        .fetch_optional(pool)
        .await
        .ok()
        .flatten()
        .map(|r| r.get::<String, _>(0))
}

/// The newest schema version this build knows (the last migration's number).
fn latest_schema() -> i64 {
    let v = |m: &sqlx::migrate::Migrator| m.iter().map(|m| m.version).max().unwrap_or(0);
    debug_assert_eq!(v(&SQLITE_MIGRATIONS), v(&POSTGRES_MIGRATIONS), "both backends have the same schema versions");
    v(&SQLITE_MIGRATIONS)
}

/// Runs `$body` (statements on `$conn`) in a `BEGIN IMMEDIATE` transaction; on any error
/// rolls back, and closes the connection if even that fails, so that no connection goes
/// back to the pool inside a transaction.
macro_rules! transaction {
    ($self:expr, |$conn:ident| $body:block) => {
        transaction!($self, $self.pool.acquire(), |$conn| $body)
    };
    // With the connection from `$acquire` (a future giving a pool connection).
    ($self:expr, $acquire:expr, |$conn:ident| $body:block) => {{
        let mut guard = $acquire.await?;
        let begin = match $self.backend {
            Backend::Sqlite => "BEGIN IMMEDIATE",
            Backend::Postgres => "BEGIN",
        };
        q($self.backend, begin).execute(&mut *guard).await?;
        let result: Result<_> = async {
            let $conn = &mut *guard;
            let out = $body;
            q($self.backend, "COMMIT").execute(&mut *$conn).await?;
            Ok(out)
        }
        .await;
        if result.is_err() && q($self.backend, "ROLLBACK").execute(&mut *guard).await.is_err() {
            // Still inside a transaction, or broken: never give it back to the pool.
            let _ = guard.detach();
        }
        result
    }};
}

// After `transaction!`, which it uses.
pub mod copy;

impl Store {
    /// Opens (creating a SQLite file if needed) the database at `location` for writing,
    /// brings its schema up to date and writes what earlier processes left spooled.
    pub async fn open(location: &Location, options: Options) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let (pool, backend, spool_key) = match location {
            Location::Sqlite(path) => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
                }
                let busy_ms = options.busy_timeout.as_millis();
                let url = sqlite_url(path, "mode=rwc")?;
                let pool = AnyPoolOptions::new()
                    .max_connections(4)
                    .after_connect(move |conn, _| {
                        Box::pin(async move {
                            // What SqliteConnectOptions would set, as PRAGMAs: the Any driver
                            // connects from a URL, which carries none of these.
                            conn.execute(AssertSqlSafe(format!(
                                "PRAGMA busy_timeout = {busy_ms}; PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; PRAGMA foreign_keys = ON;"
                            )))
                            .await?;
                            Ok(())
                        })
                    })
                    .connect_with(AnyConnectOptions::from_url(&url)?)
                    .await
                    .with_context(|| format!("opening results database {}", path.display()))?;
                // Concurrent first runs must not race on the migrations: hold a file lock meanwhile.
                let lock_path = path.with_extension("migrate.lock");
                let lock = std::fs::OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path)?;
                let lock = tokio::task::spawn_blocking(move || lock.lock().map(|_| lock)).await??;
                let migrated = SQLITE_MIGRATIONS.run(&pool).await;
                drop(lock);
                migrated.with_context(|| format!("migrating results database {}", path.display()))?;
                (pool, Backend::Sqlite, path.clone())
            }
            Location::Postgres(url) => {
                let pool = Self::connect_postgres(
                    url,
                    16,
                    options.busy_timeout.clamp(Duration::from_secs(1), Duration::from_secs(10)),
                )
                .await?;
                POSTGRES_MIGRATIONS
                    .run(&pool)
                    .await
                    .with_context(|| format!("migrating results database {location}"))?;
                // A server has no folder beside it: spool in the fallback folder (the cache),
                // one sub-folder per database.
                let dir = options.fallback_spool_dir.clone().unwrap_or_else(std::env::temp_dir);
                (pool, Backend::Postgres, pg_spool_key(&dir, url))
            }
        };
        let db_id = database_id(&pool, backend).await;
        let spool = spool::Spool::new(
            &spool_key,
            options.fallback_spool_dir.clone().filter(|_| backend == Backend::Sqlite),
            db_id.clone(),
        );
        let store = Store {
            pool,
            backend,
            location: location.clone(),
            read_only: false,
            options,
            spool: std::sync::Arc::new(tokio::sync::Mutex::new(spool)),
            db_id,
            idents: Default::default(),
        };
        // What is still spooled stays spooled when this fails; the next process tries again.
        if store.options.replay_on_open {
            match store.replay_spools().await {
                Ok(r) => {
                    for (f, why) in r.set_aside.iter().chain(&r.left) {
                        tracing::warn!("spool {}: {why}", f.display());
                    }
                }
                Err(e) => tracing::warn!("{e:#}"),
            }
        }
        // After the replay, which has the room first.
        if let Location::Sqlite(path) = location {
            reserve::keep(path);
        }
        Ok(store)
    }

    /// A pool on the PostgreSQL server at `url`; a write waits at most `acquire_timeout` for a
    /// connection (a server that went away spools records instead of stalling the run).
    async fn connect_postgres(url: &str, max: u32, acquire_timeout: Duration) -> Result<AnyPool> {
        let shown = redact(url);
        let opts =
            AnyConnectOptions::from_url(&url.parse().map_err(|e| anyhow::anyhow!("`{shown}`: not a valid URL ({e})"))?)
                .with_context(|| format!("`{shown}`: not a PostgreSQL URL"))?;
        // One direct attempt first: a wrong host, port or password fails at once instead of
        // being retried for the pool's whole acquire timeout.
        match tokio::time::timeout(
            Duration::from_secs(30),
            <sqlx::AnyConnection as sqlx::Connection>::connect_with(&opts),
        )
        .await
        {
            Ok(Ok(c)) => {
                let _ = sqlx::Connection::close(c).await;
            }
            Ok(Err(e)) => bail!("connecting to the results database {shown}: {e}"),
            Err(_) => bail!("connecting to the results database {shown}: no answer within 30 s"),
        }
        AnyPoolOptions::new()
            .max_connections(max)
            .acquire_timeout(acquire_timeout)
            .connect_with(opts)
            .await
            .with_context(|| format!("connecting to the results database {shown}"))
    }

    /// Opens an existing database for queries, read-only: nothing is created, migrated or
    /// written (a read-only file works). A database that is not a huse-run database, or one
    /// whose schema is older or newer than this build's, is refused with what to do.
    pub async fn open_read_only(location: &Location) -> Result<Store> {
        Self::open_read_only_with(location, None).await
    }

    /// [`Store::open_read_only`], also counting the records spooled in `fallback_spool_dir`
    /// (the cache's `.spool/`, where writers spool when the folder beside the database, or
    /// a PostgreSQL server, cannot take them) when it warns of records not yet written.
    pub async fn open_read_only_with(location: &Location, fallback_spool_dir: Option<PathBuf>) -> Result<Store> {
        sqlx::any::install_default_drivers();
        let (pool, backend, spool_key) = match location {
            Location::Sqlite(path) => {
                if !path.exists() {
                    bail!("no results database at {} (run an experiment first, or pass --db)", path.display());
                }
                let connect = |mode: &'static str| {
                    let url = sqlite_url(path, mode);
                    async move {
                        let pool = AnyPoolOptions::new()
                            .max_connections(2)
                            .after_connect(|conn, _| {
                                Box::pin(async move { conn.execute("PRAGMA busy_timeout = 60000").await.map(|_| ()) })
                            })
                            .connect_with(AnyConnectOptions::from_url(&url?)?)
                            .await?;
                        // Reading the schema is what fails on a read-only folder (no `-shm` can be made).
                        q(Backend::Sqlite, "SELECT count(*) FROM sqlite_master").fetch_one(&pool).await?;
                        anyhow::Ok(pool)
                    }
                };
                let pool = match connect("mode=ro").await {
                    Ok(p) => p,
                    // A read-only mount or folder: SQLite cannot make the WAL index beside the
                    // file, so read it as immutable (no other process can be writing there).
                    Err(first) => match connect("mode=ro&immutable=1").await {
                        Ok(p) => {
                            let mut wal = path.as_os_str().to_owned();
                            wal.push("-wal");
                            if std::fs::metadata(&wal).is_ok_and(|m| m.len() > 0) {
                                tracing::warn!(
                                    "{} is on a read-only file system and its write-ahead log {} was not checkpointed: the newest results may be missing from what is shown",
                                    path.display(),
                                    Path::new(&wal).display()
                                );
                            }
                            p
                        }
                        Err(_) if format!("{first:#}").contains("file is not a database") => {
                            bail!("{location} is not a huse-run database")
                        }
                        Err(_) => {
                            return Err(first).with_context(|| format!("opening results database {}", path.display()));
                        }
                    },
                };
                (pool, Backend::Sqlite, path.clone())
            }
            Location::Postgres(url) => {
                let pool = Self::connect_postgres(url, 4, Duration::from_secs(60)).await?;
                (
                    pool,
                    Backend::Postgres,
                    pg_spool_key(&fallback_spool_dir.clone().unwrap_or_else(std::env::temp_dir), url),
                )
            }
        };
        let not_ours = || anyhow::anyhow!("{location} is not a huse-run database");
        let has_table = q(
            backend,
            match backend {
                Backend::Sqlite => "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = '_sqlx_migrations'",
                Backend::Postgres => "SELECT count(*) FROM information_schema.tables WHERE table_schema = current_schema() AND table_name = '_sqlx_migrations'",
            },
        )
        .fetch_one(&pool)
        .await
        .map_err(|e| anyhow::anyhow!("{location} is not a huse-run database ({e})"))?
        .get::<i64, _>(0);
        if has_table == 0 {
            return Err(not_ours());
        }
        let version: Option<i64> =
            q(backend, "SELECT max(version) FROM _sqlx_migrations WHERE success").fetch_one(&pool).await?.get(0);
        let latest = latest_schema();
        match version {
            None => return Err(not_ours()),
            Some(v) if v < latest => bail!(
                "{location} has an older schema (version {v}, this huse-run writes {latest}): run an experiment with this huse-run to upgrade it"
            ),
            Some(v) if v > latest => bail!(
                "{location} has a newer schema (version {v}) than this huse-run knows ({latest}): use a newer huse-run"
            ),
            _ => {}
        }
        let db_id = database_id(&pool, backend).await;
        let spool =
            spool::Spool::new(&spool_key, fallback_spool_dir.filter(|_| backend == Backend::Sqlite), db_id.clone());
        Ok(Store {
            pool,
            backend,
            location: location.clone(),
            read_only: true,
            options: Options::default(),
            spool: std::sync::Arc::new(tokio::sync::Mutex::new(spool)),
            db_id,
            idents: Default::default(),
        })
    }

    /// Where the database lives.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Which SQL dialect it speaks.
    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// A statement of this crate, with placeholders for this store's backend.
    pub(crate) fn q(&self, text: &'static str) -> sqlx::query::Query<'static, sqlx::Any, sqlx::any::AnyArguments> {
        q(self.backend, text)
    }

    /// How many spooled records (of any process) wait to be written to this database.
    pub async fn spooled(&self) -> usize {
        self.spool.lock().await.pending_on_disk()
    }

    /// Spool files for this database that replay cannot read (left in place), with why.
    pub async fn unreadable_spools(&self) -> Vec<(PathBuf, String)> {
        self.spool.lock().await.unreadable()
    }

    /// Spool files set aside because they cannot be replayed into this database (another
    /// database's, or their runs are gone): (file, reason, records).
    pub async fn set_aside_spools(&self) -> Vec<(PathBuf, String, usize)> {
        self.spool.lock().await.set_aside_files()
    }

    /// Marks runs of this host whose process is gone (killed, crashed) as interrupted.
    /// Runs whose results are still spooled are left alone: replaying sets their status.
    pub async fn reap_dead_runs(&self) -> Result<u64> {
        let rows = self
            .q("SELECT id, pid FROM runs WHERE status = ? AND host = ?")
            .bind(RunStatus::Running.as_str())
            .bind(host())
            .fetch_all(&self.pool)
            .await?;
        let spooled = self.spool.lock().await.spooled_runs();
        let mut n = 0;
        for r in rows {
            let pid: Option<i64> = r.get("pid");
            let id: i64 = r.get("id");
            let alive =
                pid.is_some_and(|p| Path::new(&format!("/proc/{p}")).exists() && p as u32 != std::process::id());
            if !alive && !spooled.contains(&id) {
                n += self.q("UPDATE runs SET status = ?, ended_at = ?, error = 'the process ended without finishing (killed or crashed)' WHERE id = ? AND status = ?")
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
        transaction!(self, |conn| {
            self.q("INSERT INTO experiments (name, file, created_at) VALUES (?, ?, ?) ON CONFLICT(name) DO UPDATE SET file = excluded.file")
                .bind(name)
                .bind(file)
                .bind(now())
                .execute(&mut *conn)
                .await?;
            self.q("SELECT id FROM experiments WHERE name = ?").bind(name).fetch_one(&mut *conn).await?.get::<i64, _>(0)
        })
    }

    /// Records a new run of the experiment `experiment_id` (status `running`, started now, on
    /// this host and process) with its resolved config (YAML) and params; returns its id. Of
    /// `run` ([`Run::starting`]) it takes the name, sweep point, seed, device, commit and log.
    pub async fn insert_run(
        &self,
        experiment_id: i64,
        run: &Run,
        config_yaml: &str,
        params: &[(String, serde_json::Value)],
    ) -> Result<i64> {
        let started_at = now();
        let id = transaction!(self, |conn| {
            let id: i64 = self.q(
                "INSERT INTO runs (experiment_id, name, status, started_at, config_yaml, sweep_point, seed, device, git_commit, host, pid, log)
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
            )
            .bind(experiment_id)
            .bind(&run.name)
            .bind(RunStatus::Running.as_str())
            .bind(&started_at)
            .bind(config_yaml)
            .bind(&run.point)
            .bind(run.seed)
            .bind(&run.device)
            .bind(&run.git_commit)
            .bind(host())
            .bind(std::process::id() as i64)
            .bind(&run.log)
            .fetch_one(&mut *conn)
            .await?
            .get(0);
            for (k, v) in params {
                let (text, num) = match v {
                    serde_json::Value::String(s) => (s.clone(), s.parse::<f64>().ok()),
                    serde_json::Value::Number(n) => (n.to_string(), n.as_f64()),
                    serde_json::Value::Bool(b) => (b.to_string(), Some(f64::from(u8::from(*b)))),
                    other => (other.to_string(), None),
                };
                self.q("INSERT INTO params (run_id, key, value, value_num) VALUES (?, ?, ?, ?) ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value, value_num = excluded.value_num")
                    .bind(id)
                    .bind(k)
                    .bind(text)
                    .bind(num)
                    .execute(&mut *conn)
                    .await?;
            }
            id
        })?;
        self.idents.lock().expect("not poisoned").insert(id, Some(RunIdent { id, name: run.name.clone(), started_at }));
        Ok(id)
    }

    /// The identities of the runs `rec` writes, for its spool line: from this process's
    /// own runs, else (a run recorded by another process, e.g. a cluster launcher) from the
    /// database when it answers at once — asked once per run.
    async fn idents_of(&self, rec: &Record) -> Vec<RunIdent> {
        let mut ids = rec.run_ids();
        ids.sort_unstable();
        ids.dedup();
        let mut out = Vec::new();
        for id in ids {
            let known = self.idents.lock().expect("not poisoned").get(&id).cloned();
            let ident = match known {
                Some(asked) => asked,
                None => {
                    let row = tokio::time::timeout(
                        Duration::from_millis(500),
                        self.q("SELECT name, started_at FROM runs WHERE id = ?").bind(id).fetch_optional(&self.pool),
                    )
                    .await;
                    let found = match row {
                        Ok(Ok(Some(r))) => Some(RunIdent { id, name: r.get(0), started_at: r.get(1) }),
                        _ => None,
                    };
                    self.idents.lock().expect("not poisoned").insert(id, found.clone());
                    found
                }
            };
            out.extend(ident);
        }
        out
    }

    /// A connection for a record: a database server that gives none within a second makes
    /// the write fail at once (and the record spool) instead of holding up the run for the
    /// pool's timeout. A SQLite file always gives one; a busy lock is waited for in the
    /// statement (the busy timeout).
    async fn connection_for_record(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Any>> {
        match self.backend {
            Backend::Sqlite => Ok(self.pool.acquire().await?),
            Backend::Postgres => match tokio::time::timeout(Duration::from_secs(1), self.pool.acquire()).await {
                Ok(c) => Ok(c?),
                Err(_) => bail!("no connection to {} within a second", self.location),
            },
        }
    }

    /// Writes one record in one transaction; with `marker` = (spool id, sequence number)
    /// also notes it as replayed, in the same transaction, so a record is applied once.
    async fn apply(&self, rec: &Record, marker: Option<(&str, u64)>) -> Result<()> {
        if self.read_only {
            bail!("the results database was opened read-only");
        }
        transaction!(self, self.connection_for_record(), |conn| {
            let mut already = false;
            if let Some((spool, seq)) = marker {
                // Claims the record: of two processes replaying the same spool at once, the
                // second waits for the first's transaction and then finds the row taken.
                already = self
                    .q("INSERT INTO replayed (spool, seq) VALUES (?, ?) ON CONFLICT (spool, seq) DO NOTHING")
                    .bind(spool)
                    .bind(seq as i64)
                    .execute(&mut *conn)
                    .await?
                    .rows_affected()
                    == 0;
            }
            if !already {
                Self::write_record(self.backend, conn, rec).await?;
            }
        })
    }

    async fn write_record(backend: Backend, conn: &mut sqlx::AnyConnection, rec: &Record) -> Result<()> {
        let sql = |text: &'static str| q(backend, text);
        {
            match rec {
                Record::Metrics(rows) => {
                    for m in rows {
                        sql("INSERT INTO metrics (run_id, stage, key, step, value) VALUES (?, ?, ?, ?, ?)")
                            .bind(m.run_id)
                            .bind(&m.stage)
                            .bind(&m.key)
                            .bind(m.step)
                            .bind(m.value.is_finite().then_some(m.value))
                            .execute(&mut *conn)
                            .await?;
                    }
                }
                Record::StageRun(r) => {
                    sql("INSERT INTO stage_runs (run_id, stage, kind, version, source, cache_key, cached, status, started_at, ended_at, duration_s, output_dir, error)
                         VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")
                    .bind(r.run_id)
                    .bind(&r.stage)
                    .bind(&r.kind)
                    .bind(&r.version)
                    .bind(&r.source)
                    .bind(&r.cache_key)
                    .bind(i64::from(r.cached))
                    .bind(r.status.as_str())
                    .bind(&r.started_at)
                    .bind(&r.ended_at)
                    .bind(r.duration_s)
                    .bind(&r.output_dir)
                    .bind(&r.error)
                    .execute(&mut *conn)
                    .await?;
                    let texts = r.summaries.iter().map(|s| (s, true)).chain(r.attachments.iter().map(|a| (a, false)));
                    for ((name, text), printed) in texts {
                        sql("INSERT INTO summaries (run_id, stage, name, text, printed) VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id, stage, name) DO UPDATE SET text = excluded.text, printed = excluded.printed")
                            .bind(r.run_id)
                            .bind(&r.stage)
                            .bind(name)
                            .bind(text)
                            .bind(i64::from(printed))
                            .execute(&mut *conn)
                            .await?;
                    }
                    for (name, path, bytes) in &r.artifacts {
                        sql("INSERT INTO artifacts (run_id, stage, name, path, bytes) VALUES (?, ?, ?, ?, ?) ON CONFLICT (run_id, stage, name) DO UPDATE SET path = excluded.path, bytes = excluded.bytes")
                            .bind(r.run_id)
                            .bind(&r.stage)
                            .bind(name)
                            .bind(path)
                            .bind(bytes)
                            .execute(&mut *conn)
                            .await?;
                    }
                }
                Record::Finish { run_id, status, error, ended_at } => {
                    // The duration from the recorded start (no date functions in SQL: the
                    // two dialects differ).
                    let started: Option<String> = sql("SELECT started_at FROM runs WHERE id = ?")
                        .bind(run_id)
                        .fetch_optional(&mut *conn)
                        .await?
                        .map(|r| r.get(0));
                    let duration = started.and_then(|s| {
                        let a = chrono::DateTime::parse_from_rfc3339(&s).ok()?;
                        let b = chrono::DateTime::parse_from_rfc3339(ended_at).ok()?;
                        Some((b - a).num_milliseconds() as f64 / 1000.0)
                    });
                    sql("UPDATE runs SET status = ?, error = ?, ended_at = ?, duration_s = ? WHERE id = ?")
                        .bind(status.as_str())
                        .bind(error)
                        .bind(ended_at)
                        .bind(duration)
                        .bind(run_id)
                        .execute(&mut *conn)
                        .await?;
                }
            }
        }
        Ok(())
    }

    /// Writes `rec`, or, when the database cannot take it (or earlier records of this
    /// process are still waiting), appends it to this process's spool to be retried in
    /// order. Returns `Ok(false)` when it was spooled; an error only when even the spool
    /// cannot be written (then the record exists in memory alone and the run must fail).
    pub async fn record(&self, rec: Record) -> Result<bool> {
        let mut spool = self.spool.lock().await;
        if spool.is_empty() {
            match self.apply(&rec, None).await {
                Ok(()) => return Ok(true),
                Err(e) => {
                    tracing::warn!("results database {}: {e:#}; spooling and retrying", self.location);
                }
            }
        }
        let idents = self.idents_of(&rec).await;
        spool.push(rec, idents)?;
        if spool.due_for_retry() {
            self.drain_locked(&mut spool).await;
        }
        Ok(false)
    }

    /// Writes this process's spooled records in order until one fails; returns how many
    /// are left.
    async fn drain_locked(&self, spool: &mut spool::Spool) -> usize {
        spool.tried();
        while let Some((id, seq, rec)) = spool.front() {
            match self.apply(&rec, Some((&id, seq))).await {
                Ok(()) => {
                    if let Err(e) = spool.pop() {
                        tracing::warn!("spool: {e:#}");
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!("results database still unavailable: {e:#}");
                    break;
                }
            }
        }
        spool.len()
    }

    /// At the end of a run: retries this process's spooled records for up to the retry
    /// window (`HUSE_DB_RETRY`). `Ok(())` when everything is written; otherwise an error
    /// saying how many records wait in which spool file.
    pub async fn drain(&self) -> Result<()> {
        let mut spool = self.spool.lock().await;
        let deadline = std::time::Instant::now() + self.options.retry_window;
        let mut pause = Duration::from_millis(200);
        loop {
            if self.drain_locked(&mut spool).await == 0 {
                return Ok(());
            }
            if std::time::Instant::now() >= deadline {
                bail!(
                    "the results database {} could not take {} record(s) of this run; they are kept in {} and written the next time huse-run opens the database for writing (`huse-run db replay`)",
                    self.location,
                    spool.len(),
                    spool
                        .file()
                        .map(|f| f.display().to_string())
                        .unwrap_or_else(|| "memory only (the spool could not be written either)".into())
                );
            }
            tokio::time::sleep(pause.min(deadline.saturating_duration_since(std::time::Instant::now()))).await;
            pause = (pause * 2).min(Duration::from_secs(5));
        }
    }

    /// Best effort, when [`Store::drain`] failed: marks `runs` failed with `reason` so the
    /// database does not show them `running`; replaying the spool later sets their real
    /// status once their results are complete.
    /// On a full disk the update itself needs room: when it fails, the SQLite database's
    /// reserve ([`reserve`]) is given up and the update tried once more.
    pub async fn mark_incomplete(&self, runs: &[i64], reason: &str) -> Result<()> {
        let first = self.mark_failed(runs, reason).await;
        match (&self.location, first) {
            (Location::Sqlite(path), Err(e)) if reserve::release(path) => {
                tracing::debug!("marking runs failed: {e:#}; released the database's reserve and trying again");
                self.mark_failed(runs, reason).await
            }
            (_, r) => r,
        }
    }

    async fn mark_failed(&self, runs: &[i64], reason: &str) -> Result<()> {
        transaction!(self, self.connection_for_record(), |conn| {
            for id in runs {
                self.q("UPDATE runs SET status = ?, error = ?, ended_at = ? WHERE id = ?")
                    .bind(RunStatus::Failed.as_str())
                    .bind(format!("results incomplete: {reason}"))
                    .bind(now())
                    .bind(id)
                    .execute(&mut *conn)
                    .await?;
            }
        })
    }

    /// Writes every record that processes which have ended left spooled for this database
    /// (each exactly once), in order, and removes their spool files. Each spool is replayed
    /// on its own: one that belongs to another database (its database id differs) or whose
    /// runs are not this database's (gone, or another run under the same id) is set aside
    /// in `rejected/` with its reason and the others go on; one the database cannot take
    /// now (busy, full) stays where it is for the next replay.
    pub async fn replay_spools(&self) -> Result<Replay> {
        let files = self.spool.lock().await.foreign_files();
        let mut report = Replay::default();
        for file in files {
            let sf = match spool::read_file(&file) {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!("skipping spool {}: {e:#}", file.display());
                    continue;
                }
            };
            let verdict = match self.belongs_here(&sf).await {
                Ok(v) => v,
                Err(e) => {
                    report.left.push((file.clone(), format!("cannot check it against {}: {e:#}", self.location)));
                    continue;
                }
            };
            if let Some(why) = verdict {
                report.set_aside_or_leave(&file, why);
                continue;
            }
            let mut failed = None;
            for (seq, (rec, _)) in sf.records.iter().enumerate() {
                if let Err(e) = self.apply(rec, Some((&sf.id, seq as u64))).await {
                    failed = Some(e);
                    break;
                }
            }
            if let Some(e) = failed {
                let why = format!("replaying into {} failed: {e:#}", self.location);
                if is_permanent(&e) {
                    report.set_aside_or_leave(&file, why);
                } else {
                    report.left.push((file.clone(), why));
                }
                continue;
            }
            report.written += sf.records.len();
            match std::fs::remove_file(&file) {
                Ok(()) => {}
                // Another process replayed (and removed) it at the same time.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => report.left.push((file.clone(), format!("written, but the file could not be removed: {e}"))),
            }
            tracing::info!(
                "wrote {} spooled record(s) from {} into the results database",
                sf.records.len(),
                file.display()
            );
        }
        Ok(report)
    }

    /// Whether a spool belongs to this database: its database id (when it has one) is this
    /// database's, and every run it writes exists here under the same name and start.
    /// `Some(why)` when it does not; an error when the database cannot be asked now.
    async fn belongs_here(&self, sf: &spool::SpoolFile) -> Result<Option<String>> {
        if let (Some(theirs), Some(ours)) = (&sf.db_id, &self.db_id)
            && theirs != ours
        {
            return Ok(Some(format!(
                "it was written for another database (id {theirs}; {} is {ours}): the database at this location was replaced after the records were spooled",
                self.location
            )));
        }
        let mut checked = std::collections::HashSet::new();
        for (rec, idents) in &sf.records {
            for ident in idents {
                if !checked.insert(ident.id) {
                    continue;
                }
                let row = self
                    .q("SELECT name, started_at FROM runs WHERE id = ?")
                    .bind(ident.id)
                    .fetch_optional(&self.pool)
                    .await?;
                match row {
                    None => {
                        return Ok(Some(format!("its run {} ({}) is not in {}", ident.id, ident.name, self.location)));
                    }
                    Some(r) => {
                        let (name, started): (String, String) = (r.get(0), r.get(1));
                        if name != ident.name || started != ident.started_at {
                            return Ok(Some(format!(
                                "its run {} is `{}` started {}, but run {} of {} is `{name}` started {started}",
                                ident.id, ident.name, ident.started_at, ident.id, self.location
                            )));
                        }
                    }
                }
            }
            for id in rec.run_ids() {
                if !checked.insert(id) {
                    continue;
                }
                let n: i64 =
                    self.q("SELECT count(*) FROM runs WHERE id = ?").bind(id).fetch_one(&self.pool).await?.get(0);
                if n == 0 {
                    return Ok(Some(format!("its run {id} is not in {}", self.location)));
                }
            }
        }
        Ok(None)
    }

    /// Sets a run's final status (or spools it; see [`Store::record`]).
    pub async fn finish_run(&self, run_id: i64, status: RunStatus, error: Option<&str>) -> Result<bool> {
        self.record(Record::Finish { run_id, status, error: error.map(String::from), ended_at: now() }).await
    }

    /// Records one stage run, its artifacts and its summaries (or spools them).
    pub async fn insert_stage_run(&self, r: &StageRunRow) -> Result<bool> {
        self.record(Record::StageRun(Box::new(r.clone()))).await
    }

    /// Inserts metric rows in one transaction (or spools them).
    pub async fn insert_metrics(&self, rows: &[MetricRow]) -> Result<bool> {
        if rows.is_empty() {
            return Ok(true);
        }
        self.record(Record::Metrics(rows.to_vec())).await
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

    #[test]
    fn locations_parse_case_insensitively_and_never_show_a_password() {
        assert_eq!(
            "POSTGRES://u:pw@h/db".parse::<Location>().unwrap(),
            Location::Postgres("postgres://u:pw@h/db".into())
        );
        assert_eq!("Postgresql://h/db".parse::<Location>().unwrap(), Location::Postgres("postgresql://h/db".into()));
        assert_eq!("SQLite://x.db".parse::<Location>().unwrap(), Location::Sqlite("x.db".into()));
        assert_eq!("./file:x.db".parse::<Location>().unwrap(), Location::Sqlite("./file:x.db".into()));
        for bad in ["file:mem.db?mode=memory&cache=shared", "FILE:x.db", "mysql://u:pw@h/db"] {
            let e = bad.parse::<Location>().unwrap_err();
            assert!(!e.contains(":pw@"), "{e}");
        }
        assert_eq!(
            redact("postgres://u:pw@h:5/db?sslmode=x&password=pw2"),
            "postgres://u:***@h:5/db?sslmode=x&password=***"
        );
        assert_eq!(redact("postgres://u@h/db?password=pw"), "postgres://u@h/db?password=***");
        assert_eq!(
            Location::Postgres("postgres://u@h/db?password=pw".into()).to_string(),
            "postgres://u@h/db?password=***"
        );
        assert_eq!(redact("postgres://h/db"), "postgres://h/db");
    }

    #[tokio::test]
    async fn records_and_reads_back_a_run() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(&Location::Sqlite(d.path().join("r.sqlite")), Options::default()).await.unwrap();
        let e = store.experiment("exp", "exp.yaml").await.unwrap();
        let run = Run { git_commit: Some("abc".into()), ..Run::starting("exp", "exp@a=1", "a=1", 3, "cpu") };
        let params = [("a".into(), serde_json::json!(1)), ("s.uses".into(), serde_json::json!("toy"))];
        let id = store.insert_run(e, &run, "name: exp\n", &params).await.unwrap();
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
                attachments: vec![("g.json".into(), "[]".into())],
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
        let filtered =
            store.load_runs(&Filter { conds: vec!["a>=1".parse().unwrap()], ..Default::default() }).await.unwrap();
        assert_eq!(filtered.len(), 1);
        let none =
            store.load_runs(&Filter { conds: vec!["loss<0.5".parse().unwrap()], ..Default::default() }).await.unwrap();
        assert!(none.is_empty());
        assert_eq!(store.metric_series(id).await.unwrap().len(), 3);
        assert_eq!(store.stage_runs(id).await.unwrap()[0].status, StageStatus::Succeeded);
        assert_eq!(store.summaries(id).await.unwrap().len(), 1, "attachments are not summaries");
        assert_eq!(store.summaries(id).await.unwrap()[0].text, "| a |");
        assert_eq!(store.attachment(id, "g.json").await.unwrap().unwrap().text, "[]");
        assert_eq!(store.run_config(id).await.unwrap(), ("name: exp\n".to_string(), Some("abc".to_string())));
    }
}
