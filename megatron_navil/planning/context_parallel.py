"""Memory and communication of context parallelism (``--cp``) on top of the planner's model of a
layout without it (``planning.memory``), and the longest packed sequence a layout fits.

A layout with ``cp`` CP ranks per data-parallel replica is, per GPU, the planner's layout with:

  seq_length  ``S / cp``      (each rank keeps 2 of the ``2 cp`` chunks)
  patches     ``P / cp``      (the vision tower is data-parallel over the CP ranks, by cost)
  dp          ``dp * cp``     (megatron-core's distributed optimizer shards over DP x CP)

plus what CP adds: each layer keeps the all-gathered keys and values for its backward, the
``(cp - 1) / cp`` of them that are other ranks' (``S x 2 x kv_heads / tp x head_dim`` elements
per layer; under full recompute only the layer being recomputed holds them). Communication per
layer and micro-batch: the forward all-gather receives those bytes, the backward's
reduce-scatter sends as many. Attention FLOPs per rank are the sequence's over ``cp`` (the
chunk pairing balances the causal work). Not modelled: the transient per-chunk attention mask
of the CPU path.
"""

from __future__ import annotations

import dataclasses

from megatron_navil.config.model import NaViLConfig
from megatron_navil.planning.activations import element_bytes
from megatron_navil.planning.layout import GiB, Layout
from megatron_navil.planning.memory import peak_rank, plan_memory


def per_rank_layout(layout: Layout, cp: int) -> Layout:
    """The planner's layout one CP rank of ``layout`` (with ``cp`` ranks) looks like."""
    if cp < 1 or layout.seq_length % (2 * cp):
        raise ValueError(f"--seq-length {layout.seq_length} does not split into 2*cp={2 * cp}")
    return dataclasses.replace(
        layout,
        seq_length=layout.seq_length // cp,
        patches=max(layout.patches // cp, 1),
        dp=layout.dp * cp,
    )


def gathered_kv_bytes(cfg: NaViLConfig, layout: Layout, cp: int, layers: int) -> float:
    """Bytes of other ranks' keys and values ``layers`` layers keep (``layout.seq_length`` is
    the whole sequence); also one layer's all-gather volume per rank with ``layers=1``."""
    lm = cfg.language
    per_layer = layout.seq_length * 2 * (lm.kv_heads // layout.tp) * lm.head_dim
    return (cp - 1) / cp * per_layer * element_bytes(layout) * layers


def peak_bytes(cfg: NaViLConfig, layout: Layout, cp: int) -> float:
    """Peak bytes on the fullest GPU of ``layout`` with ``cp`` CP ranks (``layout.dp`` = the
    data-parallel replicas, without CP)."""
    peak = peak_rank(plan_memory(cfg, per_rank_layout(layout, cp))).total
    kept = 1 if layout.recompute == "full" else cfg.language.layers // layout.pp
    return peak + gathered_kv_bytes(cfg, layout, cp, kept)


def longest_sequence(
    cfg: NaViLConfig, layout: Layout, cp: int, capacity_gib: float, step: int = 8192
) -> int | None:
    """The longest ``--seq-length`` (a multiple of ``step`` and of ``2 cp``) whose peak fits
    ``capacity_gib``, the patch budget scaled with the sequence (``layout``'s patches per
    token); None if not even ``step``."""
    best, length = None, step
    while True:
        patches = max(layout.patches * length // layout.seq_length, 1)
        trial = dataclasses.replace(layout, seq_length=length, patches=patches)
        try:
            fits = peak_bytes(cfg, trial, cp) / GiB <= capacity_gib
        except ValueError:
            return best
        if not fits:
            return best
        best, length = length, length + step
