//! Train-step throughput, ours beside PyTorch's identical model (same dims, dropout, the
//! three losses, AdamW, batch 1024) on the same features, in one run:
//! `cargo bench -p huse-model --bench train --profile dev` (or plain `cargo bench`).
//!
//! Features: `BENCH_ENCODE_DIR` = an encode stage output directory (cache entry) for real
//! features; otherwise deterministic pseudo-random features of the same shape. The PyTorch
//! side runs `benches/torch_train.py` with `$HUSE_TORCH_PYTHON` (default `python3`).
//! `BENCH_STEPS` (default 20), `BENCH_THREADS` (default: all CPUs), `BENCH_DEVICE` (`cpu`,
//! default, or `cuda:N` for a `--features cuda` build; PyTorch then runs on the same GPU).
//!
//! `BENCH_DELTA=0.5` adds the contrastive term (weight 0.5) to our side only: its cost is this
//! run's figure against one without it (`BENCH_SCALING=2` times ours alone).
//!
//! `BENCH_SCALING=1,2` (any list of thread counts) measures our side only, at each count in
//! turn step after step (one pool per count, the same model and batches), and prints each
//! count's median and fastest step and its speed-up over the first count. Interleaved, every
//! count sees the same neighbours: a burst on a shared machine slows the steps of all counts
//! alike instead of one whole run, so the ratio is steadier than from separate runs. Each
//! round also times a compute-only loop (as long as a step at the first count, split evenly) at each
//! count: the speed-up this machine gives perfectly parallel arithmetic at that moment, the
//! ceiling the step's speed-up is printed against (a shared VM's second core is often not a
//! whole one).

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use candle_core::{Device, Tensor};
use huse_data::Artifact;
use huse_model::data::Sparse;
use huse_model::loss::{self, LossConfig};
use huse_model::model::{Huse, HuseConfig, Shape};
use huse_model::optim::{Optimizer, OptimizerConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

fn env_usize(k: &str, d: usize) -> usize {
    std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d)
}

fn main() -> anyhow::Result<()> {
    // As huse-run's main does: candle's own element-wise thread pool stays at one thread
    // unless CANDLE_NUM_THREADS is set, and freed memory stays in the process, so the figures
    // are the tool's.
    // SAFETY: no other thread exists yet.
    unsafe { huse_cpu::setup_process() };
    let threads = env_usize("BENCH_THREADS", std::thread::available_parallelism()?.get());
    let scaling = match std::env::var("BENCH_SCALING") {
        Ok(list) => list
            .split(',')
            .map(|c| c.trim().parse::<usize>().ok().filter(|&c| c > 0))
            .collect::<Option<Vec<_>>>()
            .filter(|c| !c.is_empty())
            .ok_or_else(|| anyhow::anyhow!("BENCH_SCALING: thread counts like `1,2`, not `{list}`"))?,
        Err(_) => Vec::new(),
    };
    if !scaling.is_empty() {
        return bench(threads, &scaling);
    }
    // Our side runs in a pool of that many threads, as a stage runs in its thread budget.
    rayon::ThreadPoolBuilder::new().num_threads(threads).build()?.install(|| bench(threads, &[]))
}

/// The median over rounds of `first[i] / other[i]`.
fn paired_ratio(first: &[f64], other: &[f64]) -> f64 {
    let mut r: Vec<f64> = first.iter().zip(other).map(|(a, b)| a / b).collect();
    r.sort_by(f64::total_cmp);
    r[r.len() / 2]
}

/// `n` rounds of a multiply-add on 64 independent lanes: arithmetic only.
#[inline(never)]
fn compute_only(n: usize, seed: f32) -> f32 {
    let mut acc = [seed; 64];
    for _ in 0..n {
        for a in acc.iter_mut() {
            *a = *a * 0.999_999 + 1e-7;
        }
    }
    acc.iter().sum()
}

/// The step timings of one thread count: (median, fastest) in samples/s.
fn rates(batch: usize, step_s: &mut [f64]) -> (f64, f64) {
    step_s.sort_by(f64::total_cmp);
    (batch as f64 / step_s[step_s.len() / 2], batch as f64 / step_s[0])
}

fn bench(threads: usize, scaling: &[usize]) -> anyhow::Result<()> {
    let steps = env_usize("BENCH_STEPS", 20);
    anyhow::ensure!(steps > 0, "BENCH_STEPS: at least 1 step to time");
    let (batch, classes) = (1024usize, 86usize);
    // Features: real ones from an encode output, or pseudo-random of the same shape.
    let n_max = env_usize("BENCH_ROWS", 8192);
    let (image, text, csr, n, di, dt, v, source) = match std::env::var("BENCH_ENCODE_DIR") {
        Ok(dir) => {
            let dir = PathBuf::from(dir);
            let im =
                candle_core::safetensors::load(dir.join(Artifact::ImageFeatures), &Device::Cpu)?["features"].clone();
            let tx = candle_core::safetensors::load(dir.join(Artifact::TextFeatures), &Device::Cpu)?["bert"].clone();
            let tf = candle_core::safetensors::load(dir.join(Artifact::Tfidf), &Device::Cpu)?;
            let vocab: serde_json::Value = serde_json::from_slice(&std::fs::read(dir.join(Artifact::TfidfVocab))?)?;
            let v = vocab["terms"].as_array().map(Vec::len).unwrap_or(0);
            let n = im.dim(0)?.min(n_max);
            let (im, tx) = (im.narrow(0, 0, n)?, tx.narrow(0, 0, n)?);
            let (di, dt) = (im.dim(1)?, tx.dim(1)?);
            let csr = (tf["indptr"].to_vec1::<i64>()?, tf["indices"].to_vec1::<u32>()?, tf["values"].to_vec1::<f32>()?);
            (
                im.flatten_all()?.to_vec1::<f32>()?,
                tx.flatten_all()?.to_vec1::<f32>()?,
                csr,
                n,
                di,
                dt,
                v,
                format!("real features from {}", dir.display()),
            )
        }
        Err(_) => {
            let (n, di, dt, v) = (n_max, 1280, 1536, 4096);
            let mut r = ChaCha8Rng::seed_from_u64(1);
            let im: Vec<f32> = (0..n * di).map(|_| r.random::<f32>()).collect();
            let tx: Vec<f32> = (0..n * dt).map(|_| r.random::<f32>() - 0.5).collect();
            let (mut indptr, mut idx, mut vals) = (vec![0i64], Vec::new(), Vec::new());
            for _ in 0..n {
                for _ in 0..6 {
                    idx.push(r.random_range(0..v as u32));
                    vals.push(0.4f32);
                }
                indptr.push(idx.len() as i64);
            }
            (
                im,
                tx,
                (indptr, idx, vals),
                n,
                di,
                dt,
                v,
                "pseudo-random features (set BENCH_ENCODE_DIR for real ones)".to_string(),
            )
        }
    };
    let cfg = HuseConfig { image_input: di, text_input: dt + v, classes, shape: Shape::default() };
    let spec = std::env::var("BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dev = match spec.as_str() {
        "cpu" => Device::Cpu,
        d => Device::new_cuda(
            d.strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("BENCH_DEVICE: cpu or cuda:N, not {d}"))?,
        )?,
    };
    if !dev.is_cpu() {
        dev.set_seed(0)?; // dropout masks are drawn on the GPU
    }
    // All features live on the device; a step takes a slice of them, as PyTorch's side does.
    let (image_all, text_all) = (Tensor::from_slice(&image, (n, di), &dev)?, Tensor::from_slice(&text, (n, dt), &dev)?);
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let model = Huse::new(&cfg, &mut rng, &dev)?;
    let mut opt = Optimizer::new(
        model.vars(),
        OptimizerConfig::Adamw { lr: 1e-3, beta1: 0.9, beta2: 0.999, eps: 1e-8, weight_decay: 0.01 },
    )?;
    let labels: Vec<u32> = (0..n).map(|_| rng.random_range(0..classes as u32)).collect();
    let a: Vec<f32> =
        (0..classes * classes).map(|i| if i / classes == i % classes { 0.0 } else { rng.random::<f32>() }).collect();
    let a = Tensor::from_vec(a, (classes, classes), &dev)?;
    // BENCH_DELTA: the contrastive term's weight (default 0, the paper's three losses); the
    // PyTorch side has no such term, so compare a delta against delta 0 on our side.
    let delta: f64 = std::env::var("BENCH_DELTA").ok().and_then(|v| v.parse().ok()).unwrap_or(0.0);
    let lcfg = LossConfig { delta, ..LossConfig::default() };
    let sparse = |start: usize| -> anyhow::Result<Sparse> {
        let rows: Vec<usize> = (start..start + batch).collect();
        Sparse::from_csr_rows((&csr.0, &csr.1, &csr.2), v, &rows, dt, &dev)
    };
    let mut step = |s: usize, rng: &mut ChaCha8Rng| -> anyhow::Result<()> {
        let start = (s * batch) % (n - batch);
        let (xi, xt) = (image_all.narrow(0, start, batch)?, text_all.narrow(0, start, batch)?);
        let sp = sparse(start)?;
        let y = Tensor::from_slice(&labels[start..start + batch], batch, &dev)?;
        // Each tower one op (CPU), as in the train stage.
        let _chain = huse_model::fused::chain_towers();
        let (pi, pt) = model.embed_pair(&xi, &xt, Some(&sp), Some((0.15, rng)))?;
        let l = loss::total(&pi, &pt, &model.logits(&pi)?, &model.logits(&pt)?, &y, &a, &lcfg)?;
        opt.step(&huse_model::fused::backward(&l.total)?)?;
        Ok(())
    };
    if !scaling.is_empty() {
        // One pool per thread count, each warmed up; then step by step in turn. After each
        // round's steps, the machine's own ceiling measured the same way: a compute-only loop
        // (no memory traffic, no synchronisation inside) about as long as one step at the first
        // count (1 thread in `1,2`), split evenly over each count's pool, the counts taking turns.
        let pools = scaling
            .iter()
            .map(|&c| rayon::ThreadPoolBuilder::new().num_threads(c).build())
            .collect::<Result<Vec<_>, _>>()?;
        let (mut times, mut turns) =
            (vec![Vec::with_capacity(steps); pools.len()], vec![Vec::with_capacity(steps); pools.len()]);
        let mut loop_len = 0;
        for s in 0..3 + steps {
            let mut round = Vec::with_capacity(pools.len());
            for pool in &pools {
                let ts = Instant::now();
                pool.install(|| step(s, &mut rng))?;
                if !dev.is_cpu() {
                    dev.synchronize()?;
                }
                round.push(ts.elapsed().as_secs_f64());
            }
            if s < 3 {
                // Warm-up: the loop's length is sized to the first count's (last warm-up) step.
                let ts = Instant::now();
                std::hint::black_box(compute_only(1_000_000, 1.0));
                loop_len = (1e6 * round[0] / ts.elapsed().as_secs_f64().max(1e-9)) as usize;
                continue;
            }
            times.iter_mut().zip(round).for_each(|(t, r)| t.push(r));
            for ((pool, &c), t) in pools.iter().zip(scaling).zip(&mut turns) {
                let ts = Instant::now();
                std::hint::black_box(
                    pool.install(|| (0..c).into_par_iter().map(|j| compute_only(loop_len / c, j as f32)).sum::<f32>()),
                );
                t.push(ts.elapsed().as_secs_f64());
            }
        }
        println!(
            "HUSE train step, batch {batch}, {di}/{dt}+{v} inputs, {classes} classes, ours only, thread counts {scaling:?} step after step ({steps} steps each)"
        );
        // Paired: each round's step at the first count over the same round's step at this one
        // (adjacent in time, so the same neighbours), the median of those ratios.
        let paired: Vec<f64> = times.iter().map(|t| paired_ratio(&times[0], t)).collect();
        let rate: Vec<(f64, f64)> = times.iter_mut().map(|t| rates(batch, t)).collect();
        let (first_median, first_best) = rate[0];
        for ((c, &(median, best)), &paired) in scaling.iter().zip(&rate).zip(&paired) {
            println!(
                "{c:>3} threads: median step {median:.0} samples/s, fastest {best:.0}; speed-up over {} thread(s): {paired:.2}x paired (median of the rounds' ratios), {:.2}x median, {:.2}x fastest",
                scaling[0],
                median / first_median,
                best / first_best
            );
        }
        for ((c, t), step) in scaling.iter().zip(&turns).zip(&paired).skip(1) {
            let ceiling = paired_ratio(&turns[0], t);
            println!(
                "{c:>3} threads: a compute-only loop as long as a step, in the same rounds: {ceiling:.2}x paired (this machine's ceiling); the step's speed-up is {:.0}% of it",
                100.0 * step / ceiling
            );
        }
        return Ok(());
    }
    for s in 0..3 {
        step(s, &mut rng)?;
    }
    let t = Instant::now();
    // Each step's time too: the median step is what a busy neighbour disturbs least.
    let mut step_s = Vec::with_capacity(steps);
    for s in 3..3 + steps {
        let ts = Instant::now();
        step(s, &mut rng)?;
        if !dev.is_cpu() {
            dev.synchronize()?;
        }
        step_s.push(ts.elapsed().as_secs_f64());
    }
    dev.synchronize()?;
    let ours = (steps * batch) as f64 / t.elapsed().as_secs_f64();
    let (ours_median, ours_best) = rates(batch, &mut step_s);

    // PyTorch on the same features.
    let dir = tempfile::tempdir()?;
    let (fi, ft) = (dir.path().join("image.f32"), dir.path().join("text.f32"));
    std::fs::write(&fi, image.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>())?;
    // PyTorch gets the text input dense: [BERT | TF-IDF] per row.
    let mut dense = Vec::with_capacity(n * (dt + v) * 4);
    for row in 0..n {
        let mut tf = vec![0f32; v];
        for k in csr.0[row] as usize..csr.0[row + 1] as usize {
            tf[csr.1[k] as usize] = csr.2[k];
        }
        for x in text[row * dt..(row + 1) * dt].iter().chain(&tf) {
            dense.extend_from_slice(&x.to_le_bytes());
        }
    }
    std::fs::write(&ft, dense)?;
    let python = std::env::var("HUSE_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    // Where it was built, else (a binary carried to another machine, run from a checkout's root) here.
    let script = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/torch_train.py"),
        PathBuf::from("stages/lib/model/benches/torch_train.py"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("stages/lib/model/benches/torch_train.py"));
    let args = serde_json::json!({"device": if dev.is_cpu() { "cpu".to_string() } else { spec.to_string() }, "threads": threads, "rows": n, "image_dim": di, "text_dim": dt + v, "classes": classes,
        "image_file": fi, "text_file": ft, "batch": batch, "steps": steps});
    let out = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(args.to_string().as_bytes())?;
            c.wait_with_output()
        });
    let torch: Option<serde_json::Value> = match out {
        Ok(o) if o.status.success() => serde_json::from_slice(o.stdout.trim_ascii()).ok(),
        Ok(o) => {
            eprintln!("PyTorch side failed ({}); set HUSE_TORCH_PYTHON to a Python with torch", o.status);
            None
        }
        Err(e) => {
            eprintln!("PyTorch side not run ({python}: {e})");
            None
        }
    };
    println!(
        "HUSE train step, batch {batch}, image {di} -> 5x512 -> 512, text {dt}+{v} (BERT + TF-IDF) -> 2x512 -> 512, {classes} classes, AdamW, 3 losses, {}",
        if dev.is_cpu() { format!("{threads} threads") } else { spec.to_string() }
    );
    println!("features: {source}");
    println!("huse-run median step: {ours_median:.0} samples/s, fastest step: {ours_best:.0} samples/s");
    match torch.as_ref().and_then(|j| j["samples_per_s"].as_f64()) {
        Some(t) => println!("samples/s  huse-run {ours:.0}   PyTorch {t:.0}   ratio {:.2}x", ours / t),
        None => println!("samples/s  huse-run {ours:.0}   PyTorch -"),
    }
    Ok(())
}
