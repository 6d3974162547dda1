"""Preemption: SIGTERM / SIGUSR1 (what SLURM and Kubernetes send before they stop a job) make
``python -m megatron_navil.train`` finish the current step, write a checkpoint and exit 0 on
every rank, and ``--load`` resumes to the last step.

The ranks are started by the test itself (RANK/WORLD_SIZE/MASTER_* as SLURM-launched tasks
see them), so it can signal one rank alone: the other rank never receives the signal and must
still stop after the same step, or the collective checkpoint save would hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megatron_navil.parallel.spawn import free_port
from megatron_navil.testing.loader_corpus import index
from megatron_navil.testing.synthetic_corpus import write_corpus

ROOT = Path(__file__).resolve().parents[2]
STEPS = 12  # more than the run gets to before the signal: the stop must come from it


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("preempt_corpus")
    write_corpus(root / "src", num_train=48, num_val=1, seed=3)
    return index(
        [root / "src" / "train.jsonl"], root / "shards", root / "src" / "tokenizer.json",
        "--config", "tiny", "--template", "qwen3-chat",
    )  # fmt: skip


def _train_args(shards: Path, out: Path, *extra: str) -> list[str]:
    return [
        "-m", "megatron_navil.train", "--config", "tiny", "--data", str(shards),
        "--steps", str(STEPS), "--seq-length", "256", "--global-batch", "2", "--warmup", "1",
        "--save", str(out / "ckpt"), "--log-dir", str(out / "logs"), "--no-progress", *extra,
    ]  # fmt: skip


def _steps_logged(out: Path) -> list[int]:
    path = out / "logs" / "progress.txt"
    if not path.is_file():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(x)["step"] for x in lines if x.endswith("}")]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)  # a launcher's variables from outside the test
    return {**env, **extra}


@pytest.mark.distributed
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_and_resume_finishes(shards, tmp_path, sig):
    out = tmp_path / "run"
    port = str(free_port())
    procs = []
    for r in range(2):
        env = _env(RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=port)  # fmt: skip
        procs.append(subprocess.Popen(
            [sys.executable, *_train_args(shards, out)], env=env, cwd=ROOT,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        ))  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(_steps_logged(out)) < 2:
            if time.monotonic() > deadline or any(p.poll() is not None for p in procs):
                break
            time.sleep(0.2)
        assert len(_steps_logged(out)) >= 2, "training did not reach step 2"
        procs[1].send_signal(sig)  # rank 1 only: rank 0 learns of it through the loop
        logs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        assert p.returncode == 0, f"rank {rank} exited {p.returncode}:\n{log[-3000:]}"
    logged = _steps_logged(out)
    stopped_at = logged[-1]
    assert logged == list(range(1, stopped_at + 1))
    assert stopped_at < STEPS, "the run ended by itself, not by the signal"
    assert f"{sig.name}: stopping after step {stopped_at}" in logs[0], logs[0][-3000:]
    ckpt = out / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(stopped_at)
    state = json.loads((ckpt / f"iter_{stopped_at:07d}" / "train_state.json").read_text())
    assert state["iteration"] == stopped_at

    if sig != signal.SIGTERM:
        return  # one resume is enough: it does not depend on the signal that stopped the run
    # Resume under torchrun (the launcher the cluster scripts use) and run to the end.
    resumed = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         *_train_args(shards, out, "--load", str(ckpt))],
        env=_env(), capture_output=True, text=True, timeout=600, cwd=ROOT,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert _steps_logged(out) == list(range(1, STEPS + 1))
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(STEPS)


@pytest.mark.distributed
def test_sigterm_to_torchrun_checkpoints(shards, tmp_path):
    """Kubernetes signals only PID 1, which is torchrun in the image (examples/k8s): torchrun
    passes SIGTERM on to the ranks and waits for them (PET_SHUTDOWN_TIMEOUT, --shutdown-timeout);
    they checkpoint. torchrun itself then exits non-zero, so the pod is restarted and resumes."""
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         *_train_args(shards, out)],
        env=_env(PET_SHUTDOWN_TIMEOUT="240"), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(_steps_logged(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_steps_logged(out)) >= 2, "training did not reach step 2"
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_at = _steps_logged(out)[-1]
    assert stopped_at < STEPS, log[-3000:]
    assert f"SIGTERM: stopping after step {stopped_at}" in log, log[-3000:]
    assert (out / "ckpt" / "latest_checkpointed_iteration.txt").read_text() == str(stopped_at)


@pytest.mark.distributed
def test_sigterm_with_async_saves_completes_them(shards, tmp_path):
    """--async-save, a save every step, each forked writer lingering 2 s (test hook): the
    SIGTERM stop waits for the pending background saves and completes the last one (marker,
    train_state) before the ranks exit 0; no half-written checkpoint is left behind."""
    from megatron_navil.checkpoint.async_save import WRITE_DELAY_ENV
    from megatron_navil.checkpoint.directory import complete_iterations

    out = tmp_path / "run"
    args = _train_args(shards, out, "--async-save", "--save-interval", "1", "--keep-last", "2")
    proc = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         *args],
        env=_env(PET_SHUTDOWN_TIMEOUT="240", **{WRITE_DELAY_ENV: "2"}), cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 300
        while len(_steps_logged(out)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        assert len(_steps_logged(out)) >= 2, "training did not reach step 2"
        proc.send_signal(signal.SIGTERM)
        log = proc.communicate(timeout=300)[0]
    finally:
        if proc.poll() is None:
            proc.kill()
    stopped_at = _steps_logged(out)[-1]
    assert stopped_at < STEPS, log[-3000:]
    assert f"SIGTERM: stopping after step {stopped_at}" in log, log[-3000:]
    ckpt = out / "ckpt"
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == str(stopped_at)
    assert complete_iterations(ckpt) == [stopped_at - 1, stopped_at]
    assert list(ckpt.glob("iter_*.tmp")) == []
