"""What a sample costs to train, from the index alone: the pack planner's third budget and the
data-parallel balance use it.

A sample's cost is linear in four counts the index holds: its LLM tokens ``t`` (a sample is
its own causal attention segment), ``t**2``, its vision patches ``p`` and the sum of squared
patches over its image scales ``q`` (each scale is its own vision-attention segment):
``cost = llm_token * t + llm_token_sq * t**2 + patch * p + patch_sq * q``. The four weights are
FLOPs from the model's sizes (``training.flops.cost_model``, the FLOP counter's formulas), so a
sequence's cost is its model FLOPs. Costs are handed to the planner as integers in units of
``unit`` FLOPs (deterministic on every rank: the same float64 operations on the same counts).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from megatron_navil.data.shards.corpus import ShardDataset


@dataclass(frozen=True)
class CostModel:
    """FLOPs of a sample from its counts (module doc); ``unit``: FLOPs per integer cost unit."""

    llm_token: float
    llm_token_sq: float
    patch: float
    patch_sq: float
    unit: float

    def __post_init__(self) -> None:
        weights = (self.llm_token, self.llm_token_sq, self.patch, self.patch_sq)
        if min(weights) < 0 or not self.unit > 0:
            raise ValueError(f"CostModel: weights must be >= 0 and unit > 0, got {self}")

    def flops(self, tokens: np.ndarray, patches: np.ndarray, patches_sq: np.ndarray) -> np.ndarray:
        """float64 FLOPs of samples with these counts."""
        t = np.asarray(tokens, np.float64)
        return (
            self.llm_token * t
            + self.llm_token_sq * t * t
            + self.patch * np.asarray(patches, np.float64)
            + self.patch_sq * np.asarray(patches_sq, np.float64)
        )

    def sample_costs(self, dataset: ShardDataset) -> np.ndarray:
        """int64 ``[n]``: each sample's cost in units (at least 1: every sample has a token)."""
        flops = self.flops(dataset.llm_tokens, dataset.patches, dataset.patches_sq)
        return np.maximum(1, np.rint(flops / self.unit)).astype(np.int64)

    @property
    def padding(self) -> tuple[float, float]:
        """Cost units per padding token and per padding token squared: a sequence's padding
        is one more causal segment of the LLM (``SequenceStream(pad_cost=...)``)."""
        return self.llm_token / self.unit, self.llm_token_sq / self.unit

    def units(self, flops: float) -> int:
        """``flops`` in cost units (rounded, at least 1)."""
        return max(1, round(flops / self.unit))
