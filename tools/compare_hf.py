#!/usr/bin/env python
"""Run a megatron_navil checkpoint (any layout) and its HF export on the same inputs and print
the largest logit differences.

Example::

    python tools/compare_hf.py --checkpoint runs/tiny/ckpt --hf runs/tiny/hf

Inputs: seeded random text around image blocks of several sizes with two scales in one block,
two images in one sample and a text-only sample (``conversion/parity.py``), as one packed
sequence for megatron (TP = PP = EP = 1 in a spawned rank; dist checkpoints load in any layout)
and as a left-padded batch for HF in plain PyTorch. Prints max |diff|, max |diff| / max |logit|
and exits 1 when they exceed --tolerance (relative; default 1e-5, fp32 reordering), 2 on bad
input.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from megatron_navil.cli import OneLineParser

PROG = "compare_hf.py"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--checkpoint", required=True, metavar="DIR", help="save dir or iter_* dir")
    p.add_argument("--hf", required=True, metavar="DIR", help="the HF NaViL directory")
    p.add_argument(
        "--config",
        metavar="NAME|PATH",
        help="expected model config, checked against the HF config.json (a registered name, a "
        "navil_config.json or a checkpoint carrying one)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the random inputs (0)")
    p.add_argument(
        "--tolerance",
        type=float,
        default=1e-5,
        help="largest allowed max|diff| / max|logit| (1e-5: fp32 sums in another order)",
    )
    p.add_argument("--json", metavar="FILE", help="also write the numbers here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    from megatron_navil.config.io import resolve_config
    from megatron_navil.conversion import hf_config
    from megatron_navil.conversion import parity as P
    from megatron_navil.conversion.dist_reader import DistCheckpointReader
    from megatron_navil.conversion.mapping import ConversionError, check_names, megatron_shapes
    from megatron_navil.training.caption import CaptionError, resolve_checkpoint

    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        config_path = Path(args.hf) / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{args.hf}: no config.json")
        config = json.loads(config_path.read_text())
        cfg = hf_config.from_hf_config(config)
        if args.config is not None:
            try:
                diff = hf_config.same_model(resolve_config(args.config), cfg)
            except ValueError as exc:
                raise ConversionError(str(exc)) from None
            if diff:
                raise ConversionError(f"{args.hf} is not a {args.config!r} model: {diff[0]}")
        ids = hf_config.special_token_ids_of(config)
        # the checkpoint must hold exactly this model (cheap: its metadata only)
        reader = DistCheckpointReader(checkpoint)
        check_names(reader.shapes, megatron_shapes(cfg), str(checkpoint))
    except (ConversionError, CaptionError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2
    inputs = P.make_inputs(cfg, ids, seed=args.seed)
    meg = P.megatron_logits(checkpoint, cfg, ids, inputs)
    hf = P.hf_logits(P.load_hf(args.hf), inputs)
    result = P.differences(meg, hf, inputs)
    tokens = sum(e - s for s, e in inputs.spans)
    print(
        f"{tokens} tokens in {len(inputs.spans)} samples: max |diff| {result['max_abs']:.3e}, "
        f"max |diff| / max |logit| {result['max_rel']:.3e} (max |logit| {result['max_logit']:.3f})"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if result["max_rel"] <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
