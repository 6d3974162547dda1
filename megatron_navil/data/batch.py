"""The packed micro-batch the data pipeline yields, and its loss weights.

Layouts (one packed sequence; ``t`` LLM tokens, ``p`` patches, ``m`` real samples):
  input_ids          int64 ``[t]``   text ids with every image placeholder expanded into its
                                     image block; a final padding segment fills up to
                                     ``seq_length`` (``pad_id``, no loss)
  position_ids       int64 ``[t]``   restart at 0 in every sample (and in the padding)
  cu_seqlens         int32 ``[m + 1]`` or ``[m + 2]`` with the padding segment
  labels             int64 ``[t]``   ``labels[j] = input_ids[j + 1]`` where token ``j + 1`` of
                                     the same sample is a loss target, :data:`IGNORE_INDEX`
                                     elsewhere (last token of a sample, image blocks, prompts)
  loss_weights       float32 ``[t]`` per-token weight (0 where ``labels == IGNORE_INDEX``)
  patches            float32/bfloat16 ``[p, 3 * patch * patch]`` (``ops.patchify_batch``)
  patch_positions    int64 ``[p, 2]`` ``(row, col)`` (``ops.patch_positions``)
  vision_cu_seqlens  int32 ``[images * scales + 1]`` one segment per image and scale, in the
                     order the image blocks (and, inside a block, the scales, smallest first)
                     appear in ``input_ids``
  sample_keys        int64 ``[m, 2]`` ``(dataset, sample)`` of each real sample, in order
  vision_window_index       int64 ``[p]`` / None: the released code's window order of the
  vision_window_cu_seqlens  patches and one segment per window (``ops.vision_kwargs``), when
                            the builder has a vision window size
The model's ``<IMG_CONTEXT>`` count equals ``p / merge**2``.

Loss weighting of packed multi-sample sequences (NAVIL.md "Training recipe"), ``n`` the number
of labelled tokens of the token's sample: ``"token"`` 1, ``"sample"`` ``1 / n``, ``"square"``
``1 / sqrt(n)``. Reduce as ``sum(w * loss) / sum(w)`` over the global batch (all-reduce the
denominator across data-parallel ranks and micro-batches): "token" is then the mean over
tokens, "sample" the mean over samples of each sample's mean loss, "square" in between.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import numpy as np
import torch

from megatron_navil.config.tokens import IGNORE_INDEX

LOSS_WEIGHTINGS = ("token", "sample", "square")


def loss_weights(labels: np.ndarray, cu_seqlens: np.ndarray, mode: str) -> np.ndarray:
    """float32 ``[t]`` weights of ``labels`` (int ``[t]``) for ``mode`` (module doc);
    ``cu_seqlens`` (``[segments + 1]``) delimits the samples.

    Raises:
        ValueError: unknown ``mode``.
    """
    if mode not in LOSS_WEIGHTINGS:
        raise ValueError(f"loss weighting must be one of {LOSS_WEIGHTINGS}, got {mode!r}")
    has = (np.asarray(labels) != IGNORE_INDEX).astype(np.float64)
    if mode == "token":
        return has.astype(np.float32)
    cu = np.asarray(cu_seqlens, np.int64)
    lengths = np.diff(cu)
    csum = np.concatenate([[0.0], np.cumsum(has)])
    counts = csum[cu[1:]] - csum[cu[:-1]]
    per_sample = np.zeros_like(counts)
    nz = counts > 0
    per_sample[nz] = 1.0 / (counts[nz] if mode == "sample" else np.sqrt(counts[nz]))
    return (has * np.repeat(per_sample, lengths)).astype(np.float32)


_TENSORS = (
    "input_ids",
    "position_ids",
    "cu_seqlens",
    "labels",
    "loss_weights",
    "patches",
    "patch_positions",
    "vision_cu_seqlens",
    "sample_keys",
    "vision_window_index",
    "vision_window_cu_seqlens",
)
_VISION = ("patches", "patch_positions", "vision_cu_seqlens", *_TENSORS[-2:])


@dataclass
class PackedBatch:
    """One packed sequence, ready for ``NaViLModel.forward`` (layouts: module doc)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    cu_seqlens: torch.Tensor
    labels: torch.Tensor
    loss_weights: torch.Tensor
    patches: torch.Tensor
    patch_positions: torch.Tensor
    vision_cu_seqlens: torch.Tensor
    sample_keys: torch.Tensor
    seq_index: int
    """Position of this sequence in the global stream (``StreamPosition.consumed``)."""
    epoch: int
    """Blended epoch the sequence belongs to."""
    vision_window_index: torch.Tensor | None = None
    vision_window_cu_seqlens: torch.Tensor | None = None

    @property
    def num_samples(self) -> int:
        """Real samples (without the padding segment)."""
        return int(self.sample_keys.shape[0])

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def as_model_kwargs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments of ``NaViLModel.forward``; the vision inputs only when the
        sequence has images (the model rejects patches without ``<IMG_CONTEXT>`` tokens and
        vice versa)."""
        out = {
            "input_ids": self.input_ids,
            "position_ids": self.position_ids,
            "cu_seqlens": self.cu_seqlens,
            "labels": self.labels,
        }
        if self.patches.shape[0]:
            for name in _VISION:
                if getattr(self, name) is not None:
                    out[name] = getattr(self, name)
        return out

    def _map(self, fn) -> PackedBatch:
        return replace(
            self,
            **{n: None if getattr(self, n) is None else fn(getattr(self, n)) for n in _TENSORS},
        )

    def pin_memory(self) -> PackedBatch:
        """A copy in pinned host memory (``DataLoader(pin_memory=True)`` calls this)."""
        return self._map(lambda t: t.pin_memory())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> PackedBatch:
        """A copy with every tensor on ``device``."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def equals(self, other: PackedBatch) -> bool:
        """Same fields, tensors equal bitwise (dtype included)."""
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if isinstance(a, torch.Tensor):
                if a.dtype != b.dtype or a.shape != b.shape or not torch.equal(a, b):
                    return False
            elif a != b:
                return False
        return True
