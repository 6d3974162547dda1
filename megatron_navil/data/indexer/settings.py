"""What determines the indexer's output bytes (:class:`Settings`, saved in ``plan.json``), and
its two outcomes besides a sample: a counted :class:`Skip` of one record (one of
:data:`SKIP_REASONS`) and :class:`IndexFatal`, which stops the run.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from megatron_navil.config.model import DEFAULT_SYSTEM_MESSAGE
from megatron_navil.data.shards.corpus import IMAGE_RULE

MAX_EXAMPLES = 5  # examples kept per skip reason (unit markers, manifest, report)
SKIP_REASONS = (
    "empty_line",
    "malformed_json",
    "bad_record",
    "missing_image",
    "corrupt_image",
    "zero_size_image",
    "bad_aspect",
    "placeholder_mismatch",
    "reserved_token_in_text",
    "no_target",
    "too_long",
)
"""Every reason a record can be skipped for (the report lists them in this order)."""


class IndexFatal(ValueError):
    """A fatal indexing error (bad arguments, ``--strict`` skip, inconsistent output dir)."""


class Skip(Exception):
    """One record not indexed: ``reason`` (one of :data:`SKIP_REASONS`) and a one-line
    ``detail``; the unit counts it and keeps a few examples."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class ImageSettings:
    patch: int = 16
    merge: int = 2
    min_patches: int = 256
    max_patches: int = 24576
    max_aspect: float = 200.0
    multi_scale: bool = True
    scale_ratio: float = 0.7071  # the released configs' scale_downsample_ratio
    config: str = "custom"
    # the geometry the stored scales follow: data.shards.corpus.IMAGE_RULE, the released NaViL
    # code's resize and multi-scale chain (ShardDataset refuses a manifest without it or another)
    rule: str = IMAGE_RULE


@dataclass(frozen=True)
class Settings:
    """Everything that determines the output bytes (saved in plan.json)."""

    template: str = "internlm2-chat"
    system: str = DEFAULT_SYSTEM_MESSAGE  # system turn of conversations without one ("": none)
    caption_format: str = "raw"  # raw | chat
    caption_prompt: str = "Describe the image."
    max_tokens: int = 16384
    samples_per_shard: int = 20000
    shard_size_mb: float = 1024.0
    image: ImageSettings = field(default_factory=ImageSettings)
