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
