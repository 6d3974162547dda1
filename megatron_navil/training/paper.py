"""The paper's NaViL-2B / NaViL-9B training stages on H100 nodes, as functions.

``navil_2b(stage)`` and ``navil_9b(stage)`` return a :class:`PaperStage`: the paper's steps and
samples per step (../shared/NAVIL.md, "Training recipe") and the layout this project runs them
with. ``launch.py`` takes its defaults from them (every flag overrides), and the example scripts
(``examples/pretrain_navil_{2b,9b}.sh``) only name the model, so a layout is chosen in one place.
The optimizer side of a stage (what trains, LR, schedule, weight decay) is
``training.recipes.StageRecipe``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SEQ_LENGTH = 16_384  # "packed sequences of 16,384 tokens"
PAPER_TOTAL_TOKENS = {"navil-2b": 800e9, "navil-9b": 450e9}  # "~800B (2B), ~450B (9B)"
STAGES = ("s1.1", "s1.2", "s2")


@dataclass(frozen=True)
class PaperStage:
    """One stage of the paper for one model, with the layout it runs with here."""

    config: str
    stage: str
    steps: int  # the paper's optimizer steps
    samples_per_step: int  # the paper's batch, in samples
    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    recompute_llm: str = "selective"
    recompute_vision: str = "full"
    seq_length: int = SEQ_LENGTH


def _check(stage: str) -> None:
    if stage not in STAGES:
        raise ValueError(f"--stage {stage!r}: one of {', '.join(STAGES)}")


def navil_2b(stage: str) -> PaperStage:
    """NaViL-2B: TP1 PP1, data parallel over every GPU, selective LLM / full vision recompute.

    ``tools/plan_layout.py navil-2b --search --gpus 64 --gpu-mem 79.6`` at S2 (16,384 tokens and
    49,152 patches per sequence, the heaviest stage) finds nothing that fits without recompute;
    with these recompute modes this is its fastest fitting layout, and it fits S1.1 and S1.2
    as well, so the stages hand over checkpoints without resharding. (The search ranks TP4
    first when unconstrained, but the 2B vision tower's 23 heads do not split over TP, so
    every TP rank would run the whole tower.)"""
    _check(stage)
    steps, samples = {"s1.1": (70_000, 7_000), "s1.2": (40_000, 4_614), "s2": (30_000, 2_234)}[
        stage
    ]
    return PaperStage("navil-2b", stage, steps, samples, tp=1)


def navil_9b(stage: str) -> PaperStage:
    """NaViL-9B: TP4 PP1 inside each node, selective LLM / full vision recompute.

    ``tools/plan_layout.py navil-9b --search --gpus 64 --gpu-mem 79.6`` at S2 recommends this
    layout; nothing fits without recompute, and the next fitting layouts with these recompute
    modes (TP4 PP2, with or without VPP2) are slower in its cost model (pipeline bubble). The
    same layout fits S1.1 and S1.2."""
    _check(stage)
    steps, samples = {"s1.1": (50_000, 10_300), "s1.2": (33_000, 1_792), "s2": (6_000, 3_520)}[
        stage
    ]
    return PaperStage("navil-9b", stage, steps, samples, tp=4)


PAPER_RECIPES: dict[str, Callable[[str], PaperStage]] = {
    "navil-2b": navil_2b,
    "navil-9b": navil_9b,
}


def paper_stage(config: str, stage: str) -> PaperStage | None:
    """The paper's ``stage`` of model ``config``, or None for a model the paper did not train;
    ValueError for an unknown stage."""
    _check(stage)
    recipe = PAPER_RECIPES.get(config)
    return recipe(stage) if recipe else None


def paper_sample_tokens(config: str) -> float:
    """Mean tokens per sample implied by the paper: total tokens over total samples."""
    runs = [PAPER_RECIPES[config](s) for s in STAGES]
    return PAPER_TOTAL_TOKENS[config] / sum(r.steps * r.samples_per_step for r in runs)
