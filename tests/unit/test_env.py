"""megatron_navil.env: collect() keys, the CLI table and --json, and the pinned versions."""

from __future__ import annotations

import importlib.metadata as metadata
import json
import subprocess
import sys

import pytest

import megatron_navil
from megatron_navil import env

EXPECTED_KEYS = {
    "megatron_navil",
    "python",
    "platform",
    "torch",
    "torch_build",
    "megatron_core",
    "megatron_core_pinned",
    "megatron_core_matches_pin",
    "transformer_engine",
    "transformer_engine_range",
    "transformer_engine_in_range",
    "flash_attn",
    "apex",
    "cuda_available",
    "gpu_count",
    "gpus",
    "nvcc",
    "nvcc_version",
    "native_ext",
    "native_ext_error",
    "cuda_ext",
    "cuda_ext_error",
    "distributed_backend",
    "transformer_impl_auto",
    "attention_backend_auto",
    "warnings",
}


def test_collect_keys_and_values():
    info = env.collect()
    assert set(info) == EXPECTED_KEYS
    assert info["megatron_navil"] == megatron_navil.__version__
    assert info["megatron_core_pinned"] == megatron_navil.MCORE_VERSION
    assert info["distributed_backend"] == ("nccl" if info["cuda_available"] else "gloo")
    assert info["gpu_count"] == len(info["gpus"])
    json.dumps(info)  # serialisable


def test_collect_reports_what_auto_picks(monkeypatch):
    """The report's picks come from models.impl's resolvers (faked availability: a GPU with
    TransformerEngine and flash-attn found must read te + flash)."""
    import torch

    from megatron_navil.models import impl

    info = env.collect()
    if not info["cuda_available"]:
        assert (info["transformer_impl_auto"], info["attention_backend_auto"]) == ("local", "sdpa")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(impl.importlib.util, "find_spec", lambda name: object())
    info = env.collect()
    assert (info["transformer_impl_auto"], info["attention_backend_auto"]) == ("te", "flash")
    rows = [line.split() for line in env.format_table(info).splitlines()]
    assert ["--transformer-impl", "auto", "te"] in rows
    assert ["--attention-backend", "auto", "flash"] in rows


def test_collect_warns_on_megatron_core_mismatch(monkeypatch):
    monkeypatch.setattr(megatron_navil, "MCORE_VERSION", "0.0.0")
    info = env.collect()
    assert not info["megatron_core_matches_pin"]
    assert any("does not match the pinned 0.0.0" in w for w in info["warnings"])
    assert "MISMATCH" in env.format_table(info)


def test_missing_distribution_reported_not_installed():
    assert env._dist_version("no-such-dist-xyz", module="no_such_module_xyz") == "not installed"


def _run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_navil.env", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.slow
def test_cli_json_parses():
    proc = _run_cli("--json")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(proc.stdout)
    assert set(info) == EXPECTED_KEYS


@pytest.mark.slow
def test_cli_table():
    proc = _run_cli()
    assert proc.returncode == 0, proc.stderr
    for label in ("megatron_navil", "torch", "megatron-core", "apex", "distributed backend"):
        assert label in proc.stdout


def test_installed_metadata_pins_megatron_core():
    """setup.py reads MCORE_VERSION from megatron_navil/__init__.py: one source of truth."""
    try:
        requires = metadata.requires("megatron_navil") or []
    except metadata.PackageNotFoundError:
        pytest.skip("megatron_navil is not pip-installed")
    assert metadata.version("megatron_navil") == megatron_navil.__version__
    assert f"megatron-core=={megatron_navil.MCORE_VERSION}" in requires


def test_transformer_engine_range_from_megatron_core_metadata():
    # megatron-core 0.16.1 declares transformer-engine >=2.9.0a0,<2.12.0 (its dev extra).
    assert env.transformer_engine_range() == "<2.12.0,>=2.9.0a0"
    info = env.collect()
    if info["transformer_engine"] == env.NOT_INSTALLED:
        assert info["transformer_engine_in_range"] is None  # unknown, and --require fails it
    else:
        assert isinstance(info["transformer_engine_in_range"], bool)


@pytest.mark.slow
def test_cli_require():
    """--require: exit 0 when the checks hold, 1 and one line naming each failed check."""
    ok = subprocess.run(
        [sys.executable, "-m", "megatron_navil.env", "--require", "native_ext",
         "megatron_core_matches_pin"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "megatron_navil.env", "--require", "native_ext", "cuda_ext"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    if env.collect()["cuda_ext"]:
        assert bad.returncode == 0
    else:
        assert bad.returncode == 1
        line = [x for x in bad.stderr.splitlines() if x.startswith("megatron_navil.env:")]
        assert len(line) == 1 and "cuda_ext=False" in line[0] and "native_ext" not in line[0]
    wrong = subprocess.run(
        [sys.executable, "-m", "megatron_navil.env", "--require", "gpus"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert wrong.returncode == 2 and "invalid choice" in wrong.stderr
