"""transformers' greedy continuations of fortune-lm, for qat generate's token-for-token test.

Writes Tests/Fixtures/generation/fortune-lm-greedy.json: for 3 prompts, the prompt ids
(transformers' tokenizer, no special tokens added: fortune-lm's post-processor adds none) and
the 30 new ids of `model.generate(do_sample=False, max_new_tokens=30)` with the generation
config's eos_token_id unset (fp32 compute on the bf16 checkpoint, KV cache on): fortunes are
short, so greedy decoding picks <|endoftext|> (id 0) early and then goes on to the next
fortune, which is `qat generate --ignore-eos`. Also the library versions. Run:
    /tmp/ct/bin/python Tests/Fixtures/generation/make_greedy_fixture.py
"""
import json
import os

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL = os.path.join(HERE, "..", "..", "..", "models", "fortune-lm")
PROMPTS = ["The meaning of life is", "Q:\tWhat do you call a", "It is a truth universally acknowledged that"]


def main():
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(MODEL)
    model = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None
    cases = []
    for p in PROMPTS:
        ids = tok(p, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=30, use_cache=True)
        new = out[0, ids.shape[1]:].tolist()
        cases.append({"prompt": p, "prompt_ids": ids[0].tolist(), "new_ids": new, "text": tok.decode(new)})
        print(repr(p), "→", repr(tok.decode(new)))
    doc = {"model": "models/fortune-lm", "dtype": "float32", "max_new_tokens": 30,
           "versions": {"transformers": transformers.__version__, "torch": torch.__version__}, "cases": cases}
    with open(os.path.join(HERE, "fortune-lm-greedy.json"), "w") as f:
        json.dump(doc, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    main()
