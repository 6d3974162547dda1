"""python -m megatron_navil.train: user mistakes are one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_navil.train import main


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--data", "x", "--steps", "5", "--warmup", "9"], "--warmup 9 must be in [0, --steps 5]"),
        (["--data", "x", "--steps", "5"], "--warmup 200 (the stage's default) must be in"),
        (["--data", "x", "--steps", "5", "--stage", "s3"], "unknown stage 's3'"),
        (["--data", "x", "--steps", "5", "--config", "navil-7b"], "unknown config 'navil-7b'"),
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
def test_bad_arguments(args, message, capsys):
    """Checked before any process group or model exists: in this process."""
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_bad_data_is_one_line_from_the_real_entry():
    """Found after the process group is up (every rank opens the shards): the real entry, no
    traceback."""
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_navil.train", "--data", "/nonexistent", "--steps", "5",
         "--warmup", "1"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "--data:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
