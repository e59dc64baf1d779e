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

/// CUDA device `n`; an error when this build has no CUDA support.
pub fn cuda_device(n: usize) -> anyhow::Result<candle_core::Device> {
    if !candle_core::utils::cuda_is_available() {
        anyhow::bail!("device cuda:{n} asked for, but this build has no CUDA support (build with `--features cuda`)");
    }
    Ok(candle_core::Device::new_cuda(n)?)
}
