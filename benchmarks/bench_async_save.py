"""How long a checkpoint save holds up training: synchronous vs ``--async-save``.

A random NaViL of about 140M parameters (``bench-140m``: vision 4 x 512, LLM 6 layers of 768
with a text and a visual expert each, vocab 32000; fp32, the distributed AdamW) on 2 CPU ranks
(DP2) saves ``--saves`` checkpoints (model + optimizer, ~1.7 GB each), one after a training
step each, and runs ``--steps-between`` steps after every save. Reported per mode: the seconds
the loop is inside ``store.save`` (sync: the whole write; async: planning, the common state,
the RNG files and the fork), the seconds inside the per-step finalize polls and the final wait
(async only), and the mean step time in between (async: while the writer competes for the
cores), each the median over saves, rank 0. Both modes' checkpoints are the same data
(tests/distributed/test_async_save.py checks bit-identity).

Prints a table and writes JSON (``--json``, default benchmarks/results/async_save.json).
Example: ``python benchmarks/bench_async_save.py --saves 3``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def bench_config() -> Any:
    from megatron_navil.config.model import LanguageConfig, VisionConfig
    from megatron_navil.config.registry import get_config

    return dataclasses.replace(
        get_config("tiny"),
        name="bench-140m",
        vision=VisionConfig(depth=4, width=512, mlp=2048, heads=8),
        language=LanguageConfig(
            variant="qwen3", hidden=768, layers=6, heads=12, kv_heads=4, head_dim=64, ffn=2048,
            vocab=32000, qk_norm=True,
        ),
    ).validate()  # fmt: skip


def _rank(root: str, saves: int, steps_between: int) -> dict:
    import warnings

    import torch

    from megatron_navil.checkpoint.async_save import AsyncSaves
    from megatron_navil.checkpoint.store import save
    from megatron_navil.testing import navil_run as N

    warnings.filterwarnings("ignore")
    cfg = bench_config()
    spec = N.BatchSpec(special_ids=tuple(range(cfg.language.vocab - 12, cfg.language.vocab)))
    run = N.setup_run(cfg, dict(), spec=spec, optimizer="adam", distributed_optimizer=True)
    params = sum(p.numel() for c in run.chunks for p in c.parameters())
    run.step(batch_seed=0)  # warm-up, optimizer state exists
    out: dict[str, Any] = {"params": params}
    for mode in ("sync", "async"):
        saves_ = AsyncSaves() if mode == "async" else None
        in_save, in_finalize, step_s = [], [], []
        for k in range(saves):
            run.step(batch_seed=k + 1)
            torch.distributed.barrier()
            began = time.perf_counter()
            save(Path(root) / mode, k + 1, run.chunks, run.optimizer, {}, 1, None, saves_)
            in_save.append(time.perf_counter() - began)
            polls = 0.0
            for s in range(steps_between):
                began = time.perf_counter()
                run.step(batch_seed=100 + s)
                step_s.append(time.perf_counter() - began)
                if saves_ is not None:
                    began = time.perf_counter()
                    saves_.finalize(blocking=False)
                    polls += time.perf_counter() - began
            if saves_ is not None:
                began = time.perf_counter()
                saves_.wait()
                polls += time.perf_counter() - began
            in_finalize.append(polls)
        out[mode] = {
            "in_save_s": statistics.median(in_save),
            "in_finalize_s": statistics.median(in_finalize),
            "blocked_s": statistics.median(
                a + b for a, b in zip(in_save, in_finalize, strict=True)
            ),
            "step_s": statistics.mean(step_s),
        }
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--saves", type=int, default=3, help="checkpoints per mode")
    p.add_argument("--steps-between", type=int, default=4, help="training steps after a save")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "async_save.json"))
    args = p.parse_args()
    from megatron_navil.parallel.spawn import run_distributed

    with tempfile.TemporaryDirectory() as root:
        r = run_distributed(_rank, 2, root, args.saves, args.steps_between, timeout=3600)[0]
    print(f"bench-140m: {r['params']:,} parameters, DP2 on CPU, {args.saves} saves per mode")
    print(f"{'mode':6} {'in save()':>10} {'finalize':>10} {'blocked':>10} {'step (mean)':>12}")
    for mode in ("sync", "async"):
        m = r[mode]
        print(f"{mode:6} {m['in_save_s']:10.2f} {m['in_finalize_s']:10.2f} "
              f"{m['blocked_s']:10.2f} {m['step_s']:12.2f}")  # fmt: skip
    run = {"config": "bench-140m", "ranks": 2, "saves": args.saves,
           "steps_between": args.steps_between}  # fmt: skip
    Path(args.json).write_text(json.dumps({"run": run, **r}, indent=2) + "\n")


if __name__ == "__main__":
    main()
