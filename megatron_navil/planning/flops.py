"""Model FLOPs of a NaViL model from the sizes alone (no recompute; 3 x forward, matmuls only).

LLM ``6 N_act t`` with ``N_act`` the matmul parameters one token uses (its modality's q/k/v/o,
``topk`` experts, the LM head), plus causal attention ``6 L h d s^2`` per sample of length
``s`` (flash skips the masked half); vision ``6 N_vis p`` plus bidirectional attention
``12 depth W s^2`` per image segment (each image and scale is its own segment); connector
``6 (4WH + H^2)`` per merged token. ``training/flops.py`` counts MFU with the same functions
over the samples a step really trained on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megatron_navil.config.model import NaViLConfig
from megatron_navil.planning.layout import Layout, micro_batches


def llm_matmul_params(cfg: NaViLConfig) -> int:
    """Matmul parameters one LLM token uses (its modality's q/k/v/o, ``topk`` SwiGLU experts,
    the LM head); embeddings are a lookup, norms and the gate are negligible."""
    lm, e = cfg.language, cfg.experts
    hd = lm.head_dim
    attention = (lm.heads + 2 * lm.kv_heads) * hd * lm.hidden + lm.heads * hd * lm.hidden
    ffn = e.topk * 3 * lm.hidden * lm.ffn
    return lm.layers * (attention + ffn) + lm.vocab * lm.hidden


def vision_matmul_params(cfg: NaViLConfig) -> int:
    v = cfg.vision
    w = v.width
    return v.depth * (4 * w * w + 2 * w * v.mlp) + v.channels * v.patch**2 * w


def llm_flops(cfg: NaViLConfig, sample_lengths: Sequence[int]) -> float:
    """Model FLOPs (forward + backward) of one packed sequence of these samples (the real,
    non-padding ones for MFU)."""
    lm = cfg.language
    tokens = sum(sample_lengths)
    attention = sum(6 * lm.layers * lm.heads * lm.head_dim * s * s for s in sample_lengths)
    return 6 * llm_matmul_params(cfg) * tokens + attention


def vision_flops(cfg: NaViLConfig, segment_patches: Sequence[int]) -> float:
    """Model FLOPs of the vision encoder and connector for these image segments (one per
    image and scale, in patches)."""
    v, lm = cfg.vision, cfg.language
    patches = sum(segment_patches)
    attention = sum(12 * v.depth * v.width * s * s for s in segment_patches)
    connector = 6 * (cfg.merged_width * lm.hidden + lm.hidden**2) * patches / cfg.connector.merge**2
    return 6 * vision_matmul_params(cfg) * patches + attention + connector


def vmp_segments(patches: int, max_image_patches: int, min_patches: int = 256) -> list[int]:
    """Image segments filling a patch budget: largest images first, each with its multi-scale
    copies (area halving until below ``min_patches``), the largest attention cost a budget
    can carry; an estimate for planning (training counts its real segments)."""
    out: list[int] = []
    left = patches
    while left > 0:
        scale = min(max_image_patches, left)
        out.append(scale)  # the base scale, even below min_patches (a budget's remainder)
        left -= scale
        scale //= 2
        while scale >= min(min_patches, max_image_patches) and left > 0:
            take = min(scale, left)
            out.append(take)
            left -= take
            scale //= 2
    return out


@dataclass(frozen=True)
class Flops:
    """Model FLOPs per sequence and per step."""

    llm_per_sequence: float
    vision_per_sequence: float
    per_step: float
    sequences_per_step: int

    @property
    def per_sequence(self) -> float:
        return self.llm_per_sequence + self.vision_per_sequence


def plan_flops(cfg: NaViLConfig, layout: Layout, sample_length: int | None = None) -> Flops:
    """FLOPs of micro-batches of one ``sample_length`` sample (default: the whole sequence)
    and ``layout.patches`` patches in :func:`vmp_segments`."""
    s = sample_length or layout.seq_length
    samples = [s] * (layout.seq_length // s)
    llm = llm_flops(cfg, samples)
    vis = vision_flops(cfg, vmp_segments(layout.patches, layout.max_image_patches))
    seqs = micro_batches(layout) * layout.dp
    return Flops(llm, vis, (llm + vis) * seqs, seqs)
