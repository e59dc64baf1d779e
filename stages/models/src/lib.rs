//! Frozen pretrained encoders for HUSE, on candle.
//!
//! * [`torch_pth`]: PyTorch checkpoints in both the zip and the legacy format, hash-prefix
//!   checks and `$TORCH_HOME` resolution;
//! * [`mobilenet_v2`]: torchvision's MobileNetV2 (BatchNorm folded), 1280-d pooled features;
//! * [`image_prep`]: decode + PIL-exact bilinear resize + ImageNet normalisation;
//! * [`bert`] and [`text`]: a BERT encoder with every hidden state, the HUSE last-4-layer
//!   text feature, sentence embeddings and TF-IDF-aware truncation;
//! * [`tfidf`]: word TF-IDF features fitted on the training split.

pub mod bert;
pub mod image_prep;
pub mod mobilenet_v2;
pub mod model_ref;
pub mod text;
pub mod tfidf;
pub mod torch_pth;

/// The candle device for a request: `None` is the CPU, `Some(n)` CUDA device n. With
/// `auto`, a CUDA device is used when this build has CUDA support and one exists.
pub fn device(cuda: Option<usize>, auto: bool) -> anyhow::Result<candle_core::Device> {
    if auto {
        if candle_core::utils::cuda_is_available()
            && let Ok(d) = candle_core::Device::new_cuda(0)
        {
            return Ok(d);
        }
        return Ok(candle_core::Device::Cpu);
    }
    match cuda {
        None => Ok(candle_core::Device::Cpu),
        Some(n) if candle_core::utils::cuda_is_available() => Ok(candle_core::Device::new_cuda(n)?),
        Some(n) => anyhow::bail!("device cuda:{n} asked for, but this build has no CUDA support (build with `--features cuda`)"),
    }
}
