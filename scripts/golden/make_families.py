#!/usr/bin/env python3
"""Golden fixtures for the MoE families beyond Mixtral.

One tiny random-weight checkpoint per family (Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2,
DeepSeek-V3, gpt-oss, GLM-4.5 MoE), written by transformers' own save_pretrained, with
reference logits and greedy continuations in engine/tests/golden/<name>/expected.json (the
format of make_golden.py, so the engine's golden tests read every folder alike).

Configs are chosen so that each family's distinguishing parts are exercised: dense layers,
shared experts (gated and not), QK-norm per head and over the whole projection, clipped
q/k/v, latent attention with and without a q LoRA, interleaved and partial rotary, YaRN,
sigmoid routers with a correction bias and group-limited top-k, routed scaling, biases,
attention sinks, alternating sliding windows and a clamped SwiGLU. Prompts are kept only
where the greedy margins and every router's selection gap are wide enough that f32
rounding cannot flip them.

    ~/.cache/moe-serve/venv-hf/bin/python scripts/golden/make_families.py [name ...]
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import make_golden as mg  # noqa: E402  (sets the offline environment first)
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import transformers  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402

BOS, EOS = mg.BOS_ID, mg.EOS_ID
# Sigmoid scores move ~4x less than logits: the same rounding safety on a smaller scale.
MIN_SIGMOID_GAP = 2.5e-4

FAMILIES = [
    {
        "name": "qwen2-moe",
        "model_type": "qwen2_moe",
        "seed": 2101,
        "dtype": torch.float32,
        "max_shard_size": None,
        "config_style": "4.x",
        "config": dict(
            vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            shared_expert_intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, num_experts=6, num_experts_per_tok=2, norm_topk_prob=False,
            decoder_sparse_step=1, mlp_only_layers=[1], qkv_bias=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    },
    {
        "name": "qwen3-moe",
        "model_type": "qwen3_moe",
        "seed": 3101,
        "dtype": torch.bfloat16,
        "max_shard_size": "200KB",
        "config_style": "5.x",
        "config": dict(
            vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=24,
            num_experts=8, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
        ),
    },
    {
        "name": "olmoe",
        "model_type": "olmoe",
        "seed": 4101,
        "dtype": torch.float32,
        "max_shard_size": "300KB",
        "config_style": "5.x",
        "config": dict(
            vocab_size=320, hidden_size=32, intermediate_size=16, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=4, num_experts=64, num_experts_per_tok=8,
            norm_topk_prob=False, clip_qkv=1.5,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    },
    {
        "name": "deepseek-v2",
        "model_type": "deepseek_v2",
        "seed": 5101,
        "dtype": torch.float32,
        "max_shard_size": None,
        "config_style": "5.x",
        "config": dict(
            vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
            first_k_dense_replace=1, topk_method="group_limited_greedy", n_group=4, topk_group=2,
            routed_scaling_factor=1.5, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    },
    {
        "name": "deepseek-v3",
        "model_type": "deepseek_v3",
        "seed": 6101,
        "dtype": torch.bfloat16,
        "max_shard_size": "200KB",
        "config_style": "4.x",
        "config": dict(
            vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
            n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
            first_k_dense_replace=1, n_group=4, topk_group=2, norm_topk_prob=True,
            routed_scaling_factor=2.5, q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16,
            qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=256,
            rope_parameters={
                "rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                "original_max_position_embeddings": 64, "beta_fast": 32.0, "beta_slow": 1.0,
                "mscale": 1.0, "mscale_all_dim": 1.0,
            },
        ),
    },
    {
        "name": "gpt-oss",
        "model_type": "gpt_oss",
        "seed": 7101,
        "dtype": torch.bfloat16,
        "max_shard_size": "200KB",
        "config_style": "5.x",
        "config": dict(
            vocab_size=320, hidden_size=64, intermediate_size=32, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=8,
            num_experts_per_tok=2, sliding_window=4, swiglu_limit=1.0,
            max_position_embeddings=256,
            rope_parameters={
                "rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                "original_max_position_embeddings": 64,
            },
        ),
    },
    {
        "name": "glm4-moe",
        "model_type": "glm4_moe",
        "seed": 8101,
        "dtype": torch.float32,
        "max_shard_size": None,
        "config_style": "4.x",
        "config": dict(
            vocab_size=320, hidden_size=64, intermediate_size=96, moe_intermediate_size=24,
            num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
            first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True,
            routed_scaling_factor=1.5, attention_bias=True, use_qk_norm=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.5},
        ),
    },
]

COMMON = dict(
    rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=BOS, eos_token_id=EOS,
    pad_token_id=None,
)


def init_weights(model: torch.nn.Module, seed: int) -> None:
    """Random weights (and router correction biases) wide enough for varied routing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        named = list(model.named_parameters()) + [
            (n, b) for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")
        ]
        for name, p in sorted(named, key=lambda kv: kv[0]):
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                val = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            elif name.endswith("e_score_correction_bias"):
                val = 0.05 * torch.randn(p.shape, generator=g)
            elif name.endswith("mlp.gate.weight") or name.endswith("mlp.router.weight"):
                val = 0.2 * torch.randn(p.shape, generator=g)
            elif name.endswith("sinks"):
                val = 0.5 * torch.randn(p.shape, generator=g)
            elif name.endswith("bias"):
                val = 0.05 * torch.randn(p.shape, generator=g)
            elif name == "lm_head.weight" or name.endswith("embed_tokens.weight"):
                val = 0.5 * torch.randn(p.shape, generator=g)
            else:
                val = 0.15 * torch.randn(p.shape, generator=g)
            p.copy_(val.to(p.dtype))


def rewrite_config_4x(path: Path) -> None:
    """transformers-4.x style, as most Hub checkpoints of these families are written:
    rope_theta (+ rope_scaling, partial_rotary_factor) at the top level, torch_dtype."""
    cfg = json.loads(path.read_text())
    rope = dict(cfg.pop("rope_parameters"))
    cfg["rope_theta"] = float(rope.pop("rope_theta"))
    if "partial_rotary_factor" in rope:
        cfg["partial_rotary_factor"] = rope.pop("partial_rotary_factor")
    kind = rope.pop("rope_type", "default")
    if kind != "default":
        cfg["rope_scaling"] = {"type": kind, **rope}
    cfg["torch_dtype"] = cfg.pop("dtype")
    cfg["transformers_version"] = "4.57.1"
    path.write_text(json.dumps(dict(sorted(cfg.items())), indent=2) + "\n")


def routers(model):
    """(layer index, router module) of every MoE layer."""
    out = []
    for i, layer in enumerate(model.model.layers):
        mlp = layer.mlp
        r = getattr(mlp, "router", None) or getattr(mlp, "gate", None)
        if r is not None and hasattr(r, "weight") and r.weight.dim() == 2 and r.weight.shape[0] > 1:
            out.append((i, r))
    return out


def selection_gap(cfg, router, x: torch.Tensor) -> float:
    """Smallest margin of any routing decision for the rows of x, on the family's own
    selection scale (logits for softmax routers, biased sigmoid scores otherwise)."""
    k = cfg.num_experts_per_tok
    x = x.reshape(-1, x.shape[-1]).double()
    logits = F.linear(x, router.weight.double(), None if getattr(router, "bias", None) is None else router.bias.double())
    mt = cfg.model_type
    if mt in ("deepseek_v3", "glm4_moe"):
        choice = logits.sigmoid() + router.e_score_correction_bias.double()
        group_of = lambda t: t.view(t.shape[0], cfg.n_group, -1).topk(2, dim=-1).values.sum(-1)  # noqa: E731
        groups, topk_groups, scale = cfg.n_group, cfg.topk_group, 4.0
    elif mt == "deepseek_v2" and cfg.topk_method == "group_limited_greedy":
        choice = logits  # softmax is monotone: the gap on logits is what rounding must beat
        group_of = lambda t: t.view(t.shape[0], cfg.n_group, -1).max(dim=-1).values  # noqa: E731
        groups, topk_groups, scale = cfg.n_group, cfg.topk_group, 1.0
    else:
        choice, groups, topk_groups, scale = logits, 1, 1, 1.0
    gap = float("inf")
    if groups > 1:
        gs = group_of(choice)
        top = gs.topk(topk_groups + 1, dim=-1).values
        gap = min(gap, float((top[:, topk_groups - 1] - top[:, topk_groups]).min()) * scale)
        kept = gs.topk(topk_groups, dim=-1).indices
        mask = torch.zeros_like(gs, dtype=torch.bool).scatter_(1, kept, True)
        mask = mask.repeat_interleave(choice.shape[1] // groups, dim=1)
        choice = choice.masked_fill(~mask, float("-inf"))
    top = choice.topk(k + 1, dim=-1).values
    nxt = top[:, k]
    margin = top[:, k - 1] - torch.where(torch.isinf(nxt), torch.full_like(nxt, -1e9), nxt)
    return min(gap, float(margin.min()) * scale)


@torch.no_grad()
def greedy_case(model, prompt_ids):
    cfg = model.config
    inputs: dict[int, list] = {}
    handles = []
    for i, r in routers(model):
        handles.append(r.register_forward_pre_hook(lambda _m, args, i=i: inputs.setdefault(i, []).append(args[0].detach().clone())))
    try:
        ids = torch.tensor([prompt_ids], dtype=torch.long)
        out = model(input_ids=ids, use_cache=True)
        prefill = out.logits[0].float()
        cache = out.cache
        step_logits = [prefill[-1]]
        greedy = []
        for k in range(mg.N_NEW_TOKENS):
            nxt = int(torch.argmax(step_logits[-1]))
            greedy.append(nxt)
            if k == mg.N_NEW_TOKENS - 1:
                break
            out = model(input_ids=torch.tensor([[nxt]]), cache=cache, use_cache=True)
            cache = out.cache
            step_logits.append(out.logits[0, -1].float())
    finally:
        for h in handles:
            h.remove()
    gap = float("inf")
    for i, r in routers(model):
        for x in inputs.get(i, []):
            gap = min(gap, selection_gap(cfg, r, x))

    full = torch.tensor([prompt_ids + greedy], dtype=torch.long)
    ref = model(input_ids=full, use_cache=False).logits[0].float()
    n = len(prompt_ids)
    torch.testing.assert_close(ref[:n], prefill, rtol=1e-4, atol=1e-4)
    nc_margin = float("inf")
    for k in range(mg.N_NEW_TOKENS):
        row = ref[n - 1 + k]
        torch.testing.assert_close(row, step_logits[k], rtol=1e-4, atol=1e-4)
        assert int(torch.argmax(row)) == greedy[k], "cache / no-cache greedy mismatch"
        nc_margin = min(nc_margin, mg.margin(row))
    return {
        "prefill_logits": prefill,
        "greedy_ids": greedy,
        "step_logits": torch.stack(step_logits),
        "min_margin": min(min(mg.margin(r) for r in step_logits), nc_margin),
        "router_gap": gap,
    }


def make_cases(model, tok, vocab_size, seed, min_gap):
    import random

    rng = random.Random(seed)
    cases, used, log = [], set(), []
    for case_name, kind, length_range in mg.CASE_PLAN:
        tried = 0
        for text, ids in mg.candidate_prompts(kind, length_range, tok, vocab_size, rng):
            if tuple(ids) in used:
                continue
            tried += 1
            res = greedy_case(model, ids)
            if res["min_margin"] < mg.MIN_MARGIN or res["router_gap"] < min_gap:
                continue
            if any(t in (mg.UNK_ID, BOS, EOS) for t in res["greedy_ids"]):
                continue
            used.add(tuple(ids))
            cases.append({
                "name": case_name,
                "prompt": text,
                "prompt_ids": ids,
                "prefill_logits": mg.rows(res["prefill_logits"]),
                "greedy_ids": res["greedy_ids"],
                "step_logits": mg.rows(res["step_logits"]),
                "min_margin": mg.r7(res["min_margin"]),
                "min_router_gap": mg.r7(res["router_gap"]),
            })
            log.append(f"  {case_name:13s} len={len(ids):2d} tried={tried:3d} margin={res['min_margin']:.4f} "
                       f"router_gap={res['router_gap']:.5f} greedy={res['greedy_ids']}")
            break
        else:
            raise SystemExit(f"no qualifying prompt for case {case_name}")
    return cases, log


def build(spec) -> None:
    name = spec["name"]
    out = mg.GOLDEN_DIR / name
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vocab = spec["config"]["vocab_size"]
    tok = mg.build_tokenizer(vocab)
    mg.save_tokenizer(tok, out)

    torch.manual_seed(spec["seed"])
    cfg = AutoConfig.for_model(spec["model_type"], **{**COMMON, **spec["config"]})
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    init_weights(model, spec["seed"])
    model = model.to(spec["dtype"]).eval()
    kw = {"max_shard_size": spec["max_shard_size"]} if spec["max_shard_size"] else {}
    model.save_pretrained(out, safe_serialization=True, **kw)
    (out / "generation_config.json").unlink(missing_ok=True)

    probe = torch.tensor([[BOS, 5, 17, 200, 42, 7, 99]])
    with torch.no_grad():
        ref_model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
        ref_model.load_state_dict({k: v.float() for k, v in model.state_dict().items()}, strict=False)
        for n, b in model.named_buffers():
            if n.endswith("e_score_correction_bias"):
                ref_model.get_buffer(n).copy_(b.float())
        ref_model.config._attn_implementation = "eager"
        ref_logits = ref_model(probe).logits

    if spec["config_style"] == "4.x":
        rewrite_config_4x(out / "config.json")

    m = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        got = m(probe).logits
    torch.testing.assert_close(got, ref_logits, rtol=0, atol=0)

    min_gap = MIN_SIGMOID_GAP if spec["model_type"] in ("deepseek_v3", "glm4_moe") else mg.MIN_ROUTER_GAP
    cases, log = make_cases(m, tok, vocab, spec["seed"], min_gap)
    mg.check_auto_tokenizer(out, cases)
    expected = {
        "model": name,
        "model_type": spec["model_type"],
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "n_new_tokens": mg.N_NEW_TOKENS,
        "notes": "prompt_ids include BOS=1 for text prompts; logits in float32 (bf16 weights "
        "upcast), eager attention, greedy with the cache, cross-checked against no-cache "
        "recompute; min_router_gap is the smallest routing margin on the family's selection scale.",
        "cases": cases,
    }
    (out / "expected.json").write_text(json.dumps(expected, separators=(",", ":")) + "\n")

    for f in out.iterdir():  # safetensors writes 0600; pods run as another user
        f.chmod(0o644)
    total = mg.folder_size(out)
    keys = []
    for f in sorted(out.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            keys += list(h.keys())
    experts = sorted({k.split("layers.")[1].split(".", 1)[1] for k in keys if ".experts." in k})[:3]
    print(f"{name}: {total / 1024:.0f} KiB, {len(keys)} tensors, expert tensors e.g. {experts}")
    for line in log:
        print(line)
    assert total < mg.MAX_FOLDER_BYTES, f"{name} folder too large: {total} bytes"


def main(argv) -> int:
    print(f"torch {torch.__version__}, transformers {transformers.__version__}")
    wanted = set(argv[1:])
    for spec in FAMILIES:
        if not wanted or spec["name"] in wanted:
            build(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
