# PyTorch's sdpa at the same shapes (bf16, causal, GQA), the comparison point of gpu_bench.cu.
import torch, torch.nn.functional as F
for name, B, T, H, Hkv, D in [("qwen3-0.6b", 8, 1024, 16, 8, 128), ("llama-3.2-1b", 8, 1024, 32, 8, 64)]:
    q = torch.randn(B, H, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(B, Hkv, T, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    f = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    o = f(); g = torch.randn_like(o)
    def t(fn):
        for _ in range(3): fn()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(20): fn()
        b.record(); torch.cuda.synchronize()
        return a.elapsed_time(b) / 20
    tf = t(f)
    tb = t(lambda: torch.autograd.grad(f(), (q, k, v), g)) - tf
    flops = 4 * B * H * T * T / 2 * D
    print(f"torch sdpa {name}: forward {tf:.3f} ms {flops / tf / 1e9:.0f} TFLOP/s, backward {tb:.3f} ms")
