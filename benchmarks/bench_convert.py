"""Checkpoint export throughput and peak memory: tools/convert_to_hf.py vs the safetensors floor.

A random NaViL of about 1B parameters (``bench-1b``: vision 12 x 1024, LLM 8 layers of 2048
with 16 heads, FFN 5632, vocab 32000; fp32) is written once as a megatron dist checkpoint by
one rank (``checkpoint/store.py``). Then, each in a fresh process so peak RSS is its own:

* ours: ``tools/convert_to_hf.py`` (read every tensor from the dist checkpoint, remap, write
  sharded safetensors, fp32), GB/s = model bytes / wall time;
* floor: the same state dict (already in memory, not counted) saved with
  ``safetensors.torch.save_file`` and loaded back with ``load_file``: the bytes moved by plain
  safetensors, GB/s = model bytes / (save + load time).

Prints a table and writes JSON (``--json``, default benchmarks/results/convert.json).
Example: ``python benchmarks/bench_convert.py --work /tmp/bench_convert``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench_config():
    from megatron_navil.config.model import LanguageConfig, VisionConfig
    from megatron_navil.config.registry import get_config

    base = get_config("tiny")
    return dataclasses.replace(
        base,
        name="bench-1b",
        vision=VisionConfig(depth=12, width=1024, mlp=4096, heads=16),
        language=LanguageConfig(
            variant="qwen3",
            hidden=2048,
            layers=8,
            heads=16,
            kv_heads=8,
            head_dim=128,
            ffn=5632,
            vocab=32000,
            qk_norm=True,
        ),
    ).validate()


def _write_checkpoint(out: str) -> int:
    from megatron_navil.checkpoint.store import save
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize

    warnings.filterwarnings("ignore")
    groups = initialize()
    cfg = bench_config()
    ids = range(cfg.language.vocab - 12, cfg.language.vocab)
    (model,) = build_model(cfg, transformer_config(cfg), groups, special_ids=ids)
    save(out, 1, [model], None, {}, model_config=cfg)
    return sum(p.numel() for p in model.parameters())


def _floor(checkpoint: str, scratch: str) -> None:
    """Child process: global tensors into memory, then save_file + load_file timed."""
    import torch
    from safetensors.torch import load_file, save_file

    from megatron_navil.conversion.dist_reader import DistCheckpointReader

    reader = DistCheckpointReader(checkpoint)
    state = {k: reader.read(k) for k in reader.shapes}
    start = time.perf_counter()
    save_file(state, scratch)
    saved = time.perf_counter()
    loaded = load_file(scratch)  # memory-mapped: copy every byte out, as a real load does
    loaded = {k: torch.empty_like(t).copy_(t) for k, t in loaded.items()}
    end = time.perf_counter()
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"save_s": saved - start, "load_s": end - saved, "rss_mb": rss}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", default="/tmp/bench_convert", help="scratch directory (deleted)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "convert.json"))
    p.add_argument("--_floor", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._floor:
        _floor(*args._floor)
        return 0
    from megatron_navil.parallel.spawn import run_distributed

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    start = time.perf_counter()
    (params,) = run_distributed(_write_checkpoint, 1, str(work / "ckpt"), timeout=3600)
    print(
        f"wrote a {params / 1e9:.2f}B-parameter checkpoint in {time.perf_counter() - start:.0f} s"
    )
    nbytes = params * 4
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), "--checkpoint",
           str(work / "ckpt"), "--output", str(work / "hf"), "--dtype", "float32", "--quiet",
           "--special-token-ids", *map(str, range(32000 - 12, 32000))]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    ours_s = time.perf_counter() - start
    ours_rss = float(proc.stdout.split("peak RSS ")[1].split(" MB")[0])
    floor_cmd = [sys.executable, __file__, "--_floor", str(work / "ckpt" / "iter_0000001"),
                 str(work / "floor.safetensors")]  # fmt: skip
    floor = json.loads(subprocess.run(floor_cmd, capture_output=True, text=True, env=env,
                                      check=True).stdout.strip().splitlines()[-1])  # fmt: skip
    floor_s = floor["save_s"] + floor["load_s"]
    result = {
        "params": params,
        "bytes": nbytes,
        "ours": {"seconds": ours_s, "gb_per_s": nbytes / 1e9 / ours_s, "peak_rss_mb": ours_rss},
        "floor_safetensors": {
            "seconds": floor_s,
            "gb_per_s": nbytes / 1e9 / floor_s,
            "save_s": floor["save_s"],
            "load_s": floor["load_s"],
            "peak_rss_mb": floor["rss_mb"],
        },
        "ratio_floor_over_ours_time": ours_s / floor_s,
        "machine": f"{os.cpu_count()} cores",
    }
    print(f"{'candidate':<34}{'time s':>9}{'GB/s':>8}{'peak RSS MB':>13}")
    print(f"{'ours: dist ckpt -> HF (fp32)':<34}{ours_s:>9.1f}"
          f"{result['ours']['gb_per_s']:>8.3f}{ours_rss:>13.0f}")  # fmt: skip
    print(f"{'floor: safetensors save + load':<34}{floor_s:>9.1f}"
          f"{result['floor_safetensors']['gb_per_s']:>8.3f}{floor['rss_mb']:>13.0f}")  # fmt: skip
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
