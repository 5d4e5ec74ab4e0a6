// A CPU emulator of the CUDA subset the attention kernels use: one ucontext fiber per thread,
// block barriers and warp-synchronous ops (shuffles, mma.sync m16n8k16 bf16, ldmatrix) by fiber
// switches. Single-threaded and deterministic.
#include <ucontext.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <cstdio>
#include <cstdlib>
#include <vector>
#include <functional>
#include <algorithm>
#undef INFINITY
using std::min; using std::max;
#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__
struct dim3e { unsigned x, y, z; };
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline float2 make_float2(float a, float b) { return {a, b}; }
inline uint2 make_uint2(unsigned a, unsigned b) { return {a, b}; }
inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; memcpy(&i, &f, 4); return i; }
inline float __fmul_rn(float a, float b) { volatile float r = a * b; return r; }
inline float __fadd_rn(float a, float b) { volatile float r = a + b; return r; }
inline float __fsub_rn(float a, float b) { volatile float r = a - b; return r; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline float __fdiv_rn(float a, float b) { volatile float r = a / b; return r; }
inline float __fsqrt_rn(float a) { volatile float r = sqrtf(a); return r; }

struct EmuFiber { ucontext_t ctx; std::vector<char> stack; dim3e tid; bool done; };
struct EmuBar { int count = 0, gen = 0; };
extern EmuFiber *emu_cur;
extern ucontext_t emu_sched;
extern dim3e emu_block, emu_bdim, emu_gdim;
extern char *emu_smem;
extern EmuBar emu_blockbar, emu_warpbar[32];
extern int emu_nthreads;
extern uint64_t emu_xchg[32][32][8];
#define threadIdx (emu_cur->tid)
#define blockIdx emu_block
#define blockDim emu_bdim
#define gridDim emu_gdim
inline void emu_yield() { swapcontext(&emu_cur->ctx, &emu_sched); }
inline void emu_bar(EmuBar &b, int n) {
    int g = b.gen;
    if (++b.count == n) { b.count = 0; b.gen++; } else while (b.gen == g) emu_yield();
}
inline void __syncthreads() { emu_bar(emu_blockbar, emu_nthreads); }
inline int emu_lane() { return threadIdx.x & 31; }
inline int emu_warp() { return threadIdx.x >> 5; }
inline void emu_warp_sync() { emu_bar(emu_warpbar[emu_warp()], 32); }
template <class T> T emu_shfl(T v, int src) {
    int w = emu_warp(), l = emu_lane();
    memcpy(&emu_xchg[w][l][0], &v, sizeof(T));
    emu_warp_sync();
    T r; memcpy(&r, &emu_xchg[w][src & 31][0], sizeof(T));
    emu_warp_sync();
    return r;
}
template <class T> T __shfl_xor_sync(unsigned, T v, int o) { return emu_shfl(v, emu_lane() ^ o); }
// Warp votes: every lane's value through the exchange slots, then each lane reads all 32.
inline unsigned __ballot_sync(unsigned, bool pred) {
    int w = emu_warp(), l = emu_lane();
    emu_xchg[w][l][6] = pred ? 1 : 0;
    emu_warp_sync();
    unsigned r = 0;
    for (int t = 0; t < 32; t++) if (emu_xchg[w][t][6]) r |= 1u << t;
    emu_warp_sync();
    return r;
}
inline unsigned __match_any_sync(unsigned, int v) {
    int w = emu_warp(), l = emu_lane();
    emu_xchg[w][l][6] = (uint64_t)(int64_t)v;
    emu_warp_sync();
    unsigned r = 0;
    for (int t = 0; t < 32; t++) if (emu_xchg[w][t][6] == (uint64_t)(int64_t)v) r |= 1u << t;
    emu_warp_sync();
    return r;
}
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(unsigned x) { return __builtin_ffs((int)x); }
inline int atomicAdd(int *p, int v) { int o = *p; *p = o + v; return o; }  // fibers never interleave inside
template <class T> T __shfl_sync(unsigned, T v, int j) { return emu_shfl(v, j); }
inline float emu_bf(unsigned h) { return __uint_as_float((h & 0xffffu) << 16); }
// D = A·B + C, m16n8k16 row.col bf16 → f32 (PTX ISA fragment layouts).
inline void emu_mma(float *c, const unsigned *a, unsigned b0, unsigned b1) {
    int w = emu_warp(), l = emu_lane();
    uint64_t *x = emu_xchg[w][l];
    x[0] = a[0]; x[1] = a[1]; x[2] = a[2]; x[3] = a[3]; x[4] = b0; x[5] = b1;
    emu_warp_sync();
    float A[16][16], B[16][8];
    for (int t = 0; t < 32; t++) {
        int g = t >> 2, q = t & 3;
        uint64_t *y = emu_xchg[w][t];
        A[g][2 * q] = emu_bf(y[0]); A[g][2 * q + 1] = emu_bf(y[0] >> 16);
        A[g + 8][2 * q] = emu_bf(y[1]); A[g + 8][2 * q + 1] = emu_bf(y[1] >> 16);
        A[g][2 * q + 8] = emu_bf(y[2]); A[g][2 * q + 9] = emu_bf(y[2] >> 16);
        A[g + 8][2 * q + 8] = emu_bf(y[3]); A[g + 8][2 * q + 9] = emu_bf(y[3] >> 16);
        B[2 * q][g] = emu_bf(y[4]); B[2 * q + 1][g] = emu_bf(y[4] >> 16);
        B[2 * q + 8][g] = emu_bf(y[5]); B[2 * q + 9][g] = emu_bf(y[5] >> 16);
    }
    emu_warp_sync();
    int g = l >> 2, q = l & 3;
    for (int e = 0; e < 4; e++) {
        int r = g + (e >= 2 ? 8 : 0), col = 2 * q + (e & 1);
        float s = c[e];
        for (int kk = 0; kk < 16; kk++) s += A[r][kk] * B[kk][col];
        c[e] = s;
    }
}
inline unsigned __cvta_generic_to_shared(const void *p) { return (unsigned)((const char *)p - emu_smem); }
// ldmatrix .x2/.x4 (optionally .trans): lanes 8m..8m+7 address the rows of matrix m.
inline void emu_ldsm(unsigned *r, int nmat, bool trans, unsigned addr) {
    int w = emu_warp(), l = emu_lane();
    emu_xchg[w][l][7] = addr;
    emu_warp_sync();
    int g = l >> 2, q = l & 3;
    for (int m = 0; m < nmat; m++) {
        unsigned short v0, v1;
        if (!trans) {
            const unsigned short *row = (const unsigned short *)(emu_smem + emu_xchg[w][m * 8 + g][7]);
            v0 = row[2 * q]; v1 = row[2 * q + 1];
        } else {
            const unsigned short *r0 = (const unsigned short *)(emu_smem + emu_xchg[w][m * 8 + 2 * q][7]);
            const unsigned short *r1 = (const unsigned short *)(emu_smem + emu_xchg[w][m * 8 + 2 * q + 1][7]);
            v0 = r0[g]; v1 = r1[g];
        }
        r[m] = (unsigned)v0 | ((unsigned)v1 << 16);
    }
    emu_warp_sync();
}
#define emu_ldsm_x2_trans(b0, b1, addr) do { unsigned r_[2]; emu_ldsm(r_, 2, true, (addr)); b0 = r_[0]; b1 = r_[1]; } while (0)
#define emu_ldsm_x4_(b0, b1, b2, b3, addr, tr) \
    do { unsigned r_[4]; emu_ldsm(r_, 4, tr, (addr)); b0 = r_[0]; b1 = r_[1]; b2 = r_[2]; b3 = r_[3]; } while (0)
#define emu_ldsm_x4(b0, b1, b2, b3, addr) emu_ldsm_x4_(b0, b1, b2, b3, addr, false)
#define emu_ldsm_x4_trans(b0, b1, b2, b3, addr) emu_ldsm_x4_(b0, b1, b2, b3, addr, true)
// cp.async: copied at once (EMU_CP_ASYNC unset: a buffer overwritten while another warp still reads it shows),
// or, with EMU_CP_ASYNC=late, only when the issuing thread's wait covers its group (cp.async.wait_group N: every
// committed group but the N most recent; copies not yet committed are not waited for): a tile read before its
// wait shows. run.sh runs both.
struct EmuCopy { unsigned s; const void *src; int size, n; };
extern std::vector<EmuCopy> emu_pending[1024];               // issued, not committed
extern std::vector<std::vector<EmuCopy>> emu_groups[1024];   // committed groups, oldest first
extern bool emu_late;
inline void emu_cp_do(const EmuCopy &c) {
    memset(emu_smem + c.s, 0, c.size);
    if (c.n) memcpy(emu_smem + c.s, c.src, c.n);
}
inline void emu_cp_async(unsigned s, const void *src, int size, int n) {
    if (emu_late) emu_pending[threadIdx.x].push_back({s, src, size, n});
    else emu_cp_do({s, src, size, n});
}
inline void emu_cp_commit() {
    emu_groups[threadIdx.x].push_back(std::move(emu_pending[threadIdx.x]));
    emu_pending[threadIdx.x].clear();
}
inline void emu_cp_async_wait(int n = 0) {
    auto &g = emu_groups[threadIdx.x];
    while ((int)g.size() > n) {
        for (auto &c : g.front()) emu_cp_do(c);
        g.erase(g.begin());
    }
}
