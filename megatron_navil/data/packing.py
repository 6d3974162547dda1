"""The global stream of packed sequences, planned from metadata alone.

Layouts: a *packed sequence* is an int64 array ``[k, 2]`` of draws ``(dataset, sample)`` in
the order they are laid out in the sequence. The global stream is the sequences of epoch 0
window 0, then window 1, ..., then epoch 1, ... A :class:`StreamPosition` names a place in it.

Per window ``w`` of blended epoch ``e`` (:class:`megatron_navil.data.blend.Blend`: a
seeded, proportionally blended window of about ``window`` samples):

1. ``ops.plan_packing`` (first-fit decreasing, C++) over the window's samples with the
   budgets ``seq_length`` LLM tokens and ``max_patches`` patches per sequence,
   ``oversize="skip"``. Planning per window (default 10,000 samples) keeps batches mixed:
   FFD over a whole epoch would sort it by length, so early sequences would hold only the
   longest samples. Samples inside a sequence keep the window's (shuffled) order.
2. The window's sequences are shuffled (PCG64 seeded with ``(seed, e, w)``), so a sequence
   of long samples and one of many short samples do not always come first.

Nothing is stored: any window is re-planned from ``(seed, epoch, window)`` (about a
millisecond per 10k samples), so a resumed run sees the same stream. The last few windows'
plans are cached.

Oversize samples (more LLM tokens than ``seq_length``, or more patches than ``max_patches``)
are found from the metadata when the stream is built, reported once (``logging`` warning with
the counts per dataset and the first few indices) and left out of every plan
(``PackPlan.skipped``); :meth:`SequenceStream.window_plan` reports the count per window.
"""

from __future__ import annotations

import hashlib
import logging
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from megatron_navil.data.blend import Blend
from megatron_navil.ops import plan_packing
from megatron_navil.ops.pack import PackPlan

log = logging.getLogger(__name__)

_SEQ_SHUFFLE_TAG = 0x2545F491
DEFAULT_WINDOW = 10_000


@dataclass(frozen=True, order=True)
class StreamPosition:
    """A place in the global stream: the next sequence is ``offset`` of window ``window`` of
    epoch ``epoch``; ``consumed`` sequences of the whole stream come before it."""

    epoch: int = 0
    window: int = 0
    offset: int = 0
    consumed: int = 0


@dataclass(frozen=True)
class WindowPlan:
    """The packed sequences of one window, in stream order."""

    epoch: int
    window: int
    sequences: tuple[np.ndarray, ...]
    """Each ``[k, 2]`` int64 ``(dataset, sample)``, read-only."""
    tokens: np.ndarray
    """int64 ``[S]``: LLM tokens of each sequence."""
    patches: np.ndarray
    """int64 ``[S]``: vision patches of each sequence."""
    num_samples: int
    """Samples in the window (placed + skipped)."""
    skipped: np.ndarray
    """int64 ``[k, 2]``: the window's oversize draws ``(dataset, sample)``, left out."""
    costs: np.ndarray | None = None
    """int64 ``[S]``: each sequence's cost (``data.cost.CostModel`` units), when the stream
    has per-sample costs."""


class SequenceStream:
    """Packed sequences over blended datasets (see the module doc).

    Args:
        llm_tokens: per dataset, int64 ``[n_i]`` LLM tokens of each sample
            (``ShardDataset.llm_tokens``).
        patches: per dataset, int64 ``[n_i]`` vision patches (``ShardDataset.patches``).
        seq_length: LLM tokens per packed sequence.
        max_patches: patch budget per sequence (None: unbounded).
        weights: blend weights (None: proportional to sizes, every sample once per epoch).
        seed: seed of the whole order.
        window: samples per planning window.
        samples_per_epoch: draws per blended epoch (default: the total size).
        names: dataset names for the oversize report.
        costs: per dataset, int64 ``[n_i]`` each sample's cost (``CostModel.sample_costs``):
            each sequence's cost is then known (``WindowPlan.costs``, for the data-parallel
            balance).
        max_cost: cost budget per sequence (needs ``costs``; None: none), the planner's third
            budget: sequences whose samples would cost more are split.
        pad_cost: ``(per token, per token squared)`` cost of a sequence's padding segment
            (``CostModel.padding``): every sequence is computed at its full length, so its
            cost (``WindowPlan.costs``) includes what its padding costs.
    """

    def __init__(
        self,
        llm_tokens: Sequence[np.ndarray],
        patches: Sequence[np.ndarray],
        seq_length: int,
        max_patches: int | None = None,
        weights: Sequence[float] | None = None,
        seed: int = 0,
        window: int = DEFAULT_WINDOW,
        samples_per_epoch: int | None = None,
        names: Sequence[str] | None = None,
        cache_windows: int = 4,
        costs: Sequence[np.ndarray] | None = None,
        max_cost: int | None = None,
        pad_cost: tuple[float, float] = (0.0, 0.0),
    ):
        if len(llm_tokens) != len(patches) or not llm_tokens:
            raise ValueError("SequenceStream: need llm_tokens and patches for each dataset")
        self.llm_tokens = [np.asarray(t, np.int64) for t in llm_tokens]
        self.patches = [np.asarray(p, np.int64) for p in patches]
        for i, (t, p) in enumerate(zip(self.llm_tokens, self.patches, strict=True)):
            if t.ndim != 1 or t.shape != p.shape:
                raise ValueError(f"SequenceStream: dataset {i}: llm_tokens/patches shapes differ")
        if int(seq_length) < 1:
            raise ValueError(f"SequenceStream: seq_length must be >= 1, got {seq_length}")
        if max_patches is not None and int(max_patches) < 1:
            raise ValueError(f"SequenceStream: max_patches must be >= 1 or None, got {max_patches}")
        if int(window) < 1:
            raise ValueError(f"SequenceStream: window must be >= 1, got {window}")
        if costs is not None and [len(c) for c in costs] != [len(t) for t in self.llm_tokens]:
            raise ValueError("SequenceStream: costs need one entry per sample of each dataset")
        if max_cost is not None and (costs is None or int(max_cost) < 1):
            raise ValueError(f"SequenceStream: max_cost {max_cost} needs costs and must be >= 1")
        self.costs = None if costs is None else [np.asarray(c, np.int64) for c in costs]
        self.max_cost = None if max_cost is None else int(max_cost)
        self.pad_cost = (float(pad_cost[0]), float(pad_cost[1]))
        self.seq_length = int(seq_length)
        self.max_patches = None if max_patches is None else int(max_patches)
        self.window = int(window)
        self.blend = Blend([len(t) for t in self.llm_tokens], weights, seed, samples_per_epoch)
        self.seed = self.blend.seed
        self.names = list(names) if names is not None else [str(i) for i in range(len(patches))]
        self._cache: OrderedDict[tuple[int, int], WindowPlan] = OrderedDict()
        self._cache_size = max(1, int(cache_windows))
        self._fingerprint: str | None = None
        self.oversize = [np.flatnonzero(self._too_big(i)) for i in range(len(self.llm_tokens))]
        if all(
            len(big) == len(t) or c == 0
            for big, t, c in zip(self.oversize, self.llm_tokens, self.blend.counts, strict=True)
        ):
            raise ValueError(
                f"SequenceStream: no sample fits in a sequence of {self.seq_length} tokens and "
                f"{self.max_patches} patches"
            )
        self._report_oversize()

    def _too_big(self, i: int) -> np.ndarray:
        big = self.llm_tokens[i] > self.seq_length
        if self.max_patches is not None:
            big |= self.patches[i] > self.max_patches
        return big

    def _report_oversize(self) -> None:
        parts = [
            f"{name}: {len(idx)} (first {idx[:5].tolist()})"
            for name, idx in zip(self.names, self.oversize, strict=True)
            if len(idx)
        ]
        if parts:
            log.warning(
                "data: samples larger than one packed sequence (seq_length=%d, max_patches=%s) "
                "are skipped: %s",
                self.seq_length,
                self.max_patches,
                "; ".join(parts),
            )

    @property
    def num_windows(self) -> int:
        """Windows per epoch."""
        return self.blend.num_windows(self.window)

    def fingerprint(self) -> str:
        """sha256 of what the stream depends on: the blend, budgets, window and the per-sample
        counts. A checkpoint made with another stream cannot resume on this one. Computed
        once (it hashes the per-sample counts)."""
        if self._fingerprint is not None:
            return self._fingerprint
        h = hashlib.sha256(self.blend.fingerprint().encode())
        h.update(f";seq={self.seq_length};patches={self.max_patches};win={self.window}".encode())
        for t, p in zip(self.llm_tokens, self.patches, strict=True):
            h.update(t.astype("<i8").tobytes())
            h.update(p.astype("<i8").tobytes())
        if self.max_cost is not None and self.costs is not None:  # it changes the plans
            h.update(f";cost={self.max_cost}".encode())
            for c in self.costs:
                h.update(c.astype("<i8").tobytes())
        self._fingerprint = h.hexdigest()
        return self._fingerprint

    def window_plan(self, epoch: int, w: int) -> WindowPlan:
        """The packed sequences of window ``w`` of epoch ``epoch`` (cached)."""
        key = (int(epoch), int(w))
        plan = self._cache.get(key)
        if plan is not None:
            self._cache.move_to_end(key)
            return plan
        ds, samples = self.blend.window(key[0], key[1], self.window)
        tokens = np.empty(len(ds), np.int64)
        patches = np.empty(len(ds), np.int64)
        costs = None if self.costs is None else np.empty(len(ds), np.int64)
        for i in range(self.blend.num_datasets):
            sel = ds == i
            tokens[sel] = self.llm_tokens[i][samples[sel]]
            patches[sel] = self.patches[i][samples[sel]]
            if costs is not None:
                costs[sel] = self.costs[i][samples[sel]]  # type: ignore[index]
        budget = {} if self.max_cost is None else {"costs": costs, "max_cost": self.max_cost}
        pack = plan_packing(
            tokens, patches, self.seq_length, self.max_patches, oversize="skip", **budget
        )
        draws = np.stack([ds, samples], axis=1)
        draws.setflags(write=False)
        order = np.random.Generator(
            np.random.PCG64(np.random.SeedSequence([self.seed, key[0], key[1], _SEQ_SHUFFLE_TAG]))
        ).permutation(pack.num_seqs)
        seqs = tuple(draws[pack.sequence(int(j))] for j in order)
        plan = WindowPlan(
            epoch=key[0],
            window=key[1],
            sequences=seqs,
            tokens=pack.tokens_per_seq[order],
            patches=pack.patches_per_seq[order],
            num_samples=len(ds),
            skipped=draws[pack.skipped],
            costs=None if costs is None else self._with_padding(_sums(costs, pack), pack)[order],
        )
        self._cache[key] = plan
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return plan

    def iterate(
        self, start: StreamPosition = StreamPosition()
    ) -> Iterator[tuple[StreamPosition, np.ndarray]]:
        """Endless ``(position, sequence)`` pairs from ``start`` on; ``position`` is where the
        sequence is (the next one is at ``position.consumed + 1``)."""
        epoch, w, offset, consumed = start.epoch, start.window, start.offset, start.consumed
        while True:
            plan = self.window_plan(epoch, w)
            if offset > len(plan.sequences):
                raise ValueError(
                    f"stream position {start} is past the end of its window "
                    f"({len(plan.sequences)} sequences): not a position of this stream"
                )
            while offset < len(plan.sequences):
                yield StreamPosition(epoch, w, offset, consumed), plan.sequences[offset]
                offset += 1
                consumed += 1
            w, offset = w + 1, 0
            if w == self.num_windows:
                epoch, w = epoch + 1, 0

    def advance(self, pos: StreamPosition) -> StreamPosition:
        """The position right after the sequence at ``pos``, normalised so that ``offset``
        lies inside a non-empty window."""
        epoch, w, offset = pos.epoch, pos.window, pos.offset + 1
        while offset >= len(self.window_plan(epoch, w).sequences):
            w, offset = w + 1, 0
            if w == self.num_windows:
                epoch, w = epoch + 1, 0
        return StreamPosition(epoch, w, offset, pos.consumed + 1)

    def _with_padding(self, costs: np.ndarray, pack: PackPlan) -> np.ndarray:
        free = (self.seq_length - pack.tokens_per_seq).astype(np.float64)
        linear, square = self.pad_cost
        return costs + np.rint(linear * free + square * free * free).astype(np.int64)

    def sequence_cost(self, pos: StreamPosition) -> int:
        """The cost of the sequence at ``pos`` (needs the stream's ``costs``)."""
        costs = self.window_plan(pos.epoch, pos.window).costs
        if costs is None:
            raise ValueError("SequenceStream: no per-sample costs were given")
        return int(costs[pos.offset])

    def epoch_sequences(self, epoch: int) -> list[np.ndarray]:
        """All packed sequences of one epoch (for tests and inspection)."""
        return [s for w in range(self.num_windows) for s in self.window_plan(epoch, w).sequences]


def _sums(values: np.ndarray, pack: PackPlan) -> np.ndarray:
    """int64 ``[S]``: the sum of ``values`` over each planned sequence's samples."""
    csum = np.concatenate([[0], np.cumsum(values[pack.sample_ids], dtype=np.int64)])
    return csum[pack.seq_offsets[1:]] - csum[pack.seq_offsets[:-1]]
