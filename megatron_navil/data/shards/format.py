"""The byte layout of one shard: a ``.bin`` of tokens and encoded images, a ``.idx`` of a
header and fixed-width records (numpy-memmappable).

``.bin`` (little-endian, no header): for each sample, ``tok_count`` token ids as uint32
starting at byte ``tok_offset`` (4-aligned), then the sample's images' encoded bytes (JPEG, PNG
or WebP), each at its ``byte_offset``/``byte_len``; zero bytes pad to the next 4-byte boundary.

Text is stored with ONE placeholder token per image where its image block goes: the id of
``<img>`` (``manifest["placeholder_id"]``, also in every ``.idx`` header). User text can never
contain ``<img>`` (the indexer skips such samples, reason ``reserved_token_in_text``), so the
k-th ``<img>`` of a sample's tokens is its k-th image. The loader replaces each by the full
block ``image_token_layout(merged grids of that image's scales)`` (it starts with ``<img>``
itself), see ``samples.expand_image_blocks``. Loss-mask runs are over the stored (unexpanded)
tokens; a placeholder is never in the loss, nor is any token of an expanded block.
``loss_mask[t] == 1`` marks token ``t`` as a *target* (the loader shifts for next-token labels).

``.idx`` (little-endian): a 128-byte header (:data:`HEADER_DTYPE`: magic ``b"NAVILIDX"``,
schema version, counts, byte offsets of the sections), then four sections, each 64-aligned:

* samples ``[num_samples]`` :data:`SAMPLE_DTYPE` (64 bytes): ``tok_offset`` (byte offset in
  .bin), ``image_start`` (first row in images), ``run_start`` (first row in runs),
  ``llm_tokens`` (text tokens with each placeholder expanded to its whole image block:
  ``tok_count - num_images + sum len(image_token_layout(merged grids))``), ``patches`` (sum of
  ``gh * gw`` over all its images' scales), ``record`` (0-based index of the source record in
  its dataset: the JSONL line - 1, the CSV row, the tar sample), ``tok_count``, ``num_images``,
  ``run_count``, ``dataset`` (index into ``manifest["datasets"]``);
* images ``[num_images]`` :data:`IMAGE_DTYPE` (40 bytes): ``byte_offset``, ``byte_len`` (in
  .bin), ``scale_start`` (first row in scales), ``orig_h``, ``orig_w`` (of the stored image),
  ``num_scales``, ``format`` (0 JPEG, 1 PNG, 2 WebP), ``converted`` (1: re-encoded as PNG from a
  mode or format the loader would not read as is: CMYK, 16-bit, alpha, palette, ...);
* scales ``[num_scales]`` :data:`SCALE_DTYPE` (16 bytes), per image smallest first (VMP, or
  just the base when multi-scale is off): ``h``, ``w`` (size to resample the stored image to;
  the last scale is ``smart_resize``'s target), ``gh``, ``gw`` (its patch grid,
  ``merged_grid(h, w)``: the merged grid is ``(gh // merge, gw // merge)``);
* runs ``[num_runs]`` :data:`RUN_DTYPE` (8 bytes): ``start``, ``length``: loss-mask runs, token
  positions relative to the sample's first token.
"""

from __future__ import annotations

import numpy as np

MAGIC = b"NAVILIDX"
SCHEMA_VERSION = 1
HEADER_SIZE = 128
ALIGN = 64

FORMATS = ("jpeg", "png", "webp")
"""Encoded image formats by their code in ``IMAGE_DTYPE['format']``."""

HEADER_DTYPE = np.dtype(
    [
        ("magic", "S8"),
        ("version", "<u4"),
        ("header_size", "<u4"),
        ("placeholder_id", "<u4"),
        ("token_bytes", "<u4"),  # 4: uint32 little-endian
        ("num_samples", "<u8"),
        ("num_images", "<u8"),
        ("num_scales", "<u8"),
        ("num_runs", "<u8"),
        ("bin_size", "<u8"),
        ("samples_offset", "<u8"),
        ("images_offset", "<u8"),
        ("scales_offset", "<u8"),
        ("runs_offset", "<u8"),
        ("file_size", "<u8"),
        ("merge", "<u4"),  # merge factor the block lengths (llm_tokens) were computed with
        ("reserved", "S20"),
    ]
)
assert HEADER_DTYPE.itemsize == HEADER_SIZE

SAMPLE_DTYPE = np.dtype(
    [
        ("tok_offset", "<u8"),
        ("image_start", "<u8"),
        ("run_start", "<u8"),
        ("llm_tokens", "<i8"),
        ("patches", "<i8"),
        ("record", "<u8"),
        ("tok_count", "<u4"),
        ("num_images", "<u4"),
        ("run_count", "<u4"),
        ("dataset", "<u4"),
    ]
)
IMAGE_DTYPE = np.dtype(
    [
        ("byte_offset", "<u8"),
        ("byte_len", "<u8"),
        ("scale_start", "<u8"),
        ("orig_h", "<u4"),
        ("orig_w", "<u4"),
        ("num_scales", "<u4"),
        ("format", "u1"),
        ("converted", "u1"),
        ("pad", "S2"),
    ]
)
SCALE_DTYPE = np.dtype([("h", "<u4"), ("w", "<u4"), ("gh", "<u4"), ("gw", "<u4")])
RUN_DTYPE = np.dtype([("start", "<u4"), ("length", "<u4")])
assert SAMPLE_DTYPE.itemsize == 64 and IMAGE_DTYPE.itemsize == 40


class ShardError(ValueError):
    """A shard or manifest is missing, corrupt or inconsistent (message: one line)."""


def align(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a
