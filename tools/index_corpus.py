#!/usr/bin/env python
"""Index a multimodal corpus into memory-mapped shards (``.bin`` + ``.idx``) and a manifest.

Examples::

    # one machine, 2 worker processes; finalizes (writes manifest.json) when done
    python tools/index_corpus.py build --input data/train.jsonl --tokenizer data/tokenizer.json \\
        --template qwen3-chat --config tiny --output corpus/train --workers 2

    # a SLURM array of 8 machines sharing corpus/: each indexes every 8th unit, then any one
    python tools/index_corpus.py build --input meta.json ... --output corpus \\
        --shard-index $SLURM_ARRAY_TASK_ID --num-shards 8
    python tools/index_corpus.py finalize corpus

Re-running the same command skips finished work units, so a killed run resumes and ends
byte-identical to an uninterrupted one. Formats, record kinds and the shard layout:
``megatron_navil/data/indexer/`` and ``megatron_navil/data/shards/`` (module docs).
Exit status: 0 done, 2 bad arguments or input (with ``--strict``: the first bad record, or a
finished unit of an earlier run that skipped records; finalizing: every record skipped, so no
sample), 1 an unexpected failure (a worker process died).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from megatron_navil.checkpoint.config import resolve_config
from megatron_navil.cli import OneLineParser, nonneg_int, positive_float, positive_int
from megatron_navil.config import REGISTRY
from megatron_navil.config.model import DEFAULT_SYSTEM_MESSAGE
from megatron_navil.data.indexer.inputs import datasets_from_inputs
from megatron_navil.data.indexer.manifest import check_strict, finalize, save_tokenizer_copy
from megatron_navil.data.indexer.plan import make_plan, prepare_output
from megatron_navil.data.indexer.settings import (
    MAX_EXAMPLES,
    SKIP_REASONS,
    IndexFatal,
    Settings,
)
from megatron_navil.data.indexer.units import run_units, unit_done, unit_marker
from megatron_navil.data.templates import TEMPLATES
from megatron_navil.data.tokenizer import TextTokenizer, TokenizerError
from megatron_navil.ops.geometry import ImageGeometry


class UsageError(Exception):
    pass


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="index_corpus.py",
        description=(
            "Index JSONL conversations, caption pairs (JSONL/CSV), text-only and interleaved "
            "JSONL, InternVL meta JSON and WebDataset tars into memory-mapped NaViL shards."
        ),
    )
    sub = p.add_subparsers(dest="command", required=True, parser_class=OneLineParser)
    b = sub.add_parser(
        "build",
        help="index inputs (or this machine's part of them) into OUT",
        description="Index inputs into OUT/shards; resumable; finalizes when all units are done.",
    )
    b.add_argument(
        "--input",
        action="append",
        required=True,
        metavar="PATH",
        help="a .jsonl (conversations, caption pairs, text or interleaved documents, by keys), "
        "a .csv of caption pairs (columns image, caption|text), an InternVL meta .json "
        "(root, annotation, repeat_time), a WebDataset .tar or a directory of .tar files; "
        "repeat for several datasets (each keeps its own name and order)",
    )
    b.add_argument("--output", required=True, metavar="DIR", help="output directory (created)")
    b.add_argument(
        "--tokenizer",
        required=True,
        metavar="FILE|DIR",
        help="an HF tokenizer.json or a sentencepiece .model, or an HF model directory holding "
        "one (its tokenizer.json first); the 12 NaViL special tokens and the template tokens "
        "are added when missing",
    )
    b.add_argument(
        "--template",
        default="internlm2-chat",
        choices=TEMPLATES,
        help="chat template for conversations (default: internlm2-chat)",
    )
    sys_group = b.add_mutually_exclusive_group()
    sys_group.add_argument(
        "--system",
        default=DEFAULT_SYSTEM_MESSAGE,
        metavar="TEXT",
        help="system turn of every conversation that has none of its own (default: InternVL's "
        "default system message, which the released NaViL models were trained and are run "
        "with, as InternVL's training adds it to every sample)",
    )
    sys_group.add_argument(
        "--no-system",
        dest="system",
        action="store_const",
        const="",
        help="no system turn (shorter samples; a model trained so is prompted without one)",
    )
    b.add_argument(
        "--caption-format",
        default="raw",
        choices=("raw", "chat"),
        help="caption pairs as '<img> caption <|im_end|>' (raw, default) or as a one-turn "
        "conversation with --caption-prompt (chat); loss on the caption either way",
    )
    b.add_argument(
        "--caption-prompt",
        default="Describe the image.",
        metavar="TEXT",
        help="the user prompt of --caption-format chat (default: 'Describe the image.')",
    )
    b.add_argument(
        "--config",
        default="navil-2b",
        metavar="NAME|PATH",
        help=f"model config ({', '.join(REGISTRY)}, a navil_config.json or a checkpoint "
        "carrying one) whose image rules (patch, merge, min/max patches, aspect, "
        "multi-scale) size the images (default: navil-2b)",
    )
    b.add_argument("--min-patches", type=positive_int, help="override the config's minimum patches")
    b.add_argument("--max-patches", type=positive_int, help="override the config's maximum patches")
    b.add_argument(
        "--no-multi-scale",
        action="store_true",
        help="store only the base scale of each image (default: the config's multi-scale)",
    )
    b.add_argument(
        "--max-tokens",
        type=positive_int,
        default=16384,
        help="skip samples with more LLM tokens (text + image blocks) than this (default: "
        "16384, NaViL's packed sequence length)",
    )
    b.add_argument(
        "--samples-per-shard",
        type=positive_int,
        default=20000,
        help="input records per work unit; a unit writes one shard, or several when it "
        "exceeds --shard-size-mb (default: 20000)",
    )
    b.add_argument(
        "--shard-size-mb",
        type=positive_float,
        default=1024.0,
        help="roll over to a new shard before a .bin grows past this many MiB (default: 1024)",
    )
    b.add_argument(
        "--image-root",
        metavar="DIR",
        help="directory image paths of --input .jsonl/.csv files are relative to (default: "
        "the annotation file's directory)",
    )
    b.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        help="worker processes on this machine (default: 1); the output does not depend on it",
    )
    b.add_argument(
        "--shard-index",
        type=nonneg_int,
        default=0,
        help="this machine's index in [0, --num-shards) (default: 0)",
    )
    b.add_argument(
        "--num-shards",
        type=positive_int,
        default=1,
        help="machines splitting the work: unit u goes to machine u %% num-shards (default: 1)",
    )
    b.add_argument(
        "--strict",
        action="store_true",
        help="stop at the first bad record (exit 2) instead of counting it as skipped; a "
        "re-run into an existing OUT also checks its finished units (and, before finalizing, "
        "every unit of the plan): one that skipped any record (built without --strict) is an "
        "error (exit 2), as an index that is not all-good cannot become one by resuming",
    )
    b.add_argument(
        "--no-finalize",
        action="store_true",
        help="do not write manifest.json even when every unit is done",
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    f = sub.add_parser(
        "finalize",
        help="check all units are done and write OUT/manifest.json",
        description="Write the global manifest after every --shard-index has run.",
    )
    f.add_argument("output", metavar="DIR", help="the --output of build")
    return p


def _settings(args: argparse.Namespace) -> Settings:
    try:
        cfg = resolve_config(args.config)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    model = ImageGeometry.of_config(cfg)
    image = dataclasses.replace(
        model,
        min_patches=args.min_patches or model.min_patches,
        max_patches=args.max_patches or model.max_patches,
        multi_scale=model.multi_scale and not args.no_multi_scale,
    )
    if image.min_patches > image.max_patches:
        raise UsageError(f"--min-patches {image.min_patches} > --max-patches {image.max_patches}")
    if image.max_patches < image.merge**2:
        raise UsageError(f"--max-patches must be >= {image.merge**2}")
    return Settings(
        template=args.template,
        system=args.system,
        caption_format=args.caption_format,
        caption_prompt=args.caption_prompt,
        max_tokens=args.max_tokens,
        samples_per_shard=args.samples_per_shard,
        shard_size_mb=args.shard_size_mb,
        image=image,
        model_config=cfg.name,
    )


def _fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def _report(out: Path, units: list[int], seconds: float, mb: float, records_done: int) -> None:
    written = records = 0
    skipped: dict[str, dict] = {}
    for u in units:
        info = json.loads(unit_marker(out, u).read_text())
        written += info["written"]
        records += info["records"]
        for reason, e in info["skipped"].items():
            acc = skipped.setdefault(reason, {"count": 0, "examples": []})
            acc["count"] += e["count"]
            acc["examples"] = (acc["examples"] + e["examples"])[:MAX_EXAMPLES]
    rate = f"{records_done / seconds:,.0f} samples/s, {mb / seconds:.1f} MB/s" if seconds else ""
    print(
        f"written {written:,} samples of {records:,} records in {len(units)} units "
        f"(this run: {records_done:,} records, {_fmt_bytes(mb * 1e6)} in {seconds:.1f} s"
        + (f", {rate}" if rate else "")
        + ")"
    )
    total = sum(e["count"] for e in skipped.values())
    print(f"skipped {total:,}" + (":" if total else ""))
    for reason in SKIP_REASONS:
        if reason in skipped:
            e = skipped[reason]
            print(f"  {reason}: {e['count']:,}")
            for ex in e["examples"]:
                print(f"    {ex}")


def cmd_build(args: argparse.Namespace) -> int:
    if args.shard_index >= args.num_shards:
        raise UsageError(
            f"--shard-index {args.shard_index} must be < --num-shards {args.num_shards}"
        )
    settings = _settings(args)
    tok = TextTokenizer(args.tokenizer)
    out = Path(args.output).resolve()
    specs = datasets_from_inputs(args.input, args.image_root)
    if not args.quiet:
        print(f"planning {len(specs)} dataset(s)...", file=sys.stderr)
    plan = make_plan(specs, settings, tok)
    prepare_output(out, plan)
    save_tokenizer_copy(out, tok)
    n_units = len(plan["units"])
    mine = [u for u in range(n_units) if u % args.num_shards == args.shard_index]
    if args.strict:
        check_strict(out, mine)
    todo = [u for u in mine if not unit_done(out, u)]
    total = sum(plan["units"][u][4] for u in todo)
    if not args.quiet:
        print(
            f"{n_units} units in the plan, {len(mine)} for this machine, {len(mine) - len(todo)} "
            f"already done, {len(todo)} to do ({total:,} records)",
            file=sys.stderr,
        )
    from tqdm import tqdm

    start = time.perf_counter()
    seen = [0, 0]
    with tqdm(
        total=total, unit="sample", disable=args.quiet, dynamic_ncols=True, smoothing=0.1
    ) as bar:

        def on_progress(samples: int, nbytes: int) -> None:
            seen[0] += samples
            seen[1] += nbytes
            bar.update(samples)
            elapsed = time.perf_counter() - start
            if elapsed > 0:
                bar.set_postfix_str(f"{seen[1] / 1e6 / elapsed:.1f} MB/s", refresh=False)

        run_units(out, plan, str(tok.path), todo, args.workers, args.strict, on_progress)
    seconds = time.perf_counter() - start
    _report(out, mine, seconds, seen[1] / 1e6, seen[0])
    if not args.no_finalize and all(unit_done(out, u) for u in range(n_units)):
        if args.strict:
            check_strict(out, list(range(n_units)))
        manifest = finalize(out)
        c = manifest["counts"]
        print(
            f"manifest: {out / 'manifest.json'} ({c['samples']:,} samples, {c['shards']} shards, "
            f"{_fmt_bytes(c['bin_bytes'])})"
        )
    elif not args.no_finalize:
        print("other machines' units are not done yet; run `finalize` when they are")
    return 0


def cmd_finalize(args: argparse.Namespace) -> int:
    out = Path(args.output).resolve()
    manifest = finalize(out)
    c = manifest["counts"]
    print(
        f"manifest: {out / 'manifest.json'} ({c['samples']:,} samples, {c['skipped']:,} skipped, "
        f"{c['shards']} shards, {_fmt_bytes(c['bin_bytes'])})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return cmd_build(args) if args.command == "build" else cmd_finalize(args)
    except (UsageError, IndexFatal, TokenizerError) as exc:
        print(f"index_corpus.py: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("index_corpus.py: interrupted; re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as exc:  # a worker died (BrokenProcessPool), disk full, ...
        print(f"index_corpus.py: failed: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
