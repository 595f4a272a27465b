#!/usr/bin/env python3
"""Greedy continuations of the bf16 golden checkpoints computed by transformers *in bf16*
(weights and activations), for the engine's bf16 path: it keeps bf16 weights as stored and
computes in f32, so its tokens must equal transformers-bf16's wherever bf16's own rounding
cannot flip them. Writes engine/tests/golden/<name>/expected_bf16.json with each case's
tokens and the smallest top-1 margin of transformers-bf16's logits along the way.

Usage (torch 2.15 + transformers 5.24, as make_families.py):
    ~/.cache/moe-serve/venv-hf/bin/python scripts/golden/make_bf16.py
"""
import json
import sys
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[2] / "engine" / "tests" / "golden"


def margin(row: torch.Tensor) -> float:
    top2 = torch.topk(row.float(), 2).values
    return float(top2[0] - top2[1])


@torch.no_grad()
def greedy_bf16(model, prompt_ids, n):
    ids = torch.tensor([prompt_ids], dtype=torch.long)
    out = model(input_ids=ids, use_cache=True)
    cache = out.past_key_values
    row = out.logits[0, -1]
    greedy, margins = [], []
    for k in range(n):
        nxt = int(torch.argmax(row.float()))
        greedy.append(nxt)
        margins.append(margin(row))
        if k == n - 1:
            break
        out = model(input_ids=torch.tensor([[nxt]]), past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        row = out.logits[0, -1]
    return greedy, margins


def main() -> int:
    torch.manual_seed(0)
    written = 0
    for d in sorted(ROOT.iterdir()):
        exp = d / "expected.json"
        if not exp.exists():
            continue
        index = d / "model.safetensors.index.json"
        files = [d / f for f in (json.loads(index.read_text())["weight_map"].values()
                                 if index.exists() else ["model.safetensors"])]
        from safetensors import safe_open
        bf16 = False
        for f in sorted(set(files)):
            with safe_open(f, "pt") as sf:
                bf16 |= any(sf.get_slice(k).get_dtype() == "BF16" for k in sf.keys())
        if not bf16:
            continue
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16, attn_implementation="eager")
        model.eval()
        cases = []
        for case in json.loads(exp.read_text())["cases"]:
            n = len(case["greedy_ids"])
            greedy, margins = greedy_bf16(model, case["prompt_ids"], n)
            cases.append({"name": case["name"], "prompt_ids": case["prompt_ids"],
                          "greedy_ids": greedy, "margins": [round(m, 5) for m in margins]})
        out = {"model": d.name, "transformers_version": transformers.__version__,
               "torch_version": torch.__version__,
               "notes": "transformers in bf16 (weights and activations), eager attention, greedy "
                        "with the cache; margins are top-1 minus top-2 of its bf16 logits per step.",
               "cases": cases}
        (d / "expected_bf16.json").write_text(json.dumps(out, indent=1) + "\n")
        print(d.name, [(c["name"], min(c["margins"])) for c in cases])
        written += 1
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
