"""CUDA sources compile with plain nvcc (no GPU and no CUDA build of torch needed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

CUDA_DIR = Path(__file__).resolve().parents[2] / "csrc" / "cuda"


@pytest.mark.parametrize("source", sorted(p.name for p in CUDA_DIR.glob("*.cu")))
def test_cu_compiles(source, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    # sm_80 (A100) is in nvcc 13's supported list (`nvcc --list-gpu-arch`: compute_75 and up).
    cmd = [nvcc, "-c", "-o", str(tmp_path / "n.o"), "-std=c++17", "-O2", "-arch=sm_80"]
    cmd += ["-Xcompiler", "-Wall", str(CUDA_DIR / source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "n.o").stat().st_size > 0
