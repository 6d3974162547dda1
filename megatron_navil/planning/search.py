"""Search for the layouts that fit a cluster: every valid layout of ``gpus`` GPUs with its most
loaded rank's memory, ranked by the predicted step time (``planning.predict``;
``tools/plan_layout.py --search``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from megatron_navil.config.model import NaViLConfig
from megatron_navil.planning.flops import llm_flops, vision_flops, vmp_segments
from megatron_navil.planning.hardware import Hardware, get_gpu
from megatron_navil.planning.layout import RECOMPUTE, GiB, Layout
from megatron_navil.planning.memory import RankMemory, peak_rank, plan_memory
from megatron_navil.planning.predict import Prediction, predict


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
    global_batch: int | None = None,
) -> list[Layout]:
    """Valid layouts for ``gpus`` GPUs: TP within a node, PP dividing the layers (or with the
    FLOP-balanced ``first_stage_layers``), VPP 1/2, EP dividing the experts, each of the
    ``recompute`` modes for the LLM layers and for the vision blocks. ``global_batch``
    (sequences per step): each layout's micro-batches are ``global_batch / dp`` (at least 1)
    instead of ``base.micro_batches``."""
    out: list[Layout] = []
    lm = cfg.language
    for tp in [d for d in _divisors(gpus) if d <= gpus_per_node]:
        for pp in _divisors(gpus // tp):
            if pp > lm.layers:
                continue
            dp = gpus // (tp * pp)
            m = base.micro_batches if global_batch is None else max(1, round(global_batch / dp))
            for vpp in (1, 2) if pp > 1 else (1,):
                for ep in _divisors(2 * cfg.experts.per_modality):
                    firsts: list[int | None] = [None]
                    if pp > 1:
                        trial = replace(base, tp=tp, pp=pp, vpp=vpp, ep=ep, dp=dp,
                                        micro_batches=m)  # fmt: skip
                        firsts.append(balanced_first_stage_layers(cfg, trial))
                    for first in dict.fromkeys(firsts):
                        for rc in recompute:
                            for vrc in recompute:
                                layout = replace(
                                    base, tp=tp, pp=pp, vpp=vpp, ep=ep, dp=dp, etp=None,
                                    micro_batches=m,
                                    first_stage_layers=first, recompute=rc,
                                    vision_recompute=vrc,
                                )  # fmt: skip
                                try:
                                    layout.validate(cfg)
                                except ValueError:
                                    continue
                                out.append(layout)
    return out


@dataclass(frozen=True)
class SearchRow:
    layout: Layout
    peak: RankMemory
    fits: bool
    prediction: Prediction  # planning.predict: step time and its breakdown

    @property
    def step_time(self) -> float:
        """Predicted seconds per step."""
        return self.prediction.step_s


def search(
    cfg: NaViLConfig,
    base: Layout,
    gpus: int,
    gpu_mem_gib: float,
    reserve_gib: float,
    gpus_per_node: int = 8,
    recompute: Sequence[str] = RECOMPUTE,
    hw: Hardware | None = None,
    sample_length: int | None = None,
    global_batch: int | None = None,
) -> list[SearchRow]:
    """Every candidate with its most loaded rank, sorted: fitting layouts first, by the
    predicted step time on ``hw`` (default H100; ``planning.predict``), then fewer
    model-parallel ranks (TP x PP), then less memory (the first row is the recommendation
    when it fits); ``global_batch``: see :func:`candidates`."""
    hw = hw or get_gpu("h100")
    rows = []
    for layout in candidates(cfg, base, gpus, gpus_per_node, recompute, global_batch):
        peak = peak_rank(plan_memory(cfg, layout))
        fits = peak.total / GiB + reserve_gib <= gpu_mem_gib
        rows.append(SearchRow(layout, peak, fits, predict(cfg, layout, hw, sample_length)))
    rows.sort(
        key=lambda r: (
            not r.fits, round(r.step_time, 6), r.layout.tp * r.layout.pp, r.peak.total
        )
    )  # fmt: skip
    return rows
