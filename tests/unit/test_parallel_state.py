"""Launcher environment parsing, layout validation and the shim's switchboard (no processes)."""

from __future__ import annotations

import pytest
import torch

from megatron_navil.parallel import ParallelLayout, cpu_shim, launch_env


def test_torchrun_variables():
    env = launch_env(
        dict(RANK="3", WORLD_SIZE="4", LOCAL_RANK="1", MASTER_ADDR="node7", MASTER_PORT="1234")
    )
    assert (env.rank, env.world_size, env.local_rank) == (3, 4, 1)
    assert (env.master_addr, env.master_port) == ("node7", 1234)


def test_slurm_variables():
    env = launch_env(
        dict(
            SLURM_PROCID="5",
            SLURM_NTASKS="8",
            SLURM_LOCALID="1",
            MASTER_ADDR="n0",
            MASTER_PORT="6000",
        )
    )
    assert (env.rank, env.world_size, env.local_rank, env.master_addr) == (5, 8, 1, "n0")


def test_torchrun_wins_over_slurm():
    env = launch_env(dict(RANK="1", WORLD_SIZE="2", SLURM_PROCID="0", SLURM_NTASKS="16"))
    assert (env.rank, env.world_size) == (1, 2)


def test_single_process_default():
    assert launch_env({}).world_size == 1


def test_slurm_without_master_addr_is_rejected():
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        launch_env(dict(SLURM_PROCID="0", SLURM_NTASKS="2"))


@pytest.mark.parametrize(
    ("env", "match"),
    [
        (dict(RANK="x", WORLD_SIZE="2"), "RANK='x'"),
        (dict(RANK="2", WORLD_SIZE="2"), "outside world size"),
        (dict(RANK="0", WORLD_SIZE="1", MASTER_PORT="http"), "MASTER_PORT"),
    ],
)
def test_malformed_variables(env, match):
    with pytest.raises(ValueError, match=match):
        launch_env(env)


def test_data_parallel_size():
    assert ParallelLayout(tp=2, pp=2).dp(8) == 2
    assert ParallelLayout(tp=2, ep=4).dp(8) == 4
    assert ParallelLayout(tp=2, cp=2).dp(8) == 2  # CP ranks share micro-batches


@pytest.mark.parametrize(
    ("layout", "world", "match"),
    [
        (ParallelLayout(tp=3), 4, "not divisible by tp\\*pp"),
        (ParallelLayout(tp=2, ep=4), 4, "etp\\*ep\\*pp"),
        (ParallelLayout(tp=0), 4, "tp must be >= 1"),
        (ParallelLayout(vpp=2), 4, "vpp=2 needs pp >= 2"),
        (ParallelLayout(tp=2, cp=4), 4, "not divisible by tp\\*pp\\*cp=8"),
        (ParallelLayout(cp=0), 4, "cp must be >= 1"),
    ],
)
def test_bad_layouts(layout, world, match):
    with pytest.raises(ValueError, match=match):
        layout.dp(world)


def test_unknown_patch_name_is_rejected():
    with pytest.raises(ValueError, match="unknown shim patch"):
        cpu_shim.apply(disable=["no_such_patch"])


def test_every_patch_documents_itself():
    for patch in cpu_shim.PATCHES.values():
        assert patch.assumes and patch.where and patch.why_safe, patch.name


def test_apply_and_revert_restore_originals(monkeypatch):
    monkeypatch.delenv(cpu_shim.DISABLE_ENV, raising=False)
    original = torch.cuda.current_device
    try:
        active = cpu_shim.apply(cuda=False)
        assert set(active) == set(cpu_shim.PATCHES)
        assert torch.cuda.current_device() == torch.device("cpu")
        with cpu_shim.without("current_device"):
            assert torch.cuda.current_device is original
        assert torch.cuda.current_device() == torch.device("cpu")
        # With CUDA only the upstream-bug fixes stay.
        active = cpu_shim.apply(cuda=True)
        assert set(active) == {n for n, p in cpu_shim.PATCHES.items() if p.always}
    finally:
        cpu_shim.revert_all()
    assert torch.cuda.current_device is original


def test_disable_through_environment(monkeypatch):
    monkeypatch.setenv(cpu_shim.DISABLE_ENV, "rng, batch_p2p")
    try:
        active = cpu_shim.apply(cuda=False)
        assert "rng" not in active and "batch_p2p" not in active and "type_names" in active
    finally:
        cpu_shim.revert_all()


def test_refuses_another_megatron_core(monkeypatch):
    import megatron.core

    monkeypatch.setattr(megatron.core, "__version__", "0.99.0")
    with pytest.raises(RuntimeError, match=r"megatron-core==0\.16\.1"):
        cpu_shim.apply()


def test_process_groups_are_destroyed_before_the_interpreter_exits():
    """A process that returns without destroying its groups (train.py's main, the tools) has
    them torn down by an exit hook while Python is whole: gloo's threads outliving the
    interpreter aborted a rank at exit after a successful run (CI, SIGABRT, "terminate called
    without an active exception"). atexit runs hooks last-registered first, so a hook
    registered before ``initialize`` sees the state the exit hook left."""
    import os
    import subprocess
    import sys

    from megatron_navil.parallel.spawn import free_port

    script = (
        "import atexit, torch\n"
        "from megatron_navil.parallel import initialize\n"
        "atexit.register(lambda: print('alive at exit:', torch.distributed.is_initialized()))\n"
        "initialize()\n"
        "print('alive after initialize:', torch.distributed.is_initialized())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT")}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "alive after initialize: True" in proc.stdout
    assert "alive at exit: False" in proc.stdout, proc.stdout
