#!/usr/bin/env python
"""Write a tiny random Hugging Face causal LM with its own tokenizer: a stand-in for a user's
LLM directory (examples/finetune_from_hf_llm.sh imports it when no HF_LLM is given).

Example::

    python tools/make_tiny_hf_llm.py --output runs/finetune/llm --arch qwen3 \\
        --texts runs/finetune/data/train.jsonl
    python tools/convert_from_hf.py llm --hf runs/finetune/llm --config tiny \\
        --tokenizer runs/finetune/llm/tokenizer.json --output runs/finetune/init

Writes OUT/config.json, OUT/model.safetensors (transformers' save_pretrained of a
Qwen3ForCausalLM or LlamaForCausalLM, randomly initialised) and OUT/tokenizer.json +
tokenizer_config.json: a byte-level BPE of exactly --vocab-size ids (the LLM's vocab_size),
with the family's own added tokens and none of NaViL's, so the import has to pad the
vocabulary for them. Merges are learnt from the --texts first. Details:
megatron_navil/testing/tiny_hf_llm.py. Exit status 2 on bad arguments.
"""

from __future__ import annotations

import os
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from megatron_navil.cli import OneLineParser, int_at_least, positive_int
from megatron_navil.testing.tiny_hf_llm import ARCHS, jsonl_texts, write_tiny_llm


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="make_tiny_hf_llm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument("--arch", choices=ARCHS, default="qwen3", help="model family (qwen3)")
    p.add_argument(
        "--vocab-size",
        type=int_at_least(300),
        default=1000,
        help="tokenizer ids = the LLM's vocab_size (1000)",
    )
    p.add_argument(
        "--texts",
        action="append",
        default=[],
        metavar="JSONL",
        help="an InternVL-style JSONL whose texts the BPE learns first (repeatable)",
    )
    p.add_argument("--hidden", type=positive_int, default=64, help="hidden size (64)")
    p.add_argument("--layers", type=positive_int, default=4, help="decoder layers (4)")
    p.add_argument("--heads", type=positive_int, default=4, help="attention heads (4)")
    p.add_argument("--kv-heads", type=positive_int, default=2, help="key/value heads (2)")
    p.add_argument("--ffn", type=positive_int, default=128, help="MLP width (128)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (0)")
    args = p.parse_args(argv)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        p.error("--hidden must split over --heads, and --heads over --kv-heads")
    start = time.perf_counter()
    try:
        texts = [t for path in args.texts for t in jsonl_texts(path)]
        warnings.filterwarnings("ignore")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # save_pretrained's "Writing model shards"
        out = write_tiny_llm(
            args.output, args.arch, args.vocab_size, texts, args.seed, args.hidden,
            args.layers, args.heads, args.kv_heads, args.ffn,
        )  # fmt: skip
    except (OSError, ValueError) as exc:
        print(f"make_tiny_hf_llm.py: error: {exc}", file=sys.stderr)
        return 2
    print(
        f"wrote a random {args.arch} LLM ({args.layers} layers, hidden {args.hidden}, "
        f"vocab {args.vocab_size}; tokenizer from {len(texts)} texts) to {out} in "
        f"{time.perf_counter() - start:.1f} s"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
