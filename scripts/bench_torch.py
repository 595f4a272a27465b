"""PyTorch eager (transformers) side of `moe-worker bench`: the same measurements as the
Rust engine's `bench-engine`, on the same checkpoint, printed as one JSON object."""

import argparse
import json
import resource
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--prefill-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    a = ap.parse_args()

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32, attn_implementation="eager")
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
        "engine": f"pytorch {torch.__version__} eager, transformers",
        "load_s": load_s,
        "prefill_tok_s": prefill,
        "decode_b1_tok_s": d1,
        "decode_batch_tok_s": d8,
        "peak_rss_bytes": peak,
    }))


if __name__ == "__main__":
    main()
