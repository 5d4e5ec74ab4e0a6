// The attention kernels on a real GPU, outside qat (nvcc, no Swift): the bf16 tensor-core kernels
// against the fp32 kernels of the same file at the models' shapes (max |Δ| / max, the selftest's
// measure), and their times (CUDA events, mean of 20 launches after 3 warm-ups).
//   nvcc -O3 -arch=sm_90 --fmad=false -Xptxas -v -o gpu_bench scripts/cuda-emu/gpu_bench.cu && ./gpu_bench
// (--fmad=false as KernelLibrary compiles them; -Xptxas -v prints registers and spills). Registers and spills
// without a GPU: `python3 -m venv /tmp/nvcc && /tmp/nvcc/bin/pip install nvidia-cuda-nvcc==13.0.88
// nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88`, then that nvcc (under site-packages/nvidia/cu13/bin) with
// -I…/cu13/include -c and the flags above (pin all three: a newer nvvm emits PTX its ptxas rejects). sdpa_bench.py times
// PyTorch's sdpa at the same shapes. Neither is part of the test suite.
#include <cstdio>
#include <cmath>
#include <vector>
#include <algorithm>
#include "../../Sources/QATCUDA/Kernels/common.cu"
#include "../../Sources/QATCUDA/Kernels/attention.cu"

#include "gpu_bench.h"

static std::vector<float> host(const float *p, size_t n) {
    std::vector<float> h(n); CK(cudaMemcpy(h.data(), p, n * 4, cudaMemcpyDeviceToHost)); return h;
}
static double rel(const std::vector<float> &r, const std::vector<float> &g) {
    double m = 0, d = 0;
    for (size_t i = 0; i < r.size(); i++) { m = std::max(m, (double)fabsf(r[i])); d = std::max(d, (double)fabsf(r[i] - g[i])); }
    return std::isnan(d) ? NAN : d / m;
}
int main() {
    struct S { const char *name; int B, T, H, Hkv, D; };
    for (S s : {S{"qwen3-0.6b", 8, 1024, 16, 8, 128}, S{"llama-3.2-1b", 8, 1024, 32, 8, 64}}) {
        int B = s.B, T = s.T, H = s.H, Hkv = s.Hkv, D = s.D, QS = D + 8;
        size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * Hkv * D, nl = (size_t)B * H * T;
        float scale = 1 / sqrtf((float)D);
        float *q = dev(nq, 1), *k = dev(nk, 2), *v = dev(nk, 3), *g = dev(nq, 4);
        float *o, *l, *o2, *l2, *dq, *dk, *dv, *dq2, *dk2, *dv2, *delta;
        for (float **p : {&o, &o2, &dq, &dq2}) CK(cudaMalloc(p, nq * 4));
        for (float **p : {&dk, &dv, &dk2, &dv2}) CK(cudaMalloc(p, nk * 4));
        for (float **p : {&l, &l2, &delta}) CK(cudaMalloc(p, nl * 4));
        u16 *q16, *k16, *v16, *g16;
        CK(cudaMalloc(&q16, nq * 2)); CK(cudaMalloc(&g16, nq * 2)); CK(cudaMalloc(&k16, nk * 2)); CK(cudaMalloc(&v16, nk * 2));
        auto conv = [&](u16 *o16, const float *x, size_t n) {
            long n4 = n / 4; attention_to_bf16<<<(unsigned)std::min<long>((n4 + 255) / 256, 132 * 16), 256>>>(o16, x, n4);
        };
        dim3 fg(B * H, (T + FA_BQ - 1) / FA_BQ), bg(B * H, (T + 63) / 64);
        size_t fsh = (FA_BQ + 4 * 64) * QS * 2;
        int tile = D == 64 ? 64 : 32;
        size_t s1 = (2 * 64 * QS + 4 * tile * QS) * 2 + 4 * tile * 4, s2 = (2 * 64 * QS + 4 * tile * QS) * 2;
        auto fwd = D == 64 ? attention_forward_bf16_d64 : attention_forward_bf16_d128;
        auto bkv = D == 64 ? attention_backward_dkdv_bf16_d64 : attention_backward_dkdv_bf16_d128;
        auto bq = D == 64 ? attention_backward_dq_bf16_d64 : attention_backward_dq_bf16_d128;
        CK(cudaFuncSetAttribute(fwd, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)fsh));
        CK(cudaFuncSetAttribute(bkv, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)s1));
        CK(cudaFuncSetAttribute(bq, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)s2));
        // fp32 references.
        size_t sh32 = (32 * (D + 1) + 32 * D + 16 * D) * 4;
        CK(cudaFuncSetAttribute(attention_forward, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sh32));
        attention_forward<<<dim3((T + 15) / 16, B * H), 128, sh32>>>(o, l, q, k, v, B, T, H, Hkv, D, 0, scale);
        attention_backward_delta<<<(B * T * H + 7) / 8, 256>>>(delta, g, o, B, T, H, D, nullptr);
        size_t shb = (2 * 32 * (D + 1) + 2 * 16 * D + 2 * 16 * 33 + 2 * 16) * 4;
        CK(cudaFuncSetAttribute(attention_backward_dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shb));
        CK(cudaFuncSetAttribute(attention_backward_dq, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)shb));
        attention_backward_dkdv<<<dim3((T + 31) / 32, B * Hkv), 256, shb>>>(dk, dv, g, l, delta, q, k, v, B, T, H, Hkv, D, 0, scale);
        attention_backward_dq<<<dim3((T + 15) / 16, B * H), 256, shb>>>(dq, g, l, delta, q, k, v, B, T, H, Hkv, D, 0, scale);
        CK(cudaDeviceSynchronize());
        // bf16.
        conv(q16, q, nq); conv(k16, k, nk); conv(v16, v, nk); conv(g16, g, nq);
        fwd<<<fg, 128, fsh>>>(o2, l2, q, k16, v16, T, H, Hkv, 0, scale);
        attention_backward_delta<<<(B * T * H + 7) / 8, 256>>>(delta, g, o2, B, T, H, D, nullptr);
        bkv<<<dim3(B * Hkv, (T + 63) / 64), 128, s1>>>(dk2, dv2, g16, l2, delta, q16, k16, v16, T, H, Hkv, 0, scale);
        bq<<<bg, 128, s2>>>(dq2, g16, l2, delta, q16, k16, v16, T, H, Hkv, 0, scale);
        CK(cudaDeviceSynchronize());
        printf("%s B=%d T=%d H=%d Hkv=%d D=%d\n", s.name, B, T, H, Hkv, D);
        printf("  bf16 vs fp32 (max|d|/max): out %.3g lse %.3g dq %.3g dk %.3g dv %.3g\n", rel(host(o, nq), host(o2, nq)),
               rel(host(l, nl), host(l2, nl)), rel(host(dq, nq), host(dq2, nq)), rel(host(dk, nk), host(dk2, nk)),
               rel(host(dv, nk), host(dv2, nk)));
        double flops = 4.0 * B * H * (double)T * T / 2 * D;   // causal forward
        float tc = timeit([&] { conv(k16, k, nk); conv(v16, v, nk); });
        float tf = timeit([&] { fwd<<<fg, 128, fsh>>>(o2, l2, q, k16, v16, T, H, Hkv, 0, scale); });
        dim3 kg(B * Hkv, (T + 63) / 64);
        float tk = timeit([&] { bkv<<<kg, 128, s1>>>(dk2, dv2, g16, l2, delta, q16, k16, v16, T, H, Hkv, 0, scale); });
        float tq = timeit([&] { bq<<<bg, 128, s2>>>(dq2, g16, l2, delta, q16, k16, v16, T, H, Hkv, 0, scale); });
        CK(cudaGetLastError());
        printf("  to_bf16 k,v %.3f ms | forward %.3f ms %.0f TFLOP/s | dkdv %.3f ms %.0f TFLOP/s | dq %.3f ms %.0f TFLOP/s\n", tc,
               tf, flops / tf / 1e9, tk, 2 * flops / tk / 1e9, tq, 1.5 * flops / tq / 1e9);
        // L2 cold (timecold): as inside a training step, where other work ran in between.
        printf("  L2 cold: forward %.3f ms | dkdv %.3f ms | dq %.3f ms | delta %.3f ms\n",
               timecold([&] { fwd<<<fg, 128, fsh>>>(o2, l2, q, k16, v16, T, H, Hkv, 0, scale); }),
               timecold([&] { bkv<<<kg, 128, s1>>>(dk2, dv2, g16, l2, delta, q16, k16, v16, T, H, Hkv, 0, scale); }),
               timecold([&] { bq<<<bg, 128, s2>>>(dq2, g16, l2, delta, q16, k16, v16, T, H, Hkv, 0, scale); }),
               timecold([&] { attention_backward_delta<<<(B * T * H + 7) / 8, 256>>>(delta, g, o2, B, T, H, D, g16); }));
        for (float *p : {q, k, v, g, o, l, o2, l2, dq, dk, dv, dq2, dk2, dv2, delta}) cudaFree(p);
        for (u16 *p : {q16, k16, v16, g16}) cudaFree(p);
    }
    return 0;
}
