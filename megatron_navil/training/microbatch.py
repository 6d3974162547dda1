"""``MicroBatch``: one packed sequence as the training step and evaluation consume it, and
``LoaderSource``: the loader's packed sequences as a ``training.loop.BatchSource``.

A micro-batch is the model's inputs (``NaViLModel.forward``'s keyword arguments) plus what the
step needs besides them: the per-token loss weights and the counts it logs. The counts are
taken on the host before the tensors move to the GPU (no device sync), and also where a
pipeline stage did not load the pixels (it still counts the patches).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from megatron_navil.config.tokens import IGNORE_INDEX
from megatron_navil.data.batch import PackedBatch


@dataclass
class MicroBatch:
    """One micro-batch of the step."""

    inputs: dict[str, torch.Tensor]  # NaViLModel.forward's keyword arguments
    loss_weights: torch.Tensor  # float [t]: 0 where labels == IGNORE_INDEX
    num_real_tokens: int  # tokens of real samples (without the padding segment)
    num_patches: int  # vision patches (counted where the pixels were not loaded, too)
    model_flops: float = 0.0  # for the MFU log (0: not counted)
    num_image_tokens: int = 0  # LLM tokens of the image blocks (for tokens/s per modality)

    @property
    def labels(self) -> torch.Tensor:
        return self.inputs["labels"]

    def local_loss_weights(self, cp_group: Any = None) -> torch.Tensor:
        """The loss weights of this context-parallel rank's tokens (the rows of its per-token
        loss: ``parallel.context.local_token_index``); all of them without CP."""
        if cp_group is None or cp_group.size() == 1:
            return self.loss_weights
        from megatron_navil.parallel.context import local_token_index

        t = self.loss_weights.shape[0]
        index = local_token_index(t, cp_group.size(), cp_group.rank(), self.loss_weights.device)
        return self.loss_weights[index]

    @property
    def loss_tokens(self) -> int:
        """Tokens with a loss target."""
        return int((self.labels != IGNORE_INDEX).sum())

    @classmethod
    def of(
        cls, inputs: dict[str, torch.Tensor], loss_weights: torch.Tensor | None = None
    ) -> MicroBatch:
        """A micro-batch of model inputs (tests, benchmarks): weight 1 on every labelled token
        unless ``loss_weights`` is given; every token counts as real."""
        labels = inputs["labels"]
        weights = (labels != IGNORE_INDEX).float() if loss_weights is None else loss_weights
        patches = int(inputs["patches"].shape[0]) if "patches" in inputs else 0
        return cls(dict(inputs), weights, int(inputs["input_ids"].numel()), patches)

    @classmethod
    def from_packed(
        cls,
        batch: PackedBatch,
        device: torch.device | None = None,
        flops_of: Callable[[PackedBatch], float] | None = None,
        visual_ids: torch.Tensor | None = None,
    ) -> MicroBatch:
        """The micro-batch of a loader's packed sequence, its tensors moved to ``device``
        (None or the CPU: left where they are); ``flops_of`` counts its model FLOPs,
        ``visual_ids`` (the image blocks' token ids) its image tokens."""
        real_tokens = int(batch.cu_seqlens[batch.num_samples])
        patches = int(batch.vision_cu_seqlens[-1])  # also where pixels were not loaded
        flops = float(flops_of(batch)) if flops_of is not None else 0.0
        image_tokens = 0
        if visual_ids is not None:
            image_tokens = int(torch.isin(batch.input_ids[:real_tokens], visual_ids).sum())
        if device is not None and device.type != "cpu":
            batch = batch.to(device, non_blocking=True)
        return cls(
            batch.as_model_kwargs(), batch.loss_weights, real_tokens, patches, flops, image_tokens
        )


@dataclass
class LoaderSource:
    """``training.loop.BatchSource`` over the packed-sequence loader: a step is this rank's
    ``global_batch / dp`` sequences, in the sampler's order."""

    loader: Any
    per_rank: int
    device: torch.device | None = None  # where the batches go (None: stay on the CPU)
    flops_of: Callable[[PackedBatch], float] | None = None  # model FLOPs, for MFU
    visual_ids: torch.Tensor | None = None  # the image blocks' token ids (image tokens/s)
    _it: Any = None

    def next_step(self) -> list[MicroBatch]:
        if self._it is None:
            self._it = iter(self.loader)
        return [
            MicroBatch.from_packed(next(self._it), self.device, self.flops_of, self.visual_ids)
            for _ in range(self.per_rank)
        ]

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._it = None
