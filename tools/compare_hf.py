#!/usr/bin/env python
"""Compare a megatron_navil checkpoint with an HF NaViL directory and print where they differ.

Two modes::

    # our export: the same random inputs through both models, the largest logit differences
    python tools/compare_hf.py --checkpoint runs/tiny/ckpt --hf runs/tiny/hf

    # a directory in the *released* format (e.g. OpenGVLab's NaViL-2B/9B, or our export):
    # the checkpoint (often imported from it with convert_from_hf.py navil) against an
    # independent reference of the released code, on real images and a question
    python tools/compare_hf.py --checkpoint runs/navil9b_ft --official NaViL-9B/ \
        --images a.jpg b.png --question "Describe the image."

``--hf``: seeded random text around image blocks of several sizes with two scales in one
block, two images in one sample and a text-only sample (``conversion/parity.py``), as one
packed sequence for megatron (TP = PP = EP = 1 in a spawned rank; dist checkpoints load in any
layout) and as a left-padded batch for HF. Prints max |diff| and max |diff| / max |logit|.

``--official``: what the released code would say about the directory (refused config fields,
missing / unexpected tensors), then per image: the patch grid of every scale as the released
preprocessing makes them vs as this project's image rules make them, the prompt's token ids
(released: the template with its system message, the image blocks, the tokenizer's own
special-token handling; ours: the indexer's rendering) with the first position they differ
at, the largest pixel difference, and the logits of the reference (``testing/
official_reference.py``, float64, written from ../shared/NAVIL.md) vs the checkpoint's, with
how often their argmax agrees. Without ``--images``: random images of 64x256, 333x500 and
1000x747 pixels.

Exit status: 0 when everything agrees within --tolerance (relative to the largest logit;
default 1e-5: float32 against a float64 or reordered float32 computation), 1 when something
differs, 2 on bad input.
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
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--hf", metavar="DIR", help="an HF NaViL directory exported by this project")
    mode.add_argument(
        "--official",
        metavar="DIR",
        help="an HF NaViL directory in the released format, compared through an independent "
        "reference of the released code (see above)",
    )
    p.add_argument(
        "--images", nargs="+", metavar="IMAGE", default=[], help="--official: images to use"
    )
    p.add_argument(
        "--question", default="Describe the image.", help="--official: the user's question"
    )
    p.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="the tokenizer (default: the directory's tokenizer.json or tokenizer.model)",
    )
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


def _official_tokenizer(directory: Path, tokenizer: str | None):
    """The released code's view of the tokenizer (``AutoTokenizer``, ``use_fast=False`` as
    its demo; a bare tokenizer.json through ``PreTrainedTokenizerFast``)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = Path(tokenizer) if tokenizer else directory
    if path.is_file():
        return PreTrainedTokenizerFast(tokenizer_file=str(path))
    try:
        return AutoTokenizer.from_pretrained(str(path), trust_remote_code=True, use_fast=False)
    except Exception:
        return PreTrainedTokenizerFast(tokenizer_file=str(path / "tokenizer.json"))


def compare_official(args: argparse.Namespace, checkpoint: Path) -> int:
    """``--official`` (module doc)."""
    import pickle
    import tempfile

    import numpy as np
    import torch
    from PIL import Image

    from megatron_navil.conversion import importer as I
    from megatron_navil.parallel.spawn import run_distributed
    from megatron_navil.testing import official_reference as R

    directory = Path(args.official)
    config, state, missing, unexpected = R.load(directory)
    problems = R.check_config(config)
    print(f"released code on {directory}: {len(problems)} config problem(s), "
          f"{len(missing)} missing and {len(unexpected)} unexpected tensor(s)")  # fmt: skip
    for line in (
        problems
        + [f"missing {n}" for n in missing[:10]]
        + [f"unexpected {n}" for n in unexpected[:10]]
    ):
        print(f"  {line}")
    if problems or missing or unexpected:
        return 1
    if config.get("use_multi_scale") is False:
        print(
            "  note: this model was trained with one scale per image (use_multi_scale false); "
            "the released code always packs every scale, so grids and tokens differ below"
        )
    tok = _official_tokenizer(directory, args.tokenizer)
    ours_tok = args.tokenizer or next(
        str(directory / n)
        for n in ("tokenizer.json", "tokenizer.model")
        if (directory / n).is_file()
    )
    ref = R.Reference(config, state)
    ref.init_special_token_ids(tok)
    if ref.special_ids != I.tokenizer_special_ids(ours_tok):
        print(f"special token ids differ: released {ref.special_ids}, ours "
              f"{I.tokenizer_special_ids(ours_tok)}")  # fmt: skip
        return 1
    images = list(args.images)
    tmp = None
    if not images:
        tmp = tempfile.TemporaryDirectory()
        rng = np.random.default_rng(0)
        for h, w in ((64, 256), (333, 500), (1000, 747)):
            path = Path(tmp.name) / f"random_{h}x{w}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            images.append(str(path))
    (ours,) = run_distributed(
        R.pipeline_logits_rank, 1, str(checkpoint), ours_tok, images, args.question,
        timeout=24 * 3600,
    )  # fmt: skip
    ours = pickle.loads(ours)
    worst = 0.0
    for path, mine in zip(images, ours, strict=True):
        with Image.open(path) as im:
            pixels, grids = R.preprocess(im, config)
        ids = tok(R.prompt(args.question, grids, [len(grids)], config))["input_ids"]
        print(f"{Path(path).name}:")
        released_grids = [[h, w] for _, h, w in grids]
        same_grids = released_grids == mine["grids"]
        print(f"  grids  released {released_grids}  ours {mine['grids']}"
              f"  {'same' if same_grids else 'DIFFER'}")  # fmt: skip
        pairs = enumerate(zip(ids, mine["ids"], strict=False))  # lengths may differ
        first = next((i for i, (a, b) in pairs if a != b), None)
        if first is None and len(ids) != len(mine["ids"]):
            first = min(len(ids), len(mine["ids"]))
        print(
            f"  tokens released {len(ids)}  ours {len(mine['ids'])}  "
            + ("same" if first is None else f"DIFFER from position {first}")
        )
        if not same_grids or first is not None:
            worst = float("inf")
            continue
        flat = pixels.reshape(pixels.shape[0], -1)
        print(f"  pixels max |diff| {float((mine['patches'].double() - flat).abs().max()):.2e}")
        logits = ref.logits(torch.tensor(ids), pixels, grids)
        rel = float((mine["logits"] - logits).abs().max() / logits.abs().max())
        agree = float((mine["logits"].argmax(-1) == logits.argmax(-1)).double().mean())
        print(f"  logits max |diff| / max |logit| {rel:.2e}, argmax agreement {agree:.4f}")
        worst = max(worst, rel)
    if tmp is not None:
        tmp.cleanup()
    ok = worst <= args.tolerance
    print("agree within the tolerance" if ok else "DIFFER (see above)")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.official is not None:
        from megatron_navil.checkpoint.directory import resolve_checkpoint
        from megatron_navil.checkpoint.errors import CheckpointError
        from megatron_navil.conversion.mapping import ConversionError

        try:
            checkpoint = resolve_checkpoint(args.checkpoint)
            if not (Path(args.official) / "config.json").is_file():
                raise ConversionError(f"{args.official}: no config.json")
            return compare_official(args, checkpoint)
        except (ConversionError, CheckpointError, OSError) as exc:
            print(f"{PROG}: error: {exc}", file=sys.stderr)
            return 2
    from megatron_navil.checkpoint.config import resolve_config
    from megatron_navil.checkpoint.directory import resolve_checkpoint
    from megatron_navil.checkpoint.errors import CheckpointError
    from megatron_navil.config.compare import same_model
    from megatron_navil.conversion import hf_config
    from megatron_navil.conversion import parity as P
    from megatron_navil.conversion.dist_reader import DistCheckpointReader
    from megatron_navil.conversion.mapping import ConversionError, check_names, megatron_shapes

    try:
        checkpoint = resolve_checkpoint(args.checkpoint)
        config_path = Path(args.hf) / "config.json"
        if not config_path.is_file():
            raise ConversionError(f"{args.hf}: no config.json")
        config = json.loads(config_path.read_text())
        cfg = hf_config.from_hf_config(config)
        if args.config is not None:
            try:
                diff = same_model(resolve_config(args.config), cfg)
            except ValueError as exc:
                raise ConversionError(str(exc)) from None
            if diff:
                raise ConversionError(f"{args.hf} is not a {args.config!r} model: {diff[0]}")
        ids = hf_config.special_token_ids_of(config)
        if ids is None:  # an official config: the ids are the tokenizer's
            from megatron_navil.conversion import importer as I

            ids = I.tokenizer_special_ids(args.tokenizer or args.hf)
        # the checkpoint must hold exactly this model (cheap: its metadata only)
        reader = DistCheckpointReader(checkpoint)
        check_names(reader.shapes, megatron_shapes(cfg), str(checkpoint))
    except (ConversionError, CheckpointError) as exc:
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
