// The lm_head loss rows: cross-entropy (evaluation, and forward + backward for QAT) and the fused
// distillation row (QAD). One block of up to 512 threads per row; every kernel reads a row once to
// get its statistics (an online max and Σ exp in one pass: a thread's sums are rescaled by
// exp(old max − new max) when its running maximum grows, then brought to the block maximum) and,
// for a gradient, once more to write it. Rows are read as groups of four when V (and the teacher's
// stride) are multiples of 4 and the rows 16-byte aligned (8-byte for the bf16 logits of the `_bf16` kernels), else
// element by element. The four terms of a group are added in fp32, every sum over the row in double, in a fixed order (each
// thread its own elements in order, then the fixed block reductions of common.cu): the results
// do not depend on the launch.

#define LOSS_THREADS 512

// e^x in the loss rows (x ≤ 0 there: a logit less its row's maximum, or scaled ones): ex2.approx of x·log2(e) on the
// special-function unit, about 2 ulp plus the rounding of x·log2(e) (1e-6 relative at x = −20; results under 2^−126
// flushed to 0). expf's accurate sequence is several times the instructions, and these passes do little else: up to
// five exponentials per logit in the distillation rows, which bound them (not memory).
__device__ __forceinline__ float loss_exp(float x) {
    float y;
    x = __fmul_rn(x, 1.44269504f);
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// Element i of a row of logits, fp32 or bf16, as a float.
__device__ __forceinline__ float logit(const float *x, long i) { return x[i]; }
__device__ __forceinline__ float logit(const u16 *x, long i) { return bf16_to_f32(x[i]); }

// Group g of a row: N = 4, the four elements at 4g (a float4, or 8 bytes of bf16); N = 1, element g.
template <int N> __device__ __forceinline__ void load_group(const float *x, int g, float (&v)[N]) {
    if constexpr (N == 4) {
        float4 q = *(const float4 *)(x + 4 * g);
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
        v[0] = x[g];
    }
}
template <int N> __device__ __forceinline__ void load_group(const u16 *x, int g, float (&v)[N]) {
    if constexpr (N == 4) {
        float4 q = f32x4(*(const uint2 *)(x + 4 * g));
        v[0] = q.x; v[1] = q.y; v[2] = q.z; v[3] = q.w;
    } else {
        v[0] = bf16_to_f32(x[g]);
    }
}
template <int N> __device__ __forceinline__ void store_group(float *x, int g, const float (&v)[N]) {
    if constexpr (N == 4) {
        *(float4 *)(x + 4 * g) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
        x[g] = v[0];
    }
}
// (bf16: each value rounded, f32_to_bf16)
template <int N> __device__ __forceinline__ void store_group(u16 *x, int g, const float (&v)[N]) {
    if constexpr (N == 4) {
        *(uint2 *)(x + 4 * g) = bf16x4(v[0], v[1], v[2], v[3]);
    } else {
        x[g] = f32_to_bf16(v[0]);
    }
}
// The vector path's condition for a row array of this element type.
__device__ __forceinline__ bool vec_aligned(const float *p) { return aligned16(p); }
__device__ __forceinline__ bool vec_aligned(const u16 *p) { return aligned8(p); }

// A group maximum gm above the running maximum m: m becomes gm and the returned factor
// exp(m − gm) (0 from m = −∞) rescales the sums tied to m; otherwise the factor is 1.
__device__ __forceinline__ double raise_max(float &m, float gm) {
    if (!(gm > m)) return 1.0;
    double f = m == -INFINITY ? 0.0 : exp((double)m - (double)gm);
    m = gm;
    return f;
}

// The block maximum of the threads' running maxima (to *M) and the factor exp(m − M) that brings
// this thread's sums to it: 0 for a thread that saw no element (its sums are 0, or NaN when it
// saw only NaNs, which 0 keeps NaN).
__device__ __forceinline__ double to_block_max(float m, float *M) {
    float bm = block_max(m);
    *M = bm;
    return m == -INFINITY ? 0.0 : exp((double)m - (double)bm);
}

// Max and Σ exp(x − max) of one row over the block (every thread gets both): one pass.
template <int N, typename T> __device__ void lse_stats(const T *x, int groups, float *maxOut, double *sumOut) {
    float m = -INFINITY;
    double s = 0;
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        float v[N];
        load_group<N>(x, g, v);
        float gm = v[0];
#pragma unroll
        for (int k = 1; k < N; k++) gm = fmaxf(gm, v[k]);
        double f = raise_max(m, gm);
        if (f != 1.0) s *= f;
        float e = 0;
#pragma unroll
        for (int k = 0; k < N; k++) e += loss_exp(v[k] - m);
        s += (double)e;
    }
    double f = to_block_max(m, maxOut);
    *sumOut = block_sum_d(s * f);
}

// The lm_head loss over one chunk of logits [rows, V] (Sources/QATModels/Layers/CrossEntropy.swift):
// per row, loss = logsumexp(logits) - logits[target]; rows whose target is the ignore index (-100)
// give 0 and are not counted. The per-row losses go back to the host, which sums them in row
// order (so the figure does not depend on the launch).
extern "C" __global__ void __launch_bounds__(LOSS_THREADS, 2) cross_entropy_rows(float *rowLoss, const float *logits,
                                                                                  const int *targets, int rows, int V) {
    int r = blockIdx.x;
    if (r >= rows) return;
    int t = targets[r];
    const float *x = logits + (long)r * V;
    float m;
    double s;
    if ((V & 3) == 0 && aligned16(logits)) lse_stats<4>(x, V >> 2, &m, &s);
    else lse_stats<1>(x, V, &m, &s);
    if (threadIdx.x == 0) rowLoss[r] = t < 0 ? 0.0f : (float)((double)m + log(s) - (double)x[t]);
}

// The gradient pass of cross-entropy: z ← e^(z − m)·k, k·gradScale subtracted at the target;
// z16 (when not null): the same values rounded to bf16 (the input of the lm_head's bf16 products);
// then z itself is written only when keep32 (a bias or an adapter of the lm_head reads the fp32 gradient).
// (z bf16: the gradient is written there rounded, in place of the logits; z16 is null then.)
template <int N, typename T> __device__ void ce_grad(T *z, u16 *z16, int groups, int t, float m, float k, float gradScale, bool keep32) {
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        float v[N];
        load_group<N>(z, g, v);
#pragma unroll
        for (int i = 0; i < N; i++) {
            float e = __fmul_rn(loss_exp(v[i] - m), k);
            v[i] = N * g + i == t ? __fsub_rn(e, gradScale) : e;
        }
        if (keep32) store_group<N>(z, g, v);
        if (z16) {
#pragma unroll
            for (int i = 0; i < N; i++) z16[N * g + i] = f32_to_bf16(v[i]);
        }
    }
}

// cross_entropy_backward's row r over logits z (fp32, or bf16 in cross_entropy_backward_bf16).
template <typename T> __device__ void ce_backward_row(float *rowLoss, T *logits, const int *targets, int r, int V, float gradScale,
                                                      u16 *logits16, int keep32) {
    int t = targets[r];
    T *z = logits + (long)r * V;
    u16 *z16 = logits16 ? logits16 + (long)r * V : nullptr;
    bool k32 = !z16 || keep32;
    if (t < 0) {
        float zero[1] = {0.0f};
        for (int j = threadIdx.x; j < V; j += blockDim.x) {
            if (k32) store_group<1>(z, j, zero);
            if (z16) z16[j] = 0;
        }
        if (threadIdx.x == 0) rowLoss[r] = 0.0f;
        return;
    }
    float zt = logit(z, t);   // read before the block reductions below, so before any thread writes z
    bool vec = (V & 3) == 0 && vec_aligned(logits);
    float m;
    double s;
    if (vec) lse_stats<4>(z, V >> 2, &m, &s);
    else lse_stats<1>(z, V, &m, &s);
    float k = (float)((double)gradScale / s);
    if (vec) ce_grad<4>(z, z16, V >> 2, t, m, k, gradScale, k32);
    else ce_grad<1>(z, z16, V, t, m, k, gradScale, k32);
    if (threadIdx.x == 0) rowLoss[r] = (float)((double)m + log(s) - (double)zt);
}

// Cross-entropy forward and backward of one chunk (CrossEntropy.row with gradScale): per row
// the loss logsumexp(z) − z[t] to rowLoss, and z replaced in place by
// gradScale·(softmax(z) − onehot(t)); an ignored row (t < 0) gives 0 and a zero gradient.
// logits16 (when not null, [rows, V] bf16): the gradient's bf16 copy too, written in the same
// pass (so no separate conversion reads the chunk again); z then keeps the logits unless keep32. Two passes over the
// row: the statistics, then the gradient.
extern "C" __global__ void __launch_bounds__(LOSS_THREADS, 2) cross_entropy_backward(float *rowLoss, float *logits,
                                                                                      const int *targets, int rows, int V,
                                                                                      float gradScale, u16 *logits16, int keep32) {
    if (blockIdx.x < rows) ce_backward_row(rowLoss, logits, targets, blockIdx.x, V, gradScale, logits16, keep32);
}

// cross_entropy_backward over bf16 logits (the bf16 lm_head product's output, as HF's bf16 models compute them):
// the same arithmetic on their fp32 values, the gradient written over them in bf16.
extern "C" __global__ void __launch_bounds__(LOSS_THREADS, 2) cross_entropy_backward_bf16(float *rowLoss, u16 *logits,
                                                                                           const int *targets, int rows,
                                                                                           int V, float gradScale) {
    if (blockIdx.x < rows) ce_backward_row(rowLoss, logits, targets, blockIdx.x, V, gradScale, (u16 *)nullptr, 1);
}

// Per-thread running statistics of a distillation row: maxima of s/T (A), u/T (B) and s (S, CE
// at T = 1 when T ≠ 1), Σ exp(· − max) of each, and the dot products Σ eB·(u − s) (tied to B's
// maximum) and Σ eA·(s − u) (tied to A's).
struct KDStats {
    float mA, mB, mS;
    double sA, sB, sS, dPD, dQD;
};

// The statistics pass of kd_rows over this thread's groups.
template <int N, typename T> __device__ void kd_stats(const T *sr, const T *ur, int groups, float invT, bool ceSeparate, KDStats &st) {
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        float x[N], y[N], a[N], b[N];
        load_group<N>(sr, g, x);
        load_group<N>(ur, g, y);
        float ga = -INFINITY, gb = -INFINITY, gs = -INFINITY;
#pragma unroll
        for (int k = 0; k < N; k++) {
            a[k] = x[k] * invT;
            b[k] = y[k] * invT;
            ga = fmaxf(ga, a[k]);
            gb = fmaxf(gb, b[k]);
            gs = fmaxf(gs, x[k]);
        }
        double f = raise_max(st.mA, ga);
        if (f != 1.0) { st.sA *= f; st.dQD *= f; }
        f = raise_max(st.mB, gb);
        if (f != 1.0) { st.sB *= f; st.dPD *= f; }
        float ea = 0, eb = 0, pd = 0, qd = 0, es = 0;
#pragma unroll
        for (int k = 0; k < N; k++) {
            float e1 = loss_exp(a[k] - st.mA), e2 = loss_exp(b[k] - st.mB), d = y[k] - x[k];
            ea += e1;
            eb += e2;
            pd += e2 * d;
            qd -= e1 * d;
        }
        if (ceSeparate) {
            f = raise_max(st.mS, gs);
            if (f != 1.0) st.sS *= f;
#pragma unroll
            for (int k = 0; k < N; k++) es += loss_exp(x[k] - st.mS);
            st.sS += (double)es;
        }
        st.sA += (double)ea;
        st.sB += (double)eb;
        st.dPD += (double)pd;
        st.dQD += (double)qd;
    }
}

// The row-wide constants of kd_rows, the same in every thread after the statistics pass.
struct KDRow {
    float maxA, maxB, maxS, iA, iB, iS, beta, invT, cKD, cCE, w;
    double lseA, lseB, shift, klQM, sumA, sumB, sumS;
    int kind, t, computeCE, ceSeparate;
};

// The generalized JSD pass (kind 2): Σ over the row of β·p·(log p − log m) + (1−β)·q·(log q − log m)
// and of q·(log q − log m) (thread partials).
template <int N, typename T> __device__ void kd_jsd(const T *sr, const T *ur, int groups, const KDRow &c, double *j2, double *klQM) {
    double betaD = c.beta, invTD = c.invT;
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        float x[N], y[N];
        load_group<N>(sr, g, x);
        load_group<N>(ur, g, y);
#pragma unroll
        for (int k = 0; k < N; k++) {
            float p = loss_exp(y[k] * c.invT - c.maxB) * c.iB, q = loss_exp(x[k] * c.invT - c.maxA) * c.iA;
            float mm = c.beta * p + (1.0f - c.beta) * q;
            if (!(mm > 0)) continue;
            double logm = (double)logf(mm);
            double lp = (double)y[k] * invTD - c.lseB, lq = (double)x[k] * invTD - c.lseA;
            double tq = (double)q * (lq - logm);
            *j2 += betaD * (double)p * (lp - logm) + (1.0 - betaD) * tq;
            *klQM += tq;
        }
    }
}

// The gradient pass of kd_rows: s ← d(loss·gradScale)/ds (DistillationKernels.fullRow's fp32 and
// double steps); s16 (when not null): the same values rounded to bf16, and s itself only when keep32.
template <int N, typename T> __device__ void kd_grad(T *sr, u16 *s16, const T *ur, int groups, const KDRow &c, bool keep32) {
    double invTD = c.invT;
    for (int g = threadIdx.x; g < groups; g += blockDim.x) {
        float x[N], y[N];
        load_group<N>(sr, g, x);
        load_group<N>(ur, g, y);
#pragma unroll
        for (int k = 0; k < N; k++) {
            float ea = loss_exp(x[k] * c.invT - c.maxA), q = ea * c.iA, gk;
            if (c.kind == 0) {
                gk = c.cKD * (q - loss_exp(y[k] * c.invT - c.maxB) * c.iB);
            } else if (c.kind == 1) {
                gk = c.cKD * q * (float)(((double)x[k] - (double)y[k]) * invTD + c.shift);
            } else {
                float p = loss_exp(y[k] * c.invT - c.maxB) * c.iB;
                float mm = c.beta * p + (1.0f - c.beta) * q;
                float lm = mm > 0 ? logf(mm) : 0.0f;
                gk = q > 0 ? c.w * q * (float)((double)x[k] * invTD - c.lseA - (double)lm - c.klQM) : 0.0f;
            }
            if (c.computeCE) {
                float e = c.ceSeparate ? loss_exp(x[k] - c.maxS) : ea;
                gk += c.cCE * e * c.iS;
                if (N * g + k == c.t) gk -= c.cCE;
            }
            x[k] = gk;
        }
        if (keep32) store_group<N>(sr, g, x);
        if (s16) {
#pragma unroll
            for (int k = 0; k < N; k++) s16[N * g + k] = f32_to_bf16(x[k]);
        }
    }
}

// kd_rows's row r over student logits s and teacher logits u, both fp32, or both bf16 (kd_rows_bf16).
template <typename T> __device__ void kd_row(double *rowOut, T *s, const T *u, const int *targets, int r, int V, long teacherStride,
                                             int kind, float beta, float invT, float cKD, float cCE, int computeCE, u16 *s16,
                                             int keep32) {
    int t = targets[r];
    T *sr = s + (long)r * V;
    const T *ur = u + (long)r * teacherStride;
    bool k32 = !s16 || keep32;
    if (t < 0) {
        float zero[1] = {0.0f};
        for (int j = threadIdx.x; j < V; j += blockDim.x) {
            if (k32) store_group<1>(sr, j, zero);
            if (s16) s16[(long)r * V + j] = 0;
        }
        if (threadIdx.x == 0) { rowOut[2 * r] = 0; rowOut[2 * r + 1] = 0; }
        return;
    }
    float zt = logit(sr, t);   // read before the block reductions below, so before any thread writes s
    bool vec = (V & 3) == 0 && (teacherStride & 3) == 0 && vec_aligned(s) && vec_aligned(u);
    int groups = vec ? V >> 2 : V;
    KDRow c;
    c.kind = kind; c.t = t; c.computeCE = computeCE; c.ceSeparate = computeCE && invT != 1.0f;
    c.beta = beta; c.invT = invT; c.cKD = cKD; c.cCE = cCE; c.w = cKD * (1.0f - beta);
    KDStats st = {-INFINITY, -INFINITY, -INFINITY, 0, 0, 0, 0, 0};
    if (vec) kd_stats<4>(sr, ur, groups, invT, c.ceSeparate, st);
    else kd_stats<1>(sr, ur, groups, invT, c.ceSeparate, st);
    double fA = to_block_max(st.mA, &c.maxA), fB = to_block_max(st.mB, &c.maxB);
    c.sumA = block_sum_d(st.sA * fA);
    c.sumB = block_sum_d(st.sB * fB);
    double dotPD = block_sum_d(st.dPD * fB), dotQD = block_sum_d(st.dQD * fA);
    c.maxS = 0; c.sumS = 0;
    if (c.ceSeparate) {
        double fS = to_block_max(st.mS, &c.maxS);
        c.sumS = block_sum_d(st.sS * fS);
    }
    c.lseA = (double)c.maxA + log(c.sumA);
    c.lseB = (double)c.maxB + log(c.sumB);
    c.iA = (float)(1.0 / c.sumA);
    c.iB = (float)(1.0 / c.sumB);
    double ce = 0;
    c.iS = 0;
    if (computeCE) {
        if (c.ceSeparate) { ce = (double)c.maxS + log(c.sumS) - (double)zt; c.iS = (float)(1.0 / c.sumS); }
        else { ce = c.lseA - (double)zt; c.iS = c.iA; }
    }
    double kd = 0;
    c.shift = 0; c.klQM = 0;
    if (kind == 0) {
        kd = (double)invT * dotPD / c.sumB + c.lseA - c.lseB;
    } else if (kind == 1) {
        kd = (double)invT * dotQD / c.sumA - c.lseA + c.lseB;
        c.shift = -c.lseA + c.lseB - kd;
    } else {
        double j2 = 0, kl = 0;
        if (vec) kd_jsd<4>(sr, ur, groups, c, &j2, &kl);
        else kd_jsd<1>(sr, ur, groups, c, &j2, &kl);
        kd = block_sum_d(j2);
        c.klQM = block_sum_d(kl);
    }
    u16 *sr16 = s16 ? s16 + (long)r * V : nullptr;
    if (vec) kd_grad<4>(sr, sr16, ur, groups, c, k32);
    else kd_grad<1>(sr, sr16, ur, groups, c, k32);
    if (threadIdx.x == 0) { rowOut[2 * r] = ce; rowOut[2 * r + 1] = kd; }
}

// Distillation over full vocabulary rows (DistillationKernels.fullRow; DistillationConstants
// for the conventions): s = student logits [rows, V] (replaced by d(loss·gradScale)/ds),
// u = teacher logits (row stride teacherStride ≥ V: a larger teacher vocabulary is cut to V).
// kind 0 forward KL(p‖q), 1 reverse KL(q‖p), 2 generalized JSD(beta). rowOut[2r] = CE at T = 1
// (0 without CE), rowOut[2r+1] = KD (before T²). cKD = kd_ratio·gradScale·T,
// cCE = (1 − kd_ratio)·gradScale. Ignored rows: zeros. One block per row; two passes over the
// row (statistics with the dot products folded in, then the gradient), three for JSD.
// s16 (when not null, [rows, V] bf16): the gradient's bf16 copy too, written in the same pass; s then
// keeps the logits unless keep32 (only the bf16 copy is read when the lm_head has no bias or adapter).
extern "C" __global__ void __launch_bounds__(LOSS_THREADS, 2) kd_rows(double *rowOut, float *s, const float *u, const int *targets,
                                                                       int rows, int V, long teacherStride, int kind, float beta,
                                                                       float invT, float cKD, float cCE, int computeCE, u16 *s16,
                                                                       int keep32) {
    if (blockIdx.x < rows)
        kd_row(rowOut, s, u, targets, blockIdx.x, V, teacherStride, kind, beta, invT, cKD, cCE, computeCE, s16, keep32);
}

// kd_rows over bf16 logits, student's and teacher's (the bf16 lm_head products' outputs, as HF's bf16 models
// compute them): the same arithmetic on their fp32 values, the gradient written over the student's in bf16.
extern "C" __global__ void __launch_bounds__(LOSS_THREADS, 2) kd_rows_bf16(double *rowOut, u16 *s, const u16 *u,
                                                                            const int *targets, int rows, int V,
                                                                            long teacherStride, int kind, float beta, float invT,
                                                                            float cKD, float cCE, int computeCE) {
    if (blockIdx.x < rows)
        kd_row(rowOut, s, u, targets, blockIdx.x, V, teacherStride, kind, beta, invT, cKD, cCE, computeCE, (u16 *)nullptr, 1);
}
