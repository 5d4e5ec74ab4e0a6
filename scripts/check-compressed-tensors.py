#!/usr/bin/env python3
"""Checks qat's compressed-tensors NVFP4 export against the real libraries (run by hand; CI
does not need it).

    python3 -m venv /tmp/ct && /tmp/ct/bin/pip install compressed-tensors transformers torch
    swift build -c release --product qat
    /tmp/ct/bin/python scripts/check-compressed-tensors.py export/fortune-lm-nvfp4

Given a ModelOpt-format NVFP4 export written by qat (MODELOPT_DIR), it
1. runs `qat convert MODELOPT_DIR --to compressed-tensors` (and, with --ct DIR, also checks an
   export written directly with `export.format: compressed-tensors`: it must be byte-identical);
2. loads that directory with transformers (AutoModelForCausalLM, CompressedTensorsConfig(
   run_compressed=False)) and requires no missing, unexpected or mismatched keys;
3. compares every decompressed Linear weight with qat's dequantization (ModelOpt's formula,
   e2m1 * e4m3(weight_scale) * weight_scale_2 in fp32, as qat's NVFP4.dequantize and the
   export's verification use) rounded to the decompression dtype, the input/weight global
   scales and the KV scales transformers loaded with the files' values;
4. runs compressed-tensors' own ModelOptNvfp4Converter (convert_checkpoint) on MODELOPT_DIR and
   requires its tensors to equal `qat convert`'s: same names up to the KV-scale placement the
   loaders need (self_attn.k_scale vs k_proj.k_scale), same bytes for weight_packed and
   weight_scale, same global-scale values (qat stores them with shape [1], the converter [])
   and the same KV-scale values up to the converter's bf16 cast;
5. runs `qat convert` back to ModelOpt and requires every file to be byte-identical to MODELOPT_DIR.
Prints the library versions; exits 1 on the first failed check.
"""
import argparse
import filecmp
import json
import os
import subprocess
import sys
import tempfile

import compressed_tensors
import torch
import transformers
from compressed_tensors.entrypoints.convert.convert_checkpoint import convert_checkpoint
from compressed_tensors.entrypoints.convert.converters.modelopt_nvfp4 import ModelOptNvfp4Converter
from compressed_tensors.quantization import QuantizationArgs
from safetensors import safe_open
from transformers import AutoModelForCausalLM
from transformers.utils.quantization_config import CompressedTensorsConfig

E2M1 = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
FAILED = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        FAILED.append(what)


def tensors(directory):
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(directory, f), "pt") as st:
                for k in st.keys():
                    out[k] = st.get_tensor(k)
    return out


def qat_dequant(packed, scale, scale_2):
    low, high = packed & 0x0F, packed >> 4
    codes = torch.stack((low, high), dim=-1).reshape(packed.shape[0], -1).long()
    vals = E2M1[codes]
    s = scale.to(torch.float32).repeat_interleave(16, dim=1)
    return (vals * s) * scale_2.to(torch.float32)


def patch_kv_detection():
    import inspect
    import compressed_tensors.quantization.lifecycle.apply as apply_mod
    import compressed_tensors.quantization.lifecycle.initialize as init_mod
    original = init_mod.is_cached_attention_module

    def detect(module):
        if original(module):
            return True
        if not init_mod._is_attention_module(module) or not any(hasattr(module, n) for n in init_mod._KV_CACHE_PROJECTION_NAMES):
            return False
        return "cache" in inspect.signature(module.forward).parameters

    init_mod.is_cached_attention_module = detect
    apply_mod.is_cached_attention_module = detect


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("modelopt", help="qat ModelOpt-format NVFP4 export")
    ap.add_argument("--ct", help="a qat export written with export.format: compressed-tensors (same model)")
    ap.add_argument("--qat", default=".build/release/qat")
    args = ap.parse_args()
    print(f"compressed-tensors {compressed_tensors.__version__}, transformers {transformers.__version__}, torch {torch.__version__}")
    tmp = tempfile.mkdtemp()
    ct = os.path.join(tmp, "qat-ct")
    subprocess.run([args.qat, "convert", args.modelopt, "--to", "compressed-tensors", "--out", ct], check=True)
    if args.ct:
        same = all(filecmp.cmp(os.path.join(ct, f), os.path.join(args.ct, f), shallow=False) for f in os.listdir(ct))
        check(same and sorted(os.listdir(ct)) == sorted(os.listdir(args.ct)),
              f"qat convert output is byte-identical to the direct compressed-tensors export {args.ct}")

    # 2. transformers loads it as is: compressed (the scales kept on the modules) and
    #    decompressed (run_compressed=False, i.e. dequantize=True).
    unpatched = AutoModelForCausalLM.from_pretrained(ct, output_loading_info=True)[1]
    kv_unexpected = sorted(k for k in unpatched.get("unexpected_keys") or [] if k.endswith(".self_attn.k_scale") or k.endswith(".self_attn.v_scale"))
    if kv_unexpected:
        print(f"note: unpatched, transformers {transformers.__version__} reports the {len(kv_unexpected)} self_attn.k_scale/v_scale as unexpected: "
              "compressed-tensors' is_cached_attention_module looks for a past_key_value(s) argument of the attention "
              "forward, which transformers 5 renamed `cache`, so no KV-cache scheme is attached; checking with that "
              "detection extended to `cache`")
    patch_kv_detection()
    model_c, info = AutoModelForCausalLM.from_pretrained(ct, output_loading_info=True)
    for kind in ["missing_keys", "unexpected_keys", "mismatched_keys"]:
        keys = info.get(kind) or []
        check(len(keys) == 0, f"transformers (compressed): no {kind} ({len(keys)}: {sorted(keys)[:4]})")
    model, info = AutoModelForCausalLM.from_pretrained(
        ct, quantization_config=CompressedTensorsConfig(run_compressed=False), output_loading_info=True)
    for kind in ["missing_keys", "mismatched_keys"]:
        keys = info.get(kind) or []
        check(len(keys) == 0, f"transformers (run_compressed=False): no {kind} ({len(keys)}: {sorted(keys)[:4]})")
    unexpected = sorted(info.get("unexpected_keys") or [])
    dropped = [k for k in unexpected if not (k.endswith(".input_global_scale") or k.endswith(".k_scale") or k.endswith(".v_scale"))]
    check(not dropped, f"transformers (run_compressed=False): unexpected keys are only the activation and KV scales that "
                       f"decompression drops ({len(unexpected)}; others: {dropped[:4]})")

    # 3. decompressed weights = qat's dequantization in the decompression dtype.
    mo = tensors(args.modelopt)
    sd = dict(model.named_parameters())
    n_weights, n_exact, worst = 0, 0, 0.0
    for name, t in mo.items():
        if not name.endswith(".weight_scale_2"):
            continue
        module = name[: -len(".weight_scale_2")]
        ref = qat_dequant(mo[module + ".weight"], mo[module + ".weight_scale"], mo[name])
        got = sd[module + ".weight"].detach()
        ref_d = ref.to(got.dtype)
        n_weights += 1
        exact = torch.equal(ref_d, got)
        n_exact += int(exact)
        worst = max(worst, (ref_d.float() - got.float()).abs().max().item())
    check(n_weights > 0 and n_exact == n_weights,
          f"decompressed weights equal qat's dequantization in {got.dtype}: {n_exact}/{n_weights} Linears bit-identical (max |Δ| {worst:g})")
    sd = dict(model_c.named_parameters())
    sd.update(dict(model_c.named_buffers()))
    mismatched_scales, n_scales = [], 0
    for name, t in mo.items():
        for suffix, ct_suffix, recip in [(".weight_scale_2", ".weight_global_scale", True), (".input_scale", ".input_global_scale", True),
                                         (".k_proj.k_scale", ".k_scale", False), (".v_proj.v_scale", ".v_scale", False)]:
            if name.endswith(suffix):
                target = name[: -len(suffix)] + ct_suffix
                have = sd.get(target)
                want = ((1 / t.float()) if recip else t.float()).to(have.dtype if have is not None else torch.float32)
                n_scales += 1
                if have is None or have.reshape(-1)[0].item() != want.item():
                    mismatched_scales.append((target, None if have is None else have.float().reshape(-1)[0].item(), want.item()))
    check(not mismatched_scales, f"transformers (compressed) holds all {n_scales} global and KV scales as stored, in its parameter dtype "
                                 f"({mismatched_scales[:3]})")

    # 4. compressed-tensors' own converter agrees with qat convert.
    lib = os.path.join(tmp, "library-ct")
    kv = QuantizationArgs(num_bits=8, type="float", strategy="tensor", symmetric=True, dynamic=False) \
        if any(k.endswith("k_scale") for k in mo) else None
    ignore = json.load(open(os.path.join(ct, "config.json")))["quantization_config"]["ignore"]
    convert_checkpoint(args.modelopt, lib, ModelOptNvfp4Converter(targets=["Linear"], ignore=ignore, kv_cache_scheme=kv),
                       max_workers=1, device="cpu")
    a, b = tensors(ct), tensors(lib)
    def lib_name(n):
        for s in [".self_attn.k_scale", ".self_attn.v_scale"]:
            if n.endswith(s):
                return n[: -len(s)] + ".self_attn." + s[-7] + "_proj" + s[len(".self_attn"):]
        return n
    problems = []
    for n, t in a.items():
        u = b.get(lib_name(n))
        if u is None:
            problems.append(f"{n}: missing in the library's output")
        elif n.endswith("_scale") and (n.endswith(".k_scale") or n.endswith(".v_scale")):
            if u.float().item() != t.to(u.dtype).float().item():
                problems.append(f"{n}: {t.item()} vs library {u.item()} ({u.dtype})")
        elif n.endswith("global_scale"):
            if u.reshape(-1).tolist() != t.reshape(-1).tolist() or u.dtype != t.dtype:
                problems.append(f"{n}: {t.tolist()} vs library {u.tolist()}")
        elif not (t.dtype == u.dtype and t.shape == u.shape and torch.equal(t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t,
                                                                              u.view(torch.uint8) if u.dtype == torch.float8_e4m3fn else u)):
            problems.append(f"{n}: bytes differ")
    if len(b) != len(a):
        problems.append(f"{len(a)} tensors vs the library's {len(b)}")
    check(not problems, f"ModelOptNvfp4Converter and qat convert agree on {len(a)} tensors ({problems[:3]})")
    qa, qb = json.load(open(os.path.join(ct, "config.json")))["quantization_config"], json.load(open(os.path.join(lib, "config.json")))["quantization_config"]
    qb = dict(qb)
    check(qa == qb, f"quantization_config equals the library's ({json.dumps(qa, sort_keys=True)[:120]}… vs {json.dumps(qb, sort_keys=True)[:120]}…)")

    # 5. round trip (the export's files; qat apply's run files beside them are not part of it).
    back = os.path.join(tmp, "back")
    subprocess.run([args.qat, "convert", ct, "--to", "modelopt", "--out", back], check=True)
    files = sorted(os.listdir(back))
    same = all(filecmp.cmp(os.path.join(back, f), os.path.join(args.modelopt, f), shallow=False) for f in files)
    left = sorted(set(os.listdir(args.modelopt)) - set(files))
    check(same, f"modelopt → compressed-tensors → modelopt is byte-identical ({', '.join(files)}; not carried: {', '.join(left) or 'none'})")
    print("FAILED: " + "; ".join(FAILED) if FAILED else "all checks passed")
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
