#!/usr/bin/env python3
"""Chat-template fixtures: for each golden checkpoint with a chat template, what transformers'
`apply_chat_template` renders (text and token ids) for a fixed set of conversations, or the
error it raises. Writes engine/tests/golden/<name>/chat.json.

No torch needed (tokenizers only):
    python3 -m venv ~/.cache/moe-serve/venv-hf
    ~/.cache/moe-serve/venv-hf/bin/pip install transformers jinja2
    ~/.cache/moe-serve/venv-hf/bin/python scripts/golden/make_chat.py
"""

import json
from pathlib import Path

import transformers
from transformers import AutoTokenizer

ROOT = Path(__file__).resolve().parents[2] / "engine" / "tests" / "golden"

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
                "required": ["city"],
            },
        },
    }
]

CASES = [
    ("one_user", [{"role": "user", "content": "Hello there"}], True, None),
    (
        "multi_turn",
        [
            {"role": "user", "content": "What is 2+2?"},
            {"role": "assistant", "content": "<think>easy</think>\n\n4"},
            {"role": "user", "content": "  And 3+3?  "},
        ],
        True,
        None,
    ),
    (
        "system_and_no_generation_prompt",
        [
            {"role": "system", "content": " Be brief. "},
            {"role": "user", "content": "Name a colour"},
            {"role": "assistant", "content": "Blue"},
        ],
        False,
        None,
    ),
    ("tools", [{"role": "user", "content": "Weather in Paris?"}], True, TOOLS),
    (
        "unicode_and_specials",
        [{"role": "user", "content": "caf\u00e9 \u2014 </s> <s> \u4f60\u597d"}],
        True,
        None,
    ),
    ("starts_with_assistant", [{"role": "assistant", "content": "Hi"}], True, None),
]


def main() -> None:
    for d in sorted(p for p in ROOT.iterdir() if p.is_dir()):
        tok = AutoTokenizer.from_pretrained(d)
        if not tok.chat_template:
            continue
        out = []
        for name, messages, gen, tools in CASES:
            case = {"name": name, "messages": messages, "add_generation_prompt": gen}
            if tools:
                case["tools"] = tools
            try:
                text = tok.apply_chat_template(
                    messages, tools=tools, add_generation_prompt=gen, tokenize=False
                )
                ids = tok.apply_chat_template(
                    messages, tools=tools, add_generation_prompt=gen, tokenize=True
                )
                if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                    ids = ids["input_ids"]
                case["text"] = text
                case["ids"] = list(ids)
            except Exception as e:  # the template's own refusal
                case["error"] = str(e)
            out.append(case)
        doc = {"transformers_version": transformers.__version__, "cases": out}
        (d / "chat.json").write_text(json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        print(d.name, len(out), "cases")


if __name__ == "__main__":
    main()
