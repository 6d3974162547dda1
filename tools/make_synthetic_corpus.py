#!/usr/bin/env python
"""Write the small learnable image-caption corpus (shapes, colours, counts, positions) and its
tokenizer: the embedded default the tiny pretraining run trains on, entirely offline.

Example::

    python tools/make_synthetic_corpus.py --output data/synthetic --num-train 2000 --num-val 200
    python tools/index_corpus.py build --input data/synthetic/train.jsonl \\
        --tokenizer data/synthetic/tokenizer.json --config tiny --template qwen3-chat \\
        --max-tokens 1024 --output data/synthetic/shards/train

Writes OUT/train.jsonl, OUT/val.jsonl (InternVL conversations or caption pairs), OUT/images/
{train,val}/NNNNNN.png and OUT/tokenizer.json (byte-level BPE, 512 ids with the 12 NaViL special
tokens). The same arguments write the same bytes. Details: megatron_navil/testing/
synthetic_corpus.py. Exit status 2 on bad arguments.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_navil.cli import OneLineParser, int_at_least
from megatron_navil.testing.synthetic_corpus import write_corpus


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="make_synthetic_corpus.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, metavar="DIR", help="output directory (created)")
    p.add_argument(
        "--num-train", type=int_at_least(1), default=2000, help="training samples (2000)"
    )
    p.add_argument("--num-val", type=int_at_least(0), default=200, help="held-out samples (200)")
    p.add_argument("--seed", type=int_at_least(0), default=0, help="random seed (0)")
    p.add_argument(
        "--format",
        choices=("conversations", "captions"),
        default="conversations",
        help="InternVL conversations with a prompt (default) or caption pairs",
    )
    p.add_argument(
        "--min-side", type=int_at_least(1), default=32, help="smallest image side in px (32)"
    )
    p.add_argument(
        "--max-side", type=int_at_least(1), default=128, help="largest image side in px (128)"
    )
    args = p.parse_args(argv)
    if args.min_side > args.max_side:
        p.error(f"--min-side {args.min_side} > --max-side {args.max_side}")
    start = time.perf_counter()
    try:
        paths = write_corpus(
            args.output,
            args.num_train,
            args.num_val,
            args.seed,
            args.format,
            args.min_side,
            args.max_side,
        )
    except OSError as exc:
        print(f"make_synthetic_corpus.py: error: {exc}", file=sys.stderr)
        return 2
    n = args.num_train + args.num_val
    print(
        f"wrote {n} samples in {time.perf_counter() - start:.1f} s: "
        + ", ".join(f"{k}={v}" for k, v in paths.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
