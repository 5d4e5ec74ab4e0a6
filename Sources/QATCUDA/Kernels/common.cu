// Prepended to every kernel file before NVRTC compiles it (see KernelLibrary.swift).
// Kernels are compiled with --fmad=false and IEEE division/sqrt, and write the rounding steps
// of the bit-exact paths with __f*_rn intrinsics, so that they match the Swift CPU kernels.
typedef unsigned int u32;
typedef unsigned short u16;
typedef unsigned char u8;
#define INFINITY __int_as_float(0x7f800000)

// Swift's min/max (y < x ? y : x, y >= x ? y : x): NaN behaviour as on the CPU path.
__device__ __forceinline__ float smin(float x, float y) { return y < x ? y : x; }
__device__ __forceinline__ float smax(float x, float y) { return y >= x ? y : x; }

__device__ __forceinline__ u16 f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}
__device__ __forceinline__ float bf16_to_f32(u16 h) { return __uint_as_float(((u32)h) << 16); }

// Round to the nearest E4M3FN value (round half to even, saturate to ±448, NaN stays NaN,
// sign of zero kept): `e4m3Round` of Sources/QATCore/FP8.swift.
__device__ __forceinline__ float e4m3_round(float f) {
    u32 bits = __float_as_uint(f), sign = bits & 0x80000000u, a = bits & 0x7fffffffu;
    if (a >= 0x43e00000u) return a > 0x7f800000u ? __uint_as_float(0x7fc00000u) : __uint_as_float(sign | 0x43e00000u);
    if (a < 0x3c800000u) {
        float q = __fmul_rn(rintf(__fmul_rn(__uint_as_float(a), 512.0f)), 0.001953125f);
        return __uint_as_float(__float_as_uint(q) | sign);
    }
    return __uint_as_float(sign | ((a + 0x7ffffu + ((a >> 20) & 1u)) & 0xfff00000u));
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Sum over a block of `blockDim.x` (a multiple of 32, at most 1024) threads; every thread gets it.
__device__ double block_sum_d(double v) {
    __shared__ double part[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum_d(v);
    __syncthreads();
    if (lane == 0) part[w] = v;
    __syncthreads();
    double s = 0;
    for (int i = 0; i < nw; i++) s += part[i];
    return s;
}
__device__ float block_max(float v) {
    __shared__ float partm[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) partm[w] = v;
    __syncthreads();
    float m = -INFINITY;
    for (int i = 0; i < nw; i++) m = fmaxf(m, partm[i]);
    return m;
}

// 16- and 8-byte alignment of a pointer (null counts as aligned): the vector paths' condition.
__device__ __forceinline__ bool aligned16(const void *p) { return (((unsigned long long)p) & 15) == 0; }
__device__ __forceinline__ bool aligned8(const void *p) { return (((unsigned long long)p) & 7) == 0; }

// Four floats as four bf16 (f32_to_bf16 each) in 8 bytes, lowest first.
__device__ __forceinline__ uint2 bf16x4(float a, float b, float c, float d) {
    return make_uint2((u32)f32_to_bf16(a) | ((u32)f32_to_bf16(b) << 16), (u32)f32_to_bf16(c) | ((u32)f32_to_bf16(d) << 16));
}

// SiLU(x)·u = x / (1 + e^-x) · u, in this order (SwiGLU.swift): swiglu_forward and swiglu_nvfp4.
__device__ __forceinline__ float swiglu_one(float x, float u) { return x / (1.0f + expf(-x)) * u; }

// The grid-stride loop of the element-wise kernels over n elements: when `vec` (every array 16-byte aligned),
// f4(i) for each float4 i (elements 4i … 4i+3) and then f1(i) for the n mod 4 elements left; else f1(i) for every
// element. The same arithmetic per element either way, so the same bits; float4 moves twice the bytes per
// instruction, which these bandwidth-bound kernels need.
template <typename F4, typename F1>
__device__ __forceinline__ void elementwise_loop(long n, bool vec, F4 f4, F1 f1) {
    long t = blockIdx.x * (long)blockDim.x + threadIdx.x, stride = (long)gridDim.x * blockDim.x, head = vec ? n & ~3L : 0;
    for (long i = t; i < (head >> 2); i += stride) f4(i);
    for (long i = head + t; i < n; i += stride) f1(i);
}

// 1/√(mean(x²) + eps) of one row of c floats, by one warp (RMSNorm.swift: the squares summed in double): each
// lane adds its squares in order (float4s lane, lane + 32, … when c % 4 == 0 and x is 16-byte aligned, else
// elements lane, lane + 32, …), then warp_sum_d; every lane gets it. rmsnorm_forward and rmsnorm_nvfp4 share it,
// so for the same input they give the same bits.
__device__ float rmsnorm_row_rstd(const float *x, int c, float eps) {
    int lane = threadIdx.x & 31;
    double s = 0;
    if ((c & 3) == 0 && aligned16(x)) {
        const float4 *x4 = (const float4 *)x;
#pragma unroll 4
        for (int i = lane; i < c / 4; i += 32) {
            float4 v = x4[i];
            s += (double)__fmul_rn(v.x, v.x);
            s += (double)__fmul_rn(v.y, v.y);
            s += (double)__fmul_rn(v.z, v.z);
            s += (double)__fmul_rn(v.w, v.w);
        }
    } else {
        for (int j = lane; j < c; j += 32) { float v = x[j]; s += (double)__fmul_rn(v, v); }
    }
    s = warp_sum_d(s);
    return 1.0f / sqrtf((float)(s / (double)c) + eps);
}
