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

/// The candle device for a stage's `device`: `auto` takes CUDA device 0 when this build has
/// CUDA support and one exists, else the CPU; `cuda:N` without CUDA support is an error.
pub fn device_of(spec: huse_stage_api::DeviceSpec) -> anyhow::Result<candle_core::Device> {
    use huse_stage_api::DeviceSpec;
    use candle_core::{Device, utils::cuda_is_available};
    Ok(match spec {
        DeviceSpec::Auto if cuda_is_available() => Device::new_cuda(0).unwrap_or(Device::Cpu),
        DeviceSpec::Auto | DeviceSpec::Cpu => Device::Cpu,
        DeviceSpec::Cuda(n) if cuda_is_available() => Device::new_cuda(n)?,
        DeviceSpec::Cuda(n) => anyhow::bail!("device cuda:{n} asked for, but this build has no CUDA support (build with `--features cuda`)"),
    })
}
