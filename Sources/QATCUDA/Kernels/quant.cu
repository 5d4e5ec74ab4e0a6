// Fake quantizers (Sources/QATQuant/{NVFP4,FP8Quant}.swift), bit-identical to the CPU path, and
// the max calibration reduction.

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

// The grid-stride loop over the 16-blocks of [rows, cols] (blocks along cols) of the NVFP4 kernels, quantized
// into out, or, when bf16out is given, as their bf16 rounding there. When cols % 16 == 0 and the arrays are
// aligned (`inputsAligned`: the inputs 16-byte; out 16-byte, bf16out 8-byte): four lanes per block, a float4 each (`fill4(v, o)` puts the
// 4 values at element o into v), so that a warp reads and writes whole contiguous lines; the loop bound is
// per warp (every lane takes part in nvfp4_quad's shuffles). Else one thread per block: `fill(v, offset, w,
// vec)` puts a block's values into v. Either way the same bits. QUADS: the caller guarantees the four-lane case
// (the `_quads` kernels): without the one-thread-per-block path the kernel needs 32 registers, not 58–65, so
// twice the warps fit on a multiprocessor (swiglu_nvfp4 at Llama's [8192 × 8192]: 258 → 194 µs on the H200,
// scripts/cuda-emu/gpu_bench_quant.cu).
template <bool QUADS, typename Fill4, typename Fill>
__device__ __forceinline__ void nvfp4_blocks(long rows, int cols, float globalAmax, int mode, float *out, u16 *bf16out,
                                             bool inputsAligned, Fill4 fill4, Fill fill) {
    float gs = nvfp4_global_scale(globalAmax), zeroFix = nvfp4_zero_fix(mode);
    long t = blockIdx.x * (long)blockDim.x + threadIdx.x, stride = (long)gridDim.x * blockDim.x;
    bool aligned = inputsAligned && aligned16(out) && aligned8(bf16out);
    if (QUADS || (aligned && (cols & 15) == 0)) {
        long total4 = rows * (long)(cols / 4), lane = threadIdx.x & 31;
        for (long base = t - lane; base < total4; base += stride) {   // (blockDim.x is a multiple of 32)
            long i = base + lane;
            bool on = i < total4;
            float v[4] = {0, 0, 0, 0};
            if (on) fill4(v, 4 * i);
            nvfp4_quad(v, on, out ? out + 4 * i : 0, bf16out ? bf16out + 4 * i : 0, gs, mode, zeroFix);
        }
        return;
    }
    int nb = (cols + 15) / 16;
    long total = rows * nb;
    for (long b = t; b < total; b += stride) {
        long r = b / nb;
        int c0 = (int)(b - r * nb) * 16, w = min(16, cols - c0);
        bool vec = aligned && w == 16 && (cols & 3) == 0;
        long o = r * cols + c0;
        float v[16];
        fill(v, o, w, vec);
        nvfp4_block(v, w, vec, out ? out + o : 0, bf16out ? bf16out + o : 0, gs, mode, zeroFix);
    }
}

// NVFP4 fake quant of x [rows, cols] into out (may alias x), or, when bf16out is given, into its
// bf16 rounding there instead (the input of a bf16 product). gs = globalAmax / 2688. `_quads`: only for
// cols % 16 == 0 with x, out 16-byte and bf16out 8-byte aligned (CUDAOps.nvfp4Quads), the same bits.
#define NVFP4_FAKE_QUANT_ARGS const float *x, float *out, u16 *bf16out, long rows, int cols, float globalAmax, int mode
template <bool QUADS> __device__ __forceinline__ void nvfp4_fake_quant_impl(NVFP4_FAKE_QUANT_ARGS) {
    nvfp4_blocks<QUADS>(
        rows, cols, globalAmax, mode, out, bf16out, aligned16(x),
        [&](float *v, long o) {
            float4 t = *(const float4 *)(x + o);
            v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
        },
        [&](float *v, long o, int w, bool vec) { load_block16(v, x + o, w, vec); });
}
extern "C" __global__ void nvfp4_fake_quant(NVFP4_FAKE_QUANT_ARGS) {
    nvfp4_fake_quant_impl<false>(x, out, bf16out, rows, cols, globalAmax, mode);
}
extern "C" __global__ void __launch_bounds__(256, 8) nvfp4_fake_quant_quads(NVFP4_FAKE_QUANT_ARGS) {
    nvfp4_fake_quant_impl<true>(x, out, bf16out, rows, cols, globalAmax, mode);
}

// SwiGLU fused with the NVFP4 fake quant of its output, written as bf16 only (down_proj's product
// input in bf16; h itself is not stored): h = gate / (1 + e^-gate) · up exactly as swiglu_forward
// computes it from the bf16 gate and up that bf16 precision keeps (CUDAModel.LayerActivations), then
// nvfp4_fake_quant's blocks. Bit-identical to those two kernels in a row. `_quads`: as for
// nvfp4_fake_quant_quads (gate, up 8-byte aligned).
#define SWIGLU_NVFP4_ARGS const u16 *gate, const u16 *up, u16 *bf16out, long rows, int cols, float globalAmax, int mode
template <bool QUADS> __device__ __forceinline__ void swiglu_nvfp4_impl(SWIGLU_NVFP4_ARGS) {
    nvfp4_blocks<QUADS>(
        rows, cols, globalAmax, mode, (float *)0, bf16out, aligned8(gate) && aligned8(up),
        [&](float *v, long o) {
            float4 g = f32x4(*(const uint2 *)(gate + o)), u = f32x4(*(const uint2 *)(up + o));
            v[0] = swiglu_one(g.x, u.x); v[1] = swiglu_one(g.y, u.y); v[2] = swiglu_one(g.z, u.z); v[3] = swiglu_one(g.w, u.w);
        },
        [&](float *v, long o, int w, bool vec) {
#pragma unroll
            for (int i = 0; i < 16; i++) v[i] = i < w ? swiglu_one(bf16_to_f32(gate[o + i]), bf16_to_f32(up[o + i])) : 0.0f;
        });
}
extern "C" __global__ void swiglu_nvfp4(SWIGLU_NVFP4_ARGS) {
    swiglu_nvfp4_impl<false>(gate, up, bf16out, rows, cols, globalAmax, mode);
}
extern "C" __global__ void __launch_bounds__(256, 8) swiglu_nvfp4_quads(SWIGLU_NVFP4_ARGS) {
    swiglu_nvfp4_impl<true>(gate, up, bf16out, rows, cols, globalAmax, mode);
}

// RMSNorm fused with the NVFP4 fake quant of its output, written as bf16 only (the shared product input of the
// Linears that read the norm; the normalised rows are not stored): rmsnorm_forward's rstd and values (the same
// block per row, rmsnorm_block_rstd, rms_apply4) then nvfp4_fake_quant's blocks, bit for bit with those two kernels
// in a row. c a multiple of 16; rstd (when not null) gets the row's rstd. Grid: one block of RMS_THREADS per row.
// Blocks of 4 lanes (nvfp4_quad: float4s 4j … 4j+3 of a row are one 16-block, and RMS_THREADS is a multiple of 32,
// so a warp's lanes are all in the row or all past it) when the rows are 16-byte aligned, else a thread per block.
extern "C" __global__ void __launch_bounds__(RMS_THREADS) rmsnorm_nvfp4(u16 *bf16out, float *rstd, const float *inp, const float *w,
                                                                      int n, int c, float eps, float globalAmax, int mode) {
    long row = blockIdx.x;
    if (row >= n) return;   // (the whole block)
    int t = threadIdx.x;
    const float *x = inp + row * c;
    float4 xv[RMS_HELD];
    bool xvec = (c & 3) == 0 && aligned16(x);
    float rs = rmsnorm_block_rstd(x, c, eps, xvec, xv);
    if (t == 0 && rstd) rstd[row] = rs;
    float gs = nvfp4_global_scale(globalAmax), zeroFix = nvfp4_zero_fix(mode);
    u16 *o16 = bf16out + row * c;
    if (xvec && aligned16(w) && aligned8(o16)) {
        const float4 *x4 = (const float4 *)x, *w4 = (const float4 *)w;
        int c4 = c >> 2;
#pragma unroll
        for (int k = 0; k < RMS_HELD + 1; k++) {   // k == RMS_HELD: the float4s past the held ones, read again
            for (int base = RMS_THREADS * k; base < c4; base += RMS_THREADS) {   // (uniform per warp: the shuffles)
                int i = base + t;
                bool on = i < c4;
                float4 y = on ? rms_apply4(k < RMS_HELD ? xv[k] : x4[i], w4[i], rs) : make_float4(0, 0, 0, 0);
                float v[4] = {y.x, y.y, y.z, y.w};
                nvfp4_quad(v, on, (float *)0, o16 + 4 * i, gs, mode, zeroFix);
                if (k < RMS_HELD) break;
            }
        }
        return;
    }
    for (int k = t; k < c / 16; k += RMS_THREADS) {
        int c0 = 16 * k;
        float v[16];
        load_block16(v, x + c0, 16, false);
#pragma unroll
        for (int i = 0; i < 16; i++) v[i] = __fmul_rn(w[c0 + i], __fmul_rn(v[i], rs));
        nvfp4_block(v, 16, false, (float *)0, o16 + c0, gs, mode, zeroFix);
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
