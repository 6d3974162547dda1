"""CUDA sources compile with plain nvcc (no GPU and no CUDA build of torch needed), warning-free,
and the torch bindings of the CUDA extension compile where torch's CUDA headers are installed.
"""

from __future__ import annotations

import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # nvcc in a subprocess

ROOT = Path(__file__).resolve().parents[2]
CUDA_DIR = ROOT / "csrc" / "cuda"


# sm_80 (A100) and sm_90 (H100) are in nvcc 13's supported list (`nvcc --list-gpu-arch`:
# compute_75 and up).
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", sorted(p.name for p in CUDA_DIR.glob("*.cu")))
def test_cu_compiles(source, arch, tmp_path):
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc not found")
    cmd = [nvcc, "-c", "-o", str(tmp_path / "n.o"), "-std=c++17", "-O2", f"-arch={arch}"]
    # Any warning (nvcc's, the device compiler's or the host compiler's -Wall -Wextra) fails.
    cmd += ["--Werror", "all-warnings", "-Xcompiler", "-Wall,-Wextra,-Werror"]
    cmd += [str(CUDA_DIR / source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}"
    assert "warning" not in (proc.stdout + proc.stderr).lower(), proc.stderr
    assert (tmp_path / "n.o").stat().st_size > 0


def test_bindings_compile():
    """csrc/cuda/bindings.cpp against torch's CUDA headers (syntax and types, no link). A CPU
    build of torch ships most c10/cuda headers but not the generated
    c10/cuda/impl/cuda_cmake_macros.h, so this only runs with a CUDA build of torch."""
    import torch
    from torch.utils import cpp_extension as ce

    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    dirs = [Path(d) for d in ce.include_paths()]
    if not any((d / "c10/cuda/impl/cuda_cmake_macros.h").is_file() for d in dirs):
        pytest.skip(
            f"torch {torch.__version__} has no CUDA headers (c10/cuda/impl/"
            "cuda_cmake_macros.h is generated only in CUDA builds)"
        )
    if ce.CUDA_HOME is None or not (Path(ce.CUDA_HOME) / "include/cuda_runtime.h").is_file():
        pytest.skip("CUDA toolkit headers not found (CUDA_HOME)")
    dirs += [Path(ce.CUDA_HOME) / "include", Path(sysconfig.get_paths()["include"])]
    cmd = [gxx, "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", f"-I{CUDA_DIR}"]
    cmd += [f"-isystem{d}" for d in dirs]  # warnings in torch's own headers are not ours
    cmd += ["-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    cmd += [str(CUDA_DIR / "bindings.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
