"""Optimizer steps and dist-checkpoints across layouts, against the single-process run.

Tolerances (relative to each tensor's largest reference value):
- SGD (megatron's FP32Optimizer under DDP): 1e-6. The update is lr * grad, so parameters
  inherit the gradients' ~1e-7 layout differences; measured ~3e-8.
- Adam (megatron's DistributedOptimizer, the only optimizer it shards): 1e-3. Adam divides by
  sqrt(v): for entries whose gradient is near zero, a 1e-7 difference in the gradient moves
  the update by a visible fraction of lr; measured up to ~1.5e-4 after 3 steps at lr=1e-2.
- Loss right after loading a checkpoint in another layout: 1e-5 (a forward pass only).
"""

from __future__ import annotations

import warnings

import pytest

from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import tiny_gpt as T

pytestmark = pytest.mark.distributed

SGD_TOL, ADAM_TOL, LOSS_TOL = 1e-6, 1e-3, 1e-5
SGD_LAYOUTS = [dict(), dict(tp=2), dict(tp=2, pp=2), dict(pp=2, vpp=2)]
ADAM_LAYOUTS = [dict(), dict(tp=2), dict(tp=2, pp=2), dict(ep=2), dict(tp=2, ep=2)]
CKPT_TARGETS = [dict(tp=2, pp=2), dict(), dict(tp=2), dict(pp=2)]
MOE = T.TinyGPTSpec(num_experts=4)
STEPS = 3


def _optimizer_steps() -> dict:
    """Parameters after STEPS optimizer steps: reference vs each layout (on every rank)."""
    warnings.filterwarnings("ignore")
    out = {}
    for kind, spec, layouts, distributed in (
        ("sgd", T.TinyGPTSpec(), SGD_LAYOUTS, False),
        ("adam", MOE, ADAM_LAYOUTS, True),
    ):
        ref = T.setup_run(spec, optimizer=kind)
        for s in range(STEPS):
            ref.step(batch_seed=s, full_batch=True)
        ref_params = T.full_tensors(ref.shards())
        for layout in layouts:
            run = T.setup_run(spec, layout, optimizer=kind, distributed_optimizer=distributed)
            losses = [run.step(batch_seed=s) for s in range(STEPS)]
            out[kind, str(layout)] = (losses, T.max_rel_diff(run.shards(), ref_params))
    return out


def _checkpoint_roundtrip(directory: str) -> dict:
    """Save at TP=2 x PP=2 (distributed Adam, 2 steps); load in other layouts; compare the
    next loss and the parameters after one more step with an uninterrupted run."""
    warnings.filterwarnings("ignore")
    spec, opt = T.TinyGPTSpec(), dict(optimizer="adam", distributed_optimizer=True)
    src = T.setup_run(spec, dict(tp=2, pp=2), **opt)
    for s in range(2):
        src.step(batch_seed=s)
    T.save_checkpoint(src.chunks, src.optimizer, f"{directory}/dense")
    next_loss = src.step(batch_seed=2, update=False)
    src.step(batch_seed=2)
    out: dict = {}
    for layout in CKPT_TARGETS:
        # The uninterrupted run's parameters, in the target layout, for comparison.
        cont = T.setup_run(spec, layout, **opt)
        for s in range(3):
            cont.step(batch_seed=s)
        cont_params = cont.shards()
        dst = T.setup_run(spec, layout, seed=99, **opt)  # different weights until loaded
        T.load_checkpoint(dst.chunks, dst.optimizer, f"{directory}/dense")
        loss = dst.step(batch_seed=2, update=False)
        dst.step(batch_seed=2)
        worst = max(
            float((a[2] - b[2]).abs().max())
            for k in cont_params
            for a, b in zip(cont_params[k], dst.shards()[k], strict=True)
        )
        out[str(layout)] = (loss, next_loss, worst)
    # MoE: EP=2 -> EP=4 and TP=2 x EP=2.
    moe = T.setup_run(MOE, dict(ep=2), **opt)
    moe.step(batch_seed=0)
    T.save_checkpoint(moe.chunks, moe.optimizer, f"{directory}/moe")
    moe_loss = moe.step(batch_seed=1, update=False)
    for layout in (dict(ep=4), dict(tp=2, ep=2)):
        dst = T.setup_run(MOE, layout, seed=99, **opt)
        T.load_checkpoint(dst.chunks, dst.optimizer, f"{directory}/moe")
        out["moe" + str(layout)] = (dst.step(batch_seed=1, update=False), moe_loss, 0.0)
    return out


@pytest.fixture(scope="module")
def steps() -> list[dict]:
    return run_distributed(_optimizer_steps, 4, timeout=300)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> list[dict]:
    directory = str(tmp_path_factory.mktemp("ckpt"))
    return run_distributed(_checkpoint_roundtrip, 4, directory, timeout=300)


@pytest.mark.parametrize("layout", SGD_LAYOUTS, ids=str)
def test_sgd_step_matches_single_process(steps, layout):
    for rank in steps:
        _, (worst, where) = rank["sgd", str(layout)]
        assert worst <= SGD_TOL, f"{where} differs by {worst:.2e} after {STEPS} SGD steps"


@pytest.mark.parametrize("layout", ADAM_LAYOUTS, ids=str)
def test_distributed_adam_step_matches_single_process(steps, layout):
    for rank in steps:
        _, (worst, where) = rank["adam", str(layout)]
        assert worst <= ADAM_TOL, f"{where} differs by {worst:.2e} after {STEPS} Adam steps"


@pytest.mark.parametrize("layout", CKPT_TARGETS, ids=str)
def test_checkpoint_saved_at_tp2_pp2_loads_in(checkpoints, layout):
    for rank in checkpoints:
        loss, expected, worst = rank[str(layout)]
        assert loss == pytest.approx(expected, rel=LOSS_TOL)
        assert worst <= ADAM_TOL, f"resumed Adam step differs by {worst:.2e}"


@pytest.mark.parametrize("layout", [dict(ep=4), dict(tp=2, ep=2)], ids=str)
def test_moe_checkpoint_saved_at_ep2_loads_in(checkpoints, layout):
    for rank in checkpoints:
        loss, expected, _ = rank["moe" + str(layout)]
        assert loss == pytest.approx(expected, rel=LOSS_TOL)
