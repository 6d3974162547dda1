"""What determines the indexer's output bytes (:class:`Settings`, saved in ``plan.json``), and
its two outcomes besides a sample: a counted :class:`Skip` of one record (one of
:data:`SKIP_REASONS`) and :class:`IndexFatal`, which stops the run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from megatron_navil.config.model import DEFAULT_SYSTEM_MESSAGE
from megatron_navil.data.shards.corpus import IMAGE_RULE
from megatron_navil.ops.geometry import ImageGeometry

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
class Settings:
    """Everything that determines the output bytes (saved in plan.json)."""

    template: str = "internlm2-chat"
    system: str = DEFAULT_SYSTEM_MESSAGE  # system turn of conversations without one ("": none)
    caption_format: str = "raw"  # raw | chat
    caption_prompt: str = "Describe the image."
    max_tokens: int = 16384
    samples_per_shard: int = 20000
    shard_size_mb: float = 1024.0
    # how images become patches: the model's ImageConfig, patch and merge (ops.ImageGeometry)
    image: ImageGeometry = field(default_factory=ImageGeometry)
    model_config: str = "custom"  # the model config the geometry came from (manifest: image.config)

    def to_plan(self) -> dict[str, Any]:
        """The JSON form in ``plan.json`` and the manifest's ``settings``: the fields, with the
        image section being the geometry plus ``config`` (the model config's name) and
        ``rule`` (``data.shards.corpus.IMAGE_RULE``: the released NaViL code's resize and
        multi-scale chain; ``ShardDataset`` refuses a manifest without it or another)."""
        out = asdict(self)
        del out["model_config"]
        out["image"] = {**self.image.to_manifest(), "config": self.model_config, "rule": IMAGE_RULE}
        return out
