// The lm_head loss over one chunk of logits [rows, V] (Sources/QATModels/Layers/CrossEntropy.swift):
// per row, loss = logsumexp(logits) - logits[target]; rows whose target is the ignore index (-100)
// give 0 and are not counted. One block per row; the per-row losses go back to the host, which
// sums them in row order (so the figure does not depend on the launch).
extern "C" __global__ void cross_entropy_rows(float *rowLoss, const float *logits, const int *targets, int rows, int V) {
    int r = blockIdx.x;
    if (r >= rows) return;
    int t = targets[r];
    const float *x = logits + (long)r * V;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < V; j += blockDim.x) m = fmaxf(m, x[j]);
    m = block_max(m);
    double s = 0;
    for (int j = threadIdx.x; j < V; j += blockDim.x) s += (double)expf(x[j] - m);
    s = block_sum_d(s);
    if (threadIdx.x == 0) rowLoss[r] = t < 0 ? 0.0f : (float)((double)m + log(s) - (double)x[t]);
}
