// Embedding, residual add, SwiGLU and dtype conversion: forward (and, later, backward) of the
// element-wise layers (Sources/QATModels/Layers/{Embedding,SwiGLU,Kernels}.swift).

// out[i, :] = table[tokens[i], :], or with roundBF16 its bf16 rounding (the table as a bf16 export stores it).
extern "C" __global__ void embedding_forward(float *out, const int *tokens, const float *table, int n, int c, int roundBF16) {
    long i = blockIdx.x;
    if (i >= n) return;
    const float *src = table + (long)tokens[i] * c;
    float *dst = out + i * (long)c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) dst[j] = roundBF16 ? bf16_round(src[j]) : src[j];
}

// out = the bf16 rounding of x, as fp32 (out may be x)
extern "C" __global__ void round_bf16(float *out, const float *x, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) out[i] = bf16_round(x[i]);
}

// a += b
extern "C" __global__ void add_inplace(float *a, const float *b, long n) {
    elementwise_loop(
        n, aligned16(a) && aligned16(b),
        [&](long i) {
            float4 x = ((float4 *)a)[i], y = ((const float4 *)b)[i];
            ((float4 *)a)[i] = make_float4(__fadd_rn(x.x, y.x), __fadd_rn(x.y, y.y), __fadd_rn(x.z, y.z), __fadd_rn(x.w, y.w));
        },
        [&](long i) { a[i] = __fadd_rn(a[i], b[i]); });
}

// out = silu(gate) * up (and its bf16 copy in out16, when given; out may be null when only the copy is used).
// in16: gate and up are bf16 (bf16 precision keeps them so, CUDAModel.LayerActivations), else fp32.
extern "C" __global__ void swiglu_forward(float *out, const void *gate, const void *up, long n, u16 *out16, int in16) {
    elementwise_loop(
        n, aligned16(out) && aligned_for4(gate, in16) && aligned_for4(up, in16) && aligned8(out16),
        [&](long i) {
            float4 x = load4(gate, i, in16), u = load4(up, i, in16);
            float4 y = make_float4(swiglu_one(x.x, u.x), swiglu_one(x.y, u.y), swiglu_one(x.z, u.z), swiglu_one(x.w, u.w));
            if (out) ((float4 *)out)[i] = y;
            if (out16) ((uint2 *)out16)[i] = bf16x4(y.x, y.y, y.z, y.w);
        },
        [&](long i) {
            float y = swiglu_one(load1(gate, i, in16), load1(up, i, in16));
            if (out) out[i] = y;
            if (out16) out16[i] = f32_to_bf16(y);
        });
}

// bf16 copy of an fp32 tensor (round to nearest even), the input of bf16 matrix products.
extern "C" __global__ void to_bf16(u16 *out, const float *x, long n) {
    elementwise_loop(
        n, aligned16(x) && aligned8(out),
        [&](long i) {
            float4 v = ((const float4 *)x)[i];
            ((uint2 *)out)[i] = bf16x4(v.x, v.y, v.z, v.w);
        },
        [&](long i) { out[i] = f32_to_bf16(x[i]); });
}

// The same copy of an fp32 [rows, cols] matrix into rows of ld elements (ld ≥ cols): the v slice of the fused
// q/k/v products' dy (CUDAModel+Training.swift).
extern "C" __global__ void to_bf16_rows(u16 *out, const float *x, long rows, int cols, long ld) {
    elementwise_loop(
        rows * cols, (cols & 3) == 0 && (ld & 3) == 0 && aligned16(x) && aligned8(out),
        [&](long i) {   // (cols % 4 == 0: the four elements of float4 i are in one row)
            float4 v = ((const float4 *)x)[i];
            *(uint2 *)(out + row_strided(4 * i, cols, ld)) = bf16x4(v.x, v.y, v.z, v.w);
        },
        [&](long i) { out[row_strided(i, cols, ld)] = f32_to_bf16(x[i]); });
}

// out[i, :] += bias
extern "C" __global__ void add_bias(float *out, const float *bias, long n, int cols) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x)
        out[i] = __fadd_rn(out[i], bias[i % cols]);
}

// ---- Backward ----

// SwiGLU backward (SwiGLU.backward): with s = sigmoid(gate), dup = dh·gate·s and
// dgate = dh·up·s·(1 + gate·(1 − s)). Each output is written where its pointer is not null:
// fp32 (dgate, dup) and/or the bf16 copies the bf16 products read (dgate16, dup16). The tensors are
// [n / cols, cols]; the bf16 copies' rows are ld16 elements apart (ld16 = cols: contiguous; 2·cols with
// dup16 = dgate16 + cols: the rows of the fused gate/up products' dy, CUDAModel+Training.swift).
// in16: gate and up are bf16; dout16: dout (dh) is bf16 (down_proj's dx product wrote it so); else fp32.
extern "C" __global__ void swiglu_backward(float *dgate, float *dup, const void *dout, const void *gate, const void *up, long n,
                                           u16 *dgate16, u16 *dup16, int cols, long ld16, int in16, int dout16) {
    // (x, u, dh) -> (dgate, dup), as SwiGLU.backward rounds them
    auto one = [](float x, float u, float dh, float *dg, float *du) {
        float s = 1.0f / (1.0f + expf(-x));
        *du = __fmul_rn(__fmul_rn(dh, x), s);
        *dg = __fmul_rn(__fmul_rn(__fmul_rn(dh, u), s), __fadd_rn(1.0f, __fmul_rn(x, __fsub_rn(1.0f, s))));
    };
    // element i's place in the bf16 copies
    auto at16 = [&](long i) -> long { return ld16 == cols ? i : row_strided(i, cols, ld16); };
    elementwise_loop(
        n,
        aligned16(dgate) && aligned16(dup) && aligned_for4(dout, dout16) && aligned_for4(gate, in16) && aligned_for4(up, in16) &&
            aligned8(dgate16) && aligned8(dup16) && (cols & 3) == 0 && (ld16 & 3) == 0,
        [&](long i) {   // (cols % 4 == 0: the four elements of float4 i are in one row)
            float4 x = load4(gate, i, in16), u = load4(up, i, in16), h = load4(dout, i, dout16), dg, du;
            one(x.x, u.x, h.x, &dg.x, &du.x);
            one(x.y, u.y, h.y, &dg.y, &du.y);
            one(x.z, u.z, h.z, &dg.z, &du.z);
            one(x.w, u.w, h.w, &dg.w, &du.w);
            if (dup) ((float4 *)dup)[i] = du;
            if (dgate) ((float4 *)dgate)[i] = dg;
            long j = at16(4 * i);
            if (dup16) *(uint2 *)(dup16 + j) = bf16x4(du.x, du.y, du.z, du.w);
            if (dgate16) *(uint2 *)(dgate16 + j) = bf16x4(dg.x, dg.y, dg.z, dg.w);
        },
        [&](long i) {
            float dg, du;
            one(load1(gate, i, in16), load1(up, i, in16), load1(dout, i, dout16), &dg, &du);
            if (dup) dup[i] = du;
            if (dgate) dgate[i] = dg;
            long j = at16(i);
            if (dup16) dup16[j] = f32_to_bf16(du);
            if (dgate16) dgate16[j] = f32_to_bf16(dg);
        });
}

// Embedding backward without atomics: the rows of dout are grouped by token on the host
// (`order`: positions sorted by token, then position; `starts[u]..starts[u+1]`: token ids[u]'s
// positions), so each table row sums its positions in position order, as the CPU does.
// Grid: one block per distinct token.
extern "C" __global__ void embedding_backward(float *dtable, const float *dout, const int *order, const int *starts, const int *ids,
                                              int u, int c) {
    int b = blockIdx.x;
    if (b >= u) return;
    float *row = dtable + (long)ids[b] * c;
    int s0 = starts[b], s1 = starts[b + 1];
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float acc = row[j];
        for (int i = s0; i < s1; i++) acc = __fadd_rn(acc, dout[(long)order[i] * c + j]);
        row[j] = acc;
    }
}

// The clipped straight-through estimator (TensorQuantizer.backward): out (+)= g where
// |x| <= amax, else 0 (accumulate != 0 adds). out may alias g when writing.
extern "C" __global__ void ste_clip(float *out, const float *g, const float *x, float amax, long n, int accumulate) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
        float v = fabsf(x[i]) <= amax ? g[i] : 0.0f;
        out[i] = accumulate ? __fadd_rn(out[i], v) : v;
    }
}

// x *= s
extern "C" __global__ void scale_inplace(float *x, float s, long n) {
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) x[i] = __fmul_rn(x[i], s);
}

// Column sums of a [n, c] matrix in two deterministic passes (no atomics): block (bx, by) sums
// rows [by·rowsPerBlock, …) of columns bx·blockDim.x + threadIdx.x, of a (times b, times
// rowScale[r], when given: a·(b·rowScale) as RMSNorm's weight gradient), into partials[by, col];
// colsum_finish adds the partials to out.
extern "C" __global__ void colsum_partial(float *partials, const float *a, const float *b, const float *rowScale, int n, int c,
                                          int rowsPerBlock) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= c) return;
    int r0 = blockIdx.y * rowsPerBlock, r1 = min(n, r0 + rowsPerBlock);
    float acc = 0;
    for (int r = r0; r < r1; r++) {
        float v = a[(long)r * c + col];
        if (b) v = __fmul_rn(v, rowScale ? __fmul_rn(b[(long)r * c + col], rowScale[r]) : b[(long)r * c + col]);
        acc = __fadd_rn(acc, v);
    }
    partials[(long)blockIdx.y * c + col] = acc;
}

// out[col] += Σ_b partials[b, col] (b < blocks), deterministic: blocks of 32·COLSUM_SLICES threads, warp y (lane x)
// adds partials y, y + COLSUM_SLICES, … of column blockIdx.x·32 + x in order, then warp 0 adds the slices' sums to
// out[col] in slice order. (colsum_partial's and rmsnorm_backward_dw's partials.)
#define COLSUM_SLICES 8
extern "C" __global__ void __launch_bounds__(32 * COLSUM_SLICES) colsum_finish(float *out, const float *partials, int blocks, int c) {
    __shared__ float slice[COLSUM_SLICES * 32];
    int x = threadIdx.x & 31, y = threadIdx.x >> 5, col = blockIdx.x * 32 + x;
    float acc = 0;
    if (col < c) {
#pragma unroll 8
        for (int b = y; b < blocks; b += COLSUM_SLICES) acc = __fadd_rn(acc, partials[(long)b * c + col]);
    }
    slice[threadIdx.x] = acc;
    __syncthreads();
    if (y != 0 || col >= c) return;
    float s = out[col];
#pragma unroll
    for (int i = 0; i < COLSUM_SLICES; i++) s = __fadd_rn(s, slice[32 * i + x]);
    out[col] = s;
}
