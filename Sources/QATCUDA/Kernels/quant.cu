// Fake quantizers (Sources/QATQuant/{NVFP4,FP8Quant}.swift), bit-identical to the CPU path, and
// the max calibration reduction.

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

// One 16-block of NVFP4 fake quant: v holds the block's w values (zeros past w); writes them
// quantized to dst (fp32), or, when d16 is given, their bf16 rounding there instead. `vec`: the
// block is whole and 16-byte aligned (vector stores).
__device__ __forceinline__ void nvfp4_block(float v[16], int w, bool vec, float *dst, u16 *d16, float gs, int mode, float zeroFix) {
    u32 m = 0;
#pragma unroll
    for (int i = 0; i < 16; i++) m = max(m, __float_as_uint(v[i]) & 0x7fffffffu);
    float S = nvfp4_block_scale(__uint_as_float(m), gs, mode);
    if (mode == 1 && S == 0) {
        for (int i = 0; i < w; i++) {
            if (d16) d16[i] = 0; else dst[i] = 0;
        }
        return;
    }
#pragma unroll
    for (int i = 0; i < 16; i++) v[i] = nvfp4_elem(v[i], S, zeroFix);
    if (d16) {
        if (vec) {
#pragma unroll
            for (int i = 0; i < 4; i++)
                ((uint2 *)d16)[i] = make_uint2((u32)f32_to_bf16(v[4 * i]) | ((u32)f32_to_bf16(v[4 * i + 1]) << 16),
                                               (u32)f32_to_bf16(v[4 * i + 2]) | ((u32)f32_to_bf16(v[4 * i + 3]) << 16));
        } else {
            for (int i = 0; i < w; i++) d16[i] = f32_to_bf16(v[i]);
        }
    } else if (vec) {
#pragma unroll
        for (int i = 0; i < 4; i++) ((float4 *)dst)[i] = make_float4(v[4 * i], v[4 * i + 1], v[4 * i + 2], v[4 * i + 3]);
    } else {
        for (int i = 0; i < w; i++) dst[i] = v[i];
    }
}

// The 16 values of a block starting at src (w of them; zeros past w), with 16-byte loads when `vec`.
__device__ __forceinline__ void load_block16(float v[16], const float *src, int w, bool vec) {
    if (vec) {
#pragma unroll
        for (int i = 0; i < 4; i++) {
            float4 t = ((const float4 *)src)[i];
            v[4 * i] = t.x; v[4 * i + 1] = t.y; v[4 * i + 2] = t.z; v[4 * i + 3] = t.w;
        }
    } else {
#pragma unroll
        for (int i = 0; i < 16; i++) v[i] = i < w ? src[i] : 0.0f;
    }
}

// The grid-stride loop over the 16-blocks of [rows, cols] (blocks along cols) of the NVFP4
// kernels: `fill(v, offset, w, vec)` puts a block's values into v, which are then quantized into
// out, or, when bf16out is given, as their bf16 rounding there. One thread per block.
template <typename Fill>
__device__ __forceinline__ void nvfp4_blocks(long rows, int cols, float globalAmax, int mode, float *out, u16 *bf16out, Fill fill) {
    int nb = (cols + 15) / 16;
    long total = rows * nb;
    float gs = __fdiv_rn(globalAmax, 2688.0f);
    float zeroFix = mode == 1 ? 0.0f : -0.0f;
    for (long b = blockIdx.x * (long)blockDim.x + threadIdx.x; b < total; b += (long)gridDim.x * blockDim.x) {
        long r = b / nb;
        int c0 = (int)(b - r * nb) * 16, w = min(16, cols - c0);
        bool vec = w == 16 && (cols & 3) == 0;
        long o = r * cols + c0;
        float v[16];
        fill(v, o, w, vec);
        nvfp4_block(v, w, vec, out ? out + o : 0, bf16out ? bf16out + o : 0, gs, mode, zeroFix);
    }
}

// NVFP4 fake quant of x [rows, cols] into out (may alias x), or, when bf16out is given, into its
// bf16 rounding there instead (the input of a bf16 product). gs = globalAmax / 2688.
extern "C" __global__ void nvfp4_fake_quant(const float *x, float *out, u16 *bf16out, long rows, int cols, float globalAmax,
                                            int mode) {
    nvfp4_blocks(rows, cols, globalAmax, mode, out, bf16out, [&](float *v, long o, int w, bool vec) { load_block16(v, x + o, w, vec); });
}

// SwiGLU fused with the NVFP4 fake quant of its output, written as bf16 only (down_proj's product
// input in bf16; h itself is not stored): h = gate / (1 + e^-gate) · up exactly as swiglu_forward
// computes it, then nvfp4_fake_quant's blocks. Bit-identical to those two kernels in a row.
extern "C" __global__ void swiglu_nvfp4(const float *gate, const float *up, u16 *bf16out, long rows, int cols, float globalAmax,
                                        int mode) {
    nvfp4_blocks(rows, cols, globalAmax, mode, (float *)0, bf16out, [&](float *v, long o, int w, bool vec) {
        float u[16];
        load_block16(v, gate + o, w, vec);
        load_block16(u, up + o, w, vec);
#pragma unroll
        for (int i = 0; i < 16; i++) {
            float x = v[i];
            v[i] = i < w ? x / (1.0f + expf(-x)) * u[i] : 0.0f;
        }
    });
}

// RMSNorm fused with the NVFP4 fake quant of its output, written as bf16 only (the shared product input of the
// Linears that read the norm; the normalised rows are not stored): rmsnorm_forward's rstd and values (the same
// double sum of squares in the same order, for the same block size) then nvfp4_fake_quant's blocks, bit for bit
// with those two kernels in a row. One block per row, c a multiple of 16; rstd (when not null) gets the row's rstd.
extern "C" __global__ void rmsnorm_nvfp4(u16 *bf16out, float *rstd, const float *inp, const float *w, int n, int c, float eps,
                                         float globalAmax, int mode) {
    long row = blockIdx.x;
    if (row >= n) return;
    const float *x = inp + row * c;
    float rs = rmsnorm_row_rstd(x, c, eps);
    if (threadIdx.x == 0 && rstd) rstd[row] = rs;
    float gs = __fdiv_rn(globalAmax, 2688.0f), zeroFix = mode == 1 ? 0.0f : -0.0f;
    bool vec = (((unsigned long long)x | (unsigned long long)bf16out) & 15) == 0;   // (c % 16 == 0: every row alike)
    for (int k = threadIdx.x; k < c / 16; k += blockDim.x) {
        int c0 = 16 * k;
        float v[16];
        load_block16(v, x + c0, 16, vec);
#pragma unroll
        for (int i = 0; i < 16; i++) v[i] = __fmul_rn(w[c0 + i], __fmul_rn(v[i], rs));
        nvfp4_block(v, 16, vec, (float *)0, bf16out + row * c + c0, gs, mode, zeroFix);
    }
}
// Per-tensor FP8 E4M3 fake quant: e4m3(x * (448/amax)) / (448/amax); |x| < 2^-24 -> 0.
extern "C" __global__ void fp8_fake_quant(const float *x, float *out, long n, float amax) {
    float scale = __fdiv_rn(448.0f, amax), tiny = 1.0f / 16777216.0f;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = x[i];
        float q = __fdiv_rn(e4m3_round(__fmul_rn(v, scale)), scale);
        out[i] = fabsf(v) < tiny ? 0.0f : q;
    }
}

// Per-tensor symmetric INT8 fake quant: clamp(rint(x * 127/amax), -127, 127) / (127/amax).
extern "C" __global__ void int8_fake_quant(const float *x, float *out, long n, float amax) {
    float scale = __fdiv_rn(127.0f, amax);
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float q = smin(smax(rintf(__fmul_rn(x[i], scale)), -127.0f), 127.0f);
        out[i] = __fdiv_rn(q, scale);
    }
}

// slot = max(slot, max |x|) over bit patterns of sign-cleared floats (NaN patterns sort above
// +inf, so a NaN input stays visible), as Reduce.absMax on the CPU.
extern "C" __global__ void absmax_reduce(const float *x, long n, u32 *slot) {
    u32 m = 0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        m = max(m, __float_as_uint(x[i]) & 0x7fffffffu);
    for (int o = 16; o > 0; o >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, o));
    if ((threadIdx.x & 31) == 0 && m) atomicMax(slot, m);
}
