"""megatron_navil.ops.resize: smart_resize native == reference == the released NaViL rule.

The rule (NAVIL.md, "The released code's exact behaviour", point 2) is transformers' Qwen2-VL
smart_resize with factor 1 and the bounds on raw pixels (patches * patch**2); that function is
the oracle here. Sizes are (height, width) in pixels; a grid is merged_grid's padded patch grid.
"""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_navil.ops import merged_grid_reference
from megatron_navil.ops import resize as resize_mod
from megatron_navil.ops.resize import MAX_IMAGE_SIDE, smart_resize, smart_resize_reference

needs_native = pytest.mark.skipif(
    resize_mod._native() is None, reason="native extension (with smart_resize) not built"
)

MIN_P, MAX_P = 256, 24576  # NaViL's bounds, in 16x16 patches
MIN_PIXELS, MAX_PIXELS = MIN_P * 256, MAX_P * 256


def _qwen_smart_resize():
    """transformers' Qwen2-VL smart_resize, or None (5.x keeps a torchvision-free copy)."""
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:
        try:  # transformers 4.x (numpy processor), or 5.x with torchvision installed
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
        except ImportError:
            return None
    return smart_resize


qwen_smart_resize = _qwen_smart_resize()
needs_qwen = pytest.mark.skipif(qwen_smart_resize is None, reason="transformers Qwen2-VL missing")


def _oracle(h: int, w: int, patch: int = 16, min_p: int = MIN_P, max_p: int = MAX_P):
    """The released code's call: Qwen2-VL smart_resize, factor 1, bounds in raw pixels."""
    got = qwen_smart_resize(
        h, w, factor=1, min_pixels=min_p * patch * patch, max_pixels=max_p * patch * patch
    )
    return tuple(int(x) for x in got)


def _grid(h: int, w: int, patch: int = 16, merge: int = 2) -> tuple[int, int]:
    return merged_grid_reference(h, w, patch, merge)


# Sizes NaViL accepts (aspect ratio <= 200), from tiny to far above the maximum.
@st.composite
def image_sizes(draw, max_side: int = 60_000):
    long_side = draw(st.integers(1, max_side))
    short_min = max(1, math.ceil(long_side / 200))
    short_side = draw(st.integers(short_min, long_side))
    return (long_side, short_side) if draw(st.booleans()) else (short_side, long_side)


def _outcome(fn, *args):
    try:
        return tuple(fn(*args))
    except ValueError as exc:
        return ("ValueError", str(exc))


# size -> (target size, its padded patch grid); computed by hand from the rule, checked below
# against the oracle too.
KNOWN = [
    ((200, 300), (210, 314), (14, 20)),  # 60,000 < 65,536 px: upsampled (was kept before)
    ((2560, 2560), (2508, 2508), (158, 158)),  # 24,964 padded patches > max_patches
    ((3000, 4000), (2172, 2896), (136, 182)),
    ((4000, 3000), (2896, 2172), (182, 136)),
    ((512, 512), (512, 512), (32, 32)),  # in bounds: kept
    ((64, 2048), (64, 2048), (4, 128)),  # 131,072 px, in bounds: kept
    ((1000, 747), (1000, 747), (64, 48)),
    ((16, 16), (256, 256), (16, 16)),  # upsampled 16x
    ((100, 100), (256, 256), (16, 16)),
    ((50, 70), (217, 303), (14, 20)),
    ((255, 255), (256, 256), (16, 16)),  # 1,061 px short of the minimum
    ((240, 240), (256, 256), (16, 16)),
    ((1, 200), (19, 3621), (2, 228)),  # thin: ceil(1 * 18.1) = 19 rows
    ((200, 1), (3621, 19), (228, 2)),
    ((256, 256), (256, 256), (16, 16)),  # exactly the minimum
    ((4096, 4096), (2508, 2508), (158, 158)),
    ((8192, 8192), (2508, 2508), (158, 158)),
    ((333, 500), (333, 500), (22, 32)),
    ((500, 333), (500, 333), (32, 22)),
    ((2048, 3072), (2048, 3072), (128, 192)),  # exactly the maximum, 6,291,456 px: kept
    ((2049, 3072), (2048, 3071), (128, 192)),  # 3,072 px above: floor on both sides
    ((37, 901), (52, 1264), (4, 80)),
]


@pytest.mark.parametrize(("size", "target", "grid"), KNOWN, ids=lambda v: str(v))
def test_known_values(size, target, grid):
    assert smart_resize_reference(*size) == target
    assert smart_resize(*size) == target
    assert _grid(*target) == grid
    h, w = size
    if MIN_PIXELS <= h * w <= MAX_PIXELS:
        assert target == size
    elif h * w > MAX_PIXELS:
        assert target[0] * target[1] <= MAX_PIXELS < h * w
    else:
        assert target[0] * target[1] >= MIN_PIXELS > h * w


@needs_qwen
@pytest.mark.parametrize(("size", "target", "grid"), KNOWN, ids=lambda v: str(v))
def test_known_values_are_the_oracles(size, target, grid):
    assert _oracle(*size) == target


def test_padded_grid_may_exceed_max_patches():
    gh, gw = _grid(*smart_resize(2560, 2560))
    assert (gh, gw) == (158, 158) and gh * gw == 24_964 > MAX_P


def test_aspect_limit_inclusive():
    assert smart_resize(1, 200) == (19, 3621)
    assert smart_resize(7, 1400) == smart_resize_reference(7, 1400)
    for fn in (smart_resize, smart_resize_reference):
        with pytest.raises(
            ValueError, match=r"^smart_resize: image 1x201 has aspect ratio 201/1 > max_aspect=200$"
        ):
            fn(1, 201)
        with pytest.raises(ValueError, match=r"image 30x7000 has aspect ratio 7000/30 > max_aspe"):
            fn(30, 7000)
        with pytest.raises(ValueError, match=r"aspect ratio 3/2 > max_aspect=1\.25"):
            fn(3, 2, max_aspect=1.25)


@needs_qwen
def test_aspect_limit_is_the_oracles():
    for size in [(1, 200), (200, 1), (3, 600), (5, 1000), (7, 1400)]:
        assert smart_resize(*size) == _oracle(*size)
    for size in [(1, 201), (3, 601), (1000, 4), (7000, 30), (30, 7000)]:
        with pytest.raises(ValueError):
            smart_resize(*size)
        with pytest.raises(ValueError):
            _oracle(*size)


@settings(max_examples=400, deadline=None)
@given(size=image_sizes())
def test_reference_properties_navil_defaults(size):
    h, w = size
    nh, nw = smart_resize_reference(h, w)
    if MIN_PIXELS <= h * w <= MAX_PIXELS:
        assert (nh, nw) == (h, w)  # no resampling inside the bounds
    elif h * w > MAX_PIXELS:  # downsampled into the bound, each side by the same beta
        assert nh <= h and nw <= w and nh * nw <= MAX_PIXELS
        beta = math.sqrt(h * w / MAX_PIXELS)
        assert (nh, nw) == (max(1, math.floor(h / beta)), max(1, math.floor(w / beta)))
    else:  # upsampled to at least the minimum
        assert nh >= h and nw >= w and nh * nw >= MIN_PIXELS
        beta = math.sqrt(MIN_PIXELS / (h * w))
        assert (nh, nw) == (math.ceil(h * beta), math.ceil(w * beta))


@needs_qwen
@settings(max_examples=500, deadline=None)
@given(size=image_sizes(max_side=200_000))
def test_native_reference_and_oracle_agree_navil_defaults(size):
    want = _oracle(*size)
    assert smart_resize_reference(*size) == want
    assert smart_resize(*size) == want


@needs_qwen
@settings(max_examples=400, deadline=None)
@given(
    size=image_sizes(max_side=20_000),
    patch=st.integers(1, 64),
    merge=st.integers(1, 4),
    min_p=st.integers(1, 5000),
    span=st.integers(0, 100_000),
)
def test_reference_equals_oracle_other_bounds(size, patch, merge, min_p, span):
    args = (*size, patch, merge, min_p, min_p + span)
    assert smart_resize_reference(*args) == _oracle(*size, patch, min_p, min_p + span)
    assert smart_resize(*args) == smart_resize_reference(*args)


@needs_native
@settings(max_examples=500, deadline=None)
@given(
    h=st.integers(1, MAX_IMAGE_SIDE),
    w=st.integers(1, MAX_IMAGE_SIDE),
    patch=st.integers(1, 2**20),
    merge=st.integers(1, 8),
    min_p=st.integers(1, 2**40),
    span=st.integers(0, 2**40),
    max_aspect=st.one_of(st.floats(1.0, 1e12), st.sampled_from([1.0, 200.0, 1e300])),
)
def test_native_equals_reference_any_arguments(h, w, patch, merge, min_p, span, max_aspect):
    """Same size or the same ValueError message, over the whole accepted argument range
    (including pixel counts at and above 2**53, which both reject)."""
    args = (h, w, patch, merge, min_p, min_p + span, max_aspect)
    assert _outcome(resize_mod._C.smart_resize, *args) == _outcome(smart_resize_reference, *args)


@needs_native
@settings(max_examples=500, deadline=None)
@given(
    pixels=st.integers(2**50, 2**53 - 1),
    aspect=st.integers(1, 1000),
    bound=st.integers(2**40, 2**53 - 1),
)
def test_native_equals_reference_near_two_to_the_53(pixels, aspect, bound):
    """Pixel counts just below 2**53, where a wider integer would no longer be an exact
    double: the C++ division still equals Python's correctly rounded int / int."""
    h = max(1, math.isqrt(pixels // aspect))
    w = min(MAX_IMAGE_SIDE, pixels // h)
    if h * w >= 2**53:
        w -= 1
    for min_p, max_p in ((1, bound), (bound, bound)):  # patch 1: the bounds are the pixels
        args = (h, w, 1, 1, min_p, max_p, 1e9)
        assert _outcome(resize_mod._C.smart_resize, *args) == _outcome(
            smart_resize_reference, *args
        )


def test_fallback_to_reference_without_native(monkeypatch):
    monkeypatch.setattr(resize_mod, "_C", None)
    assert resize_mod._native() is None
    assert smart_resize(100, 100) == (256, 256)
    assert smart_resize(2560, 2560) == (2508, 2508)


BAD_INT = [0, -1, 1.5, 2.0, True, "3", None]


@pytest.mark.parametrize("fn", [smart_resize, smart_resize_reference])
@pytest.mark.parametrize("bad", BAD_INT)
@pytest.mark.parametrize(
    ("position", "name"),
    [
        (0, "height"),
        (1, "width"),
        (2, "patch"),
        (3, "merge"),
        (4, "min_patches"),
        (5, "max_patches"),
    ],
)
def test_bad_integers(fn, bad, position, name):
    args = [300, 300, 16, 2, 256, 24576, 200]
    args[position] = bad
    with pytest.raises(ValueError, match=f"smart_resize: {name} must be a positive integer"):
        fn(*args)


@pytest.mark.parametrize("fn", [smart_resize, smart_resize_reference])
def test_bad_arguments(fn):
    with pytest.raises(ValueError, match="height must be at most 2147483647"):
        fn(2**31, 2**31)
    with pytest.raises(ValueError, match=r"min_patches \(300\) must be <= max_patches \(200\)"):
        fn(300, 300, min_patches=300, max_patches=200)
    for bad in (0.5, float("inf"), float("nan"), -3, "200", None, True):
        with pytest.raises(ValueError, match="max_aspect must be a finite number >= 1"):
            fn(300, 300, max_aspect=bad)
    # pixel counts must stay exact doubles (see the module doc)
    with pytest.raises(
        ValueError,
        match=r"^smart_resize: max_patches \* patch \* patch must be below 2\*\*53 "
        r"\(max_patches=8796093022208, patch=32\)$",
    ):
        fn(300, 300, 32, 2, 1, 2**43)  # 2**43 * 2**10 = 2**53
    assert fn(300, 300, 32, 2, 1, 2**43 - 1) == (300, 300)  # one patch less: accepted
    with pytest.raises(
        ValueError,
        match=r"^smart_resize: height \* width must be below 2\*\*53 \(image 94906266x94906266\)$",
    ):
        fn(94906266, 94906266)  # 94906266**2 > 2**53
    assert fn(94906265, 94906265) == (2508, 2508)  # 94906265**2 < 2**53
    # upsampling a thin image to a huge minimum would need a side beyond int32
    with pytest.raises(
        ValueError,
        match=r"^smart_resize: upsampling image 1x1000000 to 4503599627370496 pixels gives a "
        r"side above 2147483647$",
    ):
        fn(1, 10**6, 2**20, 1, 2**12, 2**12, 1e7)


@needs_native
def test_native_errors_are_value_errors():
    """The C++ std::invalid_argument surfaces as ValueError with the reference's message."""
    cases = [
        (0, 5),
        (5, 2**31),
        (5, 5, 16, 2, 10, 5),
        (5, 5, 16, 2, 256, 24576, 0.5),
        (5, 5, 16, 2, 256, 24576, float("nan")),
        (1, 300),
        (300, 300, 32, 2, 1, 2**43),
        (94906266, 94906266),
        (1, 10**6, 2**20, 1, 2**12, 2**12, 1e7),
    ]
    for args in cases:
        native = _outcome(resize_mod._C.smart_resize, *args)
        assert native[0] == "ValueError", args
        assert native == _outcome(smart_resize_reference, *args)


def test_native_extension_built_in_ci():
    if os.environ.get("CI"):
        assert resize_mod._native() is not None, "megatron_navil._C lacks smart_resize"
    elif resize_mod._native() is None:
        pytest.skip("native extension not built")
