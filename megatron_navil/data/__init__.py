"""Data: the shard format and reader, tokenizers, chat templates, the corpus indexer, and the
training loader (blending, windowed pack plan, resumable data-parallel sampler, packed batches).

Imports ``config/`` and ``ops/`` only, never ``models/`` or ``training/`` (DESIGN.md).
The reader API the data pipeline builds on is documented in
:mod:`megatron_navil.data.shards.corpus`.
"""

from megatron_navil.data.assemble import PackedSequenceBuilder, load_image_scales
from megatron_navil.data.batch import LOSS_WEIGHTINGS, PackedBatch, loss_weights
from megatron_navil.data.blend import Blend, apportion
from megatron_navil.data.loader import (
    PackedDataLoader,
    PackedSequenceDataset,
    build_data_loader,
    collate_packed,
)
from megatron_navil.data.packing import SequenceStream, StreamPosition, WindowPlan
from megatron_navil.data.sampler import PackedSampler, SequenceRef
from megatron_navil.data.shards.corpus import ShardDataset, load_manifest
from megatron_navil.data.shards.format import ShardError
from megatron_navil.data.shards.reader import ShardReader
from megatron_navil.data.shards.samples import ImageEntry, Sample, expand_image_blocks
from megatron_navil.data.shards.writer import ShardWriter

__all__ = [
    "LOSS_WEIGHTINGS",
    "Blend",
    "ImageEntry",
    "PackedBatch",
    "PackedDataLoader",
    "PackedSampler",
    "PackedSequenceBuilder",
    "PackedSequenceDataset",
    "Sample",
    "SequenceRef",
    "SequenceStream",
    "ShardDataset",
    "ShardError",
    "ShardReader",
    "ShardWriter",
    "StreamPosition",
    "WindowPlan",
    "apportion",
    "build_data_loader",
    "collate_packed",
    "expand_image_blocks",
    "load_image_scales",
    "load_manifest",
    "loss_weights",
]
