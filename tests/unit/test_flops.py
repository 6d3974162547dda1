"""training/flops.py: a packed batch's model FLOPs counted by hand from the config's sizes
(real samples only, one attention block per image segment), the GPU peak table, and the
loop's MFU line from a known step."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from megatron_navil.config.registry import get_config
from megatron_navil.training import flops as F


def _hand_flops(cfg, lengths: list[int], segments: list[int]) -> float:
    """Forward + backward = 3 x forward = 6 x (multiply-adds) per matmul parameter per token."""
    lm, v, e = cfg.language, cfg.vision, cfg.experts
    h, d, hidden = lm.heads, lm.head_dim, lm.hidden
    per_layer = (h + 2 * lm.kv_heads) * d * hidden + h * d * hidden  # q, k, v, o (one modality)
    per_layer += e.topk * 3 * hidden * lm.ffn  # SwiGLU expert(s): fc1 (2F) + fc2
    llm_params = lm.layers * per_layer + lm.vocab * hidden  # + LM head
    tokens = sum(lengths)
    llm = 6 * llm_params * tokens + sum(6 * lm.layers * h * d * s * s for s in lengths)
    w = v.width
    vis_params = v.depth * (4 * w * w + 2 * w * v.mlp) + v.channels * v.patch**2 * w
    patches = sum(segments)
    vision = 6 * vis_params * patches + sum(12 * v.depth * w * s * s for s in segments)
    merged = cfg.merged_width  # pixel shuffle: merge^2 patches -> one token
    vision += 6 * (merged * hidden + hidden * hidden) * patches / cfg.connector.merge**2
    return llm + vision


def test_batch_flops_counts_real_samples_and_image_segments():
    cfg = get_config("tiny")
    # Two samples (100 and 128 tokens) and a padding segment up to 512; two image segments
    # (an image of 64 patches and its 16-patch scale).
    batch = SimpleNamespace(
        cu_seqlens=torch.tensor([0, 100, 228, 512], dtype=torch.int32),
        num_samples=2,
        vision_cu_seqlens=torch.tensor([0, 64, 80], dtype=torch.int32),
    )
    want = _hand_flops(cfg, [100, 128], [64, 16])
    assert F.batch_flops(cfg, batch) == pytest.approx(want, rel=1e-12)
    # Padding does not count; a text-only batch has no vision FLOPs.
    text = SimpleNamespace(
        cu_seqlens=torch.tensor([0, 300, 512], dtype=torch.int32), num_samples=1,
        vision_cu_seqlens=torch.tensor([0], dtype=torch.int32),
    )  # fmt: skip
    assert F.batch_flops(cfg, text) == pytest.approx(_hand_flops(cfg, [300], []), rel=1e-12)
    assert F.batch_flops(cfg, batch) > F.sequence_flops(cfg, [100, 128], [])


@pytest.mark.parametrize(
    ("name", "tflops"),
    [
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H200", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("Tesla V100-SXM2-32GB", None),
    ],
)
def test_peak_table(name, tflops):
    assert F.peak_tflops_for(name) == tflops


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU behaviour")
def test_no_peak_on_cpu():
    assert F.detect_peak_flops() is None


def test_loop_logs_mfu_of_the_step(tmp_path, monkeypatch):
    """The loop's logger: MFU = the step's model FLOPs / (seconds x world x peak)."""
    from megatron_navil.training import loop as L
    from megatron_navil.training.step import StepResult

    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    cfg = L.LoopConfig(
        steps=1, seq_length=8, log_dir=str(tmp_path), progress_bar=False,
        flops_per_step=F.step_model_flops, peak_flops=2e12,
    )  # fmt: skip
    logger = L._Logger(cfg, 0)
    result = StepResult(
        loss=1.0, grad_norm=1.0, skipped=False, loss_tokens=5, tokens=8, patches=0, lr=1e-3,
        model_flops=3e12,
    )  # fmt: skip
    logger.log(1, result, seconds=0.5, world=4)
    logger.writer.close()
    logger.progress_file.close()
    line = json.loads((tmp_path / "progress.txt").read_text())
    assert line["model_flops"] == 3e12
    assert line["mfu"] == pytest.approx(3e12 / 0.5 / (4 * 2e12), rel=1e-15)  # 0.375
