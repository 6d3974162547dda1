"""Sequence pack planner: C++ (megatron_navil._C) vs the pure-Python reference, side by side.

Both plan the same realistic synthetic corpus (megatron_navil/testing/pack_data.py: lognormal
text lengths, 0-3 images per sample with VMP patch and token counts). The C++ planner runs on
all ``--samples`` samples (best of 3); the reference is O(n * sequences), so it runs on a subset
(``--ref-samples``, the first samples of the same corpus) and is reported on that subset only.
The ratio compares samples per second. Prints a table and writes JSON.

Example: ``python benchmarks/bench_pack.py --samples 1000000``
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from megatron_navil.ops import pack as pack_mod  # noqa: E402
from megatron_navil.ops.pack import PackPlan, plan_packing, plan_packing_reference  # noqa: E402
from megatron_navil.testing.pack_data import realistic_pack_counts  # noqa: E402


def _positive(value: str) -> int:
    try:
        as_int = int(value.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}") from None
    if as_int <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value!r}")
    return as_int


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--samples", type=_positive, default=1_000_000, help="samples planned by the C++ planner"
    )
    parser.add_argument(
        "--ref-samples",
        type=_positive,
        default=20_000,
        help="subset size (first samples of the corpus) planned by the Python reference",
    )
    parser.add_argument(
        "--seq-length", type=_positive, default=16384, help="LLM tokens per packed sequence"
    )
    parser.add_argument(
        "--max-patches",
        type=_positive,
        default=65536,
        help="vision-encoder patches per packed sequence",
    )
    parser.add_argument(
        "--no-patch-limit", action="store_true", help="ignore --max-patches (no patch budget)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic corpus")
    parser.add_argument("--repeats", type=_positive, default=3, help="C++ timing: best of N")
    parser.add_argument(
        "--json",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "pack.json",
        help="where to write the results as JSON",
    )
    return parser.parse_args(argv)


def _time(fn, repeats: int) -> tuple[float, PackPlan]:
    best, plan = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        plan = fn()
        best = min(best, time.perf_counter() - start)
    return best, plan


def _row(name: str, samples: int, seconds: float, plan: PackPlan) -> dict:
    return {
        "planner": name,
        "samples": samples,
        "seconds": seconds,
        "samples_per_s": samples / seconds,
        "num_seqs": plan.num_seqs,
        "skipped": len(plan.skipped),
        "padding_fraction": plan.padding_fraction,
        "lower_bound_seqs": -(-int(plan.tokens_per_seq.sum()) // plan.seq_length),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if pack_mod._native() is None:
        print("error: megatron_navil._C with plan_packing is not built", file=sys.stderr)
        return 2
    max_patches = None if args.no_patch_limit else args.max_patches
    ref_samples = min(args.ref_samples, args.samples)
    tokens, patches = realistic_pack_counts(args.samples, seed=args.seed)
    budgets = (args.seq_length, max_patches)

    native_s, native_plan = _time(
        lambda: plan_packing(tokens, patches, *budgets, oversize="skip"), args.repeats
    )
    sub_t, sub_p = tokens[:ref_samples], patches[:ref_samples]
    ref_s, ref_plan = _time(
        lambda: plan_packing_reference(sub_t, sub_p, *budgets, oversize="skip"), 1
    )
    native_sub = plan_packing(sub_t, sub_p, *budgets, oversize="skip")
    if not native_sub.equals(ref_plan):
        print("error: C++ and reference plans differ on the subset", file=sys.stderr)
        return 1

    rows = [
        _row("c++ (megatron_navil._C)", args.samples, native_s, native_plan),
        _row(f"python reference (subset of {ref_samples})", ref_samples, ref_s, ref_plan),
    ]
    ratio = rows[0]["samples_per_s"] / rows[1]["samples_per_s"]
    header = f"{'planner':<40} {'samples':>9} {'seconds':>9} {'samples/s':>12} "
    header += f"{'seqs':>8} {'lower bd':>8} {'skipped':>7} {'padding':>9}"
    print(f"seq_length={args.seq_length} max_patches={max_patches} seed={args.seed}")
    print(header)
    for r in rows:
        print(
            f"{r['planner']:<40} {r['samples']:>9} {r['seconds']:>9.3f} "
            f"{r['samples_per_s']:>12.0f} {r['num_seqs']:>8} {r['lower_bound_seqs']:>8} "
            f"{r['skipped']:>7} {100 * r['padding_fraction']:>8.4f}%"
        )
    print(f"c++ / reference samples-per-second ratio: {ratio:.0f}x (reference on the subset)")

    result = {
        "benchmark": "pack",
        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "machine": {"python": platform.python_version(), "processor": platform.machine()},
        "rows": rows,
        "native_over_reference_samples_per_s": ratio,
        "native_plan_digest": native_plan.digest(),
        "mean_llm_tokens_per_sample": float(np.mean(tokens)),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
