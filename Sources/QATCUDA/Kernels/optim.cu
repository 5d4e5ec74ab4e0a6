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
//
// w16 (when not null; the host passes it only with the four arrays 16-byte aligned, w16 8-byte aligned, and for
// refresh 1 n a multiple of 16): the parameter's bf16 product copy refreshed from the new values in the same pass,
// so no later pass reads the fp32 master weights again: refresh 0 = their bf16 rounding (to_bf16), 1 = the bf16
// rounding of their NVFP4 fake quant along rows of 16-blocks (nvfp4_fake_quant's bits: four lanes per 16-block,
// nvfp4_quad; globalAmax and mode as there), 2 = their bf16 rounding as fp32 (round_bf16): w16 then points to n floats
// (16-byte aligned), the copy a norm weight or a bias is read from when a bf16 export will store it.
extern "C" __global__ void adamw_update(float *p, const float *g, float *m, float *v, long n, float decay, int lerpSmall, float w,
                                        float beta2, float omb2, float bc2, float eps, float negStep, float clip, u16 *w16,
                                        int refresh, float globalAmax, int mode) {
    long t = blockIdx.x * (long)blockDim.x + threadIdx.x, stride = (long)gridDim.x * blockDim.x, head = 0;
    if (aligned16(p) && aligned16(g) && aligned16(m) && aligned16(v)) {
        head = n & ~3L;
        float4 *p4 = (float4 *)p, *m4 = (float4 *)m, *v4 = (float4 *)v;
        const float4 *g4 = (const float4 *)g;
        float gs = nvfp4_global_scale(globalAmax), zeroFix = nvfp4_zero_fix(mode);
        long lane = threadIdx.x & 31;
        // (per warp, so that every lane takes part in nvfp4_quad's shuffles; blockDim.x is a multiple of 32)
        for (long base = t - lane; base < (head >> 2); base += stride) {
            long i = base + lane;
            bool on = i < (head >> 2);
            float4 pp = make_float4(0, 0, 0, 0);
            if (on) {
                float4 gg = g4[i], mm = m4[i], vv = v4[i];
                pp = p4[i];
                adamw_one(pp.x, gg.x, mm.x, vv.x, decay, lerpSmall, w, beta2, omb2, bc2, eps, negStep, clip);
                adamw_one(pp.y, gg.y, mm.y, vv.y, decay, lerpSmall, w, beta2, omb2, bc2, eps, negStep, clip);
                adamw_one(pp.z, gg.z, mm.z, vv.z, decay, lerpSmall, w, beta2, omb2, bc2, eps, negStep, clip);
                adamw_one(pp.w, gg.w, mm.w, vv.w, decay, lerpSmall, w, beta2, omb2, bc2, eps, negStep, clip);
                p4[i] = pp; m4[i] = mm; v4[i] = vv;
            }
            if (!w16) continue;
            if (refresh == 1) {
                float q[4] = {pp.x, pp.y, pp.z, pp.w};
                nvfp4_quad(q, on, (float *)0, w16 + 4 * i, gs, mode, zeroFix);
            } else if (refresh == 2) {
                if (on) ((float4 *)w16)[i] = make_float4(bf16_round(pp.x), bf16_round(pp.y), bf16_round(pp.z), bf16_round(pp.w));
            } else if (on) {
                ((uint2 *)w16)[i] = bf16x4(pp.x, pp.y, pp.z, pp.w);
            }
        }
    }
    for (long i = head + t; i < n; i += stride) {
        adamw_one(p[i], g[i], m[i], v[i], decay, lerpSmall, w, beta2, omb2, bc2, eps, negStep, clip);
        // (refresh 1 comes with n % 16 == 0 and aligned arrays: no tail)
        if (w16 && refresh == 2) ((float *)w16)[i] = bf16_round(p[i]);
        else if (w16) w16[i] = f32_to_bf16(p[i]);
    }
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
