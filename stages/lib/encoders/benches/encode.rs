//! Encode throughput, ours beside PyTorch's, measured in one run on the same machine,
//! files and texts: `cargo bench -p huse-encoders --bench encode`.
//!
//! Needs `HUSE_ASSETS`; the PyTorch side runs `benches/torch_encode.py` with
//! `$HUSE_TORCH_PYTHON` (default `python3`; it needs torch, torchvision and transformers)
//! and is skipped, with a note, when that fails. `BENCH_IMAGES` / `BENCH_TEXTS` set the
//! sample sizes (default 512 / 4096), `BENCH_THREADS` the threads (default: all CPUs), `BENCH_TEXT_BATCH` the text batch (default 256,
//! the encode stage's default; the same batch is given to PyTorch). `BENCH_DEVICE=cuda:N` (a
//! `--features cuda` build) runs both models on that GPU, PyTorch's on the same one: JPEG
//! decode + resize stay on `BENCH_THREADS` CPU threads on both sides (ours: the rayon pool,
//! one batch ahead of the GPU, as the encode stage does; PyTorch: a DataLoader with as many
//! workers), and each batch's pooled features come back to the host.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use candle_core::Device;
use huse_encoders::mobilenet_v2::MobileNetV2;
use huse_encoders::text::TextEncoder;
use huse_encoders::{image_prep, torch_pth};
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
    let assets = PathBuf::from(std::env::var("HUSE_ASSETS").map_err(|_| anyhow::anyhow!("set HUSE_ASSETS"))?);
    let data = assets.join("data/fashion-product-images-small");
    let (n_img, n_txt) = (env_usize("BENCH_IMAGES", 512), env_usize("BENCH_TEXTS", 4096));
    let threads = env_usize("BENCH_THREADS", std::thread::available_parallelism()?.get());
    let (size, batch) = (224, 32);
    let text_batch = env_usize("BENCH_TEXT_BATCH", 256);
    let mut rdr = csv::Reader::from_path(data.join("styles.csv"))?;
    let rows: Vec<(String, String)> = rdr
        .records()
        .take(n_img.max(n_txt))
        .map(|r| r.map(|r| (r[0].to_string(), r[6].to_string())))
        .collect::<Result<_, _>>()?;
    let images: Vec<PathBuf> = rows.iter().take(n_img).map(|(id, _)| data.join(format!("images/{id}.jpg"))).collect();
    let texts: Vec<String> = rows.iter().take(n_txt).map(|(_, t)| t.clone()).collect();
    let ckpt = assets.join("torch/hub/checkpoints/mobilenet_v2-b0353104.pth");
    let model_dir = assets.join("models/all-MiniLM-L6-v2");

    let spec = std::env::var("BENCH_DEVICE").unwrap_or_else(|_| "cpu".into());
    let dev = match spec.as_str() {
        "cpu" => Device::Cpu,
        d => Device::new_cuda(
            d.strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| anyhow::anyhow!("BENCH_DEVICE: cpu or cuda:N, not {d}"))?,
        )?,
    };

    // Ours: the encode stage's path (parallel decode + resize, fast CPU MobileNetV2).
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().ok();
    let model = MobileNetV2::load(&torch_pth::load(&ckpt)?)?;

    let prep = |chunk: &[PathBuf]| -> anyhow::Result<candle_core::Tensor> {
        let v: Vec<Vec<f32>> =
            chunk.par_iter().map(|p| image_prep::preprocess_file(p, size)).collect::<anyhow::Result<_>>()?;
        image_prep::batch(&v, size, &Device::Cpu)
    };
    let ours_img = if dev.is_cpu() {
        model.forward_cpu(&prep(&images[..batch.min(images.len())])?)?; // warm-up
        let t = Instant::now();
        for chunk in images.chunks(batch) {
            model.forward_cpu(&prep(chunk)?)?;
        }
        images.len() as f64 / t.elapsed().as_secs_f64()
    } else {
        let model = model.to_device(&dev)?;
        let run = |x: candle_core::Tensor| -> anyhow::Result<Vec<f32>> {
            Ok(model.forward(&x.to_device(&dev)?)?.pooled.flatten_all()?.to_vec1::<f32>()?)
        };
        run(prep(&images[..batch.min(images.len())])?)?; // warm-up (loads the kernels)
        let t = Instant::now();
        std::thread::scope(|s| -> anyhow::Result<()> {
            let (tx, rx) = std::sync::mpsc::sync_channel(2);
            let (prep, images) = (&prep, &images);
            s.spawn(move || {
                for chunk in images.chunks(batch) {
                    if tx.send(prep(chunk)).is_err() {
                        break;
                    }
                }
            });
            for x in rx {
                run(x?)?;
            }
            Ok(())
        })?;
        images.len() as f64 / t.elapsed().as_secs_f64()
    };
    let enc = TextEncoder::load(&model_dir, &dev, Some(256))?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    enc.last4_mean(&refs[..text_batch.min(refs.len())], None)?;
    // As the encode stage does: windows of 16 batches, batched by token length inside.
    let t = Instant::now();
    for win in refs.chunks(text_batch * 16) {
        enc.last4_mean_rows(win, None, text_batch, |_| ())?;
    }
    let ours_txt = texts.len() as f64 / t.elapsed().as_secs_f64();

    // PyTorch, same inputs.
    let python = std::env::var("HUSE_TORCH_PYTHON").unwrap_or_else(|_| "python3".into());
    // Where it was built, else (a binary carried to another machine, run from a checkout's root) here.
    let script = [
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("benches/torch_encode.py"),
        PathBuf::from("stages/lib/encoders/benches/torch_encode.py"),
    ]
    .into_iter()
    .find(|p| p.exists())
    .unwrap_or_else(|| PathBuf::from("stages/lib/encoders/benches/torch_encode.py"));
    let args = serde_json::json!({"device": spec, "threads": threads, "checkpoint": ckpt, "size": size, "batch": batch, "images": images,
        "text_model": model_dir, "texts": texts, "text_batch": text_batch});
    let torch = Command::new(&python)
        .arg(&script)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .and_then(|mut c| {
            c.stdin.take().unwrap().write_all(args.to_string().as_bytes())?;
            c.wait_with_output()
        });
    let torch: Option<serde_json::Value> = match torch {
        Ok(o) if o.status.success() => serde_json::from_slice(o.stdout.trim_ascii()).ok(),
        Ok(o) => {
            eprintln!(
                "PyTorch side failed ({}); set HUSE_TORCH_PYTHON to a Python with torch, torchvision, transformers",
                o.status
            );
            None
        }
        Err(e) => {
            eprintln!("PyTorch side not run ({python}: {e})");
            None
        }
    };
    let tv = |k: &str| torch.as_ref().and_then(|j| j[k].as_f64());
    println!(
        "encode throughput on {spec}, {threads} threads, MobileNetV2 at {size} px (batch {batch}), MiniLM last-4 (batch {text_batch})"
    );
    println!("{:<10} {:>14} {:>14} {:>8}", "", "huse-run", "PyTorch", "ratio");
    for (name, ours, theirs) in [("images/s", ours_img, tv("images_per_s")), ("texts/s", ours_txt, tv("texts_per_s"))] {
        match theirs {
            Some(t) => println!("{name:<10} {ours:>14.1} {t:>14.1} {:>7.2}x", ours / t),
            None => println!("{name:<10} {ours:>14.1} {:>14} {:>8}", "-", "-"),
        }
    }
    if let Some(j) = &torch {
        println!("(torch {} with {} threads)", j["torch"], j["threads"]);
    }
    Ok(())
}
