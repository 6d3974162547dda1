"""checkpoint/directory.py: the one definition of a complete checkpoint (``iter_NNNNNNN`` with
``train_state.json``) that resuming, ``--init``, the tools and ``config.io`` share, and the
one-line errors of naming a checkpoint."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_navil.checkpoint.directory import (
    complete_iterations,
    is_complete,
    iteration_dir,
    latest,
    require_complete,
    resolve_checkpoint,
)
from megatron_navil.checkpoint.errors import CheckpointError, CheckpointLayoutError


def _save_dir(root: Path) -> Path:
    """iter 2 and 4 complete, iter 6 without train_state.json (not complete), a .tmp save."""
    for it in (2, 4, 6):
        iteration_dir(root, it).mkdir(parents=True)
    for it in (2, 4):
        (iteration_dir(root, it) / "train_state.json").write_text("{}")
    (root / "iter_0000008.tmp").mkdir()
    (root / "iter_12").mkdir()  # fewer than 7 digits: not a checkpoint name
    (root / "iter_12" / "train_state.json").write_text("{}")
    return root


def test_complete_checkpoints_and_the_newest(tmp_path):
    root = _save_dir(tmp_path / "save")
    assert complete_iterations(root) == [2, 4]
    assert latest(root) == root / "iter_0000004"
    assert is_complete(root / "iter_0000004") and not is_complete(root / "iter_0000006")
    assert not is_complete(root / "iter_12")
    assert complete_iterations(tmp_path / "missing") == [] and latest(tmp_path / "missing") is None


def test_resolving_what_a_user_names(tmp_path):
    root = _save_dir(tmp_path / "save")
    assert resolve_checkpoint(root) == root / "iter_0000004"
    assert resolve_checkpoint(root / "iter_0000002") == root / "iter_0000002"
    assert require_complete(root / "iter_0000002") == root / "iter_0000002"
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        resolve_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint \(no train_state"):
        resolve_checkpoint(root / "iter_0000006")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint \(iter_NNNNNNN/"):
        resolve_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="is not a complete checkpoint"):  # a ValueError too
        require_complete(root / "iter_0000006")
    assert issubclass(CheckpointLayoutError, CheckpointError)


def test_config_finds_checkpoints_without_torch():
    """config/ is a leaf (it imports nothing of the project), and resolving a --config through
    checkpoint.config needs only config/ and checkpoint.directory (standard library): reading
    a config, or a checkpoint's, pulls in neither torch nor the rest."""
    code = (
        "import sys, megatron_navil.config.io; a = sorted(sys.modules); "
        "import megatron_navil.checkpoint.config; b = sorted(sys.modules); "
        "pick = lambda ms: [m for m in ms if m == 'torch' or m.startswith('megatron_navil')]; "
        "print([pick(a), pick(b)])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    leaf, resolved = ast.literal_eval(out.stdout)
    assert [m for m in leaf if not m.startswith("megatron_navil.config")] == ["megatron_navil"]
    assert "torch" not in resolved
    assert [m for m in resolved if m.startswith("megatron_navil.checkpoint")] == [
        "megatron_navil.checkpoint",
        "megatron_navil.checkpoint.config",
        "megatron_navil.checkpoint.directory",
        "megatron_navil.checkpoint.errors",
    ]
