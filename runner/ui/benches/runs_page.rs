//! The results app's runs table at scale: an experiment of `BENCH_UI_RUNS` runs (default
//! 100,000) x `BENCH_UI_METRICS` final metrics (default 80) and 3 params, written through the
//! store, then the page `/exp/bench` (default view: varying params, headline metrics, first
//! 100 rows) and a filtered, sorted view asked `BENCH_UI_REPEAT` times (default 20) each;
//! prints the time to write, the 50th and 95th percentile answer times and the page's size.
//!
//! `cargo bench -p huse-ui --bench runs_page --profile dev` (SQLite in a temporary folder), or
//! `BENCH_UI_DB=postgres://...` for a PostgreSQL database, or a file path to keep the SQLite file: the
//! bench writes the runs a database lacks, so a second bench on it measures at once. The target is 300 ms at the 95th percentile on 2 cores, on both backends.

use std::time::Instant;

use axum::body::Body;
use axum::http::Request;
use huse_store::{Location, MetricRow, Options, Run, RunStatus, Store};
use tower::ServiceExt;

fn env(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let (runs, metrics, repeat) =
        (env("BENCH_UI_RUNS", 100_000), env("BENCH_UI_METRICS", 80), env("BENCH_UI_REPEAT", 20));
    let dir = tempfile::tempdir()?;
    let location = match std::env::var("BENCH_UI_DB") {
        Ok(url) => url.parse().map_err(anyhow::Error::msg)?,
        Err(_) => Location::Sqlite(dir.path().join("bench.sqlite")),
    };
    let store = Store::open(&location, Options::default()).await?;
    let t0 = Instant::now();
    let exp = store.experiment("bench", "bench.yaml").await?;
    // A database that has the runs already (BENCH_UI_DB from an earlier run) is measured as it is.
    let have = store
        .runs_slice(&huse_store::Slice {
            experiment: Some("bench".into()),
            keys: Some(Vec::new()),
            ..Default::default()
        })
        .await?
        .len();
    let mut rows = Vec::with_capacity(metrics * 1000);
    for i in have..runs {
        let (beta, gamma, seed) = ((i % 11) as f64 / 10.0, ((i / 11) % 11) as f64 / 10.0, (i / 121) as u64);
        let run = Run::starting(
            "bench",
            &format!("bench@train.beta={beta},train.gamma={gamma}/seed={seed}"),
            "",
            seed,
            "cpu",
        );
        let params = [
            ("train.beta".to_string(), serde_json::json!(beta)),
            ("train.gamma".to_string(), serde_json::json!(gamma)),
            ("seed".to_string(), serde_json::json!(seed)),
        ];
        let id = store.insert_run(exp, &run, "name: bench\n", &params).await?;
        for m in 0..metrics {
            let key = if m == 0 { "test.acc.both".to_string() } else { format!("test.m{m}") };
            let value = ((i * 31 + m * 17) % 1000) as f64 / 1000.0;
            rows.push(MetricRow { run_id: id, stage: "evaluate".into(), key, step: 0, value });
        }
        if rows.len() >= metrics * 1000 || i + 1 == runs {
            store.insert_metrics(&rows).await?;
            rows.clear();
        }
        store.finish_run(id, RunStatus::Succeeded, None).await?;
        if (i + 1) % 10_000 == 0 {
            eprintln!("  {} runs written in {:.0} s", i + 1, t0.elapsed().as_secs_f64());
        }
    }
    let written = t0.elapsed().as_secs_f64();
    // What the query commands read and build for the same experiment (skipped when large: it
    // reads every final metric of every run).
    if runs <= 20_000 {
        let t = Instant::now();
        let loaded =
            store.load_runs(&huse_store::Filter { experiment: Some("bench".into()), ..Default::default() }).await?;
        let load_ms = t.elapsed().as_secs_f64() * 1000.0;
        let t = Instant::now();
        let table = huse_report::table::runs_table(&loaded, &[], false);
        let table_ms = t.elapsed().as_secs_f64() * 1000.0;
        drop(loaded);
        println!(
            "for comparison, what `huse-run runs` reads and builds: load_runs {load_ms:.0} ms, runs_table {table_ms:.0} ms ({} columns)",
            table.headers.len()
        );
    }
    let settings = huse_ui::Settings { headline: vec!["test.acc.both".into()], ..Default::default() };
    let app = huse_ui::app(store.clone(), settings);
    println!("{runs} runs x {metrics} metrics on {location}: written in {written:.1} s");
    let get = |path: String| {
        let app = app.clone();
        async move {
            let t = Instant::now();
            let resp = app.oneshot(Request::get(&path).body(Body::empty())?).await?;
            let status = resp.status();
            let body = axum::body::to_bytes(resp.into_body(), usize::MAX).await?;
            anyhow::ensure!(status == 200, "{path}: {status}");
            anyhow::Ok((t.elapsed().as_secs_f64() * 1000.0, body.len()))
        }
    };
    // The first request reads every run and the metrics the page shows into the app's memory.
    let (cold, _) = get("/exp/bench".into()).await?;
    println!("first request (the app reads the database into memory): {cold:.0} ms");
    let report = |what: &str, mut times: Vec<f64>, bytes: usize| {
        times.sort_by(f64::total_cmp);
        let pct = |p: f64| times[((times.len() as f64 * p).ceil() as usize).clamp(1, times.len()) - 1];
        println!(
            "{what}\n  p50 {:.0} ms, p95 {:.0} ms over {} requests; page {:.0} KB",
            pct(0.5),
            pct(0.95),
            times.len(),
            bytes as f64 / 1024.0
        );
    };
    let filtered = "/exp/bench?q=test.acc.both+%3E+0.5+and+train.beta+in+(0,0.5)&sort=test.acc.both&desc=1";
    for path in ["/exp/bench", filtered] {
        let mut times = Vec::new();
        let mut bytes = 0;
        for _ in 0..repeat {
            let (ms, b) = get(path.to_string()).await?;
            times.push(ms);
            bytes = b;
        }
        report(path, times, bytes);
    }
    // As while a sweep runs: before each request a new run is recorded with its metrics.
    let mut times = Vec::new();
    let mut bytes = 0;
    for k in 0..repeat {
        let run = Run::starting("bench", &format!("bench@live/seed={k}"), "", k as u64, "cpu");
        let id = store.insert_run(exp, &run, "name: bench\n", &[]).await?;
        let rows: Vec<MetricRow> = (0..metrics)
            .map(|m| MetricRow { run_id: id, stage: "evaluate".into(), key: format!("test.m{m}"), step: 0, value: 0.5 })
            .collect();
        store.insert_metrics(&rows).await?;
        store.finish_run(id, RunStatus::Succeeded, None).await?;
        let (ms, b) = get(filtered.to_string()).await?;
        times.push(ms);
        bytes = b;
    }
    report(&format!("{filtered}, a run recorded before each request"), times, bytes);
    Ok(())
}
