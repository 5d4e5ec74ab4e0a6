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
// vec)` puts a block's values into v. Either way the same bits.
template <typename Fill4, typename Fill>
__device__ __forceinline__ void nvfp4_blocks(long rows, int cols, float globalAmax, int mode, float *out, u16 *bf16out,
                                             bool inputsAligned, Fill4 fill4, Fill fill) {
    float gs = __fdiv_rn(globalAmax, 2688.0f);
    float zeroFix = mode == 1 ? 0.0f : -0.0f;
    long t = blockIdx.x * (long)blockDim.x + threadIdx.x, stride = (long)gridDim.x * blockDim.x;
    bool aligned = inputsAligned && aligned16(out) && aligned8(bf16out);
    if (aligned && (cols & 15) == 0) {
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
// bf16 rounding there instead (the input of a bf16 product). gs = globalAmax / 2688.
extern "C" __global__ void nvfp4_fake_quant(const float *x, float *out, u16 *bf16out, long rows, int cols, float globalAmax,
                                            int mode) {
    nvfp4_blocks(
        rows, cols, globalAmax, mode, out, bf16out, aligned16(x),
        [&](float *v, long o) {
            float4 t = *(const float4 *)(x + o);
            v[0] = t.x; v[1] = t.y; v[2] = t.z; v[3] = t.w;
        },
        [&](float *v, long o, int w, bool vec) { load_block16(v, x + o, w, vec); });
}

// SwiGLU fused with the NVFP4 fake quant of its output, written as bf16 only (down_proj's product
// input in bf16; h itself is not stored): h = gate / (1 + e^-gate) · up exactly as swiglu_forward
// computes it, then nvfp4_fake_quant's blocks. Bit-identical to those two kernels in a row.
extern "C" __global__ void swiglu_nvfp4(const float *gate, const float *up, u16 *bf16out, long rows, int cols, float globalAmax,
                                        int mode) {
    nvfp4_blocks(
        rows, cols, globalAmax, mode, (float *)0, bf16out, aligned16(gate) && aligned16(up),
        [&](float *v, long o) {
            float4 g = *(const float4 *)(gate + o), u = *(const float4 *)(up + o);
            v[0] = swiglu_one(g.x, u.x); v[1] = swiglu_one(g.y, u.y); v[2] = swiglu_one(g.z, u.z); v[3] = swiglu_one(g.w, u.w);
        },
        [&](float *v, long o, int w, bool vec) {
            float u[16];
            load_block16(v, gate + o, w, vec);
            load_block16(u, up + o, w, vec);
#pragma unroll
            for (int i = 0; i < 16; i++) v[i] = i < w ? swiglu_one(v[i], u[i]) : 0.0f;
        });
}

// RMSNorm fused with the NVFP4 fake quant of its output, written as bf16 only (the shared product input of the
// Linears that read the norm; the normalised rows are not stored): rmsnorm_forward's rstd and values (the same
// warp per row and the same double sum of squares in the same order) then nvfp4_fake_quant's blocks, bit for bit
// with those two kernels in a row. c a multiple of 16; rstd (when not null) gets the row's rstd. Blocks of 4 lanes
// (nvfp4_quad) when the rows are 16-byte aligned, else a lane per block.
extern "C" __global__ void rmsnorm_nvfp4(u16 *bf16out, float *rstd, const float *inp, const float *w, int n, int c, float eps,
                                         float globalAmax, int mode) {
    long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;   // (the whole warp)
    int lane = threadIdx.x & 31;
    const float *x = inp + row * c;
    float rs = rmsnorm_row_rstd(x, c, eps);
    if (lane == 0 && rstd) rstd[row] = rs;
    float gs = __fdiv_rn(globalAmax, 2688.0f), zeroFix = mode == 1 ? 0.0f : -0.0f;
    u16 *o16 = bf16out + row * c;
    if (aligned16(x) && aligned16(w) && aligned8(o16)) {
        const float4 *x4 = (const float4 *)x, *w4 = (const float4 *)w;
        for (int base = 0; base < c / 4; base += 32) {   // (per warp: every lane takes part in the shuffles)
            int i = base + lane;
            bool on = i < c / 4;
            float v[4] = {0, 0, 0, 0};
            if (on) {
                float4 t = x4[i], g = w4[i];
                v[0] = __fmul_rn(g.x, __fmul_rn(t.x, rs)); v[1] = __fmul_rn(g.y, __fmul_rn(t.y, rs));
                v[2] = __fmul_rn(g.z, __fmul_rn(t.z, rs)); v[3] = __fmul_rn(g.w, __fmul_rn(t.w, rs));
            }
            nvfp4_quad(v, on, (float *)0, o16 + 4 * i, gs, mode, zeroFix);
        }
        return;
    }
    for (int k = lane; k < c / 16; k += 32) {
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
