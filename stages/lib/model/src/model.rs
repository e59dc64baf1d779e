//! The HUSE network: an image tower, a text tower, and one shared classifier layer.
//!
//! * image tower: `image_layers` hidden fully connected layers of `hidden` units with
//!   ReLU (paper: 5 x 512), then a `dim`-unit layer and L2 normalisation: `phi_I(x)`;
//! * text tower: the same with `text_layers` hidden layers (paper: 2 x 512): `phi_T(x)`;
//! * dropout (paper 0.15) between hidden layers, i.e. after every hidden layer but the last;
//! * shared layer `W` (dim -> K) applied to `phi_I` and to `phi_T` separately.
//!
//! Parameters are plain candle `Var`s named like a PyTorch module
//! (`image_tower.0.weight`, ..., `image_tower.out.weight`, `shared.weight`), initialised
//! like `nn.Linear` (uniform in ±1/sqrt(fan_in)) from a seeded ChaCha RNG; dropout masks
//! come from a seeded RNG too, so the same seed gives the same training run on the CPU.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context as _, Result, ensure};
use candle_core::{D, DType, Device, Tensor, Var};
use rand::{Rng, RngCore};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::data::Sparse;

/// The paper's network shape: the part of the config a user chooses (train's
/// `with: { model: ... }`). The one place its defaults are written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Shape {
    /// Embedding size (paper: 512).
    pub dim: usize,
    /// Hidden layer width (paper: 512).
    pub hidden: usize,
    /// Hidden layers of the image tower (paper: 5).
    pub image_layers: usize,
    /// Hidden layers of the text tower (paper: 2).
    pub text_layers: usize,
    /// Dropout between hidden layers (paper: 0.15).
    pub dropout: f64,
}

impl Default for Shape {
    fn default() -> Self {
        Shape { dim: 512, hidden: 512, image_layers: 5, text_layers: 2, dropout: 0.15 }
    }
}

/// Shape of the network: the input sizes the data gives and the chosen [`Shape`]
/// (flattened, so `model.json` keeps one flat object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HuseConfig {
    /// Width of the image input (pooled image features).
    pub image_input: usize,
    /// Width of the text input (sentence features, plus TF-IDF columns).
    pub text_input: usize,
    /// Number of classes (the classifier's outputs).
    pub classes: usize,
    /// The towers' shape.
    #[serde(flatten)]
    pub shape: Shape,
}

/// A linear layer over `Var`s.
pub struct Dense {
    /// Weight, (out, in) as PyTorch's `nn.Linear`.
    pub weight: Var,
    /// Bias, (out).
    pub bias: Var,
}

impl Dense {
    fn new(rng: &mut ChaCha8Rng, fan_in: usize, fan_out: usize, device: &Device) -> Result<Self> {
        let bound = 1.0 / (fan_in as f32).sqrt();
        let w: Vec<f32> = (0..fan_in * fan_out).map(|_| rng.random_range(-bound..bound)).collect();
        let b: Vec<f32> = (0..fan_out).map(|_| rng.random_range(-bound..bound)).collect();
        Ok(Dense {
            weight: Var::from_tensor(&Tensor::from_vec(w, (fan_out, fan_in), device)?)?,
            bias: Var::from_tensor(&Tensor::from_vec(b, fan_out, device)?)?,
        })
    }

    /// x W^T + b.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.apply(x, false, None)
    }

    /// (ReLU of) x W^T + b, then dropout when `drop` = Some((p, rng)).
    fn apply(&self, x: &Tensor, relu: bool, drop: Option<(f64, &mut ChaCha8Rng)>) -> Result<Tensor> {
        let (w, b) = (self.weight.as_tensor(), self.bias.as_tensor());
        if x.rank() == 2 && crate::fused::usable(&[x, w, b]) {
            let mask = drop.and_then(|(p, rng)| dropout_mask(x.dim(0).ok()? * w.dim(0).ok()?, p, rng));
            return Ok(x.apply_op3(w, b, crate::fused::DenseOp { relu, mask, device_mask: None })?);
        }
        if x.rank() == 2 && crate::fused::gpu_usable(&[x, w, b]) {
            // On a GPU: the same op's CUDA half; dropout from the device's generator.
            let device_mask = match drop {
                Some((p, _)) if p > 0.0 => {
                    Some(crate::dropout::DeviceDropout::draw(p, (x.dim(0)?, w.dim(0)?), x.device())?)
                }
                _ => None,
            };
            return Ok(x.apply_op3(w, b, crate::fused::DenseOp { relu, mask: None, device_mask })?);
        }
        activate(&x.matmul(&w.t()?)?.broadcast_add(b)?, relu, drop)
    }
}

/// One tower: hidden layers, then the embedding layer.
pub struct Tower {
    /// The hidden layers (ReLU, dropout).
    pub hidden: Vec<Dense>,
    /// The embedding layer.
    pub out: Dense,
}

/// A tower's [`crate::fused::TowerOp`] with its input, masks drawn: [`Chained::apply`] runs it.
struct Chained<'a> {
    tower: &'a Tower,
    input: &'a Tensor,
    op: crate::fused::TowerOp,
}

impl Chained<'_> {
    fn apply(self) -> Result<Tensor> {
        let first = &self.tower.hidden[0];
        Ok(self.input.apply_op3(first.weight.as_tensor(), first.bias.as_tensor(), self.op)?)
    }
}

/// The HUSE model.
pub struct Huse {
    /// Its shape.
    pub config: HuseConfig,
    /// The image tower.
    pub image: Tower,
    /// The text tower.
    pub text: Tower,
    /// The shared classifier over both towers' embeddings.
    pub shared: Dense,
}

/// Rows scaled to unit L2 norm.
pub fn l2_normalise(x: &Tensor) -> Result<Tensor> {
    if x.rank() == 2 {
        // The fused op: on the CPU (f32, f64), or on a GPU where its CUDA half applies.
        let x = x.contiguous()?;
        if (x.device().is_cpu() && matches!(x.dtype(), DType::F32 | DType::F64)) || crate::fused::gpu_usable(&[&x]) {
            return Ok(x.apply_op1(crate::fused::L2NormaliseOp)?);
        }
    }
    l2_normalise_ops(x)
}

/// [`l2_normalise`] from tensor ops (any device, any rank).
pub fn l2_normalise_ops(x: &Tensor) -> Result<Tensor> {
    let n = x.sqr()?.sum_keepdim(D::Minus1)?.sqrt()?.clamp(1e-12, f64::MAX)?;
    Ok(x.broadcast_div(&n)?)
}

/// A dropout mask of `len` values: 0 with probability `p`, else 1/(1-p) (inverted dropout),
/// drawn from `rng` (two draws per 64-bit word, each a 32-bit uniform compared with p).
/// None when p is 0. Value i is the generator's 32-bit word i from its current position, so
/// blocks of the mask are drawn in parallel (each from a copy of the generator moved to its
/// first word: ChaCha is seekable) and the mask is the same, bit for bit, as drawing the
/// words one after another ([`dropout_mask_sequential`]); `rng` ends where that would leave it.
pub fn dropout_mask(len: usize, p: f64, rng: &mut ChaCha8Rng) -> Option<Vec<f32>> {
    use rayon::prelude::*;
    if p <= 0.0 {
        return None;
    }
    let scale = (1.0 / (1.0 - p)) as f32;
    let cut = (p * 4_294_967_296.0) as u64; // a draw u (0..2^32) is dropped iff u < p 2^32
    let start = rng.get_word_pos();
    const BLOCK: usize = 16 * 1024;
    // SAFETY: the blocks cover the mask and each writes every value of its block.
    let mask = unsafe {
        crate::fused::written(len, |mask| {
            mask.par_chunks_mut(BLOCK).enumerate().for_each(|(bi, block)| {
                let mut r = rng.clone();
                r.set_word_pos(start + (bi * BLOCK) as u128);
                for m in block.iter_mut() {
                    m.write(if u64::from(r.next_u32()) < cut { 0.0 } else { scale });
                }
            })
        })
    };
    // The sequential form draws whole 64-bit words: an odd length uses one word more.
    rng.set_word_pos(start + 2 * len.div_ceil(2) as u128);
    Some(mask)
}

/// [`dropout_mask`] drawn one 64-bit word after another: the reference it is tested against.
pub fn dropout_mask_sequential(len: usize, p: f64, rng: &mut ChaCha8Rng) -> Option<Vec<f32>> {
    if p <= 0.0 {
        return None;
    }
    let scale = (1.0 / (1.0 - p)) as f32;
    let cut = (p * 4_294_967_296.0) as u64;
    let mut mask = Vec::with_capacity(len + 1);
    while mask.len() < len {
        let r = rng.next_u64();
        for u in [r & 0xFFFF_FFFF, r >> 32] {
            mask.push(if u < cut { 0.0 } else { scale });
        }
    }
    mask.truncate(len);
    Some(mask)
}

/// Dropout with a mask from [`dropout_mask`] (inverted dropout: kept units scaled by
/// 1/(1-p)); on a GPU from the device's generator instead.
pub fn dropout(x: &Tensor, p: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    if p <= 0.0 {
        return Ok(x.clone());
    }
    if !x.device().is_cpu() {
        // On a GPU the mask is drawn there (curand, seeded by the train stage per epoch):
        // drawing millions of numbers on the host and copying them over each step cost more
        // than the step itself.
        let scale = 1.0 / (1.0 - p);
        let keep = Tensor::rand(0f32, 1f32, x.shape(), x.device())?.ge(p)?.to_dtype(x.dtype())?;
        return Ok((x * keep.affine(scale, 0.0)?)?);
    }
    let mask = dropout_mask(x.elem_count(), p, rng).unwrap_or_default();
    Ok((x * Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?)?)
}

/// `[dense | sparse] W^T + b` (then ReLU when `relu`) without materialising the sparse columns.
fn first_layer(
    layer: &Dense,
    dense: &Tensor,
    sparse: Option<&Sparse>,
    relu: bool,
    drop: Option<(f64, &mut ChaCha8Rng)>,
) -> Result<Tensor> {
    let w = layer.weight.as_tensor();
    let Some(sp) = sparse else { return layer.apply(dense, relu, drop) };
    if crate::fused::usable(&[dense, w, layer.bias.as_tensor()]) && sp.vals.device().is_cpu() {
        let mask = drop.and_then(|(p, rng)| dropout_mask(dense.dim(0).ok()? * w.dim(0).ok()?, p, rng));
        let op = crate::fused::SparseDenseOp::new(
            relu,
            mask,
            &sp.rows.to_vec1()?,
            &sp.cols.to_vec1()?,
            &sp.vals.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
        );
        return Ok(dense.apply_op3(w, layer.bias.as_tensor(), op)?);
    }
    let d = dense.dim(1)?;
    // Contiguous before the transpose: CUDA's matmul takes a transposed operand, not a strided one.
    let mut h = dense.matmul(&w.narrow(1, 0, d)?.contiguous()?.t()?)?;
    if sp.rows.dim(0)? > 0 {
        // Rows of W^T for every non-zero, scaled by its value, summed into its row.
        let picked = w.index_select(&sp.cols, 1)?.t()?.broadcast_mul(&sp.vals)?;
        h = h.index_add(&sp.rows, &picked, 0)?;
    }
    activate(&h.broadcast_add(layer.bias.as_tensor())?, relu, drop)
}

/// ReLU (when `relu`) and dropout (when `drop`) from tensor ops, for the unfused paths.
fn activate(z: &Tensor, relu: bool, drop: Option<(f64, &mut ChaCha8Rng)>) -> Result<Tensor> {
    let z = if relu { z.relu()? } else { z.clone() };
    match drop {
        Some((p, rng)) => dropout(&z, p, rng),
        None => Ok(z),
    }
}

impl Tower {
    fn new(
        rng: &mut ChaCha8Rng,
        input: usize,
        hidden: usize,
        layers: usize,
        dim: usize,
        device: &Device,
    ) -> Result<Self> {
        let mut h = Vec::new();
        let mut fan_in = input;
        for _ in 0..layers {
            h.push(Dense::new(rng, fan_in, hidden, device)?);
            fan_in = hidden;
        }
        Ok(Tower { hidden: h, out: Dense::new(rng, fan_in, dim, device)? })
    }

    /// The L2-normalised embedding of a dense input; `dropout` = Some((p, rng)) in training.
    pub fn embed(&self, x: &Tensor, dropout_rng: Option<(f64, &mut ChaCha8Rng)>) -> Result<Tensor> {
        self.embed_sparse(x, None, dropout_rng)
    }

    /// The L2-normalised embedding of an input whose first columns are `dense` and whose
    /// remaining columns are `sparse` (e.g. TF-IDF): the first layer gathers only the
    /// weight columns of the non-zero entries instead of multiplying by zeros.
    pub fn embed_sparse(
        &self,
        dense: &Tensor,
        sparse: Option<&Sparse>,
        mut dropout_rng: Option<(f64, &mut ChaCha8Rng)>,
    ) -> Result<Tensor> {
        let first = self.hidden.first().unwrap_or(&self.out);
        let n = self.hidden.len();
        if n == 0 {
            return l2_normalise(&first_layer(first, dense, sparse, false, None)?);
        }
        // Dropout after every hidden layer but the last.
        fn drop_at<'a>(last: bool, d: &'a mut Option<(f64, &mut ChaCha8Rng)>) -> Option<(f64, &'a mut ChaCha8Rng)> {
            if last { None } else { d.as_mut().map(|(p, rng)| (*p, &mut **rng)) }
        }
        if self.chainable(dense, sparse) {
            return self.chained(dense, sparse, dropout_rng)?.apply();
        }
        let mut h = first_layer(first, dense, sparse, true, drop_at(n == 1, &mut dropout_rng))?;
        for i in 1..n {
            h = self.hidden[i].apply(&h, true, drop_at(i + 1 == n, &mut dropout_rng))?;
        }
        l2_normalise(&self.out.forward(&h)?)
    }

    /// Whether [`Tower::embed_sparse`] runs as one op: under [`crate::fused::chain_towers`],
    /// at least one hidden layer, and the input and every layer fit the fused CPU ops.
    fn chainable(&self, dense: &Tensor, sparse: Option<&Sparse>) -> bool {
        crate::fused::chaining()
            && !self.hidden.is_empty()
            && dense.rank() == 2
            && self
                .hidden
                .iter()
                .chain([&self.out])
                .all(|l| crate::fused::usable(&[dense, l.weight.as_tensor(), l.bias.as_tensor()]))
            && sparse.is_none_or(|sp| sp.vals.device().is_cpu())
    }

    /// [`Tower::embed_sparse`] as one [`crate::fused::TowerOp`], ready to apply; the dropout
    /// masks are drawn here, in the order of the per-layer path, so both give the same numbers.
    fn chained<'a>(
        &'a self,
        dense: &'a Tensor,
        sparse: Option<&Sparse>,
        mut dropout_rng: Option<(f64, &mut ChaCha8Rng)>,
    ) -> Result<Chained<'a>> {
        use crate::fused::{DenseOp, FirstLayer, TowerOp};
        let (rows, n) = (dense.dim(0)?, self.hidden.len());
        let mut mask = |layer: &Dense, last: bool| -> Result<Option<Vec<f32>>> {
            let units = layer.weight.dim(0)?;
            Ok(if last { None } else { dropout_rng.as_mut().and_then(|(p, rng)| dropout_mask(rows * units, *p, rng)) })
        };
        let first = &self.hidden[0];
        let first_mask = mask(first, n == 1)?;
        let first_op = match sparse {
            Some(sp) => FirstLayer::Sparse(crate::fused::SparseDenseOp::new(
                true,
                first_mask,
                &sp.rows.to_vec1()?,
                &sp.cols.to_vec1()?,
                &sp.vals.flatten_all()?.to_dtype(DType::F32)?.to_vec1()?,
            )),
            None => FirstLayer::Dense(DenseOp { relu: true, mask: first_mask, device_mask: None }),
        };
        let mut rest = Vec::with_capacity(n);
        for i in 1..n {
            let l = &self.hidden[i];
            rest.push((
                DenseOp { relu: true, mask: mask(l, i + 1 == n)?, device_mask: None },
                l.weight.as_tensor().clone(),
                l.bias.as_tensor().clone(),
            ));
        }
        rest.push((
            DenseOp { relu: false, mask: None, device_mask: None },
            self.out.weight.as_tensor().clone(),
            self.out.bias.as_tensor().clone(),
        ));
        Ok(Chained { tower: self, input: dense, op: TowerOp::new(first_op, rest) })
    }

    fn named<'a>(&'a self, prefix: &str, out: &mut Vec<(String, &'a Var)>) {
        for (i, l) in self.hidden.iter().enumerate() {
            out.push((format!("{prefix}.{i}.weight"), &l.weight));
            out.push((format!("{prefix}.{i}.bias"), &l.bias));
        }
        out.push((format!("{prefix}.out.weight"), &self.out.weight));
        out.push((format!("{prefix}.out.bias"), &self.out.bias));
    }
}

impl Huse {
    /// A freshly initialised model.
    pub fn new(config: &HuseConfig, rng: &mut ChaCha8Rng, device: &Device) -> Result<Self> {
        ensure!(config.classes >= 2, "HUSE needs at least 2 classes");
        ensure!((0.0..1.0).contains(&config.shape.dropout), "dropout must be in [0, 1)");
        let image = Tower::new(
            rng,
            config.image_input,
            config.shape.hidden,
            config.shape.image_layers,
            config.shape.dim,
            device,
        )?;
        let text = Tower::new(
            rng,
            config.text_input,
            config.shape.hidden,
            config.shape.text_layers,
            config.shape.dim,
            device,
        )?;
        let shared = Dense::new(rng, config.shape.dim, config.classes, device)?;
        Ok(Huse { config: config.clone(), image, text, shared })
    }

    /// The embeddings of a batch, `(phi_I, phi_T)`: [`Tower::embed`] of the image features
    /// and [`Tower::embed_sparse`] of the text features, the dropout masks drawn in that order.
    /// Under [`crate::fused::chain_towers`] the two towers run at the same time (each one op,
    /// masks drawn first), so one tower's serial parts (the GEMM's packing of W) overlap
    /// the other's parallel work; otherwise one after the other.
    pub fn embed_pair(
        &self,
        image: &Tensor,
        text: &Tensor,
        sparse: Option<&Sparse>,
        mut dropout_rng: Option<(f64, &mut ChaCha8Rng)>,
    ) -> Result<(Tensor, Tensor)> {
        fn reborrow<'a>(d: &'a mut Option<(f64, &mut ChaCha8Rng)>) -> Option<(f64, &'a mut ChaCha8Rng)> {
            d.as_mut().map(|(p, rng)| (*p, &mut **rng))
        }
        if self.image.chainable(image, None) && self.text.chainable(text, sparse) {
            let image_op = self.image.chained(image, None, reborrow(&mut dropout_rng))?;
            let text_op = self.text.chained(text, sparse, reborrow(&mut dropout_rng))?;
            let (phi_i, phi_t) = rayon::join(|| image_op.apply(), || text_op.apply());
            return Ok((phi_i?, phi_t?));
        }
        let phi_i = self.image.embed(image, reborrow(&mut dropout_rng))?;
        let phi_t = self.text.embed_sparse(text, sparse, reborrow(&mut dropout_rng))?;
        Ok((phi_i, phi_t))
    }

    /// Class logits `W phi + b` of embeddings.
    pub fn logits(&self, emb: &Tensor) -> Result<Tensor> {
        self.shared.forward(emb)
    }

    /// Every parameter with its name.
    pub fn named_vars(&self) -> Vec<(String, &Var)> {
        let mut out = Vec::new();
        self.image.named("image_tower", &mut out);
        self.text.named("text_tower", &mut out);
        out.push(("shared.weight".into(), &self.shared.weight));
        out.push(("shared.bias".into(), &self.shared.bias));
        out
    }

    /// The parameters, for an optimiser.
    pub fn vars(&self) -> Vec<Var> {
        self.named_vars().into_iter().map(|(_, v)| v.clone()).collect()
    }

    /// Saves the parameters as safetensors.
    pub fn save(&self, path: &Path) -> Result<()> {
        let map: HashMap<String, Tensor> =
            self.named_vars().into_iter().map(|(n, v)| (n, v.as_tensor().clone())).collect();
        candle_core::safetensors::save(&map, path).with_context(|| format!("saving {}", path.display()))
    }

    /// Replaces the parameters by those saved in `path`.
    pub fn load_weights(&self, path: &Path) -> Result<()> {
        let dev = self.shared.weight.device().clone();
        let map = candle_core::safetensors::load(path, &dev).with_context(|| format!("loading {}", path.display()))?;
        for (n, v) in self.named_vars() {
            let t = map.get(&n).with_context(|| format!("{} has no `{n}`", path.display()))?;
            ensure!(
                t.shape() == v.shape(),
                "{}: `{n}` has shape {:?}, expected {:?}",
                path.display(),
                t.shape(),
                v.shape()
            );
            v.set(&t.to_dtype(DType::F32)?)?;
        }
        Ok(())
    }

    /// A model with the saved parameters.
    pub fn load(config: &HuseConfig, path: &Path, device: &Device) -> Result<Self> {
        let mut rng = <ChaCha8Rng as rand::SeedableRng>::seed_from_u64(0);
        let m = Huse::new(config, &mut rng, device)?;
        m.load_weights(path)?;
        Ok(m)
    }
}

/// What `model.json` holds: enough to rebuild and use the model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelMeta {
    /// The network's shape.
    pub network: HuseConfig,
    /// Whether the text input has TF-IDF columns.
    pub use_tfidf: bool,
    /// Image weight of the fused prediction.
    pub fusion_weight: f32,
    /// The epoch whose model was kept.
    pub best_epoch: usize,
    /// That epoch's validation figures.
    pub val: EpochVal,
}

/// Validation figures of one epoch.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct EpochVal {
    /// Validation accuracy of the image tower.
    pub acc_image: f64,
    /// Validation accuracy of the text tower.
    pub acc_text: f64,
    /// Validation accuracy of the fused prediction.
    pub acc_both: f64,
    /// The image weight of the fused prediction.
    pub fusion_weight: f32,
}

impl ModelMeta {
    /// Reads `model.json`.
    pub fn read(path: &Path) -> Result<Self> {
        serde_json::from_slice(&std::fs::read(path).with_context(|| format!("reading {}", path.display()))?)
            .with_context(|| format!("parsing {}", path.display()))
    }
}

/// Softmax probabilities (image, text) and embeddings (image, text) of the rows `idx`, in
/// eval mode (no dropout), `batch` rows at a time; all row-major.
#[allow(clippy::type_complexity)]
pub fn predict(
    model: &Huse,
    ds: &crate::data::Dataset,
    idx: &[usize],
    use_tfidf: bool,
    device: &Device,
    batch: usize,
) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>, Vec<f32>)> {
    let (mut pi, mut pt, mut ei, mut et) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let k = ds.classes;
    for chunk in idx.chunks(batch.max(1)) {
        let b = ds.batch(chunk, use_tfidf, device)?;
        let phi_i = model.image.embed(&b.image, None)?;
        let phi_t = model.text.embed_sparse(&b.text, b.tfidf.as_ref(), None)?;
        let li: Vec<f32> = model.logits(&phi_i)?.flatten_all()?.to_vec1()?;
        let lt: Vec<f32> = model.logits(&phi_t)?.flatten_all()?.to_vec1()?;
        pi.extend(crate::metrics::softmax_rows(&li, k));
        pt.extend(crate::metrics::softmax_rows(&lt, k));
        ei.extend(phi_i.flatten_all()?.to_vec1::<f32>()?);
        et.extend(phi_t.flatten_all()?.to_vec1::<f32>()?);
    }
    Ok((pi, pt, ei, et))
}
