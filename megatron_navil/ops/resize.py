"""Target image size under NaViL's native-resolution rule (``smart_resize``).

Layout: sizes are ``(height, width)`` in pixels; a *padded patch count* is the number of
``patch x patch`` patches after zero-padding each side up to a multiple of ``patch * merge``
(``merged_grid``'s ``h_patches * w_patches``), i.e. what the vision encoder really sees.

NaViL (../shared/NAVIL.md, "Images") keeps an image's native resolution: no resampling when the
padded patch count is inside ``[min_patches, max_patches]`` (256 to 24576 patches of 16x16, i.e.
65,536 to 6.29M pixels), an aspect-preserving bicubic rescale otherwise, and zero-padding of
the bottom/right to a multiple of 32 in ``patchify``. So ``smart_resize`` returns the size to
*resample to* (the input size when in bounds) and never rounds a side to a multiple of 32.

How this differs from ``transformers``' Qwen2-VL ``smart_resize`` (factor 32, min_pixels =
min_patches * 256, max_pixels = max_patches * 256), which the tests check:

* In bounds, Qwen2-VL rounds each side to the *nearest* multiple of 32 and resamples to that
  (distorting the aspect ratio slightly and possibly dropping up to 16 rows/columns); NaViL
  keeps the pixels and pads. Both agree when the sides already are multiples of 32.
* The bounds test: Qwen2-VL tests the rounded area, NaViL the padded count. E.g. 240x240 is
  in bounds for NaViL (pads to 256x256 = 256 patches) but below for Qwen2-VL (224x224).
* Out of bounds, Qwen2-VL rescales each side to a multiple of 32 (floor or ceil), which can
  distort thin images a lot (1x200 -> 32x3648, aspect 114); NaViL keeps the aspect ratio to
  within rounding of the short side (1x200 -> 10x2048, padded 32x2048) and picks the largest
  image whose padded count fits (above max), or the smallest count >= min at the largest
  image giving it (below min), so padding is as small as the count allows.
"""

from __future__ import annotations

import math
import operator
from numbers import Real

from megatron_navil.ops.grid import _C

MAX_IMAGE_SIDE = 2**31 - 1  # int32, like Pillow; also bounds patch and merge
_INT64_MAX = 2**63 - 1


def _native():
    """The compiled module when it is built and has this op (a stale build may not)."""
    return _C if _C is not None and hasattr(_C, "smart_resize") else None


def _int(name: str, value: object, upper: int) -> int:
    """A positive integer <= upper (int or numpy integer; not bool, not float)."""
    msg = f"smart_resize: {name} must be a positive integer, got {value!r}"
    if isinstance(value, bool):
        raise ValueError(msg)
    try:
        as_int = operator.index(value)
    except TypeError:
        raise ValueError(msg) from None
    if as_int <= 0:
        raise ValueError(f"smart_resize: {name} must be a positive integer, got {as_int}")
    if as_int > upper:
        raise ValueError(f"smart_resize: {name} must be at most {upper}, got {as_int}")
    return as_int


def _validate(
    height: int,
    width: int,
    patch: int,
    merge: int,
    min_patches: int,
    max_patches: int,
    max_aspect: float,
) -> tuple[int, int, int, int, int, int, float]:
    height = _int("height", height, MAX_IMAGE_SIDE)
    width = _int("width", width, MAX_IMAGE_SIDE)
    patch = _int("patch", patch, MAX_IMAGE_SIDE)
    merge = _int("merge", merge, MAX_IMAGE_SIDE)
    min_patches = _int("min_patches", min_patches, _INT64_MAX)
    max_patches = _int("max_patches", max_patches, _INT64_MAX)
    if min_patches > max_patches:
        raise ValueError(
            f"smart_resize: min_patches ({min_patches}) must be <= max_patches ({max_patches})"
        )
    if max_patches < merge * merge:
        raise ValueError(
            f"smart_resize: max_patches ({max_patches}) must be >= merge * merge "
            f"({merge * merge}): any image takes at least one merge unit"
        )
    aspect_msg = "smart_resize: max_aspect must be a finite number >= 1, got "
    if isinstance(max_aspect, bool) or not isinstance(max_aspect, Real):
        raise ValueError(f"{aspect_msg}{max_aspect!r}")
    max_aspect = float(max_aspect)
    if not math.isfinite(max_aspect) or max_aspect < 1.0:
        raise ValueError(f"{aspect_msg}{max_aspect:g}")  # %g, as csrc/resize.cpp prints it
    long_side, short_side = max(height, width), min(height, width)
    # float(long) > max_aspect * float(short): the sides are exact in double, the product is
    # one rounding, exactly as in csrc/resize.cpp (and as Qwen2-VL's long / short > 200).
    if float(long_side) > max_aspect * float(short_side):
        raise ValueError(
            f"smart_resize: image {height}x{width} has aspect ratio {long_side}/{short_side} "
            f"> max_aspect={max_aspect:g}"
        )
    return height, width, patch, merge, min_patches, max_patches, max_aspect


def _padded_count(h: int, w: int, unit: int, merge: int) -> int:
    return (-(-h // unit) * merge) * (-(-w // unit) * merge)


def smart_resize_reference(
    height: int,
    width: int,
    patch: int = 16,
    merge: int = 2,
    min_patches: int = 256,
    max_patches: int = 24576,
    max_aspect: float = 200,
) -> tuple[int, int]:
    """Pure-Python reference of :func:`smart_resize` (integer arithmetic, same as the C++)."""
    height, width, patch, merge, min_patches, max_patches, max_aspect = _validate(
        height, width, patch, merge, min_patches, max_patches, max_aspect
    )
    unit = patch * merge
    count = _padded_count(height, width, unit, merge)
    if min_patches <= count <= max_patches:
        return height, width

    long_side, short_side = max(height, width), min(height, width)

    def short_for(new_long: int) -> int:
        # round_half_up(short * new_long / long), at least 1 pixel
        return max(1, (2 * short_side * new_long + long_side) // (2 * long_side))

    def count_for(new_long: int) -> int:  # non-decreasing in new_long
        return _padded_count(new_long, short_for(new_long), unit, merge)

    def last_at_most(lo: int, hi: int, limit: int) -> int:
        """Largest x in [lo, hi] with count_for(x) <= limit, given count_for(lo) <= limit."""
        while lo < hi:
            mid = lo + (hi - lo + 1) // 2
            if count_for(mid) <= limit:
                lo = mid
            else:
                hi = mid - 1
        return lo

    no_fit = (
        f"smart_resize: no size keeping the aspect ratio of {height}x{width} has a padded "
        f"patch count in [{min_patches}, {max_patches}]"
    )
    if count > max_patches:
        # count_for(1) == merge * merge <= max_patches (validated), count_for(long_side) > max
        new_long = last_at_most(1, long_side - 1, max_patches)
    else:
        if count_for(MAX_IMAGE_SIDE) < min_patches:
            raise ValueError(no_fit)
        lo, hi = long_side + 1, MAX_IMAGE_SIDE  # smallest x with count_for(x) >= min_patches
        while lo < hi:
            mid = lo + (hi - lo) // 2
            if count_for(mid) >= min_patches:
                hi = mid
            else:
                lo = mid + 1
        target = count_for(lo)
        if target > max_patches:
            raise ValueError(no_fit)
        new_long = last_at_most(lo, MAX_IMAGE_SIDE, target)
    new_short = short_for(new_long)
    return (new_long, new_short) if height >= width else (new_short, new_long)


def smart_resize(
    height: int,
    width: int,
    patch: int = 16,
    merge: int = 2,
    min_patches: int = 256,
    max_patches: int = 24576,
    max_aspect: float = 200,
) -> tuple[int, int]:
    """``(new_height, new_width)`` to resample a ``height x width`` image to (NaViL's rule).

    The padded patch count (sides zero-padded up to a multiple of ``patch * merge``, as
    ``patchify`` does) decides:

    * in ``[min_patches, max_patches]``: no resampling, returns ``(height, width)``;
    * otherwise an aspect-preserving rescale: the new long side ``L'`` is searched, the short
      side being ``max(1, round_half_up(short * L' / long))``; above the maximum, the largest
      ``L'`` whose padded count is ``<= max_patches``; below the minimum, the smallest padded
      count ``>= min_patches`` the family reaches, at the largest ``L'`` giving that count.

    The result is not rounded to a multiple of ``patch * merge``: ``patchify`` pads it. See the
    module docstring for where this differs from Qwen2-VL's ``smart_resize``. Defaults are
    NaViL's: 16x16 patches, 2x2 merge, 256 to 24576 patches, aspect ratio at most 200.
    Example: ``smart_resize(100, 100) == (256, 256)``, ``smart_resize(4000, 3000) ==
    (2880, 2160)``, ``smart_resize(500, 333) == (500, 333)``.

    Raises:
        ValueError: a size is not a positive integer or exceeds 2**31 - 1; ``min_patches >
            max_patches``; ``max_patches < merge * merge``; ``max_aspect`` not a finite
            number >= 1; ``max(height, width) / min(height, width) > max_aspect``; or no size of
            the image's aspect ratio has a padded count within the bounds.
    """
    args = _validate(height, width, patch, merge, min_patches, max_patches, max_aspect)
    native = _native()
    if native is None:
        return smart_resize_reference(*args)
    return tuple(native.smart_resize(*args))
