//! Images given as `http(s)://` URLs: downloaded once into a content-addressed folder,
//! with bounded concurrency, a timeout per request, retries with backoff for transient
//! failures (network errors, 5xx, 429) and a size limit.
//!
//! Layout of the download folder (`download.dir`, else `$HUSE_DOWNLOADS`, else
//! `$XDG_CACHE_HOME/huse/images` or `~/.cache/huse/images`):
//! `blobs/<blake3 of the content>.<ext>` and `urls/<blake3 of the URL>` (the content hash
//! it gave). A URL whose record and blob exist is never fetched again; both files are
//! written to a temporary name and renamed, so a crash leaves no half file under a final
//! name. What fails is returned per URL, for the stage's `bad_rows` policy.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde::Deserialize;

/// The `download:` block of the ingest config.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DownloadCfg {
    /// Where downloaded images go (shared by every run that reads the same URLs).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Requests at once.
    #[serde(default = "d_concurrency")]
    pub concurrency: usize,
    /// Seconds one request may take, connection to last byte.
    #[serde(default = "d_timeout")]
    pub timeout_s: f64,
    /// Further attempts after a transient failure.
    #[serde(default = "d_retries")]
    pub retries: u32,
    /// Larger images are refused (a failure for `bad_rows`).
    #[serde(default = "d_max_bytes")]
    pub max_bytes: u64,
}

fn d_concurrency() -> usize {
    8
}
fn d_timeout() -> f64 {
    30.0
}
fn d_retries() -> u32 {
    3
}
fn d_max_bytes() -> u64 {
    20 << 20
}

impl Default for DownloadCfg {
    fn default() -> Self {
        DownloadCfg {
            dir: None,
            concurrency: d_concurrency(),
            timeout_s: d_timeout(),
            retries: d_retries(),
            max_bytes: d_max_bytes(),
        }
    }
}

impl DownloadCfg {
    /// Checks the values; `Err((key, message))`.
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        if !(1..=256).contains(&self.concurrency) {
            return Err(("concurrency", format!("expected 1 to 256, found {}", self.concurrency)));
        }
        if !(self.timeout_s.is_finite() && self.timeout_s > 0.0 && self.timeout_s <= 3600.0) {
            return Err((
                "timeout_s",
                format!("expected more than 0 and at most 3600 seconds, found {}", self.timeout_s),
            ));
        }
        if self.retries > 20 {
            return Err(("retries", format!("expected at most 20, found {}", self.retries)));
        }
        if self.max_bytes == 0 {
            return Err(("max_bytes", "expected at least 1".into()));
        }
        Ok(())
    }
}

/// Whether an image value is a URL to download.
pub fn is_url(s: &str) -> bool {
    let l = s.trim_start().to_ascii_lowercase();
    l.starts_with("http://") || l.starts_with("https://")
}

/// The default download folder.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("HUSE_DOWNLOADS").filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|d| !d.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("huse").join("images")
}

/// Downloads URLs into the folder.
pub struct Downloader {
    cfg: DownloadCfg,
    dir: PathBuf,
    agent: ureq::Agent,
    /// Pause before retry `k` is `backoff * 2^k` (shortened in tests).
    backoff: Duration,
}

fn hex(h: blake3::Hash) -> String {
    h.to_hex().to_string()
}

/// Writes `bytes` to `path` through a temporary file in the same folder.
fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(
        format!("tmp-{}-{:?}", std::process::id(), std::thread::current().id()).replace(['(', ')'], ""),
    );
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// The content-addressed file name of image bytes, `<blake3>.<ext>` (the extension from
/// the bytes' format); `None` when the bytes are no image format.
pub fn blob_name(bytes: &[u8]) -> Option<String> {
    let ext = match image::guess_format(bytes).ok()? {
        image::ImageFormat::Jpeg => "jpg",
        image::ImageFormat::Png => "png",
        f => f.extensions_str().first().copied().unwrap_or("img"),
    };
    Some(format!("{}.{ext}", hex(blake3::hash(bytes))))
}

enum Attempt {
    /// Worth another try (network error, timeout, 5xx, 429).
    Transient(String),
    /// Will fail again (4xx, too large, not an image).
    Final(String),
}

impl Downloader {
    /// A downloader with `cfg` (checked by the caller).
    pub fn new(cfg: &DownloadCfg) -> std::io::Result<Downloader> {
        let dir = cfg.dir.clone().unwrap_or_else(default_dir);
        std::fs::create_dir_all(dir.join("blobs"))?;
        std::fs::create_dir_all(dir.join("urls"))?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs_f64(cfg.timeout_s)))
            .http_status_as_error(false)
            .user_agent(concat!("huse-run/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Downloader { cfg: cfg.clone(), dir, agent, backoff: Duration::from_millis(500) })
    }

    /// The same, with a shorter pause between retries (tests).
    pub fn with_backoff(mut self, backoff: Duration) -> Self {
        self.backoff = backoff;
        self
    }

    /// The folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where `url`'s image is, if it was downloaded before.
    pub fn cached(&self, url: &str) -> Option<PathBuf> {
        let record = self.dir.join("urls").join(hex(blake3::hash(url.as_bytes())));
        let name = std::fs::read_to_string(record).ok()?;
        let blob = self.dir.join("blobs").join(name.trim());
        blob.is_file().then_some(blob)
    }

    fn attempt(&self, url: &str) -> Result<PathBuf, Attempt> {
        let mut resp = self.agent.get(url).call().map_err(|e| match e {
            ureq::Error::BadUri(_) | ureq::Error::Http(_) => Attempt::Final(format!("{e}")),
            other => Attempt::Transient(format!("{other}")),
        })?;
        let status = resp.status().as_u16();
        if status == 429 || status >= 500 {
            return Err(Attempt::Transient(format!("HTTP {status}")));
        }
        if status >= 300 {
            return Err(Attempt::Final(format!("HTTP {status}")));
        }
        let max = self.cfg.max_bytes;
        if let Some(len) =
            resp.headers().get("content-length").and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok())
            && len > max
        {
            return Err(Attempt::Final(format!("{len} bytes, more than max_bytes ({max})")));
        }
        let bytes = resp.body_mut().with_config().limit(max).read_to_vec().map_err(|e| match e {
            ureq::Error::BodyExceedsLimit(_) => Attempt::Final(format!("more than max_bytes ({max}) bytes")),
            other => Attempt::Transient(format!("reading the body: {other}")),
        })?;
        let Some(name) = blob_name(&bytes) else {
            return Err(Attempt::Final(format!("not an image ({} bytes of unknown format)", bytes.len())));
        };
        let blob = self.dir.join("blobs").join(&name);
        let io = |e: std::io::Error| Attempt::Final(format!("writing {}: {e}", blob.display()));
        if !blob.is_file() {
            write_atomic(&blob, &bytes).map_err(io)?;
        }
        write_atomic(&self.dir.join("urls").join(hex(blake3::hash(url.as_bytes()))), name.as_bytes()).map_err(io)?;
        Ok(blob)
    }

    /// Downloads one URL (or finds it downloaded), retrying transient failures.
    pub fn fetch(&self, url: &str) -> Result<PathBuf, String> {
        if let Some(p) = self.cached(url) {
            return Ok(p);
        }
        let mut last = String::new();
        for k in 0..=self.cfg.retries {
            if k > 0 {
                std::thread::sleep(self.backoff * 2u32.saturating_pow(k - 1).min(64));
            }
            match self.attempt(url) {
                Ok(p) => return Ok(p),
                Err(Attempt::Final(e)) => return Err(format!("download of {url} failed: {e}")),
                Err(Attempt::Transient(e)) => last = e,
            }
        }
        Err(format!("download of {url} failed after {} attempt(s): {last}", self.cfg.retries + 1))
    }

    /// Fetches every URL, `concurrency` at a time; `done` is called after each. Stops
    /// starting new requests once `stop()` says so (those URLs are then missing from the map).
    pub fn fetch_all(
        &self,
        urls: &[String],
        done: &(dyn Fn() + Sync),
        stop: &(dyn Fn() -> bool + Sync),
    ) -> HashMap<String, Result<PathBuf, String>> {
        let next = AtomicUsize::new(0);
        let out = Mutex::new(HashMap::with_capacity(urls.len()));
        std::thread::scope(|s| {
            for _ in 0..self.cfg.concurrency.min(urls.len()) {
                s.spawn(|| {
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= urls.len() || stop() {
                            break;
                        }
                        let r = self.fetch(&urls[i]);
                        out.lock().unwrap().insert(urls[i].clone(), r);
                        done();
                    }
                });
            }
        });
        out.into_inner().unwrap()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::sync::atomic::AtomicU32;

    /// A tiny HTTP server: `/img.png` a real PNG, `/flaky.png` fails twice with 503 then
    /// serves the PNG, `/big.png` more than the limit, `/missing` 404, `/text` not an
    /// image. Returns its base URL and the request counter.
    fn server(png: Vec<u8>) -> (String, Arc<AtomicU32>, Arc<AtomicU32>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let base = format!("http://{}", l.local_addr().unwrap());
        let total = Arc::new(AtomicU32::new(0));
        let flaky = Arc::new(AtomicU32::new(0));
        let (t, f) = (total.clone(), flaky.clone());
        std::thread::spawn(move || {
            for conn in l.incoming() {
                let Ok(mut c) = conn else { continue };
                let mut line = String::new();
                let mut r = BufReader::new(c.try_clone().unwrap());
                if r.read_line(&mut line).is_err() {
                    continue;
                }
                loop {
                    let mut h = String::new();
                    if r.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                        break;
                    }
                }
                t.fetch_add(1, Ordering::SeqCst);
                let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
                let (status, body): (&str, Vec<u8>) = match path.as_str() {
                    "/img.png" => ("200 OK", png.clone()),
                    "/flaky.png" if f.fetch_add(1, Ordering::SeqCst) < 2 => {
                        ("503 Service Unavailable", b"busy".to_vec())
                    }
                    "/flaky.png" => ("200 OK", png.clone()),
                    "/big.png" => ("200 OK", vec![0u8; 5000]),
                    "/text" => ("200 OK", b"<html>not an image</html>".to_vec()),
                    _ => ("404 Not Found", b"no".to_vec()),
                };
                let _ = write!(c, "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n", body.len());
                let _ = c.write_all(&body);
            }
        });
        (base, total, flaky)
    }

    fn png() -> Vec<u8> {
        let img = image::RgbImage::from_fn(4, 3, |x, y| image::Rgb([x as u8 * 60, y as u8 * 80, 7]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        out.into_inner()
    }

    #[test]
    fn downloads_once_retries_transient_failures_and_refuses_what_will_not_work() {
        let (base, total, _) = server(png());
        let d = tempfile::tempdir().unwrap();
        let cfg = DownloadCfg {
            dir: Some(d.path().to_path_buf()),
            concurrency: 3,
            max_bytes: 1000,
            retries: 3,
            ..Default::default()
        };
        let dl = Downloader::new(&cfg).unwrap().with_backoff(Duration::from_millis(10));
        let urls: Vec<String> =
            ["img.png", "flaky.png", "big.png", "missing", "text"].iter().map(|p| format!("{base}/{p}")).collect();
        let n = AtomicUsize::new(0);
        let got = dl.fetch_all(
            &urls,
            &|| {
                n.fetch_add(1, Ordering::SeqCst);
            },
            &|| false,
        );
        assert_eq!(n.load(Ordering::SeqCst), 5);
        let ok = got[&urls[0]].as_ref().unwrap();
        assert_eq!(std::fs::read(ok).unwrap(), png(), "the bytes as served");
        assert_eq!(
            ok.file_name().unwrap().to_str().unwrap(),
            format!("{}.png", blake3::hash(&png()).to_hex()),
            "content-addressed"
        );
        assert_eq!(
            got[&urls[1]].as_ref().unwrap(),
            ok,
            "the flaky URL succeeded on its third attempt, same content, same blob"
        );
        assert!(got[&urls[2]].as_ref().unwrap_err().contains("max_bytes (1000)"), "{:?}", got[&urls[2]]);
        assert!(got[&urls[3]].as_ref().unwrap_err().contains("HTTP 404"), "{:?}", got[&urls[3]]);
        assert!(got[&urls[4]].as_ref().unwrap_err().contains("not an image"), "{:?}", got[&urls[4]]);
        // 1 + 3 (flaky) + 1 + 1 (404: no retry) + 1 requests.
        assert_eq!(total.load(Ordering::SeqCst), 7);
        // Downloaded once: a second pass (a new downloader, as a new run would) asks nothing.
        let dl2 = Downloader::new(&cfg).unwrap();
        assert_eq!(dl2.fetch(&urls[0]).unwrap(), *ok);
        assert_eq!(dl2.fetch(&urls[1]).unwrap(), *ok);
        assert_eq!(total.load(Ordering::SeqCst), 7);
        assert_eq!(std::fs::read_dir(d.path().join("blobs")).unwrap().count(), 1, "one blob, no temporary files");
    }

    #[test]
    fn a_server_that_stays_down_fails_after_the_retries() {
        let d = tempfile::tempdir().unwrap();
        // A port nothing listens on.
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let cfg = DownloadCfg { dir: Some(d.path().to_path_buf()), retries: 2, timeout_s: 2.0, ..Default::default() };
        let dl = Downloader::new(&cfg).unwrap().with_backoff(Duration::from_millis(5));
        let e = dl.fetch(&format!("http://127.0.0.1:{port}/x.jpg")).unwrap_err();
        assert!(e.contains("after 3 attempt(s)"), "{e}");
    }

    #[test]
    fn config_values_are_checked() {
        assert_eq!(DownloadCfg { concurrency: 0, ..Default::default() }.check().unwrap_err().0, "concurrency");
        assert_eq!(DownloadCfg { timeout_s: f64::NAN, ..Default::default() }.check().unwrap_err().0, "timeout_s");
        assert_eq!(DownloadCfg { max_bytes: 0, ..Default::default() }.check().unwrap_err().0, "max_bytes");
        assert!(is_url("https://x/y.jpg") && is_url("HTTP://x") && !is_url("images/1.jpg"));
    }
}
