// Rotary embedding in HF's rotate-half layout (Sources/QATModels/Layers/RoPE.swift), in place on
// x [rows = B·T, heads, D]; cos/sin are the CPU's tables [maxPositions, D/2] (every RoPE variant
// is folded into them). sign = 1 forward, -1 backward. x16 (when not null): the result rounded to
// bf16 too (the backward's dq/dk as the q/k products' dy).
extern "C" __global__ void rope_apply(float *x, const float *cosT, const float *sinT, int rows, int seqLen, int heads,
                                      int d, float sign, u16 *x16) {
    int half = d / 2;
    long total = (long)rows * heads * half;
    for (long idx = blockIdx.x * (long)blockDim.x + threadIdx.x; idx < total; idx += (long)gridDim.x * blockDim.x) {
        int i = (int)(idx % half);
        long rh = idx / half;            // row * heads + h
        int t = (int)((rh / heads) % seqLen);
        float *v = x + rh * d;
        float a = v[i], b = v[i + half], c = cosT[(long)t * half + i], s = sign * sinT[(long)t * half + i];
        float r0 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)), r1 = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
        v[i] = r0;
        v[i + half] = r1;
        if (x16) {
            x16[rh * d + i] = f32_to_bf16(r0);
            x16[rh * d + i + half] = f32_to_bf16(r1);
        }
    }
}
