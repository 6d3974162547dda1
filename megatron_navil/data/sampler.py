"""The data-parallel sampler over the global stream of packed sequences, and its state.

Global step ``g`` consumes sequences ``[g * B, (g + 1) * B)`` of the global stream
(:class:`megatron_navil.data.packing.SequenceStream`), ``B = global_batch``. Each of the ``D``
data-parallel ranks takes ``B / D`` of them (``B % D == 0``), one packed sequence per
micro-batch:

* ``balance=False``: rank ``r`` takes the *contiguous* share
  ``[g * B + r * B / D, g * B + (r + 1) * B / D)``;
* ``balance=True`` (needs the stream's sequence costs, ``SequenceStream(costs=...)``): the
  global batch's sequences are dealt by cost, longest-processing-time first: costliest first
  (stream order breaks ties), each to the rank with the smallest total so far among those with
  fewer than ``B / D`` (lowest rank on a tie), so the ranks' total costs are even and nobody
  waits for a rank that drew the heavy sequences. Each rank's share keeps stream order.

Either way the split is a function of the global batch and ``D`` alone, so it is the same on
every rank and after a resume, also with another ``D``. Every rank walks the whole stream (the
plan is cheap and the same everywhere) and keeps its share, so no rank communicates.

State (:meth:`PackedSampler.state_dict`, saved in every checkpoint; a few integers)::

    {"format": "megatron_navil.sampler", "version": 1,
     "seed": int,          # seed of the stream (must match on resume)
     "epoch": int,         # blended epoch of the next sequence
     "window": int,        # planning window of the next sequence inside its epoch
     "offset": int,        # index of the next sequence inside its window's plan
     "consumed": int,      # packed sequences of the global stream consumed so far
     "global_batch": int,  # B when saved (informational)
     "fingerprint": str}   # SequenceStream.fingerprint(): budgets, window, blend, counts

It always describes a global-batch boundary (every rank saves the same dict), so resuming with
another data-parallel size ``D'`` continues the same global stream at the same sequence; only
the split of each global batch changes. ``(epoch, window, offset)`` locates the next sequence
without replaying the epoch; ``consumed`` counts the whole stream (for logging and checks).
A state taken in the middle of a global batch raises: save checkpoints between steps.
Changing ``global_batch`` between save and resume also continues at the same sequence (the
global batches are then cut afresh from there).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from megatron_navil.data.packing import SequenceStream, StreamPosition
from megatron_navil.ops.balance import lpt

STATE_FORMAT = "megatron_navil.sampler"
STATE_VERSION = 1


@dataclass(frozen=True)
class SequenceRef:
    """One packed sequence handed to a data-loader worker (small and picklable)."""

    index: int
    """Position in the global stream (``StreamPosition.consumed``)."""
    epoch: int
    step: int
    """Global step (global batch number) it belongs to."""
    draws: np.ndarray
    """int64 ``[k, 2]`` ``(dataset, sample)`` in layout order."""
    batch_end: StreamPosition
    """Stream position after its global batch."""
    last_of_share: bool
    """Whether it is this rank's last sequence of the global batch."""


def balanced_shares(costs: list[int], ranks: int) -> list[list[int]]:
    """Indices of ``costs`` for each of ``ranks`` ranks, ``len(costs) / ranks`` each, dealt
    longest-processing-time first (module doc; ``ops.balance.lpt``); each rank's indices
    ascending. Integer costs: the same split on every machine."""
    return lpt(costs, ranks, capacity=len(costs) // ranks)


class PackedSampler:
    """Iterates this data-parallel rank's packed sequences, endlessly (module doc).

    Args:
        stream: the global stream.
        global_batch: packed sequences per global step ``B``.
        dp_rank, dp_size: this rank and the data-parallel size ``D`` (``B % D == 0``).
        balance: deal each global batch's sequences to the ranks by cost (module doc).
    """

    def __init__(
        self,
        stream: SequenceStream,
        global_batch: int,
        dp_rank: int = 0,
        dp_size: int = 1,
        balance: bool = False,
    ):
        global_batch, dp_rank, dp_size = int(global_batch), int(dp_rank), int(dp_size)
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank={dp_rank} must be in [0, dp_size={dp_size})")
        if global_batch < 1 or global_batch % dp_size:
            raise ValueError(
                f"global_batch={global_batch} must be a positive multiple of dp_size={dp_size}"
            )
        if balance and stream.costs is None:
            raise ValueError("balance=True needs a stream with sequence costs (costs=...)")
        self.balance = bool(balance)
        self.stream = stream
        self.global_batch = global_batch
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.per_rank = global_batch // dp_size
        self.position = StreamPosition()
        """Start of the next global batch this sampler issues (a global-batch boundary)."""
        self._partial = 0

    @property
    def step(self) -> int:
        """Global steps completed at :attr:`position`."""
        return self.position.consumed // self.global_batch

    def refs(self, start: StreamPosition) -> Iterator[SequenceRef]:
        """This rank's sequences from global-batch boundary ``start`` on, endlessly."""
        contiguous = range(self.dp_rank * self.per_rank, (self.dp_rank + 1) * self.per_rank)
        it = self.stream.iterate(start)
        step = start.consumed // self.global_batch
        while True:
            batch = [next(it) for _ in range(self.global_batch)]
            end = self.stream.advance(batch[-1][0])
            share = contiguous
            if self.balance:
                costs = [self.stream.sequence_cost(pos) for pos, _ in batch]
                share = balanced_shares(costs, self.dp_size)[self.dp_rank]
            for k, j in enumerate(share):
                pos, draws = batch[j]
                yield SequenceRef(
                    index=pos.consumed,
                    epoch=pos.epoch,
                    step=step,
                    draws=draws,
                    batch_end=end,
                    last_of_share=k == len(share) - 1,
                )
            step += 1

    def __iter__(self) -> Iterator[SequenceRef]:
        """Yields from :attr:`position`; a yielded sequence counts as consumed, so
        :attr:`position` moves to the batch's end when this rank's last one is yielded."""
        self._partial = 0
        for ref in self.refs(self.position):
            self._partial += 1
            if ref.last_of_share:
                self.position, self._partial = ref.batch_end, 0
            yield ref

    def state_dict(
        self, position: StreamPosition | None = None, partial: int | None = None
    ) -> dict[str, Any]:
        """The resumable state at :attr:`position` (module doc).

        Raises:
            ValueError: in the middle of a global batch.
        """
        position = self.position if position is None else position
        partial = self._partial if partial is None else partial
        if partial:
            raise ValueError(
                f"sampler state requested after {partial} of this rank's {self.per_rank} "
                "sequences of a global batch: save checkpoints between steps"
            )
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "seed": self.stream.seed,
            "epoch": position.epoch,
            "window": position.window,
            "offset": position.offset,
            "consumed": position.consumed,
            "global_batch": self.global_batch,
            "fingerprint": self.stream.fingerprint(),
        }

    def position_from_state(self, state: dict[str, Any]) -> StreamPosition:
        """Validate ``state`` against this sampler's stream; its position.

        Raises:
            ValueError: not a sampler state, another version, seed or stream (fingerprint).
        """
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError("not a megatron_navil sampler state")
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"sampler state version {state.get('version')} != {STATE_VERSION}")
        if int(state["seed"]) != self.stream.seed:
            raise ValueError(
                f"sampler state has seed {state['seed']}, this stream {self.stream.seed}"
            )
        if state["fingerprint"] != self.stream.fingerprint():
            raise ValueError(
                "sampler state was saved for another data stream (datasets, weights, "
                "seq_length, max_patches or window differ): its position means nothing here"
            )
        pos = StreamPosition(
            int(state["epoch"]), int(state["window"]), int(state["offset"]), int(state["consumed"])
        )
        if min(pos.epoch, pos.window, pos.offset, pos.consumed) < 0:
            raise ValueError(f"sampler state has a negative position: {pos}")
        return pos

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the state's position (see :meth:`position_from_state`)."""
        self.position = self.position_from_state(state)
        self._partial = 0
