# Writes kernels.cpp (in the current directory): common.cu + attention.cu (or the kernel file named
# as the first argument, e.g. lora.cu or topk.cu) made plain C++ for the emulator of prelude.h (dynamic
# shared memory, mma.sync, ldmatrix and cp.async replaced by calls; static __shared__ arrays become
# statics, which is shared memory when blocks run one at a time).
import os, re, sys
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '../../Sources/QATCUDA/Kernels/')
src = open(root + 'common.cu').read() + '\n' + open(root + (sys.argv[1] if len(sys.argv) > 1 else 'attention.cu')).read()
src = re.sub(r'extern __shared__ (\w+) (\w+)\[\];', r'\1 *\2 = (\1 *)emu_smem;', src)
src = re.sub(r'asm volatile\("mma\.sync.*?\);', 'emu_mma(c, a, b0, b1);', src, flags=re.S)
src = re.sub(r'asm volatile\("ldmatrix\.sync\.aligned\.m8n8\.x2\.trans\.shared\.b16 \{%0,%1\}, \[%2\];\\n"'
             r'\s*:\s*"=r"\((\w+)\), "=r"\((\w+)\)\s*:\s*"r"\(([^)]*)\)\);',
             r'emu_ldsm_x2_trans(\1, \2, \3);', src)
src = re.sub(r'asm volatile\("ldmatrix\.sync\.aligned\.m8n8\.x4(\.trans)?\.shared\.b16 \{%0,%1,%2,%3\}, \[%4\];\\n"'
             r'\s*:\s*"=r"\(r\[0\]\), "=r"\(r\[1\]\), "=r"\(r\[2\]\), "=r"\(r\[3\]\)\s*:\s*"r"\((\w+)\)\);',
             lambda m: 'emu_ldsm(r, 4, %s, %s);' % ('true' if m.group(1) else 'false', m.group(2)), src)
src = src.replace('asm("cvt.rn.bf16x2.f32 %0, %1, %2;\\n" : "=r"(r) : "f"(hi), "f"(lo));',
                  'r = (u32)f32_to_bf16(lo) | ((u32)f32_to_bf16(hi) << 16);')
src = src.replace('asm("ex2.approx.ftz.f32 %0, %1;\\n" : "=f"(y) : "f"(x));', 'y = exp2f(x);')
src = re.sub(r'asm volatile\("cp\.async\.c[ag]\.shared\.global \[%0\], \[%1\], (\d+), %2;\\n" ::"r"\(s\), "l"\(src\), "r"\(n\)\);',
             r'emu_cp_async(s, src, \1, n);', src)
src = re.sub(r'asm volatile\("cp\.async\.commit_group;\\n" ::\);', 'emu_cp_commit();', src)
src = re.sub(r'asm volatile\("cp\.async\.wait_group 0;\\n" ::: "memory"\);', 'emu_cp_async_wait();', src)
src = re.sub(r'__shared__ (double|float) (\w+)\[32\];', r'static \1 \2[32];', src)
src = re.sub(r'(?<!extern )__shared__ ', 'static ', src)
assert 'asm' not in src, [l for l in src.split('\n') if 'asm' in l]
open('kernels.cpp', 'w').write('#include "prelude.h"\n' + src)
