//! A local HTTP server standing in for the Hugging Face Hub in tests (no network here):
//! it serves fixed bodies at fixed paths with the headers hf-hub reads (`etag`,
//! `x-repo-commit`, `Content-Range`), honouring `Range`, and counts the requests. Any
//! path works — `/{repo}/resolve/{rev}/{file}` for models, `/datasets/{repo}/resolve/...`
//! and the JSON of `/api/datasets/{repo}/revision/{rev}` for datasets, or a plain file URL.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Starts the server with `files` (URL path, body), answering as commit `commit`; returns
/// its base URL (`http://127.0.0.1:PORT`) and the request counter. Unknown paths get 404.
pub fn serve(files: Vec<(String, Vec<u8>)>, commit: &str) -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("a local port");
    let addr = format!("http://{}", listener.local_addr().expect("bound"));
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    let commit = commit.to_string();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            h.fetch_add(1, Ordering::SeqCst);
            let Ok(clone) = stream.try_clone() else { continue };
            let mut reader = BufReader::new(clone);
            let mut first = String::new();
            let _ = reader.read_line(&mut first);
            let (mut start, mut end) = (0usize, None::<usize>);
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).is_err() || line.trim().is_empty() {
                    break;
                }
                if let Some(r) = line.to_ascii_lowercase().strip_prefix("range: bytes=")
                    && let Some((a, b)) = r.trim().split_once('-')
                {
                    start = a.parse().unwrap_or(0);
                    end = b.parse().ok();
                }
            }
            let path = first.split_whitespace().nth(1).unwrap_or("");
            let resp = match files.iter().find(|(p, _)| path == p) {
                Some((_, body)) if !body.is_empty() && start < body.len() => {
                    let e = end.unwrap_or(body.len() - 1).min(body.len() - 1);
                    let part = &body[start..=e];
                    let etag = format!("{:x}", body.len() * 7919 + body.iter().map(|b| *b as usize).sum::<usize>());
                    let mut r = format!(
                        "HTTP/1.1 206 Partial Content\r\netag: \"{etag}\"\r\nx-repo-commit: {commit}\r\n\
                         Content-Range: bytes {start}-{e}/{}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                        body.len(),
                        part.len()
                    )
                    .into_bytes();
                    r.extend_from_slice(part);
                    r
                }
                _ => b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_vec(),
            };
            let _ = stream.write_all(&resp);
        }
    });
    (addr, hits)
}
