// CUDA kernels of the fused train step: the GPU counterparts of the CPU kernels in
// fused.rs (dense layer epilogue and its backward, L2 normalisation), loss.rs (graph-loss
// block terms, gap loss) and optim.rs (AdamW, RMSProp). The GEMMs are cuBLAS's (called from
// cuda.rs); these kernels do the element-wise and per-row work around them in one pass each.
// Compiled to PTX by nvcc at build time (build.rs); f32 only, contiguous row-major data.
#include <stdint.h>

#define GRID_STRIDE(i, n) \
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (size_t)gridDim.x * blockDim.x)

// The sum of `v` over the block (blockDim.x a multiple of 32, at most 1024), in every thread.
__device__ float block_sum(float v) {
    __shared__ float warp_sums[32];
    __shared__ float total;
    const unsigned lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
    if (lane == 0) warp_sums[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const unsigned warps = (blockDim.x + 31) >> 5;
        v = lane < warps ? warp_sums[lane] : 0.f;
        for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
        if (lane == 0) total = v;
    }
    __syncthreads();
    const float r = total;
    __syncthreads();  // the shared memory may be reused by the next call
    return r;
}

// ---- dense layer -------------------------------------------------------------------------

// out (m x n) = the bias in every row; cuBLAS then accumulates x W^T into it.
extern "C" __global__ void huse_bias_rows(float* out, const float* b, size_t m, size_t n) {
    GRID_STRIDE(i, m * n) out[i] = b[i % n];
}

// ReLU (when relu), then dropout (when drop): a unit is kept iff u >= p, and scaled by
// `scale` = 1/(1-p). `if` rather than fmaxf, so a NaN stays NaN (the training guard sees it).
extern "C" __global__ void huse_relu_dropout(float* out, const float* u, size_t len, int relu, int drop, float p, float scale) {
    GRID_STRIDE(i, len) {
        float v = out[i];
        if (relu && v < 0.f) v = 0.f;
        if (drop) v *= (u[i] >= p) ? scale : 0.f;
        out[i] = v;
    }
}

// dL/dz from dL/d(output) g and the layer's output res: zero where the ReLU cut the unit
// (res <= 0), times the dropout factor elsewhere.
extern "C" __global__ void huse_grad_through(float* gz, const float* g, const float* res, const float* u, size_t len, int relu, int drop, float p, float scale) {
    GRID_STRIDE(i, len) {
        const float k = drop ? ((u[i] >= p) ? scale : 0.f) : 1.f;
        gz[i] = relu ? (res[i] > 0.f ? g[i] * k : 0.f) : g[i] * k;
    }
}

// ---- L2 normalisation (one block per row) ------------------------------------------------

extern "C" __global__ void huse_l2_fwd(const float* x, float* y, unsigned int d, float eps) {
    const float* xr = x + (size_t)blockIdx.x * d;
    float* yr = y + (size_t)blockIdx.x * d;
    float s = 0.f;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) s += xr[j] * xr[j];
    const float norm = fmaxf(sqrtf(block_sum(s)), eps);
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) yr[j] = xr[j] / norm;
}

// dx = (g - y (g . y)) / |x|, or g / eps where |x| <= eps (the clamp's branch).
extern "C" __global__ void huse_l2_bwd(const float* x, const float* y, const float* g, float* dx, unsigned int d, float eps) {
    const size_t r = (size_t)blockIdx.x * d;
    float ss = 0.f, gy = 0.f;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) {
        ss += x[r + j] * x[r + j];
        gy += g[r + j] * y[r + j];
    }
    const float norm = sqrtf(block_sum(ss));
    gy = block_sum(gy);
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x)
        dx[r + j] = norm > eps ? (g[r + j] - y[r + j] * gy) / norm : g[r + j] / eps;
}

// ---- losses (one block per row) ----------------------------------------------------------

// One graph-loss block from the similarities s = e1 e2^T (n x m): for pair (i, j), i != j,
// d = 1 - s, t = A[y1_i][y2_j]: value [t < zeta][d < zeta] (d - t)^2 (+ hinge
// [t >= zeta][d < zeta] (zeta - d)^2), times `scale` = 1/n^2. Writes each row's value sum
// to row_value, and when want_coef, d value / d s to coef (n x m).
extern "C" __global__ void huse_graph_terms(const float* s, const float* a, const uint32_t* y1, const uint32_t* y2, unsigned int m, unsigned int classes, float zeta, int hinge, float scale, int want_coef, float* coef, float* row_value) {
    const unsigned i = blockIdx.x;
    const float* a_row = a + (size_t)y1[i] * classes;
    const size_t r = (size_t)i * m;
    float total = 0.f;
    for (unsigned j = threadIdx.x; j < m; j += blockDim.x) {
        float v = 0.f, g = 0.f;
        if (i != j) {
            const float d = 1.f - s[r + j];
            const float t = a_row[y2[j]];
            if (t < zeta) {
                if (d < zeta) { v = (d - t) * (d - t); g = 2.f * (d - t); }
            } else if (hinge && d < zeta) {
                v = (zeta - d) * (zeta - d); g = -2.f * (zeta - d);
            }
        }
        total += v;
        if (want_coef) coef[r + j] = -g * scale;  // d = 1 - s: d/ds = -d/dd
    }
    total = block_sum(total);
    if (threadIdx.x == 0) row_value[i] = total * scale;
}

// Gap loss rows: (1 - a_i . b_i) / n for unit rows a_i, b_i of width d.
extern "C" __global__ void huse_gap_rows(const float* a, const float* b, unsigned int d, float inv_n, float* row_value) {
    const size_t r = (size_t)blockIdx.x * d;
    float s = 0.f;
    for (unsigned j = threadIdx.x; j < d; j += blockDim.x) s += a[r + j] * b[r + j];
    s = block_sum(s);
    if (threadIdx.x == 0) row_value[blockIdx.x] = (1.f - s) * inv_n;
}

// out[0] = the sum of x (one block).
extern "C" __global__ void huse_sum(const float* x, size_t n, float* out) {
    float s = 0.f;
    for (size_t i = threadIdx.x; i < n; i += blockDim.x) s += x[i];
    s = block_sum(s);
    if (threadIdx.x == 0) out[0] = s;
}

// ---- optimisers: parameter and both moments in place, one pass -------------------------

// torch.optim.AdamW: p *= decay; m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2;
// p -= lr (m c1) / (sqrt(v c2) + eps), c1 = 1/(1-b1^t), c2 = 1/(1-b2^t).
extern "C" __global__ void huse_adamw(float* p, float* m, float* v, const float* g, size_t len, float lr, float decay, float b1, float b2, float c1, float c2, float eps) {
    GRID_STRIDE(i, len) {
        const float gi = g[i];
        const float mi = b1 * m[i] + (1.f - b1) * gi;
        const float vi = b2 * v[i] + (1.f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - lr * ((mi * c1) / (sqrtf(vi * c2) + eps));
    }
}

// torch.optim.RMSprop (not centred): v = rho v + (1-rho) g^2; step = g / (sqrt(v) + eps);
// with momentum buf = momentum buf + step, p -= lr buf; else p -= lr step.
extern "C" __global__ void huse_rmsprop(float* p, float* v, float* buf, const float* g, size_t len, float lr, float rho, float eps, float momentum) {
    GRID_STRIDE(i, len) {
        const float gi = g[i];
        const float vi = rho * v[i] + (1.f - rho) * gi * gi;
        v[i] = vi;
        float u = gi / (sqrtf(vi) + eps);
        if (momentum > 0.f) {
            u = momentum * buf[i] + u;
            buf[i] = u;
        }
        p[i] -= lr * u;
    }
}
