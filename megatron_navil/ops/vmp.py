"""Visual multi-scale packing (VMP): the scales of an image and its token layout.

Layouts:
  scales   [(height, width), ...] pixel sizes to resample the *original* image to, smallest
           first; the last one is the base scale, ``smart_resize``'s result
  merged   [(h, w), ...] merged grids of the scales (patch grid / merge): one LLM token each
  layout   [L] int64 indices into ``SPECIAL_TOKENS`` (config/tokens.py), the token kinds of one
           image block; the data pipeline maps them to token ids

The chain is the released NaViL demo's (``anyres_preprocess_multi_scale``; ../shared/NAVIL.md,
"The released code's exact behaviour", point 3). After the base scale, repeatedly:

1. ``current_pixels`` = the previous (smallest so far) scale's *padded* patch grid ``gh * gw``
   times ``patch**2``, an int64 tensor in the demo;
2. ``max_pixels = current_pixels * scale_ratio**2``: int64 tensor times a Python float, so a
   float32 0-dim tensor, ``f32(f32(current_pixels) * f32(scale_ratio**2))`` (the square in
   double first); stop when ``max_pixels < min_pixels`` (compared in float32);
3. ``smart_resize`` (factor 1, see ops/resize.py) of the ORIGINAL size with that float32
   budget: ``H * W > max_pixels`` compares ``f32(H * W)``; ``(H * W) / max_pixels`` is torch's
   reflected division, ``f32(f32(1 / max_pixels) * f32(H * W))`` (``Tensor.__rtruediv__`` is
   ``reciprocal() * other``), and ``beta`` its double square root; ``floor(H / beta)`` etc. in
   double, as in ``smart_resize``;
4. stop when the new padded grid has at least as many patches as the previous one, else prepend
   it (smallest first).

So no two scales are equal, the patch counts strictly decrease towards the front and a scale
is never smaller than ``min_pixels`` allows. ``scale_ratio`` is the config's
``scale_downsample_ratio``, 0.7071 in the released configs (not sqrt(2)/2: the float32 budget
differs, and with it some scales). Each scale is its own vision-encoder segment
(``vision_cu_seqlens``) and all scales share one block: ``<img>``, per scale (smallest first)
``h`` rows of ``w x <IMG_CONTEXT>`` + ``<IMG_LINE_BREAK>`` then ``<IMG_FRAME_BREAK>``, finally
``</img>``.

These ops are cheap (a few float operations and one small tensor per image), so they are
Python only: ``scales_for_image`` emulates the float32 arithmetic with numpy, its reference
with exact rationals rounded to float32; ``image_token_layout`` builds the block with tensor
ops, its reference token by token. The tests compare both with a torch transcription of the
demo and with transformers' Qwen2-VL ``smart_resize``.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence
from fractions import Fraction
from numbers import Real

import numpy as np
import torch

from megatron_navil.config.tokens import SPECIAL_TOKENS
from megatron_navil.ops.grid import merged_grid, merged_grid_reference
from megatron_navil.ops.resize import (
    MAX_IMAGE_SIDE,
    smart_resize,
    smart_resize_reference,
)

IMG_START = SPECIAL_TOKENS.index("<img>")
IMG_END = SPECIAL_TOKENS.index("</img>")
IMG_CONTEXT = SPECIAL_TOKENS.index("<IMG_CONTEXT>")
IMG_LINE_BREAK = SPECIAL_TOKENS.index("<IMG_LINE_BREAK>")
IMG_FRAME_BREAK = SPECIAL_TOKENS.index("<IMG_FRAME_BREAK>")

NAVIL_SCALE_RATIO = 0.7071
"""``scale_downsample_ratio`` of the released NaViL-2B/9B configs (per side, between scales)."""
Size = tuple[int, int]
_INT64_MAX = 2**63 - 1


def _check_ratio(scale_ratio: float) -> float:
    msg = f"scales_for_image: scale_ratio must be a number in (0, 1), got {scale_ratio!r}"
    if isinstance(scale_ratio, bool) or not isinstance(scale_ratio, Real):
        raise ValueError(msg)
    ratio = float(scale_ratio)
    if not 0.0 < ratio < 1.0:  # also rejects nan
        raise ValueError(msg)
    return ratio


def _base(resize, height, width, patch, merge, min_patches, max_patches, max_aspect) -> Size:
    try:  # smart_resize validates every size argument
        return tuple(resize(height, width, patch, merge, min_patches, max_patches, max_aspect))
    except ValueError as exc:
        raise ValueError(f"scales_for_image: {exc}") from None


def _current_pixels(count: int, patch: int, height: int, width: int) -> int:
    """The demo's int64 ``grid.prod() * patch**2``; ValueError where int64 would overflow."""
    pixels = count * patch * patch
    if pixels > _INT64_MAX:
        raise ValueError(
            f"scales_for_image: a padded scale of image {height}x{width} has {pixels} pixels, "
            "more than int64 holds"
        )
    return pixels


def _f32(n: int) -> np.float32:
    """An int64 rounded once to float32, as torch casts it (C's int64 -> float)."""
    return np.int64(n).astype(np.float32)


def _resize_f32(height: int, width: int, min_pixels: int, max_f32: np.float32) -> Size:
    """Qwen2-VL's smart_resize, factor 1, with the demo's float32 tensor ``max_pixels``."""
    pixels = height * width  # < 2**53 (smart_resize validated the base)
    if _f32(pixels) > max_f32:
        quotient = (np.float32(1.0) / max_f32) * _f32(pixels)  # float32 ops throughout
        beta = math.sqrt(float(quotient))
        return max(1, math.floor(height / beta)), max(1, math.floor(width / beta))
    if pixels < min_pixels:  # both Python ints in the demo
        beta = math.sqrt(min_pixels / pixels)
        return math.ceil(height * beta), math.ceil(width * beta)
    return height, width


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

    The last entry is the base scale, ``smart_resize(height, width, ...)``; the earlier ones
    follow the released demo's chain (module doc): each re-runs ``smart_resize`` on the
    original size with a float32 pixel budget of ``scale_ratio**2`` times the previous scale's
    padded area, stopping when the budget falls below ``min_patches * patch**2`` or the padded
    patch count stops decreasing. Pass ``ImageConfig``'s fields (``scale_ratio`` per side,
    the released 0.7071). Examples: ``scales_for_image(1024, 1024) == [(271, 271), (384, 384),
    (520, 520), (724, 724), (1024, 1024)]``; ``scales_for_image(100, 100) == [(256, 256)]``.

    Raises:
        ValueError: as :func:`smart_resize` for the sizes and bounds; ``scale_ratio`` not a
            number in (0, 1).
    """
    ratio = _check_ratio(scale_ratio)
    args = (height, width, patch, merge, min_patches, max_patches, max_aspect)
    base = _base(smart_resize, *args)
    height, width, patch, merge = (operator.index(x) for x in (height, width, patch, merge))
    min_pixels = operator.index(min_patches) * patch * patch
    ratio_sq = np.float32(ratio**2)  # the Python float scalar, cast to float32 by torch
    min_f32 = _f32(min_pixels)
    scales = [base]
    gh, gw = merged_grid(*base, patch, merge)
    count = gh * gw
    while True:
        max_f32 = _f32(_current_pixels(count, patch, height, width)) * ratio_sq
        if max_f32 < min_f32:
            break
        size = _resize_f32(height, width, min_pixels, max_f32)
        gh, gw = merged_grid(*size, patch, merge)
        if gh * gw >= count:
            break
        scales.insert(0, size)
        count = gh * gw
    return scales


def _to_f32(x: Fraction) -> Fraction:
    """``x > 0`` rounded to the nearest float32 (ties to even), in the normal range."""
    exp = x.numerator.bit_length() - x.denominator.bit_length()  # 2**exp within a factor 2
    if Fraction(2) ** exp > x:
        exp -= 1  # now 2**exp <= x < 2**(exp + 1)
    scaled = x / Fraction(2) ** (exp - 23)  # in [2**23, 2**24): 24 significant bits
    mantissa = math.floor(scaled)
    rest = scaled - mantissa
    if rest > Fraction(1, 2) or (rest == Fraction(1, 2) and mantissa % 2 == 1):
        mantissa += 1
    return mantissa * Fraction(2) ** (exp - 23)


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
    """Reference of :func:`scales_for_image`: every float32 value an exact rational, rounded
    by :func:`_to_f32`; the base from ``smart_resize_reference``."""
    ratio = _check_ratio(scale_ratio)
    args = (height, width, patch, merge, min_patches, max_patches, max_aspect)
    base = _base(smart_resize_reference, *args)
    height, width, patch, merge = (operator.index(x) for x in (height, width, patch, merge))
    min_pixels = operator.index(min_patches) * patch * patch
    pixels = height * width
    found = [base]  # largest first here, reversed at the end
    while True:
        gh, gw = merged_grid_reference(*found[-1], patch, merge)
        count = gh * gw
        current = _current_pixels(count, patch, height, width)
        budget = _to_f32(_to_f32(Fraction(current)) * _to_f32(Fraction(ratio**2)))
        if budget < _to_f32(Fraction(min_pixels)):
            break
        if _to_f32(Fraction(pixels)) > budget:
            quotient = _to_f32(_to_f32(1 / budget) * _to_f32(Fraction(pixels)))
            beta = math.sqrt(float(quotient))  # float(): exact, quotient is a float32
            size = (max(1, math.floor(height / beta)), max(1, math.floor(width / beta)))
        elif pixels < min_pixels:
            beta = math.sqrt(min_pixels / pixels)
            size = (math.ceil(height * beta), math.ceil(width * beta))
        else:
            size = (height, width)
        nh, nw = merged_grid_reference(*size, patch, merge)
        if nh * nw >= count:
            break
        found.append(size)
    return found[::-1]


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
