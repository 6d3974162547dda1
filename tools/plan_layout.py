"""Per-GPU memory and FLOPs of a NaViL config in a parallel layout; search for layouts that fit.

Usage:
  python tools/plan_layout.py navil-9b --tp 4 --pp 2 --dp 8 --recompute selective
  python tools/plan_layout.py navil-9b --search --gpus 64 --gpu h100 --stage s2
  python tools/plan_layout.py tiny --dtype fp32 --seq-length 4096 --patches 2048 --json -

One micro-batch is one packed sequence of --seq-length tokens carrying --patches vision
patches. Memory per pipeline rank: weights, fp32 gradient buffers, distributed-optimizer state
(fp32 master + Adam m, v sharded over data parallelism), activations of the micro-batches the
(interleaved) 1F1B schedule keeps in flight, and short-lived peaks (logits; the recomputed
layer). Time: the step-time model (planning/perf.py, predict.py; docs/performance.md) on a
GPU preset. The formulas are in the module docs of megatron_navil/planning/. GiB = 2^30 bytes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import asdict, replace
from pathlib import Path

from megatron_navil.cli import OneLineParser


def _parser() -> argparse.ArgumentParser:
    from megatron_navil.config.registry import REGISTRY

    p = OneLineParser(
        description="Per-GPU memory and FLOPs of a NaViL layout (no GPU, no model is built).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "config",
        metavar="CONFIG",
        help=f"model config: {', '.join(REGISTRY)}, a navil_config.json or a checkpoint "
        "carrying one",
    )
    g = p.add_argument_group("layout")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size (SP on when > 1)")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel stages")
    g.add_argument(
        "--vpp", type=int, default=1,
        help="virtual stages (model chunks) per pipeline rank; > 1 = interleaved 1F1B",
    )  # fmt: skip
    g.add_argument("--ep", type=int, default=1, help="expert-parallel size")
    g.add_argument(
        "--etp", type=int, default=None, help="expert tensor-parallel size (default: --tp)"
    )
    g.add_argument(
        "--dp", type=int, default=None,
        help="data-parallel size (default: --gpus / (tp * pp), else 1)",
    )  # fmt: skip
    g.add_argument(
        "--first-stage-layers", type=int, default=None,
        help="LLM layers of pipeline stage 0, which also holds the vision encoder (default: "
        "even split; needed when PP x VPP does not divide the layers)",
    )  # fmt: skip
    g.add_argument(
        "--recompute", choices=("none", "selective", "full"), default="none",
        help="activation recompute of the LLM layers: selective = norms and activation "
        "functions, full = whole layers (only each layer's input is kept)",
    )  # fmt: skip
    g.add_argument(
        "--recompute-vision", choices=("none", "selective", "full"), default=None,
        help="activation recompute of the vision blocks (default: as --recompute)",
    )  # fmt: skip
    d = p.add_argument_group("data and precision")
    d.add_argument("--seq-length", type=int, default=16384, help="tokens per packed sequence")
    d.add_argument(
        "--patches", type=int, default=None,
        help="vision patches per sequence (the packer's patch budget); default: twice the "
        "stage's largest image (its multi-scale copies), at most 4 x --seq-length",
    )  # fmt: skip
    d.add_argument(
        "--max-image-patches", type=int, default=None,
        help="largest image's base-scale patches, for the vision attention FLOPs (default: "
        "the stage's maximum)",
    )  # fmt: skip
    d.add_argument(
        "--sample-length", type=int, default=None,
        help="tokens per packed sample, for the attention FLOPs (default: --seq-length)",
    )  # fmt: skip
    d.add_argument(
        "--stage", choices=("s1.1", "s1.2", "s2"), default="s2",
        help="training stage: frozen parameters get no gradients or optimizer state",
    )  # fmt: skip
    d.add_argument(
        "--dtype", choices=("bf16", "fp32"), default="bf16",
        help="bf16: bf16 weights, fp32 grads + master weights; fp32: the CPU path (fp32 "
        "weights are the master weights, plain Adam)",
    )  # fmt: skip
    d.add_argument(
        "--micro-batches", type=int, default=None,
        help="micro-batches per data-parallel replica per step (default 16)",
    )  # fmt: skip
    s = p.add_argument_group("search")
    s.add_argument("--search", action="store_true", help="list the layouts for --gpus GPUs")
    s.add_argument("--gpus", type=int, default=None, help="GPUs in the job (required by --search)")
    s.add_argument(
        "--gpu", choices=("h100", "h200", "a100", "b200"), default=None,
        help="GPU preset of the step-time model (planning/hardware.py: peaks, links, "
        "calibration); also the default --gpu-mem. Default: h100 for the time, --gpu-mem "
        "required",
    )  # fmt: skip
    s.add_argument(
        "--gpu-mem", type=float, default=None,
        help="memory per GPU in GiB (an 80 GB H100 has 79.6 GiB; default: --gpu's)",
    )  # fmt: skip
    s.add_argument(
        "--breakdown", type=int, default=3,
        help="fitting layouts whose predicted step-time breakdown --search prints",
    )  # fmt: skip
    s.add_argument(
        "--reserve", type=float, default=6.0,
        help="GiB per GPU kept free for the CUDA context, NCCL buffers and allocator "
        "fragmentation",
    )  # fmt: skip
    s.add_argument("--gpus-per-node", type=int, default=8, help="largest TP size tried")
    s.add_argument(
        "--search-recompute", default="none,selective,full",
        help="comma-separated recompute modes the search may use (LLM and vision alike); "
        "'none' alone: layouts that need no activation checkpointing",
    )  # fmt: skip
    s.add_argument("--top", type=int, default=15, help="rows of the search table")
    s.add_argument(
        "--cp-table", action="store_true",
        help="the longest --seq-length this layout fits with context parallelism 1, 2, 4, 8 "
        "(train's --cp; multiples of 8,192 tokens, the patches per token kept) on --gpus "
        "GPUs of --gpu-mem minus --reserve (planning/context_parallel.py)",
    )  # fmt: skip
    p.add_argument("--json", metavar="PATH", help="also write the result as JSON ('-': stdout)")
    return p


def _gib(x: float) -> str:
    from megatron_navil.planning.layout import GiB

    return f"{x / GiB:7.1f}"


def _rc(layout) -> str:
    return f"{layout.recompute}/{layout.vision_rc}"


def _one(cfg, layout, args) -> dict:
    from megatron_navil.planning.flops import plan_flops
    from megatron_navil.planning.layout import GiB
    from megatron_navil.planning.memory import plan_memory

    ranks = plan_memory(cfg, layout)
    flops = plan_flops(cfg, layout, args.sample_length)
    worst = max(ranks, key=lambda r: r.total)
    print(
        f"{cfg.name}: {layout.name()}, recompute LLM/vision {_rc(layout)}, {layout.dtype}, "
        f"stage {layout.stage}, {layout.seq_length} tokens + {layout.patches} patches per "
        f"micro-batch, {layout.gpus} GPUs"
    )
    head = (
        "pp rank       params  weights    grads optimizer    acts (in flight)  transient  total GiB"
    )
    print(head)
    for r in ranks:
        mark = "  <- most loaded" if r is worst else ""
        print(
            f"{r.pp_rank:7d} {r.params:14,d} {_gib(r.weights)}  {_gib(r.grads)}   "
            f"{_gib(r.optimizer)} {_gib(r.activations)} ({r.in_flight:4.0f})      "
            f"{_gib(r.transient)} {_gib(r.total)}{mark}"
        )
    from megatron_navil.planning.memory import SCOPE

    print(SCOPE)
    print(
        f"FLOPs per sequence: LLM {flops.llm_per_sequence:.3e} + vision/connector "
        f"{flops.vision_per_sequence:.3e} = {flops.per_sequence:.3e}; per step "
        f"({flops.sequences_per_step} sequences) {flops.per_step:.3e}"
    )
    pred = _predict(cfg, layout, args)
    print(_time_line(pred, _hw(args)))
    print(f"  time by part: {_parts(pred)}")
    return {
        "prediction": _prediction_json(pred, _hw(args)),
        "config": cfg.name,
        "layout": asdict(layout),
        "ranks": [r.as_gib() for r in ranks],
        "most_loaded_rank": worst.pp_rank,
        "peak_gib": worst.total / GiB,
        "flops": {**asdict(flops), "per_sequence": flops.per_sequence},
    }


def _hw(args):
    from megatron_navil.planning.hardware import get_gpu

    return get_gpu(args.gpu or "h100")


def _predict(cfg, layout, args):
    from megatron_navil.planning.predict import predict

    return predict(cfg, layout, _hw(args), args.sample_length)


def _time_line(pred, hw) -> str:
    return (
        f"predicted on {hw.name}: {pred.step_s:.2f} s/step, {pred.tokens_per_s_per_gpu:,.0f} "
        f"tokens/s/GPU, MFU {pred.mfu:.1%} (vision + LLM model FLOPs over the bf16 peak; "
        f"straggler factor {pred.straggler.ratio:.3f})"
    )


def _parts(pred) -> str:
    bd = pred.breakdown
    return ", ".join(f"{k} {v:.2f}s" for k, v in bd.as_dict().items() if k in bd.PARTS and v)


def _prediction_json(pred, hw) -> dict:
    return {
        "gpu": hw.name,
        "step_s": pred.step_s,
        "tokens_per_s_per_gpu": pred.tokens_per_s_per_gpu,
        "mfu": pred.mfu,
        "straggler_ratio": pred.straggler.ratio,
        "breakdown_s": {k: v for k, v in pred.breakdown.as_dict().items()},
    }


def _search(cfg, base, args) -> dict:
    from megatron_navil.planning.layout import GiB
    from megatron_navil.planning.search import search

    modes = tuple(args.search_recompute.split(","))
    hw = _hw(args)
    rows = search(cfg, base, args.gpus, args.gpu_mem, args.reserve, args.gpus_per_node, modes,
                  hw, args.sample_length)  # fmt: skip
    fitting = [r for r in rows if r.fits]
    print(
        f"{cfg.name} on {args.gpus} GPUs of {args.gpu_mem:g} GiB ({args.reserve:g} GiB "
        f"reserved), {base.dtype}, stage {base.stage}, {base.seq_length} tokens + "
        f"{base.patches} patches per micro-batch: {len(fitting)} of {len(rows)} layouts fit"
    )
    print(
        f"sorted by the predicted step time on {hw.name} (planning/predict.py; s/step, "
        "tokens/s/GPU, MFU), then fewer TP x PP ranks, then less memory; memory of the most "
        "loaded rank"
    )
    print(
        f"{'layout':34s} {'recompute':15s} {'rank':>4s} {'weights':>7s} {'grads':>7s} "
        f"{'optim':>7s} {'acts':>7s} {'trans':>7s} {'total':>7s} fits  s/step  tok/s/GPU   MFU"
    )
    shown = rows[: args.top]
    for i, r in enumerate(shown):
        m = r.peak
        mark = "  <- recommended" if i == 0 and r.fits else ""
        print(
            f"{r.layout.name():34s} {_rc(r.layout):15s} {m.pp_rank:4d} {_gib(m.weights)} "
            f"{_gib(m.grads)} {_gib(m.optimizer)} {_gib(m.activations)} {_gib(m.transient)} "
            f"{_gib(m.total)} {'yes ' if r.fits else 'no  '} {r.step_time:7.2f} "
            f"{r.prediction.tokens_per_s_per_gpu:10,.0f} {r.prediction.mfu:5.1%}{mark}"
        )
    for r in fitting[: args.breakdown]:
        print(f"{r.layout.name()} {_rc(r.layout)}: {_parts(r.prediction)}")
    from megatron_navil.planning.memory import SCOPE

    print(SCOPE)
    if not fitting:
        print("no layout fits: more GPUs, a smaller --patches budget or --seq-length")
    return {
        "config": cfg.name,
        "gpus": args.gpus,
        "gpu_mem_gib": args.gpu_mem,
        "reserve_gib": args.reserve,
        "recommended": asdict(fitting[0].layout) if fitting else None,
        "rows": [
            {
                "layout": asdict(r.layout),
                "name": r.layout.name(),
                "fits": r.fits,
                "step_s": r.step_time,
                "prediction": _prediction_json(r.prediction, hw),
                "most_loaded": r.peak.as_gib(),
                "peak_gib": r.peak.total / GiB,
            }
            for r in rows
        ],
    }


def _cp_table(cfg, layout, args) -> dict:
    """The longest sequence of ``layout`` at CP 1, 2, 4, 8 (where CP divides its DP)."""
    from megatron_navil.planning.context_parallel import longest_sequence

    capacity = args.gpu_mem - args.reserve
    row = {}
    for cp in (1, 2, 4, 8):
        if layout.dp % cp:
            continue
        trial = replace(layout, dp=layout.dp // cp)
        row[cp] = longest_sequence(cfg, trial, cp, capacity)
    name = f"TP{layout.tp} PP{layout.pp}" + (f" VPP{layout.vpp}" if layout.vpp > 1 else "")
    print(f"{cfg.name}, stage {layout.stage}, {name} on {layout.tp * layout.pp * layout.dp} "
          f"GPUs of {args.gpu_mem:g} GiB ({args.reserve:g} GiB reserved), recompute "
          f"{_rc(layout)}: longest --seq-length")  # fmt: skip
    for cp, length in row.items():
        shown = "nothing fits" if length is None else f"{length:,}"
        print(f"  --cp {cp} (DP {layout.dp // cp}): {shown}")
    return {"layout": name, "longest_seq_length": {str(k): v for k, v in row.items()}}


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    from megatron_navil.checkpoint.config import resolve_config
    from megatron_navil.planning.layout import STAGE_MAX_PATCHES, Layout, default_patches

    try:
        cfg = resolve_config(args.config)
    except ValueError as exc:
        parser.error(str(exc))
    if args.gpu_mem is None and args.gpu is not None:
        args.gpu_mem = _hw(args).memory_gib
    for name in ("gpus", "gpu_mem", "seq_length", "gpus_per_node", "top"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.search and (args.gpus is None or args.gpu_mem is None):
        parser.error("--search needs --gpus and --gpu-mem (or --gpu)")
    bad = set(args.search_recompute.split(",")) - {"none", "selective", "full"}
    if bad:
        parser.error(f"--search-recompute: unknown mode(s) {sorted(bad)}")
    if args.sample_length is not None and not 0 < args.sample_length <= args.seq_length:
        parser.error(f"--sample-length {args.sample_length} must be in [1, --seq-length]")
    merge = cfg.connector.merge
    patches = args.patches
    if patches is None:
        patches = default_patches(args.stage, args.seq_length, merge)
    elif patches > merge * merge * args.seq_length:
        parser.error(
            f"--patches {patches} make more than --seq-length {args.seq_length} image tokens "
            f"({merge}x{merge} patches per token)"
        )
    dp = args.dp
    if dp is not None and args.gpus is not None and not args.search:
        if args.gpus != args.tp * args.pp * dp:
            parser.error(f"--gpus {args.gpus} != tp*pp*dp = {args.tp * args.pp * dp}")
    if dp is None:
        if args.gpus is not None and not args.search:
            if args.gpus % (args.tp * args.pp):
                parser.error(f"--gpus {args.gpus} is not a multiple of tp*pp={args.tp * args.pp}")
            dp = args.gpus // (args.tp * args.pp)
        else:
            dp = 1
    layout = Layout(
        tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp, dp=dp,
        first_stage_layers=args.first_stage_layers, seq_length=args.seq_length,
        patches=patches,
        max_image_patches=args.max_image_patches or STAGE_MAX_PATCHES[args.stage],
        recompute=args.recompute, vision_recompute=args.recompute_vision, dtype=args.dtype,
        stage=args.stage, micro_batches=args.micro_batches,
    )  # fmt: skip
    # With --json -, stdout carries only the JSON; the table goes to stderr.
    table = contextlib.redirect_stdout(sys.stderr) if args.json == "-" else contextlib.nullcontext()
    try:
        with table:
            if args.cp_table:
                if args.gpu_mem is None:
                    raise ValueError("--cp-table needs --gpu-mem (or --gpu)")
                result = _cp_table(cfg, layout, args)
            elif args.search:
                result = _search(cfg, replace(layout, tp=1, pp=1, vpp=1, ep=1, dp=1), args)
            else:
                layout.validate(cfg)
                result = _one(cfg, layout, args)
    except ValueError as exc:
        parser.error(str(exc))
    if args.json:
        text = json.dumps(result, indent=2) + "\n"
        if args.json == "-":
            sys.stdout.write(text)
        else:
            Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
