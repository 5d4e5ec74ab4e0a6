// Rotary embedding in HF's rotate-half layout (Sources/QATModels/Layers/RoPE.swift), in place on
// x [rows = B·T, heads, D]; cos/sin are the CPU's tables [maxPositions, D/2] (every RoPE variant
// is folded into them). sign = 1 forward, -1 backward. x16 (when not null): the result rounded to
// bf16 too (the backward's dq/dk as the q/k products' dy), row r's heads at x16 + r·ld16 (ld16 = heads·D:
// contiguous; wider: the rows of the fused q/k/v products' dy, CUDAModel+Training.swift). Four pairs per
// thread (float4) when D/2 % 4 == 0 and the arrays are aligned, else one.
__device__ __forceinline__ void rope_pair(float a, float b, float c, float s, float *r0, float *r1) {
    *r0 = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
    *r1 = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
}

extern "C" __global__ void rope_apply(float *x, const float *cosT, const float *sinT, int rows, int seqLen, int heads,
                                      int d, float sign, u16 *x16, long ld16) {
    int half = d / 2;
    long pairs = (long)rows * heads * half;
    bool vec = (half & 3) == 0 && aligned16(x) && aligned16(cosT) && aligned16(sinT) && aligned8(x16) && (ld16 & 3) == 0;
    long t0 = blockIdx.x * (long)blockDim.x + threadIdx.x, stride = (long)gridDim.x * blockDim.x;
    if (vec) {
        for (long q = t0; q < pairs / 4; q += stride) {   // pairs 4q … 4q+3: one row and head, positions i … i+3
            long idx = 4 * q;
            int i = (int)(idx % half);
            long rh = idx / half;   // row * heads + h
            int t = (int)((rh / heads) % seqLen);
            float *v = x + rh * d;
            float4 a = *(float4 *)(v + i), b = *(float4 *)(v + i + half);
            float4 c = *(const float4 *)(cosT + (long)t * half + i), s = *(const float4 *)(sinT + (long)t * half + i);
            float4 r0, r1;
            rope_pair(a.x, b.x, c.x, sign * s.x, &r0.x, &r1.x);
            rope_pair(a.y, b.y, c.y, sign * s.y, &r0.y, &r1.y);
            rope_pair(a.z, b.z, c.z, sign * s.z, &r0.z, &r1.z);
            rope_pair(a.w, b.w, c.w, sign * s.w, &r0.w, &r1.w);
            *(float4 *)(v + i) = r0;
            *(float4 *)(v + i + half) = r1;
            if (x16) {
                u16 *o = x16 + (rh / heads) * ld16 + (rh % heads) * d;
                *(uint2 *)(o + i) = bf16x4(r0.x, r0.y, r0.z, r0.w);
                *(uint2 *)(o + i + half) = bf16x4(r1.x, r1.y, r1.z, r1.w);
            }
        }
        return;
    }
    for (long idx = t0; idx < pairs; idx += stride) {
        int i = (int)(idx % half);
        long rh = idx / half;
        int t = (int)((rh / heads) % seqLen);
        float *v = x + rh * d;
        float r0, r1;
        rope_pair(v[i], v[i + half], cosT[(long)t * half + i], sign * sinT[(long)t * half + i], &r0, &r1);
        v[i] = r0;
        v[i + half] = r1;
        if (x16) {
            u16 *o = x16 + (rh / heads) * ld16 + (rh % heads) * d;
            o[i] = f32_to_bf16(r0);
            o[i + half] = f32_to_bf16(r1);
        }
    }
}
