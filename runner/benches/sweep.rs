//! Sweep throughput: how many runs an hour one machine finishes when a sweep's trainings
//! share its cores, for `--jobs 1` (every thread to one job), `--jobs 2` (half each) and the
//! automatic setting (no `--jobs`, no `--threads-per-job`), each on the same cached features.
//!
//! `cargo bench -p huse-run --bench sweep --profile dev` with `HUSE_ASSETS` set and
//! `HUSE_CACHE` naming a cache that already holds the experiment's ingest, graph and encode
//! outputs (run the experiment once first, e.g. with `--set train.epochs=1`). The train and
//! evaluate stages are forced every time (`--force`), so each setting computes all of them.
//! `BENCH_SWEEP_EXPERIMENT` (default `experiments/ablation.yaml`: 4 points x 3 seeds),
//! `BENCH_SWEEP_EPOCHS` (default 2).
//!
//! `BENCH_SWEEP_GPU=cuda:N` (a `--features cuda` build on a GPU machine) times the same sweep
//! on that GPU with `--gpu-slots 1` and `--gpu-slots 4` instead (`--jobs` = CPUs, so the slots
//! are the limit), and prints the speed-up of 4 slots over 1.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

fn main() -> anyhow::Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let exp = std::env::var("BENCH_SWEEP_EXPERIMENT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("experiments/ablation.yaml"));
    let epochs = std::env::var("BENCH_SWEEP_EPOCHS").unwrap_or_else(|_| "2".into());
    let cache = std::env::var("HUSE_CACHE")
        .map_err(|_| anyhow::anyhow!("set HUSE_CACHE to a cache holding the experiment's encode output"))?;
    let cpus = std::thread::available_parallelism()?.get();
    let db = tempfile::tempdir()?;
    let bin = env!("CARGO_BIN_EXE_huse-run");
    println!("sweep benchmark: {} at {epochs} epoch(s), {cpus} CPUs, cache {cache}", exp.display());
    let gpu = std::env::var("BENCH_SWEEP_GPU").ok();
    let settings: Vec<(&str, Vec<String>)> = match &gpu {
        None => vec![
            ("--jobs 1", vec!["--jobs".into(), "1".into()]),
            ("--jobs 2", vec!["--jobs".into(), "2".into()]),
            ("automatic", vec![]),
        ],
        Some(d) => {
            let on = |slots: &str| {
                vec![
                    "--set".into(),
                    format!("device={d}"),
                    "--gpu-slots".into(),
                    slots.into(),
                    "--jobs".into(),
                    cpus.to_string(),
                ]
            };
            vec![("1 slot", on("1")), ("4 slots", on("4"))]
        }
    };
    let mut results = Vec::new();
    for (name, extra) in settings {
        let dbf = db.path().join(format!("{}.sqlite", results.len()));
        let t = Instant::now();
        let out = Command::new(bin)
            .arg(&exp)
            .args([
                "--set",
                &format!("train.epochs={epochs}"),
                "--force",
                "train",
                "--force",
                "evaluate",
                "--cache",
                &cache,
            ])
            .arg("--db")
            .arg(&dbf)
            .args(&extra)
            .output()?;
        let secs = t.elapsed().as_secs_f64();
        let log = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(out.status.success(), "{name}: huse-run failed:\n{log}");
        let trained = log.lines().filter(|l| l.contains(": running train (")).count();
        anyhow::ensure!(
            !log.contains("running encode"),
            "{name}: the encode stage was not cached; run the experiment once first"
        );
        let threads: Vec<&str> = log
            .lines()
            .filter(|l| l.contains(": running train ("))
            .filter_map(|l| l.split(", ").nth(1)?.split(')').next())
            .collect();
        let runs = 3600.0 * trained as f64 / secs;
        println!(
            "{name:>10}: {trained} trainings (+ evaluations) in {secs:7.1} s = {runs:6.1} runs/hour; train budgets: {}",
            threads.first().copied().unwrap_or("?")
        );
        results.push((name, runs));
    }
    if gpu.is_some() {
        println!("4 slots / 1 slot: {:.2}x", results[1].1 / results[0].1);
        return Ok(());
    }
    let best = results[..2].iter().map(|r| r.1).fold(0.0, f64::max);
    let auto = results[2].1;
    println!(
        "automatic / best manual: {:.3} ({})",
        auto / best,
        if auto >= 0.95 * best { "within 5%" } else { "more than 5% slower" }
    );
    Ok(())
}
