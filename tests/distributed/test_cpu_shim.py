"""Each CPU shim patch is necessary: its scenario passes with the shim and fails with that one
patch disabled (``MEGATRON_NAVIL_SHIM_DISABLE=<name>``), for the reason the patch names.

Scenarios are the smallest megatron-core use that reaches the patched code. The failures
without a patch are errors raised by megatron-core/torch on every rank (or on one:
distopt_empty), or (batch_p2p, distopt_ckpt, distopt_buckets) wrong numbers caught by the
scenario's own comparison.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from megatron_navil.parallel import cpu_shim
from megatron_navil.parallel.spawn import SpawnError, free_port, run_distributed
from megatron_navil.testing import tiny_gpt as T

pytestmark = pytest.mark.distributed

MOE = T.TinyGPTSpec(num_experts=4, num_layers=2)
DENSE = T.TinyGPTSpec(num_layers=4)
ADAM = dict(optimizer="adam", distributed_optimizer=True)


def _rng() -> None:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from megatron_navil.parallel import initialize

    initialize(tp=2)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        drawn = torch.rand(4)
    assert torch.equal(before, torch.get_rng_state()), "fork did not restore the default stream"
    others = [torch.empty(4) for _ in range(2)]
    torch.distributed.all_gather(others, drawn, group=ps.get_tensor_model_parallel_group())
    assert not torch.equal(others[0], others[1]), "TP ranks drew the same model-parallel numbers"


def _dense_step(layout: dict) -> None:
    T.setup_run(DENSE, layout).step(batch_seed=0, update=False)


def _moe_step(layout: dict, dispatcher: str = "alltoall") -> None:
    spec = T.TinyGPTSpec(num_experts=4, num_layers=2, dispatcher=dispatcher)
    T.setup_run(spec, layout).step(batch_seed=0, update=False)


def _interleaved_grads() -> None:
    ref = T.setup_run(DENSE)
    ref.step(batch_seed=0, full_batch=True, update=False)
    ref_grads = T.full_tensors(ref.shards("grad"))
    run = T.setup_run(DENSE, dict(pp=2, vpp=2))
    run.step(batch_seed=0, update=False)
    worst, where = T.max_rel_diff(run.shards("grad"), ref_grads)
    assert worst < 1e-5, f"interleaved pipeline gradient of {where} differs by {worst:.2e}"


def _distributed_adam() -> None:
    T.setup_run(DENSE, dict(), **ADAM).step(batch_seed=0)


def _save(directory: str) -> None:
    run = T.setup_run(DENSE, dict(), **ADAM)
    run.step(batch_seed=0)
    T.save_checkpoint(run.chunks, run.optimizer, directory)


def _resume(directory: str) -> None:
    """Uninterrupted Adam run vs save after 2 steps + load + 2 more (same layout): equal."""
    run = T.setup_run(DENSE, dict(), **ADAM)
    for s in range(4):
        run.step(batch_seed=s)
    expected = run.shards()
    run = T.setup_run(DENSE, dict(), **ADAM)
    for s in range(2):
        run.step(batch_seed=s)
    T.save_checkpoint(run.chunks, run.optimizer, directory)
    run = T.setup_run(DENSE, dict(), seed=5, **ADAM)
    T.load_checkpoint(run.chunks, run.optimizer, directory)
    for s in range(2, 4):
        run.step(batch_seed=s)
    worst, where = T.max_rel_diff(run.shards(), T.full_tensors(expected))
    assert worst < 1e-6, f"resumed Adam run differs at {where} by {worst:.2e}"
    # torch Adam keeps a step per parameter: 2 before the save + 2 after, for every one.
    for opt in getattr(run.optimizer, "chained_optimizers", [run.optimizer]):
        steps = {float(state["step"]) for state in opt.optimizer.state.values()}
        assert steps == {4.0}, f"Adam step counts after resume: {sorted(steps)}"


def _resume_buckets(directory: str) -> None:
    """:func:`_resume` with the gradient buffer in several buckets (overlapped grad reduce,
    small buckets): every parameter's optimizer state must come back, not a shifted slice."""
    from megatron_navil.training.optim import Overlap

    opts = dict(ADAM, overlap=Overlap(grad_reduce=True, bucket_size=2000))
    run = T.setup_run(DENSE, dict(), **opts)
    assert len(run.chunks[0].bucket_groups) > 1
    for s in range(4):
        run.step(batch_seed=s)
    expected = run.shards()
    run = T.setup_run(DENSE, dict(), **opts)
    for s in range(2):
        run.step(batch_seed=s)
    T.save_checkpoint(run.chunks, run.optimizer, directory)
    run = T.setup_run(DENSE, dict(), seed=5, **opts)
    T.load_checkpoint(run.chunks, run.optimizer, directory)
    for s in range(2, 4):
        run.step(batch_seed=s)
    worst, where = T.max_rel_diff(run.shards(), T.full_tensors(expected))
    assert worst < 1e-6, f"resumed bucketed Adam run differs at {where} by {worst:.2e}"


def _freeze_first_experts(chunk: torch.nn.Module) -> None:
    """Freeze global experts 0 and 1 of every MoE layer (at EP=2: all of EP rank 0's)."""
    for module in chunk.modules():
        indices = getattr(module, "local_expert_indices", None)
        if indices is None or not hasattr(module, "router"):
            continue
        for local, expert in enumerate(indices):
            if expert < 2:
                module.experts.local_experts[local].requires_grad_(False)


def _resume_frozen_experts(directory: str) -> None:
    """EP=2 with the experts of EP rank 0 frozen: its expert optimizer holds nothing, and it
    writes the checkpoint's common state (the step); uninterrupted run vs save after 2 steps +
    load + 2 more: equal, and every Adam state's step is 4."""
    setup = dict(spec=MOE, layout=dict(ep=2), freeze=_freeze_first_experts, **ADAM)
    run = T.setup_run(**setup)
    for s in range(4):
        run.step(batch_seed=s)
    expected = run.shards()
    run = T.setup_run(**setup)
    for s in range(2):
        run.step(batch_seed=s)
    T.save_checkpoint(run.chunks, run.optimizer, directory)
    run = T.setup_run(**setup, seed=5)
    T.load_checkpoint(run.chunks, run.optimizer, directory)
    for s in range(2, 4):
        run.step(batch_seed=s)
    got = run.shards()  # this rank's pieces (EP splits the experts)
    for key, pieces in expected.items():
        for (_, _, want), (_, _, have) in zip(pieces, got[key], strict=True):
            worst = float((have - want).abs().max()) / (float(want.abs().max()) or 1.0)
            assert worst < 1e-6, f"resumed Adam run differs at {key} by {worst:.2e}"
    for opt in run.optimizer.chained_optimizers:
        steps = {float(state["step"]) for state in opt.optimizer.state.values()}
        assert steps <= {4.0}, f"Adam step counts after resume: {sorted(steps)}"


NO_CUDA = "Torch not compiled with CUDA enabled"

# patch name -> (world size, scenario, args, text expected in the failure without the patch)
SCENARIOS = {
    "rng": (2, _rng, (), NO_CUDA),
    "current_device": (2, _dense_step, (dict(tp=2),), NO_CUDA),
    "cuda_literals": (2, _dense_step, (dict(),), NO_CUDA),
    "cuda_streams": (2, _moe_step, (dict(ep=2),), "torch.cuda.Stream requires CUDA"),
    "torch_norm_sp": (2, _moe_step, (dict(tp=2),), "sequence parallel not supported"),
    "moe_te_gemm": (2, _moe_step, (dict(),), "te_general_gemm"),
    "moe_splits": (2, _moe_step, (dict(ep=2),), "all_to_all_single"),
    "uneven_collectives": (4, _moe_step, (dict(tp=2, ep=2),), "invalid tensor size"),
    "batch_p2p": (2, _interleaved_grads, (), "differs"),
    "type_names": (2, _distributed_adam, (), "torch.cuda.FloatTensor"),
    "distopt_gather": (2, _save, ("{tmp}",), NO_CUDA),
    "distopt_ckpt": (2, _resume, ("{tmp}",), "KeyError: 'step'"),
    "distopt_empty": (2, _resume_frozen_experts, ("{tmp}",), "assert len(steps) == 1"),
    "distopt_buckets": (2, _resume_buckets, ("{tmp}",), "resumed bucketed Adam run differs"),
}


def _run_quietly(fn, *args):
    warnings.filterwarnings("ignore")
    return fn(*args)


def _launch(name: str, tmp_path) -> None:
    world, fn, args, _ = SCENARIOS[name]
    args = tuple(a.format(tmp=tmp_path) if isinstance(a, str) else a for a in args)
    run_distributed(_run_quietly, world, fn, *args, timeout=120)


def test_every_patch_has_a_scenario():
    assert set(SCENARIOS) | {"ckpt_fork_manager"} == set(cpu_shim.PATCHES)


def _all_scenarios(world: int, directory: str) -> None:
    warnings.filterwarnings("ignore")
    for name, (n, fn, args, _) in SCENARIOS.items():
        if n == world:
            fn(*(a.format(tmp=f"{directory}/{name}") if isinstance(a, str) else a for a in args))


def test_all_scenarios_pass_with_the_shim(tmp_path):
    # One process group per world size: start-up dominates the scenarios' cost.
    for world in sorted({n for n, *_ in SCENARIOS.values()}):
        run_distributed(_all_scenarios, world, world, str(tmp_path), timeout=300)


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_scenario_fails_without_patch(name, tmp_path, monkeypatch):
    monkeypatch.setenv(cpu_shim.DISABLE_ENV, name)
    with pytest.raises(SpawnError) as err:
        _launch(name, tmp_path)
    assert SCENARIOS[name][3] in str(err.value)


UNGUARDED_SAVE = textwrap.dedent(
    """
    import sys, warnings
    warnings.filterwarnings("ignore")
    import torch
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron_navil.parallel import initialize
    initialize()
    state = {"w": ShardedTensor.from_rank_offsets("w", torch.arange(6.0))}
    dist_checkpointing.save(state, sys.argv[1])
    print("SAVED")
    """
)


@pytest.mark.parametrize("disabled", [False, True], ids=["with_patch", "without_patch"])
def test_ckpt_fork_manager_saves_from_an_unguarded_script(disabled, tmp_path):
    """A script with no `if __name__ == '__main__'` guard can save a checkpoint (spawn would
    re-import it in the writer's Manager process and fail)."""
    script = tmp_path / "save.py"
    script.write_text(UNGUARDED_SAVE)
    (tmp_path / "ckpt").mkdir()
    env = dict(
        os.environ, RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port())
    )
    env[cpu_shim.DISABLE_ENV] = "ckpt_fork_manager" if disabled else ""
    proc = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "ckpt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    saved = proc.returncode == 0 and "SAVED" in proc.stdout
    assert saved != disabled, proc.stderr[-2000:]
