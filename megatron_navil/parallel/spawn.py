"""Run a function in N gloo processes (fresh ones, like torchrun's) from pytest or a script.

The HF converters spawn their ranks with :func:`run_distributed`, and so does every
distributed test: a free port per group, the
environment torchrun would set, one thread per process, a hard timeout after which every child
is killed, and on failure the failing rank's own traceback in the raised error.

On a CPU-only Linux machine (tests, CI) ranks are forked from multiprocessing's fork server,
which imports torch and megatron-core once (:data:`PRELOAD`) and never runs anything else:
each rank is a fresh process (no state of an earlier call; tests of process-wide patches rely
on that) that skips the 5-15 s of imports a spawned interpreter pays on two cores, once per
rank and call. The caller's environment at the time of the call is the rank's (the fork
server's own was fixed when it started), and so are its stdout and stderr (reopened through
/proc, so pytest captures a rank's prints with the test that called it, as it did with spawned
ranks). With CUDA, ranks are spawned.
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

PRELOAD = (
    "torch",
    "torch.distributed",
    "megatron.core",
    "megatron.core.distributed",
    "megatron.core.optimizer",
    "megatron.core.pipeline_parallel",
    "megatron.core.dist_checkpointing",
    "megatron.core.models.gpt",
    "megatron_navil.parallel",
    "megatron_navil.models.build",
    "megatron_navil.training.step",
)
"""Modules the fork server imports before forking any rank (imports only: no process group,
no thread, no CUDA context exists when it forks)."""


def _context() -> mp.context.BaseContext:
    """The fork server on Linux without CUDA; spawn elsewhere: on a GPU machine an import in
    the server (TransformerEngine's, say) may initialise CUDA, which a forked rank cannot use."""
    import torch

    if torch.cuda.is_available() or "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(list(PRELOAD))  # no effect once the server runs
    return ctx


class SpawnError(AssertionError):
    """A child rank raised, died or timed out; the message carries its traceback (an
    AssertionError, so pytest shows a failing rank as a test failure, not an error)."""


def free_port() -> int:
    """A TCP port on localhost that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _take_output_of(pid: int) -> None:
    """Point fds 1 and 2 at process ``pid``'s (Linux; a socket or a missing /proc keeps
    this process's own)."""
    for fd in (1, 2):
        try:
            target = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_APPEND)
        except OSError:
            continue
        os.dup2(target, fd)
        os.close(target)


def _child(
    fn: Callable[..., Any],
    rank: int,
    world_size: int,
    port: int,
    caller: tuple[int, dict[str, str]],
    args: tuple,
    results: Any,
) -> None:
    pid, environ = caller
    _take_output_of(pid)
    os.environ.clear()
    os.environ.update(environ)
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
    ``megatron_navil.parallel.initialize(...)``. Raises :class:`SpawnError` with the
    first failing rank's traceback, or when ``timeout`` seconds pass (all ranks are killed).
    """
    ctx = _context()
    results = ctx.Queue()
    port = free_port()
    caller = (os.getpid(), dict(os.environ))
    procs = [
        ctx.Process(target=_child, args=(fn, r, world_size, port, caller, args, results))
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
                raise SpawnError(
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
                        raise SpawnError(f"{fn.__name__}: ranks died: {codes}") from None
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
        raise SpawnError(f"{fn.__name__} failed on rank {rank}:\n{errors[rank]}")
    return [outs[r] for r in range(world_size)]
