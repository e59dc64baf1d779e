//! The paper's evaluation metrics, computed in blocks so memory stays bounded.
//!
//! * [`recall_at_k`] — Table 1: a query is a hit at K if an item of its class is among its
//!   K nearest gallery items by cosine distance. The query item itself is never in its
//!   own result list: same-modality searches skip the query, and cross-modal searches skip
//!   the query's own paired item (its other modality), so every direction measures
//!   finding OTHER items of the class, not re-finding the same product.
//! * [`hierarchical_precision`] — Table 2 (after DeViSE): for a query of class c, rank all
//!   classes by tree distance to c (levels not shared); the correct set at K is every class
//!   at least as close as the K-th closest class (ties included); HP@K is the share of the
//!   K retrieved items whose class is in that set.
//! * [`accuracy`], [`fuse`], [`best_fusion_weight`], [`level_accuracy`] — Table 3.
//! * [`instance_ranks`], [`instance_recall`], [`median_rank`] — instance-level retrieval
//!   (not in the paper): for query i, the rank of its OWN paired item i in the other
//!   modality among all gallery items (does a product's photo retrieve its own title?).
//!   This is what the gap loss is meant to improve; the class-level Table 1 cannot show it.

use huse_data::ClassTree;

/// Row-major matrix view.
pub struct Rows<'a> {
    /// The values, row-major.
    pub data: &'a [f32],
    /// Values per row.
    pub dim: usize,
}

impl Rows<'_> {
    /// Number of rows.
    pub fn len(&self) -> usize {
        self.data.len() / self.dim
    }
    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }
    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.dim..(i + 1) * self.dim]
    }
}

/// `s` (rows x n, row-major) = `q` (rows x d) . `g`^T (g: n x d), one GEMM on the current
/// rayon pool; each element is summed in the same order whatever the thread count.
fn similarities(s: &mut [f32], q: &[f32], g: &[f32], rows: usize, n: usize, d: usize) {
    if rows == 0 || n == 0 {
        return;
    }
    if d == 0 {
        s[..rows * n].fill(0.0);
        return;
    }
    assert!(q.len() >= rows * d && g.len() >= n * d && s.len() >= rows * n, "similarity operands too short");
    // SAFETY: the assertion keeps every access inside the slices: lhs(i, kk) = q[i*d + kk],
    // rhs(kk, j) = g[j*d + kk], dst(i, j) = s[i*n + j].
    unsafe { crate::fused::gemm(s, n, rows, n, d, (q.as_ptr(), 1, d), (g.as_ptr(), d, 1), false, 1.0) };
}

/// Where the similarity GEMMs of [`top_k_with`] and [`instance_ranks_with`] run. The
/// selection after each block (top K, rank counting) runs on the CPU's rayon pool either way.
#[derive(Debug, Clone)]
pub enum Gemm {
    /// The gemm crate on the current rayon pool.
    Cpu,
    /// candle's matmul on this device (a GPU: cuBLAS): the gallery is uploaded once, each
    /// block of queries goes up and its similarities come back.
    Candle(candle_core::Device),
}

impl Gemm {
    /// The CPU GEMM for the CPU, candle's matmul on any other device.
    pub fn for_device(device: &candle_core::Device) -> Gemm {
        if device.is_cpu() { Gemm::Cpu } else { Gemm::Candle(device.clone()) }
    }

    /// The gallery as this engine needs it: for candle, `g`^T (d x n) on its device.
    fn prepare<'a>(&self, gallery: &'a Rows<'a>) -> candle_core::Result<Prepared<'a>> {
        Ok(match self {
            Gemm::Cpu => Prepared { rows: gallery, on_device: None },
            Gemm::Candle(dev) => {
                let g = candle_core::Tensor::from_slice(gallery.data, (gallery.len(), gallery.dim), dev)?;
                Prepared { rows: gallery, on_device: Some(g.t()?.contiguous()?) }
            }
        })
    }
}

/// A gallery ready for similarity blocks (see [`Gemm`]).
struct Prepared<'a> {
    rows: &'a Rows<'a>,
    on_device: Option<candle_core::Tensor>,
}

impl Prepared<'_> {
    /// `s[..rows * n]` = the similarities of `q` (rows x d) to the whole gallery.
    fn fill(&self, s: &mut [f32], q: &[f32], rows: usize) -> candle_core::Result<()> {
        let (n, d) = (self.rows.len(), self.rows.dim);
        match &self.on_device {
            None => similarities(s, q, self.rows.data, rows, n, d),
            Some(gt) if rows > 0 && n > 0 => {
                let q = candle_core::Tensor::from_slice(&q[..rows * d], (rows, d), gt.device())?;
                let block = q.matmul(gt)?.flatten_all()?.to_vec1::<f32>()?;
                s[..rows * n].copy_from_slice(&block);
            }
            Some(_) => {}
        }
        Ok(())
    }
}

/// For each query, the gallery indices of its `k` most similar items (by dot product of
/// unit vectors = smallest cosine distance), skipping gallery index `skip[q]`.
/// Computed `block` queries at a time — their similarities to the whole gallery by one GEMM,
/// then each query's selection, in parallel on the current rayon pool: memory is
/// O(block x gallery), never O(N^2).
pub fn top_k(
    queries: &Rows,
    gallery: &Rows,
    k: usize,
    skip: &(dyn Fn(usize) -> Option<usize> + Sync),
    block: usize,
) -> Vec<Vec<usize>> {
    top_k_with(&Gemm::Cpu, queries, gallery, k, skip, block).expect("the CPU GEMM does not fail")
}

/// [`top_k`] with the similarity GEMMs on `gemm` (a GPU's for a stage on one).
pub fn top_k_with(
    gemm: &Gemm,
    queries: &Rows,
    gallery: &Rows,
    k: usize,
    skip: &(dyn Fn(usize) -> Option<usize> + Sync),
    block: usize,
) -> candle_core::Result<Vec<Vec<usize>>> {
    use rayon::prelude::*;
    let n = gallery.len();
    if n == 0 {
        return Ok(vec![Vec::new(); queries.len()]);
    }
    assert_eq!(queries.dim, gallery.dim, "queries and gallery differ in width");
    let block = block.max(1);
    let prepared = gemm.prepare(gallery)?;
    let mut out = Vec::with_capacity(queries.len());
    let mut sims = vec![0f32; block.min(queries.len()) * n];
    for start in (0..queries.len()).step_by(block) {
        let end = (start + block).min(queries.len());
        let rows = end - start;
        prepared.fill(&mut sims, &queries.data[start * queries.dim..end * queries.dim], rows)?;
        let found: Vec<Vec<usize>> = sims[..rows * n]
            .par_chunks(n)
            .enumerate()
            .map(|(qi, s)| {
                let excluded = skip(start + qi);
                let mut idx: Vec<usize> = (0..n).filter(|g| Some(*g) != excluded).collect();
                let kk = k.min(idx.len());
                if kk == 0 {
                    return Vec::new();
                }
                // Highest similarity first; ties by index for determinism.
                let cmp = |a: &usize, b: &usize| s[*b].total_cmp(&s[*a]).then(a.cmp(b));
                idx.select_nth_unstable_by(kk - 1, cmp);
                idx.truncate(kk);
                idx.sort_by(cmp);
                idx
            })
            .collect();
        out.extend(found);
    }
    Ok(out)
}

/// Queries per similarity GEMM of [`instance_ranks`].
const RANK_BLOCK: usize = 256;

/// For each query i, the 1-based rank of gallery item i (its own pair) among all gallery
/// items by similarity: 1 + the items more similar than it, + the equally similar ones of
/// lower index (ties broken by index, as in [`top_k`]). Blocks of queries by one GEMM, the
/// counting in parallel: memory O(block x N).
pub fn instance_ranks(queries: &Rows, gallery: &Rows) -> Vec<usize> {
    instance_ranks_with(&Gemm::Cpu, queries, gallery).expect("the CPU GEMM does not fail")
}

/// [`instance_ranks`] with the similarity GEMMs on `gemm`.
pub fn instance_ranks_with(gemm: &Gemm, queries: &Rows, gallery: &Rows) -> candle_core::Result<Vec<usize>> {
    use rayon::prelude::*;
    assert_eq!(queries.len(), gallery.len(), "instance retrieval pairs query i with gallery item i");
    assert_eq!(queries.dim, gallery.dim, "queries and gallery differ in width");
    let n = gallery.len();
    let prepared = gemm.prepare(gallery)?;
    let mut ranks = Vec::with_capacity(n);
    let mut sims = vec![0f32; RANK_BLOCK.min(n.max(1)) * n];
    for start in (0..n).step_by(RANK_BLOCK) {
        let end = (start + RANK_BLOCK).min(n);
        let rows = end - start;
        prepared.fill(&mut sims, &queries.data[start * queries.dim..end * queries.dim], rows)?;
        let r: Vec<usize> = sims[..rows * n]
            .par_chunks(n)
            .enumerate()
            .map(|(qi, s)| {
                let q = start + qi;
                let own = s[q];
                1 + s.iter().enumerate().filter(|(g, v)| **v > own || (**v == own && *g < q)).count()
            })
            .collect();
        ranks.extend(r);
    }
    Ok(ranks)
}

/// The share of queries whose own pair is within the top K, for each K in `ks`.
pub fn instance_recall(ranks: &[usize], ks: &[usize]) -> Vec<f64> {
    ks.iter().map(|&k| ranks.iter().filter(|r| **r <= k).count() as f64 / ranks.len().max(1) as f64).collect()
}

/// The median rank (the mean of the two middle ranks for an even count).
pub fn median_rank(ranks: &[usize]) -> f64 {
    if ranks.is_empty() {
        return f64::NAN;
    }
    let mut r = ranks.to_vec();
    r.sort_unstable();
    let n = r.len();
    if n % 2 == 1 { r[n / 2] as f64 } else { (r[n / 2 - 1] + r[n / 2]) as f64 / 2.0 }
}

/// Recall@K for each K in `ks` (result lists must be at least max(ks) long).
pub fn recall_at_k(results: &[Vec<usize>], query_labels: &[u32], gallery_labels: &[u32], ks: &[usize]) -> Vec<f64> {
    ks.iter()
        .map(|&k| {
            let hits = results
                .iter()
                .zip(query_labels)
                .filter(|(r, y)| r.iter().take(k).any(|g| gallery_labels[*g] == **y))
                .count();
            hits as f64 / results.len().max(1) as f64
        })
        .collect()
}

/// The correct class set at K for class `c`: classes at least as close in the tree as the
/// K-th closest class (c itself is the closest).
pub fn correct_set(tree: &ClassTree, c: usize, k: usize) -> Vec<bool> {
    let depth = tree.depth();
    let dist: Vec<usize> = (0..tree.classes.len()).map(|j| depth - tree.common_depth(c, j)).collect();
    let mut sorted = dist.clone();
    sorted.sort_unstable();
    let threshold = sorted[k.min(sorted.len()).max(1) - 1];
    dist.iter().map(|d| *d <= threshold).collect()
}

/// HP@K for each K in `ks`.
pub fn hierarchical_precision(
    results: &[Vec<usize>],
    query_labels: &[u32],
    gallery_labels: &[u32],
    tree: &ClassTree,
    ks: &[usize],
) -> Vec<f64> {
    let sets: Vec<Vec<Vec<bool>>> =
        ks.iter().map(|&k| (0..tree.classes.len()).map(|c| correct_set(tree, c, k)).collect()).collect();
    ks.iter()
        .enumerate()
        .map(|(ki, &k)| {
            let total: f64 = results
                .iter()
                .zip(query_labels)
                .map(|(r, y)| {
                    let set = &sets[ki][*y as usize];
                    let top: Vec<&usize> = r.iter().take(k).collect();
                    top.iter().filter(|g| set[gallery_labels[***g] as usize]).count() as f64 / k as f64
                })
                .sum();
            total / results.len().max(1) as f64
        })
        .collect()
}

/// Softmax of each row of `logits` (n x k).
pub fn softmax_rows(logits: &[f32], k: usize) -> Vec<f32> {
    let mut out = logits.to_vec();
    for row in out.chunks_mut(k) {
        let m = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut s = 0.0;
        for v in row.iter_mut() {
            *v = (*v - m).exp();
            s += *v;
        }
        row.iter_mut().for_each(|v| *v /= s);
    }
    out
}

/// Argmax of each row.
pub fn predictions(probs: &[f32], k: usize) -> Vec<u32> {
    probs
        .chunks(k)
        .map(|r| {
            r.iter()
                .enumerate()
                .max_by(|a, b| a.1.total_cmp(b.1).then(b.0.cmp(&a.0)))
                .map(|(i, _)| i as u32)
                .unwrap_or(0)
        })
        .collect()
}

/// Share of rows whose argmax is the label.
pub fn accuracy(probs: &[f32], k: usize, labels: &[u32]) -> f64 {
    let p = predictions(probs, k);
    p.iter().zip(labels).filter(|(a, b)| a == b).count() as f64 / labels.len().max(1) as f64
}

/// `w * p_image + (1 - w) * p_text`.
pub fn fuse(p_image: &[f32], p_text: &[f32], w: f32) -> Vec<f32> {
    p_image.iter().zip(p_text).map(|(a, b)| w * a + (1.0 - w) * b).collect()
}

/// The image weight in {0, 0.05, ..., 1} with the best fused accuracy (ties: closest to 0.5).
pub fn best_fusion_weight(p_image: &[f32], p_text: &[f32], k: usize, labels: &[u32]) -> (f32, f64) {
    let mut best = (0.5f32, -1.0f64);
    for i in 0..=20 {
        let w = i as f32 / 20.0;
        let acc = accuracy(&fuse(p_image, p_text, w), k, labels);
        if acc > best.1 + 1e-12 || ((acc - best.1).abs() <= 1e-12 && (w - 0.5).abs() < (best.0 - 0.5).abs()) {
            best = (w, acc);
        }
    }
    best
}

/// Accuracy at each level: a prediction is right at level l if its ancestor there matches.
pub fn level_accuracy(probs: &[f32], k: usize, labels: &[u32], tree: &ClassTree) -> Vec<f64> {
    let p = predictions(probs, k);
    (0..tree.depth())
        .map(|l| {
            let right = p.iter().zip(labels).filter(|(a, b)| {
                tree.classes[**a as usize].ancestors.get(l) == tree.classes[**b as usize].ancestors.get(l)
            });
            right.count() as f64 / labels.len().max(1) as f64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree() -> ClassTree {
        let p = |s: &str| s.split('<').map(String::from).collect::<Vec<_>>();
        // 0 A<x<1, 1 A<x<2, 2 A<y<3, 3 B<z<4
        ClassTree::from_paths(vec![(p("A<x<1"), 1), (p("A<x<2"), 1), (p("A<y<3"), 1), (p("B<z<4"), 1)])
    }

    #[test]
    fn top_k_by_hand_with_self_skipped() {
        // Unit vectors on a circle: angles 0, 10, 90, 180 degrees.
        let ang = [0f32, 10.0, 90.0, 180.0];
        let v: Vec<f32> = ang.iter().flat_map(|a| [a.to_radians().cos(), a.to_radians().sin()]).collect();
        let rows = Rows { data: &v, dim: 2 };
        let r = top_k(&rows, &rows, 2, &|q| Some(q), 3);
        assert_eq!(r, vec![vec![1, 2], vec![0, 2], vec![1, 0], vec![2, 1]]);
        // Without skipping, an item finds itself first.
        let r = top_k(&rows, &rows, 1, &|_| None, 1);
        assert_eq!(r, vec![vec![0], vec![1], vec![2], vec![3]]);
    }

    #[test]
    fn parallel_top_k_and_ranks_equal_a_full_sort_for_any_thread_count() {
        // 97 pseudo-random 8-d rows of small integers (every similarity exact, whatever the
        // order of summation, and many ties); the reference sorts every similarity (ties by
        // index).
        let v: Vec<f32> = (0..97 * 8).map(|i| ((i as f32 * 0.731).sin() * 3.0).round()).collect();
        let rows = Rows { data: &v, dim: 8 };
        let dot = |a: usize, b: usize| rows.row(a).iter().zip(rows.row(b)).map(|(x, y)| x * y).sum::<f32>();
        let want: Vec<Vec<usize>> = (0..97)
            .map(|q| {
                let mut idx: Vec<usize> = (0..97).filter(|g| *g != q).collect();
                idx.sort_by(|a, b| dot(q, *b).total_cmp(&dot(q, *a)).then(a.cmp(b)));
                idx.truncate(5);
                idx
            })
            .collect();
        // The candle engine (what a GPU stage uses; here on the CPU device, and on a GPU when
        // this build has CUDA and one is present) gives the same lists and ranks.
        let mut engines = vec![Gemm::Candle(candle_core::Device::Cpu)];
        if let Ok(gpu) = candle_core::Device::new_cuda(0) {
            engines.push(Gemm::Candle(gpu));
        } else {
            eprintln!(
                "no CUDA device in this build or on this machine: the GPU similarity blocks are not checked here"
            );
        }
        for gemm in &engines {
            assert_eq!(top_k_with(gemm, &rows, &rows, 5, &|q| Some(q), 4).unwrap(), want, "{gemm:?}");
            let ranks = instance_ranks_with(gemm, &rows, &rows).unwrap();
            assert_eq!(ranks, instance_ranks(&rows, &rows), "{gemm:?}");
        }
        for threads in [1, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let (got, ranks) = pool.install(|| (top_k(&rows, &rows, 5, &|q| Some(q), 4), instance_ranks(&rows, &rows)));
            assert_eq!(got, want, "{threads} threads");
            // Each row's own rank: 1 + rows strictly more similar + equal ones of lower index.
            for (q, r) in ranks.iter().enumerate() {
                let own = dot(q, q);
                assert_eq!(*r, 1 + (0..97).filter(|&g| dot(q, g) > own || (dot(q, g) == own && g < q)).count());
            }
        }
    }

    #[test]
    fn instance_retrieval_by_hand() {
        // Four items, unit vectors in 2-D; similarities worked out by hand:
        // i2t  i0: t2 (1.0) > t0 (0.8) -> 2;  i1: t1 (0.8) first -> 1;
        //      i2: t1 (1.0), t0 (0.96) > t2 (0.6) -> 3;  i3: t3 (0.0) first -> 1.
        // t2i  t0: i2 (0.96) > i0 (0.8) -> 2;  t1: i2 (1.0) > i1 (0.8) -> 2;
        //      t2: i0 (1.0) > i2 (0.6) -> 2;  t3: i0 ties i3 at 0.0, lower index first -> 2.
        let img = [1.0, 0.0, 0.0, 1.0, 0.6, 0.8, -1.0, 0.0];
        let txt = [0.8, 0.6, 0.6, 0.8, 1.0, 0.0, 0.0, -1.0];
        let (i, t) = (Rows { data: &img, dim: 2 }, Rows { data: &txt, dim: 2 });
        let i2t = instance_ranks(&i, &t);
        assert_eq!(i2t, [2, 1, 3, 1]);
        assert_eq!(instance_recall(&i2t, &[1, 2, 5]), [0.5, 0.75, 1.0]);
        assert_eq!(median_rank(&i2t), 1.5);
        let t2i = instance_ranks(&t, &i);
        assert_eq!(t2i, [2, 2, 2, 2]);
        assert_eq!(instance_recall(&t2i, &[1, 2]), [0.0, 1.0]);
        assert_eq!(median_rank(&t2i), 2.0);
        assert_eq!(median_rank(&[3, 1, 2]), 2.0);
    }

    #[test]
    fn recall_by_hand() {
        let results = vec![vec![1, 2], vec![2, 0], vec![0, 1]];
        let gallery = [0u32, 0, 1];
        let queries = [0u32, 0, 1];
        // q0: top1 g1 (class 0) hit. q1: top1 g2 (1) miss, top2 g0 (0) hit. q2: g0, g1 both class 0: miss.
        assert_eq!(recall_at_k(&results, &queries, &gallery, &[1, 2]), vec![1.0 / 3.0, 2.0 / 3.0]);
    }

    #[test]
    fn correct_sets_include_ties() {
        let t = tree();
        // Class 0 (A<x<1): distances 0 (itself), 1 (A<x<2), 2 (A<y<3), 3 (B<z<4).
        assert_eq!(correct_set(&t, 0, 1), vec![true, false, false, false]);
        assert_eq!(correct_set(&t, 0, 2), vec![true, true, false, false]);
        assert_eq!(correct_set(&t, 0, 3), vec![true, true, true, false]);
        // Class 2 (A<y<3) has no sibling: its 2nd-closest are 0 and 1 (tied at 2): both in.
        assert_eq!(correct_set(&t, 2, 2), vec![true, true, true, false]);
    }

    #[test]
    fn hierarchical_precision_by_hand() {
        let t = tree();
        // One query of class 0 retrieving items of classes [1, 3] then [0, 2].
        let gallery = [1u32, 3, 0, 2];
        let results = vec![vec![0, 1, 2, 3]];
        // K=2: set {0, 1}: retrieved classes 1 (in), 3 (out) -> 0.5.
        // K=4: 4th closest class is 3 (distance 3) -> all classes -> 1.0.
        assert_eq!(hierarchical_precision(&results, &[0], &gallery, &t, &[2, 4]), vec![0.5, 1.0]);
    }

    #[test]
    fn accuracy_fusion_and_levels() {
        let k = 4;
        // Two items of classes 0 and 2. Image is right on item 0 only; text on item 1 only.
        let pi = [0.7f32, 0.1, 0.1, 0.1, 0.1, 0.6, 0.2, 0.1];
        let pt = [0.1f32, 0.5, 0.2, 0.2, 0.1, 0.1, 0.8, 0.0];
        let y = [0u32, 2];
        assert_eq!(accuracy(&pi, k, &y), 0.5);
        assert_eq!(accuracy(&pt, k, &y), 0.5);
        let (w, acc) = best_fusion_weight(&pi, &pt, k, &y);
        assert_eq!(acc, 1.0);
        assert!((0.35..=0.6).contains(&w), "{w}");
        // Image predicts [0, 1]: item 1's prediction A<x<2 vs truth A<y<3 is right at level 0 only.
        assert_eq!(level_accuracy(&pi, k, &y, &tree()), vec![1.0, 0.5, 0.5]);
        let s = softmax_rows(&[0.0, 0.0, 2f32.ln()], 3);
        assert!((s[2] - 0.5).abs() < 1e-6);
    }
}
