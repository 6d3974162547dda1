"""Run a function in N gloo processes (spawned, like torchrun would) from pytest or a script.

Every distributed test goes through :func:`run_distributed`: a free port per group, the
environment torchrun would set, one thread per process, a hard timeout after which every child
is killed, and on failure the failing rank's own traceback in the raised error.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any


class DistributedTestError(AssertionError):
    """A child rank raised, died or timed out; the message carries its traceback."""


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(
    fn: Callable[..., Any], rank: int, world_size: int, port: int, args: tuple, results: Any
) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        out = fn(*args)
        results.put((rank, "ok", out))
    except BaseException:
        results.put((rank, "error", traceback.format_exc()))
    finally:
        if torch.distributed.is_initialized():
            from megatron_navil.parallel import destroy

            try:
                destroy()
            except Exception:
                pass


def run_distributed(
    fn: Callable[..., Any], world_size: int, *args: Any, timeout: float = 240.0
) -> list[Any]:
    """Run ``fn(*args)`` on ``world_size`` spawned ranks; return the per-rank results.

    ``fn`` must be importable (module level) and its arguments and result picklable. The
    ranks find each other through the torchrun-style environment; ``fn`` normally starts with
    ``megatron_navil.parallel.initialize(...)``. Raises :class:`DistributedTestError` with the
    first failing rank's traceback, or when ``timeout`` seconds pass (all ranks are killed).
    """
    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, args, results))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outs) + len(errors) < world_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(world_size)) - outs.keys() - errors.keys())
                raise DistributedTestError(
                    f"{fn.__name__}: timed out after {timeout:.0f}s; ranks {missing} did not "
                    "finish" + "".join(f"\n--- rank {r} ---\n{tb}" for r, tb in errors.items())
                )
            try:
                rank, status, payload = results.get(timeout=min(remaining, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
                dead = [r for r in dead if r not in outs and r not in errors]
                if dead:
                    time.sleep(0.5)  # let a dying rank's queued traceback arrive
                    while not results.empty():
                        rank, status, payload = results.get()
                        (outs if status == "ok" else errors)[rank] = payload
                    if not errors:
                        codes = {r: procs[r].exitcode for r in dead}
                        raise DistributedTestError(f"{fn.__name__}: ranks died: {codes}") from None
                    break
                continue
            (outs if status == "ok" else errors)[rank] = payload
            if errors:
                break
    finally:
        # Ranks that finished exit within moments; after a failure or a timeout the others
        # may be stuck in a collective, so they get no grace period.
        grace = 5.0 if len(outs) == world_size else 0.5
        for p in procs:
            p.join(timeout=grace)
            if p.is_alive():
                p.kill()
                p.join()
    if errors:
        rank = min(errors)
        raise DistributedTestError(f"{fn.__name__} failed on rank {rank}:\n{errors[rank]}")
    return [outs[r] for r in range(world_size)]
