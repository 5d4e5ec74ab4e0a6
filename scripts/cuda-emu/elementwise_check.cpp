// The element-wise kernels of elementwise.cu, rope.cu and rmsnorm.cu run by the CPU emulator of prelude.h, each
// against its formula applied element by element in C++ (the same rounding steps, so bit for bit where the
// kernel's order is the formula's), twice: on 16-byte aligned arrays (their float4 paths) and on arrays one
// float off (their element-by-element paths), with sizes that are not multiples of 4: `bash scripts/cuda-emu/elementwise.sh`.
// Launch geometry as in Sources/QATCUDA/CUDAOps.swift (launch1D: 256 threads, up to 16 blocks here; RMSNorm: a
// block of 128 threads per row, or 4 rows per block, a warp each, in the `_warps` kernels).
#include <cstring>
#include <string>
#include "kernels.cpp"  // written by elementwise.sh
#include "check.h"

static unsigned bitsOf(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
template <class T> static int differing(const T *a, const T *b, size_t n) {
    int d = 0;
    for (size_t i = 0; i < n; i++) d += memcmp(&a[i], &b[i], sizeof(T)) != 0;
    return d;
}
static void launch1D(long n, std::function<void()> body) {
    emu_launch({(unsigned)std::max(1L, std::min(16L, (n + 255) / 256)), 1, 1}, 256, 0, body);
}
// n floats at offset `off` of a fresh buffer (off 0: 16-byte aligned; 1: 4 bytes off).
struct Buf {
    std::vector<float> v;
    int off;
    Buf(size_t n, int off, float scale = 1) : v(n + 4), off(off) { for (size_t i = 0; i < n; i++) p()[i] = gauss() * scale; }
    float *p() { return v.data() + off; }
};
struct Buf16 {
    std::vector<u16> v;
    int off;
    Buf16(size_t n, int off) : v(n + 8, 0xffff), off(off) {}
    u16 *p() { return v.data() + off; }
};

int main() {
    // embedding_forward: rows of the table, as they are and as their bf16 rounding
    {
        const int V = 37, c = 19, n = 11;
        Buf table(V * c, 0);
        std::vector<int> tokens(n);
        for (int i = 0; i < n; i++) tokens[i] = (i * 7 + 3) % V;
        for (int round = 0; round < 2; round++) {
            std::vector<float> out(n * c, -1), want(n * c);
            for (int i = 0; i < n; i++)
                for (int j = 0; j < c; j++) {
                    float x = table.p()[tokens[i] * c + j];
                    want[i * c + j] = round ? bf16_to_f32(f32_to_bf16(x)) : x;
                }
            emu_launch({(unsigned)n, 1, 1}, 32, 0, [&] { embedding_forward(out.data(), tokens.data(), table.p(), n, c, round); });
            report(std::string("embedding_forward") + (round ? " rounded to bf16" : "") + ": values differing",
                   differing(want.data(), out.data(), out.size()), 0);
        }
    }
    for (int off : {0, 1}) {
        std::string at = off ? " (one float off)" : " (aligned)";
        for (size_t n : {(size_t)4096, (size_t)1003}) {
            std::string tag = " n=" + std::to_string(n) + at;
            Buf a(n, off), b(n, off), g(n, off, 3), u(n, off), dh(n, off);
            std::vector<float> ref(n);
            // add_inplace
            for (size_t i = 0; i < n; i++) ref[i] = __fadd_rn(a.p()[i], b.p()[i]);
            launch1D(n, [&] { add_inplace(a.p(), b.p(), (long)n); });
            report("add_inplace" + tag + ": values differing", differing(ref.data(), a.p(), n), 0);
            // to_bf16
            Buf16 h16(n, off);
            std::vector<u16> ref16(n);
            for (size_t i = 0; i < n; i++) ref16[i] = f32_to_bf16(b.p()[i]);
            launch1D(n, [&] { to_bf16(h16.p(), b.p(), (long)n); });
            report("to_bf16" + tag + ": values differing", differing(ref16.data(), h16.p(), n), 0);
            // round_bf16 (into another array, then in place)
            {
                std::vector<float> want(n), out(n);
                for (size_t i = 0; i < n; i++) want[i] = bf16_to_f32(ref16[i]);
                launch1D(n, [&] { round_bf16(out.data(), b.p(), (long)n); });
                Buf c(n, off);
                memcpy(c.p(), b.p(), n * 4);
                launch1D(n, [&] { round_bf16(c.p(), c.p(), (long)n); });
                report("round_bf16" + tag + ": values differing (out of place, in place)",
                       differing(want.data(), out.data(), n) + differing(want.data(), c.p(), n), 0);
            }
            // to_bf16_rows: [rows, cols] into rows ld apart (cols 8: the float4 path when aligned; 7: one by one), gaps kept
            for (int cols : {8, 7}) {
                int rows = 5, ld = cols + 4;
                Buf src(rows * (size_t)cols, off);
                Buf16 dst(rows * (size_t)ld, off);
                for (size_t i = 0; i < rows * (size_t)ld; i++) dst.p()[i] = 0x1234;
                launch1D(rows * cols, [&] { to_bf16_rows(dst.p(), src.p(), rows, cols, ld); });
                int bad = 0;
                for (int r = 0; r < rows; r++)
                    for (int j = 0; j < ld; j++)
                        bad += dst.p()[(size_t)r * ld + j] != (j < cols ? f32_to_bf16(src.p()[(size_t)r * cols + j]) : (u16)0x1234);
                report("to_bf16_rows cols=" + std::to_string(cols) + tag + ": values differing (gaps included)", bad, 0);
            }
            // swiglu_forward, fp32 and bf16 outputs
            Buf h(n, off);
            for (size_t i = 0; i < n; i++) ref[i] = g.p()[i] / (1.0f + expf(-g.p()[i])) * u.p()[i];
            launch1D(n, [&] { swiglu_forward(h.p(), g.p(), u.p(), (long)n, h16.p(), 0); });
            for (size_t i = 0; i < n; i++) ref16[i] = f32_to_bf16(ref[i]);
            report("swiglu_forward" + tag + ": values differing (fp32, bf16)",
                   differing(ref.data(), h.p(), n) + differing(ref16.data(), h16.p(), n), 0);
            // bf16 gate and up (and dh, below): the formulas on their values
            Buf16 g16(n, off), u16b(n, off), dh16(n, off);
            for (size_t i = 0; i < n; i++) {
                g16.p()[i] = f32_to_bf16(g.p()[i]); u16b.p()[i] = f32_to_bf16(u.p()[i]); dh16.p()[i] = f32_to_bf16(dh.p()[i]);
            }
            {
                std::vector<float> r16(n);
                for (size_t i = 0; i < n; i++) {
                    float x = bf16_to_f32(g16.p()[i]);
                    r16[i] = x / (1.0f + expf(-x)) * bf16_to_f32(u16b.p()[i]);
                }
                launch1D(n, [&] { swiglu_forward(h.p(), g16.p(), u16b.p(), (long)n, nullptr, 1); });
                report("swiglu_forward" + tag + ", bf16 gate/up: values differing", differing(r16.data(), h.p(), n), 0);
            }
            // swiglu_backward, all four outputs
            Buf dg(n, off), du(n, off);
            Buf16 dg16(n, off), du16(n, off);
            std::vector<float> rg(n), ru(n);
            for (size_t i = 0; i < n; i++) {
                float x = g.p()[i], s = 1.0f / (1.0f + expf(-x)), d = dh.p()[i];
                ru[i] = __fmul_rn(__fmul_rn(d, x), s);
                rg[i] = __fmul_rn(__fmul_rn(__fmul_rn(d, u.p()[i]), s), __fadd_rn(1.0f, __fmul_rn(x, __fsub_rn(1.0f, s))));
            }
            launch1D(n, [&] { swiglu_backward(dg.p(), du.p(), dh.p(), g.p(), u.p(), (long)n, dg16.p(), du16.p(), (int)n, (long)n, 0, 0); });
            int d = differing(rg.data(), dg.p(), n) + differing(ru.data(), du.p(), n);
            for (size_t i = 0; i < n; i++) d += (dg16.p()[i] != f32_to_bf16(rg[i])) + (du16.p()[i] != f32_to_bf16(ru[i]));
            report("swiglu_backward" + tag + ": values differing (4 outputs)", d, 0);
            for (int dout16 : {0, 1}) {   // bf16 gate/up, dh fp32 (its bf16 values) or bf16
                std::vector<float> rg16(n), ru16(n);
                for (size_t i = 0; i < n; i++) {
                    float x = bf16_to_f32(g16.p()[i]), s = 1.0f / (1.0f + expf(-x)), dd = bf16_to_f32(dh16.p()[i]);
                    ru16[i] = __fmul_rn(__fmul_rn(dd, x), s);
                    rg16[i] = __fmul_rn(__fmul_rn(__fmul_rn(dd, bf16_to_f32(u16b.p()[i])), s), __fadd_rn(1.0f, __fmul_rn(x, __fsub_rn(1.0f, s))));
                }
                Buf dhr(n, off);
                for (size_t i = 0; i < n; i++) dhr.p()[i] = bf16_to_f32(dh16.p()[i]);
                const void *dout = dout16 ? (const void *)dh16.p() : (const void *)dhr.p();
                launch1D(n, [&] { swiglu_backward(dg.p(), du.p(), dout, g16.p(), u16b.p(), (long)n, dg16.p(), du16.p(), (int)n, (long)n, 1, dout16); });
                int e = differing(rg16.data(), dg.p(), n) + differing(ru16.data(), du.p(), n);
                for (size_t i = 0; i < n; i++) e += (dg16.p()[i] != f32_to_bf16(rg16[i])) + (du16.p()[i] != f32_to_bf16(ru16[i]));
                report("swiglu_backward" + tag + ", bf16 gate/up" + (dout16 ? " and dh" : "") + ": values differing (4 outputs)", e, 0);
            }
            // the bf16 copies as rows of [dgate | dup] (cols = n / rows, rows 2·cols apart), no fp32 outputs
            for (int rows : {4, 17}) {   // (1003 = 17 · 59: the element path)
                if (n % rows) continue;
                int cols = (int)(n / rows);
                Buf16 both(2 * n, off);
                launch1D(n, [&] { swiglu_backward(nullptr, nullptr, dh.p(), g.p(), u.p(), (long)n, both.p(), both.p() + cols, cols, 2L * cols, 0, 0); });
                int bad = 0;
                for (size_t i = 0; i < n; i++) {
                    size_t r = i / cols, j = i % cols;
                    bad += (both.p()[r * 2 * cols + j] != f32_to_bf16(rg[i])) + (both.p()[r * 2 * cols + cols + j] != f32_to_bf16(ru[i]));
                }
                report("swiglu_backward" + tag + " rows=" + std::to_string(rows) + ": [dgate | dup] bf16 rows, values differing", bad, 0);
            }
        }
        // rope_apply forward then backward on [rows, heads, D], its bf16 copy too
        for (int D : {64, 6}) {
            int rows = 6, T = 3, heads = 3, half = D / 2;
            size_t n = (size_t)rows * heads * D;
            std::string tag = " D=" + std::to_string(D) + at;
            Buf x(n, off), cosT(T * half, off), sinT(T * half, off);
            Buf16 x16(n, off);
            for (float sign : {1.0f, -1.0f}) {
                std::vector<float> ref(x.p(), x.p() + n);
                std::vector<u16> ref16(n);
                for (int r = 0; r < rows; r++)
                    for (int hh = 0; hh < heads; hh++)
                        for (int i = 0; i < half; i++) {
                            float *v = ref.data() + ((size_t)r * heads + hh) * D;
                            int t = r % T;
                            float a = v[i], bb = v[i + half], c = cosT.p()[t * half + i], s = sign * sinT.p()[t * half + i];
                            v[i] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(bb, s));
                            v[i + half] = __fadd_rn(__fmul_rn(bb, c), __fmul_rn(a, s));
                        }
                for (size_t i = 0; i < n; i++) ref16[i] = f32_to_bf16(ref[i]);
                std::vector<float> x0(x.p(), x.p() + n);
                launch1D(n / 2, [&] { rope_apply(x.p(), cosT.p(), sinT.p(), rows, T, heads, D, sign, x16.p(), (long)heads * D); });
                report("rope_apply" + tag + (sign > 0 ? " forward" : " backward") + ": values differing (fp32, bf16)",
                       differing(ref.data(), x.p(), n) + differing(ref16.data(), x16.p(), n), 0);
                // the bf16 copy into rows of ld > heads·D (the fused q/k/v products' dy), from the same input
                int ld = heads * D + 8;
                std::vector<float> xs(x0);
                Buf16 w16((size_t)rows * ld, off);
                launch1D(n / 2, [&] { rope_apply(xs.data(), cosT.p(), sinT.p(), rows, T, heads, D, sign, w16.p(), (long)ld); });
                int bad = 0;
                for (int r = 0; r < rows; r++)
                    for (int j = 0; j < heads * D; j++) bad += w16.p()[(size_t)r * ld + j] != ref16[(size_t)r * heads * D + j];
                report("rope_apply" + tag + (sign > 0 ? " forward" : " backward") + ": bf16 rows " + std::to_string(ld) +
                       " apart, values differing", bad, 0);
            }
        }
        // rmsnorm_backward (accumulating) against its formula in double, and its bf16 copy
        for (int c : {2100, 2048, 100, 33}) {   // (2100: past the float4s a thread holds)
            int rows = 11;
            size_t n = (size_t)rows * c;
            std::string tag = " c=" + std::to_string(c) + at;
            Buf x(n, off), gr(n, off), w(c, off), rstd(rows, off), dx(n, off);
            for (int r = 0; r < rows; r++) rstd.p()[r] = 0.5f + 0.1f * r;
            std::vector<double> ref(n), dx0(dx.p(), dx.p() + n);
            for (int r = 0; r < rows; r++) {
                double s = 0, rs = rstd.p()[r];
                for (int j = 0; j < c; j++) s += (double)w.p()[j] * gr.p()[(size_t)r * c + j] * x.p()[(size_t)r * c + j];
                double k = s * rs * rs / c;
                for (int j = 0; j < c; j++) {
                    size_t i = (size_t)r * c + j;
                    ref[i] = dx.p()[i] + rs * ((double)w.p()[j] * gr.p()[i] - x.p()[i] * k);
                }
            }
            Buf16 d16(n, off);
            emu_launch({(unsigned)rows, 1, 1}, 128, 0,   // (a block of RMS_THREADS per row)
                       [&] { rmsnorm_backward(dx.p(), gr.p(), x.p(), w.p(), rstd.p(), rows, c, 1, d16.p(), 1, (long)c); });
            std::vector<float> got(dx.p(), dx.p() + n), reff(ref.begin(), ref.end());
            report("rmsnorm_backward" + tag + ": against the formula in double, max |diff|/max", relerr(reff, got), 1e-6);
            int d = 0;
            for (size_t i = 0; i < n; i++) d += d16.p()[i] != f32_to_bf16(got[i]);
            report("rmsnorm_backward" + tag + ": bf16 copy differing from bf16(fp32 output)", d, 0);
            // Written over its own dout (accumulate 0, dinp == dout), as the model may call it: the same values less dx.
            emu_launch({(unsigned)rows, 1, 1}, 128, 0, [&] { rmsnorm_backward(gr.p(), gr.p(), x.p(), w.p(), rstd.p(), rows, c, 0, nullptr, 1, (long)c); });
            std::vector<float> want(n);
            for (size_t i = 0; i < n; i++) want[i] = (float)(ref[i] - dx0[i]);
            report("rmsnorm_backward" + tag + ": written over dout, against the formula in double", relerr(want, std::vector<float>(gr.p(), gr.p() + n)), 1e-6);
        }
        // rmsnorm_backward_dw (the float4 path, rows of up to 2048 floats: aligned arrays only, as the host launches it):
        // dinp and its bf16 copy bit for bit rmsnorm_backward's, the partials colsum_partial's for the same rows per
        // block, then colsum_finish against the sum in double and bit for bit its slice order.
        if (off == 0) for (int c : {2048, 100, 12}) for (int rows : {37, 1}) {
            int R = 5, blocks = (rows + R - 1) / R;
            size_t n = (size_t)rows * c;
            std::string tag = " c=" + std::to_string(c) + " rows=" + std::to_string(rows);
            Buf x(n, 0), gr(n, 0), w(c, 0), rstd(rows, 0), dx(n, 0), part(blocks * (size_t)c, 0), ref(blocks * (size_t)c, 0), out(c, 0);
            for (int r = 0; r < rows; r++) rstd.p()[r] = 0.5f + 0.1f * r;
            std::vector<float> dxA(dx.p(), dx.p() + n), dxB = dxA;
            Buf16 a16(n, 0), b16(n, 0);
            std::vector<float> dxC = dxA;
            emu_launch({(unsigned)rows, 1, 1}, 128, 0, [&] { rmsnorm_backward(dxA.data(), gr.p(), x.p(), w.p(), rstd.p(), rows, c, 1, a16.p(), 1, (long)c); });
            emu_launch({(unsigned)blocks, 1, 1}, 128, 0,
                       [&] { rmsnorm_backward_dw(dxB.data(), gr.p(), x.p(), w.p(), rstd.p(), rows, c, 1, b16.p(), 1, (long)c, part.p(), R); });
            report("rmsnorm_backward_dw" + tag + ": dinp and its bf16 copy, values differing from rmsnorm_backward's",
                   differing(dxA.data(), dxB.data(), n) + differing(a16.p(), b16.p(), n), 0);
            // the bf16 copy as groups of 3 rows into rows ld apart (a q/k norm's heads into the fused products' dy)
            {
                int G = 3, groups = (rows + G - 1) / G;
                long ld = (long)G * c + 4;
                Buf16 g16((size_t)groups * ld, 0);
                Buf partC(blocks * (size_t)c, 0);
                emu_launch({(unsigned)blocks, 1, 1}, 128, 0,
                           [&] { rmsnorm_backward_dw(dxC.data(), gr.p(), x.p(), w.p(), rstd.p(), rows, c, 1, g16.p(), G, ld, partC.p(), R); });
                int bad = differing(dxA.data(), dxC.data(), n);
                for (int r = 0; r < rows; r++)
                    for (int j = 0; j < c; j++) bad += g16.p()[(r / G) * ld + (r % G) * (long)c + j] != a16.p()[(size_t)r * c + j];
                report("rmsnorm_backward_dw" + tag + ": grouped bf16 rows, values differing from rmsnorm_backward's", bad, 0);
            }
            emu_launch({(unsigned)((c + 127) / 128), (unsigned)blocks, 1}, 128, 0,
                       [&] { colsum_partial(ref.p(), gr.p(), x.p(), rstd.p(), rows, c, R); });
            report("rmsnorm_backward_dw" + tag + ": partials differing from colsum_partial's", differing(ref.p(), part.p(), blocks * (size_t)c), 0);
            std::vector<float> out0(out.p(), out.p() + c), want(c);
            std::vector<double> exact(c);
            for (int j = 0; j < c; j++) {
                float sl[8] = {0, 0, 0, 0, 0, 0, 0, 0};
                for (int b = 0; b < blocks; b++) sl[b % 8] = __fadd_rn(sl[b % 8], part.p()[(size_t)b * c + j]);
                float s = out0[j];
                for (int i = 0; i < 8; i++) s = __fadd_rn(s, sl[i]);
                want[j] = s;
                exact[j] = out0[j];
                for (int r = 0; r < rows; r++) exact[j] += (double)gr.p()[(size_t)r * c + j] * x.p()[(size_t)r * c + j] * rstd.p()[r];
            }
            emu_launch({(unsigned)((c + 31) / 32), 1, 1}, 256, 0, [&] { colsum_finish(out.p(), part.p(), blocks, c); });
            report("colsum_finish" + tag + ": values differing from its slice order", differing(want.data(), out.p(), c), 0);
            std::vector<float> got(out.p(), out.p() + c);
            report("colsum_finish" + tag + ": the weight gradient against the sum in double, max |diff|/max", relerr(std::vector<float>(exact.begin(), exact.end()), got), 1e-5);
        }
        // The warp-per-row kernels of short rows (c ≤ 128, the float4 path: aligned arrays, as the host launches them)
        // against the block kernels on the same rows, bit for bit: rmsnorm_forward (output, rstd, bf16 copy),
        // rmsnorm_backward (accumulating, the bf16 copy into grouped rows), rmsnorm_backward_dw (dinp, its copy, and
        // the partials of R rows per warp against the block kernel's for R rows per block). 4 rows per block.
        if (off == 0) for (int c : {128, 100, 64, 4}) for (int rows : {37, 1}) {
            size_t n = (size_t)rows * c;
            std::string tag = " c=" + std::to_string(c) + " rows=" + std::to_string(rows);
            unsigned wblocks = (rows + 3) / 4;
            Buf x(n, 0, 2), w(c, 0), o1(n, 0), o2(n, 0), rs1(rows, 0), rs2(rows, 0), gr(n, 0), d0(n, 0);
            Buf16 a16(n, 0), b16(n, 0);
            emu_launch({(unsigned)rows, 1, 1}, 128, 0, [&] { rmsnorm_forward(o1.p(), rs1.p(), x.p(), w.p(), rows, c, 1e-6f, a16.p()); });
            emu_launch({wblocks, 1, 1}, 128, 0, [&] { rmsnorm_forward_warps(o2.p(), rs2.p(), x.p(), w.p(), rows, c, 1e-6f, b16.p()); });
            report("rmsnorm_forward_warps" + tag + ": output, rstd, bf16 copy, values differing from rmsnorm_forward's",
                   differing(o1.p(), o2.p(), n) + differing(rs1.p(), rs2.p(), rows) + differing(a16.p(), b16.p(), n), 0);
            int G = 3, groups = (rows + G - 1) / G;
            long ld = (long)G * c + 4;
            std::vector<float> dA(d0.p(), d0.p() + n), dB = dA;
            Buf16 g1((size_t)groups * ld, 0), g2((size_t)groups * ld, 0);
            emu_launch({(unsigned)rows, 1, 1}, 128, 0,
                       [&] { rmsnorm_backward(dA.data(), gr.p(), x.p(), w.p(), rs1.p(), rows, c, 1, g1.p(), G, ld); });
            emu_launch({wblocks, 1, 1}, 128, 0,
                       [&] { rmsnorm_backward_warps(dB.data(), gr.p(), x.p(), w.p(), rs1.p(), rows, c, 1, g2.p(), G, ld); });
            report("rmsnorm_backward_warps" + tag + ": dinp, grouped bf16 rows, values differing from rmsnorm_backward's",
                   differing(dA.data(), dB.data(), n) + differing(g1.p(), g2.p(), (size_t)groups * ld), 0);
            int R = 5, parts = (rows + R - 1) / R;
            std::vector<float> dC(d0.p(), d0.p() + n), dD = dC;
            Buf16 c16(n, 0), e16(n, 0);
            Buf p1((size_t)parts * c, 0), p2((size_t)parts * c, 0);
            emu_launch({(unsigned)parts, 1, 1}, 128, 0,
                       [&] { rmsnorm_backward_dw(dC.data(), gr.p(), x.p(), w.p(), rs1.p(), rows, c, 0, c16.p(), 1, (long)c, p1.p(), R); });
            emu_launch({(unsigned)((parts + 3) / 4), 1, 1}, 128, 0,
                       [&] { rmsnorm_backward_dw_warps(dD.data(), gr.p(), x.p(), w.p(), rs1.p(), rows, c, 0, e16.p(), 1, (long)c, p2.p(), R); });
            report("rmsnorm_backward_dw_warps" + tag + ": dinp, bf16 copy, partials, values differing from rmsnorm_backward_dw's",
                   differing(dC.data(), dD.data(), n) + differing(c16.p(), e16.p(), n) + differing(p1.p(), p2.p(), (size_t)parts * c), 0);
        }
    }
    printf("%s: %d failed\n", fails ? "FAIL" : "ok", fails);
    return fails ? 1 : 0;
}
