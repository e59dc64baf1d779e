//! Beyond one machine, against real components: a single-node SLURM cluster (slurmctld +
//! slurmd + munge) and a PostgreSQL server, both started by `.ci/services start`, which
//! writes their environment (`SLURM_CONF`, `HUSE_TEST_PG`) to a file `.ci/run` sources.
//!
//! When they are not there, each test says so on stderr and returns; with
//! `HUSE_REQUIRE_SERVICES=1` (CI sets it) a missing component fails the test instead.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::Sandbox;
use huse_store::copy::RunDump;
use huse_store::{Location, Store};

/// The PostgreSQL server URL when SLURM and PostgreSQL are both up; `None` (after saying
/// why) when not.
fn services(test: &str) -> Option<String> {
    let why = match (std::env::var("HUSE_TEST_PG"), Command::new("sinfo").arg("-h").output()) {
        (Ok(pg), Ok(o)) if o.status.success() && !o.stdout.is_empty() => return Some(pg),
        (Err(_), _) => {
            "HUSE_TEST_PG is not set (start the services: `.ci/services start`, then source /tmp/huse-services/env)"
                .to_string()
        }
        (_, Ok(o)) => format!("SLURM does not answer (`sinfo`: {})", String::from_utf8_lossy(&o.stderr).trim()),
        (_, Err(e)) => format!("SLURM is not installed (`sinfo`: {e})"),
    };
    if std::env::var("HUSE_REQUIRE_SERVICES").is_ok_and(|v| v == "1") {
        panic!("{test}: {why}");
    }
    eprintln!("SKIPPED {test}: {why}");
    None
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// A fresh database on the test server, named after the test; returns its URL.
fn fresh_pg(base: &str, name: &str) -> String {
    use sqlx::Connection;
    let db = format!("t_{}_{}", name, std::process::id());
    rt().block_on(async {
        let mut c = sqlx::PgConnection::connect(base).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("DROP DATABASE IF EXISTS {db}"))).execute(&mut c).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}"))).execute(&mut c).await.unwrap();
    });
    let (server, _) = base.rsplit_once('/').unwrap();
    format!("{server}/{db}")
}

/// One integer from the PostgreSQL database, through a connection of the test's own.
fn pg_count(url: &str, q: &str) -> i64 {
    use sqlx::{Connection, Row};
    rt().block_on(async {
        let mut c = sqlx::PgConnection::connect(url).await.unwrap();
        sqlx::query(sqlx::AssertSqlSafe(q.to_string())).fetch_one(&mut c).await.unwrap().get::<i64, _>(0)
    })
}

fn dump(loc: &Location, experiment: &str) -> Vec<RunDump> {
    rt().block_on(async {
        let s = Store::open_read_only(loc).await.unwrap();
        let d = s.dump_runs(Some(experiment)).await.unwrap();
        s.close().await;
        d
    })
}

/// What must agree between two stores that ran the same runs: everything but ids, times,
/// durations, hosts, processes, logs, cache folders and `cached` (a local run computes a
/// shared stage in its first run; on SLURM its own job computes it, and every run finds it
/// cached).
fn comparable(mut runs: Vec<RunDump>, cache: &Path) -> BTreeMap<String, serde_json::Value> {
    let cache = cache.display().to_string();
    let mut out = BTreeMap::new();
    for r in &mut runs {
        r.started_at.clear();
        r.ended_at = None;
        r.duration_s = None;
        r.host = None;
        r.pid = None;
        r.log = None;
        for s in &mut r.stage_runs {
            s.started_at = None;
            s.ended_at = None;
            s.duration_s = None;
            s.cached = false;
            s.output_dir = s.output_dir.as_ref().map(|d| d.replace(&cache, "CACHE"));
            for a in &mut s.artifacts {
                a.1 = a.1.replace(&cache, "CACHE");
                if a.0 == "timing.json" {
                    a.2 = None; // the toy stages' wall-clock record: its length varies with the time
                }
            }
        }
        // Stage rows are recorded as stages end; their order differs between schedules.
        r.stage_runs.sort_by(|a, b| a.stage.cmp(&b.stage));
        r.metrics.sort_by(|a, b| (&a.0, &a.1, a.2).cmp(&(&b.0, &b.1, b.2)));
        out.insert(r.name.clone(), serde_json::to_value(&*r).unwrap());
    }
    out
}

fn sweep_yaml(name: &str, extra: &str) -> String {
    format!(
        "name: {name}\nseed: 1\ndevice: cpu\nrepeat: 2\n\
         launcher: {{ kind: slurm, cpus: 1, parallelism: 2 }}\n\
         stages:\n  source: {{ uses: toy-source, with: {{ count: 10 }} }}\n  \
         prep:   {{ uses: toy-scale, needs: [source], with: {{ factor: 3.0 }} }}\n  \
         left:   {{ uses: toy-scale, needs: [source], with: {{ factor: 2.0, metrics: 3, add_seed: true }} }}\n  \
         right:  {{ uses: toy-scale, needs: [source], with: {{ factor: -1.0 {extra} }} }}\n  \
         total:  {{ uses: toy-sum, needs: [left, right, prep] }}\n\
         sweep:\n  left.factor: [1.0, 2.0, 3.0]\n  right.offset: [0, 10, 20]\n"
    )
}

/// The launch folders of an experiment in the sandbox.
fn launches(sb: &Sandbox, experiment: &str) -> Vec<PathBuf> {
    let dir = sb.path().join(".huse/slurm").join(experiment);
    let mut v: Vec<PathBuf> =
        std::fs::read_dir(&dir).map(|r| r.flatten().map(|e| e.path()).collect()).unwrap_or_default();
    v.sort();
    v
}

/// Every `running KIND (key K)` line of a launch's logs: (kind, key) -> count.
fn computed_in_logs(dir: &Path) -> BTreeMap<(String, String), usize> {
    let mut out = BTreeMap::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.path().extension().is_some_and(|x| x == "out") {
            for line in std::fs::read_to_string(e.path()).unwrap().lines() {
                if let Some(rest) = line.split(": running ").nth(1) {
                    let kind = rest.split_whitespace().next().unwrap().to_string();
                    let key = rest.split("(key ").nth(1).unwrap().split(')').next().unwrap().to_string();
                    *out.entry((kind, key)).or_insert(0) += 1;
                }
            }
        }
    }
    out
}

#[test]
fn a_sweep_on_slurm_writes_postgres_exactly_what_a_local_run_writes_sqlite() {
    let Some(pg) = services("slurm_sweep") else { return };
    let url = fresh_pg(&pg, "sweep");
    let sb = Sandbox::new();
    // One axis of the sweep comes from the command line: every SLURM task compiles the
    // experiment again with it.
    let yaml = sweep_yaml("sweep", "").replace("  right.offset: [0, 10, 20]\n", "");
    let f = sb.write("s.yaml", &yaml);
    let f = f.to_str().unwrap();
    let axis = "right.offset=0,10,20";
    // Locally, into SQLite, with its own cache.
    let local_cache = sb.path().join("local-cache");
    sb.cmd(&["--launcher", "local", f, "--sweep", axis])
        .env("HUSE_CACHE", &local_cache)
        .output()
        .map(common::Out)
        .unwrap()
        .expect(0);
    // On SLURM (the file's launcher block), attached, into PostgreSQL.
    let out = sb.cmd(&[f, "--sweep", axis]).env("HUSE_DB", &url).output().map(common::Out).unwrap().expect(0);
    let text = out.stdout();
    assert!(text.contains("submitted 18 run(s) as job array"), "{text}");
    assert!(text.contains("18 succeeded"), "{text}");
    // Shared stages once: across every log of the launch, each distinct stage job ran once;
    // the source once in all.
    let dirs = launches(&sb, "sweep");
    assert_eq!(dirs.len(), 1);
    let ran = computed_in_logs(&dirs[0]);
    assert!(ran.values().all(|n| *n == 1), "a stage job computed twice: {ran:?}");
    assert_eq!(ran.keys().filter(|(k, _)| k == "toy-source").count(), 1);
    assert_eq!(ran.keys().filter(|(k, _)| k == "toy-sum").count(), 18);
    // Row for row.
    let local = comparable(dump(&Location::Sqlite(sb.db()), "sweep"), &local_cache);
    let remote = comparable(dump(&Location::Postgres(url.clone()), "sweep"), &sb.cache());
    assert_eq!(local.len(), 18);
    assert_eq!(local.keys().collect::<Vec<_>>(), remote.keys().collect::<Vec<_>>());
    for (name, l) in &local {
        let r = &remote[name];
        for (field, lv) in l.as_object().unwrap() {
            assert_eq!(
                lv, &r[field],
                "run {name}: `{field}` differs between the local SQLite and the SLURM PostgreSQL rows"
            );
        }
    }
    // The same counts through a connection of the test's own.
    assert_eq!(pg_count(&url, "SELECT count(*) FROM runs WHERE status = 'succeeded'"), 18);
    assert_eq!(pg_count(&url, "SELECT count(*) FROM stage_runs"), sb.count("SELECT count(*) FROM stage_runs"));
    assert_eq!(pg_count(&url, "SELECT count(*) FROM metrics"), sb.count("SELECT count(*) FROM metrics"));
    assert_eq!(pg_count(&url, "SELECT count(*) FROM params"), sb.count("SELECT count(*) FROM params"));
    // Every run records its log; status shows them all succeeded.
    assert_eq!(pg_count(&url, "SELECT count(*) FROM runs WHERE log LIKE '%/run-%.out'"), 18);
    let st = sb
        .cmd(&["status", f, "--sweep", axis])
        .env("HUSE_DB", &url)
        .output()
        .map(common::Out)
        .unwrap()
        .expect(0)
        .stdout();
    assert!(st.contains("18 succeeded"), "{st}");
    // The same command again submits nothing: everything is cached.
    let again =
        sb.cmd(&[f, "--sweep", axis]).env("HUSE_DB", &url).output().map(common::Out).unwrap().expect(0).stdout();
    assert!(again.contains("nothing to submit"), "{again}");
    assert_eq!(launches(&sb, "sweep").len(), 1, "no new launch");
}

#[test]
fn a_failed_point_is_failed_with_its_log_and_resubmitting_runs_only_it() {
    let Some(pg) = services("failed_point") else { return };
    let url = fresh_pg(&pg, "failing");
    let sb = Sandbox::new();
    let flag = sb.write("flag", "");
    let yaml = format!(
        "name: failing\nseed: 1\nlauncher: {{ kind: slurm }}\nstages:\n  source: {{ uses: toy-source }}\n  \
         mid: {{ uses: toy-scale, needs: [source] }}\n\
         sweep:\n  mid.fail_while: [/nonexistent/a, /nonexistent/b, {}]\n",
        flag.display()
    );
    let f = sb.write("f.yaml", &yaml);
    let f = f.to_str().unwrap();
    let out = sb.cmd(&[f, "--detach"]).env("HUSE_DB", &url).output().map(common::Out).unwrap().expect(0).stdout();
    assert!(out.contains("submitted 3 run(s)") && out.contains("detached"), "{out}");
    let waited = sb.cmd(&["wait", f]).env("HUSE_DB", &url).output().map(common::Out).unwrap().expect(1).stdout();
    assert!(waited.contains("1 failed, 2 succeeded"), "{waited}");
    let failed_line = waited.lines().find(|l| l.contains(" failed ")).unwrap();
    let log =
        failed_line.split('┆').map(str::trim).find(|c| c.ends_with(".out")).expect("the failed run's log is named");
    assert!(std::fs::read_to_string(log).unwrap().contains("failing while"), "the log tells why");
    assert_eq!(pg_count(&url, "SELECT count(*) FROM runs WHERE status = 'failed' AND log IS NOT NULL"), 1);
    let id = pg_count(&url, "SELECT id FROM runs WHERE status = 'failed'");
    let show =
        sb.cmd(&["show", &id.to_string()]).env("HUSE_DB", &url).output().map(common::Out).unwrap().expect(0).stdout();
    assert!(show.contains(log), "show names the log: {show}");
    // The fault goes away; the same command submits only the failed point.
    std::fs::remove_file(&flag).unwrap();
    let again = sb.cmd(&[f]).env("HUSE_DB", &url).output().map(common::Out).unwrap().expect(0).stdout();
    assert!(again.contains("submitted 1 run(s)"), "{again}");
    assert!(again.contains("3 succeeded"), "{again}");
    assert_eq!(pg_count(&url, "SELECT count(*) FROM runs"), 4, "3 runs and one retry");
}

#[test]
fn an_invalid_point_is_rejected_before_anything_is_submitted() {
    let Some(_) = services("invalid_point") else { return };
    let sb = Sandbox::new();
    let f = sb.write(
        "i.yaml",
        "name: invalid\nlauncher: { kind: slurm }\nstages:\n  source: { uses: toy-source }\n  \
         mid: { uses: toy-scale, needs: [source] }\nsweep:\n  mid.seconds: [0, -1]\n",
    );
    let err = sb.run(&[f.to_str().unwrap()]).expect(2).stderr();
    assert!(err.contains("seconds") && err.contains("must be >= 0"), "{err}");
    assert!(launches(&sb, "invalid").is_empty() && !sb.path().join(".huse/slurm").exists(), "nothing submitted");
    // A misspelt launcher key is an error at its line, before anything is submitted.
    let f =
        sb.write("k.yaml", "name: k\nlauncher: { kind: slurm, partitoin: x }\nstages:\n  s: { uses: toy-source }\n");
    let err = sb.run(&[f.to_str().unwrap()]).expect(2).stderr();
    assert!(err.contains("k.yaml:2:") && err.contains("partitoin"), "{err}");
    assert!(!sb.path().join(".huse/slurm").exists());
}

#[test]
fn ctrl_c_of_an_attached_launch_cancels_its_jobs() {
    let Some(pg) = services("ctrl_c") else { return };
    let url = fresh_pg(&pg, "cancel");
    let sb = Sandbox::new();
    let f = sb.write(
        "c.yaml",
        "name: cancel\nlauncher: { kind: slurm, parallelism: 1 }\nstages:\n  source: { uses: toy-source }\n  \
         mid: { uses: toy-scale, needs: [source], with: { seconds: 30 } }\nsweep:\n  mid.factor: [1, 2, 3]\n",
    );
    let f = f.to_str().unwrap();
    let child = sb
        .cmd(&[f])
        .env("HUSE_DB", &url)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Wait until the first task's run is in the database (it sleeps 30 s), then Ctrl-C.
    let t0 = Instant::now();
    while pg_count(&url, "SELECT count(*) FROM information_schema.tables WHERE table_name = 'runs'") == 0
        || pg_count(&url, "SELECT count(*) FROM runs") == 0
    {
        assert!(t0.elapsed() < Duration::from_secs(60), "no task started");
        std::thread::sleep(Duration::from_millis(200));
    }
    Command::new("kill").args(["-INT", &child.id().to_string()]).status().unwrap();
    let out = common::Out(child.wait_with_output().unwrap()).expect(130);
    assert!(out.stderr().contains("cancelling the launch's jobs"), "{}", out.stderr());
    let st = sb.cmd(&["status", f]).env("HUSE_DB", &url).output().map(common::Out).unwrap().expect(0).stdout();
    assert!(!st.contains("pending") && !st.contains("running"), "{st}");
    assert!(st.contains("3 cancelled") || st.contains("cancelled"), "{st}");
    // The task that was running stops (SLURM signals it) and nothing is left in the queue.
    let dirs = launches(&sb, "cancel");
    let launch: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dirs[0].join("launch.json")).unwrap()).unwrap();
    let array = launch["array"]["job_id"].as_str().unwrap().to_string();
    // A cancelled job may stay a moment in state CG (completing) while slurmd tears it down:
    // it must leave the queue within a few seconds.
    let t0 = Instant::now();
    loop {
        let q = Command::new("squeue").args(["-h", "-j", &array]).output().unwrap();
        let left = String::from_utf8_lossy(&q.stdout).trim().to_string();
        if left.is_empty() {
            break;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "still queued after 30 s: {left}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn eight_concurrent_processes_writing_one_postgres_lose_no_row() {
    let Some(pg) = services("eight_writers") else { return };
    let url = fresh_pg(&pg, "eight");
    let sb = Sandbox::new();
    common::eight_concurrent_writers(&sb, Some(&url));
    assert_eq!(pg_count(&url, "SELECT count(*) FROM runs WHERE status = 'succeeded'"), 8);
    assert_eq!(pg_count(&url, "SELECT count(*) FROM metrics"), 8 * 301);
    assert_eq!(pg_count(&url, "SELECT count(*) FROM stage_runs"), 16);
    assert_eq!(pg_count(&url, "SELECT count(*) FROM params WHERE key = 'mid.offset'"), 8);
    assert_eq!(pg_count(&url, "SELECT count(*) FROM experiments"), 1);
}

#[test]
fn db_copy_moves_runs_into_postgres_once_and_every_query_reads_both() {
    let Some(pg) = services("db_copy") else { return };
    let url = fresh_pg(&pg, "copy");
    let sb = common::known_runs();
    let out = sb.run(&["db", "copy", sb.db().to_str().unwrap(), &url]).expect(0).stdout();
    assert!(out.contains("copied 4 run(s)") && out.contains("0 already there"), "{out}");
    let out = sb.run(&["db", "copy", sb.db().to_str().unwrap(), &url]).expect(0).stdout();
    assert!(out.contains("copied 0 run(s)") && out.contains("4 already there"), "{out}");
    assert_eq!(pg_count(&url, "SELECT count(*) FROM runs"), 4);
    // Every row of every run arrives as it was, times, hosts and artifacts included.
    assert_eq!(dump(&Location::Sqlite(sb.db()), "q"), dump(&Location::Postgres(url.clone()), "q"));
    // Query commands print the same from both stores (ids are 1-4 in both).
    for args in [
        vec!["runs", "-f", "csv", "-m", "sum"],
        vec!["runs", "-f", "json", "-w", "mid.factor=2", "-w", "sum>12"],
        vec!["runs", "--group", "-f", "csv"],
        vec!["show", "3", "-f", "json"],
        vec!["compare", "1", "4", "-f", "csv"],
        vec!["best", "-m", "sum", "-f", "csv"],
        vec!["export", "-f", "csv"],
    ] {
        let a = sb.run(&args).expect(0).stdout();
        let mut with_pg = vec!["--db", url.as_str()];
        with_pg.extend(args.iter().copied());
        let b = sb.run(&with_pg).expect(0).stdout();
        assert_eq!(a, b, "{args:?}");
    }
    // The results app answers the same from both stores, page for page.
    let (_a, on_sqlite) = common::start_ui(&sb, &[]);
    let (_b, on_pg) = common::start_ui(&sb, &["--db", url.as_str()]);
    for path in [
        "/".to_string(),
        "/exp/q?sort=sum&desc=1".to_string(),
        format!("/exp/q?q={}", common::enc("mid.offset in (1) or (sum < 7 and not state = failed)")),
        "/exp/q?group=1&all=1".to_string(),
        "/exp/q?format=csv&col=id&col=sum&col=mean".to_string(),
        "/run/3".to_string(),
        "/compare?ids=1,4&all=1".to_string(),
        "/exp/q?format=csv&cols=id,loss&value=max".to_string(),
        format!("/exp/q?value=min&q={}", common::enc("loss < 0.5")),
        "/api/curves?exp=q&ids=1,2,3,4&group=1".to_string(),
        "/api/curves?exp=q&ids=4,1&key=loss".to_string(),
        "/exp/nope".to_string(),
        format!("/exp/q?q={}", common::enc("sum >")),
    ] {
        let a = common::get(&on_sqlite, &path);
        let b = common::get(&on_pg, &path);
        assert_eq!(a, b, "{path}");
        assert!(a.0 == 200 || path.contains("nope") || path.contains("%3E"), "{path}: {}", a.0);
    }
    common::check_app_endpoints(&on_pg);
    let a = sb.run(&["report", "q", "--out", "rep-sqlite"]).expect(0);
    let b = sb.run(&["--db", &url, "report", "q", "--out", "rep-pg"]).expect(0);
    let _ = (a, b);
    let page = std::fs::read_to_string(sb.path().join("rep-pg/index.html")).unwrap();
    assert!(page.contains("q@mid.factor=2,mid.offset=1"), "the report lists the runs");
    // A password never shows: the location is printed with it hidden.
    let err = sb.run(&["--db", "postgres://u:secret@127.0.0.1:1/x", "runs"]).expect(1).stderr();
    assert!(!err.contains("secret") && err.contains("u:***@"), "{err}");
    // The app in a browser over PostgreSQL: charts, brushing, compare, a run recorded while open.
    common::drive_the_app_in_chromium(&sb, &on_pg, &["--db", url.as_str()]);
}

/// A TCP proxy on 127.0.0.1 in front of `target` that can be cut, as when the server goes
/// down: its port closes (new connections are refused) and every connection through it is
/// dropped; restored, it listens on the same port again.
struct Proxy {
    port: u16,
    up: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Proxy {
    fn start(target: std::net::SocketAddr) -> Proxy {
        use std::sync::atomic::Ordering;
        let first = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        let up = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
        let flag = up.clone();
        std::thread::spawn(move || {
            let mut listener = Some(first);
            loop {
                if !flag.load(Ordering::SeqCst) {
                    listener = None; // the port closes: connecting is refused
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let l = match &listener {
                    Some(l) => l,
                    None => match std::net::TcpListener::bind(("127.0.0.1", port)) {
                        Ok(l) => {
                            l.set_nonblocking(true).unwrap();
                            listener.insert(l)
                        }
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    },
                };
                l.set_nonblocking(true).unwrap();
                let client = match l.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                client.set_nonblocking(false).unwrap();
                let Ok(server) = std::net::TcpStream::connect(target) else { continue };
                for (mut from, mut to) in [(client.try_clone().unwrap(), server.try_clone().unwrap()), (server, client)]
                {
                    let flag = flag.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        from.set_read_timeout(Some(Duration::from_millis(100))).unwrap();
                        let mut buf = [0u8; 16384];
                        loop {
                            if !flag.load(Ordering::SeqCst) {
                                let _ = from.shutdown(std::net::Shutdown::Both);
                                let _ = to.shutdown(std::net::Shutdown::Both);
                                return;
                            }
                            match from.read(&mut buf) {
                                Ok(0) => {
                                    let _ = to.shutdown(std::net::Shutdown::Write);
                                    return;
                                }
                                Ok(n) => {
                                    if to.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                                Err(e)
                                    if matches!(
                                        e.kind(),
                                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                                    ) => {}
                                Err(_) => return,
                            }
                        }
                    });
                }
            }
        });
        Proxy { port, up }
    }

    fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
    }

    /// Listens again; returns once the port accepts.
    fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
        let t0 = std::time::Instant::now();
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(t0.elapsed() < Duration::from_secs(10), "the proxy does not listen again");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

#[test]
fn a_postgres_outage_spools_at_once_and_the_pipeline_goes_on() {
    let Some(pg) = services("pg_outage") else { return };
    let url = fresh_pg(&pg, "outage");
    let target: std::net::SocketAddr = {
        let hostport = url.split('@').nth(1).unwrap().split('/').next().unwrap();
        std::net::ToSocketAddrs::to_socket_addrs(hostport).unwrap().next().unwrap()
    };
    let proxy = Proxy::start(target);
    let via = url.replacen(&format!(":{}/", target.port()), &format!(":{}/", proxy.port), 1);
    let sb = Sandbox::new();
    // 4 stages, ~4 s of work in all; the server goes away once the run is recorded.
    let f = sb.write(
        "o.yaml",
        "name: o\nstages:\n  source: { uses: toy-source, with: { count: 4 } }\n  \
         a: { uses: toy-scale, needs: [source], with: { seconds: 1.5, metrics: 50 } }\n  \
         b: { uses: toy-scale, needs: [source], with: { seconds: 1.5, metrics: 50, factor: 2.0 } }\n  total: { uses: toy-sum, needs: [b] }\n",
    );
    let t0 = std::time::Instant::now();
    let mut child = sb
        .cmd(&[f.to_str().unwrap(), "-j", "1"])
        .env("HUSE_DB", &via)
        .env("HUSE_DB_RETRY", "2")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let recorded = || {
        use sqlx::{Connection, Row};
        rt().block_on(async {
            let mut c = sqlx::PgConnection::connect(&url).await.ok()?;
            sqlx::query("SELECT count(*) FROM runs").fetch_one(&mut c).await.ok().map(|r| r.get::<i64, _>(0))
        })
        .unwrap_or(0)
    };
    while recorded() == 0 {
        if let Ok(Some(_)) = child.try_wait() {
            panic!(
                "the run ended before it was recorded:\n{}",
                common::Out(child.wait_with_output().unwrap()).stderr()
            );
        }
        assert!(t0.elapsed() < Duration::from_secs(60), "the run was never recorded");
        std::thread::sleep(Duration::from_millis(50));
    }
    proxy.cut();
    let out = common::Out(child.wait_with_output().unwrap());
    let took = t0.elapsed();
    assert_eq!(out.code(), 1, "results not written fail the invocation:\n{}", out.stderr());
    assert!(out.stderr().contains("huse-run db replay"), "{}", out.stderr());
    // Seconds, not a minute per write: every stage ran while the server was away.
    assert!(took < Duration::from_secs(40), "the run took {took:?} with the server down");
    // Back up: a query says records wait (the cache's spool of this server), and the replay
    // writes every row, once.
    proxy.restore();
    let q = sb.run(&["--db", &via, "runs"]).expect(0);
    assert!(q.stderr().contains("spooled and not yet in"), "{}", q.stderr());
    sb.run(&["--db", &via, "db", "replay"]).expect(0);
    assert_eq!(pg_count(&url, "SELECT count(*) FROM stage_runs"), 4);
    assert_eq!(pg_count(&url, "SELECT count(*) FROM metrics WHERE stage IN ('a', 'b') AND key = 'loss'"), 100);
    assert_eq!(pg_count(&url, "SELECT count(*) FROM runs WHERE status = 'succeeded'"), 1);
}
