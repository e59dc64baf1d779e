//! The content-addressed stage cache.
//!
//! A stage output lives in `<root>/<kind>/<key>/`, where `key` is the BLAKE3 hash of
//! the stage kind, its version (and plugin version), its resolved config, the keys of
//! its inputs, the seed when the stage uses it, and the identity of the files it reads.
//! Outputs are written into `<root>/.tmp/<key>-<pid>-<n>/` and renamed into place when
//! complete ([`Cache::finish`]), so a directory under `<kind>/` is always a finished
//! output. Beside the outputs go the stage's metrics (`.huse-metrics.jsonl`), so that a
//! cache hit can give a new run the same metrics, and a [`Manifest`] (`.huse-stage.json`,
//! with a schema version) recording what made the entry, including its key parts, so
//! that a later miss can say which part changed ([`Cache::why_miss`]).

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{Context as _, Result};
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
pub const MANIFEST_SCHEMA: u32 = 1;

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
    /// (stage in `needs`, its cache key).
    #[serde(default)]
    pub inputs: Vec<(String, String)>,
    /// (path, identity) of the files the stage reads.
    #[serde(default)]
    pub files: Vec<(String, String)>,
    /// RFC 3339 time the stage started.
    pub created: String,
    /// Seconds it ran.
    pub seconds: f64,
}

static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

impl Cache {
    /// The cache at `root` (created on first write).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Cache { root: root.into() }
    }

    /// Its root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the finished output of `kind` with `key` lives.
    pub fn entry(&self, kind: &str, key: &str) -> PathBuf {
        self.root.join(kind).join(key)
    }

    /// Whether a finished output exists.
    pub fn contains(&self, kind: &str, key: &str) -> bool {
        self.entry(kind, key).is_dir()
    }

    /// A fresh, empty temporary output directory.
    pub fn temp_dir(&self, key: &str) -> Result<PathBuf> {
        let n = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let dir = self.root.join(".tmp").join(format!("{key}-{}-{n}", std::process::id()));
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
    pub fn finish(&self, tmp: &Path, manifest: &Manifest, metrics: &[MetricRecord], replace: bool) -> Result<PathBuf> {
        write_metrics(tmp, metrics)?;
        let json = serde_json::to_vec_pretty(manifest).expect("a manifest serialises");
        std::fs::write(tmp.join(MANIFEST_FILE), json).with_context(|| format!("writing {}", tmp.join(MANIFEST_FILE).display()))?;
        if replace {
            self.remove(&manifest.kind, &manifest.key)?;
        }
        self.commit(tmp, &manifest.kind, &manifest.key)
    }

    /// Why `parts` has no entry: the key parts that differ from the closest finished
    /// entry of the same kind (by the number of differing parts, then the newest), e.g.
    /// `config `beta` 0.5 -> 1.0 (differs from entry 3f2a...)`; or that no entry of the
    /// kind exists.
    pub fn why_miss(&self, parts: &KeyParts) -> String {
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
            let diffs = key_diffs(&m, parts);
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
            Some((_, _, diffs, key)) => format!("{} (than the closest cached entry, {key})", diffs.join("; ")),
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

    /// Removes temporary directories left by processes that no longer exist.
    pub fn sweep_stale_temps(&self) {
        let Ok(rd) = std::fs::read_dir(self.root.join(".tmp")) else { return };
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let pid = name.rsplit('-').nth(1).and_then(|p| p.parse::<u32>().ok());
            if let Some(pid) = pid
                && pid != std::process::id()
                && !Path::new(&format!("/proc/{pid}")).exists()
            {
                let _ = std::fs::remove_dir_all(e.path());
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
            std::fs::rename(&dest, &trash)?;
            std::fs::remove_dir_all(&trash)?;
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
fn key_diffs(m: &Manifest, p: &KeyParts) -> Vec<String> {
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
    for (stage, key) in &p.inputs {
        match m.inputs.iter().find(|(s, _)| s == stage) {
            Some((_, k)) if k != key => out.push(format!("input from `{stage}` changed (its key {k} -> {key})")),
            None => out.push(format!("new input from `{stage}`")),
            _ => {}
        }
    }
    for (stage, _) in &m.inputs {
        if !p.inputs.iter().any(|(s, _)| s == stage) {
            out.push(format!("no longer an input from `{stage}`"));
        }
    }
    for (path, id) in &p.files {
        match m.files.iter().find(|(f, _)| f == path) {
            Some((_, i)) if i != id => out.push(format!("file {path} changed")),
            None => out.push(format!("new file {path}")),
            _ => {}
        }
    }
    for (path, _) in &m.files {
        if !p.files.iter().any(|(f, _)| f == path) {
            out.push(format!("no longer reads {path}"));
        }
    }
    out
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
        let base = KeyParts { kind: "k", version: "1", source: "builtin", config: &cfg, inputs: vec![], seed: None, files: vec![] };
        let k0 = base.key();
        assert_eq!(k0.len(), 32);
        let cfg2 = serde_json::json!({"a": 2});
        assert_ne!(KeyParts { config: &cfg2, ..base }.key(), k0);
        let base = KeyParts { kind: "k", version: "1", source: "builtin", config: &cfg, inputs: vec![], seed: None, files: vec![] };
        assert_ne!(KeyParts { version: "2", ..base }.key(), k0);
        let base = KeyParts { kind: "k", version: "1", source: "builtin", config: &cfg, inputs: vec![], seed: None, files: vec![] };
        assert_ne!(KeyParts { seed: Some(1), ..base }.key(), k0);
        let base = KeyParts { kind: "k", version: "1", source: "builtin", config: &cfg, inputs: vec![], seed: None, files: vec![] };
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
        assert_eq!(c.why_miss(&parts), "no cached `train` output yet");
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
        };
        let tmp = c.temp_dir("x").unwrap();
        let dir = c.finish(&tmp, &m, &[MetricRecord { key: "loss".into(), step: 1, value: 0.5 }], false).unwrap();
        assert_eq!(read_metrics(&dir).unwrap().len(), 1);
        let cfg2 = serde_json::json!({"beta": 1.0, "model": {"dim": 8}});
        let changed = KeyParts { config: &cfg2, seed: Some(2), inputs: vec![("encode".into(), "k2".into())], ..parts };
        let why = c.why_miss(&changed);
        assert!(why.starts_with("config `beta` 0.5 -> 1.0; seed 1 -> 2; input from `encode` changed (its key k1 -> k2)"), "{why}");
        assert!(why.ends_with(&format!("(than the closest cached entry, {})", m.key)), "{why}");
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
