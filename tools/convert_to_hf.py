#!/usr/bin/env python
"""Export a megatron_navil checkpoint (any TP/PP/EP layout) to a Hugging Face NaViL directory.

Example::

    python tools/convert_to_hf.py --checkpoint runs/tiny/ckpt --config tiny \\
        --tokenizer runs/tiny/data/tokenizer.json --output runs/tiny/hf --dtype float32

The output loads with ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)``
in a plain ``transformers`` install: ``config.json`` (official NaViL fields, ``auto_map``),
``model-XXXXX-of-YYYYY.safetensors`` + ``model.safetensors.index.json`` (official parameter
names), ``generation_config.json``, the remote-code files (``modeling_navil.py``,
``configuration_navil.py``, ``processing_navil.py``) and, with --tokenizer, the tokenizer with
the 12 special tokens and the chat template (loads in transformers 4.51 and 5.x; a sentencepiece
``.model`` adds ``tokenization_navil.py``). Tensors stream one at a time (memory: one tensor
plus one output shard). Every tensor of the checkpoint must map and every expected tensor must
be there, or the export stops naming it. Exit status 2 on bad input.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from megatron_navil.cli import OneLineParser

PROG = "convert_to_hf.py"


def parse_size(text: str) -> int:
    """``2GB``, ``500MB``, ``64KiB``, ``1024`` (bytes) -> bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?)(?:I?B)?\s*", text.upper())
    value = int(float(m.group(1)) * 1024 ** " KMG".index(m.group(2) or " ")) if m else 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive size like 2GB, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        required=True,
        metavar="DIR",
        help="a save directory (its newest complete iter_* is used) or one iter_* directory",
    )
    p.add_argument(
        "--config",
        metavar="NAME|PATH",
        help="model config: a registered name (tiny, navil-2b, navil-9b), a navil_config.json "
        "or a checkpoint carrying one; default: the one the checkpoint carries (training and "
        "tools/convert_from_hf.py write it)",
    )
    p.add_argument("--output", required=True, metavar="DIR", help="new (or empty) HF directory")
    p.add_argument(
        "--tokenizer",
        metavar="FILE|DIR",
        help="the tokenizer.json or sentencepiece .model the model was trained with, or a "
        "directory holding one (gives the special token ids and is exported with the chat "
        "template)",
    )
    p.add_argument(
        "--special-token-ids",
        metavar="ID",
        type=int,
        nargs=12,
        help="the 12 special token ids (SPECIAL_TOKENS order) when there is no --tokenizer "
        "and the config does not fix them",
    )
    p.add_argument(
        "--template",
        choices=("internlm2-chat", "qwen3-chat"),
        help="chat template (default: the one the model was trained with, from its config)",
    )
    p.add_argument(
        "--system-message",
        metavar="TEXT",
        help="system message of the chat template (default: the one the model was trained "
        "with, from its config; '' for none)",
    )
    p.add_argument(
        "--dtype",
        choices=("bfloat16", "float32"),
        default="bfloat16",
        help="dtype of the exported weights (bfloat16, like the official release)",
    )
    p.add_argument(
        "--max-shard-size",
        type=parse_size,
        default=parse_size("2GB"),
        metavar="SIZE",
        help="largest safetensors shard, e.g. 2GB (default) or 500MB",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    from tqdm import tqdm

    from megatron_navil.checkpoint.config import resolve_config
    from megatron_navil.checkpoint.directory import resolve_checkpoint
    from megatron_navil.checkpoint.errors import CheckpointError
    from megatron_navil.config.io import CONFIG_FILE
    from megatron_navil.conversion import export as E
    from megatron_navil.conversion.mapping import ConversionError
    from megatron_navil.data.tokenizer import TokenizerError

    try:
        try:
            checkpoint = resolve_checkpoint(args.checkpoint)
        except CheckpointError as exc:
            raise ConversionError(str(exc)) from None
        if args.config is None and not (checkpoint / CONFIG_FILE).is_file():
            raise ConversionError(f"{checkpoint} carries no {CONFIG_FILE}: give --config")
        try:
            cfg = resolve_config(checkpoint if args.config is None else args.config)
        except ValueError as exc:
            raise ConversionError(str(exc)) from None
        if args.tokenizer is not None and not Path(args.tokenizer).exists():
            raise ConversionError(f"--tokenizer {args.tokenizer}: no such file or directory")
        total = E.checkpoint_total_bytes(checkpoint)
        start = time.perf_counter()
        with tqdm(total=total, unit="B", unit_scale=True, disable=args.quiet, desc="export") as bar:
            summary = E.export(
                checkpoint, args.output, cfg,
                special_token_ids=args.special_token_ids, tokenizer=args.tokenizer,
                template=args.template, system_message=args.system_message, dtype=args.dtype,
                max_shard_bytes=args.max_shard_size, progress=bar,
            )  # fmt: skip
        elapsed = time.perf_counter() - start
    except (ConversionError, TokenizerError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        f"{checkpoint} -> {args.output}: {summary['tensors']} tensors, "
        f"{summary['bytes'] / 1e9:.3f} GB in {len(summary['files'])} file(s), {elapsed:.1f} s "
        f"({total / 1e9 / max(elapsed, 1e-9):.3f} GB/s read), peak RSS {rss:.0f} MB"
    )
    if summary["released_code"] is None:
        print("the authors' released NaViL code can load it (official config fields and names)")
    else:
        print(f"note: the authors' released NaViL code cannot load it: {summary['released_code']};"
              " this project's remote code (trust_remote_code=True) can")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
