"""The same inputs through megatron_navil and through the exported HF model; logit differences.

Megatron takes one packed sequence (samples back to back, ``cu_seqlens``, per-sample position
ids); HF takes the same samples as a left-padded batch ``[B, T]`` with an attention mask. Both
get the same patches (every scale of every image, packed in order) and patch grids. The
megatron side runs in one rank (TP = PP = EP = 1; dist checkpoints load in any layout), the
HF side in plain eager PyTorch.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_navil.config.model import NaViLConfig

Grid = tuple[int, int]

# Several images of different sizes, multi-scale (two scales in one block), two images in one
# sample, and a text-only sample: patch grids per scale, smallest first.
DEFAULT_SAMPLES: tuple[tuple[int, tuple[tuple[Grid, ...], ...], int], ...] = (
    (5, (((2, 4), (4, 6)),), 7),
    (3, (((2, 2),), ((4, 2), (6, 4))), 4),
    (9, (), 0),
    (2, (((4, 4), (6, 8)),), 3),
)


@dataclass
class ParityInputs:
    """Both views of the same samples."""

    packed: dict[str, torch.Tensor]  # NaViLModel.forward kwargs (no labels)
    spans: list[tuple[int, int]]  # each sample's [start, end) in the packed sequence
    input_ids: torch.Tensor  # [B, T] left-padded
    attention_mask: torch.Tensor  # [B, T]
    pixel_values: torch.Tensor | None  # [p, 3 * patch * patch]
    image_grid_hw: torch.Tensor | None  # [segments, 2]


def make_inputs(
    cfg: NaViLConfig,
    special_ids: Sequence[int],
    seed: int = 0,
    samples: Sequence[tuple[int, Sequence[Sequence[Grid]], int]] = DEFAULT_SAMPLES,
    text_vocab: int | None = None,
) -> ParityInputs:
    """Random text ids (below ``text_vocab``, default the LM vocabulary; never one of the 12
    special ids) around image blocks, random patch values."""
    from megatron_navil.ops import image_token_layout, vision_kwargs

    gen = torch.Generator().manual_seed(seed)
    merge, patch = cfg.connector.merge, cfg.vision.patch
    special = torch.tensor(list(special_ids))
    taken = set(special_ids)
    allowed = torch.tensor([i for i in range(text_vocab or cfg.language.vocab) if i not in taken])

    def text(n: int) -> torch.Tensor:
        return allowed[torch.randint(0, len(allowed), (n,), generator=gen)]

    seqs, grids = [], []
    for before, images, after in samples:
        parts = [text(before)]
        for scales in images:
            parts.append(special[image_token_layout([(h // merge, w // merge) for h, w in scales])])
            grids.extend(scales)
        parts.append(text(after))
        seqs.append(torch.cat(parts))
    lengths = [len(s) for s in seqs]
    spans, start = [], 0
    for n in lengths:
        spans.append((start, start + n))
        start += n
    packed: dict[str, torch.Tensor] = {
        "input_ids": torch.cat(seqs),
        "position_ids": torch.cat([torch.arange(n) for n in lengths]),
        "cu_seqlens": torch.tensor([0, *[e for _, e in spans]], dtype=torch.int32),
    }
    pixel_values = grid_tensor = None
    if grids:
        n = sum(h * w for h, w in grids)
        pixel_values = torch.randn(n, cfg.vision.channels * patch * patch, generator=gen)
        grid_tensor = torch.tensor(grids, dtype=torch.long)
        packed["patches"] = pixel_values
        packed.update(vision_kwargs(grids, merge, cfg.vision.window_units(merge)))
    width = max(lengths)
    ids = torch.zeros(len(seqs), width, dtype=torch.long)
    mask = torch.zeros(len(seqs), width, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = s
        mask[i, width - len(s) :] = 1
    return ParityInputs(packed, spans, ids, mask, pixel_values, grid_tensor)


def megatron_logits_rank(
    checkpoint: str, cfg_dict: dict, special_ids: tuple, inputs: bytes
) -> bytes:
    """In a 1-rank process: load ``checkpoint`` at TP = PP = EP = 1, return pickled fp32 logits
    ``[t, V]`` of the packed inputs."""
    import warnings

    from megatron_navil.checkpoint.store import load
    from megatron_navil.config.io import config_from_dict
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize

    warnings.filterwarnings("ignore")
    groups = initialize()
    cfg = config_from_dict(cfg_dict)
    (model,) = build_model(cfg, transformer_config(cfg), groups, special_ids=special_ids)
    load(checkpoint, [model], None)
    model.eval()
    packed = pickle.loads(inputs)
    with torch.no_grad():
        logits = model(**packed)[:, 0].float().clone()
    return pickle.dumps(logits)


def megatron_logits(
    checkpoint: str | Path, cfg: NaViLConfig, special_ids: Sequence[int], inputs: ParityInputs
) -> torch.Tensor:
    """``[t, V]`` logits of ``inputs.packed`` from a spawned 1-rank megatron process."""
    from megatron_navil.config.io import config_to_dict
    from megatron_navil.parallel.spawn import run_distributed

    out = run_distributed(
        megatron_logits_rank, 1, str(checkpoint), config_to_dict(cfg), tuple(special_ids),
        pickle.dumps(inputs.packed), timeout=3600,
    )  # fmt: skip
    return pickle.loads(out[0])


def load_hf(directory: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """``AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)`` in eval."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        str(directory), trust_remote_code=True, dtype=dtype
    )
    return model.eval()


def hf_logits(model: Any, inputs: ParityInputs) -> torch.Tensor:
    """``[B, T, V]`` fp32 logits of the padded batch."""
    with torch.no_grad():
        out = model(
            input_ids=inputs.input_ids,
            attention_mask=inputs.attention_mask,
            pixel_values=inputs.pixel_values,
            image_grid_hw=inputs.image_grid_hw,
        )
    return out.logits.float()


def differences(meg: torch.Tensor, hf: torch.Tensor, inputs: ParityInputs) -> dict[str, float]:
    """Max |meg - hf| over every real token of every sample, and that over max |meg|."""
    width = hf.shape[1]
    worst = scale = 0.0
    for i, (start, end) in enumerate(inputs.spans):
        a = meg[start:end]
        b = hf[i, width - (end - start) :, : a.shape[-1]]
        worst = max(worst, float((a - b).abs().max()))
        scale = max(scale, float(a.abs().max()))
    return {"max_abs": worst, "max_rel": worst / (scale or 1.0), "max_logit": scale}
