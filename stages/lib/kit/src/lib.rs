//! `huse-stage-kit`: the adapters the HUSE stages share between the stage API and the
//! libraries below it, which take plain values and know nothing of stages.
//!
//! * [`device_of`]: the candle [`Device`] for a stage's [`DeviceSpec`];
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
        DeviceSpec::Auto => Ok(huse_encoders::auto_device()),
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(n) => huse_encoders::cuda_device(n).map_err(StageError::of),
    }
}

/// What `device:` can name in this build, in words, without asking the driver (for `--help`).
pub fn devices_built() -> &'static str {
    if huse_encoders::CUDA_BUILD {
        "cpu, cuda:N (this build has CUDA support; `huse-run list` names the GPUs found)"
    } else {
        "cpu (this build has no CUDA support: build with `--features cuda` for cuda:N)"
    }
}

/// What `device:` can name in this build on this machine, in words: `cpu`, and with a CUDA
/// build the GPUs found, by name (for `huse-run list`).
pub fn devices() -> String {
    if !huse_encoders::CUDA_BUILD {
        return devices_built().into();
    }
    let gpus = huse_encoders::cuda_gpus();
    if gpus.is_empty() {
        return "cpu, cuda:N (this build has CUDA support; no GPU found now)".into();
    }
    let names: Vec<String> = gpus.iter().map(|(i, n)| format!("cuda:{i} ({n})")).collect();
    format!("cpu, {}", names.join(", "))
}

/// The GPU `device: auto` picks in this build on this machine: 0 when the build has CUDA
/// support and a GPU is present (as [`device_of`] does), else None (the CPU).
pub fn auto_gpu() -> Option<usize> {
    (huse_encoders::CUDA_BUILD && huse_encoders::cuda_gpu_count() > 0).then_some(0)
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
