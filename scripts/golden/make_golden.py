#!/usr/bin/env python3
"""Generate golden test fixtures for moe-serve.

Builds tiny random Mixtral checkpoints (plus a tiny byte-level BPE tokenizer)
and records reference logits / greedy continuations computed by HF
transformers into engine/tests/golden/<name>/.

Deterministic and idempotent: every output folder is wiped and rebuilt from
fixed seeds.  Run from the repo root with:

    ~/.cache/moe-serve/venv/bin/python scripts/golden/make_golden.py

Pinned environment: scripts/requirements.txt.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402
from transformers import MixtralConfig, MixtralForCausalLM  # noqa: E402

transformers.utils.logging.set_verbosity_error()
transformers.utils.logging.disable_progress_bar()
torch.set_num_threads(1)  # small models; keeps results bit-stable and the machine quiet

REPO_ROOT = Path(__file__).resolve().parents[2]
GOLDEN_DIR = REPO_ROOT / "engine" / "tests" / "golden"

N_NEW_TOKENS = 8
MIN_MARGIN = 0.05  # smallest accepted top1-top2 logit gap over greedy steps
MIN_ROUTER_GAP = 1e-3  # smallest accepted gap between k-th and (k+1)-th router *logit*
MAX_FOLDER_BYTES = 2 * 1024 * 1024
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2

CORPUS = """\
The small engine hummed quietly as the morning light crept across the workshop floor.
Every tool had its place on the wall, and every place had a story about the person who
had hung it there. The old mechanic liked to say that a machine only tells the truth
when you listen to it slowly, one sound at a time.

In the village by the river, the market opened early. Farmers carried baskets of apples,
bread and cheese, and the children ran between the stalls laughing. A light rain began
to fall, but nobody seemed to mind; the smell of fresh bread was stronger than the weather.

Mixture of experts models route each token to a few specialist networks. A router looks
at the hidden state, scores every expert, and keeps only the best ones. The chosen experts
process the token, and their outputs are mixed using the router weights. This makes the
model large in total size but cheap to run for each token.

She opened the letter and read it twice. The words were simple, but the meaning was not.
Outside, the wind moved through the trees and the birds were singing as if nothing had
changed at all. She folded the paper, put it in her pocket, and walked down to the water.

Numbers can be written as words or digits: one, two, three, four, five, or 1, 2, 3, 4, 5.
A good test uses both short and long inputs, checks the first answer and the last one,
and never trusts a result that it has not seen with its own eyes.
"""

# Candidate text prompts; the first ones whose token count is in range and whose
# greedy continuation is well separated are used.
TEXT_PROMPTS = [
    "The old engine",
    "A light rain",
    "The router",
    "She read it",
    "Every tool had its place",
    "The market opened early",
    "Children ran between the stalls",
    "The model is large but cheap",
    "The small engine hummed quietly as the light crept",
    "A router looks at the hidden state and scores the experts",
    "She opened the letter and read it twice, then walked",
    "In the village by the river, farmers carried baskets",
    "The mechanic said that a machine tells the truth when you listen",
    "Numbers can be written as words or digits, one two three",
]

# (name, kind, target length range incl. BOS or exact length for random ids)
CASE_PLAN = [
    ("len1_random", "random", (1, 1)),
    ("len5_text", "text", (4, 7)),
    ("len12_text", "text", (10, 15)),
    ("len30_random", "random", (30, 30)),
]

MODELS = [
    {
        "name": "tiny-gqa-top2",
        "seed": 1234,
        "config": dict(
            vocab_size=384,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            rms_norm_eps=1e-5,
            max_position_embeddings=256,
            sliding_window=None,
            tie_word_embeddings=False,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        ),
        "dtype": torch.float32,
        "max_shard_size": None,  # single model.safetensors
        "config_style": "4.x",
        "router_case": True,
    },
    {
        "name": "tiny-mha-top3",
        "seed": 5678,
        "config": dict(
            vocab_size=320,
            hidden_size=48,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            head_dim=16,
            num_local_experts=6,
            num_experts_per_tok=3,
            rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
            rms_norm_eps=1e-6,
            max_position_embeddings=256,
            sliding_window=None,
            tie_word_embeddings=False,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,
        ),
        "dtype": torch.bfloat16,
        "max_shard_size": "400KB",  # ~640 KB of bf16 weights -> 2 shards
        "config_style": "5.x",
        "router_case": False,
    },
]


# --------------------------------------------------------------------------- tokenizer


def build_tokenizer(vocab_size: int) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([line for line in CORPUS.splitlines() if line.strip()], trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A",
        pair="<s> $A <s> $B",
        special_tokens=[("<s>", BOS_ID)],
    )
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    assert tok.get_vocab_size() == vocab_size, (tok.get_vocab_size(), vocab_size)
    return tok


def save_tokenizer(tok: Tokenizer, out: Path) -> None:
    tok.save(str(out / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 256,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")


# --------------------------------------------------------------------------- model


def init_weights(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if name.endswith("norm.weight"):
                val = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("mlp.gate.weight"):  # router: wide spread -> varied routing
                val = 0.2 * torch.randn(p.shape, generator=g)
            elif name == "lm_head.weight":  # logits with std ~3-4 -> clear greedy margins
                val = 0.5 * torch.randn(p.shape, generator=g)
            elif name.endswith("embed_tokens.weight"):
                val = 0.5 * torch.randn(p.shape, generator=g)
            else:
                val = 0.15 * torch.randn(p.shape, generator=g)
            p.copy_(val.to(p.dtype))


def rewrite_config_4x(path: Path) -> None:
    """Rewrite a transformers-5.x config.json into the transformers-4.x style."""
    cfg = json.loads(path.read_text())
    rope = cfg.pop("rope_parameters")
    assert rope.get("rope_type", "default") == "default", rope
    cfg["rope_theta"] = float(rope["rope_theta"])
    cfg["torch_dtype"] = cfg.pop("dtype")
    if cfg.get("head_dim") is None:
        cfg.pop("head_dim", None)  # 4.x Mixtral hub configs carry no head_dim
    if cfg.get("pad_token_id") is None:
        cfg.pop("pad_token_id", None)
    cfg["transformers_version"] = "4.57.1"  # synthetic: mimics a 4.x-written config
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def load_f32(path: Path) -> MixtralForCausalLM:
    m = MixtralForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    m.eval()
    return m


# --------------------------------------------------------------------------- goldens


class RouterRecorder:
    """Forward hooks on every layer's router, recording (logits, weights, indices)."""

    def __init__(self, model: MixtralForCausalLM):
        self.records: list[list] = [[] for _ in model.model.layers]
        self.handles = []
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.mlp.gate.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def fn(_mod, _inp, out):
            logits, scores, idx = out
            self.records[i].append((logits.detach().clone(), scores.detach().clone(), idx.detach().clone()))

        return fn

    def clear(self):
        for r in self.records:
            r.clear()

    def remove(self):
        for h in self.handles:
            h.remove()


def router_gap(model: MixtralForCausalLM, rec: RouterRecorder) -> float:
    """Smallest gap between the k-th and (k+1)-th router logit seen (any layer/token).

    Logits rather than probabilities: a peaked softmax makes tiny probability gaps
    between experts that are still robustly ordered."""
    k = model.config.num_experts_per_tok
    gap = float("inf")
    for layer in rec.records:
        for logits, _, _ in layer:
            top = torch.topk(logits.float(), k + 1, dim=-1).values
            gap = min(gap, float((top[:, k - 1] - top[:, k]).min()))
    return gap


def margin(row: torch.Tensor) -> float:
    top2 = torch.topk(row, 2).values
    return float(top2[0] - top2[1])


@torch.no_grad()
def greedy_case(model: MixtralForCausalLM, prompt_ids: list[int]):
    rec = RouterRecorder(model)
    try:
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        out = model(input_ids=ids, use_cache=True)
        prefill = out.logits[0].float()
        cache = out.cache
        step_logits = [prefill[-1]]
        greedy = []
        for k in range(N_NEW_TOKENS):
            nxt = int(torch.argmax(step_logits[-1]))
            greedy.append(nxt)
            if k == N_NEW_TOKENS - 1:
                break
            out = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
            cache = out.cache
            step_logits.append(out.logits[0, -1].float())
        gap = router_gap(model, rec)
    finally:
        rec.remove()

    # Cross-check against no-cache full recompute.
    full = torch.tensor([prompt_ids + greedy], dtype=torch.long)
    ref = model(input_ids=full, use_cache=False).logits[0].float()
    n = len(prompt_ids)
    torch.testing.assert_close(ref[:n], prefill, rtol=1e-4, atol=1e-4)
    nc_margin = float("inf")
    for k in range(N_NEW_TOKENS):
        row = ref[n - 1 + k]
        torch.testing.assert_close(row, step_logits[k], rtol=1e-4, atol=1e-4)
        assert int(torch.argmax(row)) == greedy[k], "cache / no-cache greedy mismatch"
        nc_margin = min(nc_margin, margin(row))

    min_margin = min(min(margin(r) for r in step_logits), nc_margin)
    return {
        "prefill_logits": prefill,
        "greedy_ids": greedy,
        "step_logits": torch.stack(step_logits),
        "min_margin": min_margin,
        "router_gap": gap,
    }


def r7(x: float) -> float:
    return float(f"{x:.7g}")


def rows(t: torch.Tensor) -> list[list[float]]:
    return [[r7(v) for v in row] for row in t.tolist()]


def text_candidates():
    """Curated prompts first, then word spans taken from the corpus sentences."""
    seen = set()
    sentences = [s.strip() for s in " ".join(CORPUS.split()).replace(";", ".").split(".") if s.strip()]
    spans = []
    for sent in sentences:
        words = sent.split()
        for n in range(1, 13):
            for start in range(0, len(words) - n + 1):
                spans.append(" ".join(words[start : start + n]))
    for text in TEXT_PROMPTS + spans:
        if text not in seen:
            seen.add(text)
            yield text


def candidate_prompts(kind, length_range, tok, vocab_size, rng):
    lo, hi = length_range
    if kind == "text":
        for text in text_candidates():
            ids = tok.encode(text).ids
            assert ids[0] == BOS_ID
            if lo <= len(ids) <= hi:
                yield text, ids
    else:
        for _ in range(200):
            yield None, [rng.randrange(3, vocab_size) for _ in range(lo)]


def make_cases(model, tok, vocab_size, seed):
    rng = random.Random(seed)
    cases, used, log = [], set(), []
    for case_name, kind, length_range in CASE_PLAN:
        tried = 0
        for text, ids in candidate_prompts(kind, length_range, tok, vocab_size, rng):
            if tuple(ids) in used:
                continue
            tried += 1
            res = greedy_case(model, ids)
            if res["min_margin"] < MIN_MARGIN or res["router_gap"] < MIN_ROUTER_GAP:
                continue
            if any(t in (UNK_ID, BOS_ID, EOS_ID) for t in res["greedy_ids"]):
                continue
            used.add(tuple(ids))
            cases.append(
                {
                    "name": case_name,
                    "prompt": text,
                    "prompt_ids": ids,
                    "prefill_logits": rows(res["prefill_logits"]),
                    "greedy_ids": res["greedy_ids"],
                    "step_logits": rows(res["step_logits"]),
                    "min_margin": r7(res["min_margin"]),
                    "min_router_gap": r7(res["router_gap"]),
                }
            )
            log.append(
                f"  {case_name:13s} len={len(ids):2d} tried={tried:2d} "
                f"margin={res['min_margin']:.4f} router_gap={res['router_gap']:.4f} greedy={res['greedy_ids']}"
            )
            break
        else:
            raise SystemExit(f"no qualifying prompt for case {case_name}")
    return cases, log


@torch.no_grad()
def router_case(model, prompt_ids):
    """Layer-0 top-k experts / renormalised weights, via a hook on the gate,
    cross-checked against output_router_logits + softmax/topk/renormalise."""
    rec = RouterRecorder(model)
    try:
        out = model(input_ids=torch.tensor([prompt_ids]), use_cache=False, output_router_logits=True)
    finally:
        rec.remove()
    logits0, scores0, idx0 = rec.records[0][0]
    k = model.config.num_experts_per_tok
    probs = torch.softmax(out.router_logits[0].float(), dim=-1)
    w, e = torch.topk(probs, k, dim=-1)
    w = w / w.sum(dim=-1, keepdim=True)
    assert torch.equal(e, idx0), "router hook / recompute mismatch (indices)"
    torch.testing.assert_close(w, scores0)
    torch.testing.assert_close(out.router_logits[0], logits0)
    return {
        "prompt_ids": prompt_ids,
        "layer0_topk_experts": idx0.tolist(),
        "layer0_topk_weights": rows(scores0),
        "layer0_router_logits": rows(logits0),
    }


def check_disk_layout(m: MixtralForCausalLM, out: Path) -> None:
    """On-disk hub layout (per-expert w1/w2/w3, block_sparse_moe.gate) must map onto
    transformers' fused in-memory experts as gate_up_proj[e] = cat(w1, w3), down_proj[e] = w2."""
    disk = {}
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for key in h.keys():
                disk[key] = h.get_tensor(key).float()
    n_inter = m.config.intermediate_size
    for i, layer in enumerate(m.model.layers):
        pre = f"model.layers.{i}.block_sparse_moe."
        assert torch.equal(disk[pre + "gate.weight"], layer.mlp.gate.weight)
        for e in range(m.config.num_local_experts):
            gu = layer.mlp.experts.gate_up_proj[e]
            assert torch.equal(disk[f"{pre}experts.{e}.w1.weight"], gu[:n_inter])
            assert torch.equal(disk[f"{pre}experts.{e}.w3.weight"], gu[n_inter:])
            assert torch.equal(disk[f"{pre}experts.{e}.w2.weight"], layer.mlp.experts.down_proj[e])


def check_auto_tokenizer(out: Path, cases) -> None:
    """transformers' AutoTokenizer must agree with the raw tokenizer (BOS prepended)."""
    from transformers import AutoTokenizer

    at = AutoTokenizer.from_pretrained(out)
    assert at.bos_token_id == BOS_ID and at.eos_token_id == EOS_ID and at.unk_token_id == UNK_ID
    for c in cases:
        if c["prompt"] is not None:
            assert at(c["prompt"])["input_ids"] == c["prompt_ids"], c["prompt"]


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file())


def build_model(spec) -> None:
    name = spec["name"]
    out = GOLDEN_DIR / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vocab = spec["config"]["vocab_size"]

    # Tokenizer (vocab == model vocab, so every id is a real token).
    tok = build_tokenizer(vocab)
    save_tokenizer(tok, out)

    # Model.
    torch.manual_seed(spec["seed"])
    cfg = MixtralConfig(**spec["config"])
    model = MixtralForCausalLM(cfg)
    init_weights(model, spec["seed"])
    model = model.to(spec["dtype"]).eval()
    kw = {"max_shard_size": spec["max_shard_size"]} if spec["max_shard_size"] else {}
    model.save_pretrained(out, safe_serialization=True, **kw)
    (out / "generation_config.json").unlink(missing_ok=True)  # not needed by the engine

    # Reference logits from the in-memory model (upcast), before any config rewrite.
    probe = torch.tensor([[BOS_ID, 5, 17, 200, 42, 7, 99]])
    with torch.no_grad():
        ref_model = MixtralForCausalLM(cfg).eval()
        ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
        ref_model.config._attn_implementation = "eager"
        ref_logits = ref_model(probe).logits

    if spec["config_style"] == "4.x":
        rewrite_config_4x(out / "config.json")

    # Load back in f32 exactly like the goldens will be produced.
    m = load_f32(out)
    with torch.no_grad():
        got = m(probe).logits
    torch.testing.assert_close(got, ref_logits, rtol=0, atol=0)
    assert m.config.rope_parameters["rope_theta"] == spec["config"]["rope_parameters"]["rope_theta"]

    check_disk_layout(m, out)

    cases, log = make_cases(m, tok, vocab, spec["seed"])
    check_auto_tokenizer(out, cases)
    expected = {
        "model": name,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "n_new_tokens": N_NEW_TOKENS,
        "notes": "prompt_ids include BOS=1 for text prompts (tokenizer post-processor adds it); "
        "logits computed in float32 (bf16 weights upcast), eager attention, greedy with KV cache, "
        "cross-checked against no-cache recompute.",
        "cases": cases,
    }
    if spec["router_case"]:
        text_case = next(c for c in cases if c["name"] == "len12_text")
        expected["router_case"] = router_case(m, text_case["prompt_ids"])
    (out / "expected.json").write_text(json.dumps(expected, separators=(",", ":")) + "\n")

    # Summary.
    files = sorted(p.name for p in out.iterdir())
    total = folder_size(out)
    print(f"{name}: {total / 1024:.0f} KiB  files={files}")
    for line in log:
        print(line)
    if spec["router_case"]:
        rc = expected["router_case"]
        print(f"  router_case   len={len(rc['prompt_ids'])} layer0 experts={rc['layer0_topk_experts']}")
    st = sorted(out.glob("*.safetensors"))
    layouts = set()
    for f in st:
        with safe_open(str(f), "pt") as h:
            for key in h.keys():
                if ".experts." in key:
                    layouts.add("per-expert w1/w2/w3" if ".w1." in key or ".w2." in key or ".w3." in key else "fused")
    print(f"  shards={len(st)} expert layout on disk: {sorted(layouts)}")
    assert total < MAX_FOLDER_BYTES, f"{name} folder too large: {total} bytes"


def main() -> int:
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"output: {GOLDEN_DIR.relative_to(REPO_ROOT)}")
    GOLDEN_DIR.mkdir(parents=True, exist_ok=True)
    for spec in MODELS:
        build_model(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())
