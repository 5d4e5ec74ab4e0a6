"""Regenerates the tiny mixture-of-experts fixtures in this folder (tiny-qwen3-moe*,
tiny-qwen2-moe*, tiny-mixtral*).

Each fixture is a random-init transformers model saved as a bf16 Hugging Face checkpoint in
the hub's per-expert layout (transformers 5 fuses experts in memory and un-fuses them on
save), plus `reference.safetensors`: the model run in fp32 on the bf16-rounded weights,
with input_ids, labels, logits, loss and d loss / d parameter for every parameter under its
checkpoint (per-expert) name. Router weights are drawn larger than the rest so that routing
is decisive: the script checks that no token's k-th and (k+1)-th router logits are
closer than MARGIN. The `*-b` fixtures set output_router_logits, so their loss includes
router_aux_loss_coef x the load-balancing loss (also stored alone as `aux_loss`).

`router_ties_reference.safetensors` pins down the top-k tie order: transformers' routers
(Qwen3-MoE with and without norm_topk_prob, Mixtral) on one-hot inputs, so each token's
logits are exactly one column of the router weight, whose entries repeat (exact ties).

Needs: torch (CPU), transformers, safetensors. Run from anywhere: python3 make_moe_fixtures.py
Written with torch 2.13.0+cpu and transformers 5.24.0.
"""
import json
import os
import warnings

import torch
import transformers
from safetensors.torch import save_file

warnings.filterwarnings("ignore")
HERE = os.path.dirname(os.path.abspath(__file__))
MARGIN = 1e-3


def router_modules(model):
    return [(n, m) for n, m in model.named_modules() if n.endswith("mlp.gate") or n.endswith("block_sparse_moe.gate")]


def check_decisive(model, ids, top_k):
    """Smallest gap between the k-th and (k+1)-th router logit (softmax is monotone) over
    all tokens and sparse layers, ignoring exact ties; also counts exact ties there."""
    probs = []
    hooks = [m.register_forward_hook(lambda mod, i, o: probs.append(o[0].float()))
             for _, m in router_modules(model)]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    gap, ties = 1.0, 0
    for p in probs:
        s = p.sort(-1, descending=True).values
        if s.shape[-1] <= top_k:
            continue
        d = s[:, top_k - 1] - s[:, top_k]
        ties += int((d == 0).sum())
        nz = d[d > 0]
        if nz.numel():
            gap = min(gap, float(nz.min()))
    return gap, ties


def grads_by_checkpoint_name(model):
    """Gradients under the checkpoint's names: fused experts split per expert."""
    out = {}
    for n, p in model.named_parameters():
        g = p.grad.detach().float()
        if n.endswith("experts.gate_up_proj"):
            base = n[: -len("gate_up_proj")]
            inter = g.shape[1] // 2
            gate_name, up_name = "gate_proj", "up_proj"
            for e in range(g.shape[0]):
                out[f"grad.{base}{e}.{gate_name}.weight"] = g[e, :inter].contiguous()
                out[f"grad.{base}{e}.{up_name}.weight"] = g[e, inter:].contiguous()
        elif n.endswith("experts.down_proj"):
            base = n[: -len("down_proj")]
            down_name = "down_proj"
            for e in range(g.shape[0]):
                out[f"grad.{base}{e}.{down_name}.weight"] = g[e].contiguous()
        else:
            out["grad." + n] = g.contiguous()
    if model.config.model_type == "mixtral":
        # transformers 5 names Mixtral's block `mlp` in memory; the checkpoint says
        # block_sparse_moe.{gate, experts.N.w1/w3/w2}.
        def hub(name):
            name = name.replace(".mlp.", ".block_sparse_moe.")
            for a, b in [(".gate_proj.", ".w1."), (".up_proj.", ".w3."), (".down_proj.", ".w2.")]:
                name = name.replace(a, b)
            return name
        out = {hub(k): v for k, v in out.items()}
    return out


def moe_fixture(name, model_cls, config, tie_router_rows=None, seed=0):
    """Tries seeds from `seed` on until routing is decisive (at most 200)."""
    for s in range(seed, seed + 200):
        if try_fixture(name, model_cls, config, tie_router_rows, s):
            return
    raise SystemExit(f"{name}: no decisive seed found")


def try_fixture(name, model_cls, config, tie_router_rows, seed):
    out = os.path.join(HERE, name)
    torch.manual_seed(seed)
    model = model_cls(config)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("gate.weight") and "shared_expert_gate" not in n:
                p.normal_(0.0, 0.5)  # decisive routing
            elif p.dim() >= 2:
                p.normal_(0.0, 0.08)
        if tie_router_rows is not None:
            a, b = tie_router_rows
            for _, m in router_modules(model):
                m.weight[b] = m.weight[a]
    # Decisiveness is checked on the bf16-rounded weights the reference runs on.
    model.to(torch.bfloat16).to(torch.float32)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, config.vocab_size, (2, 17), generator=g)
    gap, ties = check_decisive(model, ids, config.num_experts_per_tok)
    if gap <= MARGIN:
        return False
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    model = model_cls.from_pretrained(out, dtype=torch.float32)
    model.train()  # dropout is 0; Mixtral jitter is 0
    labels = ids.clone()
    labels[0, :3] = -100
    labels[1, -2:] = -100
    gap2, _ = check_decisive(model, ids, config.num_experts_per_tok)
    assert gap2 > MARGIN, f"{name}: routing not decisive after reload (gap {gap2})"
    out_ = model(input_ids=ids, labels=labels)
    out_.loss.backward()
    ref = {
        "input_ids": ids.to(torch.int64),
        "labels": labels.to(torch.int64),
        "logits": out_.logits.detach().float().contiguous(),
        "loss": out_.loss.detach().reshape(1).float(),
    }
    if getattr(out_, "aux_loss", None) is not None:
        ref["aux_loss"] = out_.aux_loss.detach().reshape(1).float()
    ref.update(grads_by_checkpoint_name(model))
    save_file(ref, os.path.join(out, "reference.safetensors"))
    print(f"{name}: seed {seed}, loss {out_.loss.item():.6f}, min top-k logit gap {gap:.4f}, boundary ties {ties}")
    return True


def router_ties_fixture():
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter
    from transformers import MixtralConfig, Qwen3MoeConfig

    E, C = 8, 16
    g = torch.Generator().manual_seed(5)
    levels = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0])
    w = levels[torch.randint(0, len(levels), (E, C), generator=g)]  # many exact ties per column
    x = torch.eye(C)
    ref = {"weight": w.contiguous(), "x": x.contiguous()}
    for tag, router in [
        ("qwen_k3_norm", Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=C, num_experts=E, num_experts_per_tok=3, norm_topk_prob=True))),
        ("qwen_k2", Qwen3MoeTopKRouter(Qwen3MoeConfig(hidden_size=C, num_experts=E, num_experts_per_tok=2, norm_topk_prob=False))),
        ("mixtral_k4", MixtralTopKRouter(MixtralConfig(hidden_size=C, num_local_experts=E, num_experts_per_tok=4))),
    ]:
        with torch.no_grad():
            router.weight.copy_(w)
            _, scores, idx = router(x)
        ref[tag + ".indices"] = idx.to(torch.int64).contiguous()
        ref[tag + ".scores"] = scores.float().contiguous()
    save_file(ref, os.path.join(HERE, "router_ties_reference.safetensors"))


if __name__ == "__main__":
    from transformers import (MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM,
                              Qwen3MoeConfig, Qwen3MoeForCausalLM)

    common = dict(vocab_size=256, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=128, rms_norm_eps=1e-6)
    # Set a: the families' plain shapes.
    moe_fixture("tiny-qwen3-moe", Qwen3MoeForCausalLM, Qwen3MoeConfig(
        **common, head_dim=24, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=2,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, rope_theta=1e6, tie_word_embeddings=True))
    moe_fixture("tiny-qwen2-moe", Qwen2MoeForCausalLM, Qwen2MoeConfig(
        **common, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
        num_hidden_layers=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False))
    moe_fixture("tiny-mixtral", MixtralForCausalLM, MixtralConfig(
        **common, intermediate_size=32, num_hidden_layers=2, num_local_experts=4, num_experts_per_tok=2))
    # Set b: other expert counts and top-k, dense layers, a router tie, the auxiliary loss.
    moe_fixture("tiny-qwen3-moe-b", Qwen3MoeForCausalLM, Qwen3MoeConfig(
        **common, head_dim=16, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=3,
        num_experts=6, num_experts_per_tok=3, norm_topk_prob=False, mlp_only_layers=[1],
        output_router_logits=True, router_aux_loss_coef=0.05, tie_word_embeddings=False))
    moe_fixture("tiny-qwen2-moe-b", Qwen2MoeForCausalLM, Qwen2MoeConfig(
        **common, intermediate_size=80, moe_intermediate_size=16, shared_expert_intermediate_size=40,
        num_hidden_layers=3, decoder_sparse_step=2, num_experts=8, num_experts_per_tok=1, norm_topk_prob=True,
        qkv_bias=True, output_router_logits=True, router_aux_loss_coef=0.1), seed=1)
    moe_fixture("tiny-mixtral-b", MixtralForCausalLM, MixtralConfig(
        **common, intermediate_size=24, num_hidden_layers=2, num_local_experts=5, num_experts_per_tok=3,
        sliding_window=8, output_router_logits=True, router_aux_loss_coef=0.02), seed=2)
    router_ties_fixture()
    print(json.dumps({"torch": torch.__version__, "transformers": transformers.__version__}))
