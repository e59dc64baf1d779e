//! With the `cuda` feature: compiles the fused train step's kernels (`src/cuda/huse.cu`) to
//! PTX with nvcc, as candle-kernels compiles candle's, for the compute capability in
//! `CUDA_COMPUTE_CAP` (e.g. 90 for an H100/H200; else the first GPU's, asked of nvidia-smi;
//! else 80). The driver loads the PTX at run time (see `src/cuda.rs`). Without the feature
//! it does nothing, so CPU builds need no CUDA toolkit.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=src/cuda/huse.cu");
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo::rerun-if-env-changed=NVCC");
    println!("cargo::rerun-if-env-changed=CUDA_HOME");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("huse.ptx");
    let cap = std::env::var("CUDA_COMPUTE_CAP").ok().or_else(|| {
        let o = Command::new("nvidia-smi").args(["--query-gpu=compute_cap", "--format=csv,noheader"]).output().ok()?;
        Some(String::from_utf8_lossy(&o.stdout).lines().next()?.trim().replace('.', ""))
    });
    let cap = cap.filter(|c| !c.is_empty() && c.chars().all(|ch| ch.is_ascii_digit())).unwrap_or_else(|| "80".into());
    let nvcc = std::env::var("NVCC").map(PathBuf::from).unwrap_or_else(|_| match std::env::var("CUDA_HOME") {
        Ok(home) => PathBuf::from(home).join("bin").join("nvcc"),
        Err(_) => PathBuf::from("nvcc"),
    });
    let status = Command::new(&nvcc)
        .args(["--ptx", "-O3", "-std=c++17", &format!("-arch=compute_{cap}"), "src/cuda/huse.cu", "-o"])
        .arg(&out)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "running {} for the `cuda` feature: {e} (install the CUDA toolkit, or set NVCC or CUDA_HOME)",
                nvcc.display()
            )
        });
    assert!(status.success(), "{} failed to compile src/cuda/huse.cu ({status})", nvcc.display());
}
