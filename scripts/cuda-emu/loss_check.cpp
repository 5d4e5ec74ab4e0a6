// The loss-row kernels (Sources/QATCUDA/Kernels/loss.cu) and sumsq_chunks (optim.cu) run by the
// CPU emulator of prelude.h against C++ ports of the Swift CPU path: `bash scripts/cuda-emu/loss.sh`.
// Launch geometry as in Sources/QATCUDA/CUDAOps*.swift (one block of 512 threads per row).
#include <string>
#include "kernels.cpp"  // written by loss.sh
#include "check.h"
static float smax_(float x, float y) { return y >= x ? y : x; }

// DistillationKernels.fullRow (Sources/QATTrain/DistillationKernels.swift), line for line.
struct Consts { int kind; double beta, T, kdRatio; bool computeCE; };
static std::pair<double, double> fullRow(float *s, const float *u, int V, int target, Consts k, float gradScale) {
    if (target < 0) { for (int j = 0; j < V; j++) s[j] = 0; return {0, 0}; }
    double invT = 1 / k.T; float invTf = (float)invT;
    float cKD = (float)(k.kdRatio * (double)gradScale * k.T), cCE = (float)((1 - k.kdRatio) * (double)gradScale);
    float ms = -INFINITY, mu = -INFINITY;
    for (int j = 0; j < V; j++) { ms = smax_(ms, s[j]); mu = smax_(mu, u[j]); }
    float maxA = (float)((double)ms * invT), maxB = (float)((double)mu * invT);
    std::vector<float> eA(V), eB(V), eS(V), lm(V);
    bool ceSeparate = k.computeCE && k.T != 1;
    double sumA = 0, sumB = 0, sumS = 0, dotPD = 0, dotQD = 0;
    for (int j = 0; j < V; j++) {
        float ea = expf(__fsub_rn(__fmul_rn(s[j], invTf), maxA)), eb = expf(__fsub_rn(__fmul_rn(u[j], invTf), maxB));
        eA[j] = ea; eB[j] = eb; sumA += ea; sumB += eb;
        double d = (double)u[j] - (double)s[j];
        dotPD += (double)eb * d; dotQD -= (double)ea * d;
    }
    if (ceSeparate) for (int j = 0; j < V; j++) { float e = expf(__fsub_rn(s[j], ms)); eS[j] = e; sumS += e; }
    double lseA = (double)maxA + log(sumA), lseB = (double)maxB + log(sumB);
    double ce = 0; float iS = 0; std::vector<float> *eCE = &eA;
    if (k.computeCE) {
        if (ceSeparate) { ce = (double)ms + log(sumS) - (double)s[target]; iS = (float)(1 / sumS); eCE = &eS; }
        else { ce = lseA - (double)s[target]; iS = (float)(1 / sumA); }
    }
    float iA = (float)(1 / sumA), iB = (float)(1 / sumB);
    double kd;
    auto ceg = [&](int j, float g) { return k.computeCE ? __fadd_rn(g, __fmul_rn(__fmul_rn(cCE, (*eCE)[j]), iS)) : g; };
    if (k.kind == 0) {
        kd = invT * dotPD / sumB + lseA - lseB;
        for (int j = 0; j < V; j++) s[j] = ceg(j, __fmul_rn(cKD, __fsub_rn(__fmul_rn(eA[j], iA), __fmul_rn(eB[j], iB))));
    } else if (k.kind == 1) {
        double r = invT * dotQD / sumA - lseA + lseB; kd = r;
        double shift = -lseA + lseB - r;
        for (int j = 0; j < V; j++) {
            float q = __fmul_rn(eA[j], iA);
            s[j] = ceg(j, __fmul_rn(__fmul_rn(cKD, q), (float)(((double)s[j] - (double)u[j]) * invT + shift)));
        }
    } else {
        float beta = (float)k.beta; double betaD = k.beta, j2 = 0, klQM = 0;
        for (int j = 0; j < V; j++) {
            float p = __fmul_rn(eB[j], iB), q = __fmul_rn(eA[j], iA);
            float m = __fadd_rn(__fmul_rn(beta, p), __fmul_rn(__fsub_rn(1, beta), q));
            if (!(m > 0)) { lm[j] = 0; continue; }
            double logm = (double)logf(m); lm[j] = (float)logm;
            double lp = (double)u[j] * invT - lseB, lq = (double)s[j] * invT - lseA;
            double tq = (double)q * (lq - logm);
            j2 += betaD * (double)p * (lp - logm) + (1 - betaD) * tq; klQM += tq;
        }
        kd = j2;
        float w = __fmul_rn(cKD, __fsub_rn(1, beta));
        for (int j = 0; j < V; j++) {
            float q = __fmul_rn(eA[j], iA), g = 0;
            if (q > 0) g = __fmul_rn(__fmul_rn(w, q), (float)((double)s[j] * invT - lseA - (double)lm[j] - klQM));
            s[j] = ceg(j, g);
        }
    }
    if (k.computeCE) s[target] = __fsub_rn(s[target], cCE);
    return {ce, k.T * k.T * kd};
}

static void inputs(int rows, int V, int stride, std::vector<float> &s, std::vector<float> &u, std::vector<int> &t) {
    s.resize((size_t)rows * V); u.assign((size_t)rows * stride, 0); t.resize(rows);
    for (auto &x : s) x = 3 * gauss();
    if (rows > 1) for (int j = 0; j < V; j++) s[V + j] = j * (8.0f / V) - 4;  // a ramp: the maximum grows at every element
    for (int r = 0; r < rows; r++) {
        for (int j = 0; j < stride; j++) u[(size_t)r * stride + j] = 1.5f * gauss() + (j < V ? 0.8f * s[(size_t)r * V + j] : 0);
        t[r] = r % 7 == 3 ? -100 : (r * 37 + 11) % V;
    }
}

// Elements of a bf16 copy that are not the fp32 values rounded to nearest even.
static int bf16Differ(const std::vector<float> &x, const std::vector<u16> &x16) {
    int differ = 0;
    for (size_t i = 0; i < x.size(); i++) {
        unsigned u; memcpy(&u, &x[i], 4);
        differ += x16[i] != (u16)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return differ;
}

// x rounded to bf16 in place, and those bf16 values.
static std::vector<u16> toBF16(std::vector<float> &x) {
    std::vector<u16> h(x.size());
    for (size_t i = 0; i < x.size(); i++) { h[i] = f32_to_bf16(x[i]); x[i] = bf16_to_f32(h[i]); }
    return h;
}

// The `_bf16` row kernels (bf16 logits in, the gradient written over them) against the fp32 kernels on the same
// values (the logits rounded to bf16, as fp32): the same losses and the same bf16 gradient, bit for bit.
static void bf16Case(int rows, int V, int stride, const Consts *k) {
    std::vector<float> s, u; std::vector<int> t;
    inputs(rows, V, stride, s, u, t);
    int valid = 0; for (int x : t) valid += x >= 0;
    float gradScale = 1.0f / valid;
    std::vector<u16> s16 = toBF16(s), u16v = toBF16(u), want((size_t)rows * V, 0x1234);
    std::vector<double> out(2 * rows, -1), out16(2 * rows, -1);
    std::vector<float> rl(rows, -1), rl16(rows, -1);
    char name[200];
    if (k) {
        float invT = (float)(1 / k->T), cKD = (float)(k->kdRatio * (double)gradScale * k->T);
        float cCE = (float)((1 - k->kdRatio) * (double)gradScale);
        emu_launch({(unsigned)rows, 1, 1}, 512, 0, [&] {
            kd_rows(out.data(), s.data(), u.data(), t.data(), rows, V, stride, k->kind, (float)k->beta, invT, cKD, cCE, k->computeCE,
                    want.data(), 0);
        });
        emu_launch({(unsigned)rows, 1, 1}, 512, 0, [&] {
            kd_rows_bf16(out16.data(), s16.data(), u16v.data(), t.data(), rows, V, stride, k->kind, (float)k->beta, invT, cKD, cCE,
                         k->computeCE);
        });
        snprintf(name, sizeof name, "kd_rows_bf16 kind %d V=%d stride %d T=%.1f kd_ratio %.2f", k->kind, V, stride, k->T, k->kdRatio);
    } else {
        emu_launch({(unsigned)rows, 1, 1}, 512, 0, [&] {
            cross_entropy_backward(rl.data(), s.data(), t.data(), rows, V, gradScale, want.data(), 0);
        });
        emu_launch({(unsigned)rows, 1, 1}, 512, 0, [&] { cross_entropy_backward_bf16(rl16.data(), s16.data(), t.data(), rows, V, gradScale); });
        snprintf(name, sizeof name, "cross_entropy_backward_bf16 V=%d", V);
    }
    double differ = memcmp(out.data(), out16.data(), out.size() * 8) != 0 || memcmp(rl.data(), rl16.data(), rl.size() * 4) != 0;
    for (size_t i = 0; i < want.size(); i++) differ += want[i] != s16[i];
    report(std::string(name) + " vs the fp32 kernel on the same values: losses and gradient (values differ)", differ, 0);
}

static void kdCase(int rows, int V, int stride, Consts k) {
    std::vector<float> s, u; std::vector<int> t;
    inputs(rows, V, stride, s, u, t);
    int valid = 0; for (int x : t) valid += x >= 0;
    float gradScale = 1.0f / valid;
    std::vector<float> ref = s;
    double ce = 0, kd = 0;
    for (int r = 0; r < rows; r++) {
        auto p = fullRow(ref.data() + (size_t)r * V, u.data() + (size_t)r * stride, V, t[r], k, gradScale);
        ce += p.first; kd += p.second;
    }
    std::vector<double> out(2 * rows, -1);
    std::vector<u16> s16((size_t)rows * V, 0x1234);
    float invT = (float)(1 / k.T), cKD = (float)(k.kdRatio * (double)gradScale * k.T), cCE = (float)((1 - k.kdRatio) * (double)gradScale);
    emu_launch({(unsigned)rows, 1, 1}, 512, 0, [&] {
        kd_rows(out.data(), s.data(), u.data(), t.data(), rows, V, stride, k.kind, (float)k.beta, invT, cKD, cCE, k.computeCE ? 1 : 0,
                s16.data(), 1);
    });
    double gce = 0, gkd = 0;
    for (int r = 0; r < rows; r++) if (t[r] >= 0) { gce += out[2 * r]; gkd += k.T * k.T * out[2 * r + 1]; }
    char name[200];
    snprintf(name, sizeof name, "kd_rows kind %d beta %.1f V=%d stride %d T=%.1f kd_ratio %.2f", k.kind, k.beta, V, stride, k.T, k.kdRatio);
    report(std::string(name) + ": loss", (fabs(gce - ce) + fabs(gkd - kd)) / valid, 1e-6);
    report(std::string(name) + ": gradient", relerr(ref, s), 1e-5);
    report(std::string(name) + ": bf16 copy (values differ)", bf16Differ(s, s16), 0);
}

static void ceCase(int rows, int V) {
    std::vector<float> s, u; std::vector<int> t;
    inputs(rows, V, V, s, u, t);
    int valid = 0; for (int x : t) valid += x >= 0;
    float gradScale = 1.0f / valid;
    std::vector<float> ref = s;
    double loss = 0;
    for (int r = 0; r < rows; r++) {   // CrossEntropy.row, with a double sum
        float *z = ref.data() + (size_t)r * V;
        if (t[r] < 0) { for (int j = 0; j < V; j++) z[j] = 0; continue; }
        float m = -INFINITY; for (int j = 0; j < V; j++) m = smax_(m, z[j]);
        double sum = 0; for (int j = 0; j < V; j++) sum += expf(z[j] - m);
        loss += (double)m + log(sum) - (double)z[t[r]];
        float kk = (float)(gradScale / sum);
        for (int j = 0; j < V; j++) z[j] = __fmul_rn(expf(z[j] - m), kk);
        z[t[r]] = __fsub_rn(z[t[r]], gradScale);
    }
    std::vector<float> rl(rows, -1), rl2(rows, -1), rl3(rows, -1);
    emu_launch({(unsigned)rows, 1, 1}, 512, 0, [&] { cross_entropy_rows(rl.data(), s.data(), t.data(), rows, V); });
    // bf16 only (keep32 = 0): the same copy and losses, the logits untouched.
    std::vector<float> s0 = s;
    std::vector<u16> o16((size_t)rows * V, 0x1234);
    emu_launch({(unsigned)rows, 1, 1}, 512, 0, [&] { cross_entropy_backward(rl3.data(), s0.data(), t.data(), rows, V, gradScale, o16.data(), 0); });
    report("cross-entropy V=" + std::to_string(V) + " bf16 only: logits kept", relerr(s, s0), 0);
    std::vector<u16> s16((size_t)rows * V, 0x1234);
    emu_launch({(unsigned)rows, 1, 1}, 512, 0, [&] { cross_entropy_backward(rl2.data(), s.data(), t.data(), rows, V, gradScale, s16.data(), 1); });
    double g1 = 0, g2 = 0;
    for (int r = 0; r < rows; r++) if (t[r] >= 0) { g1 += rl[r]; g2 += rl2[r]; }
    std::string name = "cross-entropy V=" + std::to_string(V);
    report(name + " rows: loss", fabs(g1 - loss) / valid, 1e-6);
    report(name + " backward: loss", fabs(g2 - loss) / valid, 1e-6);
    report(name + " backward: gradient", relerr(ref, s), 1e-5);
    report(name + " backward: bf16 copy (values differ)", bf16Differ(s, s16), 0);
    double same = 0; for (size_t i = 0; i < s16.size(); i++) same += s16[i] != o16[i];
    for (int r = 0; r < rows; r++) same += rl3[r] != rl2[r];
    report(name + " bf16 only: copy and losses (values differ)", same, 0);
}

static void sumsqCase() {
    std::vector<int> counts = {1, 3, 1000, 4097, 65536, 70001};
    std::vector<float> buf(200000 + 64);
    for (auto &x : buf) x = gauss();
    std::vector<unsigned long long> table; std::vector<int> owner; std::vector<double> ref;
    size_t off = 0;
    for (size_t i = 0; i < counts.size(); i++) {
        size_t o = off + (i == 3 ? 1 : 0);
        double s = 0; for (int j = 0; j < counts[i]; j++) s += (double)buf[o + j] * buf[o + j];
        ref.push_back(s);
        for (int c = 0; c < counts[i]; c += 4096) {
            table.push_back((unsigned long long)(buf.data() + o + c)); table.push_back(std::min(4096, counts[i] - c)); owner.push_back(i);
        }
        off += (counts[i] + 64) / 64 * 64;
    }
    int n = owner.size();
    std::vector<double> partials(n);
    emu_launch({(unsigned)n, 1, 1}, 256, 0, [&] { sumsq_chunks(partials.data(), table.data(), n); });
    std::vector<double> got(counts.size(), 0);
    for (int c = 0; c < n; c++) got[owner[c]] += partials[c];
    double e = 0; for (size_t i = 0; i < got.size(); i++) e = std::max(e, fabs(got[i] - ref[i]) / ref[i]);
    report("sumsq_chunks per tensor (chunk 4096, one tensor misaligned)", e, 1e-12);
}

// adamw_update's float4 path (aligned arrays, with and without a tail; the bf16 copy refreshed too) and its
// element path (arrays off 16-byte alignment) against adamw_one applied element by element: the same bits.
static void adamwCase(int n, int offset) {
    std::vector<float> p0(n + 8), g(n + 8), m0(n + 8), v0(n + 8);
    for (int i = 0; i < n + 8; i++) { p0[i] = gauss(); g[i] = 0.01f * gauss(); m0[i] = 0.001f * gauss(); v0[i] = 1e-5f * fabsf(gauss()); }
    for (int lerpSmall = 0; lerpSmall < 2; lerpSmall++) for (int hostGrid = 0; hostGrid < 2; hostGrid++) {
        // hostGrid 0: 3 blocks of 64 (the grid-stride loop); 1: the host's launch, one float4 per thread in blocks of 256
        std::vector<float> p = p0, m = m0, v = v0, rp = p0, rm = m0, rv = v0;
        const float decay = 0.9999f, w = 0.1f, beta2 = 0.95f, omb2 = 0.05f, bc2 = 0.2236068f, eps = 1e-8f, negStep = -1e-3f,
                    clip = 0.37f;
        for (int i = offset; i < offset + n; i++)
            adamw_one(rp[i], g[i], rm[i], rv[i], decay, lerpSmall, w, beta2, omb2, bc2, eps, negStep, clip);
        // With the bf16 copy refreshed in the same pass (refresh 0) where the arrays are aligned, as the host asks.
        std::vector<u16> w16(n + 8, 0xffff);
        u16 *copy = offset == 0 ? w16.data() : nullptr;
        emu_launch({hostGrid ? (unsigned)(((n + 3) / 4 + 255) / 256) : 3u, 1, 1}, hostGrid ? 256 : 64, 0, [&] {
            adamw_update(p.data() + offset, g.data() + offset, m.data() + offset, v.data() + offset, n, decay, lerpSmall, w, beta2,
                         omb2, bc2, eps, negStep, clip, copy, 0, 0.0f, 0);
        });
        int differ = 0;
        for (int i = 0; i < n + 8; i++) differ += memcmp(&p[i], &rp[i], 4) || memcmp(&m[i], &rm[i], 4) || memcmp(&v[i], &rv[i], 4);
        if (copy) for (int i = 0; i < n; i++) differ += w16[i] != f32_to_bf16(rp[i]);
        report("adamw_update n=" + std::to_string(n) + " offset " + std::to_string(offset) + (hostGrid ? " host grid" : "") + " lerpSmall " + std::to_string(lerpSmall) +
                   " (elements differ)", differ, 0);
        if (offset != 0) continue;
        // refresh 2: the fp32 value of the bf16 rounding (a norm weight's or a bias's read copy), tail included.
        std::vector<float> p2 = p0, m2 = m0, v2 = v0, r2(n + 8, -1.0f);
        emu_launch({hostGrid ? (unsigned)(((n + 3) / 4 + 255) / 256) : 3u, 1, 1}, hostGrid ? 256 : 64, 0, [&] {
            adamw_update(p2.data(), g.data(), m2.data(), v2.data(), n, decay, lerpSmall, w, beta2, omb2, bc2, eps, negStep, clip,
                         (u16 *)r2.data(), 2, 0.0f, 0);
        });
        differ = 0;
        for (int i = 0; i < n; i++) {
            float want = bf16_to_f32(f32_to_bf16(rp[i]));
            differ += memcmp(&p2[i], &rp[i], 4) || memcmp(&r2[i], &want, 4);
        }
        for (int i = n; i < n + 8; i++) differ += r2[i] != -1.0f;
        report("adamw_update refresh 2 (fp32 rounding) n=" + std::to_string(n) + (hostGrid ? " host grid" : "") + " lerpSmall " +
                   std::to_string(lerpSmall) + " (elements differ)", differ, 0);
    }
}

int main(int argc, char **argv) {
    for (int V : {1000, 1003}) ceCase(24, V);
    ceCase(2, 151936);
    struct S { int V, stride; double T, ratio; };
    for (int kind = 0; kind < 3; kind++) {
        double beta = kind == 2 ? 0.3 : kind;
        for (S c : {S{1000, 1008, 2, 0.5}, S{1003, 1003, 1, 1}, S{1000, 1000, 0.7, 0.25}, S{1003, 1010, 1, 0.5}})
            kdCase(24, c.V, c.stride, Consts{kind, beta, c.T, c.ratio, c.ratio < 1});
    }
    kdCase(2, 151936, 151936, Consts{0, 0, 2, 0.5, true});
    kdCase(2, 151936, 151936, Consts{2, 0.7, 1, 0.5, true});
    for (int V : {1000, 1003}) bf16Case(24, V, V, nullptr);
    for (int kind = 0; kind < 3; kind++) {
        double beta = kind == 2 ? 0.3 : kind;
        Consts a{kind, beta, 2, 0.5, true}, b{kind, beta, 1, 1, false};
        bf16Case(24, 1000, 1008, &a);
        bf16Case(24, 1003, 1003, &b);
    }
    sumsqCase();
    for (int n : {1000, 1003, 1}) adamwCase(n, 0);
    adamwCase(1001, 1);
    printf("%d failed\n", fails);
    return fails != 0;
}
