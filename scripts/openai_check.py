"""Checks the gateway with the official `openai` Python client.

Usage: openai_check.py BASE_URL EXPECTED_JSON
EXPECTED_JSON: {"model": ..., "prompt": ..., "prompt_ids": [...], "greedy_ids": [...]} where
greedy_ids are single-process `moe-worker generate` tokens for prompt_ids (8 tokens, EOS ignored).
Exits non-zero with a message on the first mismatch.
"""

import json
import sys

import openai
from openai import OpenAI


def extra(obj, name):
    """An extension field the client keeps as an extra attribute."""
    return (obj.model_extra or {}).get(name)


def main():
    base, expected = sys.argv[1], json.loads(sys.argv[2])
    client = OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0, timeout=120)
    model = expected["model"]
    want = expected["greedy_ids"]
    n = len(want)

    models = client.models.list()
    assert [m.id for m in models.data] == [model], models

    # Token-id prompt, greedy: the same tokens as single-process generate.
    r = client.completions.create(model=model, prompt=expected["prompt_ids"], max_tokens=n,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert extra(r.choices[0], "token_ids") == want, (extra(r.choices[0], "token_ids"), want)
    assert r.usage.prompt_tokens == len(expected["prompt_ids"]), r.usage
    assert r.usage.completion_tokens == n and r.usage.total_tokens == len(expected["prompt_ids"]) + n
    assert r.choices[0].finish_reason == "length"
    text = r.choices[0].text

    # A string prompt that tokenizes to the same ids.
    r = client.completions.create(model=model, prompt=expected["prompt"], max_tokens=n,
                                  temperature=0, extra_body={"ignore_eos": True})
    assert extra(r.choices[0], "token_ids") == want
    assert r.choices[0].text == text

    # Streaming gives the same text, token by token, and usage at the end when asked.
    pieces, ids, usage, finish = [], [], None, None
    for chunk in client.completions.create(model=model, prompt=expected["prompt_ids"], max_tokens=n,
                                           temperature=0, stream=True,
                                           stream_options={"include_usage": True},
                                           extra_body={"ignore_eos": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            pieces.append(c.text)
            ids.extend(extra(c, "token_ids") or [])
            finish = c.finish_reason or finish
    assert "".join(pieces) == text, (pieces, text)
    assert ids == want and finish == "length"
    assert usage is not None and usage.completion_tokens == n, usage

    # Chat, plain and streamed, agree with each other.
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"}]
    c = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                       seed=7)
    assert c.choices[0].message.role == "assistant"
    assert c.usage.completion_tokens == len(extra(c.choices[0], "token_ids"))
    streamed, role, usage = [], None, None
    for chunk in client.chat.completions.create(model=model, messages=messages, max_tokens=6,
                                                temperature=0, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            role = ch.delta.role or role
            streamed.append(ch.delta.content or "")
    assert role == "assistant"
    assert "".join(streamed) == c.choices[0].message.content
    assert usage.completion_tokens == c.usage.completion_tokens

    # Sampling with a seed is reproducible.
    a = client.completions.create(model=model, prompt="x", max_tokens=8, temperature=0.9, top_p=0.9,
                                  seed=42, extra_body={"ignore_eos": True})
    b = client.completions.create(model=model, prompt="x", max_tokens=8, temperature=0.9, top_p=0.9,
                                  seed=42, extra_body={"ignore_eos": True})
    assert extra(a.choices[0], "token_ids") == extra(b.choices[0], "token_ids")

    # Bad input: the client raises BadRequestError with the field named.
    try:
        client.completions.create(model=model, prompt="x", max_tokens=8, temperature=-1)
        raise AssertionError("temperature=-1 was accepted")
    except openai.BadRequestError as e:
        assert e.status_code == 400 and "temperature" in str(e), e
    try:
        client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
        raise AssertionError("unknown model was accepted")
    except openai.NotFoundError as e:
        assert e.status_code == 404

    print("openai client: ok")


if __name__ == "__main__":
    main()
