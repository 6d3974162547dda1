"""Visual multi-scale packing (VMP): the scales of an image and its token layout.

Layouts:
  scales   [(height, width), ...] pixel sizes to resample the *original* image to, smallest
           first; the last one is the base scale, ``smart_resize``'s result
  merged   [(h, w), ...] merged grids of the scales (patch grid / merge): one LLM token each
  layout   [L] int64 indices into ``SPECIAL_TOKENS`` (config/model.py), the token kinds of one
           image block; the data pipeline maps them to token ids

NaViL (../shared/NAVIL.md, "Images"): besides the base scale, the original image is
re-processed with a pixel budget of ``scale_ratio**2`` (0.5: ``tau = sqrt(2)/2`` per side) times
the previous scale's area, keeping the aspect ratio, until the padded patch count falls below
``min_patches`` (the same minimum, and the same padded count, as ``smart_resize``). Each scale
is its own vision-encoder segment (``vision_cu_seqlens``) and all scales share one block:
``<img>``, per scale (smallest first) ``h`` rows of ``w x <IMG_CONTEXT>`` + ``<IMG_LINE_BREAK>``
then ``<IMG_FRAME_BREAK>``, finally ``</img>``.

A smaller scale is the largest member of ``smart_resize``'s aspect-preserving family of the
original image (new long side ``L'``, short side ``max(1, round_half_up(S * L' / L))``) whose
area ``L' * S'`` is within the budget. These ops are cheap (a few binary searches and one
small tensor per image), so they are Python only; each has an independent reference
(``*_reference``: a linear scan and a token-by-token loop) that the tests compare against.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Sequence
from numbers import Real

import torch

from megatron_navil.config.model import SPECIAL_TOKENS
from megatron_navil.ops.grid import merged_grid_reference
from megatron_navil.ops.resize import MAX_IMAGE_SIDE, smart_resize

IMG_START = SPECIAL_TOKENS.index("<img>")
IMG_END = SPECIAL_TOKENS.index("</img>")
IMG_CONTEXT = SPECIAL_TOKENS.index("<IMG_CONTEXT>")
IMG_LINE_BREAK = SPECIAL_TOKENS.index("<IMG_LINE_BREAK>")
IMG_FRAME_BREAK = SPECIAL_TOKENS.index("<IMG_FRAME_BREAK>")

NAVIL_SCALE_RATIO = math.sqrt(2) / 2
Size = tuple[int, int]


def _check_ratio(scale_ratio: float) -> float:
    msg = f"scales_for_image: scale_ratio must be a number in (0, 1), got {scale_ratio!r}"
    if isinstance(scale_ratio, bool) or not isinstance(scale_ratio, Real):
        raise ValueError(msg)
    ratio = float(scale_ratio)
    if not 0.0 < ratio < 1.0:  # also rejects nan
        raise ValueError(msg)
    return ratio


def _scales(
    height: int,
    width: int,
    patch: int,
    merge: int,
    min_patches: int,
    max_patches: int,
    max_aspect: float,
    scale_ratio: float,
    next_long: Callable[[Callable[[int], int], int, float], int | None],
) -> list[Size]:
    """Shared driver: the base from smart_resize, then ``next_long`` picks each smaller scale."""
    ratio = _check_ratio(scale_ratio)
    try:  # smart_resize validates every size argument
        base = smart_resize(height, width, patch, merge, min_patches, max_patches, max_aspect)
    except ValueError as exc:
        raise ValueError(f"scales_for_image: {exc}") from None
    height, width = operator.index(height), operator.index(width)
    long_side, short_side = max(height, width), min(height, width)

    def short_for(new_long: int) -> int:  # smart_resize's family: round_half_up, >= 1
        return max(1, (2 * short_side * new_long + long_side) // (2 * long_side))

    scales = [base]
    prev_area, prev_long = base[0] * base[1], max(base)
    while True:
        budget = prev_area * ratio * ratio  # pixels allowed for the next scale
        new_long = next_long(short_for, prev_long, budget)
        if new_long is None:
            break
        new_short = short_for(new_long)
        size = (new_long, new_short) if height >= width else (new_short, new_long)
        gh, gw = merged_grid_reference(size[0], size[1], patch, merge)
        if gh * gw < min_patches:
            break
        scales.append(size)
        prev_area, prev_long = new_long * new_short, new_long
    return scales[::-1]


def _next_long_search(short_for: Callable[[int], int], prev_long: int, budget: float) -> int | None:
    """Largest L' in [1, prev_long) with L' * short_for(L') <= budget (area grows with L')."""
    if short_for(1) > budget:
        return None
    lo, hi = 1, prev_long - 1
    if hi < lo:
        return None
    while lo < hi:
        mid = lo + (hi - lo + 1) // 2
        if mid * short_for(mid) <= budget:
            lo = mid
        else:
            hi = mid - 1
    return lo


def _next_long_scan(short_for: Callable[[int], int], prev_long: int, budget: float) -> int | None:
    """Largest L' in [1, prev_long) within the budget, by trying every L' downwards."""
    for new_long in range(prev_long - 1, 0, -1):
        if new_long * short_for(new_long) <= budget:
            return new_long
    return None


def scales_for_image(
    height: int,
    width: int,
    patch: int = 16,
    merge: int = 2,
    min_patches: int = 256,
    max_patches: int = 24576,
    max_aspect: float = 200,
    scale_ratio: float = NAVIL_SCALE_RATIO,
) -> list[Size]:
    """The VMP scales ``[(height, width), ...]`` of a ``height x width`` image, smallest first.

    The last entry is the base scale, ``smart_resize(height, width, ...)``. Each earlier entry
    is the largest size of the original image's aspect-preserving family (as in
    ``smart_resize``) with area at most ``scale_ratio**2`` times the next larger scale's area;
    the sequence stops before the first size whose padded patch count (``merged_grid``) is
    below ``min_patches``. So every scale has at least ``min_patches`` patches and areas
    strictly decrease towards the front; an image at or just above the minimum has one scale.
    Pass ``ImageConfig``'s fields (``scale_ratio`` is per side, NaViL's ``sqrt(2) / 2``).
    Example: ``scales_for_image(1024, 1024) == [(255, 255), (361, 361), (511, 511), (724, 724),
    (1024, 1024)]``.

    Raises:
        ValueError: as :func:`smart_resize` for the sizes and bounds; ``scale_ratio`` not a
            number in (0, 1).
    """
    args = (height, width, patch, merge, min_patches, max_patches, max_aspect, scale_ratio)
    return _scales(*args, next_long=_next_long_search)


def scales_for_image_reference(
    height: int,
    width: int,
    patch: int = 16,
    merge: int = 2,
    min_patches: int = 256,
    max_patches: int = 24576,
    max_aspect: float = 200,
    scale_ratio: float = NAVIL_SCALE_RATIO,
) -> list[Size]:
    """Reference of :func:`scales_for_image`: a linear scan instead of the binary search."""
    args = (height, width, patch, merge, min_patches, max_patches, max_aspect, scale_ratio)
    return _scales(*args, next_long=_next_long_scan)


def _merged(grids: Sequence[Sequence[int]]) -> list[Size]:
    out: list[Size] = []
    for k, grid in enumerate(grids):
        msg = f"image_token_layout: scale {k} must be a pair (h, w) of positive integers"
        try:
            h, w = grid
            if isinstance(h, bool) or isinstance(w, bool):
                raise TypeError
            h, w = operator.index(h), operator.index(w)
        except (TypeError, ValueError):
            raise ValueError(f"{msg}, got {grid!r}") from None
        if not (1 <= h <= MAX_IMAGE_SIDE and 1 <= w <= MAX_IMAGE_SIDE):
            raise ValueError(f"{msg} (at most {MAX_IMAGE_SIDE}), got ({h}, {w})")
        out.append((h, w))
    if not out:
        raise ValueError("image_token_layout: an image block needs at least one scale, got none")
    return out


def image_token_layout(scales_merged_grids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Token kinds of one image block, as int64 indices into ``SPECIAL_TOKENS`` ``[L]``.

    ``scales_merged_grids`` are the merged grids ``(h, w)`` (patch grid // merge) of the
    image's scales, smallest first (``scales_for_image`` order). The block is ``<img>``, then
    per scale ``h`` rows of ``w x <IMG_CONTEXT>`` + ``<IMG_LINE_BREAK>`` and one
    ``<IMG_FRAME_BREAK>``, then ``</img>``: ``L = 2 + sum(h * (w + 1) + 1)``, with
    ``sum(h * w)`` ``<IMG_CONTEXT>`` slots, which receive the connector's outputs in order.

    Raises:
        ValueError: no scales, or a scale not a pair of integers in [1, 2**31 - 1].
    """
    merged = _merged(scales_merged_grids)
    parts = [torch.tensor([IMG_START], dtype=torch.int64)]
    for h, w in merged:
        rows = torch.full((h, w + 1), IMG_CONTEXT, dtype=torch.int64)
        rows[:, w] = IMG_LINE_BREAK
        parts += [rows.flatten(), torch.tensor([IMG_FRAME_BREAK], dtype=torch.int64)]
    parts.append(torch.tensor([IMG_END], dtype=torch.int64))
    return torch.cat(parts)


def image_token_layout_reference(scales_merged_grids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Reference of :func:`image_token_layout`: the block built token by token."""
    names = ["<img>"]
    for h, w in _merged(scales_merged_grids):
        for _ in range(h):
            names += ["<IMG_CONTEXT>"] * w + ["<IMG_LINE_BREAK>"]
        names.append("<IMG_FRAME_BREAK>")
    names.append("</img>")
    return torch.tensor([SPECIAL_TOKENS.index(n) for n in names], dtype=torch.int64)
