"""Data-parallel balance, measured: DP4 training on CPU with a skewed corpus, mean step time
with ``--balance-data off`` (contiguous shares) vs ``on`` (the global batch dealt by cost).

The model: the tiny config with a heavier vision tower (width 128, 4 blocks, up to 1,024
patches per image), so a sequence's cost depends on its images. The corpus: a blend of large
noise JPEGs (256..1024 px, caption pairs) and short text conversations, indexed with the real
indexer; sequences of 2,048 tokens, 4 micro-batches per rank, ``--nproc`` processes
(``torchrun --nproc-per-node``) on this machine. The two modes run alternately
``--rounds`` times, ``--steps`` steps each; per run the mean ``step_seconds`` of the steps
after the first two, and the mean ``dp_spread`` (slowest rank's compute over the mean, from
``progress.txt``). Writes benchmarks/results/dp_balance_run_dp<nproc>.json.

Example: ``python benchmarks/bench_dp_balance_run.py``
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def corpus(root: Path) -> tuple[Path, Path, Path]:
    """(config file, image corpus, text corpus) under ``root``."""
    import numpy as np

    from megatron_navil.config.io import write_config
    from megatron_navil.config.registry import get_config
    from megatron_navil.testing.loader_corpus import index, noise_jpegs
    from megatron_navil.testing.synthetic_corpus import write_corpus

    tiny = get_config("tiny")
    vision = dataclasses.replace(tiny.vision, width=128, depth=4, heads=4, mlp=512)
    image = dataclasses.replace(tiny.image, max_patches=1024)
    cfg = tiny.replace(name="tiny-heavy-vision", vision=vision, image=image).validate()
    (root / "config").mkdir()
    config = write_config(root / "config", cfg)
    written = write_corpus(root / "src", num_train=8, num_val=0, seed=1)
    photos = noise_jpegs(root / "photos_src", 64, seed=2, min_side=256, max_side=1024)
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "red", "circle", "count", "two"]
    rows = []
    for i in range(600):
        answer = " ".join(rng.choice(words, size=int(rng.integers(20, 200))))
        conv = [{"from": "human", "value": "say"}, {"from": "gpt", "value": answer}]
        rows.append(json.dumps({"id": i, "conversations": conv}))
    (root / "text.jsonl").write_text("\n".join(rows) + "\n")
    common = ("--config", str(config), "--template", "qwen3-chat", "--max-tokens", "2048")
    tok = written["tokenizer"]
    return (
        config,
        index([photos], root / "photos", tok, *common),
        index([root / "text.jsonl"], root / "text", tok, *common),
    )


def run(config: Path, data: list[Path], log: Path, balance: str, steps: int, nproc: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")}
    env["OMP_NUM_THREADS"] = "1"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        "--nproc-per-node", str(nproc), "-m", "megatron_navil.train", "--config", str(config),
        "--data", *map(str, data), "--steps", str(steps), "--warmup", "1",
        "--seq-length", "2048", "--global-batch", str(4 * nproc),
        "--log-dir", str(log), "--no-progress", "--balance-data", balance,
    ]  # fmt: skip
    subprocess.run(cmd, check=True, env=env, capture_output=True, text=True, timeout=3600)
    lines = [json.loads(x) for x in (log / "progress.txt").read_text().splitlines()]
    lines = [x for x in lines if "loss" in x][2:]
    return {
        "step_seconds": statistics.mean(x["step_seconds"] for x in lines),
        "dp_spread": statistics.mean(x["dp_spread"] for x in lines),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--nproc", type=int, default=4, help="data-parallel ranks (processes)")
    p.add_argument("--out", help="JSON result (default: benchmarks/results/"
                   "dp_balance_run_dp<nproc>.json)")  # fmt: skip
    args = p.parse_args(argv)
    args.out = args.out or str(ROOT / f"benchmarks/results/dp_balance_run_dp{args.nproc}.json")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        config, photos, text = corpus(root)
        runs: dict[str, list[dict]] = {"off": [], "on": []}
        for r in range(args.rounds):
            for mode in ("off", "on"):
                log = root / f"log-{mode}-{r}"
                out = run(config, [photos, text], log, mode, args.steps, args.nproc)
                runs[mode].append(out)
                print(f"round {r} balance {mode}: {out}", flush=True)
    summary = {
        mode: {k: statistics.mean(x[k] for x in v) for k in ("step_seconds", "dp_spread")}
        for mode, v in runs.items()
    }
    ratio = summary["on"]["step_seconds"] / summary["off"]["step_seconds"]
    print(f"mean step: off {summary['off']['step_seconds']:.2f} s, on "
          f"{summary['on']['step_seconds']:.2f} s (on/off {ratio:.2f}x); dp_spread off "
          f"{summary['off']['dp_spread']:.2f}, on {summary['on']['dp_spread']:.2f}")  # fmt: skip
    result = {"benchmark": "bench_dp_balance_run", "steps": args.steps, "rounds": args.rounds,
              "nproc": args.nproc,
              "runs": runs, "summary": summary, "on_over_off": ratio,
              "load_average": os.getloadavg(), "host": platform.node()}  # fmt: skip
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
