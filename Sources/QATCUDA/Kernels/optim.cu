// The optimizer on the device (Sources/QATTrain/AdamW.swift, GradientClipping.swift).

// AdamW, PyTorch's single-tensor order and rounding, element by element as AdamW.update does
// (the lerp is one fused multiply-add; every other operation is an IEEE-rounded fp32 op, so a
// step gives the CPU's bits from the same gradient). Scalars come from AdamW.coefficients.
extern "C" __global__ void adamw_update(float *p, const float *g, float *m, float *v, long n, float decay, int lerpSmall, float w,
                                        float beta2, float omb2, float bc2, float eps, float negStep) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float pi = __fmul_rn(p[i], decay);
        float gi = g[i], mi0 = m[i];
        float mi = fmaf(w, __fsub_rn(gi, mi0), lerpSmall ? mi0 : gi);
        float vi = __fadd_rn(__fmul_rn(v[i], beta2), __fmul_rn(__fmul_rn(omb2, gi), gi));
        float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2), eps);
        p[i] = __fadd_rn(pi, __fdiv_rn(__fmul_rn(negStep, mi), denom));
        m[i] = mi;
        v[i] = vi;
    }
}

// Σ x² in double, one partial per block (a fixed grid for a given n, so the host's sum of the
// partials in block order is deterministic). A non-finite element makes its partial non-finite.
extern "C" __global__ void sumsq_partial(double *partials, const float *x, long n) {
    double s = 0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        double d = (double)x[i];
        s += d * d;
    }
    s = block_sum_d(s);
    if (threadIdx.x == 0) partials[blockIdx.x] = s;
}
