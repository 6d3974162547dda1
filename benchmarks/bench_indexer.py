"""Indexer throughput: MB/s per worker and scaling from 1 to 2 workers; energon prepare as peer.

One run, the same seeded data for every candidate, everything in the page cache (CPU-bound):
  data     --images noise+gradient JPEGs (quality 90; megatron_navil.testing.loader_corpus),
           sides log-uniform in [--min-side, --max-side] (default 256..1024 px), each with an
           InternVL conversation (``{"id", "image", "conversations": [human "<image>\\n<prompt>",
           gpt "<caption>"]}``, one of four prompts, a 3..11 word caption), in two layouts:
           jsonl  conversations.jsonl + images/NNNNNN.jpg (the format users bring)
           tar    WebDataset tars of --per-unit samples each: ``key.jpg`` + ``key.json`` (the
                  same record without its ``image`` field)
  ours     tools/index_corpus.py build (in this process, --quiet), navil-2b image rules (with
           multi-scale), qwen3-chat, --samples-per-shard --per-unit (so there are
           images / per-unit work units for the workers to share; one tar = one unit),
           --workers 1 and 2, into a fresh output directory each time. Timed end to end: plan
           (reads every JSONL line / every tar member), every image decoded fully with Pillow,
           tokenization, patch geometry, shard writes (.bin/.idx, tmp + rename, fsync of the
           unit markers), manifest with the sha256 of every shard file. The outputs of 1 and 2
           workers are checked to be byte-identical (manifest checksums).
  peer     ``energon prepare TARDIR --non-interactive --split-ratio 1,0,0 --force-overwrite
           --no-progress --sample-type CrudeWebdataset --num-workers N`` (megatron-energon, called
           in this process through its click command) on the same tars, N = 1 and 2, each time
           from scratch (its previous .nv-meta/ and *.tar.idx removed first); plus the same with
           ``--media-metadata-by-extension``, with which it also decodes every image fully with
           Pillow (``image.load()``) to record width, height, format and mode. Plain prepare
           reads the tar headers and writes a per-tar offset index (``NNNNNN.tar.idx`` next to
           each tar) and an SQLite sample index (+ .info.json, split.yaml, dataset.yaml under
           .nv-meta/): no image decode, no tokenization, no copy of sample bytes, so its MB/s is
           that of a much smaller job. ``+media`` is the closest job to ours (both decode every
           image once); ours also tokenizes, computes the patch geometry of every scale and
           copies every sample into shards with checksums. Its sample count is read back from
           the SQLite index and checked. Left out, with the reason in the table and the JSON,
           when ``megatron.energon`` does not import or its prepare fails.
Units: MB = input bytes / 1e6 (jsonl: the JSONL file + the JPEGs it names; tar: the tar files),
the same for every candidate of a layout; MB/s/worker = MB/s / N; scaling = t(1 worker) /
t(2 workers) (2.0 is linear). Timing: each candidate runs once per round; rounds are interleaved
(ours jsonl w1, w2, ours tar w1, w2, energon ..., then again) so load changes on a shared
machine hit all alike; one untimed warm-up round first; best of --rounds kept (and the median).
The 1-minute load average is recorded before the run and after each round.

Prints a table; writes JSON (default benchmarks/results/indexer.json).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import shutil
import sqlite3
import statistics
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = (
    "Describe the image.",
    "What do you see in this picture?",
    "Write a short caption for this image.",
    "Which colours and shapes are shown?",
)


def write_conversations(captions_jsonl: Path) -> Path:
    """The caption pairs of ``captions_jsonl`` as InternVL conversations (next to it)."""
    out = captions_jsonl.parent / "conversations.jsonl"
    lines = []
    for i, line in enumerate(captions_jsonl.read_text().splitlines()):
        row = json.loads(line)
        conv = [
            {"from": "human", "value": f"<image>\n{PROMPTS[i % len(PROMPTS)]}"},
            {"from": "gpt", "value": row["caption"]},
        ]
        lines.append(json.dumps({"id": f"{i:06d}", "image": row["image"], "conversations": conv}))
    out.write_text("\n".join(lines) + "\n")
    return out


def write_tars(jsonl: Path, out: Path, per_tar: int) -> list[Path]:
    """The records of ``jsonl`` as WebDataset tars: ``key.jpg`` + ``key.json`` (no ``image``)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in jsonl.read_text().splitlines() if line]
    paths = []
    for t in range(0, len(rows), per_tar):
        path = out / f"{t // per_tar:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for row in rows[t : t + per_tar]:
                record = {k: v for k, v in row.items() if k != "image"}
                for ext, data in (
                    ("jpg", (jsonl.parent / row["image"]).read_bytes()),
                    ("json", json.dumps(record).encode()),
                ):
                    info = tarfile.TarInfo(f"{row['id']}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def energon_command() -> tuple[Callable | None, str]:
    """(the ``energon prepare`` click command, version) or (None, why it is unavailable)."""
    try:
        from importlib.metadata import version

        from megatron.energon.tools.prepare import command
    except Exception as exc:  # ImportError, or a dependency failing at import
        return None, f"megatron.energon does not import: {type(exc).__name__}: {exc}"[:300]
    return command, version("megatron-energon")


def run_energon(command: Callable, tardir: Path, workers: int, media: bool) -> dict:
    argv = [str(tardir), "--non-interactive", "--split-ratio", "1,0,0", "--force-overwrite"]
    argv += ["--no-progress", "--sample-type", "CrudeWebdataset", "--num-workers", str(workers)]
    if media:
        argv.append("--media-metadata-by-extension")
    shutil.rmtree(tardir / ".nv-meta", ignore_errors=True)  # a fresh prepare every time
    for p in tardir.glob("*.tar.idx"):
        p.unlink()
    with contextlib.redirect_stdout(io.StringIO()):
        command.main(argv, standalone_mode=False)
    with contextlib.closing(sqlite3.connect(tardir / ".nv-meta" / "index.sqlite")) as db:
        samples = db.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        media = None
        if "media_metadata" in tables:
            media = db.execute("SELECT COUNT(*) FROM media_metadata").fetchone()[0]
    return {"samples": samples, "media_metadata_rows": media}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Details (data, candidates, units, timing): see the module docstring.",
    )
    parser.add_argument("--images", type=int, default=300, help="number of images (300)")
    parser.add_argument("--seed", type=int, default=0, help="image generation seed (0)")
    parser.add_argument("--min-side", type=int, default=256, help="smallest side in px (256)")
    parser.add_argument("--max-side", type=int, default=1024, help="largest side in px (1024)")
    parser.add_argument(
        "--per-unit",
        type=int,
        default=25,
        help="records per work unit (--samples-per-shard) and samples per tar (25)",
    )
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; best kept (3)")
    parser.add_argument(
        "--no-energon", action="store_true", help="leave out the energon prepare peer"
    )
    parser.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="where images, tars and outputs go (default: a temporary directory, removed)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "indexer.json",
        help="where to write the JSON results (default benchmarks/results/indexer.json)",
    )
    args = parser.parse_args(argv)
    for name in ("images", "rounds", "min_side", "max_side", "per_unit"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.min_side > args.max_side:
        parser.error(f"--min-side {args.min_side} > --max-side {args.max_side}")
    from megatron_navil.ops import native_available

    if not native_available():
        parser.error("megatron_navil._C is not built (python setup.py build_ext --inplace)")
    with tempfile.TemporaryDirectory() as tmp:
        return _run(args, args.workdir or Path(tmp))


def _load1() -> float:
    return os.getloadavg()[0]


def _run(args: argparse.Namespace, work: Path) -> int:
    import torch

    from megatron_navil.testing.loader_corpus import _index_tool, noise_jpegs
    from megatron_navil.testing.synthetic_corpus import train_tokenizer, vocabulary_text

    load_before = _load1()
    start = time.perf_counter()
    captions = noise_jpegs(
        work / "src", args.images, args.seed, args.min_side, args.max_side, quality=90
    )
    jsonl = write_conversations(captions)
    tardir = work / "tars"
    tars = write_tars(jsonl, tardir, args.per_unit)
    tok_path = train_tokenizer(vocabulary_text(), work / "tokenizer.json")
    jpeg_bytes = sum(p.stat().st_size for p in (work / "src" / "images").iterdir())
    mb = {
        "jsonl": (jsonl.stat().st_size + jpeg_bytes) / 1e6,
        "tar": sum(p.stat().st_size for p in tars) / 1e6,
    }
    print(
        f"prepared {args.images} JPEGs ({jpeg_bytes / 1e6:.1f} MB), {len(tars)} tars, in "
        f"{time.perf_counter() - start:.1f} s"
    )
    tool = _index_tool()
    common = ["--tokenizer", str(tok_path), "--config", "navil-2b", "--template", "qwen3-chat"]
    common += ["--samples-per-shard", str(args.per_unit), "--quiet"]

    def ours(layout: str, workers: int) -> Callable[[], dict]:
        src = jsonl if layout == "jsonl" else tardir
        out = work / f"out_{layout}_w{workers}"

        def run() -> dict:
            shutil.rmtree(out, ignore_errors=True)
            argv = ["build", "--input", str(src), "--output", str(out), *common]
            argv += ["--workers", str(workers)]
            with contextlib.redirect_stdout(io.StringIO()) as text:
                rc = tool.main(argv)
            if rc != 0:
                raise RuntimeError(f"index_corpus.py exited {rc}: {text.getvalue()[-500:]}")
            m = json.loads((out / "manifest.json").read_text())
            return {
                "samples": m["counts"]["samples"],
                "skipped": m["counts"]["skipped"],
                "shards": m["counts"]["shards"],
                "bin_mb": m["counts"]["bin_bytes"] / 1e6,
                "checksums": [s["bin_sha256"] + s["idx_sha256"] for s in m["shards"]],
            }

        return run

    candidates: dict[str, tuple[str, int, Callable[[], dict]]] = {}
    for layout in ("jsonl", "tar"):
        for w in (1, 2):
            candidates[f"ours {layout}, {w} worker{'s' * (w > 1)}"] = (layout, w, ours(layout, w))
    energon, energon_info = (None, "left out (--no-energon)")
    if not args.no_energon:
        energon, energon_info = energon_command()
    if energon is not None:
        for media in (False, True):
            for w in (1, 2):
                name = f"energon prepare{' +media' if media else ''}, {w} worker{'s' * (w > 1)}"
                candidates[name] = (
                    "tar",
                    w,
                    lambda w=w, media=media, cmd=energon: run_energon(cmd, tardir, w, media),
                )
    info: dict[str, dict] = {}
    for name, (_, _, fn) in list(candidates.items()):  # warm-up: imports, page cache, ...
        if name not in candidates:
            continue  # energon candidates after an energon failure
        try:
            info[name] = fn()
        except Exception as exc:
            if not name.startswith("energon") or energon is None:
                raise
            energon_info = f"energon prepare failed: {type(exc).__name__}: {exc}"[:300]
            energon = None
            candidates = {k: v for k, v in candidates.items() if not k.startswith("energon")}
    for name in candidates:
        if name.startswith("energon") and info[name]["samples"] != args.images:
            raise RuntimeError(f"{name}: {info[name]['samples']} samples of {args.images}")
    print(f"energon: {energon_info}")
    times: dict[str, list[float]] = {k: [] for k in candidates}
    loads = []
    for r in range(args.rounds):
        for name, (_, _, fn) in candidates.items():
            t0 = time.perf_counter()
            info[name] = fn()
            times[name].append(time.perf_counter() - t0)
        loads.append(_load1())
        print(f"round {r + 1}/{args.rounds} done, load average (1 min) {loads[-1]:.1f}")
    for layout in ("jsonl", "tar"):
        a, b = info[f"ours {layout}, 1 worker"], info[f"ours {layout}, 2 workers"]
        if a["checksums"] != b["checksums"]:
            raise RuntimeError(f"{layout}: the 2-worker index differs from the 1-worker one")
        if a["samples"] != args.images:
            raise RuntimeError(f"{layout}: {a['samples']} samples written of {args.images}")

    results = []
    for name, (layout, w, _) in candidates.items():
        best, med = min(times[name]), statistics.median(times[name])
        row = {
            "name": name,
            "layout": layout,
            "workers": w,
            "input_mb": mb[layout],
            "best_seconds": best,
            "median_seconds": med,
            "mb_per_s": mb[layout] / best,
            "mb_per_s_per_worker": mb[layout] / best / w,
            "mb_per_s_median": mb[layout] / med,
            "samples_per_s": args.images / best,
        }
        extra = {k: v for k, v in info[name].items() if k != "checksums" and v is not None}
        results.append({**row, **extra})
    by = {r["name"]: r for r in results}
    scaling = {}
    for key in ("ours jsonl", "ours tar", "energon prepare", "energon prepare +media"):
        one, two = by.get(f"{key}, 1 worker"), by.get(f"{key}, 2 workers")
        if one and two:
            scaling[f"{key}: t(1 worker) / t(2 workers)"] = (
                one["best_seconds"] / two["best_seconds"]
            )
    ratios = {}
    for w in ("1 worker", "2 workers"):
        for peer in ("energon prepare +media", "energon prepare"):
            ours_tar, other = by.get(f"ours tar, {w}"), by.get(f"{peer}, {w}")
            if ours_tar and other:
                ratios[f"ours tar / {peer}, {w} (MB/s)"] = ours_tar["mb_per_s"] / other["mb_per_s"]

    print(
        f"{args.images} JPEGs {args.min_side}..{args.max_side} px ({jpeg_bytes / 1e6:.1f} MB), "
        f"{args.per_unit} records per unit/tar, best of {args.rounds} interleaved rounds, "
        f"os.cpu_count() {os.cpu_count()}, load average (1 min) {load_before:.1f} before, "
        f"{', '.join(f'{x:.1f}' for x in loads)} after each round"
    )
    head = f"{'candidate':<36} {'MB':>6} {'best s':>7} {'median s':>8} {'MB/s':>7} "
    print(head + f"{'MB/s/worker':>11} {'samples/s':>9}")
    for r in results:
        print(
            f"{r['name']:<36} {r['input_mb']:>6.1f} {r['best_seconds']:>7.2f} "
            f"{r['median_seconds']:>8.2f} {r['mb_per_s']:>7.1f} {r['mb_per_s_per_worker']:>11.1f} "
            f"{r['samples_per_s']:>9.1f}"
        )
    for k, v in scaling.items():
        print(f"scaling {k:<48} {v:>5.2f}")
    for k, v in ratios.items():
        print(f"ratio {k:<50} {v:>5.2f}")
    if energon is None:
        print(f"energon prepare: not run: {energon_info}")
    print("outputs of 1 and 2 workers byte-identical: yes (jsonl and tar)")
    payload = {
        "benchmark": "indexer",
        "images": args.images,
        "sides": [args.min_side, args.max_side],
        "jpeg_mb": jpeg_bytes / 1e6,
        "per_unit": args.per_unit,
        "tars": len(tars),
        "seed": args.seed,
        "rounds": args.rounds,
        "cpu_count": os.cpu_count(),
        "load_average_1min": {"before": load_before, "after_each_round": loads},
        "energon": energon_info if energon is not None else {"not_run": energon_info},
        "notes": {
            "ours": "decodes every image fully (Pillow load), tokenizes, patch geometry of every "
            "VMP scale, copies samples into .bin/.idx shards, sha256 of every shard",
            "energon prepare": "tar headers -> per-tar .tar.idx + SQLite sample index; no image "
            "decode, no tokenization, no copy of sample bytes",
            "energon prepare +media": "as energon prepare, and decodes every image fully "
            "(Pillow image.load()) to store width/height/format/mode in the SQLite index",
        },
        "results": results,
        "scaling": scaling,
        "ratios": ratios,
        "workers_outputs_identical": True,
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
