"""Search for the layouts that fit a cluster: every valid layout of ``gpus`` GPUs with its most
loaded rank's memory, ranked by a stated, coarse step-time model (``tools/plan_layout.py
--search``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from megatron_navil.config.model import NaViLConfig
from megatron_navil.planning.activations import routed_factor
from megatron_navil.planning.flops import llm_flops, plan_flops, vision_flops, vmp_segments
from megatron_navil.planning.layout import RECOMPUTE, GiB, Layout, micro_batches
from megatron_navil.planning.memory import RankMemory, peak_rank, plan_memory


def balanced_first_stage_layers(cfg: NaViLConfig, layout: Layout) -> int:
    """LLM layers for stage 0 so that its FLOPs (vision tower + connector + layers) match an
    even share of the total per virtual stage (never negative)."""
    lm = cfg.language
    seq = layout.seq_length
    per_layer = llm_flops(replace_layers(cfg, 1), [seq]) - 6 * lm.vocab * lm.hidden * seq
    vis = vision_flops(cfg, vmp_segments(layout.patches, layout.max_image_patches))
    total = lm.layers * per_layer + vis
    share = total / layout.stages
    return max(0, min(lm.layers, round((share - vis) / per_layer)))


def replace_layers(cfg: NaViLConfig, layers: int) -> NaViLConfig:
    return cfg.replace(language=replace(cfg.language, layers=layers))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(
    cfg: NaViLConfig,
    base: Layout,
    gpus: int,
    gpus_per_node: int = 8,
    recompute: Sequence[str] = RECOMPUTE,
) -> list[Layout]:
    """Valid layouts for ``gpus`` GPUs: TP within a node, PP dividing the layers (or with the
    FLOP-balanced ``first_stage_layers``), VPP 1/2, EP dividing the experts, each of the
    ``recompute`` modes for the LLM layers and for the vision blocks."""
    out: list[Layout] = []
    lm = cfg.language
    for tp in [d for d in _divisors(gpus) if d <= gpus_per_node]:
        for pp in _divisors(gpus // tp):
            if pp > lm.layers:
                continue
            dp = gpus // (tp * pp)
            for vpp in (1, 2) if pp > 1 else (1,):
                for ep in _divisors(2 * cfg.experts.per_modality):
                    firsts: list[int | None] = [None]
                    if pp > 1:
                        trial = replace(base, tp=tp, pp=pp, vpp=vpp, ep=ep, dp=dp)
                        firsts.append(balanced_first_stage_layers(cfg, trial))
                    for first in dict.fromkeys(firsts):
                        for rc in recompute:
                            for vrc in recompute:
                                layout = replace(
                                    base, tp=tp, pp=pp, vpp=vpp, ep=ep, dp=dp, etp=None,
                                    first_stage_layers=first, recompute=rc,
                                    vision_recompute=vrc,
                                )  # fmt: skip
                                try:
                                    layout.validate(cfg)
                                except ValueError:
                                    continue
                                out.append(layout)
    return out


TP_COST = 0.08  # step-time cost of each doubling of TP (SP all-gather / reduce-scatter)
SELECTIVE_COST = 0.05  # recomputed norms / activations: a few % of the forward FLOPs


def relative_step_time(cfg: NaViLConfig, layout: Layout) -> float:
    """A stated, coarse cost model to rank layouts (1.0 = perfect scaling of the model FLOPs
    over the GPUs): ``(1 + recompute) x (1 + 0.08 log2 tp) x (1 + (pp - 1) / (vpp m))
    x expert imbalance``. Recompute: a full recompute re-runs its part's forward (a third of
    its model FLOPs), selective about 5% of it; the pipeline bubble with ``m`` micro-batches
    per replica; EP > 1: the FFN (about its FLOP share) runs at the most loaded rank's pace
    ``r`` (hard modality routing)."""
    flops = plan_flops(cfg, layout)
    llm, vis = flops.llm_per_sequence, flops.vision_per_sequence
    extra = {"none": 0.0, "selective": SELECTIVE_COST / 3, "full": 1.0 / 3}
    recompute = (llm * extra[layout.recompute] + vis * extra[layout.vision_rc]) / (llm + vis)
    tp_cost = 1 + TP_COST * math.log2(layout.tp)
    bubble = 1 + (layout.pp - 1) / (layout.vpp * micro_batches(layout))
    lm = cfg.language
    ffn_share = (
        3 * lm.ffn / (3 * lm.ffn + 2 * lm.heads * lm.head_dim + 2 * lm.kv_heads * lm.head_dim)
    )
    ffn_share *= llm / (llm + vis)
    imbalance = 1 + ffn_share * (routed_factor(cfg, layout) / cfg.experts.topk - 1)
    imbalance = max(imbalance, 1.0)
    return (1 + recompute) * tp_cost * bubble * imbalance


@dataclass(frozen=True)
class SearchRow:
    layout: Layout
    peak: RankMemory
    fits: bool
    step_time: float  # relative_step_time


def search(
    cfg: NaViLConfig,
    base: Layout,
    gpus: int,
    gpu_mem_gib: float,
    reserve_gib: float,
    gpus_per_node: int = 8,
    recompute: Sequence[str] = RECOMPUTE,
) -> list[SearchRow]:
    """Every candidate with its most loaded rank, sorted: fitting layouts first, by
    :func:`relative_step_time`, then fewer model-parallel ranks (TP x PP), then less memory
    (the first row is the recommendation when it fits)."""
    rows = []
    for layout in candidates(cfg, base, gpus, gpus_per_node, recompute):
        peak = peak_rank(plan_memory(cfg, layout))
        fits = peak.total / GiB + reserve_gib <= gpu_mem_gib
        rows.append(SearchRow(layout, peak, fits, relative_step_time(cfg, layout)))
    rows.sort(
        key=lambda r: (
            not r.fits, round(r.step_time, 4), r.layout.tp * r.layout.pp, r.peak.total
        )
    )  # fmt: skip
    return rows
