"""Typed dataclass configs and the name registry ("tiny", "navil-2b", "navil-9b").

Imports nothing else from the project but ``checkpoint.directory`` (in ``io``: standard
library only, where a checkpoint's config is found).
"""

from megatron_navil.config.model import (
    RECOMPUTE_MODES,
    ConnectorConfig,
    ExpertsConfig,
    ImageConfig,
    LanguageConfig,
    NaViLConfig,
    Recompute,
    VisionConfig,
)
from megatron_navil.config.params import param_counts
from megatron_navil.config.registry import REGISTRY, get_config
from megatron_navil.config.tokens import SPECIAL_TOKENS, VISUAL_TOKENS

__all__ = [
    "RECOMPUTE_MODES",
    "REGISTRY",
    "SPECIAL_TOKENS",
    "VISUAL_TOKENS",
    "ConnectorConfig",
    "ExpertsConfig",
    "ImageConfig",
    "LanguageConfig",
    "NaViLConfig",
    "Recompute",
    "VisionConfig",
    "get_config",
    "param_counts",
]
