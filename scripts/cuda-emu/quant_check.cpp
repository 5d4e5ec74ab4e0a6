// The NVFP4 kernels of quant.cu run by the CPU emulator of prelude.h: nvfp4_fake_quant against a
// C++ port of NVFP4.fakeQuant (Sources/QATQuant/NVFP4.swift: blockScale, fakeElem) and swiglu_nvfp4
// against swiglu_forward then nvfp4_fake_quant, all bit for bit, and swiglu_backward's optional
// outputs: `bash scripts/cuda-emu/quant.sh`.
// Launch geometry as in Sources/QATCUDA/CUDAOps.swift (launch1D: 256 threads, four threads per block of 16;
// RMSNorm: a block of 128 threads per row). The `_quads` kernels (aligned rows of whole 16-blocks) run beside
// their general forms on the aligned arrays. Each shape runs twice: the arrays 16-byte aligned (the float4 paths) and one float
// off (the element-by-element paths).
#include <cstring>
#include <string>
#include "kernels.cpp"  // written by quant.sh
#include "check.h"

static unsigned bits(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static float fromBits(unsigned u) { float f; memcpy(&f, &u, 4); return f; }

// NVFP4.blockScale and NVFP4.fakeElem, line for line (mode 0: ModelOpt, 1: export).
static float blockScale(float bmax, float gs, int mode) {
    if (mode == 0) {
        float gsSafe = gs > 0 ? gs : 1e-12f;
        float s = std::min(bmax / (6 * gsSafe), 448.0f);
        float S = e4m3_round(s) * gs;
        return S >= 1e-5f ? S : 1;
    }
    if (gs == 0) return 0;
    float s = bmax / (6 * gs);
    if (s == 0) s = 1;
    s = std::min(std::max(s, 0.001953125f), 448.0f);
    return e4m3_round(s) * gs;
}
static float fakeElem(float v, float S, float zeroFix) {
    float a = fromBits(bits(v) & 0x7fffffffu) / S;
    float c = a < 6 ? a : 6;
    float magic = c < 2 ? 4194304.0f : (c < 4 ? 8388608.0f : 16777216.0f);
    float r = ((c + magic) - magic) * S;
    unsigned neg = v < 0 ? 0x80000000u : 0;
    return fromBits(bits(r) ^ neg) + zeroFix;
}
// NVFP4.fakeQuant over [rows, cols]: per block of 16 along cols (the last one partial).
static std::vector<float> fakeQuantRef(const std::vector<float> &x, int rows, int cols, float amax, int mode) {
    std::vector<float> out(x.size());
    float gs = amax / 2688, zeroFix = mode == 1 ? 0.0f : -0.0f;
    for (int r = 0; r < rows; r++)
        for (int c0 = 0; c0 < cols; c0 += 16) {
            int w = std::min(16, cols - c0);
            unsigned m = 0;
            for (int i = 0; i < w; i++) m = std::max(m, bits(x[(size_t)r * cols + c0 + i]) & 0x7fffffffu);
            float S = blockScale(fromBits(m), gs, mode);
            for (int i = 0; i < w; i++) {
                size_t j = (size_t)r * cols + c0 + i;
                out[j] = mode == 1 && S == 0 ? 0.0f : fakeElem(x[j], S, zeroFix);
            }
        }
    return out;
}

static int differing(const std::vector<u16> &a, const std::vector<u16> &b) {
    int d = 0;
    for (size_t i = 0; i < a.size(); i++) d += a[i] != b[i];
    return d;
}
static int differing(const std::vector<float> &a, const std::vector<float> &b) {
    int d = 0;
    for (size_t i = 0; i < a.size(); i++) d += bits(a[i]) != bits(b[i]);
    return d;
}
// x one element later in a vector one longer (its data() + 1 is 4 bytes off 16-byte alignment), and back.
template <class T> static std::vector<T> offByOne(const std::vector<T> &x) {
    std::vector<T> y(x.size() + 1);
    std::copy(x.begin(), x.end(), y.begin() + 1);
    return y;
}
template <class T> static std::vector<T> dropFirst(const std::vector<T> &y) { return std::vector<T>(y.begin() + 1, y.end()); }
static void launch(long blocks, std::function<void()> body) { emu_launch({(unsigned)((blocks + 255) / 256), 1, 1}, 256, 0, body); }
// The RMSNorm kernels' geometry: a block of RMS_THREADS per row.
static void launchRows(int rows, std::function<void()> body) { emu_launch({(unsigned)rows, 1, 1}, RMS_THREADS, 0, body); }

int main() {
    struct Shape { int rows, cols; float scale; };
    for (Shape s : {Shape{33, 3072, 3}, Shape{5, 2048, 1}, Shape{4, 1040, 2}, Shape{7, 100, 1}, Shape{5, 102, 2}, Shape{3, 16, 1e-7f},
                    Shape{2, 15, 40}}) {
        int rows = s.rows, cols = s.cols;
        size_t n = (size_t)rows * cols;
        long blocks = 4L * rows * ((cols + 15) / 16);   // (threads: CUDADevice.nvfp4Threads)
        std::vector<float> g(n), u(n);
        for (auto &v : g) v = gauss() * s.scale;
        for (auto &v : u) v = gauss() * 2;
        for (int i = 0; i < std::min<int>(16, cols); i++) g[i] = 0;  // an all-zero block
        float amax = 0;
        for (float v : g) amax = std::max(amax, fabsf(v));
        std::string shape = std::to_string(rows) + "x" + std::to_string(cols);
        for (int mode = 0; mode < 2; mode++) {
            std::string tag = shape + (mode ? " export" : " modelopt");
            for (float a : {amax, mode == 1 ? 0.0f : amax * 3}) {  // (export with a zero global amax: every block 0)
                std::vector<float> ref = fakeQuantRef(g, rows, cols, a, mode), got(n);
                launch(blocks, [&] { nvfp4_fake_quant(g.data(), got.data(), nullptr, rows, cols, a, mode); });
                report("nvfp4_fake_quant fp32 " + tag + " amax " + std::to_string(a) + ": values differing from NVFP4.fakeQuant",
                       differing(ref, got), 0);
                std::vector<u16> got16(n), ref16(n);
                launch(blocks, [&] { nvfp4_fake_quant(g.data(), nullptr, got16.data(), rows, cols, a, mode); });
                for (size_t i = 0; i < n; i++) ref16[i] = f32_to_bf16(ref[i]);
                report("nvfp4_fake_quant bf16 " + tag + ": values differing from bf16(NVFP4.fakeQuant)", differing(ref16, got16), 0);
                if (cols % 16 == 0) {
                    std::vector<float> gotq(n);
                    std::vector<u16> gotq16(n);
                    launch(blocks, [&] { nvfp4_fake_quant_quads(g.data(), gotq.data(), nullptr, rows, cols, a, mode); });
                    launch(blocks, [&] { nvfp4_fake_quant_quads(g.data(), nullptr, gotq16.data(), rows, cols, a, mode); });
                    report("nvfp4_fake_quant_quads fp32 and bf16 " + tag + ": values differing from NVFP4.fakeQuant",
                           differing(ref, gotq) + differing(ref16, gotq16), 0);
                }
                std::vector<float> in1 = offByOne(g), out1(n + 1);
                launch(blocks, [&] { nvfp4_fake_quant(in1.data() + 1, out1.data() + 1, nullptr, rows, cols, a, mode); });
                report("nvfp4_fake_quant fp32 " + tag + ", arrays one float off: values differing from NVFP4.fakeQuant",
                       differing(ref, dropFirst(out1)), 0);
            }
            // swiglu_nvfp4 (bf16 gate and up) against swiglu_forward then nvfp4_fake_quant(bf16out).
            std::vector<float> h(n);
            std::vector<u16> g16(n), u16v(n);
            for (size_t i = 0; i < n; i++) { g16[i] = f32_to_bf16(g[i]); u16v[i] = f32_to_bf16(u[i]); }
            emu_launch({(unsigned)((n + 255) / 256), 1, 1}, 256, 0, [&] { swiglu_forward(h.data(), g16.data(), u16v.data(), (long)n, nullptr, 1); });
            float hmax = 0;
            for (float v : h) hmax = std::max(hmax, fabsf(v));
            std::vector<u16> two(n), fused(n);
            launch(blocks, [&] { nvfp4_fake_quant(h.data(), nullptr, two.data(), rows, cols, hmax, mode); });
            launch(blocks, [&] { swiglu_nvfp4(g16.data(), u16v.data(), fused.data(), rows, cols, hmax, mode); });
            report("swiglu_nvfp4 " + tag + ": values differing from swiglu_forward + nvfp4_fake_quant", differing(two, fused), 0);
            if (cols % 16 == 0) {
                std::vector<u16> quads(n);
                launch(blocks, [&] { swiglu_nvfp4_quads(g16.data(), u16v.data(), quads.data(), rows, cols, hmax, mode); });
                report("swiglu_nvfp4_quads " + tag + ": values differing from swiglu_forward + nvfp4_fake_quant", differing(two, quads), 0);
            }
            std::vector<u16> g1(n + 1), u1(n + 1), fused1(n + 1);   // one bf16 off (2 bytes: the element path)
            std::copy(g16.begin(), g16.end(), g1.begin() + 1);
            std::copy(u16v.begin(), u16v.end(), u1.begin() + 1);
            launch(blocks, [&] { swiglu_nvfp4(g1.data() + 1, u1.data() + 1, fused1.data() + 1, rows, cols, hmax, mode); });
            report("swiglu_nvfp4 " + tag + ", arrays one bf16 off: values differing", differing(fused, dropFirst(fused1)), 0);
            // rmsnorm_nvfp4 against rmsnorm_forward then nvfp4_fake_quant(bf16out), rstd too (rows of whole 16-blocks).
            if (cols % 16 == 0) {
                std::vector<float> y(n), w(cols), rs1(rows), rs2(rows);
                for (auto &v : w) v = 1 + 0.3f * gauss();
                launchRows(rows,
                           [&] { rmsnorm_forward(y.data(), rs1.data(), g.data(), w.data(), rows, cols, 1e-6f, nullptr); });
                float ymax = 0;
                for (float v : y) ymax = std::max(ymax, fabsf(v));
                {   // rmsnorm_forward against its formula in double (every element, so each row's re-read tail too)
                    std::vector<float> yd(n), rsd(rows);
                    for (int r = 0; r < rows; r++) {
                        double ss = 0;
                        for (int j = 0; j < cols; j++) ss += (double)g[r * cols + j] * g[r * cols + j];
                        double rr = 1 / sqrt(ss / cols + 1e-6);
                        rsd[r] = (float)rr;
                        for (int j = 0; j < cols; j++) yd[r * cols + j] = (float)(w[j] * (g[r * cols + j] * rr));
                    }
                    report("rmsnorm_forward " + tag + ": output and rstd against the formula in double, max |diff|/max",
                           std::max(relerr(yd, y), relerr(rsd, rs1)), 1e-6);
                }
                std::vector<u16> ref2(n), fused2(n);
                launch(blocks, [&] { nvfp4_fake_quant(y.data(), nullptr, ref2.data(), rows, cols, ymax, mode); });
                launchRows(rows, [&] {
                    rmsnorm_nvfp4(fused2.data(), rs2.data(), g.data(), w.data(), rows, cols, 1e-6f, ymax, mode);
                });
                report("rmsnorm_nvfp4 " + tag + ": values differing from rmsnorm_forward + nvfp4_fake_quant",
                       differing(ref2, fused2) + differing(rs1, rs2), 0);
                {   // rmsnorm_forward with only the bf16 copy (out null), as an inference forward asks: bf16(y), rstd
                    std::vector<u16> y16(n), want16(n);
                    std::vector<float> rs5(rows);
                    for (int i = 0; i < n; i++) want16[i] = f32_to_bf16(y[i]);
                    launchRows(rows, [&] { rmsnorm_forward(nullptr, rs5.data(), g.data(), w.data(), rows, cols, 1e-6f, y16.data()); });
                    report("rmsnorm_forward " + tag + ", bf16 copy only: values differing from bf16(its fp32 output)",
                           differing(want16, y16) + differing(rs1, rs5), 0);
                }
                // One float off: the element-by-element paths of both kernels (their own order of the squares), again
                // against each other.
                std::vector<float> g1 = offByOne(g), y1(n + 1), rs3(rows), rs4(rows);
                std::vector<u16> ref3(n), fused3(n + 1);
                launchRows(rows,
                           [&] { rmsnorm_forward(y1.data() + 1, rs3.data(), g1.data() + 1, w.data(), rows, cols, 1e-6f, nullptr); });
                launch(blocks, [&] { nvfp4_fake_quant(y1.data() + 1, nullptr, ref3.data(), rows, cols, ymax, mode); });
                launchRows(rows, [&] {
                    rmsnorm_nvfp4(fused3.data() + 1, rs4.data(), g1.data() + 1, w.data(), rows, cols, 1e-6f, ymax, mode);
                });
                report("rmsnorm_nvfp4 " + tag + ", arrays one float off: values differing from rmsnorm_forward + nvfp4_fake_quant",
                       differing(ref3, dropFirst(fused3)) + differing(rs3, rs4), 0);
                // (the float4 and the element paths add the squares in other orders: equal within round-off)
                report("rmsnorm_forward " + tag + ", one float off against aligned, max |diff|/max",
                       relerr(y, dropFirst(y1)), 1e-6);
            }
        }
    }
    // adamw_update's NVFP4 refresh of the product copy (refresh 1) against the step then nvfp4_fake_quant(bf16out).
    for (int mode = 0; mode < 2; mode++) {
        int rows = 9, cols = 48;
        size_t n = (size_t)rows * cols;
        std::vector<float> p(n), g(n), m(n), v(n);
        for (size_t i = 0; i < n; i++) { p[i] = gauss(); g[i] = 0.01f * gauss(); }
        std::vector<float> p2 = p, m2 = m, v2 = v;
        float amax = 2.5f;
        std::vector<u16> fused(n, 0xffff), two(n, 0xfffe);
        auto step = [&](std::vector<float> &pp, std::vector<float> &mm, std::vector<float> &vv, u16 *w16) {
            launch(n / 4, [&] {
                adamw_update(pp.data(), g.data(), mm.data(), vv.data(), (long)n, 0.999f, 0, 0.1f, 0.95f, 0.05f, 0.2236068f, 1e-8f, -1e-2f,
                             1.0f, w16, 1, amax, mode);
            });
        };
        step(p, m, v, fused.data());
        step(p2, m2, v2, nullptr);
        launch(n / 4, [&] { nvfp4_fake_quant(p2.data(), nullptr, two.data(), rows, cols, amax, mode); });
        report(std::string("adamw_update NVFP4 refresh ") + (mode ? "export" : "modelopt") +
                   ": copy differing from the step then nvfp4_fake_quant, weights differing",
               differing(two, fused) + differing(p, p2), 0);
    }
    // swiglu_backward's outputs each on its own (a null pointer writes nothing): the fp32 pair alone,
    // then the bf16 pair alone, which must be the bf16 rounding of the first run's values.
    for (size_t n : {(size_t)4096, (size_t)1001}) {
        std::vector<float> dh(n), g(n), u(n), dg(n), du(n);
        for (size_t i = 0; i < n; i++) { dh[i] = gauss(); g[i] = gauss() * 3; u[i] = gauss(); }
        std::vector<u16> dg16(n, 0xffff), du16(n, 0xffff);
        dim3e grid{(unsigned)((n + 255) / 256), 1, 1};
        emu_launch(grid, 256, 0, [&] { swiglu_backward(dg.data(), du.data(), dh.data(), g.data(), u.data(), (long)n, nullptr, nullptr, (int)n, (long)n, 0, 0); });
        emu_launch(grid, 256, 0, [&] { swiglu_backward(nullptr, nullptr, dh.data(), g.data(), u.data(), (long)n, dg16.data(), du16.data(), (int)n, (long)n, 0, 0); });
        int d = 0;
        for (size_t i = 0; i < n; i++) d += (dg16[i] != f32_to_bf16(dg[i])) + (du16[i] != f32_to_bf16(du[i]));
        report("swiglu_backward n=" + std::to_string(n) + ": bf16 outputs differing from bf16(fp32 outputs)", d, 0);
        double e = 0, m = 0;  // against SwiGLU.backward's formulas in double, relative to the largest value
        for (size_t i = 0; i < n; i++) {
            double x = g[i], s = 1 / (1 + exp(-x));
            double rg = dh[i] * u[i] * s * (1 + x * (1 - s)), ru = dh[i] * x * s;
            e = std::max(e, std::max(fabs(rg - dg[i]), fabs(ru - du[i])));
            m = std::max(m, std::max(fabs(rg), fabs(ru)));
        }
        report("swiglu_backward n=" + std::to_string(n) + ": fp32 against the formulas in double, max |diff|/max", e / m, 1e-6);
    }
    printf("%s: %d failed\n", fails ? "FAIL" : "ok", fails);
    return fails ? 1 : 0;
}
