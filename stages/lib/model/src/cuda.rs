//! The fused train step on a GPU (`--features cuda`): the CUDA halves of the custom ops in
//! [`crate::fused`], [`crate::loss`] and the optimiser, with the kernels of `cuda/huse.cu`
//! (compiled to PTX by nvcc at build time, see `build.rs`; loaded once per device).
//!
//! * dense layer: the bias written into the output, cuBLAS accumulating `x W^T` into it, then
//!   ReLU and dropout in one kernel; backward: one kernel for dL/dz, then cuBLAS;
//! * L2 normalisation forward and backward, one block per row;
//! * a graph-loss block: the similarities by cuBLAS (candle's matmul), value and derivative
//!   of every pair in one kernel;
//! * the gap loss: row dots and their mean in two kernels;
//! * AdamW / RMSProp: parameter and both moments in one kernel per parameter tensor.
//!
//! Why PTX from nvcc at build time rather than NVRTC at run time: the CUDA build needs nvcc
//! anyway (candle compiles its own kernels that way), kernel compile errors then stop the
//! build instead of a training run, and the GPU machine needs no NVRTC library.

use candle_core::cuda_backend::cudarc::cublas::{Gemm, GemmConfig, sys::cublasOperation_t};
use candle_core::cuda_backend::cudarc::driver::{CudaFunction, CudaSlice, CudaView, LaunchConfig, PushKernelArg};
use candle_core::cuda_backend::{CudaDevice, CudaStorage};
use candle_core::{Layout, Result, Storage, Tensor, bail};

use crate::dropout::DeviceDropout;

const PTX: &str = include_str!(concat!(env!("OUT_DIR"), "/huse.ptx"));
const MODULE: &str = "huse_model";
/// Threads per block (a multiple of 32: the kernels' block sums need it).
const THREADS: u32 = 256;

fn w<T, E: std::error::Error + Send + Sync + 'static>(r: std::result::Result<T, E>) -> Result<T> {
    r.map_err(|e| candle_core::Error::Cuda(Box::new(e)))
}

/// One block per row.
fn per_row(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.max(1) as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// Grid-stride launch over `len` elements.
fn over(len: usize) -> LaunchConfig {
    let blocks = len.div_ceil(THREADS as usize).clamp(1, 1 << 16);
    LaunchConfig { grid_dim: (blocks as u32, 1, 1), block_dim: (THREADS, 1, 1), shared_mem_bytes: 0 }
}

/// The contiguous f32 data of a CUDA storage under `l`.
fn view<'a>(s: &'a CudaStorage, l: &Layout) -> Result<CudaView<'a, f32>> {
    let Some((a, b)) = l.contiguous_offsets() else { bail!("fused CUDA op: contiguous f32 data expected") };
    Ok(s.as_cuda_slice::<f32>()?.slice(a..b))
}

/// Runs `f` on the CUDA storage of a tensor (an error for a tensor elsewhere).
fn with_cuda<R>(t: &Tensor, f: impl FnOnce(&CudaStorage, &Layout) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    match &*s {
        Storage::Cuda(c) => f(c, l),
        _ => bail!("fused CUDA op: a CUDA tensor expected"),
    }
}

/// Kernel `name` of `cuda/huse.cu` on `dev` (the module is loaded once per device).
fn func(dev: &CudaDevice, name: &str) -> Result<CudaFunction> {
    Ok(dev.get_or_load_custom_func(name, MODULE, PTX)?.into_cuda_function())
}

/// A tensor (no gradient of its own) over a fresh CUDA buffer.
fn tensor(s: CudaStorage, shape: &candle_core::Shape) -> Tensor {
    Tensor::from_storage(Storage::Cuda(s), shape.clone(), candle_core::op::BackpropOp::none(), false)
}

/// `relu?(x W^T + b)`, then dropout: the dense layer's forward on the GPU.
pub fn dense_fwd(
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
    relu: bool,
    drop: Option<&DeviceDropout>,
) -> Result<(CudaStorage, candle_core::Shape)> {
    let (m, k) = xl.shape().dims2()?;
    let (n, k2) = wl.shape().dims2()?;
    if k != k2 || bl.shape().dims1()? != n {
        bail!("fused dense layer: x {:?}, W {:?}, b {:?} do not fit", xl.shape(), wl.shape(), bl.shape());
    }
    let dev = xs.device.clone();
    let (x, wt, b) = (view(xs, xl)?, view(ws, wl)?, view(bs, bl)?);
    // SAFETY: every element is written by the bias kernel below.
    let mut out: CudaSlice<f32> = unsafe { dev.alloc::<f32>(m * n)? };
    let len = m * n;
    if len > 0 {
        let (f, stream) = (func(&dev, "huse_bias_rows")?, dev.cuda_stream());
        let mut a = stream.launch_builder(&f);
        a.arg(&mut out).arg(&b).arg(&m).arg(&n);
        // SAFETY: the kernel writes m*n elements of `out` and reads n of `b`.
        unsafe { w(a.launch(over(len)))? };
    }
    if len > 0 && k > 0 {
        // Row-major out (m x n) is column-major n x m: out^T = W (n x k) . x^T (k x m), W being
        // column-major k x n (lda k, transposed) and x column-major k x m (ldb k).
        let cfg = GemmConfig {
            transa: cublasOperation_t::CUBLAS_OP_T,
            transb: cublasOperation_t::CUBLAS_OP_N,
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: 1f32,
            lda: k as i32,
            ldb: k as i32,
            beta: 1f32,
            ldc: n as i32,
        };
        // SAFETY: the operand sizes match the configuration above.
        unsafe { w(dev.cublas_handle().gemm(cfg, &wt, &x, &mut out))? };
    }
    if len > 0 && (relu || drop.is_some()) {
        let (f, stream) = (func(&dev, "huse_relu_dropout")?, dev.cuda_stream());
        let (p, scale) = drop.map_or((0f32, 1f32), |d| (d.p, d.scale()));
        let (relu, has) = (relu as i32, drop.is_some() as i32);
        let run = |u: &CudaView<f32>, out: &mut CudaSlice<f32>| -> Result<()> {
            let mut a = stream.launch_builder(&f);
            a.arg(out).arg(u).arg(&len).arg(&relu).arg(&has).arg(&p).arg(&scale);
            // SAFETY: `u` (when read) and `out` hold len elements.
            unsafe { w(a.launch(over(len))).map(|_| ()) }
        };
        match drop {
            Some(d) => with_cuda(&d.u, |us, ul| run(&view(us, ul)?, &mut out))?,
            // Without dropout `u` is never read: pass the bias.
            None => run(&b, &mut out)?,
        }
    }
    Ok((CudaStorage::wrap_cuda_slice(out, dev), candle_core::Shape::from((m, n))))
}

/// dL/dz of a dense layer from dL/d(output) `grad` and its output `res` (GPU tensors).
pub fn grad_through(grad: &Tensor, res: &Tensor, relu: bool, drop: Option<&DeviceDropout>) -> Result<Tensor> {
    let grad = grad.contiguous()?;
    let len = res.elem_count();
    let out = with_cuda(&grad, |gs, gl| {
        with_cuda(res, |rs, rl| {
            let dev = gs.device.clone();
            let (g, r) = (view(gs, gl)?, view(rs, rl)?);
            // SAFETY: every element is written by the kernel.
            let mut gz: CudaSlice<f32> = unsafe { dev.alloc::<f32>(len)? };
            let (f, stream) = (func(&dev, "huse_grad_through")?, dev.cuda_stream());
            let (p, scale) = drop.map_or((0f32, 1f32), |d| (d.p, d.scale()));
            let (relu, has) = (relu as i32, drop.is_some() as i32);
            let mut run = |u: &CudaView<f32>| -> Result<()> {
                let mut a = stream.launch_builder(&f);
                a.arg(&mut gz).arg(&g).arg(&r).arg(u).arg(&len).arg(&relu).arg(&has).arg(&p).arg(&scale);
                // SAFETY: all four buffers hold len elements.
                unsafe { w(a.launch(over(len))).map(|_| ()) }
            };
            if len > 0 {
                match drop {
                    Some(d) => with_cuda(&d.u, |us, ul| run(&view(us, ul)?))?,
                    None => run(&r)?,
                }
            }
            Ok(CudaStorage::wrap_cuda_slice(gz, dev))
        })
    })?;
    Ok(tensor(out, res.shape()))
}

/// Rows scaled to unit L2 norm (forward).
pub fn l2_fwd(s: &CudaStorage, l: &Layout, eps: f32) -> Result<CudaStorage> {
    let (rows, d) = l.shape().dims2()?;
    let dev = s.device.clone();
    let x = view(s, l)?;
    // SAFETY: every element is written by the kernel.
    let mut y: CudaSlice<f32> = unsafe { dev.alloc::<f32>(rows * d)? };
    if rows * d > 0 {
        let (f, stream) = (func(&dev, "huse_l2_fwd")?, dev.cuda_stream());
        let d32 = d as u32;
        let mut a = stream.launch_builder(&f);
        a.arg(&x).arg(&mut y).arg(&d32).arg(&eps);
        // SAFETY: one block per row of d elements.
        unsafe { w(a.launch(per_row(rows)))? };
    }
    Ok(CudaStorage::wrap_cuda_slice(y, dev))
}

/// The L2 normalisation's backward: dx from x, y = x/|x| and dL/dy.
pub fn l2_bwd(x: &Tensor, y: &Tensor, g: &Tensor, eps: f32) -> Result<Tensor> {
    let (rows, d) = x.dims2()?;
    let (x, y, g) = (x.contiguous()?, y.contiguous()?, g.contiguous()?);
    let out = with_cuda(&x, |xs, xl| {
        with_cuda(&y, |ys, yl| {
            with_cuda(&g, |gs, gl| {
                let dev = xs.device.clone();
                // SAFETY: every element is written by the kernel.
                let mut dx: CudaSlice<f32> = unsafe { dev.alloc::<f32>(rows * d)? };
                if rows * d > 0 {
                    let (f, stream) = (func(&dev, "huse_l2_bwd")?, dev.cuda_stream());
                    let (xv, yv, gv, d32) = (view(xs, xl)?, view(ys, yl)?, view(gs, gl)?, d as u32);
                    let mut a = stream.launch_builder(&f);
                    a.arg(&xv).arg(&yv).arg(&gv).arg(&mut dx).arg(&d32).arg(&eps);
                    // SAFETY: one block per row of d elements, four buffers of rows*d.
                    unsafe { w(a.launch(per_row(rows)))? };
                }
                Ok(CudaStorage::wrap_cuda_slice(dx, dev))
            })
        })
    })?;
    Ok(tensor(out, x.shape()))
}

/// The sum of a device buffer of `n` values, as a one-element buffer.
fn sum(dev: &CudaDevice, x: &CudaSlice<f32>, n: usize) -> Result<CudaSlice<f32>> {
    // SAFETY: the one element is written by the kernel.
    let mut out: CudaSlice<f32> = unsafe { dev.alloc::<f32>(1)? };
    let (f, stream) = (func(dev, "huse_sum")?, dev.cuda_stream());
    let mut a = stream.launch_builder(&f);
    a.arg(x).arg(&n).arg(&mut out);
    // SAFETY: one block reads n values, writes one.
    unsafe { w(a.launch(per_row(1)))? };
    Ok(out)
}

/// The constants of one graph-loss block on the GPU: the class distances and labels (GPU
/// tensors: f32 classes x classes, u32 rows, u32 columns), the margin and the variant.
#[derive(Clone)]
pub struct GraphTerms {
    pub a: Tensor,
    pub y1: Tensor,
    pub y2: Tensor,
    pub zeta: f32,
    pub hinge: bool,
}

impl GraphTerms {
    /// Value (sum over pairs / n^2) of the block with similarities `s` (n x m); with
    /// `coef`, also d value / d s into a fresh n x m buffer.
    fn run(&self, s: &CudaStorage, l: &Layout, coef: bool) -> Result<(CudaSlice<f32>, Option<CudaSlice<f32>>)> {
        let (n, m) = l.shape().dims2()?;
        let classes = self.a.dim(1)?;
        if self.y1.dim(0)? != n || self.y2.dim(0)? != m {
            bail!("graph loss: similarities {:?} do not fit the labels", l.shape());
        }
        let dev = s.device.clone();
        let sv = view(s, l)?;
        // SAFETY: written by the kernel (row_value: every row; coef: every element when asked).
        let mut rows: CudaSlice<f32> = unsafe { dev.alloc::<f32>(n.max(1))? };
        let mut c: CudaSlice<f32> = unsafe { dev.alloc::<f32>(if coef { n * m } else { 1 })? };
        if n > 0 {
            let (f, stream) = (func(&dev, "huse_graph_terms")?, dev.cuda_stream());
            let (m32, k32, hinge, scale, want) =
                (m as u32, classes as u32, self.hinge as i32, 1.0 / (n * n) as f32, coef as i32);
            with_cuda(&self.a, |as_, al| {
                with_cuda(&self.y1, |y1s, y1l| {
                    with_cuda(&self.y2, |y2s, y2l| {
                        let av = view(as_, al)?;
                        let Some((a1, b1)) = y1l.contiguous_offsets() else {
                            bail!("graph loss: contiguous labels expected")
                        };
                        let Some((a2, b2)) = y2l.contiguous_offsets() else {
                            bail!("graph loss: contiguous labels expected")
                        };
                        let (y1v, y2v) =
                            (y1s.as_cuda_slice::<u32>()?.slice(a1..b1), y2s.as_cuda_slice::<u32>()?.slice(a2..b2));
                        let mut a = stream.launch_builder(&f);
                        a.arg(&sv)
                            .arg(&av)
                            .arg(&y1v)
                            .arg(&y2v)
                            .arg(&m32)
                            .arg(&k32)
                            .arg(&self.zeta)
                            .arg(&hinge)
                            .arg(&scale)
                            .arg(&want)
                            .arg(&mut c)
                            .arg(&mut rows);
                        // SAFETY: one block per row of m similarities; labels index A inside
                        // its classes x classes (they come from the same class tree).
                        unsafe { w(a.launch(per_row(n))).map(|_| ()) }
                    })
                })
            })?;
        }
        let value = if n > 0 { sum(&dev, &rows, n)? } else { dev.alloc_zeros::<f32>(1)? };
        Ok((value, coef.then_some(c)))
    }
}

/// The graph-loss block's value from the similarities (forward of [`GraphTermsOp`]).
pub struct GraphTermsOp(pub GraphTerms);
/// d value / d s of a graph-loss block (its backward; no gradient of its own).
struct GraphCoefOp(GraphTerms);

impl candle_core::CustomOp1 for GraphTermsOp {
    fn name(&self) -> &'static str {
        "huse-graph-terms"
    }
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        bail!("huse-graph-terms runs on CUDA only (the CPU has GraphLossOp)")
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, candle_core::Shape)> {
        let (value, _) = self.0.run(s, l, false)?;
        Ok((CudaStorage::wrap_cuda_slice(value, s.device.clone()), candle_core::Shape::from(())))
    }
    fn bwd(&self, s: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let coef = s.contiguous()?.apply_op1_no_bwd(&GraphCoefOp(self.0.clone()))?;
        Ok(Some(coef.broadcast_mul(grad)?))
    }
}

impl candle_core::CustomOp1 for GraphCoefOp {
    fn name(&self) -> &'static str {
        "huse-graph-coef"
    }
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        bail!("huse-graph-coef runs on CUDA only")
    }
    fn cuda_fwd(&self, s: &CudaStorage, l: &Layout) -> Result<(CudaStorage, candle_core::Shape)> {
        let (_, coef) = self.0.run(s, l, true)?;
        Ok((CudaStorage::wrap_cuda_slice(coef.expect("asked for"), s.device.clone()), l.shape().clone()))
    }
}

/// The gap loss, mean over rows of `1 - a_i . b_i`, as one op (two kernels).
pub struct GapLossOp;

impl candle_core::CustomOp2 for GapLossOp {
    fn name(&self) -> &'static str {
        "huse-gap-loss"
    }
    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &Layout,
        _: &candle_core::CpuStorage,
        _: &Layout,
    ) -> Result<(candle_core::CpuStorage, candle_core::Shape)> {
        bail!("huse-gap-loss runs on CUDA only (the CPU uses tensor ops)")
    }
    fn cuda_fwd(
        &self,
        s1: &CudaStorage,
        l1: &Layout,
        s2: &CudaStorage,
        l2: &Layout,
    ) -> Result<(CudaStorage, candle_core::Shape)> {
        let (n, d) = l1.shape().dims2()?;
        if l2.shape().dims2()? != (n, d) {
            bail!("gap loss: {:?} and {:?} differ", l1.shape(), l2.shape());
        }
        let dev = s1.device.clone();
        let (a, b) = (view(s1, l1)?, view(s2, l2)?);
        // SAFETY: every row value is written by the kernel.
        let mut rows: CudaSlice<f32> = unsafe { dev.alloc::<f32>(n.max(1))? };
        if n > 0 {
            let (f, stream) = (func(&dev, "huse_gap_rows")?, dev.cuda_stream());
            let (d32, inv_n) = (d as u32, 1.0 / n as f32);
            let mut args = stream.launch_builder(&f);
            args.arg(&a).arg(&b).arg(&d32).arg(&inv_n).arg(&mut rows);
            // SAFETY: one block per row of d elements.
            unsafe { w(args.launch(per_row(n)))? };
        }
        let value = if n > 0 { sum(&dev, &rows, n)? } else { dev.alloc_zeros::<f32>(1)? };
        Ok((CudaStorage::wrap_cuda_slice(value, dev), candle_core::Shape::from(())))
    }
    fn bwd(&self, a: &Tensor, b: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let c = grad.affine(-1.0 / a.dim(0)? as f64, 0.0)?;
        Ok((Some(b.broadcast_mul(&c)?), Some(a.broadcast_mul(&c)?)))
    }
}

/// The constants of one optimiser step, as the kernels take them.
pub enum Step {
    Adamw { lr: f32, decay: f32, b1: f32, b2: f32, c1: f32, c2: f32, eps: f32 },
    Rmsprop { lr: f32, rho: f32, eps: f32, momentum: f32 },
}

/// Runs `f` on the contiguous f32 data of a CUDA tensor, mutably, in place.
struct WithMut<'a>(std::cell::RefCell<&'a mut dyn FnMut(&mut CudaStorage, usize, usize) -> Result<()>>);

impl candle_core::InplaceOp1 for WithMut<'_> {
    fn name(&self) -> &'static str {
        "huse-optimizer-step-cuda"
    }
    fn cpu_fwd(&self, _: &mut candle_core::CpuStorage, _: &Layout) -> Result<()> {
        bail!("huse-optimizer-step-cuda: CUDA tensors only")
    }
    fn cuda_fwd(&self, s: &mut CudaStorage, l: &Layout) -> Result<()> {
        let Some((a, b)) = l.contiguous_offsets() else { bail!("fused optimizer step needs contiguous f32 data") };
        (self.0.borrow_mut())(s, a, b)
    }
}

fn with_mut(t: &Tensor, f: &mut dyn FnMut(&mut CudaStorage, usize, usize) -> Result<()>) -> Result<()> {
    t.inplace_op1(&WithMut(std::cell::RefCell::new(f)))
}

/// One optimiser step for one parameter tensor on the GPU: parameter and both states updated
/// in place by one kernel. All four are contiguous f32 CUDA tensors of one shape.
pub fn optimizer_step(param: &Tensor, grad: &Tensor, s1: &Tensor, s2: &Tensor, step: &Step) -> Result<()> {
    let len = param.elem_count();
    if len == 0 {
        return Ok(());
    }
    with_cuda(grad, |gs, gl| {
        let g = view(gs, gl)?;
        let dev = gs.device.clone();
        with_mut(s1, &mut |a_s, a0, a1| {
            with_mut(s2, &mut |b_s, b0, b1| {
                with_mut(param, &mut |p_s, p0, p1| {
                    let mut p = p_s.as_cuda_slice_mut::<f32>()?.slice_mut(p0..p1);
                    let mut a = a_s.as_cuda_slice_mut::<f32>()?.slice_mut(a0..a1);
                    let mut b = b_s.as_cuda_slice_mut::<f32>()?.slice_mut(b0..b1);
                    match *step {
                        Step::Adamw { lr, decay, b1, b2, c1, c2, eps } => {
                            let (f, stream) = (func(&dev, "huse_adamw")?, dev.cuda_stream());
                            let mut args = stream.launch_builder(&f);
                            args.arg(&mut p)
                                .arg(&mut a)
                                .arg(&mut b)
                                .arg(&g)
                                .arg(&len)
                                .arg(&lr)
                                .arg(&decay)
                                .arg(&b1)
                                .arg(&b2)
                                .arg(&c1)
                                .arg(&c2)
                                .arg(&eps);
                            // SAFETY: four buffers of len elements.
                            unsafe { w(args.launch(over(len))).map(|_| ()) }
                        }
                        Step::Rmsprop { lr, rho, eps, momentum } => {
                            let (f, stream) = (func(&dev, "huse_rmsprop")?, dev.cuda_stream());
                            let mut args = stream.launch_builder(&f);
                            args.arg(&mut p)
                                .arg(&mut a)
                                .arg(&mut b)
                                .arg(&g)
                                .arg(&len)
                                .arg(&lr)
                                .arg(&rho)
                                .arg(&eps)
                                .arg(&momentum);
                            // SAFETY: four buffers of len elements.
                            unsafe { w(args.launch(over(len))).map(|_| ()) }
                        }
                    }
                })
            })
        })
    })
}
