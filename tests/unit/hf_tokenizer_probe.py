"""Load exported tokenizer directories with ``AutoTokenizer`` and print what they give, as JSON.

Standalone (transformers and its tokenizer dependencies only, no megatron_navil, no torch): run
by tests/unit/test_export_tokenizer.py in this project's environment and in a separate
virtualenv with transformers 4.51 (the released NaViL code's pin).

    python hf_tokenizer_probe.py SPEC.json    # prints {"transformers": ..., "results": ...}

SPEC: ``{"dirs": [...], "tokens": [...], "texts": [...], "decode": [...], "messages": [...]}``.
Per directory and ``use_fast`` (true, false): the loaded class, ``is_fast``, the ids of
``tokens`` (``convert_tokens_to_ids``), of each text with ``add_special_tokens`` False
(``plain``) and True (``full``), the chat template, the generation prompt of ``messages``
(``apply_chat_template``, not tokenized), and ``decode`` of the plain ids of each ``decode``
text; or ``{"error": ...}`` when loading fails.
"""

from __future__ import annotations

import json
import sys


def probe(path: str, use_fast: bool, spec: dict) -> dict:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=True, use_fast=use_fast)
    except Exception as exc:  # reported, compared by the test
        return {"error": f"{type(exc).__name__}: {exc}".splitlines()[0]}
    plain = [tok(t, add_special_tokens=False)["input_ids"] for t in spec["texts"]]
    full = [tok(t)["input_ids"] for t in spec["texts"]]
    decoded = []
    for t in spec["decode"]:
        ids = tok(t, add_special_tokens=False)["input_ids"]
        decoded.append(tok.decode(ids, skip_special_tokens=False))
    prompt = tok.apply_chat_template(spec["messages"], tokenize=False, add_generation_prompt=True)
    return {
        "class": type(tok).__name__,
        "is_fast": bool(tok.is_fast),
        "tokens": [tok.convert_tokens_to_ids(t) for t in spec["tokens"]],
        "plain": plain,
        "full": full,
        "chat_template": tok.chat_template,
        "prompt": prompt,
        "decoded": decoded,
    }


def main() -> int:
    import transformers

    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    results = {
        d: {("fast" if flag else "slow"): probe(d, flag, spec) for flag in (True, False)}
        for d in spec["dirs"]
    }
    print(json.dumps({"transformers": transformers.__version__, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
