//! Fused CPU kernels for the towers: dense layers ([`DenseOp`]), the sparse-input first
//! layer ([`SparseDenseOp`]), L2 normalisation ([`L2NormaliseOp`]), and in training steps a
//! whole tower as one op built from them ([`TowerOp`], under [`chain_towers`], its parameter
//! gradients collected by [`backward`]).
//!
//! `relu?(x W^T + b)` as one candle op: the output buffer starts as the bias, one GEMM
//! (the `gemm` crate, as candle's own matmul) accumulates into it, and the ReLU runs over it
//! in place. Its backward applies the ReLU mask once and then needs only the two matmuls and
//! a column sum. With plain tensor ops the same layer is a matmul, a transpose, a broadcast
//! add and a ReLU forward, and about ten whole-tensor passes backward, each allocating.
//! Dropout rides along: the op multiplies by the mask after the ReLU and its backward
//! reuses the same pass. Used on the CPU for contiguous f32 inputs. On a GPU (a `--features
//! cuda` build) the same ops run their CUDA halves (`crate::cuda`, kernels in `cuda/huse.cu`)
//! for contiguous f32 inputs, unless `HUSE_CUDA_FUSED=0` asks for candle's tensor ops there.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor, bail};
use rayon::prelude::*;

/// Elements per parallel chunk of the element-wise passes (64 KiB of f32: stays in L2).
/// Fixed, not derived from the thread count, so every pass (the column sums included)
/// adds in the same order whatever the number of threads.
pub(crate) const CHUNK: usize = 16 * 1024;

/// Rows per parallel chunk of a row-wise pass over rows of `n` values (at least 1).
fn rows_per_chunk(n: usize) -> usize {
    (CHUNK / n.max(1)).max(1)
}

/// Element types of the fused CPU ops: their data in a `CpuStorage`, and back.
pub trait Element: candle_core::WithDType + Default + huse_cpu::Scalar {
    /// The contiguous data of `s` under `l`; an error for another type or a strided layout.
    fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [Self]>;
    /// A `CpuStorage` holding `v`.
    fn storage(v: Vec<Self>) -> CpuStorage;
}

macro_rules! element {
    ($t:ty, $variant:ident) => {
        impl Element for $t {
            fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [Self]> {
                match (s, l.contiguous_offsets()) {
                    (CpuStorage::$variant(v), Some((a, b))) => Ok(&v[a..b]),
                    _ => bail!("fused CPU op: contiguous {} data expected", stringify!($t)),
                }
            }
            fn storage(v: Vec<Self>) -> CpuStorage {
                CpuStorage::$variant(v)
            }
        }
    };
}
element!(f32, F32);
element!(f64, F64);

/// `dst = beta * lhs . rhs`, or `dst += beta * lhs . rhs` when `accumulate`: dst is `r` x
/// `cols` with row stride `ldc`, lhs `r` x `k`, rhs `k` x `cols`, each operand given as
/// (pointer, column stride, row stride). On the current rayon pool (the stage's) for big
/// products, through [`huse_cpu::gemm`].
///
/// # Safety
/// The pointers and strides must describe matrices inside their buffers.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm<T: Element>(
    dst: &mut [T],
    ldc: usize,
    r: usize,
    cols: usize,
    k: usize,
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    accumulate: bool,
    beta: T,
) {
    // On the current rayon pool: the stage's (its thread budget).
    // SAFETY: forwarded from the caller.
    unsafe { huse_cpu::gemm(dst.as_mut_ptr(), ldc, r, cols, k, lhs, rhs, accumulate, beta, None) }
}

/// [`gemm`] without accumulation into a buffer not yet initialised: the product writes every
/// element of the `r` x `cols` block (it never reads the destination when not accumulating),
/// so the buffer needs no zero-fill first — which `vec![0; n]` does on one thread.
///
/// # Safety
/// As [`gemm`]; and `k > 0` (an empty product might leave the destination unwritten).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_into<T: Element>(
    dst: &mut [std::mem::MaybeUninit<T>],
    ldc: usize,
    r: usize,
    cols: usize,
    k: usize,
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    beta: T,
) {
    assert!(k > 0, "gemm_into: an empty inner dimension writes nothing");
    // SAFETY: forwarded from the caller; MaybeUninit<T> has T's layout.
    unsafe { huse_cpu::gemm(dst.as_mut_ptr().cast::<T>(), ldc, r, cols, k, lhs, rhs, false, beta, None) }
}

/// `dst = lhs . rhs` on at most `threads` threads, into a raw destination (operands as in
/// [`gemm`]): for callers that run several disjoint products in parallel themselves. The
/// result does not depend on `threads` (the GEMM splits rows and columns, never the sum).
///
/// # Safety
/// As [`gemm`]; `dst` with row stride `ldc` must hold the `r` x `cols` block, and no other
/// thread may touch that block meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_on<T: Element>(
    dst: *mut T,
    ldc: usize,
    r: usize,
    cols: usize,
    k: usize,
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    threads: usize,
) {
    // SAFETY: forwarded from the caller.
    unsafe { huse_cpu::gemm(dst, ldc, r, cols, k, lhs, rhs, false, T::ONE, Some(threads)) }
}

/// A vector of `len` elements that `fill` writes, without zero-filling it first.
///
/// # Safety
/// `fill` must write every element of the slice it is given.
pub(crate) unsafe fn written<T>(len: usize, fill: impl FnOnce(&mut [std::mem::MaybeUninit<T>])) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    fill(&mut v.spare_capacity_mut()[..len]);
    // SAFETY: every element was written (the caller's promise).
    unsafe { v.set_len(len) };
    v
}

/// Runs `f` on the data of a contiguous f32 CPU tensor.
fn with_slice<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cpu(c) => Ok(f(f32::slice(c, l)?)),
        _ => bail!("fused dense layer: CPU tensors only"),
    }
}

/// Sums of the columns of a row-major matrix with `n` columns (the bias gradient); candle's
/// sum over dim 0 walks the matrix by columns. Partial sums over fixed blocks of rows in
/// parallel, then added block by block in order: the same result for any thread count.
fn column_sums(g: &[f32], n: usize) -> Vec<f32> {
    let partial: Vec<Vec<f32>> = g
        .par_chunks(rows_per_chunk(n) * n)
        .map(|block| {
            let mut s = vec![0f32; n];
            for row in block.chunks_exact(n) {
                for (a, &v) in s.iter_mut().zip(row) {
                    *a += v;
                }
            }
            s
        })
        .collect();
    let mut s = vec![0f32; n];
    for p in &partial {
        for (a, &v) in s.iter_mut().zip(p) {
            *a += v;
        }
    }
    s
}

/// `b + x W[:, ..k]^T` (m x n, row-major): every row starts as the bias, one GEMM adds
/// `x` (m x k) times the first `k` columns of the row-major W (n rows of `ldw`).
fn bias_plus_x_wt(x: &[f32], w: &[f32], b: &[f32], m: usize, n: usize, k: usize, ldw: usize) -> Vec<f32> {
    // SAFETY: the chunks cover the buffer and every row of n gets the n bias values.
    let mut out = unsafe {
        written(m * n, |out| {
            out.par_chunks_mut(rows_per_chunk(n) * n).for_each(|block| {
                for row in block.chunks_exact_mut(n) {
                    for (o, &v) in row.iter_mut().zip(b) {
                        o.write(v);
                    }
                }
            })
        })
    };
    if k > 0 && m > 0 && n > 0 {
        assert!(x.len() >= m * k && w.len() >= (n - 1) * ldw + k && k <= ldw, "GEMM operands too short");
        // rhs(kk, j) = w[j*ldw + kk].
        // SAFETY: the assertion above keeps every strided access inside the slices.
        unsafe { gemm(&mut out, n, m, n, k, (x.as_ptr(), 1, k), (w.as_ptr(), ldw, 1), true, 1.0) };
    }
    out
}

thread_local! {
    /// Parameter gradients handed over by the fused CPU layers during [`backward`]; `None`
    /// outside it. Per thread: candle's backward pass runs the ops' backward on the calling
    /// thread, and concurrent trainings run on different threads.
    static SINK: std::cell::RefCell<Option<Vec<(Tensor, Tensor)>>> = const { std::cell::RefCell::new(None) };
}

/// `loss.backward()`, except that the fused CPU layers put the gradients of their weights and
/// biases straight into the returned store. Through candle's own accumulation every gradient
/// starts as a zero tensor and is then added to — two extra passes over each, on one thread
/// (for the paper's towers 5.4 M parameters a step, ~4% of a 2-thread step). The result is
/// the same store: a parameter also used by other ops gets the sum of both gradients.
pub fn backward(loss: &Tensor) -> Result<candle_core::backprop::GradStore> {
    SINK.with(|s| *s.borrow_mut() = Some(Vec::new()));
    let grads = loss.backward();
    let sunk = SINK.with(|s| s.borrow_mut().take()).unwrap_or_default();
    let mut grads = grads?;
    for (param, g) in sunk {
        let g = match grads.remove(&param) {
            Some(other) => (other + g)?,
            None => g,
        };
        grads.insert(&param, g);
    }
    Ok(grads)
}

/// In a fused op's backward: the gradient of `param`, handed to [`backward`]'s store when one
/// is collecting and `param` is a variable (a leaf: nothing flows on from it) — candle then
/// gets `None` for it; otherwise returned for candle to accumulate.
fn sink(param: &Tensor, grad: Tensor) -> Result<Option<Tensor>> {
    if !param.is_variable() {
        return Ok(Some(grad));
    }
    SINK.with(|s| {
        let mut s = s.borrow_mut();
        let Some(held) = s.as_mut() else { return Ok(Some(grad)) };
        match held.iter_mut().find(|(p, _)| p.id() == param.id()) {
            Some((_, g)) => *g = (&*g + &grad)?,
            None => held.push((param.clone(), grad)),
        }
        Ok(None)
    })
}

/// Whether the fused op applies: CPU, f32, contiguous.
pub fn usable(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && t.is_contiguous())
}

/// Whether the fused GPU ops apply: a `--features cuda` build, CUDA tensors, f32, contiguous,
/// and `HUSE_CUDA_FUSED` not `0` (which falls back to candle's tensor ops on the GPU).
pub fn gpu_usable(ts: &[&Tensor]) -> bool {
    cfg!(feature = "cuda")
        && std::env::var("HUSE_CUDA_FUSED").map_or(true, |v| v != "0")
        && ts.iter().all(|t| t.device().is_cuda() && t.dtype() == DType::F32 && t.is_contiguous())
}

pub use crate::dropout::DeviceDropout;

/// The layer op; `relu` applies max(0, .) to the output, then `mask` (dropout: 0 or
/// 1/(1-p) per output element; on a GPU `device_mask`) multiplies it.
pub struct DenseOp {
    /// Apply ReLU to the output.
    pub relu: bool,
    /// Dropout mask on the CPU (None: no dropout).
    pub mask: Option<Vec<f32>>,
    /// Dropout on a GPU (None: no dropout).
    pub device_mask: Option<DeviceDropout>,
}

/// ReLU and the dropout mask, in place.
fn activate(out: &mut [f32], relu: bool, mask: Option<&[f32]>) -> Result<()> {
    if mask.is_some_and(|m| m.len() != out.len()) {
        bail!("dropout mask of {} for {} outputs", mask.map_or(0, <[f32]>::len), out.len());
    }
    let relu_and_mask = |(o, k): (&mut [f32], Option<&[f32]>)| {
        if relu {
            // `if` rather than max: a NaN stays NaN, so the training guard still sees it.
            for v in o.iter_mut() {
                if *v < 0.0 {
                    *v = 0.0;
                }
            }
        }
        if let Some(k) = k {
            for (v, &k) in o.iter_mut().zip(k) {
                *v *= k;
            }
        }
    };
    match mask {
        Some(m) => out.par_chunks_mut(CHUNK).zip(m.par_chunks(CHUNK)).for_each(|(o, k)| relu_and_mask((o, Some(k)))),
        None if relu => out.par_chunks_mut(CHUNK).for_each(|o| relu_and_mask((o, None))),
        None => {}
    }
    Ok(())
}

/// dL/dz from dL/d(output): zero where the ReLU or the mask cut the unit (the output is then
/// exactly 0), times the mask value elsewhere. A unit whose pre-activation was positive but
/// whose output is 0 was dropped.
fn grad_through(grad: &Tensor, res: &Tensor, relu: bool, mask: Option<&[f32]>) -> Result<Vec<f32>> {
    let grad = grad.contiguous()?;
    with_slice(&grad, |g| {
        with_slice(res, |r| {
            if r.len() != g.len() || mask.is_some_and(|k| k.len() != g.len()) {
                bail!("fused layer backward: gradient of {} for {} outputs", g.len(), r.len());
            }
            // SAFETY: the chunks of out, g, r (and k) line up one to one (equal lengths,
            // checked above), and every branch writes each element of its chunk.
            Ok(unsafe {
                written(g.len(), |out| {
                    let chunks = out.par_chunks_mut(CHUNK).zip(g.par_chunks(CHUNK)).zip(r.par_chunks(CHUNK));
                    match (relu, mask) {
                        (true, Some(k)) => chunks.zip(k.par_chunks(CHUNK)).for_each(|(((o, g), r), k)| {
                            for (((o, &g), &r), &k) in o.iter_mut().zip(g).zip(r).zip(k) {
                                o.write(if r > 0.0 { g * k } else { 0.0 });
                            }
                        }),
                        (true, None) => chunks.for_each(|((o, g), r)| {
                            for ((o, &g), &r) in o.iter_mut().zip(g).zip(r) {
                                o.write(if r > 0.0 { g } else { 0.0 });
                            }
                        }),
                        (false, Some(k)) => chunks.zip(k.par_chunks(CHUNK)).for_each(|(((o, g), _), k)| {
                            for ((o, &g), &k) in o.iter_mut().zip(g).zip(k) {
                                o.write(g * k);
                            }
                        }),
                        (false, None) => chunks.for_each(|((o, g), _)| {
                            for (o, &g) in o.iter_mut().zip(g) {
                                o.write(g);
                            }
                        }),
                    }
                })
            })
        })?
    })?
}

/// `lhs . rhs` (`r` x `cols`, row-major) by [`gemm_into`]; zeros for an empty inner
/// dimension. Operands as in [`gemm`].
fn product(
    r: usize,
    cols: usize,
    k: usize,
    lhs: (*const f32, usize, usize),
    rhs: (*const f32, usize, usize),
) -> Vec<f32> {
    if k == 0 || r == 0 || cols == 0 {
        return vec![0f32; r * cols];
    }
    // SAFETY: gemm_into writes the whole r x cols block (k > 0); the callers pass operands
    // whose strides stay inside their slices.
    unsafe { written(r * cols, |dst| gemm_into(dst, cols, r, cols, k, lhs, rhs, 1.0)) }
}

impl CustomOp3 for DenseOp {
    fn name(&self) -> &'static str {
        if self.relu { "huse-dense-relu" } else { "huse-dense" }
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, k) = xl.shape().dims2()?;
        let (n, k2) = wl.shape().dims2()?;
        if k != k2 || bl.shape().dims1()? != n {
            bail!("fused dense layer: x {:?}, W {:?}, b {:?} do not fit", xl.shape(), wl.shape(), bl.shape());
        }
        let (x, w, b) = (f32::slice(xs, xl)?, f32::slice(ws, wl)?, f32::slice(bs, bl)?);
        let mut out = bias_plus_x_wt(x, w, b, m, n, k, k);
        activate(&mut out, self.relu, self.mask.as_deref())?;
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        xs: &candle_core::CudaStorage,
        xl: &Layout,
        ws: &candle_core::CudaStorage,
        wl: &Layout,
        bs: &candle_core::CudaStorage,
        bl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::dense_fwd(xs, xl, ws, wl, bs, bl, self.relu, self.device_mask.as_ref())
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        #[cfg(feature = "cuda")]
        if res.device().is_cuda() {
            // One kernel for dL/dz, then cuBLAS (candle's matmul) and a column sum.
            let gz = crate::cuda::grad_through(grad, res, self.relu, self.device_mask.as_ref())?;
            let dx = if x.track_op() { Some(gz.matmul(w)?) } else { None };
            let dw = gz.t()?.matmul(x)?;
            return Ok((dx, Some(dw), Some(gz.sum(0)?)));
        }
        self.backward(x, w, b, res, grad, x.track_op())
    }
}

impl DenseOp {
    /// The CPU backward: (dx when `want_dx`, dW, db), the parameter gradients through [`sink`].
    #[allow(clippy::type_complexity)]
    fn backward(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
        want_dx: bool,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let gz = grad_through(grad, res, self.relu, self.mask.as_deref())?;
        let ((m, k), n) = (x.dims2()?, w.dim(0)?);
        if gz.len() != m * n {
            bail!("fused dense layer backward: gradient of {} for {m} x {n} outputs", gz.len());
        }
        let db = Tensor::from_vec(column_sums(&gz, n), n, w.device())?;
        let x = x.contiguous()?;
        let w_c = w.contiguous()?;
        // dx (m x k) = gz (m x n) . W (n x k); dW (n x k) = gz^T . x, lhs(j, r) = gz[r*n + j].
        let dx = if want_dx {
            Some(Tensor::from_vec(
                with_slice(&w_c, |wv| product(m, k, n, (gz.as_ptr(), 1, n), (wv.as_ptr(), 1, k)))?,
                (m, k),
                x.device(),
            )?)
        } else {
            None
        };
        let dw = with_slice(&x, |xv| product(n, k, m, (gz.as_ptr(), n, 1), (xv.as_ptr(), 1, k)))?;
        Ok((dx, sink(w, Tensor::from_vec(dw, (n, k), w.device())?)?, sink(b, db)?))
    }
}

/// The first layer of a tower whose input is `[dense | sparse]` (BERT features, then TF-IDF):
/// `relu?([x | S] W^T + b)` without materialising the sparse columns. The dense part is one
/// GEMM against the first columns of W; each non-zero adds its value times one column of W to
/// its row. Non-zeros are visited by column, so the strided reads of W's columns share cache
/// lines, and the gradient of those columns is gathered the same way.
pub struct SparseDenseOp {
    /// Apply ReLU to the output.
    pub relu: bool,
    /// Dropout mask on the output, as in [`DenseOp`].
    pub mask: Option<Vec<f32>>,
    /// Non-zeros sorted by column: (row, column of W, value).
    entries: Vec<(u32, u32, f32)>,
}

impl SparseDenseOp {
    /// `rows`, `cols` (columns of W, i.e. already offset by the dense width) and `vals` of the
    /// non-zeros.
    pub fn new(relu: bool, mask: Option<Vec<f32>>, rows: &[u32], cols: &[u32], vals: &[f32]) -> Self {
        let mut entries: Vec<(u32, u32, f32)> =
            rows.iter().zip(cols).zip(vals).map(|((&r, &c), &v)| (r, c, v)).collect();
        entries.sort_by_key(|&(r, c, _)| (c, r));
        SparseDenseOp { relu, mask, entries }
    }

    /// Runs of entries sharing a column.
    fn by_column(&self) -> impl Iterator<Item = &[(u32, u32, f32)]> {
        self.entries.chunk_by(|a, b| a.1 == b.1)
    }
}

impl CustomOp3 for SparseDenseOp {
    fn name(&self) -> &'static str {
        "huse-sparse-dense"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, d) = xl.shape().dims2()?;
        let (n, kw) = wl.shape().dims2()?;
        if d > kw || bl.shape().dims1()? != n {
            bail!("sparse first layer: x {:?}, W {:?}, b {:?} do not fit", xl.shape(), wl.shape(), bl.shape());
        }
        if let Some(&(r, c, _)) =
            self.entries.iter().find(|&&(r, c, _)| r as usize >= m || (c as usize) < d || c as usize >= kw)
        {
            bail!("sparse first layer: entry ({r}, {c}) outside rows 0..{m}, sparse columns {d}..{kw}");
        }
        let (x, w, b) = (f32::slice(xs, xl)?, f32::slice(ws, wl)?, f32::slice(bs, bl)?);
        let mut out = bias_plus_x_wt(x, w, b, m, n, d, kw);
        // In parallel over one block of output rows per thread: each block takes the
        // non-zeros of its rows (every thread scans the short entry list), so the writes
        // never overlap; each output still adds its terms in column order, whatever the
        // number of blocks.
        let rows = m.div_ceil(rayon::current_num_threads()).max(1);
        let runs: Vec<&[(u32, u32, f32)]> = self.by_column().collect();
        out.par_chunks_mut(rows * n).enumerate().for_each(|(bi, block)| {
            let (lo, hi) = ((bi * rows) as u32, ((bi + 1) * rows) as u32);
            let mut column = vec![0f32; n];
            for run in &runs {
                if !run.iter().any(|&(r, _, _)| (lo..hi).contains(&r)) {
                    continue;
                }
                let c = run[0].1 as usize;
                for (j, v) in column.iter_mut().enumerate() {
                    *v = w[j * kw + c];
                }
                for &(r, _, v) in run.iter().filter(|&&(r, _, _)| (lo..hi).contains(&r)) {
                    let o = (r - lo) as usize * n;
                    for (o, &wc) in block[o..o + n].iter_mut().zip(&column) {
                        *o += v * wc;
                    }
                }
            }
        });
        activate(&mut out, self.relu, self.mask.as_deref())?;
        Ok((CpuStorage::F32(out), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (m, d) = x.dims2()?;
        let (n, kw) = w.dims2()?;
        let gz = grad_through(grad, res, self.relu, self.mask.as_deref())?;
        if gz.len() != m * n {
            bail!("sparse first layer backward: gradient of {} for {m} x {n} outputs", gz.len());
        }
        let x = x.contiguous()?;
        let dense = d > 0 && m > 0;
        let runs: Vec<&[(u32, u32, f32)]> = self.by_column().collect();
        // In parallel over blocks of dW's rows (output units): a block zeroes its rows'
        // sparse columns (and the dense ones when there is no GEMM), then writes each sparse
        // column's gradient for its rows — sum over the column's non-zeros in order, as
        // before, so the result does not depend on the blocks. The writes stay inside the
        // block's rows (in cache), not strided across all of dW on one thread.
        const UNITS: usize = 16;
        let from = if dense { d } else { 0 };
        // SAFETY: the blocks cover dW; each writes its rows' columns d..kw (zero, then the
        // runs' columns), and columns ..d either here (no GEMM) or by the GEMM below.
        let mut dw = unsafe {
            written(n * kw, |dw| {
                dw.par_chunks_mut(UNITS * kw).enumerate().for_each(|(bi, block)| {
                    let j0 = bi * UNITS;
                    let units = block.len() / kw;
                    for row in block.chunks_exact_mut(kw) {
                        for v in &mut row[from..] {
                            v.write(0.0);
                        }
                    }
                    let mut acc = [0f32; UNITS];
                    for run in &runs {
                        let c = run[0].1 as usize;
                        acc.fill(0.0);
                        for &(r, _, v) in run.iter() {
                            let g = &gz[r as usize * n + j0..r as usize * n + j0 + units];
                            for (a, &g) in acc.iter_mut().zip(g) {
                                *a += v * g;
                            }
                        }
                        for (u, &a) in acc[..units].iter().enumerate() {
                            block[u * kw + c].write(a);
                        }
                    }
                })
            })
        };
        if dense {
            // dW[:, ..d] (n, d) = gz^T (n, m) . x (m, d); lhs(j, r) = gz[r*n + j].
            // SAFETY: the slices have exactly the sizes the strides describe.
            with_slice(&x, |xv| unsafe {
                gemm(&mut dw, kw, n, d, m, (gz.as_ptr(), n, 1), (xv.as_ptr(), 1, d), false, 1.0)
            })?;
        }
        let db = column_sums(&gz, n);
        // dx (m x d) = gz (m x n) . W[:, ..d], rhs(j, kk) = w[j*kw + kk].
        let dx = if x.track_op() {
            Some(Tensor::from_vec(
                with_slice(w, |wv| product(m, d, n, (gz.as_ptr(), 1, n), (wv.as_ptr(), 1, kw)))?,
                (m, d),
                x.device(),
            )?)
        } else {
            None
        };
        Ok((dx, sink(w, Tensor::from_vec(dw, (n, kw), w.device())?)?, sink(b, Tensor::from_vec(db, n, w.device())?)?))
    }
}

/// Rows scaled to unit L2 norm, `x / max(|x|, 1e-12)`, as one op: one pass forward, one pass
/// backward (`(g - y (g . y)) / |x|`), where the tensor-op version takes five ops forward
/// and about ten backward. f32 and f64, CPU.
pub struct L2NormaliseOp;

/// The smallest norm divided by (as in the tensor-op version's clamp).
pub const L2_EPS: f64 = 1e-12;

macro_rules! l2_rows {
    ($fwd:ident, $bwd:ident, $t:ty) => {
        fn $fwd(x: &[$t], d: usize) -> Vec<$t> {
            let d = d.max(1); // no rows to walk when d = 0 (x is empty)
            let c = rows_per_chunk(d) * d;
            // SAFETY: the chunks of y and x line up (equal lengths) and each row of y gets
            // all d values (x.len() is a multiple of d, the tensor being rows x d).
            unsafe {
                written(x.len(), |y| {
                    y.par_chunks_mut(c).zip(x.par_chunks(c)).for_each(|(yb, xb)| {
                        for (yr, xr) in yb.chunks_exact_mut(d).zip(xb.chunks_exact(d)) {
                            let norm = xr.iter().map(|v| v * v).sum::<$t>().sqrt().max(L2_EPS as $t);
                            for (o, &v) in yr.iter_mut().zip(xr) {
                                o.write(v / norm);
                            }
                        }
                    })
                })
            }
        }

        fn $bwd(x: &[$t], y: &[$t], g: &[$t], d: usize) -> Vec<$t> {
            let d = d.max(1);
            let c = rows_per_chunk(d) * d;
            // SAFETY: as in the forward pass; both branches write every value of the row.
            unsafe {
                written(x.len(), |dx| {
                    dx.par_chunks_mut(c).zip(x.par_chunks(c)).zip(y.par_chunks(c)).zip(g.par_chunks(c)).for_each(
                        |(((dx, x), y), g)| {
                            for (((dxr, xr), yr), gr) in dx
                                .chunks_exact_mut(d)
                                .zip(x.chunks_exact(d))
                                .zip(y.chunks_exact(d))
                                .zip(g.chunks_exact(d))
                            {
                                let norm = xr.iter().map(|v| v * v).sum::<$t>().sqrt();
                                if norm > L2_EPS as $t {
                                    let gy: $t = gr.iter().zip(yr).map(|(a, b)| a * b).sum();
                                    for ((o, &gv), &yv) in dxr.iter_mut().zip(gr).zip(yr) {
                                        o.write((gv - yv * gy) / norm);
                                    }
                                } else {
                                    for (o, &gv) in dxr.iter_mut().zip(gr) {
                                        o.write(gv / L2_EPS as $t);
                                    }
                                }
                            }
                        },
                    )
                })
            }
        }
    };
}
l2_rows!(l2_fwd_f32, l2_bwd_f32, f32);
l2_rows!(l2_fwd_f64, l2_bwd_f64, f64);

impl candle_core::CustomOp1 for L2NormaliseOp {
    fn name(&self) -> &'static str {
        "huse-l2-normalise"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (_, d) = l.shape().dims2()?;
        let Some((a, b)) = l.contiguous_offsets() else { bail!("l2 normalise: contiguous input expected") };
        let out = match s {
            CpuStorage::F32(v) => CpuStorage::F32(l2_fwd_f32(&v[a..b], d)),
            CpuStorage::F64(v) => CpuStorage::F64(l2_fwd_f64(&v[a..b], d)),
            _ => bail!("l2 normalise: f32 or f64 expected"),
        };
        Ok((out, l.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &candle_core::CudaStorage, l: &Layout) -> Result<(candle_core::CudaStorage, Shape)> {
        Ok((crate::cuda::l2_fwd(s, l, L2_EPS as f32)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() {
            return Ok(Some(crate::cuda::l2_bwd(x, y, g, L2_EPS as f32)?));
        }
        let (_, d) = x.dims2()?;
        let g = g.contiguous()?;
        let dx = match x.dtype() {
            // Straight from the tensors' storage (no copies on one thread first).
            DType::F32 => {
                let (xc, yc) = (x.contiguous()?, y.contiguous()?);
                let dx = with_slice(&xc, |xv| with_slice(&yc, |yv| with_slice(&g, |gv| l2_bwd_f32(xv, yv, gv, d))))???;
                Tensor::from_vec(dx, x.shape(), x.device())?
            }
            _ => {
                let v = |t: &Tensor| t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>();
                Tensor::from_vec(l2_bwd_f64(&v(x)?, &v(y)?, &v(&g)?, d), x.shape(), x.device())?.to_dtype(x.dtype())?
            }
        };
        Ok(Some(dx))
    }
}

thread_local! {
    /// Set while a [`ChainGuard`] lives on this thread.
    static CHAIN: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// While the returned guard lives, the towers built on this thread (on the CPU) run all their
/// layers and the L2 normalisation as one candle op, [`TowerOp`]: candle then keeps one node
/// per tower instead of one per layer, and the gradient between two layers passes straight
/// from one layer's backward to the next, not through candle's gradient store (there every
/// gradient starts as a zero tensor and is then added to, two passes on one thread). The
/// parameter gradients of such a tower reach only [`backward`]'s store: a plain
/// `Tensor::backward` under the guard fails with an error that says so. For training steps
/// (the train stage, the train benchmark); outside a guard every layer is its own op.
pub fn chain_towers() -> ChainGuard {
    ChainGuard(CHAIN.with(|c| c.replace(true)))
}

/// Ends [`chain_towers`] when dropped (restoring what was set before).
pub struct ChainGuard(bool);

impl Drop for ChainGuard {
    fn drop(&mut self) {
        CHAIN.with(|c| c.set(self.0));
    }
}

/// Whether towers on this thread run as one op ([`chain_towers`]).
pub fn chaining() -> bool {
    CHAIN.with(|c| c.get())
}

/// The first layer of a [`TowerOp`]: the op's own three inputs (x, W, b) go through it.
pub enum FirstLayer {
    /// A dense first layer (image input, or text without TF-IDF).
    Dense(DenseOp),
    /// A first layer over dense + sparse TF-IDF columns.
    Sparse(SparseDenseOp),
}

/// A whole tower as one op on the CPU: the first layer on the op's inputs `(x, W0, b0)`, then
/// the `rest` of the layers (each a [`DenseOp`] with its weight and bias, which must be
/// variables), then L2 normalisation. The same kernels as the per-layer ops, so the same
/// results; see [`chain_towers`] for why and when.
pub struct TowerOp {
    first: FirstLayer,
    rest: Vec<(DenseOp, Tensor, Tensor)>,
    /// Every layer's output from the forward pass (the last one before normalisation), which
    /// the backward pass reads.
    saved: std::sync::Mutex<Vec<Tensor>>,
}

impl TowerOp {
    /// The op of a tower whose first layer is `first`, followed by `rest`.
    pub fn new(first: FirstLayer, rest: Vec<(DenseOp, Tensor, Tensor)>) -> Self {
        TowerOp { first, rest, saved: std::sync::Mutex::new(Vec::new()) }
    }
}

/// An f32 CPU tensor owning `s`.
fn cpu_tensor(s: CpuStorage, shape: Shape) -> Result<Tensor> {
    match s {
        CpuStorage::F32(v) => Tensor::from_vec(v, shape, &candle_core::Device::Cpu),
        _ => bail!("chained tower: f32 data expected"),
    }
}

/// `op`'s CPU forward pass on three tensors, as a tensor (no graph node).
fn cpu_apply3(op: &impl CustomOp3, a: &Tensor, b: &Tensor, c: &Tensor) -> Result<Tensor> {
    let ((sa, la), (sb, lb), (sc, lc)) = (a.storage_and_layout(), b.storage_and_layout(), c.storage_and_layout());
    let (Storage::Cpu(a), Storage::Cpu(b), Storage::Cpu(c)) = (&*sa, &*sb, &*sc) else {
        bail!("chained tower: CPU tensors only")
    };
    let (s, shape) = op.cpu_fwd(a, la, b, lb, c, lc)?;
    cpu_tensor(s, shape)
}

impl CustomOp3 for TowerOp {
    fn name(&self) -> &'static str {
        "huse-tower"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xl: &Layout,
        ws: &CpuStorage,
        wl: &Layout,
        bs: &CpuStorage,
        bl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (s, shape) = match &self.first {
            FirstLayer::Dense(op) => op.cpu_fwd(xs, xl, ws, wl, bs, bl)?,
            FirstLayer::Sparse(op) => op.cpu_fwd(xs, xl, ws, wl, bs, bl)?,
        };
        let mut h = cpu_tensor(s, shape)?;
        let mut saved = Vec::with_capacity(self.rest.len() + 1);
        saved.push(h.clone());
        for (op, w, b) in &self.rest {
            h = cpu_apply3(op, &h, w, b)?;
            saved.push(h.clone());
        }
        let d = h.dim(1)?;
        let y = with_slice(&h, |v| l2_fwd_f32(v, d))?;
        let shape = h.shape().clone();
        *self.saved.lock().map_err(|_| candle_core::Error::Msg("chained tower: poisoned lock".into()))? = saved;
        Ok((CpuStorage::F32(y), shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if !SINK.with(|s| s.borrow().is_some()) {
            bail!(
                "a chained tower's parameter gradients go only to huse_model::fused::backward's store: call it rather than Tensor::backward, or build the towers outside huse_model::fused::chain_towers"
            );
        }
        let saved =
            self.saved.lock().map_err(|_| candle_core::Error::Msg("chained tower: poisoned lock".into()))?.clone();
        if saved.len() != self.rest.len() + 1 {
            bail!("chained tower backward before its forward pass");
        }
        let mut g = candle_core::CustomOp1::bwd(&L2NormaliseOp, &saved[self.rest.len()], res, grad)?
            .expect("the L2 backward always returns a gradient");
        for (i, (op, w, b)) in self.rest.iter().enumerate().rev() {
            let (dx, dw, db) = op.backward(&saved[i], w, b, &saved[i + 1], &g, true)?;
            if dw.is_some() || db.is_some() {
                bail!("chained tower: its layers' weights and biases must be variables");
            }
            g = dx.expect("asked for dx");
        }
        match &self.first {
            FirstLayer::Dense(op) => op.backward(x, w, b, &saved[0], &g, x.track_op()),
            FirstLayer::Sparse(op) => op.bwd(x, w, b, &saved[0], &g),
        }
    }
}
