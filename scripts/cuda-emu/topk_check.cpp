// The top-k kernels (Sources/QATCUDA/Kernels/topk.cu) run by the CPU emulator of prelude.h against
// ports of the CPU code: topk_kd_rows against TopKKernels.rows (every objective) and
// topk_select_rows against TopKCache.selectTopK. `bash scripts/cuda-emu/run.sh topk`.
// Launch geometry as in Sources/QATCUDA/CUDAModel+TopK.swift (one block of 512 per row).
#include <string>
#include "kernels.cpp"  // written by gen.py
#include "check.h"
static unsigned urand(unsigned n) { rs = rs * 6364136223846793005ULL + 1442695040888963407ULL; return (unsigned)((rs >> 33) % n); }

// TopKCache.selectTopK: decreasing value, ties lower id; log-probs; log rest mass (−∞ when k = V).
static void ref_select(const float *z, int V, int K, int *ids, float *lps, float *rest) {
    std::vector<int> o(V);
    for (int j = 0; j < V; j++) o[j] = j;
    std::stable_sort(o.begin(), o.end(), [&](int a, int b) { return z[a] > z[b]; });
    float mx = -INFINITY;
    for (int j = 0; j < V; j++) mx = std::max(mx, z[j]);
    double sum = 0;
    for (int j = 0; j < V; j++) sum += (double)expf(z[j] - mx);
    double lse = (double)mx + log(sum);
    double rs_ = 0;
    for (int i = K; i < V; i++) rs_ += (double)expf(z[o[i]] - mx);
    for (int i = 0; i < K; i++) { ids[i] = o[i]; lps[i] = (float)((double)z[o[i]] - lse); }
    *rest = (float)(log(rs_) + (double)mx - lse);
}

struct Bins { std::vector<double> p, lp; double lpExtra; bool any; };
static Bins bin_softmax(const std::vector<double> &x, const int *id, int K, double extra, double scale) {
    Bins b{std::vector<double>(K, 0), std::vector<double>(K, -INFINITY), -INFINITY, false};
    double m = extra * scale;
    for (int i = 0; i < K; i++) if (id[i] >= 0) m = std::max(m, x[i] * scale);
    if (!(m > -INFINITY)) return b;
    double sum = exp(extra * scale - m);
    for (int i = 0; i < K; i++) if (id[i] >= 0) sum += exp(x[i] * scale - m);
    double l = m + log(sum);
    for (int i = 0; i < K; i++) if (id[i] >= 0) { b.lp[i] = x[i] * scale - l; b.p[i] = exp(b.lp[i]); }
    b.lpExtra = extra * scale - l; b.any = true;
    return b;
}

// TopKKernels.row (Swift) ported: s [V] replaced by its gradient; returns (CE, T²·KD).
static std::pair<double, double> ref_row(int obj, float *s, int V, const int *id, const float *lp, float rest, const float *cnt, int K,
                                         int t, double T, double kdRatio, float gradScale) {
    bool computeCE = kdRatio < 1;
    double invT = 1 / T;
    float cKD = (float)(kdRatio * gradScale * T), cCE = (float)((1 - kdRatio) * gradScale);
    double t2 = T * T;
    if (t < 0) { for (int j = 0; j < V; j++) s[j] = 0; return {0, 0}; }
    std::vector<float> e(V);
    if (obj == 0) {
        float ms = -INFINITY;
        for (int j = 0; j < V; j++) ms = std::max(ms, s[j]);
        double sumS = 0;
        for (int j = 0; j < V; j++) { e[j] = expf(s[j] - ms); sumS += e[j]; }
        double lse = ms + log(sumS), sumK = 0;
        for (int i = 0; i < K; i++) if (id[i] >= 0) sumK += e[id[i]];
        double restS = sumS - sumK;
        if (restS < 1e-3 * sumS) {
            std::vector<float> saved(K);
            for (int i = 0; i < K; i++) if (id[i] >= 0) { saved[i] = e[id[i]]; e[id[i]] = 0; }
            restS = 0;
            for (int j = 0; j < V; j++) restS += e[j];
            for (int i = 0; i < K; i++) if (id[i] >= 0) e[id[i]] = saved[i];
        }
        double logRestQ = restS > 0 ? log(restS) + ms - lse : -INFINITY;
        std::vector<double> xt(K), xs(K);
        for (int i = 0; i < K; i++) { xt[i] = lp[i]; xs[i] = id[i] >= 0 ? (double)s[id[i]] - lse : 0; }
        Bins tb = bin_softmax(xt, id, K, rest, invT), rb = bin_softmax(xs, id, K, logRestQ, invT);
        double kd = 0, gRest = 0;
        if (tb.any) {
            for (int i = 0; i < K; i++) if (id[i] >= 0 && tb.p[i] > 0) kd += tb.p[i] * (tb.lp[i] - rb.lp[i]);
            double tR = exp(tb.lpExtra), rR = exp(rb.lpExtra);
            if (tR > 0) kd += tR * (tb.lpExtra - std::max(rb.lpExtra, -745.0));
            gRest = rR - tR;
        }
        double ce = computeCE ? lse - s[t] : 0;
        float iS = (float)(1 / sumS), tail = (float)(tb.any && restS > 0 ? (double)cKD * gRest / restS : 0);
        for (int j = 0; j < V; j++) s[j] = computeCE ? (tail + cCE * iS) * e[j] : tail * e[j];
        if (tb.any) for (int i = 0; i < K; i++) if (id[i] >= 0) s[id[i]] = (float)((double)cKD * (rb.p[i] - tb.p[i])) + (computeCE ? cCE * iS * e[id[i]] : 0);
        if (computeCE) s[t] -= cCE;
        return {ce, t2 * kd};
    }
    if (obj == 1) {
        std::vector<double> xt(K), xs(K);
        for (int i = 0; i < K; i++) { xt[i] = lp[i]; xs[i] = id[i] >= 0 ? (double)s[id[i]] : 0; }
        Bins tb = bin_softmax(xt, id, K, -INFINITY, invT), rb = bin_softmax(xs, id, K, -INFINITY, invT);
        double kd = 0;
        if (tb.any) for (int i = 0; i < K; i++) if (id[i] >= 0 && tb.p[i] > 0) kd += tb.p[i] * (tb.lp[i] - rb.lp[i]);
        double ce = 0;
        if (computeCE) {
            float ms = -INFINITY;
            for (int j = 0; j < V; j++) ms = std::max(ms, s[j]);
            double sum = 0;
            for (int j = 0; j < V; j++) { e[j] = expf(s[j] - ms); sum += e[j]; }
            ce = ms + log(sum) - s[t];
            float f = cCE * (float)(1 / sum);
            for (int j = 0; j < V; j++) s[j] = f * e[j];
            s[t] -= cCE;
        } else for (int j = 0; j < V; j++) s[j] = 0;
        if (tb.any) for (int i = 0; i < K; i++) if (id[i] >= 0) s[id[i]] += (float)((double)cKD * (rb.p[i] - tb.p[i]));
        return {ce, t2 * kd};
    }
    // teacher_normalized (2) and sampled (3): weights w, full softmax at T.
    std::vector<float> w(K, 0), logW(K, 0);
    std::vector<double> pd(K, 0), lpd(K, 0);
    float kdOn = 0;
    if (obj == 2) {
        double mz = -INFINITY;
        for (int i = 0; i < K; i++) if (id[i] >= 0) mz = std::max(mz, (double)lp[i] * invT);
        if (mz > -INFINITY) {
            double sw = 0;
            for (int i = 0; i < K; i++) if (id[i] >= 0) sw += exp((double)lp[i] * invT - mz);
            double lsw = mz + log(sw);
            for (int i = 0; i < K; i++) if (id[i] >= 0) { lpd[i] = (double)lp[i] * invT - lsw; pd[i] = exp(lpd[i]); w[i] = (float)pd[i]; }
            kdOn = 1;
        }
    } else {
        double n = 0, m = -INFINITY;
        for (int i = 0; i < K; i++) if (id[i] >= 0 && cnt[i] > 0) { n += cnt[i]; m = std::max(m, (double)lp[i] * (invT - 1)); }
        if (n > 0 && m > -INFINITY) {
            double z = 0;
            for (int i = 0; i < K; i++) if (id[i] >= 0 && cnt[i] > 0) z += (double)cnt[i] / n * exp((double)lp[i] * (invT - 1) - m);
            double logZ = m + log(z);
            for (int i = 0; i < K; i++) if (id[i] >= 0 && cnt[i] > 0) {
                w[i] = (float)((double)cnt[i] / n * exp((double)lp[i] * (invT - 1) - logZ));
                logW[i] = (float)((double)lp[i] * invT - logZ);
            }
            kdOn = 1;
        }
    }
    float invTf = (float)invT, ms = -INFINITY;
    for (int j = 0; j < V; j++) ms = std::max(ms, s[j]);
    float maxA = (float)((double)ms * invT);
    std::vector<float> eA(V), eS(V);
    bool ceSep = computeCE && T != 1;
    double sumA = 0, sumS = 0;
    for (int j = 0; j < V; j++) { eA[j] = expf(s[j] * invTf - maxA); sumA += eA[j]; }
    if (ceSep) for (int j = 0; j < V; j++) { eS[j] = expf(s[j] - ms); sumS += eS[j]; }
    double lseA = maxA + log(sumA), kd = 0;
    for (int i = 0; i < K; i++) {
        if (id[i] < 0) continue;
        if (obj == 2 && kdOn) kd += pd[i] * (lpd[i] - ((double)s[id[i]] * invT - lseA));
        if (obj == 3 && w[i] > 0) kd += (double)w[i] * ((double)logW[i] - ((double)s[id[i]] * invT - lseA));
    }
    double ce = 0;
    float iS = 0;
    std::vector<float> &eCE = ceSep ? eS : eA;
    if (computeCE) {
        if (ceSep) { ce = ms + log(sumS) - s[t]; iS = (float)(1 / sumS); } else { ce = lseA - s[t]; iS = (float)(1 / sumA); }
    }
    float iA = (float)(1 / sumA), a = kdOn * cKD;
    for (int j = 0; j < V; j++) s[j] = computeCE ? a * eA[j] * iA + cCE * eCE[j] * iS : a * eA[j] * iA;
    if (computeCE) s[t] -= cCE;
    for (int i = 0; i < K; i++) if (id[i] >= 0) s[id[i]] -= a * w[i];
    return {ce, t2 * kd * kdOn};
}


static void kd_case(int obj, int V, int K, double T, double ratio) {
    const int n = 10;
    std::vector<float> s(n * V), u(n * V), lp(n * K, 0), rest(n, 0), cnt(n * K, 0);
    std::vector<int> ids(n * K, -1), tg(n);
    for (auto &x : s) x = 2 * gauss();
    for (auto &x : u) x = 3 * gauss();
    for (int r = 0; r < n; r++) {
        std::vector<int> ti(V); std::vector<float> tl(V); float rr;
        ref_select(&u[r * V], V, V, ti.data(), tl.data(), &rr);
        if (obj == 3) {  // distinct "drawn" ids with counts, empty slots −1 (as TopKCacheReader reads them)
            for (int i = 0; i < K; i++) {
                int j = ti[urand(std::min(V, 3 * K))];
                bool dup = false;
                for (int q = 0; q < i; q++) dup |= ids[r * K + q] == j;
                if (dup || urand(5) == 0) continue;
                ids[r * K + i] = j; cnt[r * K + i] = (float)(1 + urand(3));
                lp[r * K + i] = tl[std::find(ti.begin(), ti.end(), j) - ti.begin()];
            }
        } else {
            ref_select(&u[r * V], V, K, &ids[r * K], &lp[r * K], &rest[r]);
        }
        tg[r] = (int)urand(V);
    }
    if (K > 2) { ids[5 * K] = -1; ids[5 * K + 2] = -1; }
    for (int i = 0; i < K; i++) ids[6 * K + i] = -1;
    for (int i = 0; i < K; i++) if (ids[8 * K + i] >= 0) s[8 * V + ids[8 * K + i]] += 20;
    tg[3] = -100;
    if (ids[9 * K] >= 0) tg[9] = ids[9 * K];
    int valid = n - 1;
    float gs = 1.0f / valid;
    std::vector<float> ref = s, got = s, slots(2 * n * K);
    double ce = 0, kd = 0;
    for (int r = 0; r < n; r++) {
        auto p = ref_row(obj, &ref[r * V], V, &ids[r * K], &lp[r * K], rest[r], &cnt[r * K], K, tg[r], T, ratio, gs);
        ce += p.first; kd += p.second;
    }
    std::vector<double> out(2 * n);
    float cKD = (float)(ratio * gs * T), cCE = (float)((1 - ratio) * gs);
    emu_launch({(unsigned)n, 1, 1}, 512, 0, [&] {
        topk_kd_rows(out.data(), got.data(), ids.data(), lp.data(), obj == 0 ? rest.data() : nullptr, obj == 3 ? cnt.data() : nullptr,
                     slots.data(), tg.data(), n, V, K, obj, 1 / T, cKD, cCE, ratio < 1 ? 1 : 0);
    });
    double gce = 0, gkd = 0;
    for (int r = 0; r < n; r++) if (tg[r] >= 0) { gce += out[2 * r]; gkd += T * T * out[2 * r + 1]; }
    const char *names[] = {"coarse_kl", "both_normalized", "teacher_normalized", "sampled"};
    std::string label = std::string(names[obj]) + " V=" + std::to_string(V) + " k=" + std::to_string(K) + " T=" +
                        std::to_string(T).substr(0, 4) + " kd_ratio=" + std::to_string(ratio).substr(0, 4);
    report(label + ": loss", (fabs(gce - ce) + fabs(gkd - kd)) / valid, 1e-6);
    report(label + ": gradient, relative", relerr(ref, got), 1e-5);
}

static void select_case(int V, int K, int n, bool ties) {
    std::vector<float> x(n * V);
    for (auto &v : x) v = 3 * gauss();
    if (ties) {
        for (auto &v : x) v = roundf(v * 4) / 4;
        for (int j = 0; j < V; j++) { x[j] = j % 2 == 0 ? -0.0f : 0.0f; x[V + j] = 1.5f; }
    }
    std::vector<int> ri(n * K), gi(n * K);
    std::vector<float> rl(n * K), gl(n * K), rr(n), gr(n);
    for (int r = 0; r < n; r++) ref_select(&x[r * V], V, K, &ri[r * K], &rl[r * K], &rr[r]);
    emu_launch({(unsigned)n, 1, 1}, 512, 0, [&] { topk_select_rows(gi.data(), gl.data(), gr.data(), x.data(), n, V, K, 1); });
    int bad = 0;
    double dl = 0, dr = 0;
    for (int i = 0; i < n * K; i++) { bad += ri[i] != gi[i]; dl = std::max(dl, (double)fabs(rl[i] - gl[i])); }
    for (int r = 0; r < n; r++) if (rr[r] != gr[r]) dr = std::max(dr, (double)fabs(rr[r] - gr[r]));
    std::string label = "select V=" + std::to_string(V) + " k=" + std::to_string(K) + (ties ? " (ties)" : "");
    report(label + ": ids differ", bad, 0);
    report(label + ": log-probs", dl, 1e-5);
    report(label + ": rest", dr, 1e-5);
}

int main() {
    for (int obj = 0; obj < 4; obj++) {
        kd_case(obj, 1000, 1, 1.0, 1.0);
        kd_case(obj, 1000, 8, 2.0, 0.5);
        kd_case(obj, 1003, 64, 1.0, 0.7);
        kd_case(obj, 1000, 300, 0.5, 1.0);
        kd_case(obj, 4099, 64, 1.5, 0.3);
    }
    select_case(1000, 1, 12, false);
    select_case(1000, 64, 12, true);
    select_case(4099, 300, 8, true);
    select_case(1000, 1000, 6, true);
    select_case(5000, 2048, 4, true);
    select_case(777, 5, 9, true);
    select_case(151936, 256, 2, false);
    select_case(151936, 64, 2, true);
    printf("%s: %d failed\n", fails ? "FAIL" : "ok", fails);
    return fails ? 1 : 0;
}
