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
// accumulation), FlashAttention-2 style. A block of 4 warps owns 64 query rows (16 per warp); key
// and value tiles of 64 are converted to bf16 into shared memory (V transposed, so that its
// fragments are contiguous pairs); scores, the online softmax and the output stay in registers.
// D is a template parameter (64 or 128); other head sizes use the fp32 kernel above.
#define FA_BQ 64
#define FA_BK 64

__device__ __forceinline__ void mma_bf16(float *c, const u32 *a, u32 b0, u32 b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ u32 pack_bf16(float lo, float hi) {
    return (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);
}

template <int D>
__device__ void flash_forward_bf16(float *out, float *lse, const float *q, const float *k, const float *v, int T, int H, int Hkv,
                                   int window, float scale) {
    extern __shared__ u16 fsm[];
    const int QS = D + 8;   // padded rows: fragment loads hit distinct banks
    u16 *Qs = fsm, *Ks = Qs + FA_BQ * QS, *Vs = Ks + FA_BK * QS;
    int bh = blockIdx.y, b = bh / H, h = bh - b * H, g = h / (H / Hkv);
    int r0 = blockIdx.x * FA_BQ;
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5, gq = lane >> 2, tq = lane & 3;
    long qStride = (long)H * D, kStride = (long)Hkv * D;
    const float *qb = q + (long)b * T * qStride + (long)h * D;
    const float *kb = k + (long)b * T * kStride + (long)g * D;
    const float *vb = v + (long)b * T * kStride + (long)g * D;
    // Tiles move as float4 (D % 4 == 0, rows 16-byte aligned), several loads in flight per thread.
    const int D4 = D / 4, PER = 4, ROUNDS = FA_BK * D4 / (128 * PER);
    for (int i = tid; i < FA_BQ * D4; i += 128) {
        int r = i / D4, d = (i - r * D4) * 4;
        float4 x = r0 + r < T ? *(const float4 *)(qb + (long)(r0 + r) * qStride + d) : make_float4(0, 0, 0, 0);
        *(uint2 *)&Qs[r * QS + d] = make_uint2(pack_bf16(x.x, x.y), pack_bf16(x.z, x.w));
    }
    __syncthreads();
    int wr = warp * 16;
    u32 qf[D / 16][4];
#pragma unroll
    for (int ks = 0; ks < D / 16; ks++) {
        qf[ks][0] = *(const u32 *)&Qs[(wr + gq) * QS + ks * 16 + 2 * tq];
        qf[ks][1] = *(const u32 *)&Qs[(wr + gq + 8) * QS + ks * 16 + 2 * tq];
        qf[ks][2] = *(const u32 *)&Qs[(wr + gq) * QS + ks * 16 + 8 + 2 * tq];
        qf[ks][3] = *(const u32 *)&Qs[(wr + gq + 8) * QS + ks * 16 + 8 + 2 * tq];
    }
    float o[D / 8][4];
#pragma unroll
    for (int i = 0; i < D / 8; i++) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0;
    float m0 = -INFINITY, m1 = -INFINITY, l0 = 0, l1 = 0;
    int row0 = r0 + wr + gq, row1 = row0 + 8;
    int rLast = min(T - 1, r0 + FA_BQ - 1);
    int kFirst = window > 0 ? max(0, r0 - window + 1) : 0;
    kFirst = (kFirst / FA_BK) * FA_BK;
    const float sl2 = scale * 1.4426950408889634f;
    int wFirst = r0 + wr, wLast = min(T - 1, wFirst + 15);
    for (int t0 = kFirst; t0 <= rLast; t0 += FA_BK) {
        __syncthreads();
#pragma unroll
        for (int round = 0; round < ROUNDS; round++) {
            float4 kr[PER], vr[PER];
#pragma unroll
            for (int u = 0; u < PER; u++) {
                int i = tid + (round * PER + u) * 128, j = i / D4, d = (i - j * D4) * 4;
                bool ok = t0 + j < T;
                kr[u] = ok ? *(const float4 *)(kb + (long)(t0 + j) * kStride + d) : make_float4(0, 0, 0, 0);
                vr[u] = ok ? *(const float4 *)(vb + (long)(t0 + j) * kStride + d) : make_float4(0, 0, 0, 0);
            }
#pragma unroll
            for (int u = 0; u < PER; u++) {
                int i = tid + (round * PER + u) * 128, j = i / D4, d = (i - j * D4) * 4;
                *(uint2 *)&Ks[j * QS + d] = make_uint2(pack_bf16(kr[u].x, kr[u].y), pack_bf16(kr[u].z, kr[u].w));
                *(uint2 *)&Vs[j * QS + d] = make_uint2(pack_bf16(vr[u].x, vr[u].y), pack_bf16(vr[u].z, vr[u].w));
            }
        }
        __syncthreads();
        if (wFirst >= T || t0 > wLast) continue;
        if (window > 0 && t0 + FA_BK - 1 < wFirst - window + 1) continue;
        float s[FA_BK / 8][4];
#pragma unroll
        for (int n = 0; n < FA_BK / 8; n++) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0;
#pragma unroll
            for (int ks = 0; ks < D / 16; ks++) {
                u32 b0 = *(const u32 *)&Ks[(n * 8 + gq) * QS + ks * 16 + 2 * tq];
                u32 b1 = *(const u32 *)&Ks[(n * 8 + gq) * QS + ks * 16 + 8 + 2 * tq];
                mma_bf16(s[n], qf[ks], b0, b1);
            }
        }
        bool needMask = t0 + FA_BK - 1 > wFirst || window > 0 || t0 + FA_BK > T;
        float mx0 = -INFINITY, mx1 = -INFINITY;
#pragma unroll
        for (int n = 0; n < FA_BK / 8; n++) {
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = t0 + n * 8 + 2 * tq + (e & 1), row = e < 2 ? row0 : row1;
                float x = s[n][e] * sl2;
                if (needMask && (key > row || key >= T || (window > 0 && row - key >= window))) x = -INFINITY;
                s[n][e] = x;
            }
            mx0 = fmaxf(mx0, fmaxf(s[n][0], s[n][1]));
            mx1 = fmaxf(mx1, fmaxf(s[n][2], s[n][3]));
        }
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
        mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
        mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
        float mn0 = fmaxf(m0, mx0), mn1 = fmaxf(m1, mx1);
        float base0 = mn0 == -INFINITY ? 0.0f : mn0, base1 = mn1 == -INFINITY ? 0.0f : mn1;
        float c0 = exp2f(m0 - base0), c1 = exp2f(m1 - base1);
        float rs0 = 0, rs1 = 0;
#pragma unroll
        for (int n = 0; n < FA_BK / 8; n++) {
            s[n][0] = exp2f(s[n][0] - base0); s[n][1] = exp2f(s[n][1] - base0);
            s[n][2] = exp2f(s[n][2] - base1); s[n][3] = exp2f(s[n][3] - base1);
            rs0 += s[n][0] + s[n][1];
            rs1 += s[n][2] + s[n][3];
        }
        rs0 += __shfl_xor_sync(0xffffffffu, rs0, 1);
        rs0 += __shfl_xor_sync(0xffffffffu, rs0, 2);
        rs1 += __shfl_xor_sync(0xffffffffu, rs1, 1);
        rs1 += __shfl_xor_sync(0xffffffffu, rs1, 2);
        l0 = l0 * c0 + rs0; l1 = l1 * c1 + rs1;
        m0 = mn0; m1 = mn1;
#pragma unroll
        for (int i = 0; i < D / 8; i++) { o[i][0] *= c0; o[i][1] *= c0; o[i][2] *= c1; o[i][3] *= c1; }
#pragma unroll
        for (int kk = 0; kk < FA_BK / 16; kk++) {
            u32 a[4] = {pack_bf16(s[2 * kk][0], s[2 * kk][1]), pack_bf16(s[2 * kk][2], s[2 * kk][3]),
                        pack_bf16(s[2 * kk + 1][0], s[2 * kk + 1][1]), pack_bf16(s[2 * kk + 1][2], s[2 * kk + 1][3])};
            // B fragments of V (keys × dims) straight from its row-major tile: ldmatrix.trans,
            // lanes 0-15 addressing the 16 key rows of this step.
            u32 vaddr = (u32)__cvta_generic_to_shared(&Vs[(kk * 16 + (lane & 15)) * QS]);
#pragma unroll
            for (int dn = 0; dn < D / 8; dn++) {
                u32 b0, b1;
                asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0,%1}, [%2];\n"
                             : "=r"(b0), "=r"(b1) : "r"(vaddr + dn * 16));
                mma_bf16(o[dn], a, b0, b1);
            }
        }
    }
    float inv0 = l0 > 0 ? 1.0f / l0 : 0.0f, inv1 = l1 > 0 ? 1.0f / l1 : 0.0f;
    float *ob = out + (long)b * T * qStride + (long)h * D;
#pragma unroll
    for (int dn = 0; dn < D / 8; dn++) {
        int d = dn * 8 + 2 * tq;
        if (row0 < T) { ob[(long)row0 * qStride + d] = o[dn][0] * inv0; ob[(long)row0 * qStride + d + 1] = o[dn][1] * inv0; }
        if (row1 < T) { ob[(long)row1 * qStride + d] = o[dn][2] * inv1; ob[(long)row1 * qStride + d + 1] = o[dn][3] * inv1; }
    }
    if (lse && tq == 0) {
        const float ln2 = 0.6931471805599453f;
        if (row0 < T) lse[((long)b * H + h) * T + row0] = (m0 + log2f(l0)) * ln2;
        if (row1 < T) lse[((long)b * H + h) * T + row1] = (m1 + log2f(l1)) * ln2;
    }
}

extern "C" __global__ void __launch_bounds__(128) attention_forward_bf16_d64(
    float *out, float *lse, const float *q, const float *k, const float *v, int T, int H, int Hkv, int window, float scale) {
    flash_forward_bf16<64>(out, lse, q, k, v, T, H, Hkv, window, scale);
}
extern "C" __global__ void __launch_bounds__(128) attention_forward_bf16_d128(
    float *out, float *lse, const float *q, const float *k, const float *v, int T, int H, int Hkv, int window, float scale) {
    flash_forward_bf16<128>(out, lse, q, k, v, T, H, Hkv, window, scale);
}
