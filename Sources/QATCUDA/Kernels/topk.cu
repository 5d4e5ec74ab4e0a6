// Top-k distillation on the GPU: the row kernel of QAD from a teacher cache (TopKKernels.swift) and
// the selection of a teacher's top-k per row (TopKCache.selectTopK). One block per row; every
// reduction is a fixed-order block reduction (no float atomics), so results do not depend on timing.

// Max of a double over the block (every thread gets it).
__device__ double tk_block_max_d(double v) {
    __shared__ double pmax[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) pmax[w] = v;
    __syncthreads();
    double m = -(double)INFINITY;
    for (int i = 0; i < nw; i++) m = fmax(m, pmax[i]);
    return m;
}

// max_j x[j] over the row (every thread gets it).
__device__ float tk_row_max(const float *x, int V) {
    float m = -INFINITY;
    for (int j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, x[j]);
    return block_max(m);
}

// Σ_j expf(x[j]·scale − m) in double over the row (scale 1: expf(x[j] − m)).
__device__ double tk_row_sum_exp(const float *x, int V, float scale, float m) {
    double s = 0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) s += (double)expf(__fsub_rn(__fmul_rn(x[j], scale), m));
    return block_sum_d(s);
}

// The top-k objectives' row kernel (TopKKernels.row): objective 0 coarse_kl, 1 both_normalized,
// 2 teacher_normalized, 3 sampled. s = student logits [rows, V], replaced by d(loss·gradScale)/ds;
// ids / logprobs / counts [rows, K] (id < 0: an absent slot), rest [rows] (coarse_kl), targets [rows]
// (−100: ignored, zeros). slots: scratch of 2K floats per row. rowOut[2r] = CE at T = 1 (0 without
// CE), rowOut[2r+1] = KD before T². cKD = kd_ratio·gradScale·T, cCE = (1 − kd_ratio)·gradScale.
// The per-slot gradients are computed in parallel and scattered by one thread in slot order, as the
// CPU loop does (so repeated ids, if any, behave as on the CPU).
extern "C" __global__ void topk_kd_rows(double *rowOut, float *s, const int *ids, const float *logprobs, const float *rest,
                                        const float *counts, float *slots, const int *targets, int rows, int V, int K,
                                        int objective, double invT, float cKD, float cCE, int computeCE) {
    int r = blockIdx.x;
    if (r >= rows) return;
    int t = targets[r], tid = threadIdx.x, bd = blockDim.x;
    float *sr = s + (long)r * V;
    if (t < 0) {
        for (int j = tid; j < V; j += bd) sr[j] = 0.0f;
        if (tid == 0) { rowOut[2 * r] = 0; rowOut[2 * r + 1] = 0; }
        return;
    }
    const int *id = ids + (long)r * K;
    const float *lp = logprobs + (long)r * K;
    float *sv = slots + (long)r * 2 * K, *gs = sv + K;  // student logits at the ids; per-slot gradients
    for (int i = tid; i < K; i += bd) sv[i] = id[i] >= 0 ? sr[id[i]] : 0.0f;
    float zt = sr[t];
    __syncthreads();
    const double NEG = -(double)INFINITY;
    double ce = 0, kd = 0;
    if (objective == 0) {
        // coarse_kl: the k cached bins and one rest bin, teacher and student, at temperature T.
        float ms = tk_row_max(sr, V);
        double sumS = tk_row_sum_exp(sr, V, 1.0f, ms);
        double lse = (double)ms + log(sumS);
        double sumK = 0;
        for (int i = tid; i < K; i += bd) if (id[i] >= 0) sumK += (double)expf(sv[i] - ms);
        sumK = block_sum_d(sumK);
        double restS = sumS - sumK;
        if (restS < 1e-3 * sumS) {  // cancelled: sum the tail directly, the top-k masked to −∞ for the sweep
            for (int i = tid; i < K; i += bd) if (id[i] >= 0) sr[id[i]] = -INFINITY;
            __syncthreads();
            restS = tk_row_sum_exp(sr, V, 1.0f, ms);
            for (int i = tid; i < K; i += bd) if (id[i] >= 0) sr[id[i]] = sv[i];
            __syncthreads();
        }
        double logRestQ = restS > 0 ? log(restS) + (double)ms - lse : NEG;
        double restT = (double)rest[r];
        // Teacher bins: x_i = ℓ_i, extra = ℓ_R; student bins: x_i = s_id − lse, extra = log q_R; all · 1/T.
        double mt = NEG, mr = NEG;
        for (int i = tid; i < K; i += bd) {
            if (id[i] < 0) continue;
            mt = fmax(mt, (double)lp[i] * invT);
            mr = fmax(mr, ((double)sv[i] - lse) * invT);
        }
        mt = fmax(tk_block_max_d(mt), restT * invT);
        mr = fmax(tk_block_max_d(mr), logRestQ * invT);
        bool tAny = mt > NEG;
        double st = 0, sq = 0;
        for (int i = tid; i < K; i += bd) {
            if (id[i] < 0) continue;
            st += exp((double)lp[i] * invT - mt);
            sq += exp(((double)sv[i] - lse) * invT - mr);
        }
        st = block_sum_d(st);
        sq = block_sum_d(sq);
        double lt = tAny ? mt + log(st + exp(restT * invT - mt)) : 0.0;
        double lr = mr + log(sq + exp(logRestQ * invT - mr));
        double tRestLp = restT * invT - lt, rRestLp = logRestQ * invT - lr;
        float iS = (float)(1.0 / sumS);
        double part = 0;
        for (int i = tid; i < K; i += bd) {
            if (id[i] < 0) continue;
            double tlp = (double)lp[i] * invT - lt, tp = exp(tlp);
            double rlp = ((double)sv[i] - lse) * invT - lr, rp = exp(rlp);
            if (tAny && tp > 0) part += tp * (tlp - rlp);
            float g = tAny ? (float)((double)cKD * (rp - tp)) : 0.0f;
            if (computeCE) g = __fadd_rn(g, __fmul_rn(__fmul_rn(cCE, iS), expf(sv[i] - ms)));
            gs[i] = g;
        }
        kd = block_sum_d(part);
        double gRest = 0;
        if (tAny) {
            double tR = exp(tRestLp), rR = exp(rRestLp);
            if (tR > 0) kd += tR * (tRestLp - fmax(rRestLp, -745.0));
            gRest = rR - tR;
        }
        if (computeCE) ce = lse - (double)zt;
        float tail = (float)(tAny && restS > 0 ? (double)cKD * gRest / restS : 0.0);
        float coef = computeCE ? __fadd_rn(tail, __fmul_rn(cCE, iS)) : tail;
        for (int j = tid; j < V; j += bd) sr[j] = __fmul_rn(coef, expf(sr[j] - ms));
        __syncthreads();
        if (tid == 0) {
            if (tAny)
                for (int i = 0; i < K; i++) if (id[i] >= 0) sr[id[i]] = gs[i];
            if (computeCE) sr[t] = __fsub_rn(sr[t], cCE);
        }
    } else if (objective == 1) {
        // both_normalized: teacher and student each renormalised over the k entries, at T.
        double mt = NEG, mr = NEG;
        for (int i = tid; i < K; i += bd) {
            if (id[i] < 0) continue;
            mt = fmax(mt, (double)lp[i] * invT);
            mr = fmax(mr, (double)sv[i] * invT);
        }
        mt = tk_block_max_d(mt);
        mr = tk_block_max_d(mr);
        bool tAny = mt > NEG, rAny = mr > NEG;
        double st = 0, sq = 0;
        for (int i = tid; i < K; i += bd) {
            if (id[i] < 0) continue;
            if (tAny) st += exp((double)lp[i] * invT - mt);
            if (rAny) sq += exp((double)sv[i] * invT - mr);
        }
        st = block_sum_d(st);
        sq = block_sum_d(sq);
        double lt = tAny ? mt + log(st) : 0.0, lr = rAny ? mr + log(sq) : 0.0;
        double part = 0;
        for (int i = tid; i < K; i += bd) {
            if (id[i] < 0) continue;
            double tlp = (double)lp[i] * invT - lt, tp = exp(tlp);
            double rlp = rAny ? (double)sv[i] * invT - lr : NEG, rp = rAny ? exp(rlp) : 0.0;
            if (tAny && tp > 0) part += tp * (tlp - rlp);
            gs[i] = tAny ? (float)((double)cKD * (rp - tp)) : 0.0f;
        }
        kd = tAny ? block_sum_d(part) : 0.0;
        if (computeCE) {
            float ms = tk_row_max(sr, V);
            double sum = tk_row_sum_exp(sr, V, 1.0f, ms);
            ce = (double)ms + log(sum) - (double)zt;
            float f = __fmul_rn(cCE, (float)(1.0 / sum));
            for (int j = tid; j < V; j += bd) sr[j] = __fmul_rn(f, expf(sr[j] - ms));
        } else {
            __syncthreads();  // every thread's reads of s (the slot values) are done
            for (int j = tid; j < V; j += bd) sr[j] = 0.0f;
        }
        __syncthreads();
        if (tid == 0) {
            if (computeCE) sr[t] = __fsub_rn(sr[t], cCE);
            if (tAny)
                for (int i = 0; i < K; i++) if (id[i] >= 0) sr[id[i]] = __fadd_rn(sr[id[i]], gs[i]);
        }
    } else {
        // teacher_normalized (teacher weights softmax_k(ℓ/T)) and sampled (importance weights): the
        // student's full-vocabulary softmax at T against fixed weights w_k on the k ids.
        float invTf = (float)invT;
        float ms = tk_row_max(sr, V);
        float maxA = (float)((double)ms * invT);
        double sumA = tk_row_sum_exp(sr, V, invTf, maxA);
        bool ceSeparate = computeCE && invT != 1.0;
        double sumS = ceSeparate ? tk_row_sum_exp(sr, V, 1.0f, ms) : 0.0;
        double lseA = (double)maxA + log(sumA);
        float kdOn = 0;
        double part = 0;
        if (objective == 2) {
            double mz = NEG;
            for (int i = tid; i < K; i += bd) if (id[i] >= 0) mz = fmax(mz, (double)lp[i] * invT);
            mz = tk_block_max_d(mz);
            double sw = 0;
            if (mz > NEG)
                for (int i = tid; i < K; i += bd) if (id[i] >= 0) sw += exp((double)lp[i] * invT - mz);
            sw = block_sum_d(sw);
            double lsw = mz > NEG ? mz + log(sw) : 0.0;
            for (int i = tid; i < K; i += bd) {
                float w = 0;
                if (id[i] >= 0 && mz > NEG) {
                    double l = (double)lp[i] * invT - lsw, p = exp(l);
                    w = (float)p;
                    part += p * (l - ((double)sv[i] * invT - lseA));
                }
                gs[i] = w;  // (times the KD coefficient below)
            }
            kdOn = mz > NEG ? 1.0f : 0.0f;
        } else {
            const float *c = counts + (long)r * K;
            double n = 0, m = NEG;
            for (int i = tid; i < K; i += bd) {
                if (id[i] < 0 || !(c[i] > 0)) continue;
                n += (double)c[i];
                m = fmax(m, (double)lp[i] * (invT - 1));
            }
            n = block_sum_d(n);
            m = tk_block_max_d(m);
            bool on = n > 0 && m > NEG;
            double z = 0;
            if (on)
                for (int i = tid; i < K; i += bd)
                    if (id[i] >= 0 && c[i] > 0) z += (double)c[i] / n * exp((double)lp[i] * (invT - 1) - m);
            z = block_sum_d(z);
            double logZ = on ? m + log(z) : 0.0;
            for (int i = tid; i < K; i += bd) {
                float w = 0, logW = 0;
                if (on && id[i] >= 0 && c[i] > 0) {
                    w = (float)((double)c[i] / n * exp((double)lp[i] * (invT - 1) - logZ));
                    logW = (float)((double)lp[i] * invT - logZ);
                }
                if (id[i] >= 0 && w > 0) part += (double)w * ((double)logW - ((double)sv[i] * invT - lseA));
                gs[i] = w;
            }
            kdOn = on ? 1.0f : 0.0f;
        }
        kd = block_sum_d(part) * (double)kdOn;
        float iS = 0;
        if (computeCE) {
            if (ceSeparate) { ce = (double)ms + log(sumS) - (double)zt; iS = (float)(1.0 / sumS); }
            else { ce = lseA - (double)zt; iS = (float)(1.0 / sumA); }
        }
        float iA = (float)(1.0 / sumA), a = __fmul_rn(kdOn, cKD);
        for (int i = tid; i < K; i += bd) gs[i] = __fmul_rn(a, gs[i]);
        for (int j = tid; j < V; j += bd) {
            float x = sr[j];
            float g = __fmul_rn(__fmul_rn(a, expf(__fsub_rn(__fmul_rn(x, invTf), maxA))), iA);
            if (computeCE) {
                float e = ceSeparate ? expf(x - ms) : expf(__fsub_rn(__fmul_rn(x, invTf), maxA));
                g = __fadd_rn(g, __fmul_rn(__fmul_rn(cCE, e), iS));
            }
            sr[j] = g;
        }
        __syncthreads();
        if (tid == 0) {
            if (computeCE) sr[t] = __fsub_rn(sr[t], cCE);
            for (int i = 0; i < K; i++) if (id[i] >= 0) sr[id[i]] = __fsub_rn(sr[id[i]], gs[i]);
        }
    }
    if (tid == 0) { rowOut[2 * r] = ce; rowOut[2 * r + 1] = kd; }
}

// The order-preserving key of a float (a larger float has a larger key; −0 is +0, as float
// comparison has it, so that a tie between them is broken by id as on the CPU).
__device__ __forceinline__ u32 tk_key(float v) {
    if (v == 0.0f) v = 0.0f;
    u32 u = __float_as_uint(v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

#define TK_MAX_K 2048

// Per row of logits [rows, V]: the K largest entries by decreasing value, ties the lower id first
// (TopKCache.selectTopK), their log_softmax over the row, and (withRest) the log of the mass of
// the other entries, summed directly over them in double. K ≤ TK_MAX_K; blockDim 512.
// The K-th largest key is found by a radix select (4 passes of 8 bits, integer counts in shared
// memory); the entries above it and the lowest-id ties are then gathered in id order by each warp
// over its own contiguous range (ballot prefix counts), and sorted by a bitonic sort.
extern "C" __global__ void topk_select_rows(int *outIds, float *outLogprobs, float *outRest, const float *logits, int rows, int V,
                                            int K, int withRest) {
    __shared__ int hist[256];
    __shared__ u32 candKey[TK_MAX_K];
    __shared__ int candId[TK_MAX_K];
    __shared__ u32 shPrefix;
    __shared__ int shNeed, shLastTie;
    __shared__ int warpG[32], warpE[32];
    int r = blockIdx.x;
    if (r >= rows) return;
    int tid = threadIdx.x, bd = blockDim.x, lane = tid & 31, w = tid >> 5, nw = bd >> 5;
    const float *x = logits + (long)r * V;
    // Radix select of the K-th largest key: prefix holds its bytes found so far, need its rank among
    // the keys that share them.
    u32 prefix = 0, mask = 0;
    int need = K;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = tid; i < 256; i += bd) hist[i] = 0;
        __syncthreads();
        for (int base = tid & ~31; base < V; base += bd) {  // warp-uniform trip count
            int j = base + lane;
            int bin = 256;
            if (j < V) {
                u32 k = tk_key(x[j]);
                if ((k & mask) == prefix) bin = (int)((k >> shift) & 255u);
            }
            unsigned peers = __match_any_sync(0xffffffffu, bin);
            if (bin < 256 && lane == __ffs(peers) - 1) atomicAdd(&hist[bin], __popc(peers));
        }
        __syncthreads();
        if (tid == 0) {
            int acc = 0, b = 255;
            for (; b > 0; b--) {
                if (acc + hist[b] >= need) break;
                acc += hist[b];
            }
            shPrefix = prefix | ((u32)b << shift);
            shNeed = need - acc;
        }
        __syncthreads();
        prefix = shPrefix;
        need = shNeed;
        mask |= 255u << shift;
    }
    const u32 kth = prefix;
    const int E = need, G = K - E;  // E ties (key == kth) are taken, lowest ids first, after the G larger keys
    // Each warp owns a contiguous range of ids; count, then gather in id order.
    int chunk = ((V + nw - 1) / nw + 31) & ~31;
    int lo = w * chunk, hi = min(V, lo + chunk);
    int cg = 0, ce = 0;
    for (int base = lo; base < hi; base += 32) {
        int j = base + lane;
        u32 k = j < hi ? tk_key(x[j]) : 0u;
        cg += __popc(__ballot_sync(0xffffffffu, j < hi && k > kth));
        ce += __popc(__ballot_sync(0xffffffffu, j < hi && k == kth));
    }
    if (lane == 0) { warpG[w] = cg; warpE[w] = ce; }
    __syncthreads();
    int offG = 0, offE = 0;
    for (int i = 0; i < w; i++) { offG += warpG[i]; offE += warpE[i]; }
    unsigned below = (1u << lane) - 1u;
    for (int base = lo; base < hi; base += 32) {
        int j = base + lane;
        u32 k = j < hi ? tk_key(x[j]) : 0u;
        bool isG = j < hi && k > kth, isE = j < hi && k == kth;
        unsigned bg = __ballot_sync(0xffffffffu, isG), be = __ballot_sync(0xffffffffu, isE);
        if (isG) {
            int p = offG + __popc(bg & below);
            candKey[p] = k; candId[p] = j;
        }
        if (isE) {
            int p = offE + __popc(be & below);
            if (p < E) { candKey[G + p] = k; candId[G + p] = j; }
            if (p == E - 1) shLastTie = j;
        }
        offG += __popc(bg);
        offE += __popc(be);
    }
    // Log-sum-exp of the row and the mass outside the selection.
    float mx = tk_row_max(x, V);  // (its reductions synchronise the block: candidates and shLastTie are written)
    int lastTie = shLastTie;
    double sum = 0, restSum = 0;
    for (int j = tid; j < V; j += bd) {
        float v = x[j];
        double e = (double)expf(v - mx);
        sum += e;
        u32 k = tk_key(v);
        if (k < kth || (k == kth && j > lastTie)) restSum += e;
    }
    sum = block_sum_d(sum);
    restSum = block_sum_d(restSum);
    double lse = (double)mx + log(sum);
    // Bitonic sort of the K candidates (padded to a power of two) by key descending, then id ascending.
    int P = 1;
    while (P < K) P <<= 1;
    for (int i = K + tid; i < P; i += bd) { candKey[i] = 0u; candId[i] = 0x7fffffff; }
    for (int size = 2; size <= P; size <<= 1) {
        for (int stride = size >> 1; stride > 0; stride >>= 1) {
            __syncthreads();
            for (int i = tid; i < P; i += bd) {
                int p = i ^ stride;
                if (p <= i) continue;
                u32 ki = candKey[i], kp = candKey[p];
                int ii = candId[i], ip = candId[p];
                bool pFirst = kp > ki || (kp == ki && ip < ii);  // p belongs before i in the final order
                bool iFirst = !pFirst;
                if ((i & size) == 0 ? pFirst : iFirst) {
                    candKey[i] = kp; candKey[p] = ki; candId[i] = ip; candId[p] = ii;
                }
            }
        }
    }
    __syncthreads();
    for (int i = tid; i < K; i += bd) {
        int j = candId[i];
        outIds[(long)r * K + i] = j;
        outLogprobs[(long)r * K + i] = (float)((double)x[j] - lse);
    }
    if (withRest && tid == 0) outRest[r] = (float)(log(restSum) + (double)mx - lse);
}
