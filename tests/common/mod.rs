//! Helpers shared by the integration tests: a fresh directory per test, a command that
//! runs the real `huse-run` binary there, and SQL read-back of the results database.
#![allow(dead_code)]

pub mod webdriver;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

/// A test sandbox: its own directory, database and cache.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
}

impl Sandbox {
    pub fn new() -> Self {
        Sandbox { dir: tempfile::tempdir().unwrap() }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn db(&self) -> PathBuf {
        self.path().join("results.sqlite")
    }

    pub fn cache(&self) -> PathBuf {
        self.path().join("cache")
    }

    /// Writes a file in the sandbox and returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let p = self.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    }

    /// `huse-run ARGS` in the sandbox, with its database and cache.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_huse-run"));
        c.args(args)
            .current_dir(self.path())
            .env("HUSE_DB", self.db())
            .env("HUSE_CACHE", self.cache())
            .env_remove("RUST_LOG");
        c
    }

    /// Runs `huse-run ARGS` and returns its output.
    pub fn run(&self, args: &[&str]) -> Out {
        Out(self.cmd(args).output().unwrap())
    }

    /// Rows of a query as strings (NULL as "NULL"): the tests read the database with their
    /// own connection, to check what `huse-run` wrote independently of its store code.
    pub fn sql(&self, q: &str) -> Vec<Vec<String>> {
        use sqlx::Row;
        assert!(self.db().exists(), "no results database at {}", self.db().display());
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let url = format!("sqlite://{}?mode=ro", self.db().display());
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            let rows = sqlx::query(sqlx::AssertSqlSafe(q.to_string())).fetch_all(&pool).await.unwrap();
            let out = rows
                .iter()
                .map(|r| {
                    (0..r.columns().len())
                        .map(|i| {
                            r.try_get::<Option<String>, _>(i)
                                .map(|v| v.unwrap_or_else(|| "NULL".into()))
                                .or_else(|_| {
                                    r.try_get::<Option<i64>, _>(i).map(|v| v.map_or("NULL".into(), |x| x.to_string()))
                                })
                                .or_else(|_| {
                                    r.try_get::<Option<f64>, _>(i).map(|v| v.map_or("NULL".into(), |x| x.to_string()))
                                })
                                .unwrap()
                        })
                        .collect()
                })
                .collect();
            pool.close().await;
            out
        })
    }

    /// A single integer from a query.
    pub fn count(&self, q: &str) -> i64 {
        self.sql(q)[0][0].parse().unwrap()
    }
}

/// A 2x2 toy sweep whose rows are known by hand: `sum` = factor * 6 + 4 * offset for
/// (factor, offset) in {1, 2} x {0, 1} -> 6, 10, 12, 16 (runs 1-4); `loss` has 3 steps.
pub fn known_runs() -> Sandbox {
    let sb = Sandbox::new();
    let f = sb.write(
        "q.yaml",
        "name: q\nstages:\n  source: { uses: toy-source, with: { count: 4 } }\n  \
         mid: { uses: toy-scale, needs: [source], with: { metrics: 3 } }\n  total: { uses: toy-sum, needs: [mid] }\n\
         sweep:\n  mid.factor: [1, 2]\n  mid.offset: [0, 1]\n",
    );
    sb.run(&[f.to_str().unwrap()]).expect(0);
    sb
}

/// Eight `huse-run` processes at once, each a run of the same small experiment (`conc`:
/// 300 loss steps + 1 mean each) with its own `mid.offset`, writing the database `db` (the
/// sandbox's SQLite file when `None`); panics unless every one succeeds.
pub fn eight_concurrent_writers(sb: &Sandbox, db: Option<&str>) {
    let f = sb.write(
        "c.yaml",
        "name: conc\nstages:\n  source: { uses: toy-source }\n  mid: { uses: toy-scale, needs: [source], with: { metrics: 300 } }\n",
    );
    let f = f.to_str().unwrap();
    let children: Vec<_> = (0..8)
        .map(|i| {
            let set = format!("mid.offset={i}");
            let mut c = sb.cmd(&[f, "--set", &set]);
            if let Some(db) = db {
                c.env("HUSE_DB", db);
            }
            c.stdout(std::process::Stdio::null()).stderr(std::process::Stdio::piped()).spawn().unwrap()
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
}

/// A finished command.
pub struct Out(pub Output);

impl Out {
    pub fn code(&self) -> i32 {
        self.0.status.code().unwrap_or(-1)
    }
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.0.stdout).to_string()
    }
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.0.stderr).to_string()
    }
    /// Panics with both streams unless the exit code is `code`.
    #[track_caller]
    pub fn expect(self, code: i32) -> Self {
        assert_eq!(self.code(), code, "exit code\n--- stdout\n{}\n--- stderr\n{}", self.stdout(), self.stderr());
        self
    }
}

/// A raw HTTP/1.1 GET to the local server with extra header lines: (status, headers, body).
pub fn get_with(addr: &str, path: &str, extra: &str) -> (u16, String, String) {
    use std::io::{Read, Write};
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    c.write_all(format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{extra}\r\n").as_bytes()).unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    (status, head.to_string(), body.to_string())
}

pub fn get(addr: &str, path: &str) -> (u16, String) {
    let (s, _, b) = get_with(addr, path, "");
    (s, b)
}

pub fn enc(s: &str) -> String {
    s.bytes().map(|b| if b.is_ascii_alphanumeric() { (b as char).to_string() } else { format!("%{b:02X}") }).collect()
}

pub struct KillOnDrop(pub std::process::Child);
impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `huse-run ui ARGS` on a free port: the server and its address.
pub fn start_ui(sb: &Sandbox, args: &[&str]) -> (KillOnDrop, String) {
    use std::io::BufRead;
    let mut all = vec!["ui", "--port", "0"];
    all.extend(args);
    let mut child = sb.cmd(&all).stdout(std::process::Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let addr = line.split("http://").nth(1).and_then(|r| r.split('/').next()).unwrap_or_else(|| panic!("{line:?}"));
    (KillOnDrop(child), addr.to_string())
}

/// The app's JSON endpoints and the compare page, over HTTP (both backends run this).
/// Needs [`known_runs`]' experiment `q` in the app's database.
pub fn check_app_endpoints(addr: &str) {
    // The curves of two runs, one line each; grouped, the seeds of a sweep point pool.
    let (status, body) = get(addr, "/api/curves?exp=q&ids=1,4&key=loss");
    assert_eq!(status, 200, "{body}");
    let j: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(j["keys"], serde_json::json!(["loss"]), "{j}");
    assert_eq!(j["series"].as_array().unwrap().len(), 2, "{j}");
    assert_eq!(j["series"][0]["runs"], serde_json::json!([1]));
    assert_eq!(j["series"][0]["points"].as_array().unwrap().len(), 3, "three steps: {j}");
    let (_, grouped) = get(addr, "/api/curves?exp=q&ids=1,2,3,4&group=1");
    let g: serde_json::Value = serde_json::from_str(&grouped).unwrap();
    assert_eq!(g["key"], "loss");
    assert_eq!(g["series"].as_array().unwrap().len(), 4, "four sweep points, one run each: {g}");
    let (_, by) = get(addr, "/api/curves?exp=q&ids=1,2,3,4&group=1&by=mid.factor");
    let by: serde_json::Value = serde_json::from_str(&by).unwrap();
    assert_eq!(by["series"].as_array().unwrap().len(), 2, "by mid.factor: {by}");
    assert_eq!(by["series"][0]["name"], "mid.factor=1");
    assert_eq!(by["series"][0]["runs"], serde_json::json!([1, 2]));
    assert_eq!(get(addr, "/api/curves?exp=q&ids=1,x").0, 400);
    assert_eq!(get(addr, "/api/curves?exp=q&ids=1,999").0, 404);
    // The version moves only when the results do.
    let (status, v1) = get(addr, "/api/version");
    assert_eq!(status, 200);
    assert_eq!(get(addr, "/api/version").1, v1);
    // The chart library and the app's script are served from the binary; nothing else is.
    let (status, head, js) = get_with(addr, "/assets/echarts.js", "");
    assert_eq!(status, 200);
    assert!(head.to_ascii_lowercase().contains("text/javascript") && js.len() > 100_000, "{head}");
    assert_eq!(get(addr, "/assets/LICENSE-echarts").0, 200);
    for bad in ["/assets/..%2F..%2FCargo.toml", "/assets/lib.rs", "/assets/"] {
        assert!((400..500).contains(&get(addr, bad).0), "{bad}");
    }
    // Compare: the runs side by side, what differs marked.
    let (status, page) = get(addr, "/compare?ids=1,4");
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<a href=\"/run/1\">#1</a>") && page.contains("<a href=\"/run/4\">#4</a>"), "{page}");
    assert!(page.matches("<tr class=\"diff\">").count() >= 2, "the params and sum differ: {page}");
    assert_eq!(get(addr, "/compare?ids=1").0, 400);
    assert_eq!(get(addr, "/compare?ids=1,999").0, 404);
    // The runs page carries its view's data for the charts, escaped for a <script>.
    let (_, runs) = get(addr, "/exp/q");
    let data = runs.split("id=\"view-data\">").nth(1).and_then(|s| s.split("</script>").next()).unwrap();
    let d: serde_json::Value = serde_json::from_str(data).unwrap();
    assert_eq!(d["axes"], serde_json::json!(["mid.factor", "mid.offset", "sum"]), "{d}");
    assert_eq!(d["ids"], serde_json::json!([1, 2, 3, 4]));
}
