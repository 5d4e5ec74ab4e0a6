# Writes kernels.cpp (in the current directory) from common.cu and the kernel files named as
# arguments, for kernels without tensor-core, shared-memory-array or inline-asm code (the loss rows,
# the optimizer, the quantizers, the element-wise kernels; the loss rows' ex2.approx becomes exp2f): the rounding intrinsics the emulator's
# prelude.h lacks are added as plain C++, and __shared__ reduction arrays (double or float) become statics
# (shared memory when blocks run one at a time). Used by loss.sh and quant.sh.
import os, re, sys
root = os.path.join(os.path.dirname(os.path.abspath(__file__)), '../../Sources/QATCUDA/Kernels/')
src = '\n'.join(open(root + f).read() for f in ['common.cu'] + sys.argv[1:])
src = re.sub(r'__shared__ (double|float) (\w+)\[([^\]]+)\];', r'static \1 \2[\3];', src)
src = src.replace('asm("ex2.approx.ftz.f32 %0, %1;\\n" : "=f"(y) : "f"(x));', 'y = exp2f(x);')
assert 'asm' not in src and '__shared__' not in src
extra = ('inline unsigned atomicMax(unsigned *p, unsigned v) { unsigned o = *p; if (v > o) *p = v; return o; }\n')
open('kernels.cpp', 'w').write('#include "prelude.h"\n' + extra + src)
