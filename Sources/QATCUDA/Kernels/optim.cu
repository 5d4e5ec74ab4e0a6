// The optimizer on the device (Sources/QATTrain/AdamW.swift, GradientClipping.swift).

// AdamW, PyTorch's single-tensor order and rounding, element by element as AdamW.update does
// (the lerp is one fused multiply-add; every other operation is an IEEE-rounded fp32 op, so a
// step gives the CPU's bits from the same gradient). Scalars come from AdamW.coefficients.
// `clip` is gradient clipping's coefficient (GradientClipping.scale: min(maxNorm/(norm+1e-6), 1)
// as fp32; 1 when not clipping): the gradient is read as the one fp32 product g·clip that the
// CPU's clip-then-step writes back, so a step gives the same bits without a separate pass
// (the gradient in memory stays unclipped; nothing reads it after the step).
__device__ __forceinline__ void adamw_one(float &p, float g, float &m, float &v, float decay, int lerpSmall, float w, float beta2,
                                          float omb2, float bc2, float eps, float negStep, float clip) {
    float pi = __fmul_rn(p, decay);
    float gi = __fmul_rn(g, clip), mi0 = m;
    float mi = fmaf(w, __fsub_rn(gi, mi0), lerpSmall ? mi0 : gi);
    float vi = __fadd_rn(__fmul_rn(v, beta2), __fmul_rn(__fmul_rn(omb2, gi), gi));
    float denom = __fadd_rn(__fdiv_rn(__fsqrt_rn(vi), bc2), eps);
    p = __fadd_rn(pi, __fdiv_rn(__fmul_rn(negStep, mi), denom));
    m = mi;
    v = vi;
}

// Bandwidth-bound (28 bytes per element): when the four arrays are 16-byte aligned, the elements
// move as float4 (the same arithmetic per element, so the same bits), the last n mod 4 one by one.
extern "C" __global__ void adamw_update(float *p, const float *g, float *m, float *v, long n, float decay, int lerpSmall, float w,
                                        float beta2, float omb2, float bc2, float eps, float negStep, float clip) {
    long stride = (long)gridDim.x * blockDim.x, head = 0;
    if ((((unsigned long long)p | (unsigned long long)g | (unsigned long long)m | (unsigned long long)v) & 15) == 0) {
        head = n & ~3L;
        float4 *p4 = (float4 *)p, *m4 = (float4 *)m, *v4 = (float4 *)v;
        const float4 *g4 = (const float4 *)g;
        for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < (head >> 2); i += stride) {
            float4 pp = p4[i], gg = g4[i], mm = m4[i], vv = v4[i];
            adamw_one(pp.x, gg.x, mm.x, vv.x, decay, lerpSmall, w, beta2, omb2, bc2, eps, negStep, clip);
            adamw_one(pp.y, gg.y, mm.y, vv.y, decay, lerpSmall, w, beta2, omb2, bc2, eps, negStep, clip);
            adamw_one(pp.z, gg.z, mm.z, vv.z, decay, lerpSmall, w, beta2, omb2, bc2, eps, negStep, clip);
            adamw_one(pp.w, gg.w, mm.w, vv.w, decay, lerpSmall, w, beta2, omb2, bc2, eps, negStep, clip);
            p4[i] = pp; m4[i] = mm; v4[i] = vv;
        }
    }
    for (long i = head + blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += stride)
        adamw_one(p[i], g[i], m[i], v[i], decay, lerpSmall, w, beta2, omb2, bc2, eps, negStep, clip);
}

// Σ x² in double over a table of chunks, one block each: chunks[2c] is the address of chunk c's
// first float, chunks[2c+1] its length (the host cuts every gradient into chunks of a fixed size,
// so one launch covers the whole arena). partials[c] gets the chunk's sum; the host adds a
// tensor's chunks in order, so each tensor's Σ g² (needed to name a non-finite one) and the norm
// are deterministic. A non-finite element makes its partial non-finite.
extern "C" __global__ void __launch_bounds__(256) sumsq_chunks(double *partials, const unsigned long long *chunks, int count) {
    int c = blockIdx.x;
    if (c >= count) return;
    unsigned long long a = chunks[2 * c];
    long n = (long)chunks[2 * c + 1];
    const float *x = (const float *)a;
    double s = 0;
    long head = 0;
    if ((a & 15) == 0) {
        head = n & ~3L;
        const float4 *x4 = (const float4 *)x;
        for (long i = threadIdx.x; i < (head >> 2); i += blockDim.x) {
            float4 v = x4[i];
            double d0 = v.x, d1 = v.y, d2 = v.z, d3 = v.w;
            s += d0 * d0 + d1 * d1 + d2 * d2 + d3 * d3;
        }
    }
    for (long i = head + threadIdx.x; i < n; i += blockDim.x) {
        double d = (double)x[i];
        s += d * d;
    }
    s = block_sum_d(s);
    if (threadIdx.x == 0) partials[c] = s;
}
