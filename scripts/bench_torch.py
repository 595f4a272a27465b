"""PyTorch eager (transformers) side of `moe-worker bench`: the same measurements as the
Rust engine's `bench-engine`, on the same checkpoint, printed as one JSON object."""

import argparse
import json
import resource
import time

import torch
from transformers import AutoModelForCausalLM


# The families beyond Mixtral at the shape of the `mini` preset (hidden 512, GQA 8/2 heads,
# top-2 of 8 experts 1408 wide, vocab 32000; OLMoE top-8 of 64 experts 352 wide: the same
# active expert width), 4 layers, so that their rows compare with `mini`'s.
FAMILY_SHAPES = {
    "qwen2_moe": dict(intermediate_size=2816, moe_intermediate_size=1408,
                      shared_expert_intermediate_size=1408, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=False),
    "qwen3_moe": dict(intermediate_size=2816, moe_intermediate_size=1408, num_experts=8,
                      num_experts_per_tok=2, norm_topk_prob=True, head_dim=64),
    "olmoe": dict(intermediate_size=352, num_experts=64, num_experts_per_tok=8),
    "deepseek_v2": dict(intermediate_size=2816, moe_intermediate_size=1408, n_routed_experts=8,
                        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                        q_lora_rank=None, kv_lora_rank=256, qk_nope_head_dim=64,
                        qk_rope_head_dim=32, v_head_dim=64, num_key_value_heads=8,
                        topk_method="greedy"),
    "deepseek_v3": dict(intermediate_size=2816, moe_intermediate_size=1408, n_routed_experts=8,
                        n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                        n_group=2, topk_group=1, q_lora_rank=384, kv_lora_rank=256,
                        qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                        num_key_value_heads=8),
    "gpt_oss": dict(intermediate_size=1408, num_local_experts=8, num_experts_per_tok=2,
                    head_dim=64, sliding_window=128),
    "glm4_moe": dict(intermediate_size=2816, moe_intermediate_size=1408, n_routed_experts=8,
                     n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=1,
                     n_group=1, topk_group=1, head_dim=64, attention_bias=True),
}


def make_family(family, out):
    """Writes a random-weight checkpoint of `family` at the mini shape (f32)."""
    from transformers import AutoConfig

    shape = {"num_key_value_heads": 2, **FAMILY_SHAPES[family]}
    cfg = AutoConfig.for_model(
        family, vocab_size=32000, hidden_size=512, num_hidden_layers=4, num_attention_heads=8,
        max_position_embeddings=4096, tie_word_embeddings=False, bos_token_id=1,
        eos_token_id=2, **shape)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.05)
    model.save_pretrained(out, safe_serialization=True, max_shard_size="2GB")
    print(json.dumps({"family": family, "out": out}))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--make-family")
    ap.add_argument("--out")
    ap.add_argument("--model")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    if a.make_family:
        make_family(a.make_family, a.out)
        return
    torch.manual_seed(0)
    t0 = time.perf_counter()
    dtype = getattr(torch, a.dtype)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=dtype, attn_implementation="eager")
    model.eval()
    load_s = time.perf_counter() - t0
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(1234)

    def ids(batch, length):
        return torch.randint(3, vocab, (batch, length), generator=g)

    with torch.inference_mode():
        # Prefill: logits for the last position only, as a server computes them.
        best = float("inf")
        for _ in range(a.repeats):
            x = ids(1, a.prefill_tokens)
            t = time.perf_counter()
            model(input_ids=x, use_cache=True, logits_to_keep=1)
            best = min(best, time.perf_counter() - t)
        prefill = a.prefill_tokens / best

        def decode(batch):
            best = float("inf")
            for _ in range(max(1, a.repeats - 1)):
                x = ids(batch, 16)
                out = model(input_ids=x, use_cache=True, logits_to_keep=1)
                cache = out.past_key_values
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                t = time.perf_counter()
                for _ in range(a.decode_tokens):
                    out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
                    cache = out.past_key_values
                    nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                best = min(best, time.perf_counter() - t)
            return batch * a.decode_tokens / best

        d1 = decode(1)
        d8 = decode(a.batch)

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({
        "engine": f"pytorch {torch.__version__} eager, transformers, {a.dtype}",
        "load_s": load_s,
        "prefill_tok_s": prefill,
        "decode_b1_tok_s": d1,
        "decode_batch_tok_s": d8,
        "peak_rss_bytes": peak,
    }))


if __name__ == "__main__":
    main()
