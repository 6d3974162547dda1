"""Target image size under the released NaViL code's rule (``smart_resize``).

Layout: sizes are ``(height, width)`` in pixels. The rule (../shared/NAVIL.md, "The released
code's exact behaviour", point 2) is transformers' Qwen2-VL ``smart_resize`` called with
``factor=1``, its bounds on *raw* pixels: ``min_pixels = min_patches * patch**2`` and
``max_pixels = max_patches * patch**2`` (NaViL: 256 and 24576 patches of 16x16, i.e. 65,536
and 6,291,456 pixels). For an ``H x W`` image:

* ``H * W > max_pixels``: ``beta = sqrt(H * W / max_pixels)``, downsampled to
  ``(max(1, floor(H / beta)), max(1, floor(W / beta)))``;
* ``H * W < min_pixels``: ``beta = sqrt(min_pixels / (H * W))``, *upsampled* to
  ``(ceil(H * beta), ceil(W * beta))``;
* otherwise the size is kept.

Aspect ratios above ``max_aspect`` (200) are rejected. The data pipeline then resamples the
image bicubic to that size and ``patchify`` zero-pads it bottom/right to a multiple of
``patch * merge`` (32), rescales by 1/255 and normalises. The bounds hold for the pixels before
padding, and ``merge`` takes no part in the size, so a padded grid may exceed ``max_patches``:
2560x2560 (6.55M pixels) becomes 2508x2508, which pads to 2528x2528, 158x158 = 24,964 patches.

Exactness: Python's ``(H * W) / max_pixels`` is a correctly rounded division of two integers;
the C++ op divides two doubles, which is the same only while both are exact, i.e. below 2**53.
Both paths therefore reject ``max_patches * patch**2 >= 2**53`` and ``H * W >= 2**53`` (no real
image comes near: that is 94.9M pixels a side). The divisions, ``sqrt`` and the products with
``beta`` are then single IEEE double operations in both, so the two agree bit for bit.
"""

from __future__ import annotations

import math
import operator
from numbers import Real

from megatron_navil.ops.grid import _C

MAX_IMAGE_SIDE = 2**31 - 1  # int32, like Pillow; also bounds patch and merge
MAX_EXACT_PIXELS = 2**53  # pixel counts stay below it: exact doubles (module doc)
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
    aspect_msg = "smart_resize: max_aspect must be a finite number >= 1, got "
    if isinstance(max_aspect, bool) or not isinstance(max_aspect, Real):
        raise ValueError(f"{aspect_msg}{max_aspect!r}")
    max_aspect = float(max_aspect)
    if not math.isfinite(max_aspect) or max_aspect < 1.0:
        raise ValueError(f"{aspect_msg}{max_aspect:g}")  # %g, as csrc/resize.cpp prints it
    long_side, short_side = max(height, width), min(height, width)
    # float(long) > max_aspect * float(short): the sides are exact in double, the product is
    # one rounding, exactly as in csrc/resize.cpp (and, for 200, as Qwen2-VL's long / short >
    # 200: both sides are below 2**31, so long / short rounds to 200 only when it is 200).
    if float(long_side) > max_aspect * float(short_side):
        raise ValueError(
            f"smart_resize: image {height}x{width} has aspect ratio {long_side}/{short_side} "
            f"> max_aspect={max_aspect:g}"
        )
    if max_patches * patch * patch >= MAX_EXACT_PIXELS:
        raise ValueError(
            f"smart_resize: max_patches * patch * patch must be below 2**53 "
            f"(max_patches={max_patches}, patch={patch})"
        )
    if height * width >= MAX_EXACT_PIXELS:
        raise ValueError(
            f"smart_resize: height * width must be below 2**53 (image {height}x{width})"
        )
    return height, width, patch, merge, min_patches, max_patches, max_aspect


def smart_resize_reference(
    height: int,
    width: int,
    patch: int = 16,
    merge: int = 2,
    min_patches: int = 256,
    max_patches: int = 24576,
    max_aspect: float = 200,
) -> tuple[int, int]:
    """Pure-Python reference of :func:`smart_resize`: Qwen2-VL's formulas with factor 1."""
    height, width, patch, _, min_patches, max_patches, _ = _validate(
        height, width, patch, merge, min_patches, max_patches, max_aspect
    )
    min_pixels, max_pixels = min_patches * patch * patch, max_patches * patch * patch
    pixels = height * width
    if pixels > max_pixels:
        beta = math.sqrt(pixels / max_pixels)  # int / int: correctly rounded
        return max(1, math.floor(height / beta)), max(1, math.floor(width / beta))
    if pixels < min_pixels:
        beta = math.sqrt(min_pixels / pixels)
        new_h, new_w = math.ceil(height * beta), math.ceil(width * beta)
        if max(new_h, new_w) > MAX_IMAGE_SIDE:
            raise ValueError(
                f"smart_resize: upsampling image {height}x{width} to {min_pixels} pixels gives "
                f"a side above {MAX_IMAGE_SIDE}"
            )
        return new_h, new_w
    return height, width


def smart_resize(
    height: int,
    width: int,
    patch: int = 16,
    merge: int = 2,
    min_patches: int = 256,
    max_patches: int = 24576,
    max_aspect: float = 200,
) -> tuple[int, int]:
    """``(new_height, new_width)`` to resample a ``height x width`` image to (released NaViL).

    transformers' Qwen2-VL ``smart_resize(height, width, factor=1, min_pixels=min_patches *
    patch**2, max_pixels=max_patches * patch**2)``: kept when ``height * width`` is within the
    bounds, else scaled by ``beta``, the square root of the pixel ratio to the bound crossed,
    rounding down (above the maximum, each side at least 1) or up (below the minimum: small
    images are upsampled). The result is not rounded to a multiple of ``patch * merge``:
    ``patchify`` pads it, and the padded patch count may exceed ``max_patches`` (module doc).
    ``merge`` is validated but takes no part. Defaults are NaViL's: 16x16 patches, 2x2 merge,
    256 to 24576 patches, aspect ratio at most 200. Examples: ``smart_resize(100, 100) ==
    (256, 256)``, ``smart_resize(4000, 3000) == (2896, 2172)``, ``smart_resize(500, 333) ==
    (500, 333)``, ``smart_resize(2560, 2560) == (2508, 2508)``.

    Raises:
        ValueError: a size is not a positive integer or exceeds 2**31 - 1; ``min_patches >
            max_patches``; ``max_aspect`` not a finite number >= 1; ``max(height, width) /
            min(height, width) > max_aspect``; ``max_patches * patch**2`` or ``height * width``
            not below 2**53; or an upsampled side above 2**31 - 1.
    """
    args = _validate(height, width, patch, merge, min_patches, max_patches, max_aspect)
    native = _native()
    if native is None:
        return smart_resize_reference(*args)
    return tuple(native.smart_resize(*args))
