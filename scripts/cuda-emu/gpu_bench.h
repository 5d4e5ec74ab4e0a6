// Helpers of the GPU-host benches of this folder (gpu_bench.cu, gpu_bench_quant.cu; nvcc, no Swift).
#pragma once
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#define CK(x) do { cudaError_t e = (x); if (e != cudaSuccess) { printf("%s: %s\n", #x, cudaGetErrorString(e)); exit(1); } } while (0)

// n floats on the device, uniform in [-range/2, range/2) from a fixed LCG seed.
static float *dev(size_t n, unsigned seed, float range = 3.4f) {
    std::vector<float> h(n);
    unsigned s = seed;
    for (auto &x : h) { s = s * 1664525u + 1013904223u; x = ((s >> 8) / 16777216.0f - 0.5f) * range; }
    float *p; CK(cudaMalloc(&p, n * 4)); CK(cudaMemcpy(p, h.data(), n * 4, cudaMemcpyHostToDevice));
    return p;
}

// The same values as dev's, as bf16 (truncated: a bench input, not a rounding check).
static unsigned short *dev16(size_t n, unsigned seed, float range = 3.4f) {
    std::vector<unsigned short> h(n);
    unsigned s = seed;
    for (auto &x : h) {
        s = s * 1664525u + 1013904223u;
        float f = ((s >> 8) / 16777216.0f - 0.5f) * range;
        unsigned u; memcpy(&u, &f, 4); x = (unsigned short)(u >> 16);
    }
    unsigned short *p; CK(cudaMalloc(&p, n * 2)); CK(cudaMemcpy(p, h.data(), n * 2, cudaMemcpyHostToDevice));
    return p;
}

// Milliseconds per call of f: CUDA events around 20 calls after 3 warm-ups.
template <class F> static float timeit(F f) {
    for (int i = 0; i < 3; i++) f();
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    cudaEventRecord(a);
    for (int i = 0; i < 20; i++) f();
    cudaEventRecord(b); CK(cudaEventSynchronize(b));
    float ms; cudaEventElapsedTime(&ms, a, b);
    CK(cudaGetLastError());
    return ms / 20;
}

// Reads n float4s (L2 allocates lines for loads; a memset's stores may not evict what L2 holds).
__global__ void flush_read(const float4 *x, long n, float *sink) {
    float s = 0;
    for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) s += x[i].x;
    if (s == 12345.0f) *sink = s;
}

// Milliseconds per call of f with L2 cold, as inside a training step (other work ran in between): 20 calls,
// each after reading 256 MiB and timed alone between two events, after one warm-up.
template <class F> static float timecold(F f) {
    static float *flush = nullptr;
    const size_t bytes = 256u << 20;
    if (!flush) { CK(cudaMalloc(&flush, bytes + 16)); CK(cudaMemset(flush, 0, bytes + 16)); }
    f();
    cudaEvent_t a, b; cudaEventCreate(&a); cudaEventCreate(&b);
    float total = 0;
    for (int i = 0; i < 20; i++) {
        flush_read<<<132 * 8, 256>>>((const float4 *)flush, (long)(bytes / 16), flush + bytes / 4);
        cudaEventRecord(a); f(); cudaEventRecord(b); CK(cudaEventSynchronize(b));
        float ms; cudaEventElapsedTime(&ms, a, b); total += ms;
    }
    CK(cudaGetLastError());
    return total / 20;
}
