// Causal grouped-query attention, flash style (Sources/QATModels/Layers/Attention.swift): no
// [T x T] matrix exists; each block keeps one tile of 32 keys and values in shared memory and an
// online softmax per query row.
//
// q: [B, T, H, D]; k, v: [B, T, Hkv, D]; out: [B, T, H, D]; lse (optional): [B, H, T] log-sum-exp
// of each row's scaled scores (for backward). window > 0 masks keys at distance >= window.
// Grid: (ceil(T / 16), B*H); block: 128 threads = 4 warps, each warp owns 4 query rows; lane j
// scores key j of the tile, and owns dimensions lane, lane+32, ... of the output. D <= 256.
#define ATT_ROWS 16
#define ATT_KEYS 32
#define ATT_MAXD 256

extern "C" __global__ void attention_forward(float *out, float *lse, const float *q, const float *k, const float *v,
                                             int B, int T, int H, int Hkv, int D, int window, float scale) {
    extern __shared__ float sm[];
    int ks = D + 1;                       // padded key rows: lanes read different banks
    float *Ks = sm;                       // [ATT_KEYS][D+1]
    float *Vs = Ks + ATT_KEYS * ks;       // [ATT_KEYS][D]
    float *Qs = Vs + ATT_KEYS * D;        // [ATT_ROWS][D]
    int bh = blockIdx.y, b = bh / H, h = bh - b * H, g = h / (H / Hkv);
    int r0 = blockIdx.x * ATT_ROWS;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    long qStride = (long)H * D, kStride = (long)Hkv * D;
    const float *qb = q + (long)b * T * qStride + (long)h * D;
    const float *kb = k + (long)b * T * kStride + (long)g * D;
    const float *vb = v + (long)b * T * kStride + (long)g * D;
    for (int i = threadIdx.x; i < ATT_ROWS * D; i += blockDim.x) {
        int r = i / D, d = i - r * D;
        Qs[i] = r0 + r < T ? qb[(long)(r0 + r) * qStride + d] : 0.0f;
    }
    const int per = ATT_MAXD / 32;
    float acc[4][per];
    float m[4], l[4];
#pragma unroll
    for (int rr = 0; rr < 4; rr++) {
        m[rr] = -INFINITY; l[rr] = 0;
#pragma unroll
        for (int e = 0; e < per; e++) acc[rr][e] = 0;
    }
    int rLast = min(T - 1, r0 + ATT_ROWS - 1);
    int kFirst = window > 0 ? max(0, r0 - window + 1) : 0;
    kFirst = (kFirst / ATT_KEYS) * ATT_KEYS;
    for (int t0 = kFirst; t0 <= rLast; t0 += ATT_KEYS) {
        __syncthreads();
        for (int i = threadIdx.x; i < ATT_KEYS * D; i += blockDim.x) {
            int j = i / D, d = i - j * D;
            bool ok = t0 + j < T;
            Ks[j * ks + d] = ok ? kb[(long)(t0 + j) * kStride + d] : 0.0f;
            Vs[j * D + d] = ok ? vb[(long)(t0 + j) * kStride + d] : 0.0f;
        }
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < 4; rr++) {
            int rl = warp * 4 + rr, row = r0 + rl;
            if (row >= T || t0 > row) continue;
            int key = t0 + lane;
            bool valid = key <= row && (window <= 0 || row - key < window);
            float s = -INFINITY;
            if (valid) {
                const float *qr = Qs + rl * D, *kr = Ks + lane * ks;
                float dot = 0;
                for (int d = 0; d < D; d++) dot = __fadd_rn(dot, __fmul_rn(qr[d], kr[d]));
                s = __fmul_rn(dot, scale);
            }
            float tmax = warp_max(s);
            if (tmax == -INFINITY) continue;      // the whole tile is masked for this row
            float mNew = fmaxf(m[rr], tmax);
            float p = valid ? expf(s - mNew) : 0.0f;
            float corr = expf(m[rr] - mNew);
            l[rr] = l[rr] * corr + warp_sum(p);
            m[rr] = mNew;
#pragma unroll
            for (int e = 0; e < per; e++) acc[rr][e] *= corr;
            for (int j = 0; j < ATT_KEYS; j++) {
                float pj = __shfl_sync(0xffffffffu, p, j);
                if (pj == 0.0f) continue;
                const float *vr = Vs + j * D;
#pragma unroll
                for (int e = 0; e < per; e++) {
                    int d = lane + 32 * e;
                    if (d < D) acc[rr][e] += pj * vr[d];
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < 4; rr++) {
        int row = r0 + warp * 4 + rr;
        if (row >= T) continue;
        float inv = 1.0f / l[rr];
        float *o = out + (long)b * T * qStride + (long)row * qStride + (long)h * D;
#pragma unroll
        for (int e = 0; e < per; e++) {
            int d = lane + 32 * e;
            if (d < D) o[d] = acc[rr][e] * inv;
        }
        if (lse && lane == 0) lse[((long)b * H + h) * T + row] = m[rr] + logf(l[rr]);
    }
}

// ---------------------------------------------------------------------------------------------
// bf16 precision: the same attention on the tensor cores (mma.sync m16n8k16, bf16 inputs, fp32
// accumulation), FlashAttention-2 style. K and V are read as bf16 copies (attention_to_bf16, one
// pass per tensor), copied global → shared with cp.async straight into padded rows of D+8 (the
// 16-byte rows of an 8×8 ldmatrix read hit distinct banks: the row stride is 4 banks mod 32); Q,
// read by one block only, is converted from fp32 as it is loaded.
// A block of 4 warps owns 128 query rows: each warp 32 rows as two m16 tiles, so that every K and V
// fragment read from shared memory feeds two mma (half the ldmatrix traffic of 16-row warps).
// Key and value tiles of 64 rows are double-buffered: tile j+1 is in flight while tile j is
// computed, one __syncthreads per tile. Exponentials use ex2.approx (fast_exp2). K fragments come from ldmatrix.x4,
// V fragments from ldmatrix.x4.trans, Q fragments from registers (D=64) or ldmatrix.x4 per tile
// (D=128: the 2×64 fp32 accumulators of O leave no room); scores, the online softmax and the
// output stay in registers. Grid: (B*H, ceil(T / 128)), the query tile reversed so that the
// longest rows (causal) of every head start first.
// D is a template parameter (64 or 128); other head sizes use the fp32 kernel above.
// Shared memory: Q [128][D+8] and two stages of K, V [64][D+8] bf16.
#define FA_BQ 128
#define FA_BK 64

__device__ __forceinline__ void mma_bf16(float *c, const u32 *a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
// Two floats as bf16 (round to nearest even) in one word, lo in the low half: one cvt instruction
// (f32_to_bf16's rounding, bit for bit, for every non-NaN input; a NaN becomes the canonical 0x7fff)
// instead of its integer sequence twice: these packs sit in the kernels' inner loops (P, dS, Q rows).
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    u32 r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}
// Four 8×8 b16 matrices; lanes 8m..8m+7 give the row addresses of matrix m (register m).
__device__ __forceinline__ void ldsm_x4(u32 *r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(u32 *r, u32 addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ u32 smem_addr(const void *p) { return (u32)__cvta_generic_to_shared(p); }
// 2^x on the special-function unit alone (ex2.approx.ftz: about 2 ulp, subnormal results flushed to zero; plenty
// for probabilities rounded to bf16). exp2f adds the instructions of its subnormal range to every score.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool ok) {
    u32 s = (u32)__cvta_generic_to_shared(dst);
    int n = ok ? 16 : 0;   // 0: nothing is read, the 16 bytes are zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async4(void *dst, const void *src, bool ok) {
    u32 s = (u32)__cvta_generic_to_shared(dst);
    int n = ok ? 4 : 0;
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_group 0;\n" ::: "memory"); }

// Starts copying rows first ..< first+ROWS of a [*, stride] bf16 matrix into dst [ROWS][D+8] (zeros
// at and past T), 16 bytes per cp.async, 128 threads. The caller commits, waits and synchronises.
template <int ROWS, int D>
__device__ __forceinline__ void load_tile16(u16 *dst, const u16 *src, long stride, int first, int T) {
    const int C = D / 8, QS = D + 8;
    static_assert(ROWS * C % 128 == 0, "tile size");
#pragma unroll
    for (int u = 0; u < ROWS * C / 128; u++) {
        int i = threadIdx.x + u * 128, r = i / C, c = i - r * C;
        bool ok = first + r < T;
        cp_async16(dst + r * QS + c * 8, ok ? src + (long)(first + r) * stride + c * 8 : src, ok);
    }
}

// Rows first ..< first+ROWS of a [*, stride] fp32 matrix (zeros at and past T) as bf16 rows of D+8 in dst, 128
// threads, four float4 loads in flight per thread: the forward's Q tile, which only its block reads.
template <int ROWS, int D>
__device__ __forceinline__ void load_rows_bf16(u16 *dst, const float *src, long stride, int first, int T) {
    const int D4 = D / 4, QS = D + 8, N = ROWS * D4, PER = 4;
    static_assert(N % (128 * PER) == 0, "tile size");
#pragma unroll
    for (int base = 0; base < N; base += 128 * PER) {
        float4 x[PER];
#pragma unroll
        for (int u = 0; u < PER; u++) {
            int i = base + threadIdx.x + u * 128, r = i / D4, d = (i - r * D4) * 4;
            x[u] = first + r < T ? *(const float4 *)(src + (long)(first + r) * stride + d) : make_float4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < PER; u++) {
            int i = base + threadIdx.x + u * 128, r = i / D4, d = (i - r * D4) * 4;
            *(uint2 *)&dst[r * QS + d] = make_uint2(pack_bf16(x[u].x, x[u].y), pack_bf16(x[u].z, x[u].w));
        }
    }
}

// bf16 copy (round to nearest even) of n4 float4s: the inputs of the tensor-core attention kernels.
extern "C" __global__ void attention_to_bf16(u16 *out, const float *x, long n4) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n4; i += (long)gridDim.x * blockDim.x) {
        float4 f = ((const float4 *)x)[i];
        ((uint2 *)out)[i] = make_uint2(pack_bf16(f.x, f.y), pack_bf16(f.z, f.w));
    }
}

template <int D>
__device__ void flash_forward_bf16(float *out, float *lse, const float *q, const u16 *k, const u16 *v, int T, int H, int Hkv,
                                   int window, float scale) {
    extern __shared__ u16 fsm[];
    const int QS = D + 8, BK = FA_BK, TILE = BK * QS, MT = FA_BQ / 64;   // MT m16 tiles (16 rows each) per warp
    // Q fragments stay in registers for D=64; for D=128 (128 accumulators of O) they are re-read from shared memory.
    constexpr bool qInRegs = D == 64;
    u16 *Qs = fsm, *KV = Qs + FA_BQ * QS;   // stage s: K at KV + 2s·TILE, V after it
    int bh = blockIdx.x, b = bh / H, h = bh - b * H, g = h / (H / Hkv);
    int r0 = (gridDim.y - 1 - blockIdx.y) * FA_BQ;   // the longest rows first
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
    long qStride = (long)H * D, kStride = (long)Hkv * D;
    const float *qb = q + (long)b * T * qStride + (long)h * D;
    const u16 *kb = k + (long)b * T * kStride + (long)g * D;
    const u16 *vb = v + (long)b * T * kStride + (long)g * D;
    int rLast = min(T - 1, r0 + FA_BQ - 1);
    int kFirst = window > 0 ? max(0, r0 - window + 1) : 0;
    kFirst = (kFirst / BK) * BK;
    int tiles = (rLast - kFirst) / BK + 1;
    load_tile16<BK, D>(KV, kb, kStride, kFirst, T);   // the first key tile, in flight during the Q load
    load_tile16<BK, D>(KV + TILE, vb, kStride, kFirst, T);
    cp_async_commit();
    load_rows_bf16<FA_BQ, D>(Qs, qb, qStride, r0, T);   // fp32 q read once, by this block alone: no bf16 copy
    int wr = warp * 16 * MT;
    // A fragments of Q: lanes 0-15 address rows wr+16·mt+0..15 at column 16·ks, lanes 16-31 the same rows at 16·ks+8.
    const u32 qAddr = smem_addr(&Qs[(wr + (lane & 15)) * QS + (lane >> 4) * 8]);
    u32 qf[MT][D / 16][4];   // used when qInRegs
    // Per-lane offsets (bytes) of the ldmatrix reads in a stage: K (keys n·8.., two key groups per x4) and V (.trans).
    const u32 kOff = (((lane >> 4) * 8 + (lane & 7)) * QS + ((lane >> 3) & 1) * 8) * 2;
    const u32 vOff = ((lane & 15) * QS + (lane >> 4) * 8) * 2;
    const u32 base = smem_addr(KV);
    float o[MT][D / 8][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int i = 0; i < D / 8; i++) o[mt][i][0] = o[mt][i][1] = o[mt][i][2] = o[mt][i][3] = 0;
    // Row state of rows r0 + wr + 16·mt + gq (index 2·mt) and + 8 (2·mt + 1).
    float m[2 * MT], l[2 * MT];
#pragma unroll
    for (int i = 0; i < 2 * MT; i++) { m[i] = -INFINITY; l[i] = 0; }
    const float sl2 = scale * 1.4426950408889634f;
    int wFirst = r0 + wr, wLast = min(T - 1, wFirst + 16 * MT - 1);
    for (int j = 0; j < tiles; j++) {
        int t0 = kFirst + j * BK;
        cp_async_wait_all();
        __syncthreads();   // tile j (and Q) landed for every thread; every warp is done with tile j-1
        if (j + 1 < tiles) {
            u16 *next = KV + ((j + 1) & 1) * 2 * TILE;
            load_tile16<BK, D>(next, kb, kStride, t0 + BK, T);
            load_tile16<BK, D>(next + TILE, vb, kStride, t0 + BK, T);
            cp_async_commit();
        }
        if constexpr (qInRegs) if (j == 0) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int ks = 0; ks < D / 16; ks++) ldsm_x4(qf[mt][ks], qAddr + (mt * 16 * QS + ks * 16) * 2);
        }
        if (wFirst >= T || t0 > wLast) continue;
        if (window > 0 && t0 + BK - 1 < wFirst - window + 1) continue;
        const u32 ks0 = base + (j & 1) * 2 * TILE * 2, vs0 = ks0 + TILE * 2;
        float s[MT][BK / 8][4];
#pragma unroll
        for (int mt = 0; mt < MT; mt++)
#pragma unroll
            for (int n = 0; n < BK / 8; n++) s[mt][n][0] = s[mt][n][1] = s[mt][n][2] = s[mt][n][3] = 0;
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++) {
            u32 qa[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                if constexpr (qInRegs) {
#pragma unroll
                    for (int e = 0; e < 4; e++) qa[mt][e] = qf[mt][ks][e];
                } else {
                    ldsm_x4(qa[mt], qAddr + (mt * 16 * QS + ks * 16) * 2);
                }
            }
#pragma unroll
            for (int n = 0; n < BK / 8; n += 2) {
                u32 bb[4];
                ldsm_x4(bb, ks0 + kOff + (n * 8 * QS + ks * 16) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_bf16(s[mt][n], qa[mt], bb[0], bb[1]);
                    mma_bf16(s[mt][n + 1], qa[mt], bb[2], bb[3]);
                }
            }
        }
        bool needMask = t0 + BK - 1 > wFirst || window > 0 || t0 + BK > T;
#pragma unroll
        for (int mt = 0; mt < MT; mt++) {
            int row0 = r0 + wr + mt * 16 + gq, row1 = row0 + 8;
            float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
            for (int n = 0; n < BK / 8; n++) {
#pragma unroll
                for (int e = 0; e < 4; e++) {
                    int key = t0 + n * 8 + 2 * tq + (e & 1), row = e < 2 ? row0 : row1;
                    if (needMask && (key > row || key >= T || (window > 0 && row - key >= window))) s[mt][n][e] = -INFINITY;
                }
                mx0 = fmaxf(mx0, fmaxf(s[mt][n][0], s[mt][n][1]));
                mx1 = fmaxf(mx1, fmaxf(s[mt][n][2], s[mt][n][3]));
            }
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
            mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
            mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
            // Scores in log2 units: s·scale·log2(e) (the scale is positive, so the max of the raw scores gives theirs).
            float mn0 = fmaxf(m[2 * mt], mx0 * sl2), mn1 = fmaxf(m[2 * mt + 1], mx1 * sl2);
            float base0 = mn0 == -INFINITY ? 0.0f : mn0, base1 = mn1 == -INFINITY ? 0.0f : mn1;
            float c0 = fast_exp2(m[2 * mt] - base0), c1 = fast_exp2(m[2 * mt + 1] - base1);
            float rs0 = 0, rs1 = 0;
#pragma unroll
            for (int n = 0; n < BK / 8; n++) {
                s[mt][n][0] = fast_exp2(__fmaf_rn(s[mt][n][0], sl2, -base0));
                s[mt][n][1] = fast_exp2(__fmaf_rn(s[mt][n][1], sl2, -base0));
                s[mt][n][2] = fast_exp2(__fmaf_rn(s[mt][n][2], sl2, -base1));
                s[mt][n][3] = fast_exp2(__fmaf_rn(s[mt][n][3], sl2, -base1));
                rs0 += s[mt][n][0] + s[mt][n][1];
                rs1 += s[mt][n][2] + s[mt][n][3];
            }
            rs0 += __shfl_xor_sync(0xffffffffu, rs0, 1);
            rs0 += __shfl_xor_sync(0xffffffffu, rs0, 2);
            rs1 += __shfl_xor_sync(0xffffffffu, rs1, 1);
            rs1 += __shfl_xor_sync(0xffffffffu, rs1, 2);
            l[2 * mt] = l[2 * mt] * c0 + rs0; l[2 * mt + 1] = l[2 * mt + 1] * c1 + rs1;
            m[2 * mt] = mn0; m[2 * mt + 1] = mn1;
#pragma unroll
            for (int i = 0; i < D / 8; i++) { o[mt][i][0] *= c0; o[mt][i][1] *= c0; o[mt][i][2] *= c1; o[mt][i][3] *= c1; }
        }
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            u32 a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                a[mt][0] = pack_bf16(s[mt][2 * kk][0], s[mt][2 * kk][1]);
                a[mt][1] = pack_bf16(s[mt][2 * kk][2], s[mt][2 * kk][3]);
                a[mt][2] = pack_bf16(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
                a[mt][3] = pack_bf16(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
            }
            // B fragments of V (keys × dims) from its row-major tile: lanes 0-15 address the 16 key rows of this
            // step at dims dn·8, lanes 16-31 the same rows at (dn+1)·8; each feeds the warp's MT row tiles.
#pragma unroll
            for (int dn = 0; dn < D / 8; dn += 2) {
                u32 bb[4];
                ldsm_x4_trans(bb, vs0 + vOff + (kk * 16 * QS + dn * 8) * 2);
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    mma_bf16(o[mt][dn], a[mt], bb[0], bb[1]);
                    mma_bf16(o[mt][dn + 1], a[mt], bb[2], bb[3]);
                }
            }
        }
    }
    float *ob = out + (long)b * T * qStride + (long)h * D;
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
        int row0 = r0 + wr + mt * 16 + gq, row1 = row0 + 8;
        float l0 = l[2 * mt], l1 = l[2 * mt + 1];
        float inv0 = l0 > 0 ? 1.0f / l0 : 0.0f, inv1 = l1 > 0 ? 1.0f / l1 : 0.0f;
#pragma unroll
        for (int dn = 0; dn < D / 8; dn++) {
            int d = dn * 8 + 2 * tq;
            if (row0 < T) *(float2 *)(ob + (long)row0 * qStride + d) = make_float2(o[mt][dn][0] * inv0, o[mt][dn][1] * inv0);
            if (row1 < T) *(float2 *)(ob + (long)row1 * qStride + d) = make_float2(o[mt][dn][2] * inv1, o[mt][dn][3] * inv1);
        }
        if (lse && tq == 0) {
            const float ln2 = 0.6931471805599453f;
            if (row0 < T) lse[((long)b * H + h) * T + row0] = (m[2 * mt] + log2f(l0)) * ln2;
            if (row1 < T) lse[((long)b * H + h) * T + row1] = (m[2 * mt + 1] + log2f(l1)) * ln2;
        }
    }
}

// q: [B, T, H, D] fp32; k16, v16: [B, T, Hkv, D] bf16 (attention_to_bf16 of k, v); out, lse as above.
// Grid (B*H, ceil(T / 128)), 128 threads, shared (128 + 4·64)·(D+8)·2 bytes, two blocks per multiprocessor.
// Launch bounds of the backward kernels as measured on an H200 (nvcc 13.0, ptxas -v): three blocks per
// multiprocessor (≤ 168 registers) made the D=128 dK/dV and the D=64 dQ kernels faster (the D=128 one spills a
// few bytes), the D=128 dQ and D=64 dK/dV kernels slower.
extern "C" __global__ void __launch_bounds__(128, 2) attention_forward_bf16_d64(
    float *out, float *lse, const float *q, const u16 *k16, const u16 *v16, int T, int H, int Hkv, int window, float scale) {
    flash_forward_bf16<64>(out, lse, q, k16, v16, T, H, Hkv, window, scale);
}
extern "C" __global__ void __launch_bounds__(128, 2) attention_forward_bf16_d128(
    float *out, float *lse, const float *q, const u16 *k16, const u16 *v16, int T, int H, int Hkv, int window, float scale) {
    flash_forward_bf16<128>(out, lse, q, k16, v16, T, H, Hkv, window, scale);
}

// =============================================================================================
// Backward (Attention.backward of Sources/QATModels/Layers/Attention.swift), FlashAttention-2
// style: P = exp(scale·QKᵀ − lse) is recomputed per tile from the forward's lse (natural-log
// log-sum-exp of each row's scaled scores, [B, H, T]); delta = rowsum(dO ∘ O) ([B, H, T]);
// dS = P ∘ (dP − delta) with dP = dO Vᵀ; dV = Pᵀ dO, dK = scale · dSᵀ Q, dQ = scale · dS K.
// Deterministic: no atomics. dK and dV come from one kernel per (batch, kv head, key tile) that
// loops over the group's query heads and the query tiles in a fixed order; dQ from another per
// (batch, head, query tile) that loops over the key tiles. Masked and out-of-range entries give
// exactly P = dS = 0.

// delta[b, h, t] = Σ_d dout[b, t, h, d] · out[b, t, h, d]: a warp per (b, t, h) row, fp32; lane l adds
// d = l, l+32, … in order, then warp_sum. dout16 (when not null): dout's bf16 copy too (the tensor-core
// kernels' input), from the same read. DN > 0: D = 32·DN, every load of the row issued before the first add
// (the same order of operations, so the same bits).
template <int DN> __device__ __forceinline__ float delta_lane(const float *o, const float *g, u16 *g16, int D, int lane) {
    float s = 0;
    if constexpr (DN > 0) {
        float gv[DN], ov[DN];
#pragma unroll
        for (int i = 0; i < DN; i++) gv[i] = g[lane + 32 * i], ov[i] = o[lane + 32 * i];
#pragma unroll
        for (int i = 0; i < DN; i++) {
            s = __fadd_rn(s, __fmul_rn(ov[i], gv[i]));
            if (g16) g16[lane + 32 * i] = f32_to_bf16(gv[i]);
        }
    } else {
        for (int d = lane; d < D; d += 32) {
            float gd = g[d];
            s = __fadd_rn(s, __fmul_rn(o[d], gd));
            if (g16) g16[d] = f32_to_bf16(gd);
        }
    }
    return s;
}

extern "C" __global__ void attention_backward_delta(float *delta, const float *dout, const float *out, int B, int T, int H, int D,
                                                    u16 *dout16) {
    long rows = (long)B * T * H;
    long row = (long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float *o = out + row * D, *g = dout + row * D;
    u16 *g16 = dout16 ? dout16 + row * D : nullptr;
    float s = D == 64    ? delta_lane<2>(o, g, g16, D, lane)
              : D == 128 ? delta_lane<4>(o, g, g16, D, lane)
                         : delta_lane<0>(o, g, g16, D, lane);
    s = warp_sum(s);
    long b = row / ((long)T * H), rest = row - b * T * H;
    int t = (int)(rest / H), h = (int)(rest - (long)t * H);
    if (lane == 0) delta[((long)b * H + h) * T + t] = s;
}

// ---------------------------------------------------------------------------------------------
// fp32 path (fp32 products, __f*_rn as the forward). Blocks of 256 threads = 8 warps. A tile
// step pairs 16 query rows with 32 keys: warp w scores rows 2w and 2w+1, lane j key j, into
// P and dS tiles in shared memory; then the products read them. Shared memory (floats):
// K, V [32][D+1] (padded), Q, dO [16][D], P, dS [16][33], lse, delta [16]. D <= 256.
#define ATB_ROWS 16
#define ATB_KEYS 32

__device__ __forceinline__ void att_bwd_scores_f32(float *Ps, float *dSs, const float *Qs, const float *Gs, const float *Ks,
                                                   const float *Vs, const float *Ls, const float *Dl, int r0, int t0, int T, int D,
                                                   int window, float scale) {
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, ks = D + 1;
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        int rl = warp * 2 + rr, row = r0 + rl, key = t0 + lane;
        bool valid = row < T && key < T && key <= row && (window <= 0 || row - key < window);
        float p = 0.0f, ds = 0.0f;
        if (valid) {
            const float *qr = Qs + rl * D, *gr = Gs + rl * D, *kr = Ks + lane * ks, *vr = Vs + lane * ks;
            float dot = 0, dp = 0;
            for (int d = 0; d < D; d++) {
                dot = __fadd_rn(dot, __fmul_rn(qr[d], kr[d]));
                dp = __fadd_rn(dp, __fmul_rn(gr[d], vr[d]));
            }
            p = expf(__fsub_rn(__fmul_rn(dot, scale), Ls[rl]));
            ds = __fmul_rn(p, __fsub_rn(dp, Dl[rl]));
        }
        Ps[rl * (ATB_KEYS + 1) + lane] = p;
        dSs[rl * (ATB_KEYS + 1) + lane] = ds;
    }
}

// Rows r0 ..< r0+16 of q and dout (zeros past T) into Qs, Gs; their lse and delta into Ls, Dl.
__device__ __forceinline__ void att_bwd_rows_f32(float *Qs, float *Gs, float *Ls, float *Dl, const float *qb, const float *gb,
                                                 const float *lrow, const float *drow, long qStride, int r0, int T, int D) {
    for (int i = threadIdx.x; i < ATB_ROWS * D; i += blockDim.x) {
        int r = i / D, d = i - r * D;
        bool ok = r0 + r < T;
        Qs[i] = ok ? qb[(long)(r0 + r) * qStride + d] : 0.0f;
        Gs[i] = ok ? gb[(long)(r0 + r) * qStride + d] : 0.0f;
    }
    if (threadIdx.x < ATB_ROWS) {
        int row = r0 + threadIdx.x;
        Ls[threadIdx.x] = row < T ? lrow[row] : 0.0f;
        Dl[threadIdx.x] = row < T ? drow[row] : 0.0f;
    }
}

// Keys t0 ..< t0+32 of k and v (zeros past T) into Ks, Vs (rows padded to D+1).
__device__ __forceinline__ void att_bwd_keys_f32(float *Ks, float *Vs, const float *kb, const float *vb, long kStride, int t0, int T,
                                                 int D) {
    int ks = D + 1;
    for (int i = threadIdx.x; i < ATB_KEYS * D; i += blockDim.x) {
        int j = i / D, d = i - j * D;
        bool ok = t0 + j < T;
        Ks[j * ks + d] = ok ? kb[(long)(t0 + j) * kStride + d] : 0.0f;
        Vs[j * ks + d] = ok ? vb[(long)(t0 + j) * kStride + d] : 0.0f;
    }
}

// dK, dV of keys k0 ..< k0+32 of kv head g. Grid: (ceil(T / 32), B*Hkv); warp w accumulates
// keys 4w ..< 4w+4, lane the dimensions lane, lane+32, ...
extern "C" __global__ void __launch_bounds__(256) attention_backward_dkdv(float *dk, float *dv, const float *dout, const float *lse,
                                                                          const float *delta, const float *q, const float *k,
                                                                          const float *v, int B, int T, int H, int Hkv, int D,
                                                                          int window, float scale) {
    extern __shared__ float bsm32[];
    int ks = D + 1;
    float *Ks = bsm32, *Vs = Ks + ATB_KEYS * ks, *Qs = Vs + ATB_KEYS * ks, *Gs = Qs + ATB_ROWS * D;
    float *Ps = Gs + ATB_ROWS * D, *dSs = Ps + ATB_ROWS * (ATB_KEYS + 1), *Ls = dSs + ATB_ROWS * (ATB_KEYS + 1), *Dl = Ls + ATB_ROWS;
    int bg = blockIdx.y, b = bg / Hkv, g = bg - b * Hkv, group = H / Hkv;
    int k0 = blockIdx.x * ATB_KEYS;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    long qStride = (long)H * D, kStride = (long)Hkv * D;
    att_bwd_keys_f32(Ks, Vs, k + (long)b * T * kStride + (long)g * D, v + (long)b * T * kStride + (long)g * D, kStride, k0, T, D);
    const int per = ATT_MAXD / 32;
    float adk[4][per], adv[4][per];
#pragma unroll
    for (int kk = 0; kk < 4; kk++)
#pragma unroll
        for (int e = 0; e < per; e++) adk[kk][e] = adv[kk][e] = 0;
    // Rows that see a key of this tile: k0 ..< T, and with a window below k0 + 31 + window.
    int rEnd = window > 0 ? min(T, k0 + ATB_KEYS - 1 + window) : T;
    for (int hh = 0; hh < group; hh++) {
        int h = g * group + hh;
        long qo = (long)b * T * qStride + (long)h * D;
        const float *lrow = lse + ((long)b * H + h) * T, *drow = delta + ((long)b * H + h) * T;
        for (int r0 = k0; r0 < rEnd; r0 += ATB_ROWS) {
            __syncthreads();
            att_bwd_rows_f32(Qs, Gs, Ls, Dl, q + qo, dout + qo, lrow, drow, qStride, r0, T, D);
            __syncthreads();
            att_bwd_scores_f32(Ps, dSs, Qs, Gs, Ks, Vs, Ls, Dl, r0, k0, T, D, window, scale);
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < 4; kk++) {
                int kl = warp * 4 + kk;
                for (int r = 0; r < ATB_ROWS; r++) {
                    float p = Ps[r * (ATB_KEYS + 1) + kl], ds = dSs[r * (ATB_KEYS + 1) + kl];
                    const float *gr = Gs + r * D, *qr = Qs + r * D;
#pragma unroll
                    for (int e = 0; e < per; e++) {
                        int d = lane + 32 * e;
                        if (d < D) {
                            adv[kk][e] = __fadd_rn(adv[kk][e], __fmul_rn(p, gr[d]));
                            adk[kk][e] = __fadd_rn(adk[kk][e], __fmul_rn(ds, qr[d]));
                        }
                    }
                }
            }
        }
    }
#pragma unroll
    for (int kk = 0; kk < 4; kk++) {
        int key = k0 + warp * 4 + kk;
        if (key >= T) continue;
        long o = (long)b * T * kStride + (long)key * kStride + (long)g * D;
#pragma unroll
        for (int e = 0; e < per; e++) {
            int d = lane + 32 * e;
            if (d < D) {
                dk[o + d] = __fmul_rn(adk[kk][e], scale);
                dv[o + d] = adv[kk][e];
            }
        }
    }
}

// dQ of rows r0 ..< r0+16 of head h. Grid: (ceil(T / 16), B*H); warp w accumulates rows 2w and
// 2w+1, lane the dimensions lane, lane+32, ... Same shared memory layout as dkdv.
extern "C" __global__ void __launch_bounds__(256) attention_backward_dq(float *dq, const float *dout, const float *lse,
                                                                        const float *delta, const float *q, const float *k, const float *v,
                                                                        int B, int T, int H, int Hkv, int D, int window, float scale) {
    extern __shared__ float bsm32[];
    int ks = D + 1;
    float *Ks = bsm32, *Vs = Ks + ATB_KEYS * ks, *Qs = Vs + ATB_KEYS * ks, *Gs = Qs + ATB_ROWS * D;
    float *Ps = Gs + ATB_ROWS * D, *dSs = Ps + ATB_ROWS * (ATB_KEYS + 1), *Ls = dSs + ATB_ROWS * (ATB_KEYS + 1), *Dl = Ls + ATB_ROWS;
    int bh = blockIdx.y, b = bh / H, h = bh - b * H, g = h / (H / Hkv);
    int r0 = (gridDim.x - 1 - blockIdx.x) * ATB_ROWS;   // the longest rows first
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    long qStride = (long)H * D, kStride = (long)Hkv * D;
    long qo = (long)b * T * qStride + (long)h * D;
    const float *kb = k + (long)b * T * kStride + (long)g * D, *vb = v + (long)b * T * kStride + (long)g * D;
    att_bwd_rows_f32(Qs, Gs, Ls, Dl, q + qo, dout + qo, lse + ((long)b * H + h) * T, delta + ((long)b * H + h) * T, qStride, r0, T, D);
    const int per = ATT_MAXD / 32;
    float adq[2][per];
#pragma unroll
    for (int rr = 0; rr < 2; rr++)
#pragma unroll
        for (int e = 0; e < per; e++) adq[rr][e] = 0;
    int rLast = min(T - 1, r0 + ATB_ROWS - 1);
    int kFirst = window > 0 ? max(0, r0 - window + 1) : 0;
    kFirst = (kFirst / ATB_KEYS) * ATB_KEYS;
    for (int t0 = kFirst; t0 <= rLast; t0 += ATB_KEYS) {
        __syncthreads();
        att_bwd_keys_f32(Ks, Vs, kb, vb, kStride, t0, T, D);
        __syncthreads();
        att_bwd_scores_f32(Ps, dSs, Qs, Gs, Ks, Vs, Ls, Dl, r0, t0, T, D, window, scale);
        __syncthreads();
#pragma unroll
        for (int rr = 0; rr < 2; rr++) {
            int rl = warp * 2 + rr;
            for (int j = 0; j < ATB_KEYS; j++) {
                float ds = dSs[rl * (ATB_KEYS + 1) + j];
                const float *kr = Ks + j * ks;
#pragma unroll
                for (int e = 0; e < per; e++) {
                    int d = lane + 32 * e;
                    if (d < D) adq[rr][e] = __fadd_rn(adq[rr][e], __fmul_rn(ds, kr[d]));
                }
            }
        }
    }
#pragma unroll
    for (int rr = 0; rr < 2; rr++) {
        int row = r0 + warp * 2 + rr;
        if (row >= T) continue;
        float *o = dq + qo + (long)row * qStride;
#pragma unroll
        for (int e = 0; e < per; e++) {
            int d = lane + 32 * e;
            if (d < D) o[d] = __fmul_rn(adq[rr][e], scale);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// bf16 path: tensor cores (mma.sync m16n8k16, bf16 products, fp32 accumulation), blocks of 128
// threads = 4 warps. The inputs q, k, v, dO are bf16 copies (attention_to_bf16), copied into
// shared memory with cp.async (rows padded to D+8, as in the forward), the next tile's rows in
// flight while the current one is computed (two stages, one __syncthreads per step); fragments
// through ldmatrix.x4 (.trans where the tile is the k × n operand).

// dK, dV of keys k0 ..< k0+64 of kv head g: warp w owns keys k0+16w ..< k0+16w+16 and computes
// Sᵀ = K Qᵀ and dPᵀ = V dOᵀ for query tiles of BQ rows (K, V as A fragments, Q and dO rows as B
// fragments), then dV += Pᵀ dO and dK += dSᵀ Q (Pᵀ, dSᵀ as A fragments straight from the
// accumulators, dO and Q through ldmatrix.trans). Grid: (B*Hkv, ceil(T / 64)); the first key
// tiles (the most causal rows) start first. The (query head, query tile) steps run in a fixed order.
// Shared memory: K, V [64][D+8] bf16; two stages of Q, dO [BQ][D+8] bf16 and lse, delta [BQ] fp32.
template <int D, int BQ>
__device__ void flash_backward_dkdv_bf16(float *dk, float *dv, const u16 *dout, const float *lse, const float *delta, const u16 *q,
                                         const u16 *k, const u16 *v, int T, int H, int Hkv, int window, float scale) {
    extern __shared__ u16 bsm16[];
    const int QS = D + 8, QT = BQ * QS;
    u16 *Ks = bsm16, *Vs = Ks + 64 * QS, *St = Vs + 64 * QS;   // stage s: Q at St + 2s·QT, dO after it
    float *LD = (float *)(St + 4 * QT);                          // stage s: lse at LD + 2s·BQ, delta after it
    int bg = blockIdx.x, b = bg / Hkv, g = bg - b * Hkv, group = H / Hkv;
    int k0 = blockIdx.y * 64;   // the first key tiles (most rows) first
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
    long qStride = (long)H * D, kStride = (long)Hkv * D;
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) dka[i][0] = dka[i][1] = dka[i][2] = dka[i][3] = dva[i][0] = dva[i][1] = dva[i][2] = dva[i][3] = 0;
    int wk = warp * 16, key0 = k0 + wk + gq, key1 = key0 + 8;
    int wKeyFirst = k0 + wk, wKeyLast = wKeyFirst + 15;
    int rEnd = window > 0 ? min(T, k0 + 63 + window) : T;   // rows that see a key of this tile
    const float sl2 = scale * 1.4426950408889634f, log2e = 1.4426950408889634f;
    // Step i: query head g*group + i / tiles, rows k0 + (i % tiles)·BQ ..< +BQ (rEnd > k0: tiles >= 1).
    int tiles = (rEnd - k0 + BQ - 1) / BQ, steps = group * tiles;
    auto stage = [&](int i) {
        int hs = g * group + i / tiles, rs = k0 + (i % tiles) * BQ, s = i & 1;
        long qo = (long)b * T * qStride + (long)hs * D, lo = ((long)b * H + hs) * T;
        load_tile16<BQ, D>(St + 2 * s * QT, q + qo, qStride, rs, T);
        load_tile16<BQ, D>(St + (2 * s + 1) * QT, dout + qo, qStride, rs, T);
        if (tid < BQ) {
            bool ok = rs + tid < T;
            cp_async4(LD + 2 * s * BQ + tid, lse + lo + (ok ? rs + tid : 0), ok);
            cp_async4(LD + (2 * s + 1) * BQ + tid, delta + lo + (ok ? rs + tid : 0), ok);
        }
    };
    load_tile16<64, D>(Ks, k + (long)b * T * kStride + (long)g * D, kStride, k0, T);
    load_tile16<64, D>(Vs, v + (long)b * T * kStride + (long)g * D, kStride, k0, T);
    stage(0);
    cp_async_commit();
    // A fragments of K and V (rows wk+0..15; lanes 16-31 at column +8), B fragments of Q and dO rows (two query
    // groups per x4), .trans B fragments of dO and Q (lanes 0-15: the 16 rows of a step, lanes 16-31 at dims +8).
    const u32 aOff = ((wk + (lane & 15)) * QS + (lane >> 4) * 8) * 2;
    const u32 bOff = (((lane >> 4) * 8 + (lane & 7)) * QS + ((lane >> 3) & 1) * 8) * 2;
    const u32 tOff = ((lane & 15) * QS + (lane >> 4) * 8) * 2;
    const u32 kAddr = smem_addr(Ks) + aOff, vAddr = smem_addr(Vs) + aOff;
    for (int it = 0; it < steps; it++) {
        cp_async_wait_all();
        __syncthreads();   // step it landed for every thread; every warp is done with step it-1
        if (it + 1 < steps) {
            stage(it + 1);
            cp_async_commit();
        }
        int r0 = k0 + (it % tiles) * BQ, s = it & 1;
        if (wKeyFirst >= T || wKeyFirst > r0 + BQ - 1) continue;   // every row is before the warp's keys
        if (window > 0 && r0 - wKeyLast >= window) continue;      // every row is past the window of its keys
        const u16 *Qs = St + 2 * s * QT;
        const float *Ls = LD + 2 * s * BQ, *Dl = Ls + BQ;
        const u32 qAddr = smem_addr(Qs), gAddr = qAddr + QT * 2;
        float sc[BQ / 8][4], dp[BQ / 8][4];
#pragma unroll
        for (int n = 0; n < BQ / 8; n++) sc[n][0] = sc[n][1] = sc[n][2] = sc[n][3] = dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0;
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++) {
            u32 ka[4], va[4];
            ldsm_x4(ka, kAddr + ks * 32);
            ldsm_x4(va, vAddr + ks * 32);
#pragma unroll
            for (int n = 0; n < BQ / 8; n += 2) {
                u32 bq[4], bg4[4];
                ldsm_x4(bq, qAddr + bOff + (n * 8 * QS + ks * 16) * 2);
                ldsm_x4(bg4, gAddr + bOff + (n * 8 * QS + ks * 16) * 2);
                mma_bf16(sc[n], ka, bq[0], bq[1]);
                mma_bf16(sc[n + 1], ka, bq[2], bq[3]);
                mma_bf16(dp[n], va, bg4[0], bg4[1]);
                mma_bf16(dp[n + 1], va, bg4[2], bg4[3]);
            }
        }
        // Accumulator element e of tile n: key key0 (e < 2) or key1, query row r0 + n*8 + 2*tq + (e & 1).
        bool needMask = r0 < wKeyLast || window > 0 || r0 + BQ > T;
#pragma unroll
        for (int n = 0; n < BQ / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int qi = n * 8 + 2 * tq + (e & 1), row = r0 + qi, key = e < 2 ? key0 : key1;
                bool valid = !needMask || (row < T && key <= row && (window <= 0 || row - key < window));
                float p = valid ? fast_exp2(__fmaf_rn(sc[n][e], sl2, -Ls[qi] * log2e)) : 0.0f;
                sc[n][e] = p;
                dp[n][e] = p * (dp[n][e] - Dl[qi]);
            }
        }
#pragma unroll
        for (int kk = 0; kk < BQ / 16; kk++) {
            u32 pa[4] = {pack_bf16(sc[2 * kk][0], sc[2 * kk][1]), pack_bf16(sc[2 * kk][2], sc[2 * kk][3]),
                         pack_bf16(sc[2 * kk + 1][0], sc[2 * kk + 1][1]), pack_bf16(sc[2 * kk + 1][2], sc[2 * kk + 1][3])};
            u32 da[4] = {pack_bf16(dp[2 * kk][0], dp[2 * kk][1]), pack_bf16(dp[2 * kk][2], dp[2 * kk][3]),
                         pack_bf16(dp[2 * kk + 1][0], dp[2 * kk + 1][1]), pack_bf16(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
            for (int dn = 0; dn < D / 8; dn += 2) {
                u32 bb[4];
                ldsm_x4_trans(bb, gAddr + tOff + (kk * 16 * QS + dn * 8) * 2);
                mma_bf16(dva[dn], pa, bb[0], bb[1]);
                mma_bf16(dva[dn + 1], pa, bb[2], bb[3]);
                ldsm_x4_trans(bb, qAddr + tOff + (kk * 16 * QS + dn * 8) * 2);
                mma_bf16(dka[dn], da, bb[0], bb[1]);
                mma_bf16(dka[dn + 1], da, bb[2], bb[3]);
            }
        }
    }
    float *dkb = dk + (long)b * T * kStride + (long)g * D, *dvb = dv + (long)b * T * kStride + (long)g * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++) {
        int d = dn * 8 + 2 * tq;
        if (key0 < T) {
            *(float2 *)(dkb + (long)key0 * kStride + d) = make_float2(dka[dn][0] * scale, dka[dn][1] * scale);
            *(float2 *)(dvb + (long)key0 * kStride + d) = make_float2(dva[dn][0], dva[dn][1]);
        }
        if (key1 < T) {
            *(float2 *)(dkb + (long)key1 * kStride + d) = make_float2(dka[dn][2] * scale, dka[dn][3] * scale);
            *(float2 *)(dvb + (long)key1 * kStride + d) = make_float2(dva[dn][2], dva[dn][3]);
        }
    }
}

// dQ of rows r0 ..< r0+64 of head h: warp w owns rows r0+16w ..< r0+16w+16 (Q and dO as A
// fragments in registers), computes S = Q Kᵀ and dP = dO Vᵀ for key tiles of BK, then
// dQ += dS K (K through ldmatrix.trans). Grid: (B*H, ceil(T / 64)), the longest rows first.
// Shared memory: Q, dO [64][D+8]; two stages of K, V [BK][D+8] bf16.
template <int D, int BK>
__device__ void flash_backward_dq_bf16(float *dq, const u16 *dout, const float *lse, const float *delta, const u16 *q, const u16 *k,
                                       const u16 *v, int T, int H, int Hkv, int window, float scale) {
    extern __shared__ u16 bsm16[];
    const int QS = D + 8, TILE = BK * QS;
    u16 *Qs = bsm16, *Gs = Qs + 64 * QS, *KV = Gs + 64 * QS;   // stage s: K at KV + 2s·TILE, V after it
    int bh = blockIdx.x, b = bh / H, h = bh - b * H, g = h / (H / Hkv);
    int r0 = (gridDim.y - 1 - blockIdx.y) * 64;   // the longest rows first
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
    long qStride = (long)H * D, kStride = (long)Hkv * D;
    long qo = (long)b * T * qStride + (long)h * D;
    const u16 *kb = k + (long)b * T * kStride + (long)g * D, *vb = v + (long)b * T * kStride + (long)g * D;
    int rLast = min(T - 1, r0 + 63);
    int kFirst = window > 0 ? max(0, r0 - window + 1) : 0;
    kFirst = (kFirst / BK) * BK;
    int tiles = (rLast - kFirst) / BK + 1;
    load_tile16<64, D>(Qs, q + qo, qStride, r0, T);
    load_tile16<64, D>(Gs, dout + qo, qStride, r0, T);
    load_tile16<BK, D>(KV, kb, kStride, kFirst, T);
    load_tile16<BK, D>(KV + TILE, vb, kStride, kFirst, T);
    cp_async_commit();
    int wr = warp * 16;
    int row0 = r0 + wr + gq, row1 = row0 + 8;
    const float *lrow = lse + ((long)b * H + h) * T, *drow = delta + ((long)b * H + h) * T;
    float L0 = row0 < T ? lrow[row0] * 1.4426950408889634f : 0.0f, L1 = row1 < T ? lrow[row1] * 1.4426950408889634f : 0.0f;
    float D0 = row0 < T ? drow[row0] : 0.0f, D1 = row1 < T ? drow[row1] : 0.0f;
    cp_async_wait_all();
    __syncthreads();
    u32 qf[D / 16][4], gf[D / 16][4];
    const u32 aOff = ((wr + (lane & 15)) * QS + (lane >> 4) * 8) * 2;
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++) {
        ldsm_x4(qf[ks], smem_addr(Qs) + aOff + ks * 32);
        ldsm_x4(gf[ks], smem_addr(Gs) + aOff + ks * 32);
    }
    const u32 bOff = (((lane >> 4) * 8 + (lane & 7)) * QS + ((lane >> 3) & 1) * 8) * 2;
    const u32 tOff = ((lane & 15) * QS + (lane >> 4) * 8) * 2;
    const u32 base = smem_addr(KV);
    float dqa[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) dqa[i][0] = dqa[i][1] = dqa[i][2] = dqa[i][3] = 0;
    const float sl2 = scale * 1.4426950408889634f;
    int wFirst = r0 + wr, wLast = min(T - 1, wFirst + 15);
    for (int j = 0; j < tiles; j++) {
        int t0 = kFirst + j * BK;
        cp_async_wait_all();
        __syncthreads();   // tile j landed for every thread; every warp is done with tile j-1
        if (j + 1 < tiles) {
            u16 *next = KV + ((j + 1) & 1) * 2 * TILE;
            load_tile16<BK, D>(next, kb, kStride, t0 + BK, T);
            load_tile16<BK, D>(next + TILE, vb, kStride, t0 + BK, T);
            cp_async_commit();
        }
        if (wFirst >= T || t0 > wLast) continue;                             // every key is after the warp's rows
        if (window > 0 && t0 + BK - 1 < wFirst - window + 1) continue;       // every key is before the warp's windows
        const u32 ka0 = base + (j & 1) * 2 * TILE * 2, va0 = ka0 + TILE * 2;
        float s[BK / 8][4], dp[BK / 8][4];
#pragma unroll
        for (int n = 0; n < BK / 8; n++) s[n][0] = s[n][1] = s[n][2] = s[n][3] = dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0;
#pragma unroll
        for (int ks = 0; ks < D / 16; ks++) {
#pragma unroll
            for (int n = 0; n < BK / 8; n += 2) {
                u32 bk[4], bv[4];
                ldsm_x4(bk, ka0 + bOff + (n * 8 * QS + ks * 16) * 2);
                ldsm_x4(bv, va0 + bOff + (n * 8 * QS + ks * 16) * 2);
                mma_bf16(s[n], qf[ks], bk[0], bk[1]);
                mma_bf16(s[n + 1], qf[ks], bk[2], bk[3]);
                mma_bf16(dp[n], gf[ks], bv[0], bv[1]);
                mma_bf16(dp[n + 1], gf[ks], bv[2], bv[3]);
            }
        }
        // Accumulator element e of tile n: row row0 (e < 2) or row1, key t0 + n*8 + 2*tq + (e & 1).
        bool needMask = t0 + BK - 1 > wFirst || window > 0 || t0 + BK > T || wFirst + 15 >= T;
#pragma unroll
        for (int n = 0; n < BK / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = t0 + n * 8 + 2 * tq + (e & 1), row = e < 2 ? row0 : row1;
                bool valid = !needMask || (row < T && key <= row && (window <= 0 || row - key < window));
                float p = valid ? fast_exp2(__fmaf_rn(s[n][e], sl2, -(e < 2 ? L0 : L1))) : 0.0f;
                s[n][e] = p * (dp[n][e] - (e < 2 ? D0 : D1));
            }
        }
#pragma unroll
        for (int kk = 0; kk < BK / 16; kk++) {
            u32 a[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                        pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
            for (int dn = 0; dn < D / 8; dn += 2) {
                u32 bb[4];
                ldsm_x4_trans(bb, ka0 + tOff + (kk * 16 * QS + dn * 8) * 2);
                mma_bf16(dqa[dn], a, bb[0], bb[1]);
                mma_bf16(dqa[dn + 1], a, bb[2], bb[3]);
            }
        }
    }
    float *ob = dq + qo;
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++) {
        int d = dn * 8 + 2 * tq;
        if (row0 < T) *(float2 *)(ob + (long)row0 * qStride + d) = make_float2(dqa[dn][0] * scale, dqa[dn][1] * scale);
        if (row1 < T) *(float2 *)(ob + (long)row1 * qStride + d) = make_float2(dqa[dn][2] * scale, dqa[dn][3] * scale);
    }
}

// Query tile of the dK/dV kernel and key tile of the dQ kernel: 64 for D=64, 32 for D=128 (two 16×D fp32
// accumulators per warp). Written out, not by a macro: KernelLibrary finds kernels by their declared names.
// q16, dout16: [B, T, H, D], k16, v16: [B, T, Hkv, D] bf16 (attention_to_bf16); lse, delta fp32 [B, H, T].
#define ATT_BWD_DKDV_ARGS float *dk, float *dv, const u16 *dout16, const float *lse, const float *delta, const u16 *q16, \
                          const u16 *k16, const u16 *v16, int T, int H, int Hkv, int window, float scale
#define ATT_BWD_DQ_ARGS float *dq, const u16 *dout16, const float *lse, const float *delta, const u16 *q16, const u16 *k16, \
                        const u16 *v16, int T, int H, int Hkv, int window, float scale
extern "C" __global__ void __launch_bounds__(128) attention_backward_dkdv_bf16_d64(ATT_BWD_DKDV_ARGS) {
    flash_backward_dkdv_bf16<64, 64>(dk, dv, dout16, lse, delta, q16, k16, v16, T, H, Hkv, window, scale);
}
extern "C" __global__ void __launch_bounds__(128, 3) attention_backward_dkdv_bf16_d128(ATT_BWD_DKDV_ARGS) {
    flash_backward_dkdv_bf16<128, 32>(dk, dv, dout16, lse, delta, q16, k16, v16, T, H, Hkv, window, scale);
}
extern "C" __global__ void __launch_bounds__(128, 3) attention_backward_dq_bf16_d64(ATT_BWD_DQ_ARGS) {
    flash_backward_dq_bf16<64, 64>(dq, dout16, lse, delta, q16, k16, v16, T, H, Hkv, window, scale);
}
extern "C" __global__ void __launch_bounds__(128) attention_backward_dq_bf16_d128(ATT_BWD_DQ_ARGS) {
    flash_backward_dq_bf16<128, 32>(dq, dout16, lse, delta, q16, k16, v16, T, H, Hkv, window, scale);
}
