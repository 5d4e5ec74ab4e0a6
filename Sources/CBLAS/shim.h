#include <cblas.h>

/// A spin-wait hint for the worker pool (Parallel.swift): `pause` on x86-64, `yield` on arm64.
static inline void qat_cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}
