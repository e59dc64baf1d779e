//! A small W3C WebDriver client over Debian's `chromedriver` and headless Chromium, for the
//! tests that click, drag and wait in a real browser (the results app's charts and live
//! updates). Plain HTTP/1.1 with JSON bodies; one session per [`Browser`].

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

/// A headless Chromium driven through chromedriver; both end when it drops.
pub struct Browser {
    driver: Child,
    port: u16,
    session: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// One request to chromedriver: (HTTP status, the JSON body's `value`).
fn request(port: u16, method: &str, path: &str, body: Option<&Value>) -> std::io::Result<(u16, Value)> {
    let mut c = TcpStream::connect(("127.0.0.1", port))?;
    c.set_read_timeout(Some(Duration::from_secs(120)))?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    // chromedriver keeps the connection open whatever the request says: read by Content-Length.
    let mut out = Vec::new();
    let mut buf = [0u8; 65536];
    let (head_len, body_len) = loop {
        let n = c.read(&mut buf)?;
        if n == 0 {
            return Err(std::io::Error::other("chromedriver closed the connection"));
        }
        out.extend_from_slice(&buf[..n]);
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())
                .unwrap_or(0);
            break (end + 4, len);
        }
    };
    while out.len() < head_len + body_len {
        let n = c.read(&mut buf)?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&out[..head_len]);
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let v: Value = serde_json::from_slice(&out[head_len..]).unwrap_or(Value::Null);
    Ok((status, v.get("value").cloned().unwrap_or(Value::Null)))
}

impl Browser {
    /// Starts chromedriver and a headless Chromium of `width` x `height`; its profile lives
    /// under `dir`.
    pub fn start(dir: &Path, width: u32, height: u32) -> Browser {
        let port = free_port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver must be installed (Debian package `chromium-driver`; .ci/run installs it)");
        let t0 = Instant::now();
        while request(port, "GET", "/status", None).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(30), "chromedriver did not answer on port {port}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let caps = json!({"capabilities": {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {
            "binary": "/usr/bin/chromium",
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--disable-dev-shm-usage", format!("--window-size={width},{height}"),
                     format!("--user-data-dir={}", dir.join("chromium-profile").display())]}}}});
        let mut b = Browser { driver, port, session: String::new() };
        let (status, v) = request(port, "POST", "/session", Some(&caps)).unwrap();
        assert_eq!(status, 200, "no browser session: {v}");
        b.session = v["sessionId"].as_str().unwrap().to_string();
        b
    }

    fn call(&self, method: &str, what: &str, body: Option<Value>) -> Value {
        let path = format!("/session/{}/{what}", self.session);
        let (status, v) = request(self.port, method, &path, body.as_ref()).unwrap();
        assert_eq!(status, 200, "{method} {what}: {v}");
        v
    }

    /// Opens `url` and waits for it to load.
    pub fn open(&self, url: &str) {
        self.call("POST", "url", Some(json!({ "url": url })));
    }

    /// Runs `script` (a function body; `return` gives the value) in the page.
    pub fn js(&self, script: &str) -> Value {
        self.call("POST", "execute/sync", Some(json!({ "script": script, "args": [] })))
    }

    /// Waits until `script` returns true, for at most `limit`; panics with `what` otherwise.
    pub fn wait_for(&self, script: &str, limit: Duration, what: &str) {
        let t0 = Instant::now();
        while self.js(script) != Value::Bool(true) {
            assert!(t0.elapsed() < limit, "waited {limit:?} for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A mouse drag in the viewport from `from` to `to` (CSS pixels), in steps as a hand moves.
    pub fn drag(&self, from: (i64, i64), to: (i64, i64)) {
        let mut actions = vec![
            json!({"type": "pointerMove", "duration": 0, "x": from.0, "y": from.1, "origin": "viewport"}),
            json!({"type": "pointerDown", "button": 0}),
        ];
        for k in 1..=10 {
            let x = from.0 + (to.0 - from.0) * k / 10;
            let y = from.1 + (to.1 - from.1) * k / 10;
            actions.push(json!({"type": "pointerMove", "duration": 20, "x": x, "y": y, "origin": "viewport"}));
        }
        actions.push(json!({"type": "pointerUp", "button": 0}));
        self.call(
            "POST",
            "actions",
            Some(json!({"actions": [{"type": "pointer", "id": "mouse", "parameters": {"pointerType": "mouse"}, "actions": actions}]})),
        );
    }

    /// The page's current address.
    pub fn url(&self) -> String {
        self.call("GET", "url", None).as_str().unwrap_or("").to_string()
    }

    /// A PNG screenshot of the viewport, written to `path`.
    pub fn screenshot(&self, path: &Path) {
        let b64 = self.call("GET", "screenshot", None);
        std::fs::write(path, base64(b64.as_str().unwrap())).unwrap();
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = request(self.port, "DELETE", &format!("/session/{}", self.session), None);
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

/// Standard base64 (with padding) to bytes.
fn base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => 0,
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().take_while(|c| **c != b'=').count();
        let v = chunk.iter().take(n).enumerate().fold(0u32, |acc, (i, c)| acc | (val(*c) as u32) << (18 - 6 * i));
        out.extend(v.to_be_bytes()[1..].iter().take(n.saturating_sub(1)));
    }
    out
}
