//! What every CPU compute path of huse-run shares.
//!
//! - [`setup_process`]: the settings a process that computes must make before its first
//!   thread — candle's own element-wise pool kept to one thread, so that a stage's work stays
//!   inside its thread budget, and freed memory kept in the process. `huse-run`'s `main` and
//!   the train and encode benches call it, so the benches measure what the tool runs.
//! - [`gemm`]: the one call into the gemm crate (candle's CPU matmul, with the AVX-512
//!   micro-kernels the workspace turns on), threaded on the current rayon pool — a stage's
//!   pool, sized by its budget — or on a given number of threads. The frozen encoders
//!   (MobileNetV2's 1x1 convolutions, BERT's linear layers) and the fused train step
//!   (`huse_model::fused`) both go through it.

/// Multiplies on the CPU: f32 and f64.
pub trait Scalar: Copy + Send + Sync + 'static {
    /// Zero.
    const ZERO: Self;
    /// One.
    const ONE: Self;
}

impl Scalar for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

impl Scalar for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
}

/// Products smaller than this many multiply-adds run on the calling thread: splitting them
/// costs more than it gains.
const PARALLEL_FROM: usize = 1 << 15;

/// `dst (m x n) = beta * lhs (m x k) . rhs (k x n)`, or `dst += ...` when `accumulate`, on at
/// most `threads` threads (`None`: every thread of the current rayon pool). Each operand is
/// (pointer, column stride, row stride); `dst` is row-major with row stride `ldc`. The result
/// does not depend on the thread count: the gemm crate splits rows and columns among threads,
/// never a sum. Without `accumulate` the destination is never read, so it may be memory not
/// yet initialised.
///
/// # Safety
/// Every element the strides reach (`m` x `k` of `lhs`, `k` x `n` of `rhs`, `m` x `n` of
/// `dst`) must be inside its allocation; `dst` must not overlap the operands, and no other
/// thread may touch `dst`'s block meanwhile. With `k == 0` and no `accumulate` the
/// destination may be left unwritten.
#[allow(clippy::too_many_arguments)]
pub unsafe fn gemm<T: Scalar>(
    dst: *mut T,
    ldc: usize,
    m: usize,
    n: usize,
    k: usize,
    lhs: (*const T, usize, usize),
    rhs: (*const T, usize, usize),
    accumulate: bool,
    beta: T,
    threads: Option<usize>,
) {
    let threads = threads.unwrap_or_else(rayon::current_num_threads);
    let par = if threads > 1 && m * n * k > PARALLEL_FROM {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let alpha = if accumulate { T::ONE } else { T::ZERO };
    // SAFETY: forwarded from the caller.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            1,
            ldc as isize,
            accumulate,
            lhs.0,
            lhs.1 as isize,
            lhs.2 as isize,
            rhs.0,
            rhs.1 as isize,
            rhs.2 as isize,
            alpha,
            beta,
            false,
            false,
            false,
            par,
        )
    }
}

/// The settings of a process that computes, made before its first thread:
///
/// - `CANDLE_NUM_THREADS=1` unless the user set it. candle runs large element-wise ops on a
///   spinning thread pool of its own, sized to the machine and outside any stage's thread
///   budget; one thread (the caller) keeps every stage within its budget (the heavy
///   element-wise work is in our kernels, on the stage's pool).
/// - Freed memory stays in the process instead of going back to the system at once: glibc
///   gives buffers over its mmap threshold straight back (munmap) and trims the heap's top,
///   so every train step, BERT layer and image batch page-faulted and zeroed its buffers
///   afresh (5-15% of a stage's time in the kernel's page-fault and clear-page code).
///   Buffers up to 32 MiB now come from the heap and freed memory stays for the next step;
///   the resident size is then the heap's high-water mark (the full-data encode peaked at
///   1.10 GiB with it, 0.56 without; 0.80 once MobileNetV2 kept its own buffers). Measured:
///   the train step +7% at 1 and 2 threads (README, Benchmarks).
///
/// # Safety
/// No other thread may exist yet (it sets an environment variable and allocator parameters).
pub unsafe fn setup_process() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        // SAFETY: the caller's promise: a single thread.
        unsafe { std::env::set_var("CANDLE_NUM_THREADS", "1") };
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets allocator parameters; a single thread (the caller's promise).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 64 << 20);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A strided product against the definition, written and accumulated, on 1 and 3 threads
    /// (big enough to be split), f32 and f64.
    fn check<T: Scalar + Into<f64> + From<f32>>() {
        let (m, n, k) = (67, 45, 31);
        let a: Vec<T> = (0..m * k).map(|i| T::from(((i * 7 % 13) as f32 - 6.0) / 8.0)).collect();
        // rhs stored transposed: element (p, j) at j * k + p, column stride k, row stride 1.
        let b: Vec<T> = (0..k * n).map(|i| T::from(((i * 5 % 11) as f32 - 5.0) / 4.0)).collect();
        let want = |i: usize, j: usize| (0..k).map(|p| a[i * k + p].into() * b[j * k + p].into()).sum::<f64>();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        for threads in [Some(1), Some(3), None] {
            let mut d = vec![T::from(1.0); m * n];
            // SAFETY: the strides stay inside the three vectors.
            pool.install(|| unsafe {
                gemm(d.as_mut_ptr(), n, m, n, k, (a.as_ptr(), 1, k), (b.as_ptr(), k, 1), false, T::from(2.0), threads)
            });
            for i in 0..m {
                for j in 0..n {
                    assert!((d[i * n + j].into() - 2.0 * want(i, j)).abs() < 1e-4, "{threads:?} ({i}, {j})");
                }
            }
            // SAFETY: as above.
            pool.install(|| unsafe {
                gemm(d.as_mut_ptr(), n, m, n, k, (a.as_ptr(), 1, k), (b.as_ptr(), k, 1), true, T::ONE, threads)
            });
            for i in 0..m {
                for j in 0..n {
                    assert!(
                        (d[i * n + j].into() - 3.0 * want(i, j)).abs() < 1e-4,
                        "{threads:?} ({i}, {j}) accumulated"
                    );
                }
            }
        }
    }

    #[test]
    fn products_equal_the_definition_written_and_accumulated_on_any_thread_count() {
        check::<f32>();
        check::<f64>();
    }
}
