// RMSNorm forward (Sources/QATModels/Layers/RMSNorm.swift): one block per row, the sum of
// squares accumulated in double as on the CPU; rstd is kept for backward.
extern "C" __global__ void rmsnorm_forward(float *out, float *rstd, const float *inp, const float *w, int n, int c,
                                           float eps) {
    long row = blockIdx.x;
    if (row >= n) return;
    const float *x = inp + row * c;
    double s = 0;
    for (int j = threadIdx.x; j < c; j += blockDim.x) { float v = x[j]; s += (double)__fmul_rn(v, v); }
    s = block_sum_d(s);
    float rs = 1.0f / sqrtf((float)(s / (double)c) + eps);
    if (threadIdx.x == 0 && rstd) rstd[row] = rs;
    float *o = out + row * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) o[j] = __fmul_rn(w[j], __fmul_rn(x[j], rs));
}
