"""Checkpoint writes that run while training goes on (``--async-save``), through
megatron-core's asynchronous dist-checkpoint machinery.

``dist_checkpointing.save(..., async_sharded_save=True)`` plans the save on every rank
(collective), writes the small common state, and returns an ``AsyncRequest`` whose write runs
in a process forked from the rank (megatron-core's ``TemporalAsyncCaller``, the one Megatron-LM
uses unless ``--use-persistent-ckpt-worker``): the fork is a snapshot of the tensors at the
save (copy-on-write; on a GPU they are first copied to host memory), so the next steps may
change them. The request's finalize functions (megatron-core's ``.metadata`` and
``metadata.json``, then ``store``'s rename of ``iter_N.tmp`` to ``iter_N`` and the marker) run
on every rank only once every rank's writer has finished (an all-reduce of "still writing"),
as Megatron-LM's ``maybe_finalize_async_save`` does, so a checkpoint is complete
(``checkpoint.directory``) only when all of it is on disk.

At most one save is in flight: a new save first waits for the previous one (so ``keep_last``
pruning and the clean-up of crashed ``.tmp`` directories, done when a save completes, never
meet a save being written). Works on CPU with gloo (the fork needs no CUDA).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

WRITE_DELAY_ENV = "MEGATRON_NAVIL_TEST_ASYNC_WRITE_DELAY"
"""Test hook: ``SECONDS`` or ``SECONDS@ITERATION``. The forked writer of every asynchronous
save (or of that iteration's only) sleeps that long after writing its shards, before it
exits, so the save stays unfinalized that long (tests kill -9 a run inside that window)."""


def write_delay(iteration: int, spec: str | None = None) -> float:
    """Seconds the writer of ``iteration`` sleeps, from ``spec`` (default: the
    :data:`WRITE_DELAY_ENV` variable; unset or empty: 0)."""
    spec = os.environ.get(WRITE_DELAY_ENV, "") if spec is None else spec
    if not spec.strip():
        return 0.0
    seconds, _, only = spec.partition("@")
    if only and int(only) != iteration:
        return 0.0
    return float(seconds)


def _write_then_sleep(write: Callable[..., Any], delay: float, *args: Any, **kwargs: Any) -> None:
    write(*args, **kwargs)
    time.sleep(delay)


class AsyncSaves:
    """This rank's asynchronous checkpoint saves: megatron-core's ``AsyncCallsQueue`` (one
    forked writer per save), at most one save in flight. Every method is collective: call it
    on every rank at the same point."""

    def __init__(self) -> None:
        from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue

        self._queue = AsyncCallsQueue(persistent=False)
        self.pending: list[int] = []  # iterations scheduled and not yet finalized

    def schedule(self, request: Any, iteration: int) -> None:
        """Start the write of ``request`` (an ``AsyncRequest`` whose finalize functions make
        ``iteration``'s checkpoint complete) in a forked process and return at once."""
        self.wait()
        delay = write_delay(iteration)
        if delay > 0 and request.async_fn is not None:
            import functools

            request = request._replace(
                async_fn=functools.partial(_write_then_sleep, request.async_fn, delay)
            )
        self._queue.schedule_async_request(request)
        self.pending.append(iteration)

    def finalize(self, blocking: bool = False) -> list[int]:
        """Finalize the saves whose writes have finished on every rank (``blocking``: wait
        for all of them); returns their iterations. No collective when nothing is pending."""
        if not self.pending:
            return []
        done = self._queue.maybe_finalize_async_calls(blocking=blocking)
        finished, self.pending = self.pending[: len(done)], self.pending[len(done) :]
        return finished

    def wait(self) -> list[int]:
        """Finalize every pending save, waiting for its writers."""
        return self.finalize(blocking=True)

    def close(self, abort: bool = False) -> None:
        """Finalize what is pending (``abort``: kill the writers instead, leaving their
        checkpoints incomplete, for an exception that other ranks may not share)."""
        if abort:
            for call in self._queue.async_calls:
                call.async_caller.close(abort=True)
            self._queue.async_calls.clear()
            self.pending.clear()
        else:
            self.wait()
