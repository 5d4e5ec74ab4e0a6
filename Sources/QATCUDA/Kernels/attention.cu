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
