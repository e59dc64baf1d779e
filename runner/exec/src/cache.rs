//! The content-addressed stage cache.
//!
//! A stage output lives in `<root>/<kind>/<key>/`, where `key` is the BLAKE3 hash of
//! the stage kind, its version (and plugin version), its resolved config, the **content
//! hashes of the inputs it reads** (as recorded by the upstream entries' manifests), the
//! seed when the stage uses it, and the identity of the files it reads.
//! Outputs are written into `<root>/.tmp/<key>-<pid>-<n>@<host>/` and renamed into place
//! when complete ([`Cache::finish`]), so a directory under `<kind>/` is always a finished
//! output. `<host>` tags the machine (host name, boot and PID namespace) of the writer: a
//! cache shared by cluster nodes is swept only of the temporary folders whose writer is
//! seen dead by a process on the same machine, or that nothing touched for [`STALE_AGE`]. Beside the outputs go the stage's metrics (`.huse-metrics.jsonl`), so that a
//! cache hit can give a new run the same metrics, and a [`Manifest`] (`.huse-stage.json`,
//! with a schema version) recording what made the entry, including its key parts, so
//! that a later miss can say which part changed ([`Cache::why_miss`]), and the size and
//! BLAKE3 hash of every output, so that an entry is checked before it is used
//! ([`Cache::check`]: presence and sizes always, hashes on request) and a damaged entry
//! is recomputed rather than trusted.
//!
//! The cache never follows a symbolic link out of itself: its `.tmp`, `.work` and kind
//! folders must be real folders or links inside the root ([`Cache::open`]), and stale
//! temporary folders are removed without following links.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

/// File name of the recorded metrics inside an output directory.
pub const METRICS_FILE: &str = ".huse-metrics.jsonl";
/// File name of the description of the entry inside an output directory.
pub const MANIFEST_FILE: &str = ".huse-stage.json";

/// Files bigger than this are identified by size and mtime instead of content.
const HASH_LIMIT: u64 = 512 << 20;

/// The cache directory.
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// Version of the manifest's layout; bumped when its fields change meaning.
/// 1: key parts; 2: output sizes and hashes, inputs by content.
pub const MANIFEST_SCHEMA: u32 = 2;

/// An output's recorded size and content hash.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct OutputRecord {
    /// File or directory name in the entry.
    pub name: String,
    /// Bytes (a directory: the sum of its files).
    pub bytes: u64,
    /// BLAKE3 of the content (a directory: of its sorted file names and their hashes).
    pub blake3: String,
}

/// A metric as recorded in the cache.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MetricRecord {
    /// Metric key.
    pub key: String,
    /// Step.
    pub step: i64,
    /// Value.
    pub value: f64,
}

/// What made a cache entry (`.huse-stage.json`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Manifest {
    /// [`MANIFEST_SCHEMA`] of the writer; entries without one predate the schema.
    #[serde(default)]
    pub schema: u32,
    /// Stage kind.
    pub kind: String,
    /// The kind's version.
    pub version: String,
    /// `builtin` or the plugin.
    pub source: String,
    /// The cache key.
    pub key: String,
    /// The resolved `with:` config.
    pub config: serde_json::Value,
    /// The run seed the stage ran with.
    pub seed: u64,
    /// Whether the seed is part of the key.
    #[serde(default)]
    pub uses_seed: bool,
    /// (`stage/artifact`, its content hash) of every input read.
    #[serde(default)]
    pub inputs: Vec<(String, String)>,
    /// (path, identity) of the files the stage reads.
    #[serde(default)]
    pub files: Vec<(String, String)>,
    /// RFC 3339 time the stage started.
    pub created: String,
    /// Seconds it ran.
    pub seconds: f64,
    /// Every output and the metrics file, with size and hash (schema 2).
    #[serde(default)]
    pub outputs: Vec<OutputRecord>,
}

/// Why an entry cannot be used.
#[derive(Debug, Clone, PartialEq)]
pub struct BadEntry(pub String);

impl std::fmt::Display for BadEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// How long a temporary folder of another machine (or of a writer that did not say which)
/// must be untouched before a sweep removes it: a writer there cannot be checked for life.
pub const STALE_AGE: std::time::Duration = std::time::Duration::from_secs(7 * 24 * 3600);

/// When this process started using the cache (an entry made after it was made by a
/// concurrent process, and `--no-cache` keeps it rather than replace it under its readers).
static STARTED: std::sync::LazyLock<std::time::SystemTime> = std::sync::LazyLock::new(std::time::SystemTime::now);

/// This machine as a short tag: a hash of the host name, the boot id and the PID namespace,
/// so that only a process that sees the same processes judges whether a PID is alive.
pub fn host_tag() -> &'static str {
    static TAG: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    TAG.get_or_init(|| {
        let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
        let ns = std::fs::read_link("/proc/self/ns/pid").map(|p| p.display().to_string()).unwrap_or_default();
        let id = format!("{}\n{}\n{ns}", read("/proc/sys/kernel/hostname"), read("/proc/sys/kernel/random/boot_id"));
        blake3::hash(id.as_bytes()).to_hex()[..12].to_string()
    })
}

/// (PID, host tag) of a temporary folder's name `<key>-<pid>-<n>[@<tag>]`.
fn temp_owner(name: &str) -> (Option<u32>, Option<&str>) {
    let (base, tag) = match name.rsplit_once('@') {
        Some((b, t)) => (b, Some(t)),
        None => (name, None),
    };
    (base.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok()), tag)
}

/// The newest modification time of a folder and its direct entries (never following links).
fn last_touched(dir: &Path) -> Option<std::time::SystemTime> {
    let mut t = std::fs::symlink_metadata(dir).and_then(|m| m.modified()).ok()?;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if let Ok(m) = e.path().symlink_metadata().and_then(|m| m.modified()) {
                t = t.max(m);
            }
        }
    }
    Some(t)
}

impl Cache {
    /// The cache at `root` (created on first write), without checks (tests, reading).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        std::sync::LazyLock::force(&STARTED);
        Cache { root: root.into() }
    }

    /// The cache at `root`, refusing one whose `.tmp`, `.work`, `.spool` or kind folders
    /// are symbolic links that lead outside it (cleaning them would touch other data).
    pub fn open(root: impl Into<PathBuf>) -> Result<Self> {
        let cache = Cache::new(root);
        let Ok(rd) = std::fs::read_dir(&cache.root) else { return Ok(cache) };
        let real_root =
            std::fs::canonicalize(&cache.root).with_context(|| format!("resolving {}", cache.root.display()))?;
        for e in rd.flatten() {
            let meta = std::fs::symlink_metadata(e.path())?;
            if !meta.file_type().is_symlink() {
                continue;
            }
            let target =
                std::fs::canonicalize(e.path()).unwrap_or_else(|_| std::fs::read_link(e.path()).unwrap_or_default());
            if !target.starts_with(&real_root) {
                bail!(
                    "cache {}: `{}` is a symbolic link to {}, outside the cache; refusing to use it (cleaning it would touch other data). Replace it with a folder",
                    cache.root.display(),
                    e.file_name().to_string_lossy(),
                    target.display()
                );
            }
        }
        Ok(cache)
    }

    /// Its root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the finished output of `kind` with `key` lives.
    pub fn entry(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(kind).join(key)
    }

    /// The entry of `kind`/`key` if it exists and is whole: its manifest readable, every
    /// recorded output and the metrics file present with their recorded sizes, and, with
    /// `verify`, their recorded hashes. `Ok(None)`: no entry. `Err`: a damaged entry (say
    /// why; the caller recomputes it). An entry written before output hashes were recorded
    /// gets them now, once.
    pub fn check(&self, kind: &str, key: &str, verify: bool) -> Result<Option<(PathBuf, Manifest)>, BadEntry> {
        let dir = self.entry(kind, key);
        if !dir.is_dir() {
            return Ok(None);
        }
        let bad = |why: String| Err(BadEntry(why));
        let bytes = match std::fs::read(dir.join(MANIFEST_FILE)) {
            Ok(b) => b,
            Err(e) => return bad(format!("its manifest {MANIFEST_FILE} is missing or unreadable ({e})")),
        };
        let mut m: Manifest = match serde_json::from_slice(&bytes) {
            Ok(m) => m,
            Err(e) => return bad(format!("its manifest {MANIFEST_FILE} is damaged ({e})")),
        };
        if !dir.join(METRICS_FILE).is_file() {
            return bad(format!("its metrics file {METRICS_FILE} is missing"));
        }
        if m.schema < 2 {
            // Written before outputs were hashed: record them now (trust on first use).
            let names: Vec<String> = std::fs::read_dir(&dir)
                .map(|rd| {
                    rd.flatten()
                        .map(|e| e.file_name().to_string_lossy().to_string())
                        .filter(|n| n != MANIFEST_FILE)
                        .collect()
                })
                .unwrap_or_default();
            m.outputs = match names.iter().map(|n| output_record(&dir, n)).collect::<Result<Vec<_>>>() {
                Ok(o) => o,
                Err(e) => return bad(format!("{e:#}")),
            };
            m.schema = MANIFEST_SCHEMA;
            let _ =
                std::fs::write(dir.join(MANIFEST_FILE), serde_json::to_vec_pretty(&m).expect("a manifest serialises"));
            tracing::info!("{kind}/{key}: recorded the output hashes of an entry made before they were kept");
            return Ok(Some((dir, m)));
        }
        for o in &m.outputs {
            let p = dir.join(&o.name);
            match tree_size(&p) {
                Err(_) => return bad(format!("output `{}` is missing", o.name)),
                Ok(n) if n != o.bytes => {
                    return bad(format!("output `{}` has {n} bytes, {} were written", o.name, o.bytes));
                }
                Ok(_) => {}
            }
            if verify {
                match content_hash(&p) {
                    Ok(h) if h == o.blake3 => {}
                    Ok(_) => return bad(format!("output `{}` does not match its recorded hash", o.name)),
                    Err(e) => return bad(format!("output `{}`: {e:#}", o.name)),
                }
            }
        }
        Ok(Some((dir, m)))
    }

    /// Every entry as (kind, key).
    pub fn entries(&self) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let Ok(kinds) = std::fs::read_dir(&self.root) else { return out };
        for k in kinds.flatten() {
            let kind = k.file_name().to_string_lossy().to_string();
            if kind.starts_with('.') || !k.file_type().is_ok_and(|t| t.is_dir()) {
                continue;
            }
            let Ok(keys) = std::fs::read_dir(k.path()) else { continue };
            for e in keys.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    out.push((kind.clone(), e.file_name().to_string_lossy().to_string()));
                }
            }
        }
        out.sort();
        out
    }

    /// A fresh, empty temporary output directory.
    pub fn temp_dir(&self, key: &str) -> Result<PathBuf> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.join(".tmp").join(format!("{key}-{}-{n}@{}", std::process::id(), host_tag()));
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// The persistent work directory of `key` (checkpoints for resuming), created if missing.
    pub fn work_dir(&self, key: &str) -> Result<PathBuf> {
        let dir = self.root.join(".work").join(key);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(dir)
    }

    /// Removes the work directory of `key` (after the stage succeeded).
    pub fn remove_work_dir(&self, key: &str) {
        let _ = std::fs::remove_dir_all(self.root.join(".work").join(key));
    }

    /// Completes a temporary output directory: writes the stage's metrics and manifest
    /// into it, replaces an existing entry when `replace` (for `--force`), and moves it into
    /// place. Returns the entry's directory.
    pub fn finish(
        &self,
        tmp: &Path,
        manifest: &Manifest,
        outputs: &[String],
        metrics: &[MetricRecord],
        replace: bool,
    ) -> Result<PathBuf> {
        write_metrics(tmp, metrics)?;
        normalise_permissions(tmp)?;
        let mut manifest = manifest.clone();
        manifest.schema = MANIFEST_SCHEMA;
        manifest.outputs = outputs
            .iter()
            .map(String::as_str)
            .chain([METRICS_FILE])
            .map(|n| output_record(tmp, n))
            .collect::<Result<_>>()?;
        let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serialises");
        std::fs::write(tmp.join(MANIFEST_FILE), json)
            .with_context(|| format!("writing {}", tmp.join(MANIFEST_FILE).display()))?;
        if replace {
            let dest = self.entry(&manifest.kind, &manifest.key);
            // An entry a concurrent process made after this one started is as fresh as ours:
            // keep it and drop ours.
            if std::fs::metadata(dest.join(MANIFEST_FILE)).and_then(|m| m.modified()).is_ok_and(|t| t >= *STARTED) {
                let _ = std::fs::remove_dir_all(tmp);
                return Ok(dest);
            }
            // Swap the new entry in atomically, so that a reader (another run's downstream
            // stage) never finds the path missing; the old entry, now at `tmp`, goes.
            match rustix::fs::renameat_with(
                rustix::fs::CWD,
                tmp,
                rustix::fs::CWD,
                &dest,
                rustix::fs::RenameFlags::EXCHANGE,
            ) {
                Ok(()) => {
                    let _ = std::fs::remove_dir_all(tmp);
                    return Ok(dest);
                }
                // No entry to swap with (removed meanwhile): a plain commit below.
                Err(rustix::io::Errno::NOENT) => {}
                // A file system without exchange (NFS): remove, then commit.
                Err(_) => self.remove(&manifest.kind, &manifest.key)?,
            }
        }
        self.commit(tmp, &manifest.kind, &manifest.key)
    }

    /// Why `parts` has no entry, in words: the key parts that differ from the closest
    /// finished entry of the same kind (by the number of differing parts, then the newest),
    /// e.g. `config `beta` 0.5 -> 1.0; input from `encode` changed`, at most
    /// [`WHY_PARTS`] of them and a count of the rest; or that no entry of the kind exists.
    /// With `hashes` (`-v`): every part, with the inputs' keys and the closest entry's.
    pub fn why_miss(&self, parts: &KeyParts, hashes: bool) -> String {
        let Ok(rd) = std::fs::read_dir(self.root.join(parts.kind)) else {
            return format!("no cached `{}` output yet", parts.kind);
        };
        let mut best: Option<(usize, String, Vec<String>, String)> = None;
        for e in rd.flatten() {
            let Ok(bytes) = std::fs::read(e.path().join(MANIFEST_FILE)) else { continue };
            let Ok(m) = serde_json::from_slice::<Manifest>(&bytes) else { continue };
            if m.schema < 1 {
                continue;
            }
            let diffs = key_diffs(&m, parts, hashes);
            let better = match &best {
                None => true,
                Some((n, created, _, _)) => diffs.len() < *n || (diffs.len() == *n && m.created > *created),
            };
            if better {
                best = Some((diffs.len(), m.created.clone(), diffs, m.key.clone()));
            }
        }
        match best {
            None => format!("no cached `{}` output yet", parts.kind),
            Some((_, _, diffs, _)) if diffs.is_empty() => "the cached entry was removed".to_string(),
            Some((_, _, diffs, key)) if hashes => {
                format!("{} (than the closest cached entry, {key})", diffs.join("; "))
            }
            Some((_, _, diffs, _)) if diffs.len() > WHY_PARTS => {
                format!("{}; and {} more (-v for all)", diffs[..WHY_PARTS].join("; "), diffs.len() - WHY_PARTS)
            }
            Some((_, _, diffs, _)) => diffs.join("; "),
        }
    }

    /// Moves a finished temporary directory into place. If another process finished
    /// the same key first, its output is kept and ours is discarded.
    pub fn commit(&self, tmp: &Path, kind: &str, key: &str) -> Result<PathBuf> {
        let dest = self.entry(kind, key);
        std::fs::create_dir_all(dest.parent().unwrap())?;
        match std::fs::rename(tmp, &dest) {
            Ok(()) => Ok(dest),
            Err(_) if dest.is_dir() => {
                let _ = std::fs::remove_dir_all(tmp);
                Ok(dest)
            }
            Err(e) => Err(e).with_context(|| format!("moving {} to {}", tmp.display(), dest.display())),
        }
    }

    /// Removes temporary directories left by processes that no longer exist: of this
    /// machine ([`host_tag`]) when their PID is gone; of another machine, or untagged, only
    /// once untouched for [`STALE_AGE`]. Never follows a symbolic link: a link found there
    /// is removed itself, not what it points to.
    pub fn sweep_stale_temps(&self) {
        let tmp = self.root.join(".tmp");
        if std::fs::symlink_metadata(&tmp).is_ok_and(|m| m.file_type().is_symlink()) {
            return; // `open` refuses links outside the cache; never walk into one anyway
        }
        let Ok(rd) = std::fs::read_dir(&tmp) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let (pid, tag) = temp_owner(&name);
            let Some(pid) = pid else { continue };
            let stale = if tag == Some(host_tag()) {
                pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists()
            } else {
                last_touched(&e.path()).and_then(|t| t.elapsed().ok()).is_some_and(|age| age >= STALE_AGE)
            };
            if stale {
                match e.file_type() {
                    Ok(t) if t.is_dir() => {
                        let _ = std::fs::remove_dir_all(e.path());
                    }
                    _ => {
                        let _ = std::fs::remove_file(e.path());
                    }
                }
            }
        }
    }

    /// Removes the entry of `kind`/`key` (for `--force`).
    pub fn remove(&self, kind: &str, key: &str) -> Result<()> {
        let dest = self.entry(kind, key);
        if dest.is_dir() {
            // Rename first so that a reader never sees a half-deleted entry.
            let trash = self.temp_dir(&format!("{key}-trash"))?;
            std::fs::remove_dir(&trash)?;
            match std::fs::rename(&dest, &trash) {
                Ok(()) => std::fs::remove_dir_all(&trash)?,
                // A concurrent process removed it first.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(e).with_context(|| format!("removing {}", dest.display())),
            }
        }
        Ok(())
    }
}

/// Appends metrics to a stage's output directory as JSON lines.
fn write_metrics(dir: &Path, metrics: &[MetricRecord]) -> Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(dir.join(METRICS_FILE))?);
    for m in metrics {
        serde_json::to_writer(&mut f, m)?;
        f.write_all(b"\n")?;
    }
    f.flush()?;
    Ok(())
}

/// Reads the metrics recorded with a cached output.
pub fn read_metrics(dir: &Path) -> Result<Vec<MetricRecord>> {
    let path = dir.join(METRICS_FILE);
    let Ok(f) = std::fs::File::open(&path) else { return Ok(Vec::new()) };
    let mut out = Vec::new();
    for line in std::io::BufReader::new(f).lines() {
        let line = line?;
        if !line.trim().is_empty() {
            out.push(serde_json::from_str(&line).with_context(|| format!("reading {}", path.display()))?);
        }
    }
    Ok(out)
}

/// What makes up a cache key. Its JSON serialisation is what is hashed: changing a field
/// changes every key (the test `cache_keys` guards against doing so by accident).
#[derive(Debug, Serialize)]
pub struct KeyParts<'a> {
    /// Stage kind.
    pub kind: &'a str,
    /// The kind's version.
    pub version: &'a str,
    /// `builtin` or the plugin.
    pub source: &'a str,
    /// The resolved `with:` config.
    pub config: &'a serde_json::Value,
    /// (stage name in `needs`, its cache key), in `needs` order.
    pub inputs: Vec<(String, String)>,
    /// The run seed, when the stage uses it.
    pub seed: Option<u64>,
    /// (path, identity) of every file or directory the stage reads.
    pub files: Vec<(String, String)>,
}

/// The differences between an entry's manifest and the key parts of a miss, in words.
/// The differing key parts [`Cache::why_miss`] names without `-v`.
pub const WHY_PARTS: usize = 4;

fn key_diffs(m: &Manifest, p: &KeyParts, hashes: bool) -> Vec<String> {
    let mut out = Vec::new();
    if m.version != p.version {
        out.push(format!("stage version {} -> {}", m.version, p.version));
    }
    if m.source != p.source {
        out.push(format!("source {} -> {}", m.source, p.source));
    }
    let mut leaves_then = Vec::new();
    let mut leaves_now = Vec::new();
    json_leaves(&m.config, "", &mut leaves_then);
    json_leaves(p.config, "", &mut leaves_now);
    let then: std::collections::BTreeMap<_, _> = leaves_then.into_iter().collect();
    let now: std::collections::BTreeMap<_, _> = leaves_now.into_iter().collect();
    for k in then.keys().chain(now.keys()).collect::<std::collections::BTreeSet<_>>() {
        match (then.get(k), now.get(k)) {
            (Some(a), Some(b)) if a != b => out.push(format!("config `{k}` {a} -> {b}")),
            (Some(a), None) => out.push(format!("config `{k}` {a} -> (unset)")),
            (None, Some(b)) => out.push(format!("config `{k}` (unset) -> {b}")),
            _ => {}
        }
    }
    let then_seed = m.uses_seed.then_some(m.seed);
    if then_seed != p.seed {
        let show = |s: Option<u64>| s.map(|s| s.to_string()).unwrap_or_else(|| "unused".into());
        out.push(format!("seed {} -> {}", show(then_seed), show(p.seed)));
    }
    diff_pairs(&m.inputs, &p.inputs, &mut out, |stage, then, now| match (then, now) {
        (Some(k), Some(key)) if hashes => format!("input from `{stage}` changed (its key {k} -> {key})"),
        (Some(_), Some(_)) => format!("input from `{stage}` changed"),
        (None, _) => format!("new input from `{stage}`"),
        (_, None) => format!("no longer an input from `{stage}`"),
    });
    diff_pairs(&m.files, &p.files, &mut out, |path, then, now| match (then, now) {
        (Some(_), Some(_)) => format!("file {path} changed"),
        (None, _) => format!("new file {path}"),
        (_, None) => format!("no longer reads {path}"),
    });
    out
}

/// For (name, value) lists: a line for each name whose value changed, was added (`then` is
/// None) or went away (`now` is None), in the order of `now`, then the removed ones.
fn diff_pairs(
    then: &[(String, String)],
    now: &[(String, String)],
    out: &mut Vec<String>,
    say: impl Fn(&str, Option<&str>, Option<&str>) -> String,
) {
    let find = |list: &[(String, String)], name: &str| list.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    for (name, v) in now {
        match find(then, name) {
            Some(old) if &old != v => out.push(say(name, Some(&old), Some(v))),
            None => out.push(say(name, None, Some(v))),
            _ => {}
        }
    }
    for (name, old) in then {
        if find(now, name).is_none() {
            out.push(say(name, Some(old), None));
        }
    }
}

fn json_leaves(v: &serde_json::Value, prefix: &str, out: &mut Vec<(String, String)>) {
    match v {
        serde_json::Value::Object(m) if !m.is_empty() => {
            for (k, x) in m {
                json_leaves(x, &if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") }, out);
            }
        }
        serde_json::Value::Null if prefix.is_empty() => {}
        other => out.push((if prefix.is_empty() { "(whole)".into() } else { prefix.to_string() }, other.to_string())),
    }
}

impl KeyParts<'_> {
    /// The cache key: 32 hex digits of the BLAKE3 hash of the canonical JSON of the parts.
    pub fn key(&self) -> String {
        let json = serde_json::to_vec(self).expect("key parts serialise");
        blake3::hash(&json).to_hex()[..32].to_string()
    }
}

/// Size in bytes of a file, or of every file below a directory; an error if missing.
fn tree_size(p: &Path) -> Result<u64> {
    let m = std::fs::symlink_metadata(p)?;
    if !m.is_dir() {
        return Ok(m.len());
    }
    let mut n = 0;
    for e in std::fs::read_dir(p)? {
        n += tree_size(&e?.path())?;
    }
    Ok(n)
}

/// BLAKE3 of a file's content, or of a directory's sorted (relative name, content hash) list.
pub fn content_hash(p: &Path) -> Result<String> {
    let m = std::fs::symlink_metadata(p).with_context(|| format!("{} is missing", p.display()))?;
    if !m.is_dir() {
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(p)?).with_context(|| format!("hashing {}", p.display()))?;
        return Ok(h.finalize().to_hex().to_string());
    }
    let mut names: Vec<_> = std::fs::read_dir(p)?.map(|e| e.map(|e| e.file_name())).collect::<std::io::Result<_>>()?;
    names.sort();
    let mut h = blake3::Hasher::new();
    for n in names {
        h.update(n.as_encoded_bytes());
        h.update(b"\0");
        h.update(content_hash(&p.join(&n))?.as_bytes());
        h.update(b"\n");
    }
    Ok(h.finalize().to_hex().to_string())
}

fn output_record(dir: &Path, name: &str) -> Result<OutputRecord> {
    let p = dir.join(name);
    Ok(OutputRecord {
        name: name.to_string(),
        bytes: tree_size(&p).with_context(|| format!("output `{name}`"))?,
        blake3: content_hash(&p)?,
    })
}

/// Gives every file and folder of a finished output the permissions a new file or folder
/// gets here (the umask's), whatever the library that wrote it chose (some write 0600).
fn normalise_permissions(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let probe = dir.join(".huse-probe");
    std::fs::write(&probe, b"")?;
    let file_mode = std::fs::metadata(&probe)?.permissions().mode() & 0o777;
    std::fs::remove_file(&probe)?;
    let dir_mode = file_mode | ((file_mode & 0o444) >> 2);
    fn walk(p: &Path, file_mode: u32, dir_mode: u32) -> Result<()> {
        for e in std::fs::read_dir(p)? {
            let e = e?;
            let t = e.file_type()?;
            if t.is_dir() {
                std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(dir_mode))?;
                walk(&e.path(), file_mode, dir_mode)?;
            } else if t.is_file() {
                std::fs::set_permissions(e.path(), std::fs::Permissions::from_mode(file_mode))?;
            }
        }
        Ok(())
    }
    walk(dir, file_mode, dir_mode)
}

/// The identity of a file (content hash) or directory (hash of its recursive listing with
/// sizes and modification times). A missing path has the identity `missing`, so the stage
/// itself reports the error.
pub fn identity(path: &Path) -> Result<String> {
    let Ok(meta) = std::fs::metadata(path) else { return Ok("missing".into()) };
    if meta.is_file() {
        if meta.len() > HASH_LIMIT {
            return Ok(format!("size={},mtime={}", meta.len(), mtime(&meta)));
        }
        let mut h = blake3::Hasher::new();
        h.update_reader(std::fs::File::open(path)?).with_context(|| format!("hashing {}", path.display()))?;
        return Ok(format!("blake3:{}", h.finalize().to_hex()));
    }
    let mut h = blake3::Hasher::new();
    let mut stack = vec![path.to_path_buf()];
    let mut entries = Vec::new();
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).with_context(|| format!("listing {}", dir.display()))? {
            let e = e?;
            let m = e.metadata()?;
            if m.is_dir() {
                stack.push(e.path());
            } else {
                let rel = e.path().strip_prefix(path).unwrap_or(&e.path()).to_string_lossy().to_string();
                entries.push((rel, m.len(), mtime(&m)));
            }
        }
    }
    entries.sort();
    for (rel, len, mt) in &entries {
        h.update(format!("{rel}\t{len}\t{mt}\n").as_bytes());
    }
    Ok(format!("dir:{}:{}", entries.len(), h.finalize().to_hex()))
}

fn mtime(m: &std::fs::Metadata) -> u128 {
    m.modified().ok().and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok()).map(|d| d.as_nanos()).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_changes_with_every_part() {
        let cfg = serde_json::json!({"a": 1});
        let base = KeyParts {
            kind: "k",
            version: "1",
            source: "builtin",
            config: &cfg,
            inputs: vec![],
            seed: None,
            files: vec![],
        };
        let k0 = base.key();
        assert_eq!(k0.len(), 32);
        let cfg2 = serde_json::json!({"a": 2});
        assert_ne!(KeyParts { config: &cfg2, ..base }.key(), k0);
        let base = KeyParts {
            kind: "k",
            version: "1",
            source: "builtin",
            config: &cfg,
            inputs: vec![],
            seed: None,
            files: vec![],
        };
        assert_ne!(KeyParts { version: "2", ..base }.key(), k0);
        let base = KeyParts {
            kind: "k",
            version: "1",
            source: "builtin",
            config: &cfg,
            inputs: vec![],
            seed: None,
            files: vec![],
        };
        assert_ne!(KeyParts { seed: Some(1), ..base }.key(), k0);
        let base = KeyParts {
            kind: "k",
            version: "1",
            source: "builtin",
            config: &cfg,
            inputs: vec![],
            seed: None,
            files: vec![],
        };
        assert_ne!(KeyParts { source: "plugin:/x.so@0.2.0", ..base }.key(), k0);
    }

    #[test]
    fn identity_tracks_content_and_listing() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("x.txt");
        std::fs::write(&f, "a").unwrap();
        let a = identity(&f).unwrap();
        std::fs::write(&f, "b").unwrap();
        assert_ne!(identity(&f).unwrap(), a);
        let da = identity(d.path()).unwrap();
        std::fs::write(d.path().join("y.txt"), "c").unwrap();
        assert_ne!(identity(d.path()).unwrap(), da);
        assert_eq!(identity(&d.path().join("nope")).unwrap(), "missing");
    }

    #[test]
    fn a_miss_names_the_changed_key_part() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::new(d.path());
        let cfg = serde_json::json!({"beta": 0.5, "model": {"dim": 8}});
        let parts = KeyParts {
            kind: "train",
            version: "1",
            source: "builtin",
            config: &cfg,
            inputs: vec![("encode".into(), "k1".into())],
            seed: Some(1),
            files: vec![],
        };
        assert_eq!(c.why_miss(&parts, false), "no cached `train` output yet");
        let m = Manifest {
            schema: MANIFEST_SCHEMA,
            kind: "train".into(),
            version: "1".into(),
            source: "builtin".into(),
            key: parts.key(),
            config: cfg.clone(),
            seed: 1,
            uses_seed: true,
            inputs: parts.inputs.clone(),
            files: vec![],
            created: "2026-01-01T00:00:00.000Z".into(),
            seconds: 1.0,
            outputs: vec![],
        };
        let tmp = c.temp_dir("x").unwrap();
        let dir = c.finish(&tmp, &m, &[], &[MetricRecord { key: "loss".into(), step: 1, value: 0.5 }], false).unwrap();
        assert_eq!(read_metrics(&dir).unwrap().len(), 1);
        let cfg2 = serde_json::json!({"beta": 1.0, "model": {"dim": 8}});
        let changed = KeyParts { config: &cfg2, seed: Some(2), inputs: vec![("encode".into(), "k2".into())], ..parts };
        let why = c.why_miss(&changed, true);
        assert!(
            why.starts_with("config `beta` 0.5 -> 1.0; seed 1 -> 2; input from `encode` changed (its key k1 -> k2)"),
            "{why}"
        );
        assert!(why.ends_with(&format!("(than the closest cached entry, {})", m.key)), "{why}");
        // In words without -v: no keys.
        assert_eq!(c.why_miss(&changed, false), "config `beta` 0.5 -> 1.0; seed 1 -> 2; input from `encode` changed");
        // Many differences: the first few and a count.
        let cfg3 = serde_json::json!({"beta": 1.0, "model": {"dim": 9}, "a": 1, "b": 2});
        let many = KeyParts { config: &cfg3, ..changed };
        let why = c.why_miss(&many, false);
        assert!(why.ends_with("; and 2 more (-v for all)") && why.matches("; ").count() == 4, "{why}");
    }

    #[test]
    fn commit_is_atomic_and_first_wins() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::new(d.path());
        let t1 = c.temp_dir("k").unwrap();
        std::fs::write(t1.join("o"), "1").unwrap();
        let t2 = c.temp_dir("k").unwrap();
        std::fs::write(t2.join("o"), "2").unwrap();
        let dest = c.commit(&t1, "kind", "k").unwrap();
        c.commit(&t2, "kind", "k").unwrap();
        assert_eq!(std::fs::read_to_string(dest.join("o")).unwrap(), "1");
        assert!(!t2.exists());
    }
}
