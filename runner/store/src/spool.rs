//! The spool: rows the results database could not take when they were produced.
//!
//! Each process that meets a write failure (a database busy past its timeout, a full
//! disk) appends the [`Record`]s it could not write, in order, to a JSON-lines file of its
//! own: `<database>.spool/<host>-<pid>-<time>.jsonl`, or, when that folder cannot be
//! written, the same name in the fallback folder (the cache's `.spool/`). The first line
//! names the database the records belong to; each further line is one record with its
//! sequence number. The process retries the records in order; when all are written the
//! file is removed. A file left by a process that ended is replayed by the next process
//! that opens the same database for writing. Every record written from a spool is noted
//! in the `replayed` table in the same transaction, so a replay that stops half-way and
//! runs again writes nothing twice.
//!
//! A spool belongs to one database and its runs, not to a path: the header carries the
//! database's id (its `meta.database_id`) and each line the identity (id, name, start) of
//! the runs it writes, so a database replaced at the same path never receives another
//! database's records. A spool that cannot be replayed for good (another database, a run
//! that is gone) is set aside in `rejected/` beside it with a `.reason.txt`, and the
//! others are replayed regardless.

use std::collections::{BTreeSet, VecDeque};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use crate::{MetricRow, RunStatus, StageRunRow};

/// One unit of writing: what the scheduler records about runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Record {
    /// Metric rows (one transaction).
    Metrics(Vec<MetricRow>),
    /// A stage run with its artifacts and summaries.
    StageRun(Box<StageRunRow>),
    /// A run's final status.
    Finish {
        /// The run.
        run_id: i64,
        /// Its status.
        status: RunStatus,
        /// Why it failed or was interrupted.
        error: Option<String>,
        /// When it ended (RFC 3339).
        ended_at: String,
    },
}

impl Record {
    /// The runs the record writes.
    pub fn run_ids(&self) -> Vec<i64> {
        match self {
            Record::Metrics(rows) => rows.iter().map(|r| r.run_id).collect(),
            Record::StageRun(r) => vec![r.run_id],
            Record::Finish { run_id, .. } => vec![*run_id],
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    db: PathBuf,
    id: String,
    host: String,
    pid: u32,
    /// The database's `meta.database_id` (absent in spools of older versions).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    db_id: Option<String>,
}

/// Which run a spooled record belongs to: enough to tell it from another database's run
/// that happens to have the same numeric id.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunIdent {
    /// The run's id in its database.
    pub id: i64,
    /// Its name (`EXPERIMENT@point/seed=N`).
    pub name: String,
    /// Its recorded start (RFC 3339).
    pub started_at: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct Line {
    seq: u64,
    record: Record,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    runs: Vec<RunIdent>,
}

/// A spool file as read back.
#[derive(Debug)]
pub struct SpoolFile {
    /// The writer's spool id.
    pub id: String,
    /// The database it was written for (`None`: an older spool that did not say).
    pub db_id: Option<String>,
    /// The records in order, each with the identities of its runs (when the writer knew them).
    pub records: Vec<(Record, Vec<RunIdent>)>,
}

/// This process's spool for one database.
#[derive(Debug)]
pub struct Spool {
    db: PathBuf,
    db_id: Option<String>,
    dirs: Vec<PathBuf>,
    id: String,
    file: Option<PathBuf>,
    pending: VecDeque<(u64, Record)>,
    next_seq: u64,
    last_try: Option<Instant>,
}

/// How long a spool of a process on another host must be unchanged before another
/// process replays it (longer than the default retry window of a writer).
const OTHER_HOST_QUIET: Duration = Duration::from_secs(360);

/// How long a process waits between retries while its spool is not empty.
const RETRY_EVERY: Duration = Duration::from_secs(5);

fn canonical(db: &Path) -> PathBuf {
    std::fs::canonicalize(db).unwrap_or_else(|_| std::path::absolute(db).unwrap_or_else(|_| db.to_path_buf()))
}

/// The folders a database's spools may be in: beside it, then the fallback.
fn spool_dirs(db: &Path, fallback: Option<PathBuf>) -> Vec<PathBuf> {
    let mut name = db.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(".spool");
    let mut dirs = vec![db.with_file_name(name)];
    dirs.extend(fallback);
    dirs
}

impl Spool {
    /// The (empty) spool of this process for the database at `db` whose
    /// `meta.database_id` is `db_id`.
    pub fn new(db: &Path, fallback: Option<PathBuf>, db_id: Option<String>) -> Spool {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "host".into());
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        Spool {
            db: canonical(db),
            db_id,
            dirs: spool_dirs(db, fallback),
            id: format!("{host}-{}-{nanos}", std::process::id()),
            file: None,
            pending: VecDeque::new(),
            next_seq: 0,
            last_try: None,
        }
    }

    /// Whether nothing of this process waits.
    pub fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// How many records of this process wait.
    pub fn len(&self) -> usize {
        self.pending.len()
    }

    /// This process's spool file, once one was written.
    pub fn file(&self) -> Option<&Path> {
        self.file.as_deref()
    }

    /// Appends a record with the identities of its runs (to the file first, so it
    /// survives this process).
    pub fn push(&mut self, rec: Record, runs: Vec<RunIdent>) -> Result<()> {
        let seq = self.next_seq;
        let line = serde_json::to_string(&Line { seq, record: rec.clone(), runs })?;
        let written = self.append(&line);
        self.pending.push_back((seq, rec));
        self.next_seq += 1;
        written
    }

    fn append(&mut self, line: &str) -> Result<()> {
        let mut last_err = None;
        if self.file.is_none() {
            for dir in self.dirs.clone() {
                let path = dir.join(format!("{}.jsonl", self.id));
                let header = serde_json::to_string(&Header {
                    db: self.db.clone(),
                    id: self.id.clone(),
                    host: self.id.rsplitn(3, '-').nth(2).unwrap_or("").to_string(),
                    pid: std::process::id(),
                    db_id: self.db_id.clone(),
                })?;
                let made = std::fs::create_dir_all(&dir).and_then(|()| {
                    let mut f = std::fs::OpenOptions::new().create_new(true).append(true).open(&path)?;
                    writeln!(f, "{header}")?;
                    f.sync_data()
                });
                match made {
                    Ok(()) => {
                        self.file = Some(path);
                        break;
                    }
                    Err(e) => {
                        let _ = std::fs::remove_file(&path);
                        last_err = Some(anyhow::anyhow!("creating spool {}: {e}", path.display()));
                    }
                }
            }
        }
        let Some(path) = &self.file else {
            return Err(last_err.unwrap_or_else(|| anyhow::anyhow!("no folder for a spool")));
        };
        let appended = std::fs::OpenOptions::new()
            .append(true)
            .open(path)
            .and_then(|mut f| writeln!(f, "{line}").and_then(|()| f.sync_data()));
        let Err(e) = appended else { return Ok(()) };
        // The folder filled up after the file was made: move the whole journal (header and
        // every line so far, sequence numbers intact) to the next folder, then append there.
        let path = path.clone();
        let here = self.dirs.iter().position(|d| path.starts_with(d)).unwrap_or(self.dirs.len());
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let (old, line_there) = complete_lines(&old, line);
        for dir in self.dirs.iter().skip(here + 1) {
            let next = dir.join(format!("{}.jsonl", self.id));
            let moved = std::fs::create_dir_all(dir).and_then(|()| {
                let mut f = std::fs::OpenOptions::new().create_new(true).append(true).open(&next)?;
                f.write_all(old.as_bytes())?;
                if !line_there {
                    writeln!(f, "{line}")?;
                }
                f.sync_data()
            });
            if moved.is_ok() {
                let _ = std::fs::remove_file(&path);
                self.file = Some(next);
                return Ok(());
            }
            let _ = std::fs::remove_file(&next);
        }
        Err(e).with_context(|| format!("appending to spool {}", path.display()))
    }

    /// The oldest waiting record: (spool id, sequence number, record).
    pub fn front(&self) -> Option<(String, u64, Record)> {
        self.pending.front().map(|(seq, rec)| (self.id.clone(), *seq, rec.clone()))
    }

    /// Drops the oldest waiting record (it was written); removes the file when none is left.
    pub fn pop(&mut self) -> Result<()> {
        self.pending.pop_front();
        if self.pending.is_empty()
            && let Some(f) = self.file.take()
        {
            std::fs::remove_file(&f).with_context(|| format!("removing spool {}", f.display()))?;
        }
        Ok(())
    }

    /// Notes a retry now.
    pub fn tried(&mut self) {
        self.last_try = Some(Instant::now());
    }

    /// Whether the last retry is long enough ago for another.
    pub fn due_for_retry(&self) -> bool {
        self.last_try.is_none_or(|t| t.elapsed() >= RETRY_EVERY)
    }

    /// Spool files of other processes for this database whose writer has ended, oldest first.
    pub fn foreign_files(&self) -> Vec<PathBuf> {
        let mut out: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
        for dir in &self.dirs {
            let Ok(rd) = std::fs::read_dir(dir) else { continue };
            for e in rd.flatten() {
                let path = e.path();
                if path.extension().is_none_or(|x| x != "jsonl") || Some(&path) == self.file.as_ref() {
                    continue;
                }
                let Ok(h) = read_header(&path) else { continue };
                if h.db != self.db || h.id == self.id {
                    continue;
                }
                let this_host = self.id.starts_with(&format!("{}-", h.host));
                if this_host && Path::new(&format!("/proc/{}", h.pid)).exists() {
                    continue; // its writer is still at work
                }
                let modified = e.metadata().and_then(|m| m.modified()).unwrap_or(std::time::UNIX_EPOCH);
                // A writer on another host (a cluster node) cannot be checked for life: its
                // spool counts as left behind once it has not changed for longer than a
                // writer keeps retrying.
                if !this_host && modified.elapsed().is_ok_and(|age| age < OTHER_HOST_QUIET) {
                    continue;
                }
                out.push((modified, path));
            }
        }
        out.sort();
        out.into_iter().map(|(_, p)| p).collect()
    }

    /// Records (of any process) in spool files for this database, counting each line;
    /// set-aside spools not included (see [`Spool::set_aside_files`]).
    pub fn pending_on_disk(&self) -> usize {
        let mut n = self.pending.len();
        for f in self.foreign_files() {
            n += read_file(&f).map(|f| f.records.len()).unwrap_or(0);
        }
        n
    }

    /// Moves another process's spool file into `rejected/` beside it, with its reason in
    /// `<name>.reason.txt`; returns where it went.
    pub fn set_aside(file: &Path, reason: &str) -> Result<PathBuf> {
        let dir = file.parent().unwrap_or(Path::new(".")).join(REJECTED);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let dest = dir.join(file.file_name().unwrap_or_default());
        let mut why = dest.clone().into_os_string();
        why.push(".reason.txt");
        std::fs::write(&why, format!("{reason}\n"))
            .with_context(|| format!("writing {}", Path::new(&why).display()))?;
        std::fs::rename(file, &dest).with_context(|| format!("moving {} to {}", file.display(), dest.display()))?;
        Ok(dest)
    }

    /// Spool files set aside for this database's path (never replayed by themselves), with
    /// their reasons and record counts.
    pub fn set_aside_files(&self) -> Vec<(PathBuf, String, usize)> {
        let mut out = Vec::new();
        for dir in &self.dirs {
            let Ok(rd) = std::fs::read_dir(dir.join(REJECTED)) else { continue };
            for e in rd.flatten() {
                let path = e.path();
                if path.extension().is_none_or(|x| x != "jsonl") || read_header(&path).is_ok_and(|h| h.db != self.db) {
                    continue;
                }
                let mut why = path.clone().into_os_string();
                why.push(".reason.txt");
                let reason = std::fs::read_to_string(&why)
                    .map(|s| s.trim().to_string())
                    .unwrap_or_else(|_| "no reason recorded".into());
                let n = read_file(&path).map(|f| f.records.len()).unwrap_or(0);
                out.push((path, reason, n));
            }
        }
        out.sort();
        out
    }

    /// Other processes' spool files for this database that cannot be read, with why: they
    /// stay where they are (nothing is lost), but replay skips them.
    pub fn unreadable(&self) -> Vec<(PathBuf, String)> {
        self.foreign_files().into_iter().filter_map(|f| read_file(&f).err().map(|e| (f, format!("{e:#}")))).collect()
    }

    /// Runs named by records in other processes' spools for this database.
    pub fn spooled_runs(&self) -> BTreeSet<i64> {
        self.foreign_files()
            .iter()
            .filter_map(|f| read_file(f).ok())
            .flat_map(|f| f.records.into_iter().flat_map(|(r, _)| r.run_ids()))
            .collect()
    }
}

/// The sub-folder of a spool folder where spools that cannot be replayed are set aside.
pub const REJECTED: &str = "rejected";

fn read_header(path: &Path) -> Result<Header> {
    let f = std::fs::File::open(path)?;
    let mut first = String::new();
    std::io::BufReader::new(f).read_line(&mut first)?;
    Ok(serde_json::from_str(&first)?)
}

/// The whole lines of a journal whose last append failed, and whether the line being
/// appended is already its last whole line. A failed append can leave part of the line
/// (no newline: dropped, so the move does not carry a torn line into the middle of the new
/// file), or all of it when only the sync failed (kept, and not written twice: every
/// sequence number must appear once).
fn complete_lines<'a>(journal: &'a str, line: &str) -> (&'a str, bool) {
    let whole = match journal.rfind('\n') {
        Some(i) => &journal[..=i],
        None => "",
    };
    let there = whole.strip_suffix('\n').is_some_and(|w| w.rsplit('\n').next() == Some(line));
    (whole, there)
}

/// A spool file's id, database and records, in order. A last line cut short (the process
/// died while appending) is ignored: its record was never acknowledged as spooled.
pub fn read_file(path: &Path) -> Result<SpoolFile> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading spool {}", path.display()))?;
    let mut lines = text.lines();
    let header: Header =
        serde_json::from_str(lines.next().unwrap_or("")).with_context(|| format!("{}: bad header", path.display()))?;
    let mut out = Vec::new();
    let all: Vec<&str> = lines.collect();
    for (i, l) in all.iter().enumerate() {
        match serde_json::from_str::<Line>(l) {
            Ok(line) => {
                if line.seq != out.len() as u64 {
                    bail!("{}: line {} has sequence {} (expected {})", path.display(), i + 2, line.seq, out.len());
                }
                out.push((line.record, line.runs));
            }
            Err(_) if i + 1 == all.len() && !text.ends_with('\n') => break,
            Err(e) => bail!("{}: line {}: {e}", path.display(), i + 2),
        }
    }
    Ok(SpoolFile { id: header.id, db_id: header.db_id, records: out })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metric(v: f64) -> Record {
        Record::Metrics(vec![MetricRow { run_id: 1, stage: "s".into(), key: "k".into(), step: 0, value: v }])
    }

    #[test]
    fn records_survive_in_order_and_the_file_goes_when_drained() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("r.sqlite");
        std::fs::write(&db, "").unwrap();
        let mut s = Spool::new(&db, None, None);
        s.push(metric(1.0), vec![]).unwrap();
        s.push(metric(f64::NAN), vec![]).unwrap();
        let file = s.file().unwrap().to_path_buf();
        assert!(file.starts_with(d.path().join("r.sqlite.spool")));
        let f = read_file(&file).unwrap();
        assert_eq!(f.id, s.front().unwrap().0);
        let recs: Vec<Record> = f.records.into_iter().map(|(r, _)| r).collect();
        assert_eq!(recs.len(), 2);
        match &recs[1] {
            Record::Metrics(rows) => assert!(rows[0].value.is_nan()),
            other => panic!("{other:?}"),
        }
        // Another process sees the file only once its writer has ended (here: never).
        assert!(Spool::new(&db, None, None).foreign_files().is_empty());
        s.pop().unwrap();
        assert!(file.exists());
        s.pop().unwrap();
        assert!(!file.exists() && s.is_empty());
    }

    #[test]
    fn a_journal_moved_after_a_failed_append_keeps_whole_lines_once() {
        let j = "{\"h\":1}\n{\"seq\":0}\n{\"seq\":1}\n";
        // The append wrote part of the line: the torn tail is dropped, the line written again.
        assert_eq!(complete_lines(&format!("{j}{{\"se"), "{\"seq\":2}"), (j, false));
        // The append wrote the whole line but its sync failed: kept, not written twice.
        assert_eq!(complete_lines(j, "{\"seq\":1}"), (j, true));
        assert_eq!(complete_lines(j, "{\"seq\":2}"), (j, false));
        assert_eq!(complete_lines("{\"h", "x"), ("", false));
    }

    #[test]
    fn a_journal_torn_by_a_full_disk_moves_whole_to_the_next_folder() {
        // A 64 KiB tmpfs filled up after the journal was made: the appends fill the slack of
        // its last page, then one is cut short at the page's end (a torn line), fails, and
        // the journal moves to the fallback folder: every record once, in order.
        let d = tempfile::tempdir().unwrap();
        let small = d.path().join("small");
        std::fs::create_dir_all(&small).unwrap();
        let mounted = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=64k", "tmpfs"])
            .arg(&small)
            .stderr(std::process::Stdio::null())
            .status();
        if !mounted.is_ok_and(|s| s.success()) {
            eprintln!(
                "NOT RUN: a_journal_torn_by_a_full_disk_moves_whole_to_the_next_folder needs to mount a tmpfs (root)"
            );
            return;
        }
        struct Unmount(PathBuf);
        impl Drop for Unmount {
            fn drop(&mut self) {
                let _ = std::process::Command::new("umount").arg(&self.0).status();
            }
        }
        let _unmount = Unmount(small.clone());
        let db = small.join("r.sqlite");
        std::fs::write(&db, "").unwrap();
        let mut s = Spool::new(&db, Some(d.path().join("fallback")), None);
        s.push(metric(0.0), vec![]).unwrap();
        assert!(s.file().unwrap().starts_with(&small));
        let mut i = 0;
        while std::fs::write(small.join(format!("filler{i}")), vec![0u8; 4096]).is_ok() {
            i += 1;
        }
        for k in 1..60 {
            s.push(metric(k as f64), vec![]).unwrap();
        }
        let file = s.file().unwrap().to_path_buf();
        assert!(file.starts_with(d.path().join("fallback")), "the journal moved: {}", file.display());
        assert!(
            std::fs::read_dir(small.join("r.sqlite.spool")).unwrap().next().is_none(),
            "nothing left beside the database"
        );
        let recs = read_file(&file).unwrap().records;
        let values: Vec<f64> = recs
            .iter()
            .map(|(r, _)| match r {
                Record::Metrics(m) => m[0].value,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(values, (0..60).map(f64::from).collect::<Vec<_>>());
    }

    #[test]
    fn an_unwritable_folder_falls_back_and_a_torn_last_line_is_ignored() {
        let d = tempfile::tempdir().unwrap();
        let db = d.path().join("r.sqlite");
        std::fs::write(&db, "").unwrap();
        std::fs::write(d.path().join("r.sqlite.spool"), "a file where the folder should be").unwrap();
        let mut s = Spool::new(&db, Some(d.path().join("fallback")), None);
        s.push(metric(2.0), vec![]).unwrap();
        let file = s.file().unwrap().to_path_buf();
        assert!(file.starts_with(d.path().join("fallback")), "{}", file.display());
        let mut text = std::fs::read_to_string(&file).unwrap();
        text.push_str("{\"seq\": 1, \"rec");
        std::fs::write(&file, text).unwrap();
        assert_eq!(read_file(&file).unwrap().records.len(), 1);
    }
}
