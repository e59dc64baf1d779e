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

/// Visible rows of the runs table (the brushing hides the others), as ids.
const VISIBLE_IDS: &str = "return Array.from(document.querySelectorAll('#runs tr[data-i]')).filter(t => !t.hidden)\
                           .map(t => t.querySelector('a').textContent)";

/// The results app on [`known_runs`]' experiment `q` at `addr`, in headless Chromium: the charts
/// drawn from the view, a mouse drag along a parallel axis narrowing the table, compare, and a
/// run recorded (with `db_args` before the experiment file) while the page is open appearing
/// without a reload.
pub fn drive_the_app_in_chromium(sb: &Sandbox, addr: &str, db_args: &[&str]) {
    use std::time::Duration;
    use webdriver::Browser;
    let b = Browser::start(sb.path(), 1300, 1100);
    b.open(&format!("http://{addr}/exp/q"));
    let wait = Duration::from_secs(30);
    b.wait_for(
        "const s = document.getElementById('cv-key'); return !!s && s.options.length > 0",
        wait,
        "the curves' metric list",
    );
    // Drawn from the view: parallel axes over what varies, a line per run; a scatter point per
    // run; the curves of `loss`, a line per run.
    let chart = "const g = id => echarts.getInstanceByDom(document.getElementById(id)).getOption();";
    b.wait_for(&format!("{chart} return g('cv').series.length === 4"), wait, "four curves");
    let info = b.js(&format!(
        "{chart} return {{pc: g('pc').parallelAxis.map(a => a.name), lines: g('pc').series[0].data.length, \
         sc: g('sc').series[0].data.length, keys: Array.from(document.getElementById('cv-key').options).map(o => o.value)}}"
    ));
    assert_eq!(info["pc"], serde_json::json!(["mid.factor", "mid.offset", "sum"]), "{info}");
    assert_eq!((info["lines"].as_i64(), info["sc"].as_i64()), (Some(4), Some(4)), "{info}");
    assert_eq!(info["keys"], serde_json::json!(["loss"]));
    if let Ok(dir) = std::env::var("HUSE_UI_SHOTS") {
        b.screenshot(&Path::new(&dir).join("ui-charts.png"));
    }

    // Brushing: a real drag along the `sum` axis over the two largest sums narrows the table
    // to those two runs (and the curves to theirs).
    let sums = b.js("const d = JSON.parse(document.getElementById('view-data').textContent); \
                     const i = d.columns.indexOf('sum'); return d.rows.map(r => r[i]);");
    let mut sums: Vec<f64> = sums.as_array().unwrap().iter().map(|v| v.as_f64().unwrap()).collect();
    sums.sort_by(f64::total_cmp);
    let (lo, hi) = ((sums[1] + sums[2]) / 2.0, sums[3] + 0.25 * (sums[3] - sums[2]));
    let at = b.js(&format!(
        "const el = document.getElementById('pc'); el.scrollIntoView(); const r = el.getBoundingClientRect(); \
         const cs = echarts.getInstanceByDom(el).getModel().getComponent('parallel').coordinateSystem; \
         const a = cs.dataToPoint({lo}, 'dim2'), b = cs.dataToPoint({hi}, 'dim2'); \
         return [r.left + a[0], r.top + a[1], r.left + b[0], r.top + b[1]];"
    ));
    let p: Vec<i64> = at.as_array().unwrap().iter().map(|v| v.as_f64().unwrap().round() as i64).collect();
    b.drag((p[0], p[1]), (p[2], p[3]));
    b.wait_for(&format!("{VISIBLE_IDS}.length === 2"), wait, "the brushed table");
    let visible = b.js(VISIBLE_IDS);
    let expected: Vec<String> = {
        let d = b.js("const d = JSON.parse(document.getElementById('view-data').textContent); \
                      const i = d.columns.indexOf('sum'); return d.rows.map(r => [String(r[0]), r[i]]);");
        d.as_array()
            .unwrap()
            .iter()
            .filter(|r| r[1].as_f64().unwrap() >= lo)
            .map(|r| r[0].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(visible, serde_json::json!(expected), "the rows left are those in the brushed range");
    assert!(b.js("return document.getElementById('brushnote').textContent").as_str().unwrap().contains("2 of 4"));
    b.wait_for(&format!("{chart} return g('cv').series.length === 2"), wait, "the brushed runs' curves");
    if let Ok(dir) = std::env::var("HUSE_UI_SHOTS") {
        b.screenshot(&Path::new(&dir).join("ui-brushed.png"));
    }

    // Compare: tick two runs, press the button; the page marks what differs and overlays curves.
    b.js("document.querySelector('input[name=ids][value=\"1\"]').click(); \
          document.querySelector('input[name=ids][value=\"4\"]').click(); \
          document.querySelector('#cmp button').click(); return true;");
    b.wait_for("return location.pathname === '/compare'", wait, "the compare page");
    assert!(b.url().contains("ids=1&ids=4"), "{}", b.url());
    assert!(b.js("return document.querySelectorAll('tr.diff').length").as_i64().unwrap() >= 2);
    b.wait_for(
        &format!("{chart} return !!document.getElementById('cv') && g('cv').series.length === 2"),
        wait,
        "the compared curves",
    );
    if let Ok(dir) = std::env::var("HUSE_UI_SHOTS") {
        b.screenshot(&Path::new(&dir).join("ui-compare.png"));
    }

    // The scatter's Pareto front: sum against mid.offset, offset smaller and sum larger is
    // better: runs 3 (offset 0, sum 12) and 4 (offset 1, sum 16); run 4 alone when both larger.
    let front = |mode: &str| {
        b.js(&format!(
            "const s = document.getElementById('sc-x'); s.value = 'mid.offset'; s.onchange(); \
             const y = document.getElementById('sc-y'); y.value = 'sum'; y.onchange(); \
             const f = document.getElementById('sc-front'); f.value = '{mode}'; f.onchange(); \
             return echarts.getInstanceByDom(document.getElementById('sc')).getOption().series[1].data.map(p => p.id);"
        ))
    };
    b.open(&format!("http://{addr}/exp/q"));
    b.wait_for(&format!("{VISIBLE_IDS}.length === 4"), wait, "the table");
    assert_eq!(front("minmax"), serde_json::json!([3, 4]));
    if let Ok(dir) = std::env::var("HUSE_UI_SHOTS") {
        b.js("document.getElementById('sc').scrollIntoView(); return true;");
        b.screenshot(&Path::new(&dir).join("ui-front.png"));
    }
    assert_eq!(front("maxmax"), serde_json::json!([4]));
    // The filter box with OR and IN, typed and submitted as a user does; then grouping.
    b.open(&format!("http://{addr}/exp/q"));
    b.wait_for(&format!("{VISIBLE_IDS}.length === 4"), wait, "the table");
    b.js("const f = document.querySelector('input[name=q]'); f.value = 'mid.offset in (1) or sum < 7'; \
          f.form.submit(); return true;");
    b.wait_for("return location.search.includes('q=')", wait, "the filtered page");
    b.wait_for(&format!("{VISIBLE_IDS}.length === 3"), wait, "the filtered table");
    assert_eq!(b.js(VISIBLE_IDS), serde_json::json!(["1", "2", "4"]));
    b.js("const g = document.querySelector('input[name=group]'); g.checked = true; document.querySelector('input[name=q]').value = ''; \
          g.form.submit(); return true;");
    b.wait_for(
        "return location.search.includes('group=1') && document.querySelectorAll('#runs tr[data-i]').length === 4",
        wait,
        "the grouped table",
    );
    let cells = b.js("return Array.from(document.querySelectorAll('#runs td')).map(td => td.textContent)");
    assert!(cells.as_array().unwrap().iter().any(|c| c.as_str() == Some("1")), "each group's run count: {cells}");
    // A run's page: its curve drawn, its config shown.
    b.open(&format!("http://{addr}/run/4"));
    assert!(b.js("return document.querySelectorAll('svg').length").as_i64().unwrap() >= 1, "the run's curves");
    assert!(b.js("return document.body.textContent.includes('name: q')").as_bool().unwrap(), "its resolved config");

    // Live: a run recorded while the page is open appears without a reload.
    b.open(&format!("http://{addr}/exp/q"));
    b.wait_for(&format!("{VISIBLE_IDS}.length === 4"), wait, "the table");
    b.js("window.sameWindow = 1; return true;");
    let more = sb.write(
        "q-more.yaml",
        "name: q\nstages:\n  source: { uses: toy-source, with: { count: 4 } }\n  \
         mid: { uses: toy-scale, needs: [source], with: { metrics: 3, factor: 3, offset: 2 } }\n  total: { uses: toy-sum, needs: [mid] }\n",
    );
    let mut args = db_args.to_vec();
    args.push(more.to_str().unwrap());
    sb.run(&args).expect(0);
    b.wait_for(&format!("{VISIBLE_IDS}.length === 5"), wait, "the new run in the table");
    assert_eq!(b.js("return window.sameWindow"), serde_json::json!(1), "no reload");
    b.wait_for(&format!("{chart} return g('cv').series.length === 5"), wait, "the new run's curve");
}
