"""Tiny NaViL configs of both HF backbones for the conversion tests: ``tiny`` (Qwen3 style
with per-head QK-norm), ``tiny-internlm2`` (InternLM2 style, with and without the released 2B
``wo`` then ``wo_ve`` quirk) and ``tiny-llama`` (Qwen3 names without QK-norm, what a Llama
initialisation gives)."""

from __future__ import annotations

import dataclasses

from megatron_navil.config.model import NaViLConfig
from megatron_navil.config.registry import get_config

CASES = ("tiny", "tiny-internlm2", "tiny-internlm2-wo", "tiny-llama")


def tiny_case(name: str) -> NaViLConfig:
    """One of :data:`CASES`."""
    cfg = get_config("tiny")
    lm = cfg.language
    if name == "tiny":
        return cfg
    if name.startswith("tiny-internlm2"):
        language = dataclasses.replace(
            lm, variant="internlm2", qk_norm=False, wo_then_wo_ve=name.endswith("-wo")
        )
    elif name == "tiny-llama":
        language = dataclasses.replace(lm, qk_norm=False)
    else:
        raise ValueError(f"unknown case {name!r}; known: {', '.join(CASES)}")
    return cfg.replace(name=name, language=language).validate()
