"""The vision tower over TP ranks whose heads it cannot split: ``--vision-parallel tp`` (every TP
rank runs the whole tower on the whole micro-batch) vs ``dp`` (each encodes a cost-balanced
share of the images, features gathered back; ``models/vision_dp.py``), side by side.

A NaViL-2B-shaped tower scaled down to fit this machine: 23 heads (navil-2b's; they do not
divide TP 2) of 32 dims (width 736), MLP 4x, ``--depth`` blocks, with the connector to a 1,024
LLM width; one micro-batch of ``--images`` images of lognormal sizes (16x16 patches, 2x2
merge, multi-scale off), fp32 on CPU, forward + backward (the features' gradient a fixed random
tensor). 2 processes (TP2) of 1 thread each; the median over ``--repeats`` alternating runs,
rank 0. Writes benchmarks/results/vision_dp.json.

Example: ``OMP_NUM_THREADS=1 python benchmarks/bench_vision_dp.py``
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from megatron_navil.parallel.spawn import run_distributed  # noqa: E402


def _grids(images: int, seed: int) -> list[tuple[int, int]]:
    """Patch grids of ``images`` images with lognormal sides (one scale each)."""
    import numpy as np

    from megatron_navil.ops.geometry import ImageGeometry

    rng = np.random.default_rng(seed)
    g = ImageGeometry(min_patches=64, max_patches=1024, multi_scale=False)
    sides = np.clip(rng.lognormal(np.log(256.0), 0.6, (images, 2)), 64, 768).astype(int)
    return [g.grid(*g.scales(int(h), int(w))[0]) for h, w in sides]


def _bench(args: dict) -> dict:
    from megatron.core.transformer.module import MegatronModule

    from megatron_navil.config.model import VisionConfig
    from megatron_navil.models.connector import Connector
    from megatron_navil.models.tp import standalone_linear_config
    from megatron_navil.models.vision import VisionEncoder
    from megatron_navil.models.vision_dp import encode_data_parallel
    from megatron_navil.ops import vision_kwargs
    from megatron_navil.parallel import initialize
    from megatron_navil.testing import tiny_gpt as T

    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    initialize()
    group = torch.distributed.new_group([0, 1])
    cfg = VisionConfig(depth=args["depth"], width=736, mlp=2944, heads=23, window_size=None)
    config = standalone_linear_config()
    me = torch.distributed.new_group([torch.distributed.get_rank()])
    model = MegatronModule(config)
    model.vision_model = VisionEncoder(cfg, config, me)
    model.mlp1 = Connector(cfg.width, 1024, config, me)
    T.set_global_params([model], 3)
    grids = _grids(args["images"], 0)
    kw = vision_kwargs(grids, 2)
    cu = kw["vision_cu_seqlens"]
    gen = torch.Generator().manual_seed(1)
    patches = torch.randn(int(cu[-1]), 768, generator=gen)
    grad = torch.randn(int(cu[-1]) // 4, 1024, generator=gen)
    v = cfg
    cost = (6 * v.depth * (4 * v.width**2 + 2 * v.width * v.mlp), 12 * v.depth * v.width)

    def tp() -> None:  # the whole tower on the whole micro-batch, as every TP rank does today
        model.mlp1(model.vision_model(patches, kw["patch_positions"], cu)).backward(grad)

    def dp() -> None:
        out = encode_data_parallel(
            model.vision_model, model.mlp1, group, patches, kw["patch_positions"], cu, None,
            None, 2, cost, 1024,
        )  # fmt: skip
        out.backward(grad)

    times: dict[str, list[float]] = {"tp": [], "dp": []}
    for i in range(args["warmup"] + args["repeats"]):
        for name, fn in (("tp", tp), ("dp", dp)):
            torch.distributed.barrier()
            start = time.perf_counter()
            fn()
            torch.distributed.barrier()  # the step waits for the slower rank
            if i >= args["warmup"]:
                times[name].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return {
        "patches": int(cu[-1]),
        "segments": len(grids),
        **{f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depth", type=int, default=4, help="vision blocks")
    p.add_argument("--images", type=int, default=12, help="images in the micro-batch")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/vision_dp.json"))
    args = vars(p.parse_args(argv))
    out = args.pop("out")
    r = run_distributed(_bench, 2, args, timeout=1200)[0]
    ratio = r["dp_ms"] / r["tp_ms"]
    print(
        f"vision fwd+bwd, TP2, {r['segments']} images / {r['patches']:,} patches: tp "
        f"{r['tp_ms']:.0f} ms, dp {r['dp_ms']:.0f} ms: dp/tp = {ratio:.2f}x"
    )
    result = {"benchmark": "bench_vision_dp", **args, **r, "dp_over_tp": ratio,
              "host": platform.node()}  # fmt: skip
    Path(out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
