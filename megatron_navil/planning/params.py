"""Parameters one rank holds in a layout, by recipe group, dense vs expert.

The blocks' sizes come from the one parameter formula, ``config.params.part_params`` (shared
with ``config.params.param_counts``); here they are placed the way the builder places them: the
LLM layers of each (virtual) pipeline stage come from ``models.build.stage_layer_ranges``
(stage 0 may get ``first_stage_layers``), stage 0 also holds the vision encoder, connector,
embedding and the 12-row special-token table, the last stage the final norm and LM head; the
vision tower splits over TP only where its heads and MLP divide (``layout.vision_tp``, else it
is replicated); attention q/k/v/o split over TP, the FFN experts over EP (whole experts) and
expert-TP (``ffn``). tests/unit/test_planner.py checks these counts against modules built on
the meta device.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_navil.config.model import NaViLConfig
from megatron_navil.config.params import PartParams, part_params
from megatron_navil.planning.layout import GROUPS, STAGE_TRAINS, Layout, vision_tp


@dataclass
class Params:
    """Parameter elements held by one rank, by recipe group, dense vs expert (the distributed
    optimizer shards these two over different data-parallel groups)."""

    dense: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))
    expert: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))

    @property
    def total(self) -> int:
        return sum(self.dense.values()) + sum(self.expert.values())

    def add(self, other: Params) -> Params:
        out = Params()
        for g in GROUPS:
            out.dense[g] = self.dense[g] + other.dense[g]
            out.expert[g] = self.expert[g] + other.expert[g]
        return out

    def trainable(self, stage: str) -> tuple[int, int]:
        """(dense, expert) elements the stage trains."""
        trains = STAGE_TRAINS[stage]
        return (
            sum(n for g, n in self.dense.items() if g in trains),
            sum(n for g, n in self.expert.items() if g in trains),
        )


def rank_parts(cfg: NaViLConfig, layout: Layout) -> PartParams:
    """The blocks' sizes on one rank of ``layout`` (its TP, the vision tower's TP, expert-TP)."""
    return part_params(cfg, layout.tp, vision_tp(cfg, layout.tp), layout.expert_tp)


def layer_params(cfg: NaViLConfig, layout: Layout, ep_rank: int = 0) -> Params:
    """One LLM decoder layer's parameters on a rank at EP rank ``ep_rank``."""
    e, p = cfg.experts, rank_parts(cfg, layout)
    out = Params()
    out.dense["text_attention"] += p.attention
    out.dense["visual_experts"] += p.attention
    out.dense["rest"] += p.norms + p.router
    local = 2 * e.per_modality // layout.ep
    for g in range(ep_rank * local, (ep_rank + 1) * local):
        group = "visual_experts" if g >= e.per_modality else "rest"
        out.expert[group] += p.expert
    return out


def stage_params(cfg: NaViLConfig, layout: Layout, stage: int, ep_rank: int = 0) -> Params:
    """Parameters of virtual pipeline stage ``stage`` on one of its ranks (TP/EP shard)."""
    from megatron_navil.models.build import stage_layer_ranges

    lm, p = cfg.language, rank_parts(cfg, layout)
    ranges = stage_layer_ranges(lm.layers, layout.stages, layout.first_stage_layers)
    out = Params()
    layer = layer_params(cfg, layout, ep_rank)
    for _ in ranges[stage]:
        out = out.add(layer)
    if stage == 0:
        out.dense["vision"] += p.vision
        out.dense["connector"] += p.connector
        out.dense["rest"] += p.embedding
        out.dense["special_tokens"] += p.special_tokens
    if stage == layout.stages - 1:
        out.dense["rest"] += p.final_norm + p.head
    return out


def rank_params(cfg: NaViLConfig, layout: Layout, pp_rank: int, ep_rank: int = 0) -> Params:
    """All chunks of pipeline rank ``pp_rank`` (virtual stages ``c * pp + pp_rank``)."""
    out = Params()
    for chunk in range(layout.vpp):
        out = out.add(stage_params(cfg, layout, chunk * layout.pp + pp_rank, ep_rank))
    return out
