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
// x rounded to the nearest bf16 (f32_to_bf16), as fp32.
__device__ __forceinline__ float bf16_round(float x) { return bf16_to_f32(f32_to_bf16(x)); }

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
// Where element i of a row-major [·, cols] matrix lies when its rows are ld elements apart.
__device__ __forceinline__ long row_strided(long i, int cols, long ld) {
    long r = i / cols;
    return r * ld + (i - r * cols);
}

// Four floats as four bf16 (f32_to_bf16 each) in 8 bytes, lowest first.
__device__ __forceinline__ uint2 bf16x4(float a, float b, float c, float d) {
    return make_uint2((u32)f32_to_bf16(a) | ((u32)f32_to_bf16(b) << 16), (u32)f32_to_bf16(c) | ((u32)f32_to_bf16(d) << 16));
}

// Four bf16 (8 bytes, lowest first) as four floats: bf16x4's inverse.
__device__ __forceinline__ float4 f32x4(uint2 w) {
    return make_float4(__uint_as_float(w.x << 16), __uint_as_float(w.x & 0xffff0000u), __uint_as_float(w.y << 16),
                       __uint_as_float(w.y & 0xffff0000u));
}
// Elements 4i … 4i+3 (load4: the array 16-byte aligned as fp32, 8-byte as bf16) or element i (load1) of an array of
// floats or, when bf16, of bf16 values, as floats: the kernels whose inputs are fp32 in one precision and bf16 in the
// other (the MLP's gate and up, SwiGLU's output gradient).
__device__ __forceinline__ float4 load4(const void *p, long i, bool bf16) {
    return bf16 ? f32x4(((const uint2 *)p)[i]) : ((const float4 *)p)[i];
}
__device__ __forceinline__ float load1(const void *p, long i, bool bf16) {
    return bf16 ? bf16_to_f32(((const u16 *)p)[i]) : ((const float *)p)[i];
}
// The alignment load4 needs.
__device__ __forceinline__ bool aligned_for4(const void *p, bool bf16) { return bf16 ? aligned8(p) : aligned16(p); }

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

// RMSNorm (rmsnorm_forward, rmsnorm_nvfp4, rmsnorm_backward): a block of RMS_THREADS threads per row. On the float4 path
// (c % 4 == 0 and x 16-byte aligned) thread t reads the float4s t, t + RMS_THREADS, … of its row and keeps the
// first RMS_HELD of them in registers (rows of up to 2048 floats are read from memory once; the rest of a longer
// row is read again); else elements t, t + RMS_THREADS, … At Llama's [8192 × 2048] rmsnorm_nvfp4 takes 45 µs
// this way against 56 for a warp per row reading the row twice (scripts/cuda-emu/gpu_bench_quant.cu, H200).
#define RMS_THREADS 128
#define RMS_HELD 4

// The sum of one double per thread over a block of RMS_THREADS threads: warp_sum_d, then the warps' sums in warp
// order; every thread gets it. Uses a shared-memory array and one __syncthreads: call it from every thread of the
// block, and once per kernel unless a __syncthreads separates the calls (rmsnorm_backward_dw's rows).
__device__ double rms_block_sum(double s) {
    __shared__ double rmsPart[RMS_THREADS / 32];
    s = warp_sum_d(s);
    if ((threadIdx.x & 31) == 0) rmsPart[threadIdx.x >> 5] = s;
    __syncthreads();
    s = rmsPart[0];
#pragma unroll
    for (int w = 1; w < RMS_THREADS / 32; w++) s += rmsPart[w];
    return s;
}

// 1/√(mean(x²) + eps) of one row of c floats (RMSNorm.swift: the squares summed in double): each thread adds its
// squares in order (its float4s' x, y, z, w in turn on the float4 path), then rms_block_sum; every thread gets it.
// `vec`: the float4 path, whose first RMS_HELD float4s are left in xv (zeros past the row). rmsnorm_forward and
// rmsnorm_nvfp4 share it, so for the same input they give the same bits. Once per kernel (rms_block_sum).
__device__ float rmsnorm_block_rstd(const float *x, int c, float eps, bool vec, float4 (&xv)[RMS_HELD]) {
    int t = threadIdx.x;
    double s = 0;
    if (vec) {
        const float4 *x4 = (const float4 *)x;
        int c4 = c >> 2;
#pragma unroll
        for (int k = 0; k < RMS_HELD; k++) {
            int i = t + RMS_THREADS * k;
            xv[k] = i < c4 ? x4[i] : make_float4(0, 0, 0, 0);
        }
#pragma unroll
        for (int k = 0; k < RMS_HELD; k++) {   // (the zeros past the row add nothing)
            s += (double)__fmul_rn(xv[k].x, xv[k].x);
            s += (double)__fmul_rn(xv[k].y, xv[k].y);
            s += (double)__fmul_rn(xv[k].z, xv[k].z);
            s += (double)__fmul_rn(xv[k].w, xv[k].w);
        }
        for (int i = t + RMS_THREADS * RMS_HELD; i < c4; i += RMS_THREADS) {
            float4 v = x4[i];
            s += (double)__fmul_rn(v.x, v.x);
            s += (double)__fmul_rn(v.y, v.y);
            s += (double)__fmul_rn(v.z, v.z);
            s += (double)__fmul_rn(v.w, v.w);
        }
    } else {
        for (int j = t; j < c; j += RMS_THREADS) { float v = x[j]; s += (double)__fmul_rn(v, v); }
    }
    s = rms_block_sum(s);
    return 1.0f / sqrtf((float)(s / (double)c) + eps);
}

// The normalised values w·(x·rs) of a float4 (RMSNorm.forward's rounding): rmsnorm_forward and rmsnorm_nvfp4.
__device__ __forceinline__ float4 rms_apply4(float4 v, float4 g, float rs) {
    return make_float4(__fmul_rn(g.x, __fmul_rn(v.x, rs)), __fmul_rn(g.y, __fmul_rn(v.y, rs)), __fmul_rn(g.z, __fmul_rn(v.z, rs)),
                       __fmul_rn(g.w, __fmul_rn(v.w, rs)));
}

// ---- NVFP4 fake quant (Sources/QATQuant/NVFP4.swift): quant.cu's kernels and the optimizer's weight refresh ----

// The per-tensor constants of NVFP4 fake quant: the global scale gs = globalAmax / (6 · 448), and the zero the
// element round trip adds (−0 for ModelOpt's kernel, mode 0; +0 for export, mode 1: NVFP4.swift's `fakeElem`).
// nvfp4_blocks, rmsnorm_nvfp4 and adamw_update's refresh all take them from here.
__device__ __forceinline__ float nvfp4_global_scale(float globalAmax) { return __fdiv_rn(globalAmax, 2688.0f); }
__device__ __forceinline__ float nvfp4_zero_fix(int mode) { return mode == 1 ? 0.0f : -0.0f; }

// NVFP4 dequantized block scale S for a block max: mode 0 = ModelOpt's Triton kernel,
// mode 1 = export-exact (see NVFP4.swift's `blockScale`).
__device__ __forceinline__ float nvfp4_block_scale(float bmax, float gs, int mode) {
    if (mode == 0) {
        float gsSafe = gs > 0 ? gs : 1e-12f;
        float s = smin(__fdiv_rn(bmax, __fmul_rn(6.0f, gsSafe)), 448.0f);
        float S = __fmul_rn(e4m3_round(s), gs);
        return S >= 1e-5f ? S : 1.0f;
    }
    if (gs == 0) return 0;
    float s = __fdiv_rn(bmax, __fmul_rn(6.0f, gs));
    if (s == 0) s = 1;
    s = smin(smax(s, 0.001953125f), 448.0f);
    return __fmul_rn(e4m3_round(s), gs);
}

// One element's E2M1 round trip (NVFP4.swift's `fakeElem`).
__device__ __forceinline__ float nvfp4_elem(float v, float S, float zeroFix) {
    u32 bits = __float_as_uint(v);
    float a = __fdiv_rn(__uint_as_float(bits & 0x7fffffffu), S);
    float c = a < 6.0f ? a : 6.0f;
    float magic = c < 2.0f ? 4194304.0f : (c < 4.0f ? 8388608.0f : 16777216.0f);
    float r = __fmul_rn(__fsub_rn(__fadd_rn(c, magic), magic), S);
    u32 neg = v < 0 ? 0x80000000u : 0u;
    return __fadd_rn(__uint_as_float(__float_as_uint(r) ^ neg), zeroFix);
}

// A 16-block held by four lanes of a warp (lanes 4j … 4j+3, 4 values each, in order): the block max over the
// four by two shuffles, then each lane's values quantized as nvfp4_block does (the same scale from the same
// max, the same element round trip) into dst (fp32, 16-byte aligned) or, when d16 is given, their bf16 rounding
// there (8-byte aligned). Every lane of the warp calls it (the shuffles); `on`: this lane's values are real
// (off lanes hold zeros and write nothing).
__device__ __forceinline__ void nvfp4_quad(float v[4], bool on, float *dst, u16 *d16, float gs, int mode, float zeroFix) {
    u32 m = 0;
#pragma unroll
    for (int i = 0; i < 4; i++) m = max(m, __float_as_uint(v[i]) & 0x7fffffffu);
    m = max(m, __shfl_xor_sync(0xffffffffu, m, 1));
    m = max(m, __shfl_xor_sync(0xffffffffu, m, 2));
    if (!on) return;
    float S = nvfp4_block_scale(__uint_as_float(m), gs, mode);
    if (mode == 1 && S == 0) {
        if (d16) *(uint2 *)d16 = make_uint2(0, 0); else *(float4 *)dst = make_float4(0, 0, 0, 0);
        return;
    }
#pragma unroll
    for (int i = 0; i < 4; i++) v[i] = nvfp4_elem(v[i], S, zeroFix);
    if (d16) *(uint2 *)d16 = bf16x4(v[0], v[1], v[2], v[3]);
    else *(float4 *)dst = make_float4(v[0], v[1], v[2], v[3]);
}
