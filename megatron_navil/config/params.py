"""Parameter counts of a NaViL config, computed from the sizes alone (no model is built).

One formula, :func:`part_params`: the parameters of each building block (vision tower,
connector, one modality's attention, one FFN expert, the embedding table, ...) as one rank of a
tensor-parallel group holds them. :func:`param_counts` adds the blocks up for the whole model
(one rank); the layout planner (``megatron_navil.planning.params``) adds them up per pipeline
stage and rank, so the two cannot drift apart.

The model code (megatron_navil/models) is checked against these numbers by counting its
parameters on the meta device; here they document what a config means and let the registry be
checked against the paper's figures before any model exists.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_navil.config.model import NaViLConfig
from megatron_navil.config.tokens import SPECIAL_TOKENS


@dataclass(frozen=True)
class PartParams:
    """Parameters of each building block on one rank (tensor-parallel shards where split)."""

    vision: int
    """The vision encoder: every block and the patch embedding (split over ``vision_tp``)."""
    connector: int
    """Pixel-shuffle norm + MLP into the LLM width (split over ``vision_tp``)."""
    attention: int
    """One modality's q/k/v/o projections of one LLM layer (split over ``tp``) and its per-head
    q/k norms (replicated); each layer has two, text and visual."""
    norms: int
    """One LLM layer's input and post-attention RMSNorms, shared by the modalities."""
    router: int
    """One LLM layer's learned gate over each modality's experts (0 with one per modality)."""
    expert: int
    """One SwiGLU FFN expert (fc1 to 2F, fc2; split over ``expert_tp``)."""
    embedding: int
    """The vocabulary embedding table (split over ``tp``)."""
    head: int
    """The LM head (split over ``tp``); 0 when tied to the embedding table."""
    final_norm: int
    """The LLM's final RMSNorm."""
    special_tokens: int
    """The table of the 12 special tokens (replicated)."""


def part_params(
    cfg: NaViLConfig, tp: int = 1, vision_tp: int = 1, expert_tp: int = 1
) -> PartParams:
    """Each block's parameters on one rank with the LLM split over ``tp``, the vision tower and
    connector over ``vision_tp`` and the FFN experts over ``expert_tp`` (1, 1, 1: unsplit).
    Shards are floor divisions, as the layers' own sizes are (the layout checks they divide).
    """
    v, lm, e = cfg.vision, cfg.language, cfg.experts
    w, vt = v.width, vision_tp
    vision_layer = (
        3 * w * w // vt  # qkv (no bias in the released weights)
        + 2 * w // vt  # q_norm, k_norm: this rank's heads' slice of the full width
        + w * w // vt + w  # proj, bias replicated
        + w * v.mlp // vt + v.mlp // vt  # fc1 with bias
        + v.mlp * w // vt + w  # fc2, bias replicated
        + 4 * w  # norm1, norm2 (RMSNorm), ls1, ls2
    )  # fmt: skip
    vision = v.depth * vision_layer + v.channels * v.patch**2 * w + w  # + patch embedding
    m, h = cfg.merged_width, lm.hidden
    connector = 2 * m + m * h // vt + h // vt + h * h // vt + h
    hd = lm.head_dim
    attention = (lm.heads + 2 * lm.kv_heads) * hd * h // tp + lm.heads * hd * h // tp
    attention += 2 * hd if lm.qk_norm else 0  # q/k per-head norms, replicated
    table = lm.vocab * h // tp  # VocabParallelEmbedding / the LM head's ColumnParallelLinear
    return PartParams(
        vision=vision,
        connector=connector,
        attention=attention,
        norms=2 * h,
        router=0 if e.per_modality == 1 else 2 * e.per_modality * h,
        expert=3 * h * lm.ffn // expert_tp,
        embedding=table,
        head=0 if lm.tie_embeddings else table,
        final_norm=h,
        special_tokens=len(SPECIAL_TOKENS) * h,
    )


def param_counts(cfg: NaViLConfig) -> dict[str, int]:
    """Parameters by part, plus ``total`` and ``activated`` (what one text token's forward
    uses, with the vision encoder and connector: each token activates ``topk`` experts of its
    modality per layer).
    """
    p, lm, e = part_params(cfg), cfg.language, cfg.experts
    per_modality_layer = p.attention + e.per_modality * p.expert
    active_layer = p.attention + e.topk * p.expert
    embeddings = p.embedding + p.head + p.final_norm
    llm = lm.layers * (2 * per_modality_layer + p.norms + p.router) + embeddings
    llm += p.special_tokens
    counts = {
        "vision": p.vision,
        "connector": p.connector,
        "llm": llm,
        "llm_per_expert_layers": lm.layers * per_modality_layer,
        "embeddings": embeddings,
        "total": p.vision + p.connector + llm,
    }
    counts["activated"] = (
        p.vision
        + p.connector
        + lm.layers * (active_layer + p.norms + p.router)
        + embeddings
        + p.special_tokens
    )
    return counts
