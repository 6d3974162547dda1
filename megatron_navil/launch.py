"""Launch NaViL pretraining on GPU nodes: ``examples/pretrain_navil_{2b,9b}.sh`` call this.

``python -m megatron_navil.launch --config navil-2b --stage s1.1 --nnodes 8 ...`` resolves one
stage of the paper's recipe (../shared/NAVIL.md, "Training recipe") for a model and a parallel
layout into a ``torchrun ... -m megatron_navil.train`` command line, checks that this machine has
the GPUs the layout needs, and replaces itself with torchrun. ``--dry-run`` instead prints the
resolved configuration, the layout, the parameter counts and the planner's memory per GPU
(``megatron_navil.planning``), and exits 0: it needs no GPU, no data and no process group.

What comes from where:
* steps, batch and layout per stage and model: the paper recipes (``training.paper``:
  ``navil_2b(stage)``, ``navil_9b(stage)``; every flag overrides); LR, warm-up,
  schedule and weight decay: the stage recipe (``training.recipes``, ``train.py``'s defaults);
* the paper's batch counts *samples*, the loader's ``--global-batch`` packed sequences of
  ``--seq-length`` tokens: the launcher converts with the mean tokens per sample
  (``--sample-tokens``; default the paper's total tokens over its total samples, about 1,078
  for 2B and 756 for 9B) and rounds to a multiple of the data-parallel size (``--batch-rounding``:
  the nearest by default); the steps then change by the inverse ratio, so the stage still sees
  the paper's number of samples (``--keep-steps``: the paper's steps as they are); the deviation
  is printed before the launch and in the dry run;
* whether the layout fits: the planner's peak memory per GPU plus ``--reserve`` against
  ``--gpu-mem``; a layout that does not fit is refused (exit 1, one line naming the fastest
  layouts that fit, from the planner's search) before any rank starts, unless ``--force``;
* patches per packed sequence (``--max-patches`` of train.py): the planner's budget for the
  stage, twice its largest image (that image's multi-scale copies), at most 4 x the sequence
  (``planning.layout.default_patches``); the per-image maximum is an indexing-time setting and is
  printed as the ``tools/index_corpus.py`` flag to use;
* parameter counts: ``config.params.param_counts`` (equal to the meta-device model's,
  ``tools/count_params.py`` and its test check that).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Any

from megatron_navil.cli import OneLineParser
from megatron_navil.training.paper import (
    PAPER_TOTAL_TOKENS,
    SEQ_LENGTH,
    paper_sample_tokens,
    paper_stage,
)

H100_GIB = 79.6  # an 80 GB H100's memory in GiB (what torch reports)
# train options a launch always writes out (the plan decides them), even at train's defaults
PLAN_FIELDS = ("config", "stage", "tp", "pp", "ep", "recompute_llm", "recompute_vision",
               "seq_length", "max_patches", "global_batch", "steps")  # fmt: skip
LAYOUT_FALLBACK = dict(tp=1, pp=1, vpp=1, ep=1, recompute_llm="selective", recompute_vision="full")


@dataclass(frozen=True)
class Plan:
    """One stage's resolved launch."""

    config: str
    stage: str
    nnodes: int
    gpus_per_node: int
    tp: int
    pp: int
    vpp: int
    ep: int
    dp: int
    first_stage_layers: int | None
    recompute_llm: str
    recompute_vision: str
    seq_length: int
    steps: int
    samples_per_step: int  # the paper's batch (or the one asked for)
    paper_steps: int | None  # the stage's steps before the batch rounding changed them
    sample_tokens: float
    global_batch: int  # packed sequences per step
    patches: int  # vision patches per packed sequence
    max_image_patches: int

    @property
    def gpus(self) -> int:
        return self.nnodes * self.gpus_per_node

    @property
    def batch_samples(self) -> float:
        """Samples per step of the packed batch (at ``sample_tokens`` tokens a sample)."""
        return self.global_batch * self.seq_length / self.sample_tokens

    def batch_line(self) -> str:
        """The batch against the asked-for samples per step (and the step change it made)."""
        dev = self.batch_samples / self.samples_per_step - 1
        line = (
            f"batch: {self.global_batch} packed sequences of {self.seq_length:,} tokens per step "
            f"(= {self.micro_batches} per data-parallel replica), ~{self.batch_samples:,.0f} "
            f"samples of ~{self.sample_tokens:,.0f} tokens (paper: {self.samples_per_step:,} "
            f"samples, {dev:+.1%})"
        )
        if self.paper_steps is not None and self.paper_steps != self.steps:
            line += (
                f"; {self.steps:,} steps instead of the paper's {self.paper_steps:,}, so the "
                f"stage sees its {self.paper_steps * self.samples_per_step:,} samples"
            )
        return line

    @property
    def micro_batches(self) -> int:
        """Packed sequences per data-parallel replica per step."""
        return self.global_batch // self.dp

    def layout_name(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        parts += [f"VPP{self.vpp}"] if self.vpp > 1 else []
        parts += [f"EP{self.ep}"] if self.ep > 1 else []
        return " ".join([*parts, f"DP{self.dp}"])

    def planner_layout(self) -> Any:
        from megatron_navil.planning.layout import Layout

        return Layout(
            tp=self.tp, pp=self.pp, vpp=self.vpp, ep=self.ep, dp=self.dp,
            first_stage_layers=self.first_stage_layers, seq_length=self.seq_length,
            patches=self.patches, max_image_patches=self.max_image_patches,
            recompute=self.recompute_llm, vision_recompute=self.recompute_vision,
            dtype="bf16", stage=self.stage, micro_batches=self.micro_batches,
        )  # fmt: skip

    def train_config(self) -> Any:
        """The ``megatron_navil.train`` options of the plan (data and checkpoint paths apart):
        a ``training.options.TrainConfig``, whose ``to_argv()`` is the command line."""
        from megatron_navil.training.options import TrainConfig

        tc = TrainConfig()
        lay, data, optim = tc.layout, tc.data, tc.optim
        lay.config, optim.stage, optim.steps = self.config, self.stage, self.steps
        lay.tp, lay.pp, lay.ep = self.tp, self.pp, self.ep
        lay.vpp = self.vpp if self.vpp > 1 else None
        lay.first_stage_layers = self.first_stage_layers
        lay.recompute_llm, lay.recompute_vision = self.recompute_llm, self.recompute_vision
        data.seq_length, data.max_patches = self.seq_length, self.patches
        data.global_batch = self.global_batch
        return tc


BATCH_ROUNDING = ("nearest", "down", "up")


def round_batch(sequences: float, dp: int, rule: str = "nearest") -> int:
    """``sequences`` packed sequences per step as a positive multiple of ``dp``: the nearest
    one (ties up), the one below or the one above (never 0)."""
    import math

    per = sequences / dp
    if rule == "nearest":
        k = math.floor(per + 0.5)
    elif rule == "down":
        k = math.floor(per)
    elif rule == "up":
        k = math.ceil(per)
    else:
        raise ValueError(f"--batch-rounding {rule!r}: one of {', '.join(BATCH_ROUNDING)}")
    return max(1, k) * dp


def fit_problem(plan: Plan, gpu_mem_gib: float, reserve_gib: float, top: int = 3) -> str | None:
    """None when the planner's peak memory per GPU of ``plan`` plus ``reserve_gib`` fits
    ``gpu_mem_gib``, else one line: the peak, and the ``top`` fastest layouts that fit the same
    GPUs (``planning.search.search``) as the example scripts' variables."""
    from megatron_navil.config.registry import get_config
    from megatron_navil.planning.layout import GiB
    from megatron_navil.planning.memory import peak_rank, plan_memory
    from megatron_navil.planning.search import search

    cfg = get_config(plan.config)
    layout = plan.planner_layout()
    peak = peak_rank(plan_memory(cfg, layout))
    if peak.total / GiB + reserve_gib <= gpu_mem_gib:
        return None
    rows = search(cfg, layout, plan.gpus, gpu_mem_gib, reserve_gib, plan.gpus_per_node)
    fitting = [r for r in rows if r.fits][:top]

    def env(lay: Any) -> str:
        parts = [f"TP={lay.tp}", f"PP={lay.pp}"]
        parts += [f"VPP={lay.vpp}"] if lay.vpp > 1 else []
        parts += [f"EP={lay.ep}"] if lay.ep > 1 else []
        if lay.first_stage_layers is not None:
            parts.append(f"FIRST_STAGE_LAYERS={lay.first_stage_layers}")
        parts += [f"RECOMPUTE_LLM={lay.recompute}", f"RECOMPUTE_VISION={lay.vision_recompute}"]
        return " ".join(parts)

    alternatives = (
        "layouts that fit, fastest first: "
        + "; ".join(f"{env(r.layout)} ({r.peak.total / GiB:.1f} GiB)" for r in fitting)
        if fitting
        else f"no layout of {plan.gpus} GPUs fits: more nodes, or a shorter --seq-length / "
        "--max-patches"
    )
    return (
        f"{plan.layout_name()} does not fit: the planner's peak {peak.total / GiB:.1f} GiB on pp "
        f"rank {peak.pp_rank} + {reserve_gib:g} GiB reserve > {gpu_mem_gib:g} GiB per GPU; "
        f"{alternatives}; --force launches anyway"
    )


def resolve(args: argparse.Namespace) -> Plan:
    """The plan of ``args``; ValueError (one line, naming the flag) when it cannot run."""
    from megatron_navil.config.registry import get_config
    from megatron_navil.planning.layout import STAGE_MAX_PATCHES, default_patches

    cfg = get_config(args.config)
    if args.stage not in STAGE_MAX_PATCHES:
        raise ValueError(f"--stage {args.stage!r}: one of {', '.join(STAGE_MAX_PATCHES)}")
    paper = paper_stage(args.config, args.stage)
    # the layout: a flag, else the paper recipe's (training.paper), else LAYOUT_FALLBACK
    layout = {
        name: getattr(args, name) if getattr(args, name) is not None
        else getattr(paper, name) if paper else fallback
        for name, fallback in LAYOUT_FALLBACK.items()
    }  # fmt: skip
    for name in ("nnodes", "gpus_per_node", "seq_length", "tp", "pp", "vpp", "ep"):
        value = layout[name] if name in layout else getattr(args, name)
        if value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
    tp, pp = layout["tp"], layout["pp"]
    gpus = args.nnodes * args.gpus_per_node
    if gpus % (tp * pp):
        raise ValueError(
            f"{gpus} GPUs (--nnodes {args.nnodes} x --gpus-per-node {args.gpus_per_node}) are "
            f"not a multiple of TP x PP = {tp * pp}"
        )
    dp = gpus // (tp * pp)
    steps = args.steps or (paper.steps if paper else None)
    samples = args.samples_per_step or (paper.samples_per_step if paper else None)
    if steps is None or (samples is None and args.global_batch is None):
        raise ValueError(
            f"no paper recipe for {args.config}: give --steps and --global-batch "
            "(or --samples-per-step)"
        )
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    sample_tokens = args.sample_tokens or (
        paper_sample_tokens(args.config) if args.config in PAPER_TOTAL_TOKENS else None
    )
    if args.global_batch is not None:
        global_batch = args.global_batch
        if global_batch < 1 or global_batch % dp:
            raise ValueError(f"--global-batch {global_batch} is not a positive multiple of DP={dp}")
    else:
        if not sample_tokens or sample_tokens <= 0:
            raise ValueError("--sample-tokens must be > 0 to convert samples into sequences")
        sequences = samples * sample_tokens / args.seq_length
        global_batch = round_batch(sequences, dp, args.batch_rounding)
    paper_steps = None
    if args.steps is None and args.global_batch is None and sample_tokens and samples:
        # the paper's steps at another batch: scale so the stage sees the paper's samples
        paper_steps = steps
        if not args.keep_steps:
            batch_samples = global_batch * args.seq_length / sample_tokens
            steps = max(1, round(steps * samples / batch_samples))
    merge = cfg.connector.merge
    patches = args.max_patches or default_patches(args.stage, args.seq_length, merge)
    plan = Plan(
        config=args.config, stage=args.stage, nnodes=args.nnodes,
        gpus_per_node=args.gpus_per_node, **layout, dp=dp,
        first_stage_layers=args.first_stage_layers, seq_length=args.seq_length, steps=steps,
        paper_steps=paper_steps,
        samples_per_step=samples or round(global_batch * args.seq_length / sample_tokens),
        sample_tokens=sample_tokens or 0.0, global_batch=global_batch, patches=patches,
        max_image_patches=STAGE_MAX_PATCHES[args.stage],
    )  # fmt: skip
    plan.planner_layout().validate(cfg)
    return plan


def report(plan: Plan, gpu_mem_gib: float, reserve_gib: float) -> list[str]:
    """The dry run's lines: configuration, layout, parameter counts, memory per GPU."""
    from megatron_navil.config.params import param_counts
    from megatron_navil.config.registry import get_config
    from megatron_navil.planning.layout import GiB, Layout
    from megatron_navil.planning.memory import plan_memory
    from megatron_navil.planning.params import rank_params
    from megatron_navil.training.recipes import get_stage

    cfg, recipe = get_config(plan.config), get_stage(plan.stage)
    counts = param_counts(cfg)
    whole = rank_params(cfg, Layout(), 0)
    trainable = sum(whole.trainable(plan.stage))
    schedule = recipe.lr_schedule + (" (to --min-lr)" if recipe.lr_schedule == "cosine" else "")
    layout = plan.planner_layout()
    ranks = plan_memory(cfg, layout)
    peak = max(ranks, key=lambda r: r.total)
    fits = peak.total / GiB + reserve_gib <= gpu_mem_gib
    first = "" if plan.first_stage_layers is None else f", stage 0 {plan.first_stage_layers} layers"
    lines = [
        f"config: {plan.config}, stage {plan.stage}: trains {', '.join(recipe.trains)}",
        f"recipe: {plan.steps:,} steps, LR {recipe.lr:g} {schedule} after {recipe.warmup_steps} "
        f"warm-up steps, AdamW betas {recipe.betas} eps {recipe.eps:g}, weight decay "
        f"{recipe.weight_decay:g}",
        plan.batch_line(),
        f"images: at most {plan.patches:,} patches per sequence; index the data with "
        f"tools/index_corpus.py --config {plan.config} --max-patches "
        f"{recipe.max_patches_per_image} (the stage's patches per image)",
        f"layout: {plan.layout_name()} on {plan.nnodes} nodes x {plan.gpus_per_node} GPUs = "
        f"{plan.gpus} GPUs, recompute LLM {plan.recompute_llm} / vision "
        f"{plan.recompute_vision}{first}",
        f"parameters: total {counts['total']:,}, activated {counts['activated']:,}, vision "
        f"encoder {counts['vision']:,}, trainable in {plan.stage} {trainable:,}",
        "memory per GPU (planner, GiB): pp rank  weights  grads  optimizer  activations  "
        "transient  total",
    ]
    for r in ranks:
        g = r.as_gib()
        lines.append(
            f"  {r.pp_rank:7d}  {g['weights']:7.1f} {g['grads']:6.1f} {g['optimizer']:10.1f} "
            f"{g['activations']:12.1f} {g['transient']:10.1f} {g['total']:6.1f}"
        )
    from megatron_navil.planning.memory import SCOPE

    lines.append(f"  ({SCOPE})")
    verdict = "fits" if fits else "DOES NOT FIT"
    lines.append(
        f"peak {peak.total / GiB:.1f} GiB on pp rank {peak.pp_rank} + {reserve_gib:g} GiB "
        f"reserve {verdict} in {gpu_mem_gib:g} GiB"
    )
    lines.append(predicted_line(cfg, plan, layout))
    return lines


def predicted_line(cfg: Any, plan: Plan, layout: Any) -> str:
    """The step-time model's figures for the plan on H100s (``planning.predict``): packed
    samples of the paper's mean length, images from the straggler term's size distribution."""
    from megatron_navil.planning.hardware import get_gpu
    from megatron_navil.planning.predict import predict

    hw = get_gpu("h100")
    sample = round(plan.sample_tokens) if plan.sample_tokens else None
    pred = predict(cfg, layout, hw, sample_length=min(sample or plan.seq_length, plan.seq_length))
    return (
        f"predicted on {hw.name} (planning/predict.py): {pred.step_s:.2f} s/step, "
        f"{pred.tokens_per_s_per_gpu:,.0f} tokens/s/GPU, MFU {pred.mfu:.1%} (vision + LLM "
        f"model FLOPs / 989 TFLOP/s); {plan.steps * pred.step_s / 86400:.1f} days for "
        f"{plan.steps:,} steps; time goes to {pred.breakdown.line(4)}"
    )


def torchrun_command(plan: Plan, args: argparse.Namespace) -> list[str]:
    """``python -m torch.distributed.run`` (torchrun) with a static rendezvous, then the
    training entry and its arguments."""
    tc = plan.train_config()
    tc.data.data = list(args.data or [])
    ck = tc.checkpoint
    ck.save, ck.load, ck.init, tc.log.log_dir = args.save, args.load, args.init, args.log_dir
    if args.save:
        ck.save_interval = args.save_interval
    cmd = [
        sys.executable, "-m", "torch.distributed.run",
        "--nnodes", str(plan.nnodes), "--nproc-per-node", str(plan.gpus_per_node),
        "--node-rank", str(args.node_rank), "--master-addr", args.master_addr,
        "--master-port", str(args.master_port),
        "-m", "megatron_navil.train", *tc.to_argv(always=PLAN_FIELDS),
    ]  # fmt: skip
    return cmd + list(args.extra)


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=os.environ.get("NAVIL_LAUNCH_PROG", "python -m megatron_navil.launch"),
        description="Resolve one NaViL training stage on GPU nodes and start torchrun "
        "(--dry-run: print the plan and exit). Arguments after '--' go to "
        "megatron_navil.train unchanged.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model and stage")
    g.add_argument("--config", required=True, help="model config (navil-2b, navil-9b, ...)")
    g.add_argument("--stage", required=True, help="s1.1, s1.2 or s2 (NAVIL.md's recipe)")
    g.add_argument("--steps", type=int, default=None, help="optimizer steps (default: paper's)")
    g.add_argument(
        "--samples-per-step", type=int, default=None,
        help="samples per step, converted to packed sequences (default: the paper's)",
    )  # fmt: skip
    g.add_argument(
        "--sample-tokens", type=float, default=None,
        help="mean tokens per sample of your data (default: the paper's total tokens over "
        "its total samples)",
    )  # fmt: skip
    g.add_argument(
        "--global-batch", type=int, default=None,
        help="packed sequences per step (overrides the conversion from samples)",
    )  # fmt: skip
    g.add_argument(
        "--batch-rounding", choices=BATCH_ROUNDING, default="nearest",
        help="how the paper's samples per step become a multiple of DP packed sequences",
    )  # fmt: skip
    g.add_argument(
        "--keep-steps", action="store_true",
        help="keep the paper's steps when the rounded batch differs from the paper's (default: "
        "scale the steps so the stage sees the paper's number of samples)",
    )  # fmt: skip
    g.add_argument("--seq-length", type=int, default=SEQ_LENGTH, help="packed sequence length")
    g.add_argument(
        "--max-patches", type=int, default=None,
        help="vision patches per packed sequence (default: the planner's stage budget)",
    )  # fmt: skip
    g = p.add_argument_group("nodes and layout")
    g.add_argument("--nnodes", type=int, default=1, help="nodes in the job")
    g.add_argument("--gpus-per-node", type=int, default=8, help="GPUs (processes) per node")
    recipe = " (default: the paper recipe's, training/paper.py; else %(fallback)s)"

    def layout_help(text: str, name: str) -> str:
        return text + recipe % {"fallback": LAYOUT_FALLBACK[name]}

    g.add_argument("--tp", type=int, default=None, help=layout_help("tensor-parallel size", "tp"))
    g.add_argument("--pp", type=int, default=None, help=layout_help("pipeline-parallel size", "pp"))
    g.add_argument(
        "--vpp", type=int, default=None, help=layout_help("virtual stages per pipeline rank", "vpp")
    )
    g.add_argument("--ep", type=int, default=None, help=layout_help("expert-parallel size", "ep"))
    g.add_argument("--first-stage-layers", type=int, default=None, help="LLM layers of stage 0")
    choices = ("none", "selective", "full")
    g.add_argument(
        "--recompute-llm", choices=choices, default=None,
        help=layout_help("LLM recompute", "recompute_llm"),
    )  # fmt: skip
    g.add_argument(
        "--recompute-vision", choices=choices, default=None,
        help=layout_help("vision recompute", "recompute_vision"),
    )  # fmt: skip
    g.add_argument(
        "--gpu-mem", type=float, default=H100_GIB, help="GiB per GPU for the memory check"
    )
    g.add_argument(
        "--reserve", type=float, default=6.0,
        help="GiB per GPU kept for the CUDA context, NCCL and fragmentation",
    )  # fmt: skip
    g = p.add_argument_group("rendezvous (from SLURM in the example scripts)")
    g.add_argument("--node-rank", type=int, default=0, help="this node's rank")
    g.add_argument("--master-addr", default="127.0.0.1", help="rank 0's host")
    g.add_argument("--master-port", type=int, default=29500, help="rank 0's port")
    g = p.add_argument_group("data and checkpoints")
    g.add_argument("--data", nargs="+", default=None, help="indexed corpus directories")
    g.add_argument("--save", default=None, help="checkpoint directory of this stage")
    g.add_argument("--save-interval", type=int, default=1000, help="save every N steps")
    g.add_argument("--load", default=None, help="resume from the newest checkpoint here")
    g.add_argument(
        "--init", default=None,
        help="start from the model weights of the newest checkpoint here (the previous "
        "stage's --save) when there is nothing to resume",
    )  # fmt: skip
    g.add_argument("--log-dir", default=None, help="TensorBoard and progress.txt directory")
    p.add_argument(
        "--force", action="store_true",
        help="launch (or dry-run with exit 0) a layout the planner says does not fit",
    )  # fmt: skip
    p.add_argument(
        "--dry-run", action="store_true",
        help="print the plan and exit (0, or 1 when the layout does not fit)",
    )  # fmt: skip
    p.add_argument("extra", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return p


def visible_gpus() -> int:
    """CUDA devices this process sees (0 without a CUDA build or driver)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.extra and args.extra[0] == "--":
        args.extra = args.extra[1:]
    from megatron_navil.config.registry import REGISTRY

    if args.config not in REGISTRY:
        parser.error(f"unknown config {args.config!r}; known: {', '.join(REGISTRY)}")
    try:
        plan = resolve(args)
    except ValueError as exc:
        parser.error(str(exc))
    problem = None if args.force else fit_problem(plan, args.gpu_mem, args.reserve)
    if args.dry_run:
        for line in report(plan, args.gpu_mem, args.reserve):
            print(line)
        print("command: " + shlex.join(torchrun_command(plan, args)))
        if problem:
            print(f"{parser.prog}: {problem}", file=sys.stderr)
            return 1
        return 0
    if problem:
        print(f"{parser.prog}: {problem}", file=sys.stderr)
        return 1
    have = visible_gpus()
    if have < plan.gpus_per_node:
        print(
            f"{parser.prog}: needs {plan.gpus_per_node} GPUs on each of {plan.nnodes} nodes "
            f"({plan.layout_name()}), this machine has {have}; --dry-run or DRY_RUN=1 prints "
            "the plan",
            file=sys.stderr,
        )
        return 1
    if not args.data or not args.save:
        parser.error("--data and --save are needed to train (DATA and SAVE in the scripts)")
    cmd = torchrun_command(plan, args)
    print(plan.batch_line(), flush=True)
    print("exec " + shlex.join(cmd), flush=True)
    os.execv(cmd[0], cmd)
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main())
