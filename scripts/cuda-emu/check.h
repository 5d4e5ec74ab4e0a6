// What the emulator checks share: seeded Gaussian inputs, the largest error relative to the
// largest reference value, and one ok/FAIL line per check with a running failure count.
// Included by each *_check.cpp after the kernels.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>
void emu_launch(dim3e grid, int threads, size_t smem, std::function<void()> body);
static uint64_t rs = 1;
static float gauss() {
    auto u = [] { rs = rs * 6364136223846793005ULL + 1442695040888963407ULL; return ((rs >> 11) + 0.5) / 9007199254740992.0; };
    double a = u(), b = u();
    return (float)(sqrt(-2 * log(a)) * cos(2 * M_PI * b));
}
// max |ref - got| / max(max |ref|, floor); NaN when any difference is NaN.
static double relerr(const std::vector<float> &ref, const std::vector<float> &got, double floor = 0) {
    double m = floor, d = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        m = std::max(m, (double)fabs(ref[i]));
        double x = fabs((double)ref[i] - got[i]);
        if (std::isnan(x)) return NAN;
        d = std::max(d, x);
    }
    return d / std::max(m, 1e-30);
}
int fails = 0;
static void report(const std::string &what, double e, double tol) {
    bool ok = e <= tol && !std::isnan(e);
    if (!ok) fails++;
    printf("%s %-78s %.3g (tol %.1g)\n", ok ? "ok  " : "FAIL", what.c_str(), e, tol);
}
