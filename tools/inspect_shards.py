#!/usr/bin/env python
"""Inspect an indexed corpus: summary statistics, checksum verification, decoded samples.

Examples::

    python tools/inspect_shards.py corpus/train                  # summary
    python tools/inspect_shards.py corpus/train --verify         # + sha256 of every shard file
    python tools/inspect_shards.py corpus/train --sample 0 --sample 17

A decoded sample prints its text (via the tokenizer copy in the corpus directory) with each image
placeholder written as ``<image k: HxW -> scales ..., N patches>``, then the loss-masked parts.
Exit status: 0 fine, 2 bad arguments, a missing/corrupt manifest or shard (one-line error).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from megatron_navil.cli import OneLineParser
from megatron_navil.data.shards.corpus import ShardDataset, sha256_file
from megatron_navil.data.shards.format import ShardError
from megatron_navil.data.tokenizer import TextTokenizer, TokenizerError


def _stats(name: str, a: np.ndarray) -> str:
    if len(a) == 0:
        return f"  {name:<12} (none)"
    q = np.percentile(a, [50, 90, 99])
    return (
        f"  {name:<12} total {int(a.sum()):>14,}  min {int(a.min()):>8,}  median {q[0]:>10,.0f}"
        f"  p90 {q[1]:>10,.0f}  p99 {q[2]:>10,.0f}  max {int(a.max()):>10,}"
    )


def summary(ds: ShardDataset) -> None:
    m = ds.manifest
    c = m["counts"]
    print(f"corpus {ds.root}")
    print(
        f"  schema {m['schema_version']}, template {m['template']}, tokenizer "
        f"{m['tokenizer']['kind']} {m['tokenizer']['fingerprint'][:16]}..., placeholder "
        f"'<img>' = {m['placeholder_id']}"
    )
    im = m["image"]
    print(
        f"  images: config {im['config']}, patches {im['min_patches']}..{im['max_patches']}, "
        f"multi-scale {'on' if im['multi_scale'] else 'off'}"
    )
    print(
        f"  {c['samples']:,} samples ({c['skipped']:,} skipped of {c['records']:,} records), "
        f"{c['shards']} shards, {c['bin_bytes'] / 1e6:.1f} MB"
    )
    for d in m["datasets"]:
        print(
            f"  dataset {d['name']} ({d['kind']}, repeat_time {d['repeat_time']}): "
            f"{d['num_samples']:,} samples from #{d['first_sample']:,}"
        )
    print(_stats("llm_tokens", ds.llm_tokens))
    print(_stats("patches", ds.patches))
    print(_stats("images", ds.num_images))
    for reason, e in m["skipped"].items():
        print(f"  skipped {reason}: {e['count']:,}")
        for ex in e["examples"]:
            print(f"    {ex}")


def verify(ds: ShardDataset) -> int:
    bad = 0
    for entry in ds.manifest["shards"]:
        for key in ("bin", "idx"):
            p = ds.root / entry[key]
            try:
                ok = sha256_file(p) == entry[f"{key}_sha256"]
            except OSError as exc:
                print(f"  MISSING {p}: {exc.strerror}")
                bad += 1
                continue
            if not ok:
                print(f"  CORRUPT {p}: sha256 differs from the manifest")
                bad += 1
    for k, reader in enumerate(ds.shards):
        try:
            len(reader)  # structural check of the index
        except ShardError as exc:
            print(f"  CORRUPT shard {k}: {exc}")
            bad += 1
    n = 2 * len(ds.manifest["shards"])
    print(f"verify: {n - min(bad, n)} of {n} files fine" + (f", {bad} problems" if bad else ""))
    return bad


def source_of(spec: dict, record: int) -> str:
    """``", FILE record N"``: the input file a dataset record came from (a directory of tars
    numbers its records across files) and its index there; "" when the manifest predates
    per-file record offsets."""
    files = spec.get("files") or []
    if not files or not isinstance(files[0], dict) or "first_record" not in files[0]:
        return ""
    f = [f for f in files if f["first_record"] <= record][-1]  # in order; empty files share
    return f", {f['path']} record {record - f['first_record']}"


def show_sample(ds: ShardDataset, tok: TextTokenizer | None, i: int) -> None:
    s = ds.sample(i)
    shard, local = ds.shard_of(i)
    spec = ds.manifest["datasets"][s.dataset]
    print(
        f"sample {i} (shard {ds.manifest['shards'][shard]['name']} #{local}, dataset "
        f"{spec['name']} record {s.record}{source_of(spec, s.record)}): {len(s.tokens)} stored "
        f"tokens, {s.llm_tokens} LLM tokens, {s.patches} patches, {len(s.images)} images"
    )

    def text(ids: np.ndarray) -> str:
        return tok.decode(ids.tolist()) if tok is not None else " ".join(map(str, ids.tolist()))

    pieces, prev, k = [], 0, 0
    for p in np.flatnonzero(s.tokens == ds.placeholder_id):
        pieces.append(text(s.tokens[prev:p]))
        im = s.images[k]
        scales = ",".join(f"{h}x{w}" for h, w in im.scales)
        npatch = sum(gh * gw for gh, gw in im.grids)
        conv = ", converted" if im.converted else ""
        pieces.append(
            f"<image {k}: {im.format} {im.orig_size[0]}x{im.orig_size[1]} -> scales {scales}, "
            f"{npatch} patches{conv}>"
        )
        prev, k = p + 1, k + 1
    pieces.append(text(s.tokens[prev:]))
    print("  text: " + repr("".join(pieces)))
    mask = np.concatenate([[False], s.loss_mask, [False]]).astype(np.int8)
    d = np.diff(mask)
    for a, b in zip(np.flatnonzero(d == 1), np.flatnonzero(d == -1), strict=True):
        print(f"  loss [{a}:{b}]: {text(s.tokens[a:b])!r}")


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="inspect_shards.py", description=__doc__.split("\n\n")[0])
    p.add_argument("corpus", help="corpus directory (with manifest.json) or the manifest path")
    p.add_argument(
        "--verify",
        action="store_true",
        help="hash every shard file (sha256) against the manifest and check every index",
    )
    p.add_argument(
        "--sample",
        type=int,
        action="append",
        default=[],
        metavar="N",
        help="print global sample N decoded (repeatable; negative counts from the end)",
    )
    p.add_argument("--no-summary", action="store_true", help="skip the summary statistics")
    args = p.parse_args(argv)
    try:
        ds = ShardDataset(args.corpus, verify="size")
        bad = verify(ds) if args.verify else 0
        if not args.no_summary and not bad:
            summary(ds)
        tok = None
        if args.sample:
            try:
                tok = TextTokenizer(ds.root / ds.manifest["tokenizer_copy"])
            except TokenizerError as exc:
                print(f"(no tokenizer: {exc}; printing ids)")
        for i in args.sample:
            j = i + len(ds) if i < 0 else i
            if not 0 <= j < len(ds):
                raise ShardError(f"--sample {i} out of range for {len(ds)} samples")
            show_sample(ds, tok, j)
    except ShardError as exc:
        print(f"inspect_shards.py: error: {exc}", file=sys.stderr)
        return 2
    return 2 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
