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
//! * [`contrastive_loss`] — not in the paper, weight `delta` (default 0): a symmetric InfoNCE
//!   over the batch, as CLIP trains. With logits `phi_I phi_T^T / tau`, each image must pick
//!   its own text among the batch's texts and each text its own image: the mean of the two
//!   cross-entropies. The gap loss pulls each pair together but has no negatives; this term
//!   also keeps two items of one class apart, which instance-level search needs. With
//!   `learn_tau` the temperature is learned as CLIP learns it ([`contrastive_loss_scaled`]).
//! * [`total`] — Eq. 5: `alpha * L_class + beta * L_graph + gamma * L_gap`, plus
//!   `delta * L_contrastive`.

use std::mem::MaybeUninit;

use anyhow::Result;
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

use crate::fused::{Element, gemm};

/// Which graph-loss formula.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum GraphVariant {
    /// Eqs. 9-11 as printed: pairs outside the margin are switched off.
    #[default]
    Paper,
    /// Also push pairs of unrelated classes (A >= zeta) at least zeta apart.
    Hinge,
}

/// Which pairs the graph loss looks at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, schemars::JsonSchema)]
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

/// Loss weights and graph-loss settings. Their defaults — the paper's alpha 1, beta 0.5,
/// gamma 0.5 and our zeta 0.5 — are written once, in [`LossConfig::default`], which the
/// train stage's config also reads.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    /// Weight of the classification loss.
    pub alpha: f64,
    /// Weight of the semantic-graph loss.
    pub beta: f64,
    /// Weight of the cross-modal gap loss.
    pub gamma: f64,
    /// The margin of sigma.
    pub zeta: f64,
    /// Which graph loss (the paper's, or with a hinge for unrelated classes).
    pub variant: GraphVariant,
    /// Which pairs of the batch the graph loss sums over.
    pub pairs: GraphPairs,
    /// Weight of the contrastive (InfoNCE) term; 0, the paper's model, skips it.
    pub delta: f64,
    /// Temperature of the contrastive term's logits (`phi_I phi_T^T / tau`); with `learn_tau`
    /// its starting value.
    pub tau: f64,
    /// Learn the temperature, as CLIP does: `ln(1/tau)` is a trained parameter
    /// ([`contrastive_loss_scaled`]), kept within [`LOG_SCALE_RANGE`].
    pub learn_tau: bool,
}

/// The range a learned `ln(1/tau)` is kept in after each step (CLIP's: a logit scale of at
/// most 100, i.e. tau at least 0.01; and tau at most 1).
pub const LOG_SCALE_RANGE: (f64, f64) = (0.0, 4.605_170_185_988_092);

impl Default for LossConfig {
    fn default() -> Self {
        LossConfig {
            alpha: 1.0,
            beta: 0.5,
            gamma: 0.5,
            zeta: 0.5,
            variant: GraphVariant::Paper,
            pairs: GraphPairs::All,
            delta: 0.0,
            tau: 0.05,
            learn_tau: false,
        }
    }
}

/// The loss components of one batch (scalars).
pub struct Losses {
    /// L_class: cross-entropy of both towers' class predictions.
    pub class: Tensor,
    /// L_graph: the semantic-graph loss.
    pub graph: Tensor,
    /// L_gap: the cross-modal gap loss.
    pub gap: Tensor,
    /// L_contrastive: the symmetric InfoNCE term (0 when its weight is 0).
    pub contrastive: Tensor,
    /// alpha L_class + beta L_graph + gamma L_gap + delta L_contrastive.
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
    #[cfg(feature = "cuda")]
    if crate::fused::gpu_usable(&[phi_image, phi_text]) {
        return Ok(phi_image.apply_op2(phi_text, crate::cuda::GapLossOp)?);
    }
    if phi_image.device().is_cpu() && phi_image.dtype() == phi_text.dtype() && phi_image.rank() == 2 {
        let (a, b) = (phi_image.contiguous()?, phi_text.contiguous()?);
        match a.dtype() {
            DType::F32 => return Ok(a.apply_op2(&b, GapLossOp::<f32>(std::marker::PhantomData))?),
            DType::F64 => return Ok(a.apply_op2(&b, GapLossOp::<f64>(std::marker::PhantomData))?),
            _ => {}
        }
    }
    gap_loss_ops(phi_image, phi_text)
}

/// [`gap_loss`] on the CPU as one op: `1 - mean_n <phi_I(n), phi_T(n)>` (unit rows: the
/// cosine distance), the row products in parallel and summed in a fixed order; backward
/// `-g/N` times the other embedding, in parallel. The tensor-op version makes a product
/// matrix, a row sum and, backward, a broadcast and two products, each a pass on one thread.
pub struct GapLossOp<T>(pub std::marker::PhantomData<T>);

/// Rows per parallel block of [`GapLossOp`] (fixed: the value does not depend on the threads).
const GAP_ROWS: usize = 64;

impl<T: Element> candle_core::CustomOp2 for GapLossOp<T> {
    fn name(&self) -> &'static str {
        "huse-gap-loss-cpu"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (n, d) = l1.shape().dims2()?;
        if l2.shape().dims2()? != (n, d) {
            candle_core::bail!("gap loss: embeddings {:?} and {:?} differ", l1.shape(), l2.shape());
        }
        let (a, b) = (T::slice(s1, l1)?, T::slice(s2, l2)?);
        let block = GAP_ROWS * d.max(1);
        let partial: Vec<f64> = a
            .par_chunks(block)
            .zip(b.par_chunks(block))
            .map(|(ab, bb)| ab.chunks(d.max(1)).zip(bb.chunks(d.max(1))).map(|(x, y)| dot(x, y).to_f64()).sum::<f64>())
            .collect();
        // 1 - the mean (NaN for no rows, as the tensor-op mean).
        let value = 1.0 - partial.iter().sum::<f64>() / n as f64;
        Ok((T::storage(vec![T::from_f64(value)]), candle_core::Shape::from(())))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let c = T::from_f64(-grad.to_dtype(DType::F64)?.to_scalar::<f64>()? / a.dim(0)? as f64);
        // d/da = c b, d/db = c a, for the arguments that need one.
        let scaled = |t: &Tensor, other: &Tensor| -> candle_core::Result<Option<Tensor>> {
            if !t.track_op() {
                return Ok(None);
            }
            let (s, l) = other.storage_and_layout();
            let candle_core::Storage::Cpu(s) = &*s else { candle_core::bail!("gap loss: CPU tensors expected") };
            let o = T::slice(s, l)?;
            // SAFETY: the chunks of g and o line up (equal lengths) and each writes its values.
            let g = unsafe {
                crate::fused::written(o.len(), |g| {
                    use rayon::prelude::*;
                    g.par_chunks_mut(crate::fused::CHUNK).zip(o.par_chunks(crate::fused::CHUNK)).for_each(|(g, o)| {
                        for (g, &o) in g.iter_mut().zip(o) {
                            g.write(c * o);
                        }
                    })
                })
            };
            Ok(Some(Tensor::from_vec(g, other.shape(), other.device())?))
        };
        Ok((scaled(a, b)?, scaled(b, a)?))
    }
}

/// `<x, y>` in eight running sums (vectorises; a fixed order).
fn dot<T: Element>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let (xr, yr) = (xc.remainder(), yc.remainder());
    for (xb, yb) in xc.zip(yc) {
        for k in 0..8 {
            acc[k] += xb[k] * yb[k];
        }
    }
    for (k, (&a, &b)) in xr.iter().zip(yr).enumerate() {
        acc[k] += a * b;
    }
    ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
}

/// [`gap_loss`] from tensor ops (any device).
pub fn gap_loss_ops(phi_image: &Tensor, phi_text: &Tensor) -> Result<Tensor> {
    Ok((phi_image * phi_text)?.sum(1)?.affine(-1.0, 1.0)?.mean_all()?)
}

/// A[y1][:, y2]: the class distances of every pair.
fn pair_targets(a: &Tensor, y1: &Tensor, y2: &Tensor) -> Result<Tensor> {
    Ok(a.index_select(y1, 0)?.index_select(y2, 1)?)
}

/// One block of Eqs. 9-11 (plus the hinge term): pairs (m, n), m != n, of `e1` x `e2`.
/// On the CPU (f32, f64) one fused op ([`GraphLossOp`]); on a GPU (f32, a `--features cuda`
/// build) the similarities by cuBLAS and one kernel for every pair's value and derivative;
/// elsewhere composed from tensor ops ([`graph_loss_block_ops`]). All are tested equal.
pub fn graph_loss_block(
    e1: &Tensor,
    e2: &Tensor,
    y1: &Tensor,
    y2: &Tensor,
    a: &Tensor,
    zeta: f64,
    variant: GraphVariant,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if crate::fused::gpu_usable(&[e1, e2]) && y1.dtype() == DType::U32 && y2.dtype() == DType::U32 {
        let s = e1.matmul(&e2.t()?)?;
        let terms = crate::cuda::GraphTerms {
            a: a.to_dtype(DType::F32)?.contiguous()?,
            y1: y1.contiguous()?,
            y2: y2.contiguous()?,
            zeta: zeta as f32,
            hinge: variant == GraphVariant::Hinge,
        };
        return Ok(s.apply_op1(crate::cuda::GraphTermsOp(terms))?);
    }
    if !e1.device().is_cpu() || !matches!(e1.dtype(), DType::F32 | DType::F64) {
        return graph_loss_block_ops(e1, e2, y1, y2, a, zeta, variant);
    }
    let classes = a.dim(1)?;
    let a_host: Vec<f64> = a.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let (rows, cols): (Vec<u32>, Vec<u32>) = (y1.to_vec1()?, y2.to_vec1()?);
    let terms = GraphBlock { a: a_host, classes, rows, cols, zeta, hinge: variant == GraphVariant::Hinge };
    // Within a modality e1 and e2 are one tensor: the op then returns the whole gradient
    // through its first argument (one GEMM instead of two).
    let same = e1.id() == e2.id();
    let e1 = e1.contiguous()?;
    let e2 = if same { e1.clone() } else { e2.contiguous()? };
    Ok(match e1.dtype() {
        DType::F32 => e1.apply_op2(&e2, GraphLossOp::<f32>::new(terms, same))?,
        _ => e1.apply_op2(&e2, GraphLossOp::<f64>::new(terms, same))?,
    })
}

/// The graph-loss block from tensor ops (any device).
pub fn graph_loss_block_ops(
    e1: &Tensor,
    e2: &Tensor,
    y1: &Tensor,
    y2: &Tensor,
    a: &Tensor,
    zeta: f64,
    variant: GraphVariant,
) -> Result<Tensor> {
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

/// The per-pair terms of one graph-loss block: for a pair (i, j), i != j, at cosine distance
/// `d` with `t = A[y_i][y_j]`, the value `[t < zeta][d < zeta] (d - t)^2` (+ hinge
/// `[t >= zeta][d < zeta] (zeta - d)^2`) and its derivative in `d`; the block is their sum / n^2.
pub struct GraphBlock {
    /// The class distance matrix A, row-major `classes` x `classes`.
    pub a: Vec<f64>,
    /// Number of classes (the side of `a`).
    pub classes: usize,
    /// Labels of the rows (y_i) and of the columns (y_j).
    pub rows: Vec<u32>,
    /// Labels of the columns (y_j).
    pub cols: Vec<u32>,
    /// The margin zeta.
    pub zeta: f64,
    /// Add the hinge term for unrelated pairs.
    pub hinge: bool,
}

/// Rows per parallel task.
const GRAPH_ROWS: usize = 32;

impl GraphBlock {
    /// (value, d value / d d) of pair (i, j) at distance `d`, with target distance
    /// `t` = A[y_i][y_j]; the reference form of what [`GraphBlock::row`] computes for a row.
    #[cfg(test)]
    fn term(&self, i: usize, j: usize, t: f64, d: f64) -> (f64, f64) {
        if i == j {
            return (0.0, 0.0);
        }
        if t < self.zeta {
            if d < self.zeta { ((d - t) * (d - t), 2.0 * (d - t)) } else { (0.0, 0.0) }
        } else if self.hinge && d < self.zeta {
            ((self.zeta - d) * (self.zeta - d), -2.0 * (self.zeta - d))
        } else {
            (0.0, 0.0)
        }
    }

    /// One stretch of a row without its diagonal pair: `coef[j]` = -scale * d value / d s
    /// of pair j, returns the stretch's value. Branch-free (a pair is active when d < zeta
    /// and either its target t < zeta, pulled to t, or the variant is the hinge, pushed out
    /// to zeta; `(zeta - d)^2 = (d - zeta)^2`), with eight running sums in a fixed order, so
    /// the compiler vectorises it and the sum does not depend on the thread count.
    #[inline]
    fn stretch<T: Element>(&self, s: &[T], t: &[f64], coef: &mut [MaybeUninit<T>], scale: f64) -> f64 {
        let (zeta, hinge) = (self.zeta, self.hinge);
        let mut acc = [0f64; 8];
        let term = |sv: T, t: f64, cv: &mut MaybeUninit<T>| -> f64 {
            let d = 1.0 - sv.to_f64();
            let target = if t < zeta { t } else { zeta };
            let active = d < zeta && (t < zeta || hinge);
            let diff = if active { d - target } else { 0.0 };
            // d = 1 - s, so d/ds = -d/dd.
            cv.write(T::from_f64(-2.0 * diff * scale));
            diff * diff
        };
        let (mut sc, mut tc, mut cc) = (s.chunks_exact(8), t.chunks_exact(8), coef.chunks_exact_mut(8));
        for ((sb, tb), cb) in (&mut sc).zip(&mut tc).zip(&mut cc) {
            for k in 0..8 {
                acc[k] += term(sb[k], tb[k], &mut cb[k]);
            }
        }
        for (k, ((&sv, &tv), cv)) in sc.remainder().iter().zip(tc.remainder()).zip(cc.into_remainder()).enumerate() {
            acc[k] += term(sv, tv, cv);
        }
        ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))
    }

    /// Row `i` of the block (similarities `s`, targets `t` = A[y_i][y_j] for every column j)
    /// into `coef`; the diagonal pair (i, i) — an item with itself — counts for nothing.
    fn row<T: Element>(&self, i: usize, s: &[T], t: &[f64], coef: &mut [MaybeUninit<T>], scale: f64) -> f64 {
        if i >= s.len() {
            return self.stretch(s, t, coef, scale);
        }
        coef[i].write(T::default());
        let left = self.stretch(&s[..i], &t[..i], &mut coef[..i], scale);
        left + self.stretch(&s[i + 1..], &t[i + 1..], &mut coef[i + 1..], scale)
    }

    /// From the similarities `s` = e1 e2^T (row-major, `m` columns): the block's value and
    /// d value / d s for every pair. Rows run in parallel; the value sums rows in order, so it
    /// does not depend on the thread count. The targets A[y_i][y_j] are gathered once per
    /// class present among the rows (not once per pair), so a row reads them contiguously.
    fn value_and_coef<T: Element>(&self, s: &[T], m: usize) -> (f64, Vec<T>) {
        use rayon::prelude::*;
        let n = self.rows.len();
        let scale = 1.0 / (n * n) as f64;
        // targets[slot[c]] = A[c][y_j] for j < m, for each class c among the rows.
        let mut slot = vec![usize::MAX; self.classes];
        let mut present = Vec::new();
        for &c in &self.rows {
            if slot[c as usize] == usize::MAX {
                slot[c as usize] = present.len();
                present.push(c as usize);
            }
        }
        let targets: Vec<Vec<f64>> = present
            .par_iter()
            .map(|&c| {
                let a_row = &self.a[c * self.classes..(c + 1) * self.classes];
                self.cols.iter().map(|&y| a_row[y as usize]).collect()
            })
            .collect();
        let mut partial: Vec<f64> = Vec::new();
        // SAFETY: every row of coef is written whole ([`GraphBlock::row`]: `stretch` writes
        // each value it is given, `row` the diagonal), so no zero-fill first.
        let coef = unsafe {
            crate::fused::written(s.len(), |coef| {
                partial = coef
                    .par_chunks_mut(GRAPH_ROWS * m)
                    .zip(s.par_chunks(GRAPH_ROWS * m))
                    .enumerate()
                    .map(|(c, (cb, sb))| {
                        let mut total = 0.0;
                        for (r, (cr, sr)) in cb.chunks_mut(m).zip(sb.chunks(m)).enumerate() {
                            let i = c * GRAPH_ROWS + r;
                            total += self.row(i, sr, &targets[slot[self.rows[i] as usize]], cr, scale);
                        }
                        total
                    })
                    .collect();
            })
        };
        (partial.iter().sum::<f64>() * scale, coef)
    }
}

/// Rows and columns per tile of [`symmetric_self_product`].
const SYM_BLOCK: usize = 256;

/// `s = e e^T` (n x n) for `e` (n x d), computing only the tiles on and below the diagonal
/// ([`SYM_BLOCK`] square) and mirroring the rest: for n = 1024, 10 of 16 tile GEMMs. The
/// tiles run in parallel, each a GEMM on one thread, or on a few where threads outnumber
/// tiles (each packs its own operands, so no thread waits while one packs for all); the
/// tiles are fixed, so the result does not depend on the number of threads.
/// Writes every element of `s`, which need not be initialised (the tiles cover the lower
/// triangle, the mirror the rest).
fn symmetric_self_product<T: Element>(s: &mut [std::mem::MaybeUninit<T>], e: &[T], n: usize, d: usize) {
    use rayon::prelude::*;
    assert!(s.len() >= n * n && e.len() >= n * d, "symmetric product operands too short");
    struct Shared<T>(*mut T);
    // SAFETY: the tasks below write disjoint elements (tiles, then mirror blocks); the
    // mirror reads only elements the tiles wrote.
    unsafe impl<T> Sync for Shared<T> {}
    let base = Shared(s.as_mut_ptr().cast::<T>());
    let base = &base;
    let nb = n.div_ceil(SYM_BLOCK);
    let span = |b: usize| (b * SYM_BLOCK, ((b + 1) * SYM_BLOCK).min(n));
    let tiles: Vec<(usize, usize)> = (0..nb).flat_map(|bi| (0..=bi).map(move |bj| (bi, bj))).collect();
    let per_tile = rayon::current_num_threads().div_ceil(tiles.len().max(1));
    if d > 0 {
        tiles.into_par_iter().for_each(|(bi, bj)| {
            let ((i0, i1), (j0, j1)) = (span(bi), span(bj));
            // s[i0..i1, j0..j1] = e[i0..i1] . e[j0..j1]^T; rhs(kk, j) = e[(j0 + j)*d + kk].
            // SAFETY: the tile lies inside s (i1, j1 <= n, row stride n) and is this task's
            // alone; the operands are rows of e (asserted long enough above).
            unsafe {
                crate::fused::gemm_on(
                    base.0.add(i0 * n + j0),
                    n,
                    i1 - i0,
                    j1 - j0,
                    d,
                    (e[i0 * d..].as_ptr(), 1, d),
                    (e[j0 * d..].as_ptr(), d, 1),
                    per_tile,
                )
            };
        });
    } else {
        for v in &mut s[..n * n] {
            v.write(T::default());
        }
    }
    // Mirror: s[i][j] = s[j][i] for j > i, blocks of rows in parallel, by 64 x 64 tiles. A
    // block writes only its rows' upper-triangle part and reads only the lower triangle
    // (column i < j of row j), which nobody writes: the blocks never touch the same element.
    const TILE: usize = 64;
    (0..n.div_ceil(TILE)).into_par_iter().for_each(|bi| {
        let (i0, i1) = (bi * TILE, ((bi + 1) * TILE).min(n));
        for j0 in (i0..n).step_by(TILE) {
            for i in i0..i1 {
                for j in (j0.max(i + 1))..(j0 + TILE).min(n) {
                    // SAFETY: i, j < n and s holds at least n * n elements (asserted above).
                    unsafe { *base.0.add(i * n + j) = *base.0.add(j * n + i) };
                }
            }
        }
    });
}

/// `S = e1 e2^T` (n x m) for the rows of `e1` (n x d) and `e2` (m x d).
fn similarities<T: Element>(e1: &[T], e2: &[T], n: usize, m: usize, d: usize) -> Vec<T> {
    let mut s = vec![T::default(); n * m];
    if d > 0 {
        // rhs(kk, j) = e2[j*d + kk].
        // SAFETY: the slices have exactly the sizes the strides describe.
        unsafe { gemm(&mut s, m, n, m, d, (e1.as_ptr(), 1, d), (e2.as_ptr(), d, 1), false, T::from_f64(1.0)) };
    }
    s
}

/// The gradients through `S = e1 e2^T` of a loss with `dL/dS = beta * g` (`g` n x m, for
/// `e1` n x d and `e2` m x d): `(beta g e2, beta g^T e1)`.
fn product_grads<T: Element>(
    g: &[T],
    e1: &[T],
    e2: &[T],
    (n, m, d): (usize, usize, usize),
    beta: T,
) -> (Vec<T>, Vec<T>) {
    let (mut o1, mut o2) = (vec![T::default(); n * d], vec![T::default(); m * d]);
    if n > 0 && m > 0 && d > 0 {
        // SAFETY: every buffer has exactly the size its strides describe; g^T is read
        // through lhs(j, i) = g[i*m + j].
        unsafe {
            gemm(&mut o1, d, n, d, m, (g.as_ptr(), 1, m), (e2.as_ptr(), 1, d), false, beta);
            gemm(&mut o2, d, m, d, n, (g.as_ptr(), m, 1), (e1.as_ptr(), 1, d), false, beta);
        }
    }
    (o1, o2)
}

/// One graph-loss block on the CPU as a single op on the two embedding matrices: the
/// similarities by one GEMM, then value and per-pair derivative in one pass (kept for the
/// backward pass), instead of a distance tensor and a dozen full-size intermediates. The
/// backward pass is two GEMMs — one when both arguments are the same tensor (a block within
/// one modality), whose gradient is then `-(G + G^T) E`.
pub struct GraphLossOp<T> {
    terms: GraphBlock,
    same: bool,
    /// d value / d S of the last forward pass, for the backward pass.
    coef: std::sync::Mutex<Option<Vec<T>>>,
}

impl<T: Element> GraphLossOp<T> {
    fn new(terms: GraphBlock, same: bool) -> Self {
        GraphLossOp { terms, same, coef: std::sync::Mutex::new(None) }
    }

    fn grads(&self, e1: &Tensor, e2: &Tensor, upstream: f64) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let coef = self
            .coef
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| candle_core::Error::Msg("graph loss: backward without forward".into()))?;
        let ((n, d), (m, _)) = (e1.dims2()?, e2.dims2()?);
        let (s1, l1) = e1.storage_and_layout();
        let (s2, l2) = e2.storage_and_layout();
        let (candle_core::Storage::Cpu(s1), candle_core::Storage::Cpu(s2)) = (&*s1, &*s2) else {
            candle_core::bail!("graph loss: CPU tensors expected")
        };
        let (x1, x2) = (T::slice(s1, l1)?, T::slice(s2, l2)?);
        let beta = T::from_f64(upstream);
        let tensor = |v: Vec<T>, rows: usize| Tensor::from_vec(v, (rows, d), e1.device());
        if self.same {
            // dL/dE = (G + G^T) E, G = d value / d S (n x n); the sum by 64 x 64 tiles.
            // Blocks of TILE rows in parallel, each walked by TILE x TILE tiles.
            use rayon::prelude::*;
            let mut g = vec![T::default(); n * n];
            const TILE: usize = 64;
            g.par_chunks_mut(TILE * n).enumerate().for_each(|(bi, block)| {
                let i0 = bi * TILE;
                for j0 in (0..n).step_by(TILE) {
                    for (r, row) in block.chunks_mut(n).enumerate() {
                        let i = i0 + r;
                        for j in j0..(j0 + TILE).min(n) {
                            row[j] = coef[i * n + j] + coef[j * n + i];
                        }
                    }
                }
            });
            let mut out = vec![T::default(); n * d];
            // SAFETY: every buffer has exactly the size its strides describe.
            unsafe { gemm(&mut out, d, n, d, n, (g.as_ptr(), 1, n), (x1.as_ptr(), 1, d), false, beta) };
            return Ok((Some(tensor(out, n)?), None));
        }
        let (o1, o2) = product_grads(&coef, x1, x2, (n, m, d), beta);
        Ok((Some(tensor(o1, n)?), Some(tensor(o2, m)?)))
    }
}

impl<T: Element> candle_core::CustomOp2 for GraphLossOp<T> {
    fn name(&self) -> &'static str {
        "huse-graph-loss-block"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        let ((n, d), (m, d2)) = (l1.shape().dims2()?, l2.shape().dims2()?);
        if d != d2 || n != self.terms.rows.len() || m != self.terms.cols.len() {
            candle_core::bail!("graph loss: embeddings {:?} and {:?} do not fit the labels", l1.shape(), l2.shape());
        }
        let (e1, e2) = (T::slice(s1, l1)?, T::slice(s2, l2)?);
        let s: Vec<T> = if self.same {
            // SAFETY: symmetric_self_product writes all n x n (= n x m) elements.
            unsafe { crate::fused::written(n * m, |s| symmetric_self_product(s, e1, n, d)) }
        } else {
            similarities(e1, e2, n, m, d)
        };
        let (value, coef) = self.terms.value_and_coef(&s, m);
        *self.coef.lock().unwrap() = Some(coef);
        Ok((T::storage(vec![T::from_f64(value)]), candle_core::Shape::from(())))
    }

    fn bwd(
        &self,
        e1: &Tensor,
        e2: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        self.grads(e1, e2, grad.to_dtype(DType::F64)?.to_scalar::<f64>()?)
    }
}

/// Eqs. 9-11 over the chosen blocks (mean of the blocks).
pub fn graph_loss(
    phi_image: &Tensor,
    phi_text: &Tensor,
    labels: &Tensor,
    a: &Tensor,
    zeta: f64,
    variant: GraphVariant,
    pairs: GraphPairs,
) -> Result<Tensor> {
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

/// All three losses and Eq. 5's weighted total ([`total_scaled`] without a learned
/// temperature).
pub fn total(
    phi_image: &Tensor,
    phi_text: &Tensor,
    logits_image: &Tensor,
    logits_text: &Tensor,
    labels: &Tensor,
    a: &Tensor,
    cfg: &LossConfig,
) -> Result<Losses> {
    total_scaled(phi_image, phi_text, logits_image, logits_text, labels, a, cfg, None)
}

/// [`total`], the contrastive term at the learned `log_scale` (`ln(1/tau)`, a one-element
/// variable) when one is given, else at `cfg.tau`.
#[allow(clippy::too_many_arguments)]
pub fn total_scaled(
    phi_image: &Tensor,
    phi_text: &Tensor,
    logits_image: &Tensor,
    logits_text: &Tensor,
    labels: &Tensor,
    a: &Tensor,
    cfg: &LossConfig,
    log_scale: Option<&Tensor>,
) -> Result<Losses> {
    let class = class_loss(logits_image, logits_text, labels)?;
    let zero = || Tensor::zeros((), phi_image.dtype(), phi_image.device());
    // A weight of 0 skips the computation (its value is still reported as 0).
    let graph = if cfg.beta != 0.0 {
        graph_loss(phi_image, phi_text, labels, a, cfg.zeta, cfg.variant, cfg.pairs)?
    } else {
        zero()?
    };
    let gap = if cfg.gamma != 0.0 { gap_loss(phi_image, phi_text)? } else { zero()? };
    let mut total = ((class.affine(cfg.alpha, 0.0)? + graph.affine(cfg.beta, 0.0)?)? + gap.affine(cfg.gamma, 0.0)?)?;
    let contrastive = if cfg.delta != 0.0 {
        let c = match log_scale {
            Some(s) => contrastive_loss_scaled(phi_image, phi_text, s)?,
            None => contrastive_loss(phi_image, phi_text, cfg.tau)?,
        };
        total = (total + c.affine(cfg.delta, 0.0)?)?;
        c
    } else {
        zero()?
    };
    Ok(Losses { class, graph, gap, contrastive, total })
}

/// The contrastive term (see the module doc): `(CE(S/tau, own) + CE(S^T/tau, own)) / 2` with
/// `S = phi_I phi_T^T` and `own` the diagonal. On the CPU (f32, f64) one op
/// ([`ContrastiveOp`]); elsewhere, a GPU included, candle's tensor ops
/// ([`contrastive_loss_ops`]). Both are tested equal.
pub fn contrastive_loss(phi_image: &Tensor, phi_text: &Tensor, tau: f64) -> Result<Tensor> {
    if phi_image.device().is_cpu() && phi_image.dtype() == phi_text.dtype() && phi_image.rank() == 2 {
        let (a, b) = (phi_image.contiguous()?, phi_text.contiguous()?);
        match a.dtype() {
            DType::F32 => return Ok(a.apply_op2(&b, ContrastiveOp::<f32>::new(tau))?),
            DType::F64 => return Ok(a.apply_op2(&b, ContrastiveOp::<f64>::new(tau))?),
            _ => {}
        }
    }
    contrastive_loss_ops(phi_image, phi_text, tau)
}

/// [`contrastive_loss`] at a learned temperature: `log_scale` (one element) is `ln(1/tau)`,
/// and the logits `exp(log_scale) phi_I phi_T^T` come from scaling the image embeddings,
/// so the same op computes it and the gradient reaches `log_scale` through the scaling.
pub fn contrastive_loss_scaled(phi_image: &Tensor, phi_text: &Tensor, log_scale: &Tensor) -> Result<Tensor> {
    let scale = log_scale.to_dtype(phi_image.dtype())?.exp()?.reshape((1, 1))?;
    contrastive_loss(&phi_image.broadcast_mul(&scale)?, phi_text, 1.0)
}

/// [`contrastive_loss`] from tensor ops (any device).
pub fn contrastive_loss_ops(phi_image: &Tensor, phi_text: &Tensor, tau: f64) -> Result<Tensor> {
    let n = phi_image.dim(0)?;
    let logits = (phi_image.matmul(&phi_text.t()?)? / tau)?;
    let own = Tensor::arange(0u32, n as u32, phi_image.device())?;
    let image_picks_text = candle_nn::loss::cross_entropy(&logits, &own)?;
    let text_picks_image = candle_nn::loss::cross_entropy(&logits.t()?.contiguous()?, &own)?;
    Ok(((image_picks_text + text_picks_image)? * 0.5)?)
}

/// [`contrastive_loss`] on the CPU as one op on the two embedding matrices: the similarities
/// by one GEMM, each row's and each column's log-sum-exp (in f64, summed in a fixed order; one
/// exponential per pair when the logits' range allows one shift for all), and the derivative
/// in S kept for the backward pass, which is two GEMMs:
/// `dL/dS = (softmax_rows(S/tau) + softmax_cols(S/tau) - 2 I) / (2 n tau)`,
/// `dL/dphi_I = dL/dS phi_T` and `dL/dphi_T = dL/dS^T phi_I`.
pub struct ContrastiveOp<T> {
    tau: f64,
    /// dL/dS of the last forward pass, for the backward pass.
    coef: std::sync::Mutex<Option<Vec<T>>>,
}

impl<T: Element> ContrastiveOp<T> {
    /// The op at temperature `tau`.
    pub fn new(tau: f64) -> Self {
        ContrastiveOp { tau, coef: std::sync::Mutex::new(None) }
    }
}

/// `max + ln sum exp(x - max)` of `xs`.
fn log_sum_exp(xs: impl Iterator<Item = f64> + Clone) -> f64 {
    let m = xs.clone().fold(f64::NEG_INFINITY, f64::max);
    m + xs.map(|x| (x - m).exp()).sum::<f64>().ln()
}

impl<T: Element> candle_core::CustomOp2 for ContrastiveOp<T> {
    fn name(&self) -> &'static str {
        "huse-contrastive-loss-cpu"
    }

    fn cpu_fwd(
        &self,
        s1: &candle_core::CpuStorage,
        l1: &candle_core::Layout,
        s2: &candle_core::CpuStorage,
        l2: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (n, d) = l1.shape().dims2()?;
        if l2.shape().dims2()? != (n, d) {
            candle_core::bail!("contrastive loss: embeddings {:?} and {:?} differ", l1.shape(), l2.shape());
        }
        let (a, b) = (T::slice(s1, l1)?, T::slice(s2, l2)?);
        let s = similarities(a, b, n, n, d);
        let inv_tau = 1.0 / self.tau;
        let z = |i: usize, j: usize| s[i * n + j].to_f64() * inv_tau;
        let scale = inv_tau / (2 * n) as f64;
        let mut coef = vec![T::default(); n * n];
        // Every logit lies in [-bound, bound]. When 2 * bound is well inside f64's exponent
        // range, one shift serves every row and column: e = exp(z - bound) once per pair (a
        // row's largest term is at least exp(-2 bound), never 0), and both softmaxes are e
        // over the row's or the column's sum. Otherwise each row and column shifts by its own
        // maximum (four exponentials per pair).
        let bound = s.par_iter().map(|v| v.to_f64().abs()).reduce(|| 0.0, f64::max) * inv_tau;
        let value = if 2.0 * bound < 600.0 {
            let mut e = vec![0f64; n * n];
            e.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
                for (j, v) in row.iter_mut().enumerate() {
                    *v = (z(i, j) - bound).exp();
                }
            });
            let rows: Vec<f64> = e.par_chunks(n.max(1)).map(|r| r.iter().sum()).collect();
            let cols: Vec<f64> = (0..n).into_par_iter().map(|j| (0..n).map(|i| e[i * n + j]).sum()).collect();
            coef.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
                for (j, c) in row.iter_mut().enumerate() {
                    let own = if i == j { 2.0 } else { 0.0 };
                    *c = T::from_f64(scale * (e[i * n + j] * (1.0 / rows[i] + 1.0 / cols[j]) - own));
                }
            });
            // (1/2n) sum_i (lse_row_i - z_ii) + (1/2n) sum_j (lse_col_j - z_jj); NaN for no rows.
            (0..n).map(|i| 2.0 * bound + rows[i].ln() + cols[i].ln() - 2.0 * z(i, i)).sum::<f64>() / (2 * n) as f64
        } else {
            let lse_rows: Vec<f64> =
                (0..n).into_par_iter().map(|i| log_sum_exp((0..n).map(move |j| z(i, j)))).collect();
            let lse_cols: Vec<f64> =
                (0..n).into_par_iter().map(|j| log_sum_exp((0..n).map(move |i| z(i, j)))).collect();
            coef.par_chunks_mut(n.max(1)).enumerate().for_each(|(i, row)| {
                for (j, c) in row.iter_mut().enumerate() {
                    let zij = z(i, j);
                    let own = if i == j { 2.0 } else { 0.0 };
                    *c = T::from_f64(scale * ((zij - lse_rows[i]).exp() + (zij - lse_cols[j]).exp() - own));
                }
            });
            (0..n).map(|i| lse_rows[i] + lse_cols[i] - 2.0 * z(i, i)).sum::<f64>() / (2 * n) as f64
        };
        *self.coef.lock().unwrap() = Some(coef);
        Ok((T::storage(vec![T::from_f64(value)]), candle_core::Shape::from(())))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let coef = self
            .coef
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| candle_core::Error::Msg("contrastive loss: backward without forward".into()))?;
        let (n, d) = a.dims2()?;
        let (sa, la) = a.storage_and_layout();
        let (sb, lb) = b.storage_and_layout();
        let (candle_core::Storage::Cpu(sa), candle_core::Storage::Cpu(sb)) = (&*sa, &*sb) else {
            candle_core::bail!("contrastive loss: CPU tensors expected")
        };
        let (x1, x2) = (T::slice(sa, la)?, T::slice(sb, lb)?);
        let upstream = T::from_f64(grad.to_dtype(DType::F64)?.to_scalar::<f64>()?);
        let (ga, gb) = product_grads(&coef, x1, x2, (n, n, d), upstream);
        let tensor = |v: Vec<T>| Tensor::from_vec(v, (n, d), a.device());
        Ok((a.track_op().then(|| tensor(ga)).transpose()?, b.track_op().then(|| tensor(gb)).transpose()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// The vectorised rows equal the per-pair definition ([`GraphBlock::term`]) for both
    /// variants, square and non-square blocks, every row length's remainder, and pairs on
    /// the edges (d = zeta, t = zeta).
    #[test]
    fn the_vectorised_graph_block_equals_the_per_pair_terms() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let classes = 9;
        let zeta = 0.5;
        let mut a: Vec<f64> = (0..classes * classes).map(|_| rng.random::<f64>()).collect();
        a[1] = zeta; // a target exactly at zeta
        for hinge in [false, true] {
            for (n, m) in [(37, 37), (16, 23), (64, 5), (1, 1)] {
                let rows: Vec<u32> = (0..n).map(|_| rng.random_range(0..classes as u32)).collect();
                let cols: Vec<u32> = (0..m).map(|_| rng.random_range(0..classes as u32)).collect();
                let block = GraphBlock { a: a.clone(), classes, rows: rows.clone(), cols: cols.clone(), zeta, hinge };
                let mut s: Vec<f32> = (0..n * m).map(|_| rng.random_range(-1.0f32..1.0)).collect();
                s[0] = 1.0 - zeta as f32; // d exactly at zeta
                let (value, coef) = block.value_and_coef(&s, m);
                let scale = 1.0 / (n * n) as f64;
                let mut want = 0.0;
                for i in 0..n {
                    for j in 0..m {
                        let t = a[rows[i] as usize * classes + cols[j] as usize];
                        let (v, g) = block.term(i, j, t, 1.0 - s[i * m + j] as f64);
                        want += v;
                        assert_eq!(coef[i * m + j], (-g * scale) as f32, "pair ({i}, {j}), hinge {hinge}, {n} x {m}");
                    }
                }
                let want = want * scale;
                assert!(
                    (value - want).abs() <= 1e-12 * want.abs().max(1e-300),
                    "value {value} vs {want}, hinge {hinge}, {n} x {m}"
                );
            }
        }
    }
}
