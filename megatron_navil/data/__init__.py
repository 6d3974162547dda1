"""Data: the shard format and reader, tokenizers, chat templates and the corpus indexer.

Imports ``config/`` and ``ops/`` only, never ``models/`` or ``training/`` (DESIGN.md).
The reader API the data pipeline builds on is documented in :mod:`megatron_navil.data.shards`.
"""

from megatron_navil.data.shards import (
    ImageEntry,
    Sample,
    ShardDataset,
    ShardError,
    ShardReader,
    ShardWriter,
    expand_image_blocks,
    load_manifest,
)

__all__ = [
    "ImageEntry",
    "Sample",
    "ShardDataset",
    "ShardError",
    "ShardReader",
    "ShardWriter",
    "expand_image_blocks",
    "load_manifest",
]
