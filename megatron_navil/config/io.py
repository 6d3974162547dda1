"""Configs on disk: ``navil_config.json`` (written into every checkpoint that training, the HF
importer or a benchmark saves) and :func:`resolve_config`, which turns what a user types after
``--config`` into a config: a registered name, such a JSON file, or a checkpoint carrying one.
The one import from outside ``config/``: ``checkpoint.directory`` (standard library only), the
definition of a complete checkpoint whose config is read.

A checkpoint converted from an HF model whose dimensions are not a registered config can thus
be trained, captioned and exported by naming the checkpoint itself.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from megatron_navil.checkpoint.directory import latest
from megatron_navil.config.model import (
    ConnectorConfig,
    ExpertsConfig,
    ImageConfig,
    LanguageConfig,
    NaViLConfig,
    PromptConfig,
    VisionConfig,
)
from megatron_navil.config.registry import REGISTRY, get_config

CONFIG_FILE = "navil_config.json"
"""The model config a checkpoint's ``iter_*`` directory holds."""


def config_to_dict(cfg: NaViLConfig) -> dict[str, Any]:
    return asdict(cfg)


def _vision_fields(vision: dict[str, Any]) -> dict[str, Any]:
    """``vision`` with tuples for lists, and a config written before the token order was
    configurable (keys ``window``/``full_attention_layers``, no ``window_size``) read as what
    it was trained with: raster order (``window_size`` None). The old window attention
    restored raster order after the encoder; no checkpoint used it, so it is refused."""
    if "window_size" not in vision:
        window = vision.pop("window", None)
        layers = vision.pop("full_attention_layers", ())
        if window is not None or layers:
            raise ValueError(
                f"vision.window={window}, full_attention_layers={layers}: the window "
                "attention that restored raster order is gone (window_size/"
                "fullatt_block_indexes now follow the released NaViL code)"
            )
        vision["window_size"] = None
    if vision.get("fullatt_block_indexes") is not None:
        vision["fullatt_block_indexes"] = tuple(vision["fullatt_block_indexes"])
    return vision


def config_from_dict(data: dict[str, Any]) -> NaViLConfig:
    """Inverse of :func:`config_to_dict`, validated."""
    vision = _vision_fields(dict(data["vision"]))
    image = dict(data["image"])
    image["mean"], image["std"] = tuple(image["mean"]), tuple(image["std"])
    return NaViLConfig(
        name=data["name"],
        vision=VisionConfig(**vision),
        language=LanguageConfig(**data["language"]),
        connector=ConnectorConfig(**data["connector"]),
        experts=ExpertsConfig(**data["experts"]),
        image=ImageConfig(**image),
        # configs written before prompts were part of the model: the released default
        prompt=PromptConfig(**data.get("prompt", {})),
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
