"""Samples as the shard writer takes them and the reader gives them back (:class:`Sample`,
:class:`ImageEntry`), their loss-mask runs and image token costs, and the expansion of each
stored placeholder into its image block (the loader's view of a sample).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_navil.data.shards.format import ShardError


@dataclass(frozen=True)
class ImageEntry:
    """One image of a sample: its encoded bytes and what the loader needs to process it."""

    data: bytes
    """Encoded bytes as stored (JPEG/PNG/WebP)."""
    format: str
    """``"jpeg"``, ``"png"`` or ``"webp"``."""
    orig_size: tuple[int, int]
    """``(height, width)`` of the stored image."""
    scales: tuple[tuple[int, int], ...]
    """``(height, width)`` to resample to, per scale, smallest first; the last is the base."""
    grids: tuple[tuple[int, int], ...]
    """Patch grid ``(gh, gw)`` of each scale (``merged_grid``); merged grid = grid // merge."""
    converted: bool = False
    """True when the bytes were re-encoded as PNG (mode or format conversion)."""

    def decode(self, draft: tuple[int, int] | None = None):
        """The image as an RGB ``PIL.Image``. ``draft=(h, w)``: for JPEG, let libjpeg decode
        at a reduced scale no smaller than that (``Image.draft``), for fast downscaling."""
        import io

        from PIL import Image

        img = Image.open(io.BytesIO(self.data))
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", (int(draft[1]), int(draft[0])))
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")


@dataclass(frozen=True)
class Sample:
    """One indexed sample (tokens with one placeholder per image, see the module doc)."""

    index: int
    """Index in the reader it came from (global for ShardDataset, local for ShardReader)."""
    tokens: np.ndarray
    """int64 ``[T]`` stored token ids; each image is one ``placeholder_id`` token."""
    loss_mask: np.ndarray
    """bool ``[T]``: True where the token is a training target."""
    images: tuple[ImageEntry, ...]
    """The sample's images, in placeholder order."""
    llm_tokens: int
    """Tokens after expanding every placeholder into its image block."""
    patches: int
    """Vision patches over all images and scales."""
    dataset: int
    """Index into ``manifest["datasets"]``."""
    record: int
    """0-based index of the source record in its dataset."""


def loss_runs(mask: Sequence[bool] | np.ndarray) -> np.ndarray:
    """``[k, 2]`` int64 ``(start, length)`` runs of True in a boolean mask."""
    m = np.asarray(mask, dtype=bool).astype(np.int8)
    if m.size == 0:
        return np.zeros((0, 2), np.int64)
    d = np.diff(np.concatenate([[0], m, [0]]))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return np.stack([starts, ends - starts], axis=1).astype(np.int64)


def image_cost(scales_grids: Sequence[tuple[int, int]], merge: int) -> tuple[int, int]:
    """``(block tokens, patches)`` of one image from its per-scale patch grids.

    Block tokens = ``len(image_token_layout(merged grids))`` = ``2 + sum(h * (w + 1) + 1)``.
    """
    tokens, patches = 2, 0
    for gh, gw in scales_grids:
        h, w = gh // merge, gw // merge
        tokens += h * (w + 1) + 1
        patches += gh * gw
    return tokens, patches


def expand_image_blocks(
    tokens: np.ndarray,
    loss_mask: np.ndarray,
    images: Sequence[ImageEntry],
    special_ids: dict[str, int],
    placeholder_id: int,
    merge: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Replace each placeholder by its image block; returns ``(ids, loss_mask)`` int64/bool.

    The block's token kinds come from ``ops.image_token_layout`` semantics (``<img>``, per
    scale ``h`` rows of ``w`` ``<IMG_CONTEXT>`` + ``<IMG_LINE_BREAK>``, ``<IMG_FRAME_BREAK>``,
    ``</img>``); block tokens are never in the loss.
    """
    pos = np.flatnonzero(tokens == placeholder_id)
    if len(pos) != len(images):
        raise ShardError(f"sample has {len(pos)} placeholders but {len(images)} images")
    ctx, lb, fb = (
        special_ids[k] for k in ("<IMG_CONTEXT>", "<IMG_LINE_BREAK>", "<IMG_FRAME_BREAK>")
    )
    out_ids: list[np.ndarray] = []
    out_mask: list[np.ndarray] = []
    prev = 0
    for p, image in zip(pos, images, strict=True):
        out_ids.append(tokens[prev:p].astype(np.int64))
        out_mask.append(loss_mask[prev:p].astype(bool))
        parts = [np.array([special_ids["<img>"]], np.int64)]
        for gh, gw in image.grids:
            h, w = gh // merge, gw // merge
            rows = np.full((h, w + 1), ctx, np.int64)
            rows[:, w] = lb
            parts += [rows.reshape(-1), np.array([fb], np.int64)]
        parts.append(np.array([special_ids["</img>"]], np.int64))
        block = np.concatenate(parts)
        out_ids.append(block)
        out_mask.append(np.zeros(len(block), bool))
        prev = p + 1
    out_ids.append(tokens[prev:].astype(np.int64))
    out_mask.append(loss_mask[prev:].astype(bool))
    return np.concatenate(out_ids), np.concatenate(out_mask)
