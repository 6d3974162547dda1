"""Configs on disk: ``navil_config.json``, written into every checkpoint that training, the HF
importer or a benchmark saves, and read back. Which file a user's ``--config`` names (a
registered name, such a file, or a checkpoint carrying one) is ``checkpoint.config``'s job.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from megatron_navil.config.model import (
    ConnectorConfig,
    ExpertsConfig,
    ImageConfig,
    LanguageConfig,
    NaViLConfig,
    PromptConfig,
    VisionConfig,
)

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
