//! The one SGEMM call of the CPU encoders (MobileNetV2's 1x1 convolutions, BERT's linear
//! layers), with slices: [`huse_cpu::gemm`] on the current rayon pool — the stage's, sized by
//! its thread budget.

/// `dst (m x n, row-major) = lhs (m x k) . rhs (k x n)`, or `+=` when `accumulate`; each
/// operand as (slice, column stride, row stride).
pub(crate) fn sgemm(
    dst: &mut [f32],
    m: usize,
    n: usize,
    k: usize,
    lhs: (&[f32], usize, usize),
    rhs: (&[f32], usize, usize),
    accumulate: bool,
) {
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
    let last =
        |(s, cs, rs): (&[f32], usize, usize), rows: usize, cols: usize| s.len() > (rows - 1) * rs + (cols - 1) * cs;
    assert!(
        dst.len() >= m * n && last(lhs, m, k) && last(rhs, k, n),
        "sgemm operands do not fit {m} x {k} . {k} x {n}"
    );
    // SAFETY: the assertion keeps every strided access inside the slices.
    unsafe {
        huse_cpu::gemm(
            dst.as_mut_ptr(),
            n,
            m,
            n,
            k,
            (lhs.0.as_ptr(), lhs.1, lhs.2),
            (rhs.0.as_ptr(), rhs.1, rhs.2),
            accumulate,
            1.0,
            None,
        )
    }
}
