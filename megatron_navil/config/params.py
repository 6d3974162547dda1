"""Parameter counts of a NaViL config, computed from the sizes alone (no model is built).

The model code (megatron_navil/models) is checked against these numbers by counting its
parameters on the meta device; here they document what a config means and let the registry be
checked against the paper's figures before any model exists.
"""

from __future__ import annotations

from megatron_navil.config.model import NaViLConfig
from megatron_navil.config.tokens import SPECIAL_TOKENS


def param_counts(cfg: NaViLConfig) -> dict[str, int]:
    """Parameters by part, plus ``total`` and ``activated`` (what one text token's forward
    uses, with the vision encoder and connector: each token activates one expert per layer).
    """
    v, lm, e = cfg.vision, cfg.language, cfg.experts
    w, p = v.width, v.patch
    vision_layer = (
        3 * w * w  # qkv (no bias in the released weights)
        + w * w
        + w  # proj with bias
        + 2 * w  # q_norm, k_norm over the full width
        + w * v.mlp
        + v.mlp
        + v.mlp * w
        + w  # fc1, fc2 with bias
        + 2 * w  # norm1, norm2 (RMSNorm)
        + 2 * w  # ls1, ls2
    )
    vision = v.depth * vision_layer + v.channels * p * p * w + w  # + patch embedding
    m = cfg.merged_width
    connector = 2 * m + m * lm.hidden + lm.hidden + lm.hidden * lm.hidden + lm.hidden
    h, hd = lm.hidden, lm.head_dim
    attention = h * lm.heads * hd + 2 * h * lm.kv_heads * hd + lm.heads * hd * h
    attention += 2 * hd if lm.qk_norm else 0
    ffn = 3 * h * lm.ffn
    norms = 2 * h  # input and post-attention RMSNorm, shared by the experts
    per_modality_layer = attention + e.per_modality * ffn
    active_layer = attention + e.topk * ffn
    router = 0 if e.per_modality == 1 else 2 * h * e.per_modality
    embeddings = lm.vocab * h * (1 if lm.tie_embeddings else 2) + h  # + final norm
    special = len(SPECIAL_TOKENS) * h
    llm = lm.layers * (2 * per_modality_layer + norms + router) + embeddings + special
    counts = {
        "vision": vision,
        "connector": connector,
        "llm": llm,
        "llm_per_expert_layers": lm.layers * per_modality_layer,
        "embeddings": embeddings,
        "total": vision + connector + llm,
    }
    counts["activated"] = (
        vision + connector + lm.layers * (active_layer + norms + router) + embeddings + special
    )
    return counts
