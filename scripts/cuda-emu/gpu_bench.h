// Helpers of the GPU-host benches of this folder (gpu_bench.cu, gpu_bench_quant.cu; nvcc, no Swift).
#pragma once
#include <cstdio>
#include <cstdlib>
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
