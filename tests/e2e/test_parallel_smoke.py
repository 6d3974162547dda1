"""The README's main command, shortened: torchrun with 4 CPU ranks trains the tiny GPT at
TP=2 x PP=2, saves a checkpoint, reloads it at TP=PP=1 and reports the same held-out loss."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_torchrun_smoke_run(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "4",
        str(ROOT / "examples" / "parallel_smoke.py"),
        "--steps",
        "25",
        "--save",
        str(tmp_path / "ckpt"),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "tp=2 pp=2" in proc.stdout and "backend=gloo" in proc.stdout
    assert "reloaded at tp=1 pp=1 ep=1" in proc.stdout and ": same" in proc.stdout
    assert (tmp_path / "ckpt" / "metadata.json").exists()
    # 25 steps on the learnable sequences take the loss well below chance (ln 64 = 4.16).
    last = next(line for line in proc.stdout.splitlines() if line.startswith("loss:"))
    assert float(last.split("->")[1].split()[2]) < 3.5, last


def test_bad_layout_is_a_clear_error():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "parallel_smoke.py"), "--ep", "2"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "--ep > 1 needs --experts" in proc.stderr
