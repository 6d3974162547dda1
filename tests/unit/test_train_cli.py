"""python -m megatron_navil.train: user mistakes are one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "/nonexistent", "--steps", "5", "--warmup", "1"], "--data:"),
        (["--data", "x", "--steps", "5", "--warmup", "9"], "--warmup 9 must be in [0, --steps 5]"),
        (["--data", "x", "--steps", "5"], "--warmup 200 (the stage's default) must be in"),
        (["--data", "x", "--steps", "5", "--stage", "s3"], "unknown stage 's3'"),
        (["--data", "x", "--steps", "5", "--config", "navil-7b"], "unknown model config"),
        (["--data", "x", "--steps", "0"], "--steps must be >= 1"),
        (
            ["--data", "x", "--steps", "5", "--warmup", "1", "--init", "/nonexistent"],
            "--init /nonexistent: no complete checkpoint",
        ),
        (
            ["--data", "x", "--steps", "5", "--warmup", "1", "--peak-tflops", "0"],
            "--peak-tflops must be > 0",
        ),
    ],
)
def test_bad_arguments(args, message):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_navil.train", *args],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
