#!/usr/bin/env python
"""Caption images with a trained NaViL checkpoint (greedy decoding) and score the captions.

Examples::

    # held-out split of the synthetic corpus: accuracy vs chance, first 5 shown
    python tools/caption.py --checkpoint runs/tiny/ckpt --config tiny \\
        --data runs/tiny/shards/val --limit 100 --json captions.json

    # image files, with the tokenizer and chat template the model was trained with
    python tools/caption.py --checkpoint runs/tiny/ckpt/iter_0000300 --config tiny \\
        --images a.png b.jpg --tokenizer runs/tiny/data/tokenizer.json --template qwen3-chat

Each sample's prompt is its training sequence up to the answer (the tokens before the first
loss-masked one, images expanded and patchified by the training loader's code); image files are
rendered as one user turn (``<image>\\n`` + --prompt) with the corpus's settings (with --data) or
the config's image rules. Decoding is greedy until ``<|im_end|>`` or --max-new-tokens. With
--data: exact-match accuracy, and for synthetic-corpus captions per-field accuracy (count,
colour, shape, position per group; number of groups; background) beside its chance level.
One process, TP = PP = EP = 1, any checkpoint layout. Exit status 2 on bad input; an image
that cannot be used is skipped with a line, the others are captioned, and the exit status is 2
at the end.
Details: megatron_navil/inference/ (inputs.py, generate.py), megatron_navil/checkpoint/model.py.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from megatron_navil.cli import OneLineParser, int_at_least

PROG = "caption.py"


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    from megatron_navil.data.templates import TEMPLATES

    p = OneLineParser(
        prog=PROG,
        description=__doc__.split("\n\n")[0],
        epilog="At least one of --data and --images is needed.",
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
        "or a checkpoint carrying one; default: the one the checkpoint carries",
    )
    p.add_argument(
        "--data",
        metavar="SHARDS_DIR",
        help="an indexed held-out split (tools/index_corpus.py output): caption its samples "
        "and score them against their answers",
    )
    p.add_argument(
        "--images", nargs="+", metavar="IMAGE", default=[], help="image files to caption"
    )
    p.add_argument(
        "--tokenizer",
        metavar="FILE|DIR",
        help="tokenizer.json / .model the model was trained with, or a directory holding one "
        "(default: the copy in --data)",
    )
    p.add_argument(
        "--template",
        choices=TEMPLATES,
        help="chat template for --images (default: --data's, else the checkpoint config's)",
    )
    p.add_argument(
        "--system",
        default=None,
        help="system message for --images (default: --data's, else the checkpoint config's; "
        "'' for none)",
    )
    p.add_argument(
        "--prompt",
        default="Describe the image.",
        help="user prompt for --images (default: 'Describe the image.')",
    )
    p.add_argument(
        "--max-new-tokens",
        type=int_at_least(1),
        default=48,
        help="stop after this many generated tokens without <|im_end|> (48)",
    )
    p.add_argument(
        "--limit", type=int_at_least(1), help="caption only the first N samples of --data"
    )
    p.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=16,
        help="samples generated together, packed into one sequence per forward as training "
        "packs them (16; the captions do not depend on it)",
    )
    p.add_argument(
        "--show",
        type=int_at_least(0),
        default=5,
        help="print reference and generated caption of the first N samples (5)",
    )
    p.add_argument("--json", metavar="FILE", help="write every caption and the metrics here")
    p.add_argument(
        "--verify",
        choices=("checksum", "size", "none"),
        default="size",
        help="how --data's shards are checked when opened (size; checksum hashes them all)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _resolve(args: argparse.Namespace):
    """Everything that can be checked before the model is built; UsageError on bad input."""
    from megatron_navil.checkpoint.config import resolve_config
    from megatron_navil.checkpoint.directory import resolve_checkpoint
    from megatron_navil.checkpoint.model import check_checkpoint
    from megatron_navil.data.shards.corpus import ShardDataset
    from megatron_navil.data.shards.format import ShardError
    from megatron_navil.data.tokenizer import TextTokenizer, TokenizerError, same_tokenizer

    if not args.data and not args.images:
        raise UsageError("nothing to caption: give --data and/or --images")
    if args.limit is not None and not args.data:
        raise UsageError("--limit applies to --data only")
    try:
        cfg = None if args.config is None else resolve_config(args.config)
        checkpoint = resolve_checkpoint(args.checkpoint)
        cfg = cfg or resolve_config(checkpoint)
        check_checkpoint(cfg, checkpoint)
    except ValueError as exc:  # CheckpointError among them
        raise UsageError(str(exc)) from None
    dataset = None
    if args.data:
        try:
            dataset = ShardDataset(args.data, verify=args.verify)
        except ShardError as exc:
            raise UsageError(str(exc)) from None
    tok_path = args.tokenizer
    if tok_path is None:
        if dataset is None:
            raise UsageError("--images needs --tokenizer (or --data, whose copy is used)")
        tok_path = dataset.root / dataset.manifest.get("tokenizer_copy", "tokenizer.json")
    if args.json:
        parent = Path(args.json).resolve().parent
        if not parent.is_dir():
            raise UsageError(f"--json {args.json}: directory {parent} does not exist")
    for image in args.images:
        if not Path(image).is_file():
            raise UsageError(f"{image}: no such image file")
    try:
        tokenizer = TextTokenizer(tok_path)
    except TokenizerError as exc:
        raise UsageError(str(exc)) from None
    if dataset is not None and not same_tokenizer(dataset.manifest["tokenizer"], tokenizer):
        raise UsageError(f"{tok_path}: not the tokenizer {args.data} was indexed with")
    return cfg, checkpoint, dataset, tokenizer


def _image_settings(args, cfg, dataset) -> dict:
    from megatron_navil.inference.inputs import indexer_settings

    if dataset is not None:
        settings = json.loads(json.dumps(dataset.manifest["settings"]))
        if args.template:
            settings["template"] = args.template
        if args.system is not None:
            settings["system"] = args.system
        return settings
    system = cfg.prompt.system_message if args.system is None else args.system
    return indexer_settings(cfg, args.template or cfg.prompt.template, system)


def _no_nan(metrics: dict) -> dict:
    """NaN (a level that does not exist) as null, for strict JSON."""
    return {
        name: {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in m.items()}
        for name, m in metrics.items()
    }


def _init_one_rank() -> Any:
    """A 1-rank process group in this process on a free port, megatron's parallel state."""
    from megatron_navil.parallel import initialize
    from megatron_navil.parallel.spawn import free_port

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        os.environ.pop(key, None)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(free_port())
    return initialize()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")  # megatron-core's apex/TE fallbacks
    try:
        cfg, checkpoint, dataset, tokenizer = _resolve(args)
    except UsageError as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from megatron_navil.checkpoint.errors import CheckpointError
    from megatron_navil.checkpoint.model import load_model
    from megatron_navil.data.shards.format import ShardError
    from megatron_navil.inference.generate import Captioner, caption_all
    from megatron_navil.inference.inputs import CaptionError, dataset_inputs, image_inputs

    skipped = 0
    try:
        inputs = []
        if args.images:
            settings = _image_settings(args, cfg, dataset)
            for path in args.images:  # a bad file is skipped with a line, not fatal for all
                try:
                    inputs.extend(image_inputs([path], tokenizer, settings, args.prompt))
                except CaptionError as exc:
                    print(f"{PROG}: skipped {exc}", file=sys.stderr)
                    skipped += 1
        total = len(inputs)
        sources = [iter(inputs)]
        if dataset is not None:
            n = len(dataset) if args.limit is None else min(args.limit, len(dataset))
            total += n
            sources.append(dataset_inputs(dataset, tokenizer, n))

        groups = _init_one_rank()
        start = time.perf_counter()
        model = load_model(cfg, checkpoint, tokenizer.special_ids, groups)
        captioner = Captioner(model, tokenizer, args.max_new_tokens)
        print(f"loaded {checkpoint} ({cfg.name}) in {time.perf_counter() - start:.1f} s")

        def chained():
            for source in sources:
                yield from source

        bar = tqdm(total=total, unit="caption", disable=args.quiet, dynamic_ncols=True)
        start = time.perf_counter()
        with bar:
            results = caption_all(captioner, chained(), progress=bar, batch_size=args.batch_size)
        elapsed = time.perf_counter() - start
    except (CaptionError, CheckpointError, ShardError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        return 2

    for r in results[: args.show]:
        print(f"[{r.source}] ({r.stop}, {r.new_tokens} tokens)")
        if r.reference is not None:
            print(f"  reference: {json.dumps(r.reference, ensure_ascii=False)}")
        print(f"  generated: {json.dumps(r.generated, ensure_ascii=False)}")
    print(
        f"{len(results)} captions in {elapsed:.1f} s "
        f"({len(results) / max(elapsed, 1e-9):.2f} captions/s)"
    )
    from megatron_navil.testing.caption_scores import caption_metrics  # the example's grammar

    metrics = caption_metrics(results)
    if metrics.samples:
        print(metrics.table())
    if args.json:
        payload = {
            "checkpoint": str(checkpoint),
            "config": cfg.name,
            "max_new_tokens": args.max_new_tokens,
            "captions": [asdict(r) for r in results],
            "metrics": _no_nan(metrics.metrics) if metrics.samples else {},
            "grammar": metrics.grammar,
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")
    if skipped:
        print(f"{PROG}: {skipped} of {len(args.images)} image(s) skipped (see above)",
              file=sys.stderr)  # fmt: skip
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
