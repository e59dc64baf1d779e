//! BERT encoder that returns every hidden state (HF `output_hidden_states=True`).
//!
//! candle-transformers' `BertModel` returns only the last layer; HUSE needs the last four.
//! Tensor names mirror Hugging Face's `BertModel` (`embeddings.word_embeddings.weight`,
//! `encoder.layer.N.attention.self.query.weight`, ...), with or without a `bert.` prefix.

use anyhow::Result;
use candle_core::{D, DType, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, Linear, VarBuilder, embedding, layer_norm, linear};
use serde::Deserialize;

/// The fields of `config.json` this encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width of the hidden states.
    pub hidden_size: usize,
    /// Transformer layers.
    pub num_hidden_layers: usize,
    /// Attention heads per layer.
    pub num_attention_heads: usize,
    /// Width of the feed-forward layer.
    pub intermediate_size: usize,
    /// The longest input, in tokens.
    pub max_position_embeddings: usize,
    /// Token-type (segment) vocabulary size (default 2).
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    /// Layer-norm epsilon (default 1e-12).
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
    /// Activation of the feed-forward layer (default `gelu`).
    #[serde(default = "d_gelu")]
    pub hidden_act: String,
}
fn two() -> usize {
    2
}
fn eps() -> f64 {
    1e-12
}
fn d_gelu() -> String {
    "gelu".into()
}

struct Embeddings {
    word_embeddings: Embedding,
    position_embeddings: Embedding,
    token_type_embeddings: Embedding,
    layer_norm: LayerNorm,
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_output: Linear,
    attention_norm: LayerNorm,
    intermediate: Linear,
    output: Linear,
    output_norm: LayerNorm,
}

/// A BERT encoder.
pub struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
    heads: usize,
    /// The model's `config.json`.
    pub config: Config,
}

impl Bert {
    /// Loads the weights from `vb` (HF names).
    pub fn load(vb: VarBuilder, config: &Config) -> Result<Self> {
        anyhow::ensure!(config.hidden_act == "gelu", "unsupported hidden_act `{}` (only gelu)", config.hidden_act);
        let vb = if vb.contains_tensor("bert.embeddings.word_embeddings.weight") { vb.pp("bert") } else { vb };
        let e = vb.pp("embeddings");
        let (h, eps) = (config.hidden_size, config.layer_norm_eps);
        let embeddings = Embeddings {
            word_embeddings: embedding(config.vocab_size, h, e.pp("word_embeddings"))?,
            position_embeddings: embedding(config.max_position_embeddings, h, e.pp("position_embeddings"))?,
            token_type_embeddings: embedding(config.type_vocab_size, h, e.pp("token_type_embeddings"))?,
            layer_norm: layer_norm(h, eps, e.pp("LayerNorm"))?,
        };
        let mut layers = Vec::new();
        for i in 0..config.num_hidden_layers {
            let l = vb.pp(format!("encoder.layer.{i}"));
            let a = l.pp("attention");
            layers.push(Layer {
                query: linear(h, h, a.pp("self.query"))?,
                key: linear(h, h, a.pp("self.key"))?,
                value: linear(h, h, a.pp("self.value"))?,
                attention_output: linear(h, h, a.pp("output.dense"))?,
                attention_norm: layer_norm(h, eps, a.pp("output.LayerNorm"))?,
                intermediate: linear(h, config.intermediate_size, l.pp("intermediate.dense"))?,
                output: linear(config.intermediate_size, h, l.pp("output.dense"))?,
                output_norm: layer_norm(h, eps, l.pp("output.LayerNorm"))?,
            });
        }
        Ok(Bert { embeddings, layers, heads: config.num_attention_heads, config: config.clone() })
    }

    /// All hidden states: `[embeddings, layer 1, ..., layer N]`, each (B, L, hidden).
    /// `ids` and `mask` are (B, L) u32 / u32 (1 = token, 0 = padding). On the CPU (f32) the
    /// linear layers, their bias and what follows them (GELU, the residual) and the
    /// attention's scale + mask + softmax run as fused ops on the current rayon pool
    /// ([`LinearOp`], [`MaskedSoftmaxOp`]); elsewhere candle's ops ([`Bert::hidden_states_ops`]).
    pub fn hidden_states(&self, ids: &Tensor, mask: &Tensor) -> Result<Vec<Tensor>> {
        let fused = ids.device().is_cpu() && self.embeddings.word_embeddings.embeddings().dtype() == DType::F32;
        self.forward(ids, mask, fused)
    }

    /// [`Bert::hidden_states`] from candle's ops only (any device): the reference of the fused path.
    pub fn hidden_states_ops(&self, ids: &Tensor, mask: &Tensor) -> Result<Vec<Tensor>> {
        self.forward(ids, mask, false)
    }

    fn forward(&self, ids: &Tensor, mask: &Tensor, fused: bool) -> Result<Vec<Tensor>> {
        let (b, l) = ids.dims2()?;
        let dev = ids.device();
        let positions = Tensor::arange(0u32, l as u32, dev)?.unsqueeze(0)?.expand((b, l))?;
        let types = Tensor::zeros((b, l), DType::U32, dev)?;
        let e = &self.embeddings;
        let x = (e.word_embeddings.forward(ids)? + e.position_embeddings.forward(&positions)?)?
            .add(&e.token_type_embeddings.forward(&types)?)?;
        let mut x = e.layer_norm.forward(&x)?;
        // Additive mask: 0 for tokens, the most negative float for padding (as HF).
        let m = mask.to_dtype(DType::F32)?.reshape((b, 1, 1, l))?;
        let additive = ((m.ones_like()? - m)? * f64::from(f32::MIN))?;
        let (hs, dh) = (self.heads, self.config.hidden_size / self.heads);
        let mut out = vec![x.clone()];
        let scale = 1.0 / (dh as f64).sqrt();
        // Each piece fused on the CPU, or from candle's ops (the reference, and other devices).
        let linear =
            |l: &Linear, x: &Tensor, e: Epilogue| if fused { linear_cpu(l, x, e) } else { linear_ops(l, x, e) };
        let softmax = |scores: &Tensor| -> Result<Tensor> {
            Ok(if fused {
                scores.apply_op2_no_bwd(&additive, &MaskedSoftmaxOp { scale: scale as f32 })?
            } else {
                candle_nn::ops::softmax_last_dim(&(scores * scale)?.broadcast_add(&additive)?)?
            })
        };
        for layer in &self.layers {
            let split = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, l, hs, dh))?.transpose(1, 2)?.contiguous()?) };
            let q = split(linear(&layer.query, &x, Epilogue::None)?)?;
            let k = split(linear(&layer.key, &x, Epilogue::None)?)?;
            let v = split(linear(&layer.value, &x, Epilogue::None)?)?;
            let probs = softmax(&q.matmul(&k.t()?)?)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, hs * dh))?;
            let attn = layer.attention_norm.forward(&linear(&layer.attention_output, &ctx, Epilogue::Residual(&x))?)?;
            let inter = linear(&layer.intermediate, &attn, Epilogue::Gelu)?;
            x = layer.output_norm.forward(&linear(&layer.output, &inter, Epilogue::Residual(&attn))?)?;
            out.push(x.clone());
        }
        Ok(out)
    }
}

/// What follows a fused linear layer's `x W^T + b`.
enum Epilogue<'a> {
    None,
    /// GELU (exact form, fast erf).
    Gelu,
    /// `+ residual` (same shape as the output).
    Residual(&'a Tensor),
}

/// Elements per parallel chunk of the epilogues (64 KiB of f32).
const CHUNK: usize = 16 * 1024;

/// `x W^T + b` (then the epilogue) over the last dimension of `x`, as one op on the CPU: the
/// output starts as the bias rows, one GEMM (the gemm crate on the current rayon pool)
/// accumulates `x W^T` into it, the epilogue runs over it in parallel chunks. With candle's
/// ops the same is a matmul, a broadcast add and a GELU or add pass, each single-threaded
/// under `CANDLE_NUM_THREADS=1` and each a fresh buffer.
fn linear_cpu(layer: &Linear, x: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let k = *dims.last().unwrap_or(&0);
    let m = x.elem_count() / k.max(1);
    let x2 = x.contiguous()?.reshape((m, k))?;
    let bias = layer.bias().ok_or_else(|| anyhow::anyhow!("BERT linear layer without bias"))?;
    let residual = match epilogue {
        Epilogue::Residual(r) => Some(r.contiguous()?.flatten_all()?),
        _ => None,
    };
    let op = LinearOp { gelu: matches!(epilogue, Epilogue::Gelu), residual };
    let y = x2.apply_op3_no_bwd(layer.weight(), bias, &op)?;
    let mut out_dims = dims;
    *out_dims.last_mut().unwrap() = layer.weight().dim(0)?;
    Ok(y.reshape(out_dims)?)
}

/// [`linear_cpu`] from candle's ops: a matmul, a broadcast add, then GELU or the residual add.
fn linear_ops(layer: &Linear, x: &Tensor, epilogue: Epilogue) -> Result<Tensor> {
    let y = layer.forward(x)?;
    Ok(match epilogue {
        Epilogue::None => y,
        Epilogue::Gelu => gelu(&y)?,
        Epilogue::Residual(r) => (y + r)?,
    })
}

/// The op of [`linear_cpu`].
struct LinearOp {
    gelu: bool,
    residual: Option<Tensor>,
}

fn f32_slice<'a>(s: &'a candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (candle_core::CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("fused BERT op: contiguous f32 data expected"),
    }
}

impl candle_core::CustomOp3 for LinearOp {
    fn name(&self) -> &'static str {
        "bert-linear"
    }
    fn cpu_fwd(
        &self,
        xs: &candle_core::CpuStorage,
        xl: &candle_core::Layout,
        ws: &candle_core::CpuStorage,
        wl: &candle_core::Layout,
        bs: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 || bl.shape().dims1()? != n {
            candle_core::bail!("bert-linear: x {:?}, W {:?}, b {:?} do not fit", xl.shape(), wl.shape(), bl.shape());
        }
        let (x, w, b) = (f32_slice(xs, xl)?, f32_slice(ws, wl)?, f32_slice(bs, bl)?);
        // The output starts as the bias rows, written in parallel straight into fresh memory
        // (no zero-fill on one thread first).
        let rows = (CHUNK / n.max(1)).max(1);
        let mut out: Vec<f32> = Vec::with_capacity(m * n);
        out.spare_capacity_mut()[..m * n].par_chunks_mut(rows * n.max(1)).for_each(|block| {
            for row in block.chunks_exact_mut(n.max(1)) {
                for (o, &v) in row.iter_mut().zip(b) {
                    o.write(v);
                }
            }
        });
        // SAFETY: the chunks cover all m * n elements and every row of n got its n bias values
        // (n = 0: no elements).
        unsafe { out.set_len(m * n) };
        // out (m x n) += x (m x k) . W^T: rhs(kk, j) = w[j*k + kk].
        crate::cpu_gemm::sgemm(&mut out, m, n, k, (x, 1, k), (w, k, 1), true);
        if self.gelu {
            out.par_chunks_mut(CHUNK).for_each(|c| c.iter_mut().for_each(|v| *v = gelu_one(*v)));
        }
        if let Some(r) = &self.residual {
            let (rs, rl) = r.storage_and_layout();
            let candle_core::Storage::Cpu(rs) = &*rs else { candle_core::bail!("bert-linear: CPU residual expected") };
            let r = f32_slice(rs, rl)?;
            if r.len() != out.len() {
                candle_core::bail!("bert-linear: residual of {} values for {} outputs", r.len(), out.len());
            }
            out.par_chunks_mut(CHUNK)
                .zip(r.par_chunks(CHUNK))
                .for_each(|(o, r)| o.iter_mut().zip(r).for_each(|(o, r)| *o += r));
        }
        Ok((candle_core::CpuStorage::F32(out), candle_core::Shape::from((m, n))))
    }
}

/// `softmax(scores * scale + mask)` over the last dimension, as one op on the CPU, rows in
/// parallel: scores (B, H, L, L), mask (B, 1, 1, L) additive (0 or the most negative float).
/// The same arithmetic as candle's affine, broadcast add and `softmax_last_dim`.
struct MaskedSoftmaxOp {
    scale: f32,
}

impl candle_core::CustomOp2 for MaskedSoftmaxOp {
    fn name(&self) -> &'static str {
        "bert-masked-softmax"
    }
    fn cpu_fwd(
        &self,
        ss: &candle_core::CpuStorage,
        sl: &candle_core::Layout,
        ms: &candle_core::CpuStorage,
        ml: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (b, h, l, l2) = sl.shape().dims4()?;
        if ml.shape().dims4()? != (b, 1, 1, l2) {
            candle_core::bail!("bert-masked-softmax: scores {:?}, mask {:?}", sl.shape(), ml.shape());
        }
        let (s, mask) = (f32_slice(ss, sl)?, f32_slice(ms, ml)?);
        let mut out = vec![0f32; s.len()];
        let per_batch = h * l * l2;
        out.par_chunks_mut(l2.max(1)).zip(s.par_chunks(l2.max(1))).enumerate().for_each(|(row, (o, s))| {
            let m = &mask[(row * l2 / per_batch.max(1)) * l2..][..l2];
            let mut max = f32::NEG_INFINITY;
            for ((o, &v), &mv) in o.iter_mut().zip(s).zip(m) {
                *o = v * self.scale + mv;
                max = max.max(*o);
            }
            let mut sum = 0f32;
            for o in o.iter_mut() {
                *o = (*o - max).exp();
                sum += *o;
            }
            for o in o.iter_mut() {
                *o /= sum;
            }
        });
        Ok((candle_core::CpuStorage::F32(out), sl.shape().clone()))
    }
}

/// Exact-form GELU, `x/2 (1 + erf(x/sqrt 2))`. On the CPU with a fast erf (Abramowitz &
/// Stegun 7.1.26, |error| < 1.5e-7) in one pass; libm's erf was 10% of encoding time.
/// Other devices use candle's `gelu_erf`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 { Ok(x.apply_op1_no_bwd(&FastGelu)?) } else { Ok(x.gelu_erf()?) }
}

/// erf(x) by Abramowitz & Stegun 7.1.26.
#[inline]
pub fn erf_fast(x: f32) -> f32 {
    let s = x.signum();
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = 1.0
        - (((((1.061_405_4 * t - 1.453_152_1) * t) + 1.421_413_8) * t - 0.284_496_74) * t + 0.254_829_6)
            * t
            * (-a * a).exp();
    s * y
}

/// GELU of one value with the fast erf.
#[inline]
fn gelu_one(x: f32) -> f32 {
    0.5 * x * (1.0 + erf_fast(x * std::f32::consts::FRAC_1_SQRT_2))
}

struct FastGelu;

impl candle_core::CustomOp1 for FastGelu {
    fn name(&self) -> &'static str {
        "fast-gelu"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(v) = s else { candle_core::bail!("fast-gelu: f32 only") };
        let (a, b) =
            l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("fast-gelu: contiguous input only".into()))?;
        let out: Vec<f32> = v[a..b].iter().map(|&x| gelu_one(x)).collect();
        Ok((candle_core::CpuStorage::F32(out), l.shape().clone()))
    }
}

/// Attention-masked mean over tokens: (B, L, H) x (B, L) -> (B, H). Padding never enters.
pub fn masked_mean(h: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let m = mask.to_dtype(h.dtype())?.unsqueeze(D::Minus1)?;
    let summed = h.broadcast_mul(&m)?.sum(1)?;
    let count = m.sum(1)?.clamp(1e-9f32, f32::MAX)?;
    Ok(summed.broadcast_div(&count)?)
}

/// Rows scaled to unit L2 norm.
pub fn l2_normalise(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12f32, f32::MAX)?;
    Ok(x.broadcast_div(&n)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fast_erf_matches_libm_within_f32_rounding() {
        let mut worst = 0f32;
        for i in -6000..=6000 {
            let x = i as f32 / 1000.0;
            worst = worst.max((erf_fast(x) - libm_erf(x)).abs());
        }
        // A&S 7.1.26 is within 1.5e-7; the rest is f32 rounding here and in the reference.
        assert!(worst < 1e-6, "{worst}");
    }

    fn libm_erf(x: f32) -> f32 {
        let t = Tensor::new(&[x], &candle_core::Device::Cpu).unwrap();
        // gelu_erf(x) = x/2 (1 + erf(x/sqrt2))  =>  erf(y) = 2 gelu(y sqrt2) / (y sqrt2) - 1
        if x == 0.0 {
            return 0.0;
        }
        let z = x * std::f32::consts::SQRT_2;
        let g = (t * f64::from(std::f32::consts::SQRT_2)).unwrap().gelu_erf().unwrap().to_vec1::<f32>().unwrap()[0];
        2.0 * g / z - 1.0
    }
}
