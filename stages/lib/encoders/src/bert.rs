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
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    pub max_position_embeddings: usize,
    #[serde(default = "two")]
    pub type_vocab_size: usize,
    #[serde(default = "eps")]
    pub layer_norm_eps: f64,
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
    /// `ids` and `mask` are (B, L) u32 / u32 (1 = token, 0 = padding).
    pub fn hidden_states(&self, ids: &Tensor, mask: &Tensor) -> Result<Vec<Tensor>> {
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
        for layer in &self.layers {
            let split = |t: Tensor| -> Result<Tensor> { Ok(t.reshape((b, l, hs, dh))?.transpose(1, 2)?.contiguous()?) };
            let q = split(layer.query.forward(&x)?)?;
            let k = split(layer.key.forward(&x)?)?;
            let v = split(layer.value.forward(&x)?)?;
            let scores = (q.matmul(&k.t()?)? / (dh as f64).sqrt())?.broadcast_add(&additive)?;
            let probs = candle_nn::ops::softmax_last_dim(&scores)?;
            let ctx = probs.matmul(&v)?.transpose(1, 2)?.reshape((b, l, hs * dh))?;
            let attn = layer.attention_norm.forward(&(layer.attention_output.forward(&ctx)? + &x)?)?;
            let inter = gelu(&layer.intermediate.forward(&attn)?)?;
            x = layer.output_norm.forward(&(layer.output.forward(&inter)? + attn)?)?;
            out.push(x.clone());
        }
        Ok(out)
    }
}

/// Exact-form GELU, `x/2 (1 + erf(x/sqrt 2))`. On the CPU with a fast erf (Abramowitz &
/// Stegun 7.1.26, |error| < 1.5e-7) in one pass; libm's erf was 10% of encoding time.
/// Other devices use candle's `gelu_erf`.
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        Ok(x.apply_op1_no_bwd(&FastGelu)?)
    } else {
        Ok(x.gelu_erf()?)
    }
}

/// erf(x) by Abramowitz & Stegun 7.1.26.
#[inline]
pub fn erf_fast(x: f32) -> f32 {
    let s = x.signum();
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let y = 1.0 - (((((1.061_405_4 * t - 1.453_152_1) * t) + 1.421_413_8) * t - 0.284_496_74) * t + 0.254_829_6) * t * (-a * a).exp();
    s * y
}

struct FastGelu;

impl candle_core::CustomOp1 for FastGelu {
    fn name(&self) -> &'static str {
        "fast-gelu"
    }
    fn cpu_fwd(&self, s: &candle_core::CpuStorage, l: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let candle_core::CpuStorage::F32(v) = s else { candle_core::bail!("fast-gelu: f32 only") };
        let (a, b) = l.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("fast-gelu: contiguous input only".into()))?;
        let out: Vec<f32> = v[a..b].iter().map(|&x| 0.5 * x * (1.0 + erf_fast(x * std::f32::consts::FRAC_1_SQRT_2))).collect();
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
