// Embedding, residual add, SwiGLU and dtype conversion: forward (and, later, backward) of the
// element-wise layers (Sources/QATModels/Layers/{Embedding,SwiGLU,Kernels}.swift).

// out[i, :] = table[tokens[i], :]
extern "C" __global__ void embedding_forward(float *out, const int *tokens, const float *table, int n, int c) {
    long i = blockIdx.x;
    if (i >= n) return;
    const float *src = table + (long)tokens[i] * c;
    float *dst = out + i * (long)c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) dst[j] = src[j];
}

// a += b
extern "C" __global__ void add_inplace(float *a, const float *b, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        a[i] = __fadd_rn(a[i], b[i]);
}

// out = silu(gate) * up (and its bf16 copy in out16, when given)
extern "C" __global__ void swiglu_forward(float *out, const float *gate, const float *up, long n, u16 *out16) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float x = gate[i];
        float y = x / (1.0f + expf(-x)) * up[i];
        out[i] = y;
        if (out16) out16[i] = f32_to_bf16(y);
    }
}

// bf16 copy of an fp32 tensor (round to nearest even), the input of bf16 matrix products.
extern "C" __global__ void to_bf16(u16 *out, const float *x, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(x[i]);
}

// out[i, :] += bias
extern "C" __global__ void add_bias(float *out, const float *bias, long n, int cols) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = __fadd_rn(out[i], bias[i % cols]);
}
