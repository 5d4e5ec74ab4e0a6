// RMSNorm forward (Sources/QATModels/Layers/RMSNorm.swift): the sum of squares accumulated in
// double as on the CPU; rstd is kept for backward; out16 (optional) receives a bf16 copy of the
// output, the input of the bf16 products that read it.
extern "C" __global__ void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int n, int c, float eps,
                                           u16 *out16) {
    long row = blockIdx.x;
    if (row >= n) return;
    const float *x = inp + row * c;
    float rs = rmsnorm_row_rstd(x, c, eps);
    if (threadIdx.x == 0 && rstd) rstd[row] = rs;
    float *o = out + row * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float y = __fmul_rn(w[j], __fmul_rn(x[j], rs));
        o[j] = y;
        if (out16) out16[row * c + j] = f32_to_bf16(y);
    }
}

// The same for short rows (c <= 256, the per-head q/k norms): one warp per row.
extern "C" __global__ void rmsnorm_forward_warp(float *out, float *rstd, const float *inp, const float *w, int n, int c, float eps) {
    long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= n) return;
    const float *x = inp + row * c;
    float v[8];
    double s = 0;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int j = lane + 32 * i;
        v[i] = j < c ? x[j] : 0.0f;
        s += (double)__fmul_rn(v[i], v[i]);
    }
    s = warp_sum_d(s);
    float rs = 1.0f / sqrtf((float)(s / (double)c) + eps);
    if (lane == 0 && rstd) rstd[row] = rs;
    float *o = out + row * c;
#pragma unroll
    for (int i = 0; i < 8; i++) {
        int j = lane + 32 * i;
        if (j < c) o[j] = __fmul_rn(w[j], __fmul_rn(v[i], rs));
    }
}

// RMSNorm backward (RMSNorm.backward): per row, k = (Σ w·g·x)·rs²/c and dx = rs·(w·g − x·k),
// written to dinp or added to it (accumulate != 0); dinp may alias dout only when writing. One
// block per row (a multiple of 32 threads). The weight gradient Σ_rows g·(x·rs) is a column
// sum (colsum_partial with rowScale = rstd). dinp16 (when not null): dinp's new values rounded to
// bf16 (the residual stream's gradient is the next bf16 product's dy).
extern "C" __global__ void rmsnorm_backward(float *dinp, const float *dout, const float *inp, const float *w, const float *rstd,
                                            int n, int c, int accumulate, u16 *dinp16) {
    long row = blockIdx.x;
    if (row >= n) return;
    const float *x = inp + row * c, *g = dout + row * c;
    float *d = dinp + row * c;
    double s = 0;
    for (int j = threadIdx.x; j < c; j += blockDim.x) s += (double)__fmul_rn(__fmul_rn(w[j], g[j]), x[j]);
    s = block_sum_d(s);   // (synchronises: every read of g precedes the writes below)
    float rs = rstd[row];
    float k = __fdiv_rn(__fmul_rn(__fmul_rn((float)s, rs), rs), (float)c);
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float v = __fmul_rn(rs, __fsub_rn(__fmul_rn(w[j], g[j]), __fmul_rn(x[j], k)));
        v = accumulate ? __fadd_rn(d[j], v) : v;
        d[j] = v;
        if (dinp16) dinp16[row * c + j] = f32_to_bf16(v);
    }
}
