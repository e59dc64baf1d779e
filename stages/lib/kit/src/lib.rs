//! `huse-stage-kit`: the adapters the HUSE stages share between the stage API and the
//! libraries below it, which take plain values and know nothing of stages.
//!
//! * [`device_of`]: the candle [`Device`] for a stage's [`DeviceSpec`], and what devices
//!   this build and machine have ([`devices`], [`auto_gpu`], [`cuda_gpus`]);
//! * [`load_dataset`]: the feature dataset (items, classes, encode features) among a
//!   stage's [`Inputs`].
//!
//! Errors of the libraries become [`StageError`]s through [`StageError::of`].

use candle_core::Device;
use huse_data::{Artifact, ClassTree};
use huse_model::data::Dataset;
use huse_stage_api::{DeviceSpec, Inputs, StageError};

/// The candle device for a stage's `device`: `auto` takes CUDA device 0 when this build
/// has CUDA support and one exists, else the CPU; `cuda:N` without CUDA support is an error.
pub fn device_of(spec: DeviceSpec) -> Result<Device, StageError> {
    match spec {
        DeviceSpec::Auto => Ok(auto_device()),
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => cuda_device(n),
    }
}

/// What `device:` can name in this build, in words, without asking the driver (for `--help`).
pub fn devices_built() -> &'static str {
    if CUDA_BUILD {
        "cpu, cuda:N (this build has CUDA support; `huse-run list` names the GPUs found)"
    } else {
        "cpu (this build has no CUDA support: build with `--features cuda` for cuda:N)"
    }
}

/// What `device:` can name in this build on this machine, in words: `cpu`, and with a CUDA
/// build the GPUs found, by name (for `huse-run list`).
pub fn devices() -> String {
    if !CUDA_BUILD {
        return devices_built().into();
    }
    let gpus = cuda_gpus();
    if gpus.is_empty() {
        return "cpu, cuda:N (this build has CUDA support; no GPU found now)".into();
    }
    let names: Vec<String> = gpus.iter().map(|(i, n)| format!("cuda:{i} ({n})")).collect();
    format!("cpu, {}", names.join(", "))
}

/// The GPU `device: auto` picks in this build on this machine: 0 when the build has CUDA
/// support and a GPU is present (as [`device_of`] does), else None (the CPU).
pub fn auto_gpu() -> Option<usize> {
    (CUDA_BUILD && cuda_gpu_count() > 0).then_some(0)
}

/// The device `auto` means: CUDA device 0 when this build has CUDA support and one
/// exists, else the CPU.
pub fn auto_device() -> candle_core::Device {
    use candle_core::{Device, utils::cuda_is_available};
    if cuda_is_available() { Device::new_cuda(0).unwrap_or(Device::Cpu) } else { Device::Cpu }
}

/// Whether this build can compute on CUDA GPUs (`--features cuda`).
pub const CUDA_BUILD: bool = cfg!(feature = "cuda");

/// How many CUDA GPUs this process can use (0 without CUDA support, a driver or a GPU); asks
/// the driver only, without creating a context on any.
pub fn cuda_gpu_count() -> usize {
    #[cfg(feature = "cuda")]
    {
        candle_core::cuda_backend::cudarc::driver::CudaContext::device_count().unwrap_or(0).max(0) as usize
    }
    #[cfg(not(feature = "cuda"))]
    0
}

/// The CUDA GPUs this process can use, as (index, name); empty without CUDA support, a
/// driver or a GPU. Creates a context on each (slow): for listings, not for every run.
pub fn cuda_gpus() -> Vec<(usize, String)> {
    #[cfg(feature = "cuda")]
    {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        (0..cuda_gpu_count())
            .map(|i| (i, CudaContext::new(i).ok().and_then(|c| c.name().ok()).unwrap_or_else(|| "?".into())))
            .collect()
    }
    #[cfg(not(feature = "cuda"))]
    Vec::new()
}

/// CUDA device `n`; an error when this build has no CUDA support.
pub fn cuda_device(n: usize) -> Result<Device, StageError> {
    if !candle_core::utils::cuda_is_available() {
        return Err(StageError::msg(format!(
            "device cuda:{n} asked for, but this build has no CUDA support (build with `--features cuda`)"
        )));
    }
    Device::new_cuda(n).map_err(StageError::of)
}

/// Reads the dataset artifacts (items, classes, encode features) among a stage's inputs;
/// the TF-IDF artifacts only when `use_tfidf`.
pub fn load_dataset(inputs: &Inputs, use_tfidf: bool) -> Result<(Dataset, ClassTree), StageError> {
    let tree = ClassTree::read(inputs.get(Artifact::Classes)?).map_err(StageError::of)?;
    let tfidf = match (use_tfidf, inputs.optional(Artifact::Tfidf), inputs.optional(Artifact::TfidfVocab)) {
        (false, _, _) => None,
        (true, Some(a), Some(b)) => Some((a, b)),
        (true, _, _) => {
            return Err(StageError::msg(format!(
                "use_tfidf is on, but no upstream stage gives {} and {}",
                Artifact::Tfidf,
                Artifact::TfidfVocab
            )));
        }
    };
    let ds = Dataset::load(
        inputs.get(Artifact::Items)?,
        inputs.get(Artifact::ImageFeatures)?,
        inputs.get(Artifact::TextFeatures)?,
        tfidf,
        tree.classes.len(),
    )
    .map_err(StageError::of)?;
    Ok((ds, tree))
}
