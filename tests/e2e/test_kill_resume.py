"""kill -9 of a training job (torchrun + 2 ranks of ``python -m megatron_navil.train``, the tiny
model, shards made here), then ``--load``: the continued loss curve equals an uninterrupted
run's step for step, bit-exactly (fp32 on CPU), whether the kill lands between checkpoints,
inside a save or while an asynchronous save (``--async-save``) is being written; a half-written
checkpoint (``iter_N.tmp``) is never the one loaded. The
uninterrupted run also checks the MFU wiring: its logged model FLOPs are those of the real
samples and image segments of the step's batches, and its MFU is FLOPs / (seconds x ranks x
peak)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_navil.checkpoint.async_save import WRITE_DELAY_ENV
from megatron_navil.checkpoint.directory import complete_iterations, latest
from megatron_navil.checkpoint.store import SAVE_DELAY_ENV
from megatron_navil.testing import synthetic_corpus as S
from megatron_navil.testing.loader_corpus import index

pytestmark = pytest.mark.distributed
ROOT = Path(__file__).resolve().parents[2]
STEPS, SAVE_INTERVAL, GLOBAL_BATCH, SEQ, PEAK_TFLOPS = 6, 2, 4, 256, 0.5


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("killdata")
    written = S.write_corpus(root / "src", num_train=48, num_val=0, seed=5, max_side=64)
    common = ("--config", "tiny", "--template", "qwen3-chat", "--max-tokens", str(SEQ))
    return index([written["train"]], root / "shards", written["tokenizer"], *common)


def _start(shards: Path, run: Path, log: str, *extra: str, env: dict | None = None):
    """torchrun with 2 CPU ranks, in its own session (the test kills it and its workers)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "megatron_navil.train", "--config", "tiny", "--data", str(shards),
        "--steps", str(STEPS), "--seq-length", str(SEQ), "--global-batch", str(GLOBAL_BATCH),
        "--warmup", "1", "--lr", "2e-3", "--save", str(run / "ckpt"),
        "--save-interval", str(SAVE_INTERVAL), "--keep-last", "3",
        "--log-dir", str(run / log), "--no-progress", *extra,
    ]  # fmt: skip
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    with open(run / f"{log}.out", "w") as out:  # the child keeps its own descriptor
        return subprocess.Popen(
            cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip


def _finish(proc: subprocess.Popen, run: Path, log: str, timeout: float = 240) -> None:
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_tree(proc.pid)
        raise
    assert rc == 0, (run / f"{log}.out").read_text()[-4000:]


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _kill_tree(pid: int) -> None:
    """SIGKILL torchrun and every process under it (its workers run in sessions of their
    own, so killing torchrun's process group alone would leave them running)."""
    for p in _descendants(pid):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _losses(path: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines}


def _wait_for(cond, proc: subprocess.Popen, what: str, timeout: float = 180) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before {what}")
        if time.monotonic() > end:
            _kill_tree(proc.pid)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> dict:
    """The uninterrupted run (with an MFU peak, so model FLOPs and MFU are logged)."""
    run = tmp_path_factory.mktemp("reference")
    proc = _start(shards, run, "log", "--peak-tflops", str(PEAK_TFLOPS))
    _finish(proc, run, "log")
    lines = [json.loads(x) for x in (run / "log" / "progress.txt").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, STEPS + 1))
    return {"losses": {x["step"]: x["loss"] for x in lines}, "lines": lines, "run": run}


def test_mfu_is_model_flops_of_the_real_batch(reference, shards):
    from megatron_navil.config.registry import get_config
    from megatron_navil.data.loader import build_data_loader
    from megatron_navil.training.flops import batch_flops

    cfg = get_config("tiny")
    first = reference["lines"][0]
    # The step-1 batches of both data-parallel ranks, rebuilt as train.py builds its loader.
    want = 0.0
    for rank in range(2):
        loader = build_data_loader(
            [shards], seq_length=SEQ, global_batch=GLOBAL_BATCH, seed=1234, dp_rank=rank,
            dp_size=2,
        )  # fmt: skip
        batches = iter(loader)
        want += sum(batch_flops(cfg, next(batches)) for _ in range(GLOBAL_BATCH // 2))
    assert first["model_flops"] == pytest.approx(want, rel=1e-12)
    expected_mfu = want / first["step_seconds"] / (2 * PEAK_TFLOPS * 1e12)
    assert first["mfu"] == pytest.approx(expected_mfu, rel=1e-9)
    assert all(x["mfu"] > 0 for x in reference["lines"])


def test_kill_during_training_then_resume(reference, shards, tmp_path):
    proc = _start(shards, tmp_path, "log1")
    progress = tmp_path / "log1" / "progress.txt"
    _wait_for(
        lambda: progress.is_file() and len(progress.read_text().splitlines()) >= 3,
        proc, "step 3",
    )  # fmt: skip
    _kill_tree(proc.pid)
    proc.wait(timeout=30)
    killed = _losses(progress)
    chosen = latest(tmp_path / "ckpt")
    assert chosen is not None
    resumed_from = int(chosen.name.split("_")[1])
    # Killed mid-run: after step 3's log, before the end (the saves are at 2, 4 and 6).
    assert resumed_from in (2, 4) and max(killed) < STEPS, (chosen, killed)
    assert all(killed[s] == reference["losses"][s] for s in killed)
    _finish(_start(shards, tmp_path, "log2", "--load", str(tmp_path / "ckpt")), tmp_path, "log2")
    again = _losses(tmp_path / "log2" / "progress.txt")
    assert sorted(again) == list(range(resumed_from + 1, STEPS + 1))
    assert again == {s: reference["losses"][s] for s in again}  # bit-exact


def test_kill_inside_a_checkpoint_save_then_resume(reference, shards, tmp_path):
    # Every save sleeps 2 s after writing the model/optimizer shards (before the RNG states,
    # train_state.json and the rename): the kill lands inside the second save, iter 4.
    delay = {SAVE_DELAY_ENV: "2"}
    proc = _start(shards, tmp_path, "log1", env=delay)
    half = tmp_path / "ckpt" / "iter_0000004.tmp"
    _wait_for(lambda: (half / "metadata.json").is_file(), proc, "the save of iteration 4")
    time.sleep(0.3)  # well inside the 2 s window
    _kill_tree(proc.pid)
    proc.wait(timeout=30)
    assert half.is_dir() and not (half / "train_state.json").exists()
    assert complete_iterations(tmp_path / "ckpt") == [2]
    assert latest(tmp_path / "ckpt").name == "iter_0000002"  # never the .tmp
    _finish(_start(shards, tmp_path, "log2", "--load", str(tmp_path / "ckpt")), tmp_path, "log2")
    again = _losses(tmp_path / "log2" / "progress.txt")
    assert sorted(again) == list(range(3, STEPS + 1))
    assert again == {s: reference["losses"][s] for s in again}  # bit-exact
    assert not half.exists()  # the resumed run's own save of iteration 4 replaced it
    assert complete_iterations(tmp_path / "ckpt") == [2, 4, 6]  # --keep-last 3


def _tensors(checkpoint: Path, out: Path) -> dict:
    """Every tensor of a torch_dist checkpoint, read back in this process (no ranks)."""
    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(checkpoint, out)
    return torch.load(out, weights_only=False)


def test_kill_during_an_async_save_then_resume(reference, shards, tmp_path):
    """--async-save; the forked writer of iteration 4 lingers 600 s after writing its shards
    (test hook), so steps 5 and 6 run while that save is pending and the kill lands before
    it is finalized. The resume (also asynchronous, and also profiling step 3 and collecting
    garbage every 2 steps: the CLI wiring of those options) continues from iteration 2
    bit-exactly, and its final checkpoint holds bit-identical tensors to the synchronous
    reference's."""
    import torch

    proc = _start(shards, tmp_path, "log1", "--async-save", env={WRITE_DELAY_ENV: "600@4"})
    progress, ckpt = tmp_path / "log1" / "progress.txt", tmp_path / "ckpt"
    half = ckpt / "iter_0000004.tmp"
    _wait_for(
        lambda: progress.is_file() and len(progress.read_text().splitlines()) >= 5
        and len(list(half.glob("*.distcp"))) >= 2,
        proc, "step 5 with the iteration-4 shards written",
    )  # fmt: skip
    _kill_tree(proc.pid)
    proc.wait(timeout=30)
    killed = _losses(progress)
    assert max(killed) >= 5  # training went on while iteration 4 was being written
    assert all(killed[s] == reference["losses"][s] for s in killed)  # async changes no number
    assert half.is_dir() and not (half / "train_state.json").exists()
    assert complete_iterations(ckpt) == [2]  # the finished background save of iteration 2
    assert latest(ckpt).name == "iter_0000002"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "2"

    extra = ("--async-save", "--profile-steps", "3:3", "--manual-gc-interval", "2")
    _finish(_start(shards, tmp_path, "log2", "--load", str(ckpt), *extra), tmp_path, "log2")
    again = _losses(tmp_path / "log2" / "progress.txt")
    assert sorted(again) == list(range(3, STEPS + 1))
    assert again == {s: reference["losses"][s] for s in again}  # bit-exact
    assert not half.exists()
    assert complete_iterations(ckpt) == [2, 4, 6]  # --keep-last 3
    traces = sorted(p.name for p in (tmp_path / "log2" / "profile").iterdir())
    assert traces == ["rank0.steps3-3.pt.trace.json", "rank1.steps3-3.pt.trace.json"]
    want = _tensors(reference["run"] / "ckpt" / "iter_0000006", tmp_path / "sync.pt")
    got = _tensors(ckpt / "iter_0000006", tmp_path / "async.pt")
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(got[key], value), key


def test_resume_at_another_layout_and_init_from_a_checkpoint(reference, shards, tmp_path):
    """The reference's iteration-4 checkpoint (TP1 PP1 DP2) resumed at PP2 (DP1): the first
    step's loss equals the uninterrupted run's within 1e-5 (fp32; the layouts reduce in other
    orders). Then ``--init`` of a new stage run from it: weights only (the iteration and the
    data start afresh), so its first loss is far below a fresh model's."""
    shutil.copytree(reference["run"] / "ckpt" / "iter_0000004", tmp_path / "ckpt" / "iter_0000004")
    _finish(
        _start(shards, tmp_path, "log_pp2", "--pp", "2", "--load", str(tmp_path / "ckpt")),
        tmp_path, "log_pp2",
    )  # fmt: skip
    pp2 = _losses(tmp_path / "log_pp2" / "progress.txt")
    assert sorted(pp2) == [5, 6]
    want = reference["losses"][5]
    assert abs(pp2[5] - want) <= 1e-5 * abs(want), (pp2[5], want)

    init = tmp_path / "init_run"
    init.mkdir()
    proc = _start(
        shards, init, "log", "--init", str(reference["run"] / "ckpt"), "--exit-after", "1"
    )
    _finish(proc, init, "log")
    assert "initialised the model from" in (init / "log.out").read_text()
    first = _losses(init / "log" / "progress.txt")
    assert sorted(first) == [1]  # a new run: iteration 1, not 7
    # Six steps of the reference took the loss from 6.28 to about 5.3 on these batches.
    assert first[1] < reference["losses"][1] - 0.5, (first, reference["losses"][1])
