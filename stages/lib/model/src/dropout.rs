//! Dropout drawn on the device, shared by the fused CPU ops ([`crate::fused`]) and their
//! CUDA halves (`crate::cuda`), so that neither module needs the other's types.

use candle_core::{Result, Shape, Tensor};

/// Dropout drawn on a GPU: uniform numbers `u` from the device's generator (curand), a unit
/// kept iff `u >= p`, then scaled by 1/(1-p). The fused layer's forward and backward kernels
/// read the same `u`, so no mask tensor is built. The draws are those of the tensor-op path
/// ([`crate::model::dropout`]), so both give the same masks.
#[derive(Clone)]
pub struct DeviceDropout {
    /// Uniform numbers in [0, 1), one per output element.
    pub u: Tensor,
    /// The drop probability.
    pub p: f32,
}

impl DeviceDropout {
    /// Fresh uniform numbers of `shape` on `device`.
    pub fn draw(p: f64, shape: impl Into<Shape>, device: &candle_core::Device) -> Result<Self> {
        Ok(DeviceDropout { u: Tensor::rand(0f32, 1f32, shape, device)?, p: p as f32 })
    }
    /// The factor of a kept unit, 1/(1-p).
    pub fn scale(&self) -> f32 {
        1.0 / (1.0 - self.p)
    }
}
