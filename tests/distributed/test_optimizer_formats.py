"""The plain megatron-core optimizer (DP = 1) and the distributed one (DP > 1) with the NaViL
model: the same numbers at DP = 1, and checkpoints of either resuming into the other
(``checkpoint.store``), with the dense and the expert-parallel (chained) optimizer, and in
the partly frozen stage S1.1.

Tolerances:
- Plain vs distributed optimizer at DP = 1, same layout: bit-identical losses (the same
  elementwise Adam on the same gradients; fp32, no clipping in these runs).
- A resume in another layout and with the other optimizer: the next 3 losses within 1e-5
  relative of the uninterrupted run's (the layouts' ~1e-7 forward/gradient differences,
  which Adam amplifies; measured <= 1e-7). A resume that lost Adam's state (weights only)
  must miss by more than 10x that within those 3 steps (measured: 8e-4 by the second step,
  3e-3 by the third in S1.1), so the comparison can fail.
"""

from __future__ import annotations

import warnings

import pytest

from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import navil_run as N

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TOL = 1e-5
# (saved at, loaded at): layouts of 2 ranks; DP=1 runs the plain optimizer, DP=2 the
# distributed one (training.optim.use_distributed_optimizer's auto rule).
DIRECTIONS = {
    "plain_to_distributed": (dict(tp=2), dict(), None),
    "distributed_to_plain": (dict(), dict(tp=2), None),
    "plain_to_distributed_ep2": (dict(tp=2, ep=2, etp=1), dict(ep=2), None),
    "distributed_to_plain_ep2": (dict(ep=2), dict(tp=2, ep=2, etp=1), None),
    # stage S1.1: the text experts frozen; at EP=2 one rank's expert optimizer holds nothing
    "plain_to_distributed_s1.1_ep2": (dict(tp=2, ep=2, etp=1), dict(ep=2), "s1.1"),
    "distributed_to_plain_s1.1_ep2": (dict(ep=2), dict(tp=2, ep=2, etp=1), "s1.1"),
    "plain_to_plain_s1.1_ep2": (dict(tp=2, ep=2, etp=1), dict(tp=2, ep=2, etp=1), "s1.1"),
}


def _cfg():
    from megatron_navil.config.registry import get_config

    return get_config("tiny")


def _auto_run(cfg, layout: dict, stage: str | None = None):
    from megatron_navil.parallel import initialize
    from megatron_navil.training.optim import use_distributed_optimizer

    distributed = use_distributed_optimizer("auto", initialize(**layout))
    return N.setup_run(cfg, layout, optimizer="adam", distributed_optimizer=distributed, lr=1e-3,
                       stage=stage)  # fmt: skip


def _same_numbers() -> dict:
    """DP=1 (TP=2): 3 steps with the plain optimizer and with the distributed one."""
    warnings.filterwarnings("ignore")
    out = {}
    for distributed in (False, True):
        run = N.setup_run(_cfg(), dict(tp=2), optimizer="adam",
                          distributed_optimizer=distributed, lr=1e-3)  # fmt: skip
        out[distributed] = [run.step(batch_seed=s) for s in range(3)]
    return out


def _resume(root: str, names: list[str]) -> dict:
    from megatron_navil.checkpoint.store import load, load_weights, optimizer_format, save

    warnings.filterwarnings("ignore")
    cfg, out = _cfg(), {}
    for name in names:
        src_layout, dst_layout, stage = DIRECTIONS[name]
        src = _auto_run(cfg, src_layout, stage)
        for s in range(2):
            src.step(batch_seed=s)
        path = save(f"{root}/{name}", 2, src.chunks, src.optimizer, {})
        uninterrupted = [src.step(batch_seed=s) for s in (5, 6, 7)]
        dst = _auto_run(cfg, dst_layout, stage)
        load(path, dst.chunks, dst.optimizer)
        resumed = [dst.step(batch_seed=s) for s in (5, 6, 7)]
        fresh = _auto_run(cfg, dst_layout, stage)
        load_weights(path, fresh.chunks)
        weights_only = [fresh.step(batch_seed=s) for s in (5, 6, 7)]
        out[name] = dict(
            formats=(optimizer_format(src.optimizer), optimizer_format(dst.optimizer)),
            uninterrupted=uninterrupted, resumed=resumed, weights_only=weights_only,
        )  # fmt: skip
    return out


def test_plain_optimizer_gives_the_distributed_optimizers_numbers_at_dp1():
    r = run_distributed(_same_numbers, 2, timeout=600)[0]
    assert r[False] == r[True]


@pytest.fixture(scope="module")
def resumes(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("formats"))
    return run_distributed(_resume, 2, root, list(DIRECTIONS), timeout=900)[0]


@pytest.mark.parametrize("name", list(DIRECTIONS))
def test_checkpoint_resumes_into_the_other_optimizer(resumes, name):
    r = resumes[name]
    src, dst = name.split("_to_")
    assert r["formats"] == (src, dst.split("_")[0])
    u, got, lost = r["uninterrupted"], r["resumed"], r["weights_only"]
    for a, b in zip(got, u, strict=True):
        assert abs(a - b) <= TOL * abs(b), (got, u)
    assert max(abs(a - b) / abs(b) for a, b in zip(lost, u, strict=True)) > 10 * TOL, (lost, u)
