"""checkpoint/ (store.py, directory.py) with the NaViL model: atomic saves, last-K retention, a
crashed save never loaded, and a resumed run continuing exactly (bit-exact on CPU) in the same
layout and with the same loss in another layout."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import navil_run as N

pytestmark = pytest.mark.distributed


def _cfg():
    from megatron_navil.config.registry import get_config

    return get_config("tiny")


def _scenario(root: str) -> dict:
    import torch

    from megatron_navil.checkpoint.directory import complete_iterations, latest
    from megatron_navil.checkpoint.store import load, save

    warnings.filterwarnings("ignore")
    root_p = Path(root)
    cfg, layout = _cfg(), dict(tp=2, pp=2)
    run = N.setup_run(cfg, layout, optimizer="adam", distributed_optimizer=True, lr=1e-3)
    losses = [run.step(batch_seed=s) for s in range(2)]
    crashed_seen_as = None
    for it in (1, 2, 3):
        if it == 3 and torch.distributed.get_rank() == 0:
            # A save that crashed half-way (a .tmp directory with some content): never a
            # candidate for loading, removed by the next successful save.
            (root_p / "iter_0000009.tmp" / "junk").mkdir(parents=True)
            crashed_seen_as = latest(root_p).name
        save(root_p, it, run.chunks, run.optimizer, {"sampler": {"consumed": it}}, keep_last=2)
    kept = complete_iterations(root_p)
    chosen = latest(root_p)
    uninterrupted = [run.step(batch_seed=s) for s in (5, 6)]

    resumed = N.setup_run(cfg, layout, optimizer="adam", distributed_optimizer=True, lr=1e-3)
    state = load(chosen, resumed.chunks, resumed.optimizer)
    again = [resumed.step(batch_seed=s) for s in (5, 6)]

    other = N.setup_run(cfg, dict(tp=1, pp=2), optimizer="adam", distributed_optimizer=True)
    load(chosen, other.chunks, other.optimizer)
    other_loss = other.step(batch_seed=5, update=False)
    return dict(
        crashed_seen_as=crashed_seen_as,
        kept=kept, chosen=chosen.name, state=state, losses=losses,
        uninterrupted=uninterrupted, again=again, other=other_loss,
    )  # fmt: skip


def test_save_keep_last_resume(tmp_path):
    results = run_distributed(_scenario, 4, str(tmp_path / "ckpt"), timeout=600)
    r = results[0]
    assert r["kept"] == [2, 3]
    assert r["chosen"] == "iter_0000003"
    assert r["state"] == {"iteration": 3, "sampler": {"consumed": 3}}
    assert (tmp_path / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert r["crashed_seen_as"] == "iter_0000002"
    assert not (tmp_path / "ckpt" / "iter_0000009.tmp").exists()
    # Same layout: the continued curve is bit-identical to the uninterrupted one.
    assert r["again"] == r["uninterrupted"]
    # Another layout (TP1 x PP2): the same loss at the first step after loading (1e-5 rel).
    assert abs(r["other"] - r["uninterrupted"][0]) <= 1e-5 * abs(r["uninterrupted"][0])
