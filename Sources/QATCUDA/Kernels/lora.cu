// LoRA / QLoRA (Sources/QATModels/LoRAAdapter.swift, Sources/QATTrain/LoRATraining.swift): the
// NVFP4 decode of QLoRA's frozen base and the adapters' dropout mask, both bit-identical to the CPU.

// E4M3FN byte -> float (`e4m3ToFloat` of Sources/QATCore/FP8.swift): subnormals m * 2^-9, 0x7F and
// 0xFF -> NaN, otherwise the bits rebiased.
__device__ __forceinline__ float e4m3_to_f32(u32 b) {
    u32 sign = (b & 0x80u) << 24, e = (b >> 3) & 0xFu, m = b & 7u;
    if (e == 0) return __uint_as_float(__float_as_uint(__fmul_rn((float)m, 0.001953125f)) | sign);
    if (e == 15 && m == 7) return __uint_as_float(0x7fc00000u);
    return __uint_as_float(sign | ((e + 120u) << 23) | (m << 20));
}

// E2M1 nibble -> float (`NVFP4.decodeE2M1`): 0, .5, 1, 1.5, 2, 3, 4, 6; nibble 0x8 is +0.
__device__ __forceinline__ float e2m1_to_f32(u32 nib) {
    u32 i = nib & 7u;
    float m = i < 4 ? (float)i * 0.5f : (i == 7 ? 6.0f : (float)i - 2.0f);
    return (nib & 8u) && m != 0.0f ? -m : m;
}

// QLoRA base decode (`NVFP4.dequantize`): packed [rows, nb*8] (element 2k in the low nibble of
// byte k of its 16-block, 2k+1 in the high one), scales [rows, nb] E4M3 bytes, nb = ceil(cols/16);
// out[r, c] = e2m1 * (e4m3(scale) * gs), two fp32 products rounded as on the CPU. Writes the fp32
// weight into out and, when out16 is given, its bf16 rounding there too. One thread per 16-block.
extern "C" __global__ void nvfp4_decode(const u8 *packed, const u8 *scales, float gs, long rows, int cols, float *out,
                                        u16 *out16) {
    int nb = (cols + 15) / 16;
    long total = rows * nb;
    for (long b = blockIdx.x * (long)blockDim.x + threadIdx.x; b < total; b += (long)gridDim.x * blockDim.x) {
        long r = b / nb;
        int c0 = (int)(b - r * nb) * 16, w = min(16, cols - c0);
        float s = __fmul_rn(e4m3_to_f32(scales[b]), gs);
        const u8 *src = packed + b * 8;
        float v[16];
#pragma unroll
        for (int k = 0; k < 8; k++) {
            u32 byte = src[k];
            v[2 * k] = __fmul_rn(e2m1_to_f32(byte & 0xFu), s);
            v[2 * k + 1] = __fmul_rn(e2m1_to_f32(byte >> 4), s);
        }
        long o = r * cols + c0;
        if (w == 16 && (cols & 3) == 0) {  // 16-byte (fp32) and 8-byte (bf16) aligned stores
#pragma unroll
            for (int i = 0; i < 4; i++) ((float4 *)(out + o))[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
            if (out16) {
#pragma unroll
                for (int i = 0; i < 4; i++)
                    ((uint2 *)(out16 + o))[i] = make_uint2((u32)f32_to_bf16(v[4 * i]) | ((u32)f32_to_bf16(v[4 * i + 1]) << 16),
                                                           (u32)f32_to_bf16(v[4 * i + 2]) | ((u32)f32_to_bf16(v[4 * i + 3]) << 16));
            }
        } else {
            for (int i = 0; i < w; i++) {
                out[o + i] = v[i];
                if (out16) out16[o + i] = f32_to_bf16(v[i]);
            }
        }
    }
}

// SplitMix64's finaliser (`SplitMix64.mix` in LoRAAdapter.swift): a stateless 64-bit hash.
__device__ __forceinline__ unsigned long long splitmix64_mix(unsigned long long z) {
    z += 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

// LoRA dropout (`LoRAContext.applyMask`): element i is kept when mix(key + i * 0x9E3779B97F4A7C15)
// >> 40 >= threshold, then multiplied by scale = 1/(1-p) (one fp32 product); a dropped one is +0.
// out (fp32, may be null): written, or with accumulate added to (out[i] += v, the input gradient);
// out16 (may be null): the bf16 rounding of v written (the input of a bf16 product).
extern "C" __global__ void lora_dropout(const float *x, float *out, u16 *out16, long n, long key, long threshold, float scale,
                                        int accumulate) {
    unsigned long long k = (unsigned long long)key, t = (unsigned long long)threshold;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        bool keep = (splitmix64_mix(k + (unsigned long long)i * 0x9E3779B97F4A7C15ull) >> 40) >= t;
        float v = keep ? __fmul_rn(x[i], scale) : 0.0f;
        if (out) out[i] = accumulate ? __fadd_rn(out[i], v) : v;
        if (out16) out16[i] = f32_to_bf16(v);
    }
}
