"""Model FLOPs of the batches a step really trained on, and the accelerator's peak, for MFU.

MFU = (model FLOPs of the step) / (step seconds x GPUs x peak FLOP/s per GPU). Model FLOPs are
the planner's (``planning.flops.llm_flops`` + ``vision_flops``: forward + backward matmuls,
causal attention per sample, bidirectional attention per image segment, no recompute) over the
*real* samples of each packed sequence (the padding segment does not count) and its real image
segments (one per image and scale), so padding and recompute never inflate the number.

Peaks are dense bf16 tensor-core FLOP/s from the vendors' data sheets (no sparsity).
"""

from __future__ import annotations

import itertools
from typing import Any

# Dense bf16 peak TFLOP/s by device-name substring; the first match wins (specific first).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM / HBM3
    ("H200", 989.0),
    ("GH200", 989.0),
    ("A100", 312.0),
)


def peak_tflops_for(device_name: str) -> float | None:
    """Dense bf16 peak TFLOP/s of a device called ``device_name`` (as
    ``torch.cuda.get_device_name`` spells it), None when unknown."""
    for key, tflops in PEAK_TFLOPS:
        if key.lower() in device_name.lower():
            return tflops
    return None


def detect_peak_flops() -> float | None:
    """Peak FLOP/s of this process's GPU, None on CPU or for an unknown GPU (MFU is then not
    logged unless ``--peak-tflops`` is given)."""
    import torch

    if not torch.cuda.is_available():
        return None
    tflops = peak_tflops_for(torch.cuda.get_device_name(torch.cuda.current_device()))
    return None if tflops is None else tflops * 1e12


def sequence_flops(cfg: Any, sample_lengths: list[int], segment_patches: list[int]) -> float:
    """Model FLOPs (forward + backward) of one packed sequence with these real samples (LLM
    tokens each) and image segments (patches each) for NaViL config ``cfg``."""
    from megatron_navil.planning.flops import llm_flops, vision_flops

    out = llm_flops(cfg, sample_lengths)
    if segment_patches:
        out += vision_flops(cfg, segment_patches)
    return out


def batch_flops(cfg: Any, batch: Any) -> float:
    """:func:`sequence_flops` of a ``data.batch.PackedBatch``: its first ``num_samples``
    ``cu_seqlens`` segments (the padding segment excluded) and its ``vision_cu_seqlens``."""
    cu = batch.cu_seqlens.tolist()[: batch.num_samples + 1]
    lengths = [b - a for a, b in itertools.pairwise(cu)]
    segments = [b - a for a, b in itertools.pairwise(batch.vision_cu_seqlens.tolist()) if b > a]
    return sequence_flops(cfg, lengths, segments)


def step_model_flops(result: Any) -> float:
    """``LoopConfig.flops_per_step``: the global batch's model FLOPs that ``train_step``
    summed over micro-batches and data-parallel ranks (``StepResult.model_flops``)."""
    return float(result.model_flops)


def cost_model(cfg: Any) -> Any:
    """The data pipeline's ``data.cost.CostModel`` of NaViL config ``cfg``: the FLOP counter's
    formulas (``planning.flops``) split into their four terms (LLM tokens, squared sample
    length, patches, squared patches per image segment), by evaluating them at lengths 1 and 2
    (each is ``a n + b n**2``). One cost unit is a 64th of one LLM token's linear FLOPs, fine
    enough that rounding a sample's cost to units changes nothing that matters."""
    from megatron_navil.data.cost import CostModel
    from megatron_navil.planning.flops import llm_flops, vision_flops

    def terms(f: Any) -> tuple[float, float]:
        one, two = f([1]), f([2])
        quadratic = (two - 2 * one) / 2
        return one - quadratic, quadratic

    token, token_sq = terms(lambda n: llm_flops(cfg, n))
    patch, patch_sq = terms(lambda n: vision_flops(cfg, n))
    return CostModel(token, token_sq, patch, patch_sq, unit=token / 64)
