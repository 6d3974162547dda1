"""Report the software/hardware environment: ``python -m megatron_navil.env [--json]``.

Never crashes on a missing optional package: versions come from ``importlib.metadata`` and
GPU libraries (TransformerEngine, flash-attn, apex) are never imported, only looked up.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as metadata
import importlib.util
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from typing import Any

import megatron_navil

NOT_INSTALLED = "not installed"


def _dist_version(*dist_names: str, module: str | None = None) -> str:
    """Version of the first installed distribution among ``dist_names``, else NOT_INSTALLED.

    If no distribution metadata exists but ``module`` can be found (e.g. apex built in place),
    reports it as installed with an unknown version, without importing it.
    """
    for name in dist_names:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    if module is not None and importlib.util.find_spec(module) is not None:
        return "installed (version unknown)"
    return NOT_INSTALLED


def _nvcc() -> tuple[str | None, str | None]:
    """(path, release version) of nvcc from PATH or $CUDA_HOME/bin; (None, None) if absent."""
    path = shutil.which("nvcc")
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if path is None and cuda_home and os.access(os.path.join(cuda_home, "bin", "nvcc"), os.X_OK):
        path = os.path.join(cuda_home, "bin", "nvcc")
    if path is None:
        return None, None
    try:
        out = subprocess.run(
            [path, "--version"], capture_output=True, text=True, timeout=20, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return path, None
    match = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return path, (match.group(2) if match else None)


def transformer_engine_range() -> str | None:
    """The transformer-engine versions megatron-core declares it works with (the requirement in
    its ``dev`` extra, e.g. ``<2.12.0,>=2.9.0a0``); None without megatron-core or the entry."""
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        requirements = metadata.requires("megatron-core") or []
    except metadata.PackageNotFoundError:
        return None
    for line in requirements:
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.name.replace("_", "-").lower() == "transformer-engine" and req.specifier:
            return str(req.specifier)
    return None


def _in_range(version: str, spec: str | None) -> bool | None:
    """Whether ``version`` satisfies ``spec`` (pre-releases and local tags such as NGC's
    ``2.10.0+abc`` allowed); None when either is unknown."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    if spec is None:
        return None
    try:
        return SpecifierSet(spec).contains(Version(version).public, prereleases=True)
    except InvalidVersion:
        return None


def _try_import(module: str) -> tuple[bool, str | None]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # broken builds raise ImportError or OSError; report, don't crash
        return False, f"{type(exc).__name__}: {exc}"
    return True, None


def _auto_picks(torch: Any, cuda: bool) -> tuple[str | None, str | None]:
    """What ``--transformer-impl auto`` and ``--attention-backend auto`` pick for a run here
    with train's default precision (bf16 on a GPU, fp32 on CPU), from package look-ups only
    (``models.impl`` with ``try_import=False``: nothing GPU-side is imported, so a package
    that is installed but broken shows here and fails at the run's start, in one line)."""
    if torch is None:
        return None, None
    from megatron_navil.models.impl import resolve_attention_backend, resolve_transformer_impl

    dtype = torch.bfloat16 if cuda else torch.float32
    return (
        resolve_transformer_impl("auto", cuda, try_import=False),
        resolve_attention_backend("auto", cuda, dtype, try_import=False),
    )


def collect() -> dict[str, Any]:
    """Collect the environment report as a JSON-serialisable dict."""
    info: dict[str, Any] = {
        "megatron_navil": megatron_navil.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    warnings: list[str] = []

    try:
        import torch
    except ImportError:
        torch = None
    if torch is None:
        info.update(torch=NOT_INSTALLED, torch_build=None, cuda_available=False, gpu_count=0)
        info["gpus"] = []
        warnings.append("torch is not installed")
    else:
        info["torch"] = torch.__version__
        info["torch_build"] = f"cuda {torch.version.cuda}" if torch.version.cuda else "cpu"
        info["cuda_available"] = bool(torch.cuda.is_available())
        info["gpu_count"] = torch.cuda.device_count() if info["cuda_available"] else 0
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(info["gpu_count"])]

    mcore = _dist_version("megatron-core", "megatron_core")
    info["megatron_core"] = mcore
    info["megatron_core_pinned"] = megatron_navil.MCORE_VERSION
    info["megatron_core_matches_pin"] = mcore == megatron_navil.MCORE_VERSION
    if not info["megatron_core_matches_pin"]:
        warnings.append(
            f"megatron-core {mcore} does not match the pinned {megatron_navil.MCORE_VERSION}; "
            "the CPU shim in megatron_navil.parallel is written against the pinned version"
        )

    info["transformer_engine"] = _dist_version(
        "transformer-engine", "transformer_engine", module="transformer_engine"
    )
    info["transformer_engine_range"] = transformer_engine_range()
    info["transformer_engine_in_range"] = _in_range(
        info["transformer_engine"], info["transformer_engine_range"]
    )
    info["flash_attn"] = _dist_version("flash-attn", "flash_attn", module="flash_attn")
    info["apex"] = _dist_version("apex", module="apex")

    info["nvcc"], info["nvcc_version"] = _nvcc()

    # Native extensions (importing them needs torch loaded first; they link against it).
    if torch is None:
        info["native_ext"], info["native_ext_error"] = False, "torch is not installed"
        info["cuda_ext"], info["cuda_ext_error"] = False, "torch is not installed"
    else:
        info["native_ext"], info["native_ext_error"] = _try_import("megatron_navil._C")
        info["cuda_ext"], info["cuda_ext_error"] = _try_import("megatron_navil._C_cuda")

    info["distributed_backend"] = "nccl" if info["cuda_available"] else "gloo"
    info["transformer_impl_auto"], info["attention_backend_auto"] = _auto_picks(
        torch, info["cuda_available"]
    )
    info["warnings"] = warnings
    return info


_LABELS = {
    "megatron_navil": "megatron_navil",
    "python": "python",
    "platform": "platform",
    "torch": "torch",
    "torch_build": "torch build",
    "megatron_core": "megatron-core",
    "megatron_core_pinned": "megatron-core pinned",
    "transformer_engine": "transformer-engine",
    "transformer_engine_range": "TE range (megatron-core)",
    "flash_attn": "flash-attn",
    "apex": "apex",
    "cuda_available": "CUDA available",
    "gpu_count": "GPUs",
    "nvcc": "nvcc",
    "nvcc_version": "nvcc version",
    "native_ext": "native ext (_C)",
    "cuda_ext": "CUDA ext (_C_cuda)",
    "distributed_backend": "distributed backend",
    "transformer_impl_auto": "--transformer-impl auto",
    "attention_backend_auto": "--attention-backend auto",
}


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def format_table(info: dict[str, Any]) -> str:
    """Render ``collect()``'s dict as an aligned two-column table plus warnings."""
    width = max(len(label) for label in _LABELS.values())
    lines = []
    for key, label in _LABELS.items():
        value = _fmt(info.get(key))
        if key == "megatron_core_pinned":
            value += " (matches)" if info["megatron_core_matches_pin"] else " (MISMATCH)"
        elif key == "gpu_count" and info.get("gpus"):
            value += " (" + ", ".join(info["gpus"]) + ")"
        elif key == "native_ext" and not info.get("native_ext"):
            value += " (build with: pip install --no-build-isolation -e .)"
        elif key == "cuda_ext" and not info.get("cuda_ext") and info.get("torch_build") == "cpu":
            value += " (not built: torch is a CPU-only build)"
        lines.append(f"{label:<{width}}  {value}")
    lines.extend(f"WARNING: {w}" for w in info.get("warnings", []))
    return "\n".join(lines)


# What --require can demand (the Dockerfile's build-end check): report key -> how to say it.
REQUIREMENTS = {
    "native_ext": "the C++ extension megatron_navil._C imports",
    "cuda_ext": "the CUDA extension megatron_navil._C_cuda imports",
    "megatron_core_matches_pin": "megatron-core is the pinned version",
    "transformer_engine_in_range": "transformer-engine is in megatron-core's declared range",
    "flash_attn": "flash-attn is installed",
    "apex": "apex is installed",
}


def missing_requirements(info: dict[str, Any], required: list[str]) -> list[str]:
    """The descriptions of the ``required`` report entries that are not met."""
    failed = []
    for key in required:
        value = info.get(key)
        if value in (None, False, NOT_INSTALLED):  # unknown counts as not met
            failed.append(f"{REQUIREMENTS[key]} ({key}={value})")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m megatron_navil.env",
        description="Print the megatron_navil environment: versions of torch, megatron-core and "
        "the optional GPU libraries, GPUs, nvcc, native extensions, distributed backend.",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--require",
        nargs="+",
        default=[],
        choices=sorted(REQUIREMENTS),
        metavar="CHECK",
        help="after the report, exit 1 unless each CHECK holds: "
        + "; ".join(f"{k}: {v}" for k, v in REQUIREMENTS.items()),
    )
    args = parser.parse_args(argv)
    info = collect()
    print(json.dumps(info, indent=2) if args.json else format_table(info))
    failed = missing_requirements(info, args.require)
    if failed:
        print("megatron_navil.env: required but not met: " + "; ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
