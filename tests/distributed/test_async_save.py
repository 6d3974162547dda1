"""checkpoint/async_save.py through store.save: an asynchronous save is a snapshot of the
moment it was called (training steps while it is written do not leak into it), is not complete
until finalized on every rank, and holds bit-identical tensors to a synchronous save of the
same state; a run resumed from it continues bit-exactly."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import navil_run as N

pytestmark = pytest.mark.distributed
LAYOUT = dict(tp=2)  # TP2 with the distributed optimizer over DP1: every rank writes shards


def _scenario(root: str) -> dict:
    import os

    from megatron_navil.checkpoint.async_save import WRITE_DELAY_ENV, AsyncSaves
    from megatron_navil.checkpoint.directory import complete_iterations, is_complete, latest
    from megatron_navil.checkpoint.store import load, save
    from megatron_navil.config.registry import get_config

    warnings.filterwarnings("ignore")
    root_p = Path(root)
    cfg = get_config("tiny")
    run = N.setup_run(cfg, LAYOUT, optimizer="adam", distributed_optimizer=True, lr=1e-3)
    run.step(batch_seed=0)
    save(root_p / "sync", 1, run.chunks, run.optimizer, {"data": {"at": 1}}, keep_last=2)

    saves = AsyncSaves()
    os.environ[WRITE_DELAY_ENV] = "3@1"  # the writer of iteration 1 lingers 3 s
    save(root_p / "async", 1, run.chunks, run.optimizer, {"data": {"at": 1}}, 2, None, saves)
    complete_while_writing = complete_iterations(root_p / "async")
    pending = list(saves.pending)
    # Training goes on while the save is written: these steps change the weights and the
    # optimizer state, which must not reach the checkpoint.
    after = [run.step(batch_seed=s) for s in (5, 6)]
    finalized = saves.wait()
    os.environ.pop(WRITE_DELAY_ENV)
    saves.close()

    resumed = N.setup_run(cfg, LAYOUT, optimizer="adam", distributed_optimizer=True, lr=1e-3)
    state = load(latest(root_p / "async"), resumed.chunks, resumed.optimizer)
    again = [resumed.step(batch_seed=s) for s in (5, 6)]
    return dict(
        complete_while_writing=complete_while_writing, pending=pending, finalized=finalized,
        complete_after=is_complete(root_p / "async" / "iter_0000001"), state=state,
        after=after, again=again,
    )  # fmt: skip


def _tensors(checkpoint: Path, out: Path) -> dict:
    """Every tensor of a torch_dist checkpoint, read back in this process (no ranks)."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, out)
    return torch.load(out, weights_only=False)


def test_async_save_equals_sync_and_resumes_bit_exactly(tmp_path):
    r = run_distributed(_scenario, 2, str(tmp_path), timeout=600)[0]
    assert r["complete_while_writing"] == []  # not complete before every writer finished
    assert r["pending"] == [1] and r["finalized"] == [1] and r["complete_after"]
    assert r["state"] == {"iteration": 1, "data": {"at": 1}}
    # Resumed from the async checkpoint: the same losses as the run that went on (bit-exact),
    # so the checkpoint holds the state of the save call, not of the steps taken meanwhile.
    assert r["again"] == r["after"]

    sync, async_ = tmp_path / "sync" / "iter_0000001", tmp_path / "async" / "iter_0000001"
    a = _tensors(sync, tmp_path / "sync.pt")
    b = _tensors(async_, tmp_path / "async.pt")
    assert sorted(a) == sorted(b)
    tensors = [k for k, v in a.items() if isinstance(v, torch.Tensor)]
    assert len(tensors) > 20 and any("optimizer" in k for k in tensors), sorted(a)[:20]
    for key in tensors:
        assert torch.equal(a[key], b[key]), key  # bit-identical
    for rank in range(2):
        name = f"rng/rank_{rank:05d}.pt"
        ra, rb = (torch.load(p / name, weights_only=True) for p in (sync, async_))
        assert torch.equal(ra["torch"], rb["torch"])
    assert json.loads((sync / "train_state.json").read_text()) == json.loads(
        (async_ / "train_state.json").read_text()
    )
    assert (tmp_path / "async" / "latest_checkpointed_iteration.txt").read_text() == "1"
