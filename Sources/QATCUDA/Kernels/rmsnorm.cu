// RMSNorm forward and backward (Sources/QATModels/Layers/RMSNorm.swift); the row sums are accumulated in double as
// on the CPU. A block of RMS_THREADS threads per row, which holds the row's first 4·RMS_HELD·RMS_THREADS floats in
// registers (common.cu); float4 loads and stores when the rows allow them (c % 4 == 0, 16-byte aligned).

// Forward: rstd is kept for backward; out16 (optional) receives a bf16 copy of the output, the input of the
// bf16 products that read it; out may be null when only that copy is read. Grid: one block per row.
extern "C" __global__ void __launch_bounds__(RMS_THREADS) rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w,
                                                                        int n, int c, float eps, u16 *out16) {
    long row = blockIdx.x;
    if (row >= n) return;   // (the whole block)
    int t = threadIdx.x;
    const float *x = inp + row * c;
    float4 xv[RMS_HELD];
    bool xvec = (c & 3) == 0 && aligned16(x);
    float rs = rmsnorm_block_rstd(x, c, eps, xvec, xv);
    if (t == 0 && rstd) rstd[row] = rs;
    float *o = out ? out + row * c : 0;
    u16 *o16 = out16 ? out16 + row * c : 0;
    if (xvec && aligned16(w) && aligned16(o) && aligned8(o16)) {
        const float4 *x4 = (const float4 *)x, *w4 = (const float4 *)w;
        int c4 = c >> 2;
#pragma unroll
        for (int k = 0; k < RMS_HELD + 1; k++) {   // k == RMS_HELD: the float4s past the held ones, read again
            for (int i = t + RMS_THREADS * k; i < c4; i += RMS_THREADS) {
                float4 y = rms_apply4(k < RMS_HELD ? xv[k] : x4[i], w4[i], rs);
                if (o) ((float4 *)o)[i] = y;
                if (o16) ((uint2 *)o16)[i] = bf16x4(y.x, y.y, y.z, y.w);
                if (k < RMS_HELD) break;
            }
        }
        return;
    }
    for (int j = t; j < c; j += RMS_THREADS) {
        float y = __fmul_rn(w[j], __fmul_rn(x[j], rs));
        if (o) o[j] = y;
        if (o16) o16[j] = f32_to_bf16(y);
    }
}

// Thread t's held float4s (t + RMS_THREADS·k, k < RMS_HELD) of a row of x and of g (the float4 path).
__device__ __forceinline__ void rms_held_load(const float *x, const float *g, int c4, float4 (&xv)[RMS_HELD], float4 (&gv)[RMS_HELD]) {
#pragma unroll
    for (int k = 0; k < RMS_HELD; k++) {
        int i = threadIdx.x + RMS_THREADS * k;
        if (i < c4) { xv[k] = ((const float4 *)x)[i]; gv[k] = ((const float4 *)g)[i]; }
    }
}

// Backward (RMSNorm.backward): per row, k = (Σ w·g·x)·rs²/c and dx = rs·(w·g − x·k), written to dinp or added to
// it (accumulate != 0). dinp may alias dout only when writing: each thread rewrites only elements it has read, and
// the block's sum (rms_block_sum's barrier) comes after every read of the sum pass. The sum: each thread adds its
// elements' w·g·x in order (float4s t, t + RMS_THREADS, …; elements on the scalar path), then rms_block_sum. The
// weight gradient Σ_rows g·(x·rs) is a column sum (colsum_partial with rowScale = rstd). dinp16 (when not null):
// dinp's new values rounded to bf16 (the residual stream's gradient is the next bf16 product's dy), row r at
// dinp16 + (r / group16)·ld16 + (r % group16)·c (group16 = 1, ld16 = c: contiguous; a per-head q/k norm's rows,
// group16 = heads, into the wider rows of the fused q/k/v products' dy). Grid: a block
// of RMS_THREADS per row; x and g are read from memory once for rows of up to 4·RMS_HELD·RMS_THREADS floats.
//
// DW: the row's weight-gradient terms g·(x·rs) are added to dw (this thread's float4s t + RMS_THREADS·k, k < RMS_HELD,
// as colsum_partial adds them: __fmul_rn(g, __fmul_rn(x, rs)), then __fadd_rn); only on the float4 path with
// c <= 4·RMS_HELD·RMS_THREADS (rmsnorm_backward_dw's host checks both), where xv, gv already hold the row's float4s
// (rms_held_load: the caller loads the next row's while this one is summed and written).
template <bool DW>
__device__ __forceinline__ void rmsnorm_backward_row(long row, float *dinp, const float *dout, const float *inp, const float *w,
                                                     const float *rstd, int c, int accumulate, u16 *dinp16, int group16, long ld16,
                                                     float4 (&dw)[RMS_HELD], float4 (&xv)[RMS_HELD], float4 (&gv)[RMS_HELD]) {
    int t = threadIdx.x;
    const float *x = inp + row * c, *g = dout + row * c;
    float *d = dinp + row * c;
    u16 *d16 = dinp16 ? dinp16 + (row / group16) * ld16 + (row % group16) * c : 0;
    bool vec = (c & 3) == 0 && aligned16(x) && aligned16(g) && aligned16(d) && aligned16(w) && aligned8(d16);
    const float4 *x4 = (const float4 *)x, *g4 = (const float4 *)g, *w4 = (const float4 *)w;
    int c4 = c >> 2;
    double s = 0;
    if (vec) {
        if constexpr (!DW) rms_held_load(x, g, c4, xv, gv);
#pragma unroll
        for (int k = 0; k < RMS_HELD + 1; k++) {   // k == RMS_HELD: the float4s past the held ones
            for (int i = t + RMS_THREADS * k; i < c4; i += RMS_THREADS) {
                float4 a = w4[i], b = k < RMS_HELD ? gv[k] : g4[i], e = k < RMS_HELD ? xv[k] : x4[i];
                s += (double)__fmul_rn(__fmul_rn(a.x, b.x), e.x);
                s += (double)__fmul_rn(__fmul_rn(a.y, b.y), e.y);
                s += (double)__fmul_rn(__fmul_rn(a.z, b.z), e.z);
                s += (double)__fmul_rn(__fmul_rn(a.w, b.w), e.w);
                if (k < RMS_HELD) break;
            }
        }
    } else {
        for (int j = t; j < c; j += RMS_THREADS) s += (double)__fmul_rn(__fmul_rn(w[j], g[j]), x[j]);
    }
    s = rms_block_sum(s);
    float rs = rstd[row];
    float k = __fdiv_rn(__fmul_rn(__fmul_rn((float)s, rs), rs), (float)c);
    if constexpr (DW) {
#pragma unroll
        for (int h = 0; h < RMS_HELD; h++) {
            if (t + RMS_THREADS * h >= c4) break;
            float4 b = gv[h], e = xv[h];
            dw[h].x = __fadd_rn(dw[h].x, __fmul_rn(b.x, __fmul_rn(e.x, rs)));
            dw[h].y = __fadd_rn(dw[h].y, __fmul_rn(b.y, __fmul_rn(e.y, rs)));
            dw[h].z = __fadd_rn(dw[h].z, __fmul_rn(b.z, __fmul_rn(e.z, rs)));
            dw[h].w = __fadd_rn(dw[h].w, __fmul_rn(b.w, __fmul_rn(e.w, rs)));
        }
    }
    if (vec) {
#pragma unroll
        for (int h = 0; h < RMS_HELD + 1; h++) {
            for (int i = t + RMS_THREADS * h; i < c4; i += RMS_THREADS) {
                float4 a = w4[i], b = h < RMS_HELD ? gv[h] : g4[i], e = h < RMS_HELD ? xv[h] : x4[i];
                float4 v = make_float4(__fmul_rn(rs, __fsub_rn(__fmul_rn(a.x, b.x), __fmul_rn(e.x, k))),
                                       __fmul_rn(rs, __fsub_rn(__fmul_rn(a.y, b.y), __fmul_rn(e.y, k))),
                                       __fmul_rn(rs, __fsub_rn(__fmul_rn(a.z, b.z), __fmul_rn(e.z, k))),
                                       __fmul_rn(rs, __fsub_rn(__fmul_rn(a.w, b.w), __fmul_rn(e.w, k))));
                if (accumulate) {
                    float4 o = ((const float4 *)d)[i];
                    v = make_float4(__fadd_rn(o.x, v.x), __fadd_rn(o.y, v.y), __fadd_rn(o.z, v.z), __fadd_rn(o.w, v.w));
                }
                ((float4 *)d)[i] = v;
                if (d16) ((uint2 *)d16)[i] = bf16x4(v.x, v.y, v.z, v.w);
                if (h < RMS_HELD) break;
            }
        }
        return;
    }
    for (int j = t; j < c; j += RMS_THREADS) {
        float v = __fmul_rn(rs, __fsub_rn(__fmul_rn(w[j], g[j]), __fmul_rn(x[j], k)));
        v = accumulate ? __fadd_rn(d[j], v) : v;
        d[j] = v;
        if (d16) d16[j] = f32_to_bf16(v);
    }
}

extern "C" __global__ void __launch_bounds__(RMS_THREADS) rmsnorm_backward(float *dinp, const float *dout, const float *inp,
                                                                         const float *w, const float *rstd, int n, int c,
                                                                         int accumulate, u16 *dinp16, int group16, long ld16) {
    long row = blockIdx.x;
    if (row >= n) return;   // (the whole block)
    float4 unused[RMS_HELD], xv[RMS_HELD], gv[RMS_HELD];
    rmsnorm_backward_row<false>(row, dinp, dout, inp, w, rstd, c, accumulate, dinp16, group16, ld16, unused, xv, gv);
}

// rmsnorm_backward and RMSNorm's weight gradient in one pass: block b runs rows b·R ..< min(n, (b+1)·R) (R =
// rowsPerBlock) in order, each as rmsnorm_backward does, adding their terms g·(x·rs) to per-column sums held in
// registers (colsum_partial's order and bits for the same rowsPerBlock), then writes its sums to partials[b, 0 ..< c];
// colsum_finish adds them to the gradient. Only on the float4 path (c % 4 == 0, every array 16-byte aligned, dinp16
// 8-byte aligned) with c <= 4·RMS_HELD·RMS_THREADS: the host checks. Grid: ceil(n / R) blocks of RMS_THREADS.
extern "C" __global__ void __launch_bounds__(RMS_THREADS) rmsnorm_backward_dw(float *dinp, const float *dout, const float *inp,
                                                                            const float *w, const float *rstd, int n, int c,
                                                                            int accumulate, u16 *dinp16, int group16, long ld16,
                                                                            float *partials, int rowsPerBlock) {
    long r0 = (long)blockIdx.x * rowsPerBlock, r1 = min((long)n, r0 + rowsPerBlock);
    float4 dw[RMS_HELD];
#pragma unroll
    for (int h = 0; h < RMS_HELD; h++) dw[h] = make_float4(0, 0, 0, 0);
    int c4 = c >> 2;
    float4 xv[RMS_HELD], gv[RMS_HELD];
    if (r0 < r1) rms_held_load(inp + r0 * c, dout + r0 * c, c4, xv, gv);
    for (long row = r0; row < r1; row++) {
        if (row > r0) __syncthreads();   // every warp has read the last row's rms_block_sum before it is reused
        // the next row's float4s in flight while this row is summed and written (its dinp is another row's memory)
        float4 nx[RMS_HELD], ng[RMS_HELD];
        if (row + 1 < r1) rms_held_load(inp + (row + 1) * c, dout + (row + 1) * c, c4, nx, ng);
        rmsnorm_backward_row<true>(row, dinp, dout, inp, w, rstd, c, accumulate, dinp16, group16, ld16, dw, xv, gv);
#pragma unroll
        for (int h = 0; h < RMS_HELD; h++) { xv[h] = nx[h]; gv[h] = ng[h]; }
    }
    int t = threadIdx.x;
    float4 *p4 = (float4 *)(partials + (long)blockIdx.x * c);
#pragma unroll
    for (int h = 0; h < RMS_HELD; h++)
        if (t + RMS_THREADS * h < c4) p4[t + RMS_THREADS * h] = dw[h];
}

// ---- Short rows: a warp per row ----
// A Qwen3 per-head q/k norm's rows (c = head_dim ≤ 128 floats): a block of RMS_THREADS per row would keep 3 of its 4
// warps idle. The `_warps` kernels run RMS_THREADS / 32 rows per block, a warp per row, lane l holding float4 l
// (c % 4 == 0, c ≤ 128, every array 16-byte aligned, a bf16 copy 8-byte: the host checks, `rmsnormWarpRows`). Each
// lane adds its float4's terms in the order the block kernels' thread l does and the warp's sum is rms_warp_sum: the
// block kernels' sums over the same values (their other threads and warps add +0), so the same bits.
#define RMS_WARP_ROWS (RMS_THREADS / 32)

// rms_block_sum of a block whose threads past the first warp hold 0: warp_sum_d, then + 0.0 (−0 becomes +0 there too).
__device__ __forceinline__ double rms_warp_sum(double s) { return warp_sum_d(s) + 0.0; }

extern "C" __global__ void __launch_bounds__(RMS_THREADS) rmsnorm_forward_warps(float *out, float *rstd, const float *inp,
                                                                              const float *w, int n, int c, float eps, u16 *out16) {
    long row = (long)blockIdx.x * RMS_WARP_ROWS + (threadIdx.x >> 5);
    if (row >= n) return;   // (the whole warp)
    int l = threadIdx.x & 31;
    bool on = l < (c >> 2);
    float4 v = on ? ((const float4 *)(inp + row * c))[l] : make_float4(0, 0, 0, 0);
    double s = 0;
    s += (double)__fmul_rn(v.x, v.x);
    s += (double)__fmul_rn(v.y, v.y);
    s += (double)__fmul_rn(v.z, v.z);
    s += (double)__fmul_rn(v.w, v.w);
    s = rms_warp_sum(s);
    float rs = 1.0f / sqrtf((float)(s / (double)c) + eps);
    if (l == 0 && rstd) rstd[row] = rs;
    if (!on) return;
    float4 y = rms_apply4(v, ((const float4 *)w)[l], rs);
    if (out) ((float4 *)(out + row * c))[l] = y;
    if (out16) ((uint2 *)(out16 + row * c))[l] = bf16x4(y.x, y.y, y.z, y.w);
}

// rmsnorm_backward_row on a warp: row `row` from lane l's float4s xv (inp), gv (dout) and wv (the weight); with DW,
// its weight-gradient terms g·(x·rs) added to dw as rmsnorm_backward_row adds them.
template <bool DW>
__device__ __forceinline__ void rms_warp_backward_row(long row, float *dinp, float4 xv, float4 gv, float4 wv, const float *rstd, int c,
                                                      int accumulate, u16 *dinp16, int group16, long ld16, float4 &dw) {
    int l = threadIdx.x & 31;
    bool on = l < (c >> 2);
    double s = 0;
    if (on) {
        s += (double)__fmul_rn(__fmul_rn(wv.x, gv.x), xv.x);
        s += (double)__fmul_rn(__fmul_rn(wv.y, gv.y), xv.y);
        s += (double)__fmul_rn(__fmul_rn(wv.z, gv.z), xv.z);
        s += (double)__fmul_rn(__fmul_rn(wv.w, gv.w), xv.w);
    }
    s = rms_warp_sum(s);
    float rs = rstd[row];
    float k = __fdiv_rn(__fmul_rn(__fmul_rn((float)s, rs), rs), (float)c);
    if (!on) return;
    if constexpr (DW) {
        dw.x = __fadd_rn(dw.x, __fmul_rn(gv.x, __fmul_rn(xv.x, rs)));
        dw.y = __fadd_rn(dw.y, __fmul_rn(gv.y, __fmul_rn(xv.y, rs)));
        dw.z = __fadd_rn(dw.z, __fmul_rn(gv.z, __fmul_rn(xv.z, rs)));
        dw.w = __fadd_rn(dw.w, __fmul_rn(gv.w, __fmul_rn(xv.w, rs)));
    }
    float4 v = make_float4(__fmul_rn(rs, __fsub_rn(__fmul_rn(wv.x, gv.x), __fmul_rn(xv.x, k))),
                           __fmul_rn(rs, __fsub_rn(__fmul_rn(wv.y, gv.y), __fmul_rn(xv.y, k))),
                           __fmul_rn(rs, __fsub_rn(__fmul_rn(wv.z, gv.z), __fmul_rn(xv.z, k))),
                           __fmul_rn(rs, __fsub_rn(__fmul_rn(wv.w, gv.w), __fmul_rn(xv.w, k))));
    float4 *d = (float4 *)(dinp + row * c) + l;
    if (accumulate) {
        float4 o = *d;
        v = make_float4(__fadd_rn(o.x, v.x), __fadd_rn(o.y, v.y), __fadd_rn(o.z, v.z), __fadd_rn(o.w, v.w));
    }
    *d = v;
    if (dinp16) ((uint2 *)(dinp16 + (row / group16) * ld16 + (row % group16) * c))[l] = bf16x4(v.x, v.y, v.z, v.w);
}

// Lane l's float4 of row `row` of a (zeros past the row's c/4 float4s).
__device__ __forceinline__ float4 rms_lane4(const float *a, long row, int c) {
    int l = threadIdx.x & 31;
    return l < (c >> 2) ? ((const float4 *)(a + row * c))[l] : make_float4(0, 0, 0, 0);
}

// rmsnorm_backward with a warp per row (dinp may alias dout, as there: a lane rewrites only its own float4s).
extern "C" __global__ void __launch_bounds__(RMS_THREADS) rmsnorm_backward_warps(float *dinp, const float *dout, const float *inp,
                                                                               const float *w, const float *rstd, int n, int c,
                                                                               int accumulate, u16 *dinp16, int group16, long ld16) {
    long row = (long)blockIdx.x * RMS_WARP_ROWS + (threadIdx.x >> 5);
    if (row >= n) return;   // (the whole warp)
    float4 unused;
    rms_warp_backward_row<false>(row, dinp, rms_lane4(inp, row, c), rms_lane4(dout, row, c), rms_lane4(w, 0, c), rstd, c, accumulate,
                                 dinp16, group16, ld16, unused);
}

// rmsnorm_backward_dw with a warp per run of rows: warp v (of the grid, blockIdx.x·RMS_WARP_ROWS + its index) runs rows
// v·R ..< min(n, (v+1)·R) (R = rowsPerWarp) in order, the next row's float4s loaded while this one is summed and
// written, and writes its column sums to partials[v, 0 ..< c]: rmsnorm_backward_dw's bits for a block per R rows
// (colsum_partial's), which colsum_finish adds to the gradient. Grid: ceil(ceil(n / R) / RMS_WARP_ROWS) blocks.
extern "C" __global__ void __launch_bounds__(RMS_THREADS) rmsnorm_backward_dw_warps(float *dinp, const float *dout, const float *inp,
                                                                                  const float *w, const float *rstd, int n, int c,
                                                                                  int accumulate, u16 *dinp16, int group16, long ld16,
                                                                                  float *partials, int rowsPerWarp) {
    long v = (long)blockIdx.x * RMS_WARP_ROWS + (threadIdx.x >> 5), r0 = v * rowsPerWarp, r1 = min((long)n, r0 + rowsPerWarp);
    if (r0 >= r1) return;   // (the whole warp)
    float4 dw = make_float4(0, 0, 0, 0), wv = rms_lane4(w, 0, c);
    float4 xv = rms_lane4(inp, r0, c), gv = rms_lane4(dout, r0, c);
    for (long row = r0; row < r1; row++) {
        float4 nx = xv, ng = gv;
        if (row + 1 < r1) { nx = rms_lane4(inp, row + 1, c); ng = rms_lane4(dout, row + 1, c); }
        rms_warp_backward_row<true>(row, dinp, xv, gv, wv, rstd, c, accumulate, dinp16, group16, ld16, dw);
        xv = nx; gv = ng;
    }
    int l = threadIdx.x & 31;
    if (l < (c >> 2)) ((float4 *)(partials + v * c))[l] = dw;
}
