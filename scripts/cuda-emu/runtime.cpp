#include "prelude.h"
EmuFiber *emu_cur;
ucontext_t emu_sched;
dim3e emu_block, emu_bdim, emu_gdim;
char *emu_smem;
EmuBar emu_blockbar, emu_warpbar[32];
int emu_nthreads;
uint64_t emu_xchg[32][32][8];
std::vector<EmuCopy> emu_pending[1024];
std::vector<std::vector<EmuCopy>> emu_groups[1024];
bool emu_late = getenv("EMU_CP_ASYNC") && !strcmp(getenv("EMU_CP_ASYNC"), "late");
static std::function<void()> *emu_body;
static void emu_entry() { (*emu_body)(); emu_cur->done = true; }
// Runs body() as every thread of every block of the grid.
void emu_launch(dim3e grid, int threads, size_t smem, std::function<void()> body) {
    emu_gdim = grid; emu_bdim = {(unsigned)threads, 1, 1}; emu_nthreads = threads; emu_body = &body;
    std::vector<char> sm(smem + 16);
    std::vector<EmuFiber> f(threads);
    for (unsigned bz = 0; bz < grid.z; bz++) for (unsigned by = 0; by < grid.y; by++) for (unsigned bx = 0; bx < grid.x; bx++) {
        emu_block = {bx, by, bz};
        memset(sm.data(), 0xcd, sm.size());   // garbage, as on a GPU
        emu_smem = sm.data();
        emu_blockbar = EmuBar();
        for (auto &p : emu_pending) p.clear();
        for (auto &g : emu_groups) g.clear();
        for (auto &w : emu_warpbar) w = EmuBar();
        for (int t = 0; t < threads; t++) {
            f[t].stack.resize(1 << 17);
            f[t].done = false; f[t].tid = {(unsigned)t, 0, 0};
            getcontext(&f[t].ctx);
            f[t].ctx.uc_stack.ss_sp = f[t].stack.data(); f[t].ctx.uc_stack.ss_size = f[t].stack.size();
            f[t].ctx.uc_link = &emu_sched;
            makecontext(&f[t].ctx, emu_entry, 0);
        }
        bool any = true;
        while (any) {
            any = false;
            for (int t = 0; t < threads; t++) if (!f[t].done) { any = true; emu_cur = &f[t]; swapcontext(&emu_sched, &f[t].ctx); }
        }
    }
}
