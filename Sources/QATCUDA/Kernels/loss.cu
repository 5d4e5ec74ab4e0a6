// The lm_head loss over one chunk of logits [rows, V] (Sources/QATModels/Layers/CrossEntropy.swift):
// per row, loss = logsumexp(logits) - logits[target]; rows whose target is the ignore index (-100)
// give 0 and are not counted. One block per row; the per-row losses go back to the host, which
// sums them in row order (so the figure does not depend on the launch).
extern "C" __global__ void cross_entropy_rows(float *rowLoss, const float *logits, const int *targets, int rows, int V) {
    int r = blockIdx.x;
    if (r >= rows) return;
    int t = targets[r];
    const float *x = logits + (long)r * V;
    // One pass: a running (max, sum of exp) per thread, float4 loads where the row allows.
    float m = -INFINITY, s = 0;
    int head = (V & 3) == 0 ? V : 0;
    for (int j = threadIdx.x * 4; j < head; j += blockDim.x * 4) {
        float4 v = *(const float4 *)(x + j);
        float mx = fmaxf(fmaxf(v.x, v.y), fmaxf(v.z, v.w));
        if (mx > m) { s *= expf(m - mx); m = mx; }
        s += expf(v.x - m) + expf(v.y - m) + expf(v.z - m) + expf(v.w - m);
    }
    for (int j = head + threadIdx.x; j < V; j += blockDim.x) {
        float v = x[j];
        if (v > m) { s *= expf(m - v); m = v; }
        s += expf(v - m);
    }
    float bm = block_max(m);
    double part = m == -INFINITY ? 0.0 : (double)s * exp((double)(m - bm));
    double total = block_sum_d(part);
    if (threadIdx.x == 0) rowLoss[r] = t < 0 ? 0.0f : (float)((double)bm + log(total) - (double)x[t]);
}

// Row max and Σ exp(x − max) of x[0..V) over the block (every thread gets both).
__device__ void row_max_sum(const float *x, int V, float scale, float *maxOut, double *sumOut) {
    float m = -INFINITY;
    for (int j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, __fmul_rn(x[j], scale));
    m = block_max(m);
    double s = 0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) s += (double)expf(__fmul_rn(x[j], scale) - m);
    *maxOut = m;
    *sumOut = block_sum_d(s);
}

// Cross-entropy forward and backward of one chunk (CrossEntropy.row with gradScale): per row
// the loss logsumexp(z) − z[t] to rowLoss, and z replaced in place by
// gradScale·(softmax(z) − onehot(t)); an ignored row (t < 0) gives 0 and a zero gradient.
extern "C" __global__ void cross_entropy_backward(float *rowLoss, float *logits, const int *targets, int rows, int V, float gradScale) {
    int r = blockIdx.x;
    if (r >= rows) return;
    int t = targets[r];
    float *z = logits + (long)r * V;
    if (t < 0) {
        for (int j = threadIdx.x; j < V; j += blockDim.x) z[j] = 0.0f;
        if (threadIdx.x == 0) rowLoss[r] = 0.0f;
        return;
    }
    float m;
    double s;
    row_max_sum(z, V, 1.0f, &m, &s);
    float zt = z[t];
    __syncthreads();   // z[t] is read before any thread overwrites it
    float k = (float)((double)gradScale / s);
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        float g = __fmul_rn(expf(z[j] - m), k);
        z[j] = j == t ? __fsub_rn(g, gradScale) : g;
    }
    if (threadIdx.x == 0) rowLoss[r] = (float)((double)m + log(s) - (double)zt);
}

// Distillation over full vocabulary rows (DistillationKernels.fullRow; DistillationConstants
// for the conventions): s = student logits [rows, V] (replaced by d(loss·gradScale)/ds),
// u = teacher logits (row stride teacherStride ≥ V: a larger teacher vocabulary is cut to V).
// kind 0 forward KL(p‖q), 1 reverse KL(q‖p), 2 generalized JSD(beta). rowOut[2r] = CE at T = 1
// (0 without CE), rowOut[2r+1] = KD (before T²). cKD = kd_ratio·gradScale·T,
// cCE = (1 − kd_ratio)·gradScale. Ignored rows: zeros. One block per row.
extern "C" __global__ void kd_rows(double *rowOut, float *s, const float *u, const int *targets, int rows, int V, long teacherStride,
                                   int kind, float beta, float invT, float cKD, float cCE, int computeCE) {
    int r = blockIdx.x;
    if (r >= rows) return;
    int t = targets[r];
    float *sr = s + (long)r * V;
    const float *ur = u + (long)r * teacherStride;
    if (t < 0) {
        for (int j = threadIdx.x; j < V; j += blockDim.x) sr[j] = 0.0f;
        if (threadIdx.x == 0) { rowOut[2 * r] = 0; rowOut[2 * r + 1] = 0; }
        return;
    }
    float maxA, maxB, ms = 0;
    double sumA, sumB, sumS = 0;
    row_max_sum(sr, V, invT, &maxA, &sumA);
    row_max_sum(ur, V, invT, &maxB, &sumB);
    bool ceSeparate = computeCE && invT != 1.0f;
    if (ceSeparate) row_max_sum(sr, V, 1.0f, &ms, &sumS);
    double lseA = (double)maxA + log(sumA), lseB = (double)maxB + log(sumB);
    double dotPD = 0, dotQD = 0;   // Σ eB·(u − s), Σ eA·(s − u)
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        double ea = expf(__fmul_rn(sr[j], invT) - maxA), eb = expf(__fmul_rn(ur[j], invT) - maxB);
        double d = (double)ur[j] - (double)sr[j];
        dotPD += eb * d;
        dotQD -= ea * d;
    }
    dotPD = block_sum_d(dotPD);
    dotQD = block_sum_d(dotQD);
    double ce = 0, iS = 0, lseCE = lseA, mCE = maxA;
    float scaleCE = invT;
    float zt = sr[t];
    if (computeCE) {
        if (ceSeparate) { lseCE = (double)ms + log(sumS); mCE = ms; iS = 1.0 / sumS; scaleCE = 1.0f; }
        else iS = 1.0 / sumA;
        ce = lseCE - (double)zt;
    }
    double iA = 1.0 / sumA, iB = 1.0 / sumB;
    double kd = 0, shift = 0, klQM = 0;
    if (kind == 0) {
        kd = (double)invT * dotPD / sumB + lseA - lseB;
    } else if (kind == 1) {
        kd = (double)invT * dotQD / sumA - lseA + lseB;
        shift = -lseA + lseB - kd;
    } else {
        double j2 = 0;
        for (int j = threadIdx.x; j < V; j += blockDim.x) {
            double p = expf(__fmul_rn(ur[j], invT) - maxB) * iB, q = expf(__fmul_rn(sr[j], invT) - maxA) * iA;
            double mm = beta * p + (1.0 - beta) * q;
            if (mm <= 0) continue;
            double logm = log(mm);
            double lp = (double)ur[j] * invT - lseB, lq = (double)sr[j] * invT - lseA;
            double tq = q * (lq - logm);
            j2 += beta * p * (lp - logm) + (1.0 - beta) * tq;
            klQM += tq;
        }
        kd = block_sum_d(j2);
        klQM = block_sum_d(klQM);
    }
    __syncthreads();   // every read of s precedes the writes below
    for (int j = threadIdx.x; j < V; j += blockDim.x) {
        double a = sr[j];
        double q = expf(__fmul_rn((float)a, invT) - maxA) * iA;
        double g;
        if (kind == 0) {
            g = cKD * (q - expf(__fmul_rn(ur[j], invT) - maxB) * iB);
        } else if (kind == 1) {
            g = cKD * q * ((a - (double)ur[j]) * invT + shift);
        } else {
            double p = expf(__fmul_rn(ur[j], invT) - maxB) * iB;
            double mm = beta * p + (1.0 - beta) * q;
            g = (q > 0 && mm > 0) ? cKD * (1.0 - beta) * q * (a * invT - lseA - log(mm) - klQM) : 0.0;
        }
        if (computeCE) g += cCE * exp((double)__fmul_rn((float)a, scaleCE) - mCE) * iS;
        if (computeCE && j == t) g -= cCE;
        sr[j] = (float)g;
    }
    if (threadIdx.x == 0) { rowOut[2 * r] = ce; rowOut[2 * r + 1] = kd; }
}
