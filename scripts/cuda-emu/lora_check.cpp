// The LoRA / QLoRA kernels (Sources/QATCUDA/Kernels/lora.cu) run by the CPU emulator of prelude.h
// against line-by-line C++ transcriptions of the Swift CPU code (`NVFP4.dequantize`, `e4m3ToFloat`,
// `LoRAContext.applyMask`), bit for bit: `bash scripts/cuda-emu/run.sh lora`. Grids smaller than
// the data, so the grid-stride loops wrap; shapes with and without the vectorised stores.
#include "kernels.cpp"  // written by gen.py
void emu_launch(dim3e grid, int threads, size_t smem, std::function<void()> body);
static uint64_t rs = 1;
static uint64_t next() { rs += 0x9E3779B97F4A7C15ULL; uint64_t z = rs; z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL; return z ^ (z >> 31); }
static float ref_e4m3(uint8_t b) {
    uint32_t sign = (uint32_t)(b & 0x80) << 24, e = (b >> 3) & 0xF, m = b & 7;
    if (e == 0) { float v = (float)m * 0.001953125f; return __uint_as_float(__float_as_uint(v) | sign); }
    if (e == 15 && m == 7) return NAN;
    return __uint_as_float(sign | ((e + 120) << 23) | (m << 20));
}
static float ref_e2m1(uint8_t nib) {
    uint8_t i = nib & 7;
    float m = i < 4 ? (float)i * 0.5f : (i == 7 ? 6.0f : (float)i - 2.0f);
    return (nib & 8) && m != 0 ? -m : m;
}
static int fails = 0;
static void report(const char *what, long bad) {
    if (bad) fails++;
    printf("%s %-60s %ld differ\n", bad ? "FAIL" : "ok  ", what, bad);
}
static bool same(float a, float b) { return __float_as_uint(a) == __float_as_uint(b) || (std::isnan(a) && std::isnan(b)); }
int main() {
    int shapes[][2] = {{40, 64}, {37, 40}, {3, 7}, {5, 16}, {9, 33}};
    for (auto &s : shapes) {
        int rows = s[0], cols = s[1], nb = (cols + 15) / 16;
        for (float gs : {0.37f, 3e-39f, 1.0f}) {
            std::vector<uint8_t> packed(rows * nb * 8), scales(rows * nb);
            for (auto &b : packed) b = (uint8_t)next();
            for (auto &b : scales) b = (uint8_t)next();
            std::vector<float> ref(rows * cols), out(rows * cols, 7.0f);
            std::vector<uint16_t> out16(rows * cols, 7);
            for (int r = 0; r < rows; r++) for (int j = 0; j < nb; j++) {
                float sc = ref_e4m3(scales[r * nb + j]) * gs;
                int c0 = j * 16, w = std::min(16, cols - c0);
                for (int i = 0; i < w; i++) {
                    uint8_t byte = packed[(r * nb + j) * 8 + (i >> 1)];
                    volatile float v = ref_e2m1((i & 1) == 0 ? byte & 0xF : byte >> 4) * sc;
                    ref[r * cols + c0 + i] = v;
                }
            }
            emu_launch({3, 1, 1}, 32, 0, [&] {
                nvfp4_decode(packed.data(), scales.data(), gs, rows, cols, out.data(), out16.data());
            });
            long bad = 0, bad16 = 0;
            for (int i = 0; i < rows * cols; i++) {
                bad += !same(ref[i], out[i]);
                bad16 += out16[i] != f32_to_bf16(out[i]);
            }
            char name[120];
            snprintf(name, sizeof name, "nvfp4_decode [%dx%d] gs %g", rows, cols, gs);
            report(name, bad);
            snprintf(name, sizeof name, "nvfp4_decode bf16 [%dx%d] gs %g", rows, cols, gs);
            report(name, bad16);
        }
    }
    for (double p : {0.05, 0.3}) {
        long n = 3001;
        uint64_t key = 0xF00DCAFE12345678ULL, threshold = (uint64_t)llround(p * 16777216.0);
        float scale = 1 / (1 - (float)p);
        std::vector<float> x(n), base(n), out(n), acc(n);
        std::vector<uint16_t> out16(n);
        for (long i = 0; i < n; i++) { x[i] = (float)((int64_t)(next() >> 40) - (1 << 23)) / (1 << 20); base[i] = (float)i * 0.25f; }
        acc = base;
        emu_launch({4, 1, 1}, 64, 0, [&] { lora_dropout(x.data(), out.data(), out16.data(), n, (long)key, (long)threshold, scale, 0); });
        emu_launch({4, 1, 1}, 64, 0, [&] { lora_dropout(x.data(), acc.data(), nullptr, n, (long)key, (long)threshold, scale, 1); });
        long bad = 0, badAcc = 0, bad16 = 0, kept = 0;
        for (long i = 0; i < n; i++) {
            // SplitMix64.mix(key &+ UInt64(i) &* 0x9E3779B97F4A7C15) >> 40 >= threshold
            uint64_t z = key + (uint64_t)i * 0x9E3779B97F4A7C15ULL + 0x9E3779B97F4A7C15ULL;
            z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL; z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL; z ^= z >> 31;
            bool keep = (z >> 40) >= threshold;
            kept += keep;
            volatile float v = keep ? x[i] * scale : 0.0f;
            volatile float a = base[i] + v;
            bad += !same(v, out[i]); badAcc += !same(a, acc[i]); bad16 += out16[i] != f32_to_bf16(v);
        }
        char name[120];
        snprintf(name, sizeof name, "lora_dropout p=%.2f (kept %.3f)", p, (double)kept / n);
        report(name, bad);
        report("lora_dropout accumulate", badAcc);
        report("lora_dropout bf16", bad16);
        if (std::fabs((double)kept / n - (1 - p)) > 0.03) { printf("FAIL kept fraction\n"); fails++; }
    }
    printf("%s: %d failed\n", fails ? "FAIL" : "ok", fails);
    return fails ? 1 : 0;
}
