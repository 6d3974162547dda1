"""The spawn runner: results per rank, the child's traceback on failure, a hard timeout."""

from __future__ import annotations

import os
import time

import pytest

from megatron_navil.parallel.spawn import SpawnError, run_distributed

pytestmark = pytest.mark.slow  # every test spawns ranks


def _rank_and_world() -> tuple[int, int, str]:
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), os.environ["OMP_NUM_THREADS"]


def _fail_on_rank_one() -> None:
    if os.environ["RANK"] == "1":
        raise ValueError("rank one is unhappy")


def _hang() -> None:
    time.sleep(60)


def _die() -> None:
    os._exit(7)


def test_results_in_rank_order():
    assert run_distributed(_rank_and_world, 2, timeout=60) == [(0, 2, "1"), (1, 2, "1")]


def test_child_traceback_is_shown():
    with pytest.raises(SpawnError, match=r"(?s)rank 1.*ValueError: rank one is unhappy"):
        run_distributed(_fail_on_rank_one, 2, timeout=60)


def test_hard_timeout_kills_the_ranks():
    start = time.monotonic()
    with pytest.raises(SpawnError, match="timed out after 3s"):
        run_distributed(_hang, 2, timeout=3)
    assert time.monotonic() - start < 20


def test_a_dead_rank_is_reported():
    with pytest.raises(SpawnError, match="ranks died"):
        run_distributed(_die, 2, timeout=60)


def _pid_and_env() -> tuple[int, str | None, str | None]:
    leftover = os.environ.get("NAVIL_TEST_LEFTOVER")
    os.environ["NAVIL_TEST_LEFTOVER"] = "x"  # must not reach the next call's ranks
    return os.getpid(), os.environ.get("NAVIL_TEST_VAR"), leftover


def test_every_call_gets_fresh_ranks_with_the_callers_environment(monkeypatch):
    """Ranks fork from a server started once: still new processes each call, and they see the
    environment of the call, not the one the server started with."""
    monkeypatch.setenv("NAVIL_TEST_VAR", "a")
    first = run_distributed(_pid_and_env, 2, timeout=60)
    monkeypatch.setenv("NAVIL_TEST_VAR", "b")
    second = run_distributed(_pid_and_env, 2, timeout=60)
    assert [(e, old) for _, e, old in first] == [("a", None), ("a", None)]
    assert [(e, old) for _, e, old in second] == [("b", None), ("b", None)]
    assert not {p for p, _, _ in first} & {p for p, _, _ in second}


def _say(word: str) -> None:
    print(f"rank {os.environ['RANK']} says {word}", flush=True)


def test_rank_output_reaches_the_callers_stdout(capfd):
    """Even when the fork server started with other descriptors: here, outside the capture."""
    with capfd.disabled():
        run_distributed(_rank_and_world, 1, timeout=60)
    run_distributed(_say, 2, "hello", timeout=60)
    out = capfd.readouterr().out
    assert "rank 0 says hello" in out and "rank 1 says hello" in out
