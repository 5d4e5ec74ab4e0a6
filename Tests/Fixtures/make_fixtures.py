"""Regenerates the reference fixtures in this folder.

The fixtures are outputs of independent reference implementations
(Hugging Face transformers for the models, NVIDIA ModelOpt's NVFP4QTensor
for NVFP4, PyTorch's float8_e4m3fn for FP8), so the Swift code can be
checked against them number for number.

Needs: torch, transformers, safetensors, nvidia-modelopt (CPU is enough).
Run from this folder: python3 make_fixtures.py

Versions that made the committed files (also in each file's safetensors metadata):
transformers 5.23.0, nvidia-modelopt 0.47 (NVFP4QTensor), PyTorch's float8_e4m3fn.
Checked on 2026-12-02: with torch 2.13.0+cpu, transformers 5.23.0 and nvidia-modelopt
0.47.0 (plus requests, which modelopt imports) this script reproduces every file here
tensor for tensor, bit for bit, on the CPU (the original run did not record its torch
version).

Provenance: every safetensors file written here carries, in its header's __metadata__,
"generator" (this script and the function), "source" (the reference implementation) and
the library versions. `python3 make_fixtures.py --stamp` adds that metadata to existing
files without touching a tensor byte (it only rewrites the JSON header), which is how the
files made before this script recorded provenance were stamped.
"""
import json
import os
import warnings

try:
    import torch
    from safetensors.torch import save_file
except ImportError:  # --stamp needs neither
    torch = None

warnings.filterwarnings("ignore")

# What made the committed files (the original run, before provenance was recorded in them).
PROVENANCE = {
    "tiny-llama/model.safetensors": {"source": "transformers LlamaForCausalLM, random init (std 0.08), saved bf16",
                                     "transformers": "5.23.0", "function": "model_fixture",
                                     "reproduced_with": "torch 2.13.0+cpu, transformers 5.23.0"},
    "tiny-llama/reference.safetensors": {"source": "transformers LlamaForCausalLM fp32 forward/backward on the bf16 weights",
                                         "transformers": "5.23.0", "function": "model_fixture",
                                     "reproduced_with": "torch 2.13.0+cpu, transformers 5.23.0"},
    "tiny-qwen3/model.safetensors": {"source": "transformers Qwen3ForCausalLM, random init (std 0.08), saved bf16",
                                     "transformers": "5.23.0", "function": "model_fixture",
                                     "reproduced_with": "torch 2.13.0+cpu, transformers 5.23.0"},
    "tiny-qwen3/reference.safetensors": {"source": "transformers Qwen3ForCausalLM fp32 forward/backward on the bf16 weights",
                                         "transformers": "5.23.0", "function": "model_fixture",
                                     "reproduced_with": "torch 2.13.0+cpu, transformers 5.23.0"},
    "nvfp4_reference.safetensors": {"source": "ModelOpt NVFP4QTensor.quantize/dequantize, block 16, on the CPU",
                                    "modelopt": "0.47", "function": "nvfp4_fixture",
                                    "reproduced_with": "torch 2.13.0+cpu, nvidia-modelopt 0.47.0"},
    "fp8_e4m3_reference.safetensors": {"source": "PyTorch float8_e4m3fn casts", "function": "fp8_fixture",
                                       "reproduced_with": "torch 2.13.0+cpu"},
}


def versions():
    """Versions of the libraries in this environment, for the metadata of new files."""
    v = {"torch": torch.__version__}
    for mod, key in (("transformers", "transformers"), ("modelopt", "modelopt")):
        try:
            v[key] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 (not needed by every fixture)
            pass
    return v


def stamp(path, meta):
    """Adds `meta` to the __metadata__ of a safetensors file, rewriting only its header
    (data offsets are relative to the end of the header, so no tensor byte moves)."""
    import struct
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    md = dict(header.get("__metadata__") or {})
    md.update({k: str(v) for k, v in meta.items()})
    header["__metadata__"] = md
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path + ".tmp", "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + data)
    os.replace(path + ".tmp", path)


def record(rel, fresh):
    """Provenance of a file this run wrote: the script, the function and the versions."""
    meta = {"generator": "Tests/Fixtures/make_fixtures.py", **PROVENANCE[rel]}
    if fresh:
        meta.update(versions())
    stamp(os.path.join(HERE, rel), meta)
HERE = os.path.dirname(os.path.abspath(__file__))


def model_fixture(name, model_cls, config):
    """Random-init model saved as a bf16 HF checkpoint, plus reference
    input ids, labels, fp32 logits, the HF loss and every parameter's grad."""
    out = os.path.join(HERE, name)
    torch.manual_seed(0)
    model = model_cls(config)
    with torch.no_grad():  # larger-than-default init so layers matter
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    # Reference math in fp32 on the bf16-rounded weights, reloaded from disk so that
    # non-persistent buffers (RoPE inv_freq) are computed in fp32 as a fresh load does.
    model = model_cls.from_pretrained(out, dtype=torch.float32)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, 33), generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a masked prompt
    labels[1, -3:] = -100
    out_ = model(input_ids=ids, labels=labels)
    out_.loss.backward()
    ref = {
        "input_ids": ids.to(torch.int64),
        "labels": labels.to(torch.int64),
        "logits": out_.logits.detach().float().contiguous(),
        "loss": out_.loss.detach().reshape(1).float(),
    }
    for n, p in model.named_parameters():
        ref["grad." + n] = p.grad.detach().float().contiguous()
    save_file(ref, os.path.join(out, "reference.safetensors"))
    record(name + "/model.safetensors", fresh=True)
    record(name + "/reference.safetensors", fresh=True)


def nvfp4_fixture():
    """NVFP4 (E2M1 values, 16-element blocks, E4M3 block scales, fp32 global
    scale) from ModelOpt's NVFP4QTensor: packed bytes, scales, dequantized."""
    from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor

    g = torch.Generator().manual_seed(2)
    cases = {
        "normal": torch.randn(8, 64, generator=g),
        "outliers": torch.randn(6, 128, generator=g) * torch.where(
            torch.rand(6, 128, generator=g) < 0.02, 50.0, 1.0),
        "with_zero_block": torch.cat([torch.zeros(2, 16), torch.randn(2, 48, generator=g)], 1),
        "tiny": torch.randn(4, 32, generator=g) * 1e-6,
        "huge": torch.randn(4, 32, generator=g) * 1e4,
        "ties": torch.tensor([[0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 6.0,
                               -0.25, -0.75, -1.25, -1.75, -2.5, -3.5, -5.0, -6.0]] * 2),
        "bf16_weight": (torch.randn(16, 96, generator=g) * 0.05).to(torch.bfloat16).float(),
    }
    ref = {}
    for k, x in cases.items():
        q, scale, scale2 = NVFP4QTensor.quantize(x.clone(), 16)
        deq = q.dequantize(dtype=torch.float32, scale=scale, double_scale=scale2,
                           block_sizes={-1: 16})
        ref[k + ".input"] = x.contiguous()
        ref[k + ".packed"] = q._quantized_data.contiguous()  # uint8, low nibble = even element
        ref[k + ".block_scale_e4m3"] = scale.view(torch.uint8).contiguous()
        ref[k + ".global_scale"] = scale2.reshape(1).float()
        ref[k + ".dequantized"] = deq.float().contiguous()
    save_file(ref, os.path.join(HERE, "nvfp4_reference.safetensors"))
    record("nvfp4_reference.safetensors", fresh=True)


def fp8_fixture():
    """All 256 E4M3FN codes decoded, and a rounding table of floats cast to
    E4M3FN (after clamping to +-448, as quantizers do) by PyTorch."""
    codes = torch.arange(256, dtype=torch.uint8)
    decoded = codes.view(torch.float8_e4m3fn).float()
    g = torch.Generator().manual_seed(3)
    x = torch.cat([
        torch.randn(4096, generator=g) * 100,
        torch.randn(4096, generator=g) * 1e-2,
        torch.rand(1024, generator=g) * 2**-6,  # subnormal range
        decoded[torch.isfinite(decoded)],  # exact codes
        (decoded[torch.isfinite(decoded)][:-1] + decoded[torch.isfinite(decoded)][1:]) / 2,
        torch.tensor([0.0, -0.0, 448.0, -448.0, 500.0, -1e9, 2**-9, 2**-10, 2**-11]),
    ])
    enc = x.clamp(-448, 448).to(torch.float8_e4m3fn).view(torch.uint8)
    save_file({"codes": codes, "decoded": decoded, "x": x, "encoded": enc},
              os.path.join(HERE, "fp8_e4m3_reference.safetensors"))
    record("fp8_e4m3_reference.safetensors", fresh=True)


if __name__ == "__main__":
    import sys
    if sys.argv[1:] == ["--stamp"]:  # provenance of the files already here, tensors untouched
        for rel in PROVENANCE:
            record(rel, fresh=False)
        sys.exit(0)
    torch.manual_seed(0)
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    model_fixture("tiny-llama", LlamaForCausalLM, LlamaConfig(
        vocab_size=512, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False))
    model_fixture("tiny-qwen3", Qwen3ForCausalLM, Qwen3Config(
        vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=48,
        max_position_embeddings=256, rope_theta=1000000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=True))
    nvfp4_fixture()
    fp8_fixture()
    print(json.dumps(sorted(os.listdir(HERE))))
