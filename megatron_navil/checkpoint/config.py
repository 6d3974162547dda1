"""What a user types after ``--config``, resolved: a registered name, a ``navil_config.json``,
or a checkpoint carrying one (the newest complete ``iter_*`` of a save directory,
``checkpoint.directory.latest``). A checkpoint converted from an HF model whose dimensions are
not a registered config can thus be trained, captioned and exported by naming the checkpoint
itself. Standard library and ``config/`` only: tools resolve configs without importing torch.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_navil.checkpoint.directory import latest
from megatron_navil.config.io import CONFIG_FILE, config_from_dict
from megatron_navil.config.model import NaViLConfig
from megatron_navil.config.registry import REGISTRY, get_config


def checkpoint_config_file(path: str | Path) -> Path | None:
    """The ``navil_config.json`` of a checkpoint: in ``path`` itself (an ``iter_*`` directory)
    or in the newest complete checkpoint (``checkpoint.directory.latest``) of a save
    directory; None when there is none."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return p / CONFIG_FILE
    newest = latest(p)
    if newest is None or not (newest / CONFIG_FILE).is_file():
        return None
    return newest / CONFIG_FILE


def resolve_config(spec: str | Path) -> NaViLConfig:
    """A config from a registered name (``tiny``, ``navil-2b``, ...), a ``navil_config.json``
    file, or a checkpoint directory carrying one. ValueError saying which of the three failed."""
    if str(spec) in REGISTRY:
        return get_config(str(spec))
    p = Path(spec)
    if p.is_file():
        source = p
    elif p.is_dir():
        found = checkpoint_config_file(p)
        if found is None:
            raise ValueError(f"config {str(spec)!r}: the checkpoint carries no {CONFIG_FILE}")
        source = found
    else:
        raise ValueError(
            f"unknown config {str(spec)!r}: not a registered name ({', '.join(REGISTRY)}), "
            f"a {CONFIG_FILE} or a checkpoint directory"
        )
    try:
        return config_from_dict(json.loads(source.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(
            f"config {str(spec)!r}: {source} is not a valid model config ({exc})"
        ) from None
