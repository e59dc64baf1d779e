//! The one SGEMM call of the CPU encoders (MobileNetV2's 1x1 convolutions, BERT's linear
//! layers): the gemm crate on the current rayon pool — the stage's, sized by its thread budget.

/// `dst (m x n, row-major) = lhs (m x k) . rhs (k x n)`, or `+=` when `accumulate`; each
/// operand as (slice, column stride, row stride).
pub(crate) fn sgemm(dst: &mut [f32], m: usize, n: usize, k: usize, lhs: (&[f32], usize, usize), rhs: (&[f32], usize, usize), accumulate: bool) {
    if m == 0 || n == 0 {
        return;
    }
    if k == 0 {
        // An empty product: nothing to add, or zeros (the destination's old values go).
        if !accumulate {
            dst[..m * n].fill(0.0);
        }
        return;
    }
    let last = |(s, cs, rs): (&[f32], usize, usize), rows: usize, cols: usize| s.len() > (rows - 1) * rs + (cols - 1) * cs;
    assert!(dst.len() >= m * n && last(lhs, m, k) && last(rhs, k, n), "sgemm operands do not fit {m} x {k} . {k} x {n}");
    let threads = rayon::current_num_threads();
    let par = if threads > 1 && m * n * k > 1 << 15 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let alpha = if accumulate { 1.0 } else { 0.0 };
    // SAFETY: the assertion keeps every strided access inside the slices.
    unsafe {
        gemm::gemm(
            m, n, k,
            dst.as_mut_ptr(), 1, n as isize, accumulate,
            lhs.0.as_ptr(), lhs.1 as isize, lhs.2 as isize,
            rhs.0.as_ptr(), rhs.1 as isize, rhs.2 as isize,
            alpha, 1.0f32, false, false, false, par,
        )
    }
}
