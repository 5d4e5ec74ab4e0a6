"""Builds fortune-lm: a small Llama-architecture causal LM pretrained with
PyTorch/transformers on the text of Debian's `fortunes` packages, with its
byte-level BPE tokenizer.json and the tokenized data as HDF5.

It gives the project a real, trained model whose accuracy quantization can
hurt and QAT/QAD can recover, on a machine with no model hub.

Two steps: `prepare` (tokenizer and data; needs tokenizers, h5py, numpy and
`apt-get install fortunes fortunes-min`) and `train` (needs torch and
transformers; a GPU makes it minutes instead of hours).
Run from this folder: python3 make_fortune_lm.py prepare; python3 make_fortune_lm.py train [steps]

Versions that made the committed models/fortune-lm: transformers 5.23.0 (config.json's
"transformers_version"), tokenizers and h5py of the same environment, trained on a GPU;
`TRAINING.json` records the run (best validation checkpoint at step 800 of batch 32 × 256,
validation loss 3.7709, which `FortuneLMReferenceTests` checks). The model's safetensors
metadata names this script ("generator"); `train` writes it, with the versions, itself.
"""
import glob
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fortune-lm")
SEQ = 256
torch.manual_seed(0)
random.seed(0)


def load_fortunes():
    docs = []
    for path in sorted(glob.glob("/usr/share/games/fortunes/*")):
        if path.endswith((".dat", ".u8")) or os.path.isdir(path):
            continue
        text = open(path, encoding="utf-8", errors="replace").read()
        docs += [d.strip() for d in text.split("\n%\n") if d.strip()]
    random.shuffle(docs)
    return docs


def prepare():
    import h5py
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    docs = load_fortunes()
    n_val = len(docs) // 20
    val_docs, train_docs = docs[:n_val], docs[n_val:]
    os.makedirs(OUT, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(train_docs, trainers.BpeTrainer(
        vocab_size=2048, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    eos = tok.token_to_id("<|endoftext|>")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>", pad_token="<|endoftext|>")
    fast.save_pretrained(OUT)

    def encode(ds):
        ids = []
        for d in ds:
            ids += tok.encode(d).ids + [eos]
        return np.array(ids, dtype=np.int32)

    train, val = encode(train_docs), encode(val_docs)
    with h5py.File(os.path.join(OUT, "tokens.h5"), "w") as f:
        f.create_dataset("train/input_ids", data=train, compression="gzip")
        f.create_dataset("validation/input_ids", data=val, compression="gzip")
        f.attrs["eos_token_id"] = eos
        f.attrs["source"] = "Debian fortunes, fortunes-min"
    for name, docs_ in (("train", train_docs), ("validation", val_docs)):
        with open(os.path.join(OUT, name + ".jsonl"), "w") as f:
            for d in docs_:
                f.write(json.dumps({"text": d}) + "\n")
    np.save("/tmp/fortune_train.npy", train)
    np.save("/tmp/fortune_val.npy", val)
    print(f"{len(train_docs)} train docs, {len(train)} tokens; {len(val)} validation tokens")


def train(steps, out_dir, train_npy, val_npy, eos):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = LlamaConfig(vocab_size=2048, hidden_size=256, intermediate_size=704,
                      num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=SEQ, rms_norm_eps=1e-5,
                      tie_word_embeddings=False, bos_token_id=eos, eos_token_id=eos)
    model = LlamaForCausalLM(cfg).to(dev)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    tr = torch.from_numpy(np.load(train_npy).astype(np.int64)).to(dev)
    va = torch.from_numpy(np.load(val_npy).astype(np.int64)).to(dev)
    batch = 32
    best = (float("inf"), 0, None)

    def val_loss():
        model.eval()
        n = (len(va) - 1) // SEQ
        x = va[: n * SEQ].view(n, SEQ)
        with torch.no_grad():
            loss = sum(model(input_ids=x[i:i + 64], labels=x[i:i + 64]).loss.item() * len(x[i:i + 64])
                       for i in range(0, n, 64)) / n
        model.train()
        return loss

    for step in range(steps):
        lr = 3e-3 * min(1.0, (step + 1) / 200) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))
        for g in opt.param_groups:
            g["lr"] = lr
        idx = torch.randint(0, len(tr) - SEQ - 1, (batch,), device=dev)
        x = torch.stack([tr[i:i + SEQ] for i in idx])
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        if step % 100 == 99:  # keep the best validation checkpoint (the corpus is small)
            v = val_loss()
            print(f"step {step + 1} train {loss.item():.3f} val {v:.3f}", flush=True)
            if v < best[0]:
                best = (v, step + 1, {k: t.detach().clone() for k, t in model.state_dict().items()})
    final, best_step, state = best
    model.load_state_dict(state)
    print(f"done: best at step {best_step}, validation loss {final:.4f}, ppl {math.exp(final):.2f}")
    import transformers
    model.to(torch.bfloat16).cpu().save_pretrained(out_dir, safe_serialization=True, metadata={
        "format": "pt", "generator": "models/make_fortune_lm.py train", "torch": torch.__version__,
        "transformers": transformers.__version__, "source": "Debian fortunes, fortunes-min"})
    with open(os.path.join(out_dir, "TRAINING.json"), "w") as f:
        json.dump({"steps": best_step, "batch": batch, "seq_len": SEQ, "optimizer": "AdamW lr 3e-3 cosine",
                   "train_tokens": int(len(tr)), "validation_tokens": int(len(va)),
                   "validation_loss_fp32_weights": round(final, 4)}, f, indent=1)


if __name__ == "__main__":
    if sys.argv[1] == "prepare":
        prepare()
    else:
        train(int(sys.argv[2]) if len(sys.argv) > 2 else 6000, sys.argv[3] if len(sys.argv) > 3 else OUT,
              sys.argv[4] if len(sys.argv) > 4 else "/tmp/fortune_train.npy",
              sys.argv[5] if len(sys.argv) > 5 else "/tmp/fortune_val.npy", 0)
