//! `huse-hub`: references to Hugging Face Hub repositories — `hf:ORG/NAME[@REVISION]` in
//! experiment files — for models (the encoders' `model:` keys) and datasets (ingest's
//! `root:`), and where their files are in the local Hugging Face cache.
//!
//! The cache is the one `huggingface_hub` uses (`$HF_HOME/hub`, default
//! `~/.cache/huggingface/hub`; `models--ORG--NAME/` or `datasets--ORG--NAME/` with
//! `refs/<revision>` and `snapshots/<commit>/`); downloads go through hf-hub into it, from
//! `HF_ENDPOINT` when set; `HF_HUB_OFFLINE` forbids them.
//!
//! hf-hub's blocking client sets no timeouts, so every request goes through [`guarded`]: it
//! runs on a helper thread, and the caller gives up when the request makes no progress for
//! the timeout (`HUSE_HUB_TIMEOUT`, default 30 s; ingest's `hub.timeout_s`) or as soon as
//! the stage is cancelled (Ctrl-C, SIGTERM), with retries and backoff after a stall.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub mod testing;

/// The default time a Hub request may go without progress (no answer, no bytes).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
/// Tries after the first when a request stalls.
pub const DEFAULT_RETRIES: u32 = 2;

/// `HUSE_HUB_TIMEOUT` (seconds) when set and valid, else [`DEFAULT_TIMEOUT`].
pub fn timeout_from_env() -> Duration {
    std::env::var("HUSE_HUB_TIMEOUT")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0 && *s <= 86_400.0)
        .map(Duration::from_secs_f64)
        .unwrap_or(DEFAULT_TIMEOUT)
}

/// A request's sign of life: hf-hub calls it as bytes arrive (it is a download
/// [`hf_hub::api::Progress`]); [`guarded`] restarts its timeout on each.
#[derive(Clone)]
pub struct Beat {
    start: Instant,
    last_ms: Arc<AtomicU64>,
}

impl Beat {
    fn new() -> Beat {
        Beat { start: Instant::now(), last_ms: Arc::new(AtomicU64::new(0)) }
    }
    /// Notes progress now.
    pub fn touch(&self) {
        self.last_ms.store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }
    fn quiet_for(&self) -> Duration {
        self.start.elapsed().saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)))
    }
}

impl hf_hub::api::Progress for Beat {
    fn init(&mut self, _size: usize, _filename: &str) {
        self.touch();
    }
    fn update(&mut self, _size: usize) {
        self.touch();
    }
    fn finish(&mut self) {
        self.touch();
    }
}

/// Why a [`guarded`] request gave no result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// The caller's `stop` said so (the stage was cancelled).
    Cancelled,
    /// The request failed, or stalled past the timeout on every try: why.
    Failed(String),
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::Cancelled => f.write_str("cancelled"),
            Failure::Failed(why) => f.write_str(why),
        }
    }
}

/// Runs `request` (given a [`Beat`] to pass to hf-hub as the download progress) on a
/// helper thread and waits for it, checking `stop` ten times a second. A request without
/// progress for `timeout` is abandoned (its thread is left to end with its socket) and tried
/// again, up to `retries` more times, after 1, 2, 4 ... seconds; an error the request
/// returns is final. `what` names the request in messages.
pub fn guarded<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    retries: u32,
    stop: &dyn Fn() -> bool,
    request: Arc<dyn Fn(Beat) -> Result<T, String> + Send + Sync>,
) -> Result<T, Failure> {
    let mut pause = Duration::from_secs(1);
    for attempt in 0..=retries {
        let beat = Beat::new();
        let (tx, rx) = std::sync::mpsc::channel();
        let (req, b) = (request.clone(), beat.clone());
        std::thread::Builder::new()
            .name("huse-hub".into())
            .spawn(move || {
                let _ = tx.send(req(b));
            })
            .map_err(|e| Failure::Failed(format!("{what}: cannot start a thread: {e}")))?;
        loop {
            if stop() {
                return Err(Failure::Cancelled);
            }
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(e)) => return Err(Failure::Failed(e)),
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                    return Err(Failure::Failed(format!("{what}: the request ended without an answer")));
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) if beat.quiet_for() < timeout => {}
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => break,
            }
        }
        if attempt == retries {
            break;
        }
        let until = Instant::now() + pause;
        while Instant::now() < until {
            if stop() {
                return Err(Failure::Cancelled);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        pause *= 2;
    }
    Err(Failure::Failed(format!(
        "{what}: no answer from the hub for {:.0} s, {} time(s) (set HUSE_HUB_TIMEOUT, or ingest's `hub.timeout_s`, for a slower network)",
        timeout.as_secs_f64(),
        retries + 1
    )))
}

/// The kind of repository.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A model repository.
    Model,
    /// A dataset repository.
    Dataset,
}

impl Kind {
    fn prefix(self) -> &'static str {
        match self {
            Kind::Model => "models",
            Kind::Dataset => "datasets",
        }
    }
}

/// `hf:REPO@REVISION`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubRef {
    /// `ORG/NAME` (or a bare `NAME`).
    pub repo: String,
    /// Branch, tag or commit (`main` when not given).
    pub revision: String,
}

impl HubRef {
    /// `None` when `s` is no `hf:` reference; an error when it is one but malformed.
    pub fn parse(s: &str) -> Option<Result<HubRef, String>> {
        let s = s.trim();
        let rest = s.strip_prefix("hf:")?;
        let (repo, revision) = rest.split_once('@').unwrap_or((rest, "main"));
        let ok = |x: &str| {
            !x.is_empty() && x.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c)) && !x.contains("..")
        };
        if !ok(repo) || repo.starts_with('/') || repo.ends_with('/') || repo.matches('/').count() > 1 {
            return Some(Err(format!("`{s}`: expected hf:ORG/NAME[@REVISION]")));
        }
        if !ok(revision) {
            return Some(Err(format!("`{s}`: bad revision `{revision}`")));
        }
        Some(Ok(HubRef { repo: repo.to_string(), revision: revision.to_string() }))
    }

    /// The repository's folder in the cache.
    pub fn repo_dir(&self, kind: Kind) -> Option<PathBuf> {
        cache_dir().map(|c| c.join(format!("{}--{}", kind.prefix(), self.repo.replace('/', "--"))))
    }

    /// The file that says which commit the revision is (its identity belongs in cache keys).
    pub fn refs_path(&self, kind: Kind) -> Option<PathBuf> {
        self.repo_dir(kind).map(|d| d.join("refs").join(&self.revision))
    }

    /// The commit and snapshot folder of the revision, when the cache knows it.
    pub fn snapshot(&self, kind: Kind) -> Option<(String, PathBuf)> {
        let dir = self.repo_dir(kind)?;
        // A 40-hex revision is a commit; otherwise refs/<revision> holds the commit.
        let commit = if self.revision.len() == 40 && self.revision.chars().all(|c| c.is_ascii_hexdigit()) {
            self.revision.clone()
        } else {
            std::fs::read_to_string(dir.join("refs").join(&self.revision)).ok()?.trim().to_string()
        };
        Some((commit.clone(), dir.join("snapshots").join(commit)))
    }

    /// The file's path in the local cache, when it is there (no request).
    pub fn cached_file(&self, kind: Kind, file: &str) -> Option<PathBuf> {
        let dir = cache_dir()?;
        let kind = match kind {
            Kind::Model => hf_hub::RepoType::Model,
            Kind::Dataset => hf_hub::RepoType::Dataset,
        };
        hf_hub::Cache::new(dir)
            .repo(hf_hub::Repo::with_revision(self.repo.clone(), kind, self.revision.clone()))
            .get(file)
    }

    /// `file` of the repository: from the local cache, else downloaded into it through
    /// [`guarded`] (a stalled download is abandoned after `timeout` without bytes).
    pub fn fetch(
        &self,
        kind: Kind,
        file: &str,
        timeout: Duration,
        retries: u32,
        stop: &dyn Fn() -> bool,
    ) -> Result<PathBuf, Failure> {
        if let Some(p) = self.cached_file(kind, file) {
            return Ok(p);
        }
        let (me, f) = (self.clone(), file.to_string());
        let what = format!("downloading {file} of {me}");
        guarded(
            &what,
            timeout,
            retries,
            stop,
            Arc::new(move |beat: Beat| {
                let api = me.api(kind)?;
                api.download_with_progress(&f, beat).map_err(|e| format!("downloading {} failed ({e})", api.url(&f)))
            }),
        )
    }

    /// The repository's file list and commit (`info`) through [`guarded`].
    pub fn info(
        &self,
        kind: Kind,
        timeout: Duration,
        retries: u32,
        stop: &dyn Fn() -> bool,
    ) -> Result<(String, Vec<String>), Failure> {
        let me = self.clone();
        guarded(
            &format!("listing the files of {me}"),
            timeout,
            retries,
            stop,
            Arc::new(move |_beat: Beat| {
                let info = me.api(kind)?.info().map_err(|e| e.to_string())?;
                Ok((info.sha, info.siblings.into_iter().map(|s| s.rfilename).collect()))
            }),
        )
    }

    /// An hf-hub handle on the repository (downloads into the same cache).
    pub fn api(&self, kind: Kind) -> Result<hf_hub::api::sync::ApiRepo, String> {
        let mut builder = hf_hub::api::sync::ApiBuilder::from_env().with_progress(false);
        if let Some(dir) = cache_dir() {
            builder = builder.with_cache_dir(dir);
        }
        let api = builder.build().map_err(|e| format!("cannot set up the hub client: {e}"))?;
        let kind = match kind {
            Kind::Model => hf_hub::RepoType::Model,
            Kind::Dataset => hf_hub::RepoType::Dataset,
        };
        Ok(api.repo(hf_hub::Repo::with_revision(self.repo.clone(), kind, self.revision.clone())))
    }
}

impl std::fmt::Display for HubRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "hf:{}@{}", self.repo, self.revision)
    }
}

/// The hub cache: `$HF_HOME/hub`, or `~/.cache/huggingface/hub`.
pub fn cache_dir() -> Option<PathBuf> {
    std::env::var_os("HF_HOME")
        .map(|h| PathBuf::from(h).join("hub"))
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/huggingface/hub")))
}

/// Whether `HF_HUB_OFFLINE` forbids downloads.
pub fn offline() -> bool {
    std::env::var("HF_HUB_OFFLINE").is_ok_and(|v| !v.is_empty() && v != "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_references() {
        assert!(HubRef::parse("models/x").is_none());
        let r = HubRef::parse("hf:sentence-transformers/all-MiniLM-L6-v2").unwrap().unwrap();
        assert_eq!((r.repo.as_str(), r.revision.as_str()), ("sentence-transformers/all-MiniLM-L6-v2", "main"));
        assert_eq!(HubRef::parse("hf:a/b@v1.0").unwrap().unwrap().revision, "v1.0");
        assert_eq!(HubRef::parse("hf:gpt2").unwrap().unwrap().repo, "gpt2", "a repository without an organisation");
        for bad in ["hf:", "hf:/x", "hf:a/b/c", "hf:a/b@", "hf:a b/c", "hf:a/../b"] {
            assert!(HubRef::parse(bad).unwrap().is_err(), "{bad}");
        }
        assert_eq!(r.to_string(), "hf:sentence-transformers/all-MiniLM-L6-v2@main");
    }
}
