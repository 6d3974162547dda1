"""Configs on disk: ``navil_config.json`` (written into every checkpoint that training, the HF
importer or a benchmark saves) and :func:`resolve_config`, which turns what a user types after
``--config`` into a config: a registered name, such a JSON file, or a checkpoint carrying one.

A checkpoint converted from an HF model whose dimensions are not a registered config can thus
be trained, captioned and exported by naming the checkpoint itself.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict
from pathlib import Path
from typing import Any

from megatron_navil.config.model import (
    ConnectorConfig,
    ExpertsConfig,
    ImageConfig,
    LanguageConfig,
    NaViLConfig,
    VisionConfig,
)
from megatron_navil.config.registry import REGISTRY, get_config

CONFIG_FILE = "navil_config.json"
"""The model config a checkpoint's ``iter_*`` directory holds."""

_ITER = re.compile(r"^iter_(\d{7,})$")


def config_to_dict(cfg: NaViLConfig) -> dict[str, Any]:
    return asdict(cfg)


def config_from_dict(data: dict[str, Any]) -> NaViLConfig:
    """Inverse of :func:`config_to_dict`, validated."""
    vision = dict(data["vision"])
    vision["full_attention_layers"] = tuple(vision.get("full_attention_layers", ()))
    image = dict(data["image"])
    image["mean"], image["std"] = tuple(image["mean"]), tuple(image["std"])
    return NaViLConfig(
        name=data["name"],
        vision=VisionConfig(**vision),
        language=LanguageConfig(**data["language"]),
        connector=ConnectorConfig(**data["connector"]),
        experts=ExpertsConfig(**data["experts"]),
        image=ImageConfig(**image),
        special_token_first_id=data.get("special_token_first_id"),
    ).validate()


def write_config(directory: str | Path, cfg: NaViLConfig | dict[str, Any]) -> Path:
    """``directory/navil_config.json``; returns its path."""
    data = cfg if isinstance(cfg, dict) else config_to_dict(cfg)
    path = Path(directory) / CONFIG_FILE
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def checkpoint_config_file(path: str | Path) -> Path | None:
    """The ``navil_config.json`` of a checkpoint: in ``path`` itself (an ``iter_*`` directory)
    or in the newest complete ``iter_*`` (one with ``train_state.json``) of a save directory;
    None when there is none."""
    p = Path(path)
    if (p / CONFIG_FILE).is_file():
        return p / CONFIG_FILE
    if not p.is_dir():
        return None
    complete = [
        (int(m.group(1)), d)
        for d in p.iterdir()
        if (m := _ITER.match(d.name)) and (d / "train_state.json").is_file()
    ]
    if not complete:
        return None
    newest = max(complete)[1] / CONFIG_FILE
    return newest if newest.is_file() else None


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
