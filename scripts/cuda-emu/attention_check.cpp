// The attention kernels (Sources/QATCUDA/Kernels/attention.cu), forward and backward, fp32 and bf16,
// run by the CPU emulator of prelude.h against a float64 reference: `bash scripts/cuda-emu/run.sh`.
// Launch geometry and shared memory sizes as in Sources/QATCUDA/CUDAOps+Attention.swift.
#include <string>
#include "kernels.cpp"  // written by gen.py
#include "check.h"
int main(int argc, char **argv) {
    struct Case { int H, Hkv, D, W, T, B; };
    std::vector<Case> cases = {{4, 2, 32, 0, 70, 2}, {6, 2, 48, 20, 45, 2}, {2, 1, 128, 0, 33, 2}, {4, 2, 64, 0, 150, 2},
                               {4, 1, 128, 50, 130, 2}, {2, 2, 64, 0, 7, 2}, {4, 2, 96, 0, 100, 2}, {4, 1, 64, 40, 200, 2},
                               {2, 1, 256, 0, 40, 1}, {2, 1, 128, 70, 200, 1}, {3, 3, 64, 2, 65, 1}, {2, 1, 64, 0, 1, 1},
                               {2, 1, 128, 0, 1, 2}, {4, 2, 128, 0, 64, 1}, {4, 1, 128, 0, 300, 1}, {2, 2, 64, 100, 257, 1},
                               {8, 2, 128, 33, 190, 1}};
    bool only_bf16 = argc > 1;
    for (auto c : cases) {
        int B = c.B, T = c.T, H = c.H, Hkv = c.Hkv, D = c.D, W = c.W, G = H / Hkv;
        float scale = 1 / sqrtf((float)D);
        size_t nq = (size_t)B * T * H * D, nk = (size_t)B * T * Hkv * D, nl = (size_t)B * H * T;
        std::vector<float> q(nq), k(nk), v(nk), dout(nq);
        for (auto &x : q) x = gauss(); for (auto &x : k) x = gauss(); for (auto &x : v) x = gauss(); for (auto &x : dout) x = gauss();
        // Reference in double.
        std::vector<float> out(nq), lse(nl), dq(nq), dk(nk, 0), dv(nk, 0);
        std::vector<double> dkd(nk, 0), dvd(nk, 0);
        for (int b = 0; b < B; b++) for (int h = 0; h < H; h++) {
            int g = h / G;
            for (int i = 0; i < T; i++) {
                const float *qi = &q[((size_t)(b * T + i) * H + h) * D], *gi = &dout[((size_t)(b * T + i) * H + h) * D];
                std::vector<double> s(T, -INFINITY), p(T, 0), dp(T, 0);
                double mx = -INFINITY;
                for (int j = 0; j <= i; j++) {
                    if (W > 0 && i - j >= W) continue;
                    const float *kj = &k[((size_t)(b * T + j) * Hkv + g) * D];
                    double d = 0; for (int e = 0; e < D; e++) d += (double)qi[e] * kj[e];
                    s[j] = d * scale; mx = std::max(mx, s[j]);
                }
                double sum = 0; for (int j = 0; j < T; j++) if (s[j] > -INFINITY) sum += exp(s[j] - mx);
                double L = mx + log(sum);
                lse[((size_t)b * H + h) * T + i] = (float)L;
                std::vector<double> o(D, 0);
                double delta = 0;
                for (int j = 0; j < T; j++) if (s[j] > -INFINITY) {
                    p[j] = exp(s[j] - L);
                    const float *vj = &v[((size_t)(b * T + j) * Hkv + g) * D];
                    double d = 0; for (int e = 0; e < D; e++) { o[e] += p[j] * vj[e]; d += (double)gi[e] * vj[e]; }
                    dp[j] = d; delta += p[j] * d;
                }
                for (int e = 0; e < D; e++) out[((size_t)(b * T + i) * H + h) * D + e] = (float)o[e];
                std::vector<double> dqi(D, 0);
                for (int j = 0; j < T; j++) if (p[j] != 0) {
                    double ds = p[j] * (dp[j] - delta);
                    size_t ko = ((size_t)(b * T + j) * Hkv + g) * D;
                    for (int e = 0; e < D; e++) {
                        dqi[e] += scale * ds * k[ko + e];
                        dkd[ko + e] += scale * ds * qi[e];
                        dvd[ko + e] += p[j] * gi[e];
                    }
                }
                for (int e = 0; e < D; e++) dq[((size_t)(b * T + i) * H + h) * D + e] = (float)dqi[e];
            }
        }
        for (size_t i = 0; i < nk; i++) { dk[i] = (float)dkd[i]; dv[i] = (float)dvd[i]; }
        char label[128];
        snprintf(label, sizeof label, "B=%d H=%d Hkv=%d D=%d T=%d W=%d", B, H, Hkv, D, T, W);
        for (int bf = 0; bf < 2; bf++) {
            if (bf && D != 64 && D != 128) continue;
            if (!bf && only_bf16) continue;
            std::vector<float> go(nq, NAN), gl(nl, NAN), gdq(nq, NAN), gdk(nk, NAN), gdv(nk, NAN), delta(nl, NAN);
            float *po = go.data(), *pl = gl.data(), *pdq = gdq.data(), *pdk = gdk.data(), *pdv = gdv.data(), *pde = delta.data();
            const float *pq = q.data(), *pk = k.data(), *pv = v.data(), *pg = dout.data();
            // Launch geometry as in CUDAOps+Attention.swift.
            // bf16 copies of the inputs (attention_to_bf16, as CUDAOps+Attention.swift does before the bf16 kernels).
            std::vector<unsigned short> q16(nq), k16(nk), v16(nk), g16(nq);
            auto to16 = [&](unsigned short *o, const float *x, size_t n) {
                emu_launch({(unsigned)((n / 4 + 255) / 256), 1, 1}, 256, 0, [&] { attention_to_bf16(o, x, (long)(n / 4)); });
            };
            if (bf) { to16(q16.data(), pq, nq); to16(k16.data(), pk, nk); to16(v16.data(), pv, nk); to16(g16.data(), pg, nq); }
            const unsigned short *pq16 = q16.data(), *pk16 = k16.data(), *pv16 = v16.data(), *pg16 = g16.data();
            unsigned qTiles = (T + 63) / 64;
            if (bf) {
                size_t sh = (128 + 4 * 64) * (D + 8) * 2;
                emu_launch({(unsigned)(B * H), (unsigned)((T + 127) / 128), 1}, 128, sh, [&] {
                    if (D == 64) attention_forward_bf16_d64(po, pl, pq, pk16, pv16, T, H, Hkv, W, scale);
                    else attention_forward_bf16_d128(po, pl, pq, pk16, pv16, T, H, Hkv, W, scale);
                });
            } else {
                size_t sh = (32 * (D + 1) + 32 * D + 16 * D) * 4;
                emu_launch({(unsigned)((T + 15) / 16), (unsigned)(B * H), 1}, 128, sh,
                           [&] { attention_forward(po, pl, pq, pk, pv, B, T, H, Hkv, D, W, scale); });
            }
            std::string l = std::string(bf ? "bf16 " : "fp32 ") + label;
            double tol = bf ? 2e-2 : 1e-5;
            report(("forward out " + l).c_str(), relerr(out, go), tol);
            report(("forward lse " + l).c_str(), relerr(lse, gl), bf ? 1e-2 : 1e-5);
            int rows = B * T * H;
            std::vector<unsigned short> d16(bf ? nq : 0, 0x1234);   // the delta kernel's bf16 copy of dout: to16's bits
            emu_launch({(unsigned)((rows + 7) / 8), 1, 1}, 256, 0,
                       [&] { attention_backward_delta(pde, pg, po, B, T, H, D, bf ? d16.data() : nullptr); });
            if (bf) report(("backward delta's dout copy (values differ) " + l).c_str(), d16 == g16 ? 0.0 : 1.0, 0);
            {   // delta's bits: lane l adds d = l, l+32, … in fp32, then warp_sum's xor tree (offsets 16 … 1)
                size_t differ = 0;
                for (int r = 0; r < rows; r++) {
                    float lanes[32];
                    for (int ln = 0; ln < 32; ln++) {
                        float s = 0;
                        for (int d = ln; d < D; d += 32) s = s + go[(size_t)r * D + d] * dout[(size_t)r * D + d];
                        lanes[ln] = s;
                    }
                    for (int o = 16; o > 0; o >>= 1) {
                        float next[32];
                        for (int ln = 0; ln < 32; ln++) next[ln] = lanes[ln] + lanes[ln ^ o];
                        std::copy(next, next + 32, lanes);
                    }
                    int b = r / (T * H), t = (r / H) % T, h = r % H;
                    float got = delta[((size_t)b * H + h) * T + t];
                    if (memcmp(&got, &lanes[0], 4) != 0) differ++;
                }
                report(("backward delta (bits differ) " + l).c_str(), (double)differ, 0);
            }
            if (bf) {
                int tile = D == 64 ? 64 : 32, QS = D + 8;
                size_t s1 = (2 * 64 * QS + 4 * tile * QS) * 2 + 4 * tile * 4, s2 = (2 * 64 * QS + 4 * tile * QS) * 2;
                emu_launch({(unsigned)(B * Hkv), qTiles, 1}, 128, s1, [&] {
                    if (D == 64) attention_backward_dkdv_bf16_d64(pdk, pdv, pg16, pl, pde, pq16, pk16, pv16, T, H, Hkv, W, scale);
                    else attention_backward_dkdv_bf16_d128(pdk, pdv, pg16, pl, pde, pq16, pk16, pv16, T, H, Hkv, W, scale);
                });
                emu_launch({(unsigned)(B * H), qTiles, 1}, 128, s2, [&] {
                    if (D == 64) attention_backward_dq_bf16_d64(pdq, pg16, pl, pde, pq16, pk16, pv16, T, H, Hkv, W, scale);
                    else attention_backward_dq_bf16_d128(pdq, pg16, pl, pde, pq16, pk16, pv16, T, H, Hkv, W, scale);
                });
            } else {
                size_t sh = (2 * 32 * (D + 1) + 2 * 16 * D + 2 * 16 * 33 + 2 * 16) * 4;
                emu_launch({(unsigned)((T + 31) / 32), (unsigned)(B * Hkv), 1}, 256, sh,
                           [&] { attention_backward_dkdv(pdk, pdv, pg, pl, pde, pq, pk, pv, B, T, H, Hkv, D, W, scale); });
                emu_launch({(unsigned)((T + 15) / 16), (unsigned)(B * H), 1}, 256, sh,
                           [&] { attention_backward_dq(pdq, pg, pl, pde, pq, pk, pv, B, T, H, Hkv, D, W, scale); });
            }
            double btol = bf ? 3e-2 : 1e-4;
            // T=1: dq = dk = 0 in exact arithmetic (one key, dS = p·(dP − delta) = 0), so their error is measured against
            // dv's scale; bf16 leaves a residue of dP's rounding.
            double floor = 0;
            if (T == 1) for (float x : dv) floor = std::max(floor, (double)fabs(x));
            report(("backward dq " + l).c_str(), relerr(dq, gdq, floor), btol);
            report(("backward dk " + l).c_str(), relerr(dk, gdk, floor), btol);
            report(("backward dv " + l).c_str(), relerr(dv, gdv), btol);
            fflush(stdout);
        }
    }
    printf("%d failures\n", fails);
    return fails != 0;
}
