// The NVFP4 kernels (quant.cu, rmsnorm.cu) on a real GPU, outside qat (nvcc, no Swift), at the Llama-3.2-1B
// shapes of a training step (8×1024 tokens): swiglu_nvfp4 [8192 × 8192], nvfp4_fake_quant, rmsnorm_nvfp4 and the RMSNorm
// forward and backward [8192 × 2048]. Times (CUDA events, mean of 20 launches after 3 warm-ups; GB/s of the bytes each must move) and,
// for the `_quads` forms and the fused norm, how many outputs differ from the general kernels', bit for bit.
//   nvcc -O3 -arch=sm_90 --fmad=false -Xptxas -v -o gpu_bench_quant scripts/cuda-emu/gpu_bench_quant.cu && ./gpu_bench_quant
// (`./gpu_bench_quant once` runs each kernel once, for ncu). Session 10 measured with it, before the `_quads`
// kernels and the block-per-row RMSNorm existed, the variants that led to them (bench/gpu-h200-quant-kernels.txt):
// the quad path alone in 32 registers, 258 → 185 µs (swiglu_nvfp4) and 46 → 39 µs (nvfp4_fake_quant); a block of
// 128 threads per row holding it in registers, 56 → 40 µs (rmsnorm_nvfp4); a division through the block's
// reciprocal with the exact division near rounding ties, slower (192 µs). Session 11 added RMSNorm's backward with its
// weight gradient (rmsnorm_backward_dw + colsum_finish against colsum_partial + colsum_finish + rmsnorm_backward) and
// adamw_update at grid sizes around launch1D's (132·16 blocks of 256). Not part of the test suite.
#include <cstdio>
#include <cmath>
#include <cstring>
#include <vector>
#include <algorithm>
#include "../../Sources/QATCUDA/Kernels/common.cu"
#include "../../Sources/QATCUDA/Kernels/rmsnorm.cu"
#include "../../Sources/QATCUDA/Kernels/quant.cu"
#include "../../Sources/QATCUDA/Kernels/elementwise.cu"
#include "../../Sources/QATCUDA/Kernels/optim.cu"

#include "gpu_bench.h"

template <class T> static long diff(const T *a, const T *b, size_t n) {
    CK(cudaDeviceSynchronize());
    std::vector<T> x(n), y(n);
    CK(cudaMemcpy(x.data(), a, n * sizeof(T), cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(y.data(), b, n * sizeof(T), cudaMemcpyDeviceToHost));
    long d = 0;
    for (size_t i = 0; i < n; i++) d += memcmp(&x[i], &y[i], sizeof(T)) != 0;
    return d;
}
static void report(const char *name, float ms, double bytes) {
    printf("  %-34s %8.1f us %7.0f GB/s\n", name, ms * 1000, bytes / (ms * 1e-3) / 1e9);
}
int main(int argc, char **argv) {
    bool once = argc > 1;   // for ncu: every kernel once, nothing timed
    long R = 8192, sms = 132;
    auto grid = [&](long threads) { return (unsigned)std::min<long>((threads + 255) / 256, sms * 16); };   // launch1D
    for (int mode = 0; mode < 2; mode++) {
        printf("mode %d\n", mode);
        {   // swiglu_nvfp4 [8192 x 8192], bf16 gate and up
            long C = 8192, n = R * C;
            u16 *g = dev16(n, 1, 8.0f), *u = dev16(n, 2, 8.0f);
            u16 *a, *b; CK(cudaMalloc(&a, n * 2)); CK(cudaMalloc(&b, n * 2));
            unsigned bl = grid(4 * n / 16);
            auto gen = [&] { swiglu_nvfp4<<<bl, 256>>>(g, u, a, R, (int)C, 16.0f, mode); };
            auto quads = [&] { swiglu_nvfp4_quads<<<bl, 256>>>(g, u, b, R, (int)C, 16.0f, mode); };
            if (once) { gen(); quads(); } else {
                report("swiglu_nvfp4", timeit(gen), n * 10.0);
                report("swiglu_nvfp4_quads", timeit(quads), n * 10.0);
                printf("    quads: %ld values differ\n", diff(a, b, n));
            }
            cudaFree(g); cudaFree(u); cudaFree(a); cudaFree(b);
        }
        {   // nvfp4_fake_quant [8192 x 2048] -> bf16
            long C = 2048, n = R * C;
            float *x = dev(n, 3, 6.0f);
            u16 *a, *b; CK(cudaMalloc(&a, n * 2)); CK(cudaMalloc(&b, n * 2));
            unsigned bl = grid(4 * n / 16);
            auto gen = [&] { nvfp4_fake_quant<<<bl, 256>>>(x, (float *)0, a, R, (int)C, 3.0f, mode); };
            auto quads = [&] { nvfp4_fake_quant_quads<<<bl, 256>>>(x, (float *)0, b, R, (int)C, 3.0f, mode); };
            if (once) { gen(); quads(); } else {
                report("nvfp4_fake_quant", timeit(gen), n * 6.0);
                report("nvfp4_fake_quant_quads", timeit(quads), n * 6.0);
                printf("    quads: %ld values differ\n", diff(a, b, n));
            }
            cudaFree(x); cudaFree(a); cudaFree(b);
        }
        {   // rmsnorm_nvfp4 [8192 x 2048] against rmsnorm_forward then nvfp4_fake_quant_quads
            int C = 2048; long n = R * C;
            float *x = dev(n, 4, 4.0f), *w = dev(C, 5, 2.0f), *y, *rs1, *rs2;
            u16 *a, *b; CK(cudaMalloc(&a, n * 2)); CK(cudaMalloc(&b, n * 2));
            CK(cudaMalloc(&y, n * 4)); CK(cudaMalloc(&rs1, R * 4)); CK(cudaMalloc(&rs2, R * 4));
            auto norm = [&] { rmsnorm_forward<<<(unsigned)R, RMS_THREADS>>>(y, rs1, x, w, (int)R, C, 1e-5f, (u16 *)0); };
            auto fused = [&] { rmsnorm_nvfp4<<<(unsigned)R, RMS_THREADS>>>(b, rs2, x, w, (int)R, C, 1e-5f, 12.0f, mode); };
            if (once) { norm(); fused(); } else {
                report("rmsnorm_forward", timeit(norm), n * 8.0);
                report("rmsnorm_nvfp4", timeit(fused), n * 6.0);

                nvfp4_fake_quant_quads<<<grid(4 * n / 16), 256>>>(y, (float *)0, a, R, C, 12.0f, mode);
                printf("    rmsnorm_nvfp4: %ld values and %ld rstd differ from rmsnorm_forward + nvfp4_fake_quant_quads\n",
                       diff(a, b, n), diff(rs1, rs2, R));
                float *gr = dev(n, 6, 2.0f), *dx = dev(n, 7, 2.0f);   // (its bf16 copy into a: the check above is done)
                report("rmsnorm_backward (accumulate, bf16)", timeit([&] {
                    rmsnorm_backward<<<(unsigned)R, RMS_THREADS>>>(dx, gr, x, w, rs1, (int)R, C, 1, a, 1, (long)C);
                }), n * 18.0);
                // with the weight gradient: rmsnorm_backward_dw (512 blocks of 16 rows) + colsum_finish against
                // colsum_partial (128 blocks of 64 rows) + colsum_finish + rmsnorm_backward, as CUDAOps+Backward.swift
                float *part, *dw; CK(cudaMalloc(&part, 512 * C * 4)); CK(cudaMalloc(&dw, C * 4));
                report("rmsnorm_backward_dw + finish", timeit([&] {
                    rmsnorm_backward_dw<<<512, RMS_THREADS>>>(dx, gr, x, w, rs1, (int)R, C, 1, a, 1, (long)C, part, 16);
                    colsum_finish<<<C / 32, 256>>>(dw, part, 512, C);
                }), n * 18.0);
                report("colsum (partial + finish) + rmsnorm_backward", timeit([&] {
                    colsum_partial<<<dim3(C / 128, 128), 128>>>(part, gr, x, rs1, (int)R, C, 64);
                    colsum_finish<<<C / 32, 256>>>(dw, part, 128, C);
                    rmsnorm_backward<<<(unsigned)R, RMS_THREADS>>>(dx, gr, x, w, rs1, (int)R, C, 1, a, 1, (long)C);
                }), n * 18.0);
                cudaFree(gr); cudaFree(dx); cudaFree(part); cudaFree(dw);
            }
            cudaFree(x); cudaFree(w); cudaFree(y); cudaFree(a); cudaFree(b); cudaFree(rs1); cudaFree(rs2);
        }
    }
    if (!once) {   // adamw_update over an embedding-sized [128256 × 2048] parameter: 30 bytes per element with w16
        long n = 128256L * 2048;
        float *p = dev(n, 8, 0.1f), *g = dev(n, 9, 0.01f), *m = dev(n, 10, 0.001f), *v = dev(n, 11, 0.0f);
        CK(cudaMemset(v, 0, n * 4));
        u16 *w16; CK(cudaMalloc(&w16, n * 2));
        for (int refresh = 0; refresh < 2; refresh++)
            for (long blocks : {sms * 4, sms * 8, sms * 16, sms * 32, (n / 4 + 255) / 256}) {
                char name[64];
                snprintf(name, sizeof name, "adamw_update refresh %d, %ld blocks", refresh, blocks);
                report(name, timeit([&] {
                    adamw_update<<<(unsigned)blocks, 256>>>(p, g, m, v, n, 0.99999f, 1, 0.1f, 0.999f, 0.001f, 0.03f, 1e-8f, -1e-6f,
                                                            1.0f, w16, refresh, 0.05f, 0);
                }), n * 30.0);
            }
        cudaFree(p); cudaFree(g); cudaFree(m); cudaFree(v); cudaFree(w16);
    }
    CK(cudaDeviceSynchronize());
    return 0;
}
