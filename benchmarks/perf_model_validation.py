"""The step-time model's numbers for docs/performance.md, with the command that made them.

1. Every published Megatron-Bridge row of ../shared/PERF_REFERENCE.md: predicted vs published
   tokens/s/GPU and model TFLOP/s/GPU (their FLOP definition), the error, what limits the
   step (``planning.published``).
2. navil-2b and navil-9b at 8, 64, 256 and 1,024 H100s for each paper stage: the fastest
   layout that fits (``planning.search`` over TP/PP/VPP/EP/recompute at the paper's batch,
   converted to sequences as ``launch.py`` does), its predicted step time, tokens/s/GPU, MFU
   and the largest parts of its step.

No GPU, no measurement: a model. Prints markdown tables; writes JSON (default
benchmarks/results/perf_model.json). Example: ``python benchmarks/perf_model_validation.py``
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GPU_COUNTS = (8, 64, 256, 1024)
STAGES = ("s1.1", "s1.2", "s2")
MODELS = ("navil-2b", "navil-9b")


def published() -> dict:
    from megatron_navil.planning.hardware import get_gpu
    from megatron_navil.planning.published import FITTED_ON, validation_rows

    cal = get_gpu("h100").calibration
    return {
        "rows": validation_rows(),
        "calibration": asdict(cal),
        "fitted_on": FITTED_ON,
    }


def navil_row(model: str, stage: str, gpus: int) -> dict:
    from megatron_navil import launch as L
    from megatron_navil.config.registry import get_config
    from megatron_navil.planning.hardware import get_gpu
    from megatron_navil.planning.search import search

    hw = get_gpu("h100")
    args = L.build_parser().parse_args(
        ["--config", model, "--stage", stage, "--nnodes", str(gpus // 8)]
    )
    plan = L.resolve(args)
    cfg = get_config(model)
    base = replace(plan.planner_layout(), tp=1, pp=1, vpp=1, ep=1, dp=1, first_stage_layers=None)
    sample = round(plan.sample_tokens) if plan.sample_tokens else None
    rows = search(
        cfg, base, gpus, hw.memory_gib, 6.0, 8, hw=hw, sample_length=sample,
        global_batch=plan.global_batch,
    )  # fmt: skip
    fitting = [r for r in rows if r.fits]
    out = {"model": model, "stage": stage, "gpus": gpus, "global_batch": plan.global_batch}
    if not fitting:
        return {**out, "fits": False}
    best = fitting[0]
    p = best.prediction
    lay = best.layout
    return {
        **out,
        "fits": True,
        "layout": lay.name(),
        "recompute": f"{lay.recompute}/{lay.vision_rc}",
        "micro_batches": lay.micro_batches,
        "step_s": p.step_s,
        "tokens_per_s_per_gpu": p.tokens_per_s_per_gpu,
        "mfu": p.mfu,
        "straggler_ratio": p.straggler.ratio,
        "limits": p.breakdown.line(3),
        "breakdown": p.breakdown.as_dict(),
        "peak_gib": best.peak.total / 2**30,
    }


def markdown(result: dict) -> str:
    lines = [
        "| model | GPUs | precision | layout (m) | tokens/s/GPU pub. | predicted | error | "
        "model TFLOP/s/GPU pub. | predicted | what limits it (share of the step) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["published"]["rows"]:
        lines.append(
            f"| {r['model']} | {r['gpus']} | {r['precision']} | {r['layout']} "
            f"({r['micro_batches']}) | {r['published_tokens_per_s_per_gpu']:,.0f} | "
            f"{r['predicted_tokens_per_s_per_gpu']:,.0f} | {r['error']:+.1%} | "
            f"{r['published_tflops_per_gpu']:.0f} | {r['predicted_tflops_per_gpu']:.0f} | "
            f"{r['limits']} |"
        )
    lines += [
        "",
        "| model | stage | GPUs | fastest layout that fits (m) | recompute LLM/vision | "
        "s/step | tokens/s/GPU | MFU | straggler | what limits it |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["navil"]:
        head = f"| {r['model']} | {r['stage']} | {r['gpus']} |"
        if not r["fits"]:
            lines.append(f"{head} nothing fits | | | | | | |")
            continue
        lines.append(
            f"{head} {r['layout']} ({r['micro_batches']}) | {r['recompute']} | "
            f"{r['step_s']:.2f} | {r['tokens_per_s_per_gpu']:,.0f} | {r['mfu']:.1%} | "
            f"{r['straggler_ratio']:.3f} | {r['limits']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/perf_model.json"))
    p.add_argument("--no-navil", action="store_true", help="only the published rows (fast)")
    args = p.parse_args(argv)
    result = {
        "command": "python benchmarks/perf_model_validation.py",
        "published": published(),
        "navil": []
        if args.no_navil
        else [navil_row(m, s, g) for m in MODELS for s in STAGES for g in GPU_COUNTS],
    }
    print(markdown(result))
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
