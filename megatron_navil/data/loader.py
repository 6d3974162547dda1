"""The training data loader: torch ``DataLoader`` workers building packed sequences in the
sampler's order, with a resumable state.

Pieces (each usable alone):

* :class:`PackedSequenceDataset`: a map-style ``torch.utils.data.Dataset`` whose index is a
  :class:`~megatron_navil.data.sampler.SequenceRef`; ``dataset[ref]`` builds the packed
  sequence in the worker (:class:`~megatron_navil.data.assemble.PackedSequenceBuilder`).
* :class:`PackedDataLoader`: a ``DataLoader(dataset, batch_size=None, sampler=refs)`` (one
  packed sequence per item: the model's micro-batch) whose output order is the sampler's
  (``DataLoader`` keeps index order for map-style datasets whatever the worker count), and
  which counts the batches *delivered* to the caller, so :meth:`PackedDataLoader.state_dict`
  is exact although workers prefetch ahead.
* :func:`build_data_loader`: corpora + settings -> stream, sampler, builder, loader.

Pinned memory: ``pin_memory=True`` pins each batch (``PackedBatch.pin_memory``) in the
loader's pin thread when an accelerator is available; without one it is ignored (nothing to
pin for).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from megatron_navil.data.assemble import PackedSequenceBuilder
from megatron_navil.data.batch import PackedBatch
from megatron_navil.data.cost import CostModel
from megatron_navil.data.packing import DEFAULT_WINDOW, SequenceStream
from megatron_navil.data.sampler import PackedSampler, SequenceRef
from megatron_navil.data.shards.corpus import ShardDataset


class PackedSequenceDataset(torch.utils.data.Dataset):
    """``dataset[ref] -> PackedBatch`` for :class:`SequenceRef` indices (module doc)."""

    def __init__(self, builder: PackedSequenceBuilder):
        self.builder = builder

    def __getitem__(self, ref: SequenceRef) -> PackedBatch:
        return self.builder.build(ref.draws, ref.index, ref.epoch)


def collate_packed(item: PackedBatch) -> PackedBatch:
    """The loader's collate: one packed sequence is one micro-batch (no stacking)."""
    if not isinstance(item, PackedBatch):
        raise TypeError(f"expected a PackedBatch, got {type(item).__name__}")
    return item


def _accelerator_available() -> bool:
    acc = getattr(torch, "accelerator", None)
    if acc is not None and hasattr(acc, "is_available"):
        return bool(acc.is_available())
    return torch.cuda.is_available()


class PackedDataLoader:
    """Iterates this rank's packed micro-batches from the sampler's position, endlessly.

    ``state_dict()`` / ``load_state_dict()`` hold the sampler state (``sampler.py``) of the
    batches delivered so far; load before iterating (a new ``iter()`` starts from the state).

    Args:
        sampler: this rank's :class:`PackedSampler`.
        dataset: the :class:`PackedSequenceDataset`.
        num_workers: data-loader worker processes (0: build in the calling process).
        pin_memory: pin batches (only with an accelerator).
        prefetch_factor: sequences each worker builds ahead (with workers).
        multiprocessing_context: e.g. ``"fork"`` / ``"spawn"`` (default: torch's).
        timeout: seconds to wait for a worker's batch (0: forever).
    """

    def __init__(
        self,
        sampler: PackedSampler,
        dataset: PackedSequenceDataset,
        num_workers: int = 0,
        pin_memory: bool = False,
        prefetch_factor: int | None = 2,
        multiprocessing_context: str | None = None,
        timeout: float = 0,
    ):
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.sampler = sampler
        self.dataset = dataset
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory) and _accelerator_available()
        self.prefetch_factor = prefetch_factor if num_workers else None
        self.multiprocessing_context = multiprocessing_context if num_workers else None
        self.timeout = timeout
        self._partial = 0

    @property
    def position(self):
        """Start of the next global batch to deliver (the sampler's position)."""
        return self.sampler.position

    def _loader(self, refs: Iterator[SequenceRef]) -> torch.utils.data.DataLoader:
        return torch.utils.data.DataLoader(
            self.dataset,
            batch_size=None,
            sampler=_Refs(refs),
            num_workers=self.num_workers,
            collate_fn=collate_packed,
            pin_memory=self.pin_memory,
            prefetch_factor=self.prefetch_factor,
            persistent_workers=False,
            multiprocessing_context=self.multiprocessing_context,
            timeout=self.timeout,
        )

    def __iter__(self) -> Iterator[PackedBatch]:
        issued: deque[SequenceRef] = deque()

        def track(it: Iterator[SequenceRef]) -> Iterator[SequenceRef]:
            for ref in it:
                issued.append(ref)
                yield ref

        self._partial = 0
        start = self.position
        for batch in self._loader(track(self.sampler.refs(start))):
            ref = issued.popleft()
            if batch.seq_index != ref.index:  # DataLoader keeps order; a broken one is a bug
                raise RuntimeError(f"loader order broke: got {batch.seq_index}, want {ref.index}")
            self._partial += 1
            if ref.last_of_share:
                self.sampler.position, self._partial = ref.batch_end, 0
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Sampler state after the batches delivered so far (raises mid global batch)."""
        return self.sampler.state_dict(self.position, self._partial)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._partial = 0


class _Refs(torch.utils.data.Sampler):
    """A one-shot sampler over an iterator of refs (the DataLoader iterates it once)."""

    def __init__(self, refs: Iterator[SequenceRef]):
        self._refs = refs

    def __iter__(self) -> Iterator[SequenceRef]:
        return self._refs


def build_data_loader(
    corpora: Sequence[str | os.PathLike | ShardDataset],
    *,
    seq_length: int,
    global_batch: int,
    weights: Sequence[float] | None = None,
    max_patches: int | None = None,
    seed: int = 0,
    window: int = DEFAULT_WINDOW,
    samples_per_epoch: int | None = None,
    dp_rank: int = 0,
    dp_size: int = 1,
    loss_weighting: str = "token",
    pad_id: int = 0,
    patch_dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int | None = 2,
    verify: str = "size",
    multiprocessing_context: str | None = None,
    pixels: bool = True,
    vision_window_size: int | None = None,
    cost_model: CostModel | None = None,
    max_sequence_cost: float | None = None,
    balance: bool | None = None,
) -> PackedDataLoader:
    """Open the corpora and wire stream, sampler, builder and loader (see each class).

    ``corpora``: corpus directories / manifests (opened with ``verify``) or open
    ``ShardDataset`` s; ``weights``: one per corpus (None: proportional to sizes).
    ``cost_model``: what a sample costs (``data.cost``); with it, ``max_sequence_cost``
    (FLOPs, None: no limit) is the pack planner's cost budget per sequence and ``balance``
    deals each global batch to the data-parallel ranks by cost (None: when ``dp_size > 1``).
    The other arguments go to :class:`SequenceStream`, :class:`PackedSampler`,
    :class:`PackedSequenceBuilder` and :class:`PackedDataLoader`.
    """
    if cost_model is None and (max_sequence_cost is not None or balance):
        raise ValueError("max_sequence_cost and balance need a cost_model")
    datasets = [
        c if isinstance(c, ShardDataset) else ShardDataset(c, verify=verify) for c in corpora
    ]
    stream = SequenceStream(
        [d.llm_tokens for d in datasets],
        [d.patches for d in datasets],
        seq_length,
        max_patches,
        weights=weights,
        seed=seed,
        window=window,
        samples_per_epoch=samples_per_epoch,
        names=[str(d.root) for d in datasets],
        costs=None if cost_model is None else [cost_model.sample_costs(d) for d in datasets],
        max_cost=None if max_sequence_cost is None else cost_model.units(max_sequence_cost),
        pad_cost=(0.0, 0.0) if cost_model is None else cost_model.padding,
    )
    if balance is None:
        balance = cost_model is not None and dp_size > 1
    sampler = PackedSampler(stream, global_batch, dp_rank, dp_size, balance=balance)
    builder = PackedSequenceBuilder(
        datasets, seq_length, loss_weighting, pad_id=pad_id, patch_dtype=patch_dtype,
        pixels=pixels, vision_window_size=vision_window_size,
    )  # fmt: skip
    return PackedDataLoader(
        sampler,
        PackedSequenceDataset(builder),
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor,
        multiprocessing_context=multiprocessing_context,
    )
