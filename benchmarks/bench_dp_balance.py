"""Data-parallel balance: the slowest rank's cost over the mean, contiguous shares vs the deal by
cost (``--balance-data``), with and without the pack planner's cost budget
(``--max-sequence-cost``), simulated over ``--steps`` global steps.

The corpus: ``megatron_navil.testing.pack_data.image_mix_counts`` at NaViL-2B settings
(16x16 patches, 2x2 merge, 256..24576 patches per image, multi-scale on): ``lognormal`` image
sides (64..2048 px) and ``canvas`` (Tux Paint-like fixed canvas sizes); 0-3 images per sample.
Packed into 16,384-token sequences with the S2 patch budget. A sequence's cost is its model
FLOPs (``training.flops.cost_model`` of navil-2b: the FLOP counter's formulas). A rank's cost
in a step is the sum over its ``--micro-batches`` sequences; per step, max over ranks / mean
over ranks; the table gives its mean and 99th percentile over the steps. A sequence's cost
includes its padding (every sequence is computed at its full length), so the cost budget's
extra padding shows: "useful" is the samples' FLOPs over (ranks x the slowest rank's cost),
summed over the steps: 1.0 is no padding and no waiting. The split is the sampler's own
(``data.sampler.balanced_shares``; tests/unit/test_data_balance.py checks the sampler hands out
exactly these shares).

Example: ``python benchmarks/bench_dp_balance.py`` (writes benchmarks/results/dp_balance.json)
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from megatron_navil.config.registry import get_config  # noqa: E402
from megatron_navil.data.packing import SequenceStream  # noqa: E402
from megatron_navil.data.sampler import balanced_shares  # noqa: E402
from megatron_navil.ops.geometry import ImageGeometry  # noqa: E402
from megatron_navil.planning.layout import default_patches  # noqa: E402
from megatron_navil.testing.pack_data import image_mix_counts  # noqa: E402
from megatron_navil.training.flops import cost_model  # noqa: E402

SEQ = 16_384


def simulate(
    counts: dict[str, np.ndarray], dp: int, micro: int, steps: int, budget: float | None, seed: int
) -> dict[str, float]:
    """max/mean per-rank cost over ``steps`` steps, contiguous and dealt by cost."""
    cfg = get_config("navil-2b")
    model = cost_model(cfg)
    flops = model.flops(counts["llm_tokens"], counts["patches"], counts["patches_sq"])
    costs = np.maximum(1, np.rint(flops / model.unit)).astype(np.int64)
    reference = float(model.flops([SEQ], [0], [0])[0])  # one full-length text sample
    stream = SequenceStream(
        [counts["llm_tokens"]], [counts["patches"]], SEQ, default_patches("s2", SEQ, 2),
        seed=seed, costs=[costs], pad_cost=model.padding,
        max_cost=None if budget is None else model.units(budget * reference),
    )  # fmt: skip
    batch = dp * micro
    it = stream.iterate()
    ratios: dict[str, list[float]] = {"contiguous": [], "balanced": []}
    slowest = {"contiguous": 0.0, "balanced": 0.0}
    seq_costs, useful = [], 0.0
    linear, square = model.padding
    for _ in range(steps):
        positions = [pos for pos, _ in itertools.islice(it, batch)]
        c = [stream.sequence_cost(pos) for pos in positions]  # padding included
        for pos, cost in zip(positions, c, strict=True):
            free = SEQ - int(stream.window_plan(pos.epoch, pos.window).tokens[pos.offset])
            useful += cost - (linear * free + square * free * free)
        seq_costs += c
        contiguous = [c[r * micro : (r + 1) * micro] for r in range(dp)]
        dealt = [[c[j] for j in share] for share in balanced_shares(c, dp)]
        for name, shares in (("contiguous", contiguous), ("balanced", dealt)):
            totals = np.array([sum(s) for s in shares], np.float64)
            ratios[name].append(float(totals.max() / totals.mean()))
            slowest[name] += float(totals.max())
    out = {f"{k}_mean": float(np.mean(v)) for k, v in ratios.items()}
    out.update({f"{k}_p99": float(np.percentile(v, 99)) for k, v in ratios.items()})
    # samples' FLOPs per unit of step time (the slowest rank, all ranks waiting for it)
    out.update({f"{k}_useful": useful / (dp * v) for k, v in slowest.items()})
    out["sequences_per_epoch"] = len(stream.epoch_sequences(0))
    out["sequence_cost_cv"] = float(np.std(seq_costs) / np.mean(seq_costs))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=1000, help="global steps simulated")
    p.add_argument("--micro-batches", type=int, default=4, help="sequences per rank per step")
    p.add_argument("--dp", type=int, nargs="+", default=[8, 64], help="data-parallel sizes")
    p.add_argument(
        "--budgets", type=float, nargs="+", default=[0.0, 1.5, 1.0],
        help="--max-sequence-cost values (0: none), multiples of a 16,384-token text sample",
    )  # fmt: skip
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/dp_balance.json"))
    args = p.parse_args(argv)
    geometry = ImageGeometry.of_config(get_config("navil-2b"))
    rows = []
    start = time.perf_counter()
    for mix in ("lognormal", "canvas"):
        need = max(args.dp) * args.micro_batches * args.steps * 16  # samples (about 12 a seq)
        counts = image_mix_counts(need, mix, seed=0, geometry=geometry)
        for dp in args.dp:
            for budget in args.budgets:
                r = simulate(counts, dp, args.micro_batches, args.steps, budget or None, seed=0)
                rows.append({"mix": mix, "dp": dp, "budget": budget or None, **r})
                print(
                    f"{mix:9s} DP{dp:<3d} budget {budget or '-':>4}: max/mean contiguous "
                    f"{r['contiguous_mean']:.3f} (p99 {r['contiguous_p99']:.3f}) -> balanced "
                    f"{r['balanced_mean']:.3f} (p99 {r['balanced_p99']:.3f}); useful share of the "
                    f"step {r['contiguous_useful']:.3f} -> {r['balanced_useful']:.3f}; "
                    f"sequences/epoch {r['sequences_per_epoch']:,}",
                    flush=True,
                )
    result = {
        "benchmark": "bench_dp_balance",
        "steps": args.steps,
        "micro_batches": args.micro_batches,
        "seq_length": SEQ,
        "model": "navil-2b",
        "rows": rows,
        "seconds": round(time.perf_counter() - start, 1),
        "host": platform.node(),
    }
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
