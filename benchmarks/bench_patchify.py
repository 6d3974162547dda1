"""patchify_batch (C++) vs its PyTorch reference vs transformers' Qwen2-VL processor, and the floor.

One run, the same 200 seeded images for every candidate:
  sizes   area log-uniform between 64x64 and 2048x1536 pixels, aspect ratio log-uniform in
          [1/2, 2] (sides clipped to 64..2048 x 64..1536, the two extremes always included):
          mostly small and medium images with a tail of large ones, ~half the sides not
          multiples of 32
  pixels  smooth per-channel gradients + a low-frequency wave + uniform noise (+-24), uint8
          HWC, so the data is neither constant nor pure noise
Candidates (float32 output unless said):
  cpp        megatron_navil.ops.patchify_batch (the compiled megatron_navil._C op), float32
             and bfloat16, with torch's thread count at the machine default and at 1
  reference  megatron_navil.ops.patchify_batch_reference (pure PyTorch, same bits)
  hf         transformers' Qwen2VLImageProcessorPil as NaViL: patch 16, merge 2, temporal
             patch 1, mean = std = 0.5, max_pixels = 24576 * 16 * 16 (NaViL's upper bound) and
             min_pixels = 64 * 64 so that it does not upscale the small images (NaViL's lower
             bound is applied by smart_resize before patchify, not by patchify). It does the
             comparable job, not bitwise the same one: where a side is not a multiple of 32 it
             resamples the image to the nearest multiples of 32 (bicubic) where NaViL zero-pads,
             so its output can have fewer or more rows. Its pixel_values are float32.
  floor      (bytes read + bytes written by the C++ op) / copy bandwidth, the bandwidth being
             2 x size / time of numpy copying a 256 MiB buffer into an already-touched one
             (best of several). The C++ op allocates a fresh output each call; the first touch
             of fresh pages is part of its time (also reported: the same copy into a freshly
             allocated destination).
Units: MB/s = input uint8 bytes (sum of H * W * 3 over the images) / 1e6 per second, the
same for every candidate; images/s = 200 / time. Times: best of --repeats (the candidates'
runs interleaved, so load changes on a shared machine hit them alike), after one warm-up.

Prints a table and the ratios; writes JSON (default benchmarks/results/patchify.json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

MIN_SIDE, MAX_H, MAX_W = 64, 1536, 2048


def make_images(count: int, seed: int) -> list[np.ndarray]:
    """The benchmark's images (see module doc): deterministic for a given count and seed."""
    rng = np.random.default_rng(seed)
    lo, hi = math.log(MIN_SIDE * MIN_SIDE), math.log(MAX_H * MAX_W)
    shapes = [(MIN_SIDE, MIN_SIDE), (MAX_H, MAX_W)]
    while len(shapes) < count:
        area = math.exp(rng.uniform(lo, hi))
        aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))  # w / h
        h = round(min(MAX_H, max(MIN_SIDE, math.sqrt(area / aspect))))
        w = round(min(MAX_W, max(MIN_SIDE, math.sqrt(area * aspect))))
        shapes.append((h, w))
    images = []
    for h, w in shapes[:count]:
        y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
        x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
        a, b, f = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3), rng.uniform(1, 6, 3)
        base = 128 + 60 * (a * y + b * x) + 30 * np.sin(f * 6.283 * (x + 0.7 * y))
        noise = rng.integers(-24, 25, (h, w, 3), dtype=np.int16)
        images.append(np.clip(base + noise, 0, 255).astype(np.uint8))
    return images


def best_times(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Best wall time (s) of each function over `repeats` interleaved rounds, after a warm-up."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: min(t) for name, t in times.items()}


def copy_bandwidth(mib: int, repeats: int) -> tuple[float, float]:
    """(warm, fresh) copy bandwidth in bytes/s counting read + write (2 x size per copy):
    into one destination reused (pages already touched) and into a new one each time."""
    src = np.full(mib << 20, 7, np.uint8)
    dst = np.empty_like(src)
    np.copyto(dst, src)
    warm = fresh = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        warm = min(warm, time.perf_counter() - start)
        start = time.perf_counter()
        new = np.empty_like(src)
        np.copyto(new, src)
        fresh = min(fresh, time.perf_counter() - start)
        del new
    return 2 * src.nbytes / warm, 2 * src.nbytes / fresh


def hf_processor():
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    return Qwen2VLImageProcessorPil(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=1,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        min_pixels=MIN_SIDE * MIN_SIDE,
        max_pixels=24576 * 16 * 16,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Details (image mix, peer configuration, floor, units): see the module docstring.",
    )
    parser.add_argument("--images", type=int, default=200, help="number of images (default 200)")
    parser.add_argument("--seed", type=int, default=0, help="image generation seed (default 0)")
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed rounds of the C++ op; best is kept (5)"
    )
    parser.add_argument(
        "--slow-repeats",
        type=int,
        default=2,
        help="timed rounds of the reference and the HF processor; best is kept (2)",
    )
    parser.add_argument(
        "--copy-mib", type=int, default=256, help="size of the copy-bandwidth buffer in MiB (256)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=Path(__file__).resolve().parent / "results" / "patchify.json",
        help="where to write the JSON results (default benchmarks/results/patchify.json)",
    )
    args = parser.parse_args(argv)
    for name in ("images", "repeats", "slow_repeats", "copy_mib"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    from megatron_navil.ops import native_available, patchify_batch, patchify_batch_reference

    if not native_available():
        parser.error("megatron_navil._C is not built (python setup.py build_ext --inplace)")
    threads = torch.get_num_threads()
    images = make_images(args.images, args.seed)
    in_bytes = sum(img.nbytes for img in images)
    multiple_32 = sum(img.shape[0] % 32 == 0 and img.shape[1] % 32 == 0 for img in images)
    out32, _ = patchify_batch(images)
    rows = out32.shape[0]
    del out32

    def with_threads(n: int, fn: Callable[[], object]) -> Callable[[], object]:
        def run() -> object:
            torch.set_num_threads(n)
            try:
                return fn()
            finally:
                torch.set_num_threads(threads)

        return run

    cpp = {
        f"cpp fp32 ({threads} thr)": lambda: patchify_batch(images),
        f"cpp bf16 ({threads} thr)": lambda: patchify_batch(images, dtype=torch.bfloat16),
    }
    if threads != 1:
        cpp["cpp fp32 (1 thr)"] = with_threads(1, lambda: patchify_batch(images))
        cpp["cpp bf16 (1 thr)"] = with_threads(
            1, lambda: patchify_batch(images, dtype=torch.bfloat16)
        )
    times = best_times(cpp, args.repeats)

    proc = hf_processor()
    hf_out = proc(images=images, return_tensors="pt", input_data_format="channels_last")
    hf_rows = int(hf_out["pixel_values"].shape[0])
    del hf_out
    times.update(
        best_times(
            {
                f"reference fp32 ({threads} thr)": lambda: patchify_batch_reference(images),
                f"hf Qwen2VLImageProcessorPil ({threads} thr)": lambda: proc(
                    images=images, return_tensors="pt", input_data_format="channels_last"
                ),
            },
            args.slow_repeats,
        )
    )
    warm_bw, fresh_bw = copy_bandwidth(args.copy_mib, args.repeats)

    dim = 3 * 16 * 16
    written = {"fp32": rows * dim * 4, "bf16": rows * dim * 2}
    results = []
    for name, sec in times.items():
        results.append(
            {
                "name": name,
                "seconds": sec,
                "images_per_s": len(images) / sec,
                "mb_per_s": in_bytes / 1e6 / sec,
            }
        )
    cpp32 = times[f"cpp fp32 ({threads} thr)"]
    cpp16 = times[f"cpp bf16 ({threads} thr)"]
    floor = {k: (in_bytes + w) / warm_bw for k, w in written.items()}
    floor_fresh = {k: (in_bytes + w) / fresh_bw for k, w in written.items()}
    ratios = {
        "hf / cpp fp32 (speed-up, goal >= 10)": times[
            f"hf Qwen2VLImageProcessorPil ({threads} thr)"
        ]
        / cpp32,
        "reference / cpp fp32 (speed-up)": times[f"reference fp32 ({threads} thr)"] / cpp32,
        "cpp fp32 / floor (goal <= 2)": cpp32 / floor["fp32"],
        "cpp bf16 / floor (goal <= 2)": cpp16 / floor["bf16"],
        "cpp fp32 / floor with fresh destination pages": cpp32 / floor_fresh["fp32"],
        "cpp bf16 / floor with fresh destination pages": cpp16 / floor_fresh["bf16"],
    }

    print(
        f"{len(images)} images, {in_bytes / 1e6:.1f} MB uint8 in, {rows} patches out "
        f"({multiple_32} images with both sides multiples of 32; HF output {hf_rows} rows after "
        f"its resampling); torch threads {threads} (os.cpu_count() {os.cpu_count()}); "
        f"best of {args.repeats} (C++) / {args.slow_repeats} (reference, HF)"
    )
    print(f"{'candidate':<42} {'time (ms)':>10} {'images/s':>10} {'MB/s':>10}")
    for r in results:
        print(
            f"{r['name']:<42} {r['seconds'] * 1e3:>10.1f} {r['images_per_s']:>10.1f} "
            f"{r['mb_per_s']:>10.1f}"
        )
    for k in ("fp32", "bf16"):
        print(
            f"{'floor ' + k + ' (copy bandwidth)':<42} {floor[k] * 1e3:>10.1f} "
            f"{len(images) / floor[k]:>10.1f} {in_bytes / 1e6 / floor[k]:>10.1f}"
        )
    print(
        f"copy bandwidth (read + write): {warm_bw / 1e9:.1f} GB/s into touched pages, "
        f"{fresh_bw / 1e9:.1f} GB/s into fresh pages ({args.copy_mib} MiB, numpy copyto)"
    )
    for k, v in ratios.items():
        print(f"{k:<48} {v:>8.2f}")

    payload = {
        "benchmark": "patchify",
        "images": len(images),
        "seed": args.seed,
        "input_mb": in_bytes / 1e6,
        "patches": rows,
        "hf_rows": hf_rows,
        "images_multiple_of_32": multiple_32,
        "torch_threads": threads,
        "cpu_count": os.cpu_count(),
        "timing": f"best of {args.repeats} (C++), {args.slow_repeats} (reference, HF)",
        "mb_definition": "input uint8 bytes (sum H*W*3) / 1e6 per second",
        "copy_bandwidth_gb_s": {"warm": warm_bw / 1e9, "fresh": fresh_bw / 1e9},
        "floor_seconds": floor,
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
