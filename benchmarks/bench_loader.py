"""Loader throughput per core: our shards + packed-sequence loader vs webdataset + HF Qwen2-VL.

One run, the same seeded images for every candidate, one process, torch at 1 thread (per core):
  images   --images noise+gradient JPEGs (quality 90), sides log-uniform in
           [--min-side, --max-side] (default 256..1024 px; all inside NaViL's 256..24576
           patch bounds, so NaViL keeps their native size and only pads), each with a short
           caption, written to a work directory as caption-pair JSONL and as WebDataset tars
           (100 samples per tar: ``key.jpg`` + ``key.txt``)
  ours     tools/index_corpus.py (navil-2b image rules, qwen3-chat) -> shards; then
           megatron_navil.data.build_data_loader(num_workers=0, seq_length --seq-length, no
           patch budget) over one epoch: sampler + plan, memmap reads, Pillow decode, resize
           to each stored scale, patchify_batch (float32), image-block expansion, labels,
           positions, cu_seqlens, loss weights, padding. Two indexes: base scale only
           ("single scale", the same pixel work as the peer) and NaViL's multi-scale packing
           ("VMP", about twice the pixels: every image also at 1/2, 1/4, ... of its area)
  peer     webdataset.WebDataset(tars).decode("pil").to_tuple("jpg", "txt") -> transformers'
           Qwen2VLImageProcessorPil configured like NaViL (benchmarks/bench_patchify.py:
           patch 16, merge 2, temporal patch 1, mean = std = 0.5, min_pixels 256 * 16 * 16,
           max_pixels 24576 * 16 * 16; it resamples each image to multiples of 32, bicubic,
           where NaViL pads) + the same tokenizer (HF tokenizers) on the caption + the image
           block ids + greedy packing into --seq-length sequences (torch.cat of the
           pixel_values and ids)
Timing: each candidate processes the whole set once per round; rounds are interleaved
(ours single, ours VMP, peer, ours single, ...) so load changes on a shared machine hit all
alike; one untimed warm-up round first; the best round is reported (and the median).
Units: samples/s = images / seconds on one core. The goal is ours (single scale) / peer >= 3.

Prints a table; writes JSON (default benchmarks/results/loader.json).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MIN_PATCHES, MAX_PATCHES, PATCH = 256, 24576, 16


def write_tars(jsonl: Path, out: Path, per_tar: int = 100) -> list[str]:
    """The caption pairs of ``jsonl`` as WebDataset tars (``key.jpg`` + ``key.txt``)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line]
    paths = []
    for t in range(0, len(rows), per_tar):
        path = out / f"{t // per_tar:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i, row in enumerate(rows[t : t + per_tar], start=t):
                for ext, data in (
                    ("jpg", (jsonl.parent / row["image"]).read_bytes()),
                    ("txt", row["caption"].encode()),
                ):
                    info = tarfile.TarInfo(f"{i:08d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(str(path))
    return paths


def hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(
        patch_size=PATCH,
        merge_size=2,
        temporal_patch_size=1,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        min_pixels=MIN_PATCHES * PATCH * PATCH,
        max_pixels=MAX_PATCHES * PATCH * PATCH,
    )


def run_peer(tars: list[str], proc, tok, special: dict[str, int], seq_length: int) -> dict:
    """webdataset + HF processor + tokenizer + greedy packing; returns counts."""
    import webdataset as wds

    ds = wds.WebDataset(tars, shardshuffle=False, empty_check=False).decode("pil")
    ds = ds.to_tuple("jpg", "txt")
    ctx, lb = special["<IMG_CONTEXT>"], special["<IMG_LINE_BREAK>"]
    fb = special["<IMG_FRAME_BREAK>"]
    samples = sequences = tokens_total = 0
    cur_ids: list[torch.Tensor] = []
    cur_pix: list[torch.Tensor] = []
    cur_len = 0

    def flush() -> None:
        nonlocal sequences, cur_len
        if cur_ids:
            ids = torch.cat(cur_ids)
            torch.cat(cur_pix)
            pad = seq_length - ids.numel()
            torch.cat([ids, torch.zeros(pad, dtype=torch.long)])
            sequences += 1
        cur_ids.clear()
        cur_pix.clear()
        cur_len = 0

    for image, text in ds:
        out = proc(images=[image], return_tensors="pt")  # it converts to RGB itself
        _, gh, gw = out["image_grid_thw"][0].tolist()
        h, w = gh // 2, gw // 2
        rows = torch.full((h, w + 1), ctx, dtype=torch.long)
        rows[:, w] = lb
        block = torch.cat(
            [
                torch.tensor([special["<img>"]]),
                rows.flatten(),
                torch.tensor([fb, special["</img>"]]),
            ]
        )
        text_ids = torch.tensor([*tok.encode(text).ids, special["<|im_end|>"]], dtype=torch.long)
        ids = torch.cat([block, text_ids])
        if cur_len + ids.numel() > seq_length:
            flush()
        cur_ids.append(ids)
        cur_pix.append(out["pixel_values"])
        cur_len += ids.numel()
        tokens_total += ids.numel()
        samples += 1
    flush()
    return {"samples": samples, "sequences": sequences, "tokens": tokens_total}


def run_ours(corpus: Path, seq_length: int) -> dict:
    """One epoch of the packed-sequence loader, in this process."""
    from megatron_navil.data import build_data_loader

    loader = build_data_loader(
        [corpus], seq_length=seq_length, global_batch=1, window=10_000, num_workers=0
    )
    samples = sequences = patches = 0
    for batch in loader:
        if batch.epoch > 0:
            break
        samples += batch.num_samples
        sequences += 1
        patches += batch.patches.shape[0]
    return {"samples": samples, "sequences": sequences, "patches": patches}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Details (images, candidates, timing): see the module docstring.",
    )
    parser.add_argument("--images", type=int, default=300, help="number of images (300)")
    parser.add_argument("--seed", type=int, default=0, help="image generation seed (0)")
    parser.add_argument("--min-side", type=int, default=256, help="smallest side in px (256)")
    parser.add_argument("--max-side", type=int, default=1024, help="largest side in px (1024)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best kept (3)")
    parser.add_argument(
        "--seq-length", type=int, default=16384, help="packed sequence length (16384)"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where images, tars and shards go (default: a temporary directory, removed)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "loader.json",
        help="where to write the JSON results (default benchmarks/results/loader.json)",
    )
    args = parser.parse_args(argv)
    for name in ("images", "rounds", "min_side", "max_side", "seq_length"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.min_side > args.max_side:
        parser.error(f"--min-side {args.min_side} > --max-side {args.max_side}")
    try:
        import webdataset  # noqa: F401
    except ImportError:
        parser.error("the peer needs the webdataset package (pip install webdataset)")
    from megatron_navil.ops import native_available

    if not native_available():
        parser.error("megatron_navil._C is not built (python setup.py build_ext --inplace)")

    with tempfile.TemporaryDirectory() as tmp:
        return _run(args, args.workdir or Path(tmp))


def _run(args: argparse.Namespace, work: Path) -> int:
    from tokenizers import Tokenizer

    from megatron_navil.testing.loader_corpus import index, noise_jpegs
    from megatron_navil.testing.synthetic_corpus import train_tokenizer, vocabulary_text

    torch.set_num_threads(1)
    start = time.perf_counter()
    jsonl = noise_jpegs(
        work / "src", args.images, args.seed, args.min_side, args.max_side, quality=90
    )
    tok_path = train_tokenizer(vocabulary_text(), work / "tokenizer.json")
    common = ("--config", "navil-2b", "--template", "qwen3-chat")
    common += ("--max-tokens", str(args.seq_length))
    single = index([jsonl], work / "shards_single", tok_path, *common, "--no-multi-scale")
    vmp = index([jsonl], work / "shards_vmp", tok_path, *common)
    tars = write_tars(jsonl, work / "tars")
    jpeg_mb = sum(p.stat().st_size for p in (work / "src" / "images").iterdir()) / 1e6
    print(f"prepared {args.images} JPEGs ({jpeg_mb:.1f} MB) in {time.perf_counter() - start:.1f} s")

    from megatron_navil.data import ShardDataset

    special = ShardDataset(single).special_ids
    tok = Tokenizer.from_file(str(tok_path))
    proc = hf_processor()
    candidates = {
        "ours: shards + loader, single scale": lambda: run_ours(single, args.seq_length),
        "ours: shards + loader, VMP scales": lambda: run_ours(vmp, args.seq_length),
        "peer: webdataset + HF Qwen2VL (PIL)": lambda: run_peer(
            tars, proc, tok, special, args.seq_length
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in candidates}
    info: dict[str, dict] = {}
    for fn in candidates.values():  # warm-up: imports, page cache, first allocations
        fn()
    for _ in range(args.rounds):
        for name, fn in candidates.items():
            t0 = time.perf_counter()
            info[name] = fn()
            times[name].append(time.perf_counter() - t0)
    results = []
    for name, ts in times.items():
        n = info[name]["samples"]
        results.append(
            {
                "name": name,
                "best_seconds": min(ts),
                "median_seconds": statistics.median(ts),
                "samples": n,
                "sequences": info[name]["sequences"],
                "samples_per_s_per_core": n / min(ts),
                "samples_per_s_per_core_median": n / statistics.median(ts),
            }
        )
    by = {r["name"]: r for r in results}
    peer = by["peer: webdataset + HF Qwen2VL (PIL)"]["samples_per_s_per_core"]
    ratios = {
        "ours single scale / peer (goal >= 3)": by["ours: shards + loader, single scale"][
            "samples_per_s_per_core"
        ]
        / peer,
        "ours VMP / peer (ours does ~2x the pixels)": by["ours: shards + loader, VMP scales"][
            "samples_per_s_per_core"
        ]
        / peer,
    }
    print(
        f"{args.images} JPEGs {args.min_side}..{args.max_side} px, seq_length {args.seq_length}, "
        f"torch threads 1, best of {args.rounds} interleaved rounds (os.cpu_count() "
        f"{os.cpu_count()})"
    )
    print(f"{'candidate':<40} {'best s':>8} {'median s':>9} {'seqs':>5} {'samples/s/core':>15}")
    for r in results:
        print(
            f"{r['name']:<40} {r['best_seconds']:>8.2f} {r['median_seconds']:>9.2f} "
            f"{r['sequences']:>5} {r['samples_per_s_per_core']:>15.1f}"
        )
    for k, v in ratios.items():
        print(f"{k:<48} {v:>6.2f}")
    payload = {
        "benchmark": "loader",
        "images": args.images,
        "sides": [args.min_side, args.max_side],
        "jpeg_mb": jpeg_mb,
        "seed": args.seed,
        "seq_length": args.seq_length,
        "rounds": args.rounds,
        "torch_threads": 1,
        "cpu_count": os.cpu_count(),
        "ours_patches": {k: info[k].get("patches") for k in info if k.startswith("ours")},
        "results": results,
        "ratios": ratios,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
