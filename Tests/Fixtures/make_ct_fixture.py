"""Golden compressed-tensors NVFP4 export written by the compressed-tensors library.

Makes Tests/Fixtures/ct-tiny-llama/ from Tests/Fixtures/tiny-llama:
1. a ModelOpt-format NVFP4 W4A4 + FP8 KV checkpoint of tiny-llama, computed here in torch with
   ModelOpt's formulas (NVFP4QTensor: weight_scale_2 = amax/(6*448), E4M3 block scales of
   block amax/(6*weight_scale_2), E2M1 codes by round-to-nearest-even of w/(scale*scale_2),
   even element in the low nibble; input_scale = amax/(6*448); k/v_scale = amax/448), with
   fixed input and KV amax (a format fixture: no calibration data needed);
2. converted by compressed-tensors' own ModelOptNvfp4Converter + convert_checkpoint (what a
   user runs to turn a ModelOpt export into compressed-tensors), which writes
   model.safetensors and config.json's quantization_config;
3. reference.safetensors: the library's decompression of every NVFP4 weight
   (NVFP4PackedCompressor.decompress, bf16: what transformers computes with) under
   `<module>.weight`, with the global scale shaped [1] as the loaders hold it.

qat's test (CompressedTensorsTests.testGoldenLibraryExport) reads the directory without Python.
Versions used: see VERSIONS in the generated reference metadata (run with compressed-tensors
0.20.1, transformers 5.24.0, torch 2.15.0). Run:
    python3 -m venv /tmp/ct && /tmp/ct/bin/pip install compressed-tensors transformers torch
    /tmp/ct/bin/python Tests/Fixtures/make_ct_fixture.py
"""
import json
import os
import shutil
import tempfile

import compressed_tensors
import torch
import transformers
from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
from compressed_tensors.entrypoints.convert.convert_checkpoint import convert_checkpoint
from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.quant_scheme import NVFP4
from safetensors.torch import load_file, save_file

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "tiny-llama")
OUT = os.path.join(HERE, "ct-tiny-llama")
E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def nvfp4(w, amax):
    """ModelOpt NVFP4QTensor.quantize on a 2-D fp32 weight: (packed u8, e4m3 scales, scale_2)."""
    s2 = torch.tensor(amax / (6 * 448), dtype=torch.float32)
    rows, cols = w.shape
    blocks = w.reshape(rows, cols // 16, 16)
    bamax = blocks.abs().amax(-1)
    scale = (bamax / (6 * s2)).clamp(min=2 ** -9, max=448).to(torch.float8_e4m3fn)
    scale_f = scale.to(torch.float32)
    scale_f = torch.where(bamax == 0, torch.ones_like(scale_f), scale_f)
    scale = scale_f.to(torch.float8_e4m3fn)
    x = blocks / (scale_f * s2).unsqueeze(-1)
    mag = x.abs().clamp(max=6)
    # round to the nearest E2M1 value, ties to even code
    diff = (mag.unsqueeze(-1) - E2M1).abs()
    idx = diff.argmin(-1)
    best = diff.gather(-1, idx.unsqueeze(-1)).squeeze(-1)
    nxt = (idx + 1).clamp(max=7)
    tie = (diff.gather(-1, nxt.unsqueeze(-1)).squeeze(-1) == best) & (nxt != idx) & (idx % 2 == 1)
    idx = torch.where(tie, nxt, idx)
    code = idx | ((x < 0) & (idx > 0)).to(torch.long) * 8
    code = code.reshape(rows, cols).to(torch.uint8)
    packed = code[:, 0::2] | (code[:, 1::2] << 4)
    return packed, scale, s2


def main():
    torch.manual_seed(0)
    tensors = load_file(os.path.join(SRC, "model.safetensors"))
    config = json.load(open(os.path.join(SRC, "config.json")))
    modelopt = {}
    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    for name, t in tensors.items():
        module = name[: -len(".weight")]
        if name.endswith(".weight") and module.split(".")[-1] in linears:
            layer = module.rsplit(".", 1)[0]
            # Fused groups share one global scale (q/k/v, gate/up), as vLLM requires.
            group = ["q_proj", "k_proj", "v_proj"] if module.split(".")[-1] in ["q_proj", "k_proj", "v_proj"] else (
                ["gate_proj", "up_proj"] if module.split(".")[-1] in ["gate_proj", "up_proj"] else [module.split(".")[-1]])
            amax = max(tensors[f"{layer}.{g}.weight"].float().abs().max().item() for g in group)
            packed, scale, s2 = nvfp4(t.float(), amax)
            modelopt[f"{module}.weight"] = packed
            modelopt[f"{module}.weight_scale"] = scale
            modelopt[f"{module}.weight_scale_2"] = s2
            modelopt[f"{module}.input_scale"] = torch.tensor(3.0 / (6 * 448), dtype=torch.float32)
            if module.endswith("k_proj"):
                modelopt[f"{module}.k_scale"] = torch.tensor(2.5 / 448, dtype=torch.float32)
            if module.endswith("v_proj"):
                modelopt[f"{module}.v_scale"] = torch.tensor(1.25 / 448, dtype=torch.float32)
        else:
            modelopt[name] = t
    tmp = tempfile.mkdtemp()
    src = os.path.join(tmp, "modelopt")
    os.makedirs(src)
    save_file(modelopt, os.path.join(src, "model.safetensors"), metadata={"format": "pt"})
    json.dump(config, open(os.path.join(src, "config.json"), "w"), indent=2)

    kv = QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False)
    converter = ModelOptNvfp4Converter(targets=["Linear"], ignore=["lm_head"], kv_cache_scheme=kv)
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    convert_checkpoint(src, OUT, converter, max_workers=1, device="cpu")
    shutil.rmtree(tmp)

    # The library's own decompression of every weight (bf16, as transformers loads it).
    ct = load_file(os.path.join(OUT, "model.safetensors"))
    scheme = QuantizationScheme(targets=["Linear"], **NVFP4)
    ref = {}
    for name in ct:
        if not name.endswith(".weight_packed"):
            continue
        module = name[: -len(".weight_packed")]
        sd = {k.split(module + ".")[1]: v for k, v in ct.items() if k.startswith(module + ".")}
        # As loaded: transformers and vLLM allocate the global scale with shape [1] (a 0-d
        # tensor would make torch divide the bf16 block scale in bf16, not fp32).
        sd["weight_global_scale"] = sd["weight_global_scale"].reshape(1)
        out = NVFP4PackedCompressor.decompress(sd, scheme)
        ref[f"{module}.weight"] = out["weight"].contiguous()
    versions = {"compressed_tensors": compressed_tensors.__version__, "transformers": transformers.__version__,
                "torch": torch.__version__}
    save_file(ref, os.path.join(OUT, "reference.safetensors"), metadata={"versions": json.dumps(versions)})
    print("wrote", OUT, versions)


if __name__ == "__main__":
    main()
