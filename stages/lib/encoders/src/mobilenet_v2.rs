//! MobileNetV2 (torchvision layout and tensor names), inference only.
//!
//! BatchNorm is folded into each convolution at load time (`w' = w * g / sqrt(v + eps)`,
//! `b' = beta - mean * g / sqrt(v + eps)`), so every layer is one convolution plus bias and,
//! except the linear bottlenecks, ReLU6. Two forward paths share the folded weights:
//!
//! * [`MobileNetV2::forward`] with candle ops (any device);
//! * [`MobileNetV2::forward_cpu`], the fast CPU path: activations in NHWC, 1x1
//!   convolutions as one GEMM each, depthwise 3x3 convolutions as a direct kernel over
//!   contiguous channels, bias, ReLU6 and the residual add fused into those passes, the
//!   work split over rows with rayon. This is the path the encode stage uses on the CPU.
//!   Its activation buffers are kept between layers and batches ([`Buffers`]): a 224 px
//!   batch of 32 has activations of up to 154 MB, which glibc maps and unmaps per
//!   allocation (above its mmap threshold), so fresh buffers cost page faults and the
//!   kernel's page zeroing on every layer of every batch, plus a zero-fill on one thread.
//!
//! Tensor names follow torchvision: `features.0.0.weight` (stem conv), `features.0.1.*`
//! (its BatchNorm), `features.N.conv.*` (inverted residual blocks 1..=17),
//! `features.18.*` (last 1x1 conv), `classifier.1.*` (the ImageNet head).

use std::collections::HashMap;

use anyhow::{Context as _, Result, anyhow, ensure};
use candle_core::{D, DType, Device, Tensor};
use rayon::prelude::*;

const BN_EPS: f64 = 1e-5;
/// torchvision's inverted residual settings: expansion t, channels c, repeats n, stride s.
const SETTINGS: [(usize, usize, usize, usize); 7] =
    [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1)];

/// A convolution with its BatchNorm folded in.
struct ConvBn {
    /// (cout, cin/groups, k, k)
    weight: Tensor,
    bias: Tensor,
    stride: usize,
    groups: usize,
    relu6: bool,
    // CPU copies in the layouts the fast kernels want.
    /// 1x1: (cin, cout) row-major; depthwise: (9, c); stem: (27, cout) with rows ordered (ky, kx, cin).
    w_cpu: Vec<f32>,
    b_cpu: Vec<f32>,
    cout: usize,
    k: usize,
}

impl ConvBn {
    fn load(
        w: &HashMap<String, Tensor>,
        conv: &str,
        bn: &str,
        stride: usize,
        groups: usize,
        relu6: bool,
    ) -> Result<Self> {
        let get = |n: &str| w.get(n).cloned().ok_or_else(|| anyhow!("checkpoint has no tensor `{n}`"));
        let weight = get(&format!("{conv}.weight"))?.to_dtype(DType::F32)?;
        let gamma = get(&format!("{bn}.weight"))?.to_dtype(DType::F32)?;
        let beta = get(&format!("{bn}.bias"))?.to_dtype(DType::F32)?;
        let mean = get(&format!("{bn}.running_mean"))?.to_dtype(DType::F32)?;
        let var = get(&format!("{bn}.running_var"))?.to_dtype(DType::F32)?;
        let scale = (gamma / (var + BN_EPS)?.sqrt()?)?;
        let (cout, cin_g, k, k2) = weight.dims4()?;
        ensure!(k == k2, "{conv}: non-square kernel");
        let weight = weight.broadcast_mul(&scale.reshape((cout, 1, 1, 1))?)?;
        let bias = (beta - (mean * &scale)?)?;
        let cin = cin_g * groups;
        let w_cpu: Vec<f32> = if groups > 1 {
            // depthwise (c, 1, 3, 3) -> (9, c)
            weight.reshape((cout, k * k))?.t()?.contiguous()?.flatten_all()?.to_vec1()?
        } else {
            // (cout, cin, ky, kx) -> (ky, kx, cin, cout) -> (k*k*cin, cout)
            weight.permute((2, 3, 1, 0))?.contiguous()?.reshape((k * k * cin, cout))?.flatten_all()?.to_vec1()?
        };
        let b_cpu = bias.to_vec1()?;
        Ok(ConvBn { weight, bias, stride, groups, relu6, w_cpu, b_cpu, cout, k })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let pad = (self.k - 1) / 2;
        let y = x.conv2d(&self.weight, pad, self.stride, 1, self.groups)?;
        let y = y.broadcast_add(&self.bias.reshape((1, self.cout, 1, 1))?)?;
        Ok(if self.relu6 { y.clamp(0f32, 6f32)? } else { y })
    }
}

struct Block {
    layers: Vec<ConvBn>,
    residual: bool,
}

/// torchvision's MobileNetV2 with BatchNorm folded.
pub struct MobileNetV2 {
    stem: ConvBn,
    blocks: Vec<Block>,
    last: ConvBn,
    classifier_w: Tensor,
    classifier_b: Tensor,
    /// The CPU path's activation buffers, reused by the next batch.
    buffers: std::sync::Mutex<Buffers>,
}

/// Free activation buffers of the CPU path. Their contents are stale: every layer writes
/// each value of its output before reading it (GEMMs without accumulation, bias-first
/// depthwise sums, a zeroed im2col).
#[derive(Default)]
struct Buffers(Vec<Vec<f32>>);

impl Buffers {
    /// A buffer of `len` values, contents unspecified: the smallest free one that holds
    /// `len`, else the largest grown (so the set stays at the few sizes a forward needs).
    fn take(&mut self, len: usize) -> Vec<f32> {
        let fits = self.0.iter().enumerate().filter(|(_, b)| b.capacity() >= len).min_by_key(|(_, b)| b.capacity());
        let pick = fits.or_else(|| self.0.iter().enumerate().max_by_key(|(_, b)| b.capacity())).map(|(i, _)| i);
        let mut v = pick.map(|i| self.0.swap_remove(i)).unwrap_or_default();
        if v.len() >= len {
            v.truncate(len);
        } else {
            v.resize(len, 0.0);
        }
        v
    }

    fn give(&mut self, v: Vec<f32>) {
        self.0.push(v);
    }
}

/// Pooled features (B, 1280) and ImageNet logits (B, 1000).
pub struct Output {
    /// Globally average-pooled features, (B, 1280).
    pub pooled: Tensor,
    /// ImageNet class logits, (B, 1000).
    pub logits: Tensor,
}

impl MobileNetV2 {
    /// Builds the model from a torchvision state dict.
    pub fn load(w: &HashMap<String, Tensor>) -> Result<Self> {
        let stem = ConvBn::load(w, "features.0.0", "features.0.1", 2, 1, true)?;
        let mut blocks = Vec::new();
        let mut cin = 32;
        let mut idx = 1;
        for (t, c, n, s) in SETTINGS {
            for i in 0..n {
                let stride = if i == 0 { s } else { 1 };
                let hidden = cin * t;
                let p = format!("features.{idx}.conv");
                let mut layers = Vec::new();
                let mut j = 0;
                if t != 1 {
                    layers.push(ConvBn::load(w, &format!("{p}.0.0"), &format!("{p}.0.1"), 1, 1, true)?);
                    j = 1;
                }
                layers.push(ConvBn::load(w, &format!("{p}.{j}.0"), &format!("{p}.{j}.1"), stride, hidden, true)?);
                layers.push(ConvBn::load(w, &format!("{p}.{}", j + 1), &format!("{p}.{}", j + 2), 1, 1, false)?);
                ensure!(layers.last().unwrap().cout == c, "features.{idx}: expected {c} output channels");
                blocks.push(Block { layers, residual: stride == 1 && cin == c });
                cin = c;
                idx += 1;
            }
        }
        let last = ConvBn::load(w, "features.18.0", "features.18.1", 1, 1, true)?;
        let classifier_w = w.get("classifier.1.weight").cloned().context("checkpoint has no `classifier.1.weight`")?;
        let classifier_b = w.get("classifier.1.bias").cloned().context("checkpoint has no `classifier.1.bias`")?;
        Ok(MobileNetV2 { stem, blocks, last, classifier_w, classifier_b, buffers: Default::default() })
    }

    /// Moves the weights used by [`MobileNetV2::forward`] to `device`.
    pub fn to_device(mut self, device: &Device) -> Result<Self> {
        let mv = |c: &mut ConvBn| -> Result<()> {
            c.weight = c.weight.to_device(device)?;
            c.bias = c.bias.to_device(device)?;
            Ok(())
        };
        mv(&mut self.stem)?;
        for b in &mut self.blocks {
            for l in &mut b.layers {
                mv(l)?;
            }
        }
        mv(&mut self.last)?;
        self.classifier_w = self.classifier_w.to_device(device)?;
        self.classifier_b = self.classifier_b.to_device(device)?;
        Ok(self)
    }

    fn head(&self, pooled: Tensor) -> Result<Output> {
        let logits = pooled.matmul(&self.classifier_w.t()?)?.broadcast_add(&self.classifier_b)?;
        Ok(Output { pooled, logits })
    }

    /// Forward pass with candle ops on `x` (B, 3, H, W), normalised.
    pub fn forward(&self, x: &Tensor) -> Result<Output> {
        let mut x = self.stem.forward(x)?;
        for b in &self.blocks {
            let mut y = x.clone();
            for l in &b.layers {
                y = l.forward(&y)?;
            }
            x = if b.residual { (x + y)? } else { y };
        }
        let x = self.last.forward(&x)?;
        self.head(x.mean(D::Minus1)?.mean(D::Minus1)?)
    }

    /// The fast CPU forward pass on `x` (B, 3, H, W), normalised, f32.
    pub fn forward_cpu(&self, x: &Tensor) -> Result<Output> {
        let (b, c, h, w) = x.dims4()?;
        ensure!(c == 3, "expected 3 input channels, got {c}");
        // The buffers leave the lock for the whole pass (a concurrent pass starts its own).
        let mut bufs = std::mem::take(&mut *self.buffers.lock().unwrap_or_else(|e| e.into_inner()));
        // NCHW -> NHWC, image rows in parallel, read straight from the tensor's storage.
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let (storage, layout) = x.storage_and_layout();
        let (candle_core::Storage::Cpu(candle_core::CpuStorage::F32(data)), Some((from, to))) =
            (&*storage, layout.contiguous_offsets())
        else {
            anyhow::bail!("forward_cpu: the input must be a CPU tensor")
        };
        let nchw = &data[from..to];
        let mut nhwc = bufs.take(nchw.len());
        nhwc.par_chunks_mut(w * 3).enumerate().for_each(|(row, out)| {
            let (bi, y) = (row / h, row % h);
            for ch in 0..3 {
                let plane = &nchw[((bi * 3 + ch) * h + y) * w..((bi * 3 + ch) * h + y + 1) * w];
                for (px, &v) in plane.iter().enumerate() {
                    out[px * 3 + ch] = v;
                }
            }
        });
        let (feat, fh, fw) = {
            let (mut x, mut h, mut w) = stem(&self.stem, &nhwc, b, h, w, &mut bufs);
            bufs.give(nhwc);
            for blk in &self.blocks {
                // The block's latest output (None: still its input x).
                let mut y: Option<Vec<f32>> = None;
                let (mut yh, mut yw) = (h, w);
                let n = blk.layers.len();
                for (i, l) in blk.layers.iter().enumerate() {
                    let input = y.as_deref().unwrap_or(&x);
                    let residual = (blk.residual && i == n - 1).then_some(x.as_slice());
                    let out = if l.groups > 1 {
                        let (o, oh, ow) = depthwise(l, input, b, yh, yw, &mut bufs);
                        (yh, yw) = (oh, ow);
                        o
                    } else {
                        pointwise(l, input, b * yh * yw, residual, &mut bufs)
                    };
                    if let Some(old) = y.replace(out) {
                        bufs.give(old);
                    }
                }
                let out = y.ok_or_else(|| anyhow!("an inverted residual block without layers"))?;
                bufs.give(std::mem::replace(&mut x, out));
                (h, w) = (yh, yw);
            }
            let last = pointwise(&self.last, &x, b * h * w, None, &mut bufs);
            bufs.give(x);
            (last, h, w)
        };
        // Global average pool over (h, w), images in parallel.
        let cl = self.last.cout;
        let hw = fh * fw;
        let mut pooled = vec![0f32; b * cl];
        pooled.par_chunks_mut(cl).enumerate().for_each(|(bi, out)| {
            for p in 0..hw {
                let row = &feat[(bi * hw + p) * cl..(bi * hw + p + 1) * cl];
                out.iter_mut().zip(row).for_each(|(o, v)| *o += v);
            }
            out.iter_mut().for_each(|o| *o /= hw as f32);
        });
        bufs.give(feat);
        *self.buffers.lock().unwrap_or_else(|e| e.into_inner()) = bufs;
        self.head(Tensor::from_vec(pooled, (b, cl), &Device::Cpu)?)
    }
}

#[inline]
fn act(v: f32, relu6: bool) -> f32 {
    if relu6 { v.clamp(0.0, 6.0) } else { v }
}

/// 1x1 convolution: (m, cin) @ (cin, cout) + bias (+ residual) (+ ReLU6), fused after the GEMM.
fn pointwise(l: &ConvBn, x: &[f32], m: usize, residual: Option<&[f32]>, bufs: &mut Buffers) -> Vec<f32> {
    let kd = l.w_cpu.len() / l.cout;
    // The GEMM writes every output without reading the buffer's old contents.
    let mut y = bufs.take(m * l.cout);
    crate::cpu_gemm::sgemm(&mut y, m, l.cout, kd, (&x[..m * kd], 1, kd), (&l.w_cpu, 1, l.cout), false);
    let co = l.cout;
    y.par_chunks_mut(co * 64).enumerate().for_each(|(ci, chunk)| {
        for (r, row) in chunk.chunks_mut(co).enumerate() {
            let res = residual.map(|res| &res[(ci * 64 + r) * co..(ci * 64 + r + 1) * co]);
            match res {
                Some(res) => {
                    row.iter_mut().zip(&l.b_cpu).zip(res).for_each(|((v, b), r)| *v = act(*v + b + r, l.relu6))
                }
                None => row.iter_mut().zip(&l.b_cpu).for_each(|(v, b)| *v = act(*v + b, l.relu6)),
            }
        }
    });
    y
}

/// Depthwise 3x3 convolution, padding 1, stride 1 or 2, + bias + ReLU6, NHWC.
fn depthwise(l: &ConvBn, x: &[f32], b: usize, h: usize, w: usize, bufs: &mut Buffers) -> (Vec<f32>, usize, usize) {
    let c = l.cout;
    let s = l.stride;
    let (oh, ow) = ((h + 2 - 3) / s + 1, (w + 2 - 3) / s + 1);
    // Every output starts as the bias (below): the buffer's old values are never read.
    let mut y = bufs.take(b * oh * ow * c);
    y.par_chunks_mut(ow * c).enumerate().for_each(|(row_idx, out_row)| {
        let (bi, oy) = (row_idx / oh, row_idx % oh);
        for ox in 0..ow {
            let out = &mut out_row[ox * c..(ox + 1) * c];
            out.copy_from_slice(&l.b_cpu);
            for ky in 0..3 {
                let iy = (oy * s + ky) as isize - 1;
                if iy < 0 || iy >= h as isize {
                    continue;
                }
                for kx in 0..3 {
                    let ix = (ox * s + kx) as isize - 1;
                    if ix < 0 || ix >= w as isize {
                        continue;
                    }
                    let base = ((bi * h + iy as usize) * w + ix as usize) * c;
                    let inp = &x[base..base + c];
                    let wk = &l.w_cpu[(ky * 3 + kx) * c..(ky * 3 + kx + 1) * c];
                    out.iter_mut().zip(inp).zip(wk).for_each(|((o, i), k)| *o += i * k);
                }
            }
            out.iter_mut().for_each(|v| *v = v.clamp(0.0, 6.0));
        }
    });
    (y, oh, ow)
}

/// The stem: 3x3 stride-2 convolution of 3 channels as im2col + GEMM, + bias + ReLU6.
fn stem(l: &ConvBn, x: &[f32], b: usize, h: usize, w: usize, bufs: &mut Buffers) -> (Vec<f32>, usize, usize) {
    let (oh, ow) = ((h + 2 - 3) / 2 + 1, (w + 2 - 3) / 2 + 1);
    let kk = 27;
    let mut cols = bufs.take(b * oh * ow * kk);
    cols.par_chunks_mut(ow * kk).enumerate().for_each(|(row_idx, crow)| {
        let (bi, oy) = (row_idx / oh, row_idx % oh);
        // Zero first: the padding taps are skipped below.
        crow.fill(0.0);
        for ox in 0..ow {
            let col = &mut crow[ox * kk..(ox + 1) * kk];
            for ky in 0..3 {
                let iy = (oy * 2 + ky) as isize - 1;
                for kx in 0..3 {
                    let ix = (ox * 2 + kx) as isize - 1;
                    if iy < 0 || iy >= h as isize || ix < 0 || ix >= w as isize {
                        continue;
                    }
                    let base = ((bi * h + iy as usize) * w + ix as usize) * 3;
                    col[(ky * 3 + kx) * 3..(ky * 3 + kx) * 3 + 3].copy_from_slice(&x[base..base + 3]);
                }
            }
        }
    });
    let y = pointwise(l, &cols, b * oh * ow, None, bufs);
    bufs.give(cols);
    (y, oh, ow)
}
