//! HUSE's three losses, on the L2-normalised tower outputs (never on logits).
//!
//! `d(u, v) = 1 - cos(u, v)` is the cosine DISTANCE (for unit vectors `1 - u.v`):
//!
//! * [`class_loss`] — Eq. 8: softmax cross-entropy of `W phi_I` and of `W phi_T`, averaged.
//! * [`graph_loss`] — Eqs. 9-11: for a block of embedding pairs (m, n), m != n,
//!   `(1/N^2) * sum sigma_mn * (d(phi_m, phi_n) - A[y_m, y_n])^2` with
//!   `sigma_mn = 1` iff `A[y_m, y_n] < zeta` and `d(phi_m, phi_n) < zeta` (a constant mask:
//!   no gradient flows through it). Variant `hinge` adds, for pairs with `A >= zeta`,
//!   `max(0, zeta - d)^2`: unrelated classes are pushed at least `zeta` apart, as the
//!   paper's text describes. Blocks: `within` (image-image and text-text), `across`
//!   (image m with text n, m != n: an item's own pair is the gap loss's job), or `all` (the
//!   three); the loss is the mean over the chosen blocks.
//! * [`gap_loss`] — Eq. 12: `(1/N) sum_n d(phi_I(p_n), phi_T(q_n))`: pulls an item's image
//!   and text embeddings together.
//! * [`total`] — Eq. 5: `alpha * L_class + beta * L_graph + gamma * L_gap`.

use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

/// Which graph-loss formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GraphVariant {
    /// Eqs. 9-11 as printed: pairs outside the margin are switched off.
    #[default]
    Paper,
    /// Also push pairs of unrelated classes (A >= zeta) at least zeta apart.
    Hinge,
}

/// Which pairs the graph loss looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum GraphPairs {
    /// image-image and text-text.
    Within,
    /// image of m with text of n.
    Across,
    /// all three blocks.
    #[default]
    All,
}

/// Loss weights and graph-loss settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LossConfig {
    #[serde(default = "one")]
    pub alpha: f64,
    #[serde(default = "half")]
    pub beta: f64,
    #[serde(default = "half")]
    pub gamma: f64,
    /// The margin of sigma.
    #[serde(default = "d_zeta")]
    pub zeta: f64,
    #[serde(default)]
    pub variant: GraphVariant,
    #[serde(default)]
    pub pairs: GraphPairs,
}
fn one() -> f64 {
    1.0
}
fn half() -> f64 {
    0.5
}
fn d_zeta() -> f64 {
    0.5
}

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig { alpha: 1.0, beta: 0.5, gamma: 0.5, zeta: 0.5, variant: GraphVariant::Paper, pairs: GraphPairs::All }
    }
}

/// The loss components of one batch (scalars).
pub struct Losses {
    pub class: Tensor,
    pub graph: Tensor,
    pub gap: Tensor,
    pub total: Tensor,
}

/// Cosine distances `1 - a b^T` between unit-norm rows: (N, M).
pub fn cosine_distances(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    Ok(a.matmul(&b.t()?)?.affine(-1.0, 1.0)?)
}

/// Eq. 8: mean of the image and text cross-entropies.
pub fn class_loss(logits_image: &Tensor, logits_text: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let li = candle_nn::loss::cross_entropy(logits_image, labels)?;
    let lt = candle_nn::loss::cross_entropy(logits_text, labels)?;
    Ok(((li + lt)? * 0.5)?)
}

/// Eq. 12: mean cosine distance between each item's image and text embedding.
pub fn gap_loss(phi_image: &Tensor, phi_text: &Tensor) -> Result<Tensor> {
    Ok((phi_image * phi_text)?.sum(1)?.affine(-1.0, 1.0)?.mean_all()?)
}

/// A[y1][:, y2]: the class distances of every pair.
fn pair_targets(a: &Tensor, y1: &Tensor, y2: &Tensor) -> Result<Tensor> {
    Ok(a.index_select(y1, 0)?.index_select(y2, 1)?)
}

/// One block of Eqs. 9-11 (plus the hinge term): pairs (m, n), m != n, of `e1` x `e2`.
/// On the CPU the per-pair terms and their gradient are one fused pass ([`GraphBlock`]);
/// elsewhere they are composed from tensor ops ([`graph_loss_block_ops`]). Both are tested equal.
pub fn graph_loss_block(e1: &Tensor, e2: &Tensor, y1: &Tensor, y2: &Tensor, a: &Tensor, zeta: f64, variant: GraphVariant) -> Result<Tensor> {
    if !e1.device().is_cpu() {
        return graph_loss_block_ops(e1, e2, y1, y2, a, zeta, variant);
    }
    let d = cosine_distances(e1, e2)?.contiguous()?;
    let n = d.dim(0)?;
    let classes = a.dim(1)?;
    let a_host: Vec<f64> = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let (rows, cols): (Vec<u32>, Vec<u32>) = (y1.to_vec1()?, y2.to_vec1()?);
    Ok(d.apply_op1(GraphBlock { a: a_host, classes, rows, cols, zeta, hinge: variant == GraphVariant::Hinge, n })?)
}

/// The graph-loss block from tensor ops (any device).
pub fn graph_loss_block_ops(e1: &Tensor, e2: &Tensor, y1: &Tensor, y2: &Tensor, a: &Tensor, zeta: f64, variant: GraphVariant) -> Result<Tensor> {
    let n = e1.dim(0)?;
    let d = cosine_distances(e1, e2)?;
    let target = pair_targets(a, y1, y2)?.to_dtype(d.dtype())?;
    let off_diag = Tensor::eye(n, d.dtype(), d.device())?.affine(-1.0, 1.0)?;
    let near_class = target.lt(zeta)?.to_dtype(d.dtype())?;
    let near_emb = d.detach().lt(zeta)?.to_dtype(d.dtype())?;
    let sigma = ((near_class.clone() * near_emb)? * &off_diag)?;
    let mut per_pair = (sigma * (&d - &target)?.sqr()?)?;
    if variant == GraphVariant::Hinge {
        let far_class = (near_class.affine(-1.0, 1.0)? * &off_diag)?;
        let push = d.affine(-1.0, zeta)?.relu()?.sqr()?;
        per_pair = (per_pair + (far_class * push)?)?;
    }
    Ok((per_pair.sum_all()? / (n * n) as f64)?)
}

/// The fused graph-loss block on a distance matrix `d` (n x m): value
/// `sum_{i != j} [t < zeta][d < zeta] (d - t)^2 (+ hinge [t >= zeta] max(0, zeta - d)^2) / n^2`
/// and its gradient `(2 [t < zeta][d < zeta] (d - t) - hinge 2 [t >= zeta] max(0, zeta - d)) / n^2`,
/// with `t = A[y_i][y_j]`, in one pass each (rows in parallel, summed in row order, so the
/// value does not depend on the thread count), instead of a dozen full-size intermediates.
pub struct GraphBlock {
    /// The class distance matrix A, row-major `classes` x `classes`.
    pub a: Vec<f64>,
    pub classes: usize,
    /// Labels of the rows (y_i) and of the columns (y_j).
    pub rows: Vec<u32>,
    pub cols: Vec<u32>,
    pub zeta: f64,
    pub hinge: bool,
    pub n: usize,
}

/// Rows per parallel task.
const GRAPH_ROWS: usize = 32;

impl GraphBlock {
    /// (value, d value / d d) of pair (i, j) at distance `d`.
    #[inline]
    fn term(&self, i: usize, j: usize, a_row: &[f64], d: f64) -> (f64, f64) {
        if i == j {
            return (0.0, 0.0);
        }
        let t = a_row[self.cols[j] as usize];
        if t < self.zeta {
            if d < self.zeta { ((d - t) * (d - t), 2.0 * (d - t)) } else { (0.0, 0.0) }
        } else if self.hinge && d < self.zeta {
            ((self.zeta - d) * (self.zeta - d), -2.0 * (self.zeta - d))
        } else {
            (0.0, 0.0)
        }
    }

    fn a_row(&self, i: usize) -> &[f64] {
        let r = self.rows[i] as usize * self.classes;
        &self.a[r..r + self.classes]
    }

    /// Sum of the terms over `d` (row-major, `m` columns), divided by n^2.
    fn value<T: Copy + Into<f64> + Sync>(&self, d: &[T], m: usize) -> f64 {
        use rayon::prelude::*;
        let partial: Vec<f64> = d
            .par_chunks(GRAPH_ROWS * m)
            .enumerate()
            .map(|(c, block)| {
                let mut s = 0.0;
                for (r, row) in block.chunks(m).enumerate() {
                    let i = c * GRAPH_ROWS + r;
                    let a_row = self.a_row(i);
                    for (j, &x) in row.iter().enumerate() {
                        s += self.term(i, j, a_row, x.into()).0;
                    }
                }
                s
            })
            .collect();
        partial.iter().sum::<f64>() / (self.n * self.n) as f64
    }

    /// The gradient w.r.t. `d`, times `upstream`.
    fn gradient<T: Copy + Default + Into<f64> + Send + Sync>(&self, d: &[T], m: usize, upstream: f64, from: impl Fn(f64) -> T + Sync) -> Vec<T> {
        use rayon::prelude::*;
        let scale = upstream / (self.n * self.n) as f64;
        let mut g = vec![T::default(); d.len()];
        g.par_chunks_mut(GRAPH_ROWS * m).zip(d.par_chunks(GRAPH_ROWS * m)).enumerate().for_each(|(c, (gb, db))| {
            for (r, (gr, dr)) in gb.chunks_mut(m).zip(db.chunks(m)).enumerate() {
                let i = c * GRAPH_ROWS + r;
                let a_row = self.a_row(i);
                for (j, (g, &x)) in gr.iter_mut().zip(dr).enumerate() {
                    *g = from(self.term(i, j, a_row, x.into()).1 * scale);
                }
            }
        });
        g
    }
}

impl candle_core::CustomOp1 for GraphBlock {
    fn name(&self) -> &'static str {
        "huse-graph-loss-block"
    }

    fn cpu_fwd(&self, storage: &candle_core::CpuStorage, layout: &candle_core::Layout) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use candle_core::CpuStorage as S;
        let (_, m) = layout.shape().dims2()?;
        let (start, end) = layout.contiguous_offsets().ok_or_else(|| candle_core::Error::Msg("graph block needs a contiguous input".into()))?;
        let out = match storage {
            S::F32(v) => S::F32(vec![self.value(&v[start..end], m) as f32]),
            S::F64(v) => S::F64(vec![self.value(&v[start..end], m)]),
            _ => return Err(candle_core::Error::Msg("graph block supports f32 and f64".into())),
        };
        Ok((out, candle_core::Shape::from(())))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad_res: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let (_, m) = arg.dims2()?;
        let upstream = grad_res.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let g = if arg.dtype() == DType::F32 {
            let d: Vec<f32> = arg.flatten_all()?.to_vec1()?;
            Tensor::from_vec(self.gradient(&d, m, upstream, |x| x as f32), arg.shape(), arg.device())?
        } else {
            let d: Vec<f64> = arg.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
            Tensor::from_vec(self.gradient(&d, m, upstream, |x| x), arg.shape(), arg.device())?.to_dtype(arg.dtype())?
        };
        Ok(Some(g))
    }
}

/// Eqs. 9-11 over the chosen blocks (mean of the blocks).
pub fn graph_loss(phi_image: &Tensor, phi_text: &Tensor, labels: &Tensor, a: &Tensor, zeta: f64, variant: GraphVariant, pairs: GraphPairs) -> Result<Tensor> {
    let y = labels;
    let mut blocks = Vec::new();
    if matches!(pairs, GraphPairs::Within | GraphPairs::All) {
        blocks.push(graph_loss_block(phi_image, phi_image, y, y, a, zeta, variant)?);
        blocks.push(graph_loss_block(phi_text, phi_text, y, y, a, zeta, variant)?);
    }
    if matches!(pairs, GraphPairs::Across | GraphPairs::All) {
        blocks.push(graph_loss_block(phi_image, phi_text, y, y, a, zeta, variant)?);
    }
    let k = blocks.len() as f64;
    Ok((Tensor::stack(&blocks, 0)?.sum_all()? / k)?)
}

/// All three losses and Eq. 5's weighted total.
pub fn total(
    phi_image: &Tensor,
    phi_text: &Tensor,
    logits_image: &Tensor,
    logits_text: &Tensor,
    labels: &Tensor,
    a: &Tensor,
    cfg: &LossConfig,
) -> Result<Losses> {
    let class = class_loss(logits_image, logits_text, labels)?;
    let zero = || Tensor::zeros((), phi_image.dtype(), phi_image.device());
    // A weight of 0 skips the computation (its value is still reported as 0).
    let graph = if cfg.beta != 0.0 { graph_loss(phi_image, phi_text, labels, a, cfg.zeta, cfg.variant, cfg.pairs)? } else { zero()? };
    let gap = if cfg.gamma != 0.0 { gap_loss(phi_image, phi_text)? } else { zero()? };
    let total = ((class.affine(cfg.alpha, 0.0)? + graph.affine(cfg.beta, 0.0)?)? + gap.affine(cfg.gamma, 0.0)?)?;
    Ok(Losses { class, graph, gap, total })
}
