//! `huse-encoders`: the frozen pretrained encoders of HUSE, on candle, and the
//! checkpoints they load. Plain library code: it takes paths, slices and a candle
//! [`Device`](candle_core::Device), and knows nothing of stages.
//!
//! * [`torch_pth`]: PyTorch checkpoints in both the zip and the legacy format, hash-prefix
//!   checks and `$TORCH_HOME` resolution;
//! * [`mobilenet_v2`]: torchvision's MobileNetV2 (BatchNorm folded), 1280-d pooled features;
//! * [`image_prep`]: decode + PIL-exact bilinear resize + ImageNet normalisation;
//! * [`bert`] and [`text`]: a BERT encoder with every hidden state, the HUSE last-4-layer
//!   text feature, sentence embeddings and TF-IDF-aware truncation;
//! * [`tfidf`]: word TF-IDF features fitted on the training split.

pub mod augment;
pub mod bert;
mod cpu_gemm;
pub mod image_prep;
pub mod mobilenet_v2;
pub mod model_ref;
pub mod text;
pub mod tfidf;
pub mod torch_pth;

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
pub fn cuda_device(n: usize) -> anyhow::Result<candle_core::Device> {
    if !candle_core::utils::cuda_is_available() {
        anyhow::bail!("device cuda:{n} asked for, but this build has no CUDA support (build with `--features cuda`)");
    }
    Ok(candle_core::Device::new_cuda(n)?)
}
