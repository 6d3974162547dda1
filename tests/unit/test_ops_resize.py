"""megatron_navil.ops.resize: smart_resize native == reference, NaViL's rule, Qwen2-VL parity.

Sizes are (height, width) in pixels; "count" is the padded patch count gh * gw of
merged_grid (sides zero-padded up to a multiple of patch * merge).
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


def _count(h: int, w: int, patch: int = 16, merge: int = 2) -> int:
    gh, gw = merged_grid_reference(h, w, patch, merge)
    return gh * gw


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


def _qwen(h: int, w: int) -> tuple[int, int]:
    """Qwen2-VL's smart_resize configured as NaViL: factor 32, pixels = patches * 16 * 16."""
    return tuple(qwen_smart_resize(h, w, factor=32, min_pixels=MIN_P * 256, max_pixels=MAX_P * 256))


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


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((256, 256), (256, 256)),  # exactly the minimum, 256 patches
        ((250, 250), (250, 250)),  # pads to 256x256: in bounds, not resampled
        ((240, 240), (240, 240)),  # (Qwen2-VL: 224x224 rounded, below min -> upscaled)
        ((500, 333), (500, 333)),
        ((2048, 3072), (2048, 3072)),  # exactly the maximum, 24576 patches
        ((100, 100), (256, 256)),  # below: upscaled to fill 256 patches exactly
        ((1, 200), (10, 2048)),  # thin: 1 unit row x 64 units, padded 32x2048
        ((200, 1), (2048, 10)),
        ((4000, 3000), (2880, 2160)),  # above: largest 4:3 size within 24576 padded patches
    ],
)
def test_known_values(size, expected):
    assert smart_resize_reference(*size) == expected
    assert smart_resize(*size) == expected
    assert MIN_P <= _count(*expected) <= MAX_P


def _short_for(long_side: int, short_side: int, new_long: int) -> int:
    return max(1, math.floor(short_side * new_long / long_side + 0.5))


def _family_count(h, w, new_long, patch, merge):
    long_side, short_side = max(h, w), min(h, w)
    return _count(new_long, _short_for(long_side, short_side, new_long), patch, merge)


@settings(max_examples=400, deadline=None)
@given(size=image_sizes())
def test_reference_properties_navil_defaults(size):
    h, w = size
    nh, nw = smart_resize_reference(h, w)
    count = _count(nh, nw)
    assert MIN_P <= count <= MAX_P
    if MIN_P <= _count(h, w) <= MAX_P:
        assert (nh, nw) == (h, w)  # no resampling inside the bounds
        return
    long_side, short_side = max(h, w), min(h, w)
    new_long, new_short = max(nh, nw), min(nh, nw)
    assert (nh >= nw) == (h >= w) or nh == nw  # orientation kept
    # aspect ratio kept: short side is the rounded proportional size (at least 1 px)
    assert new_short == _short_for(long_side, short_side, new_long)
    # maximal: one more pixel on the long side would change (above max: exceed) the count
    assert _family_count(h, w, new_long + 1, 16, 2) > count
    if _count(h, w) > MAX_P:
        assert new_long < long_side
    else:
        assert new_long > long_side


@settings(max_examples=300, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    patch=st.integers(1, 4),
    merge=st.integers(1, 3),
    min_p=st.integers(1, 60),
    span=st.integers(0, 60),
)
def test_reference_matches_brute_force(h, w, patch, merge, min_p, span):
    """Small cases against an exhaustive search over the aspect-preserving family."""
    max_p = max(min_p + span, merge * merge)
    args = (h, w, patch, merge, min_p, max_p, 200)
    if max(h, w) > 200 * min(h, w):
        return
    got = _outcome(smart_resize_reference, *args)
    count = _count(h, w, patch, merge)
    if min_p <= count <= max_p:
        assert got == (h, w)
        return
    long_side = max(h, w)
    # The family's count is >= long side / patch >= x / 4, so x < 2000 covers every target.
    counts = {x: _family_count(h, w, x, patch, merge) for x in range(1, 2000)}
    assert counts[1999] > 2 * max_p
    if count > max_p:
        fits = [x for x in range(1, long_side) if counts[x] <= max_p]
        best = max(fits)
    else:
        above = [x for x in counts if x > long_side and counts[x] >= min_p]
        target = min(counts[x] for x in above)
        if target > max_p:
            assert got[0] == "ValueError" and "no size keeping the aspect ratio" in got[1]
            return
        best = max(x for x in above if counts[x] == target)
    short = _short_for(long_side, min(h, w), best)
    assert got == ((best, short) if h >= w else (short, best))


@needs_native
@settings(max_examples=500, deadline=None)
@given(size=image_sizes(max_side=200_000))
def test_native_equals_reference_navil_defaults(size):
    assert smart_resize(*size) == smart_resize_reference(*size)
    assert tuple(resize_mod._C.smart_resize(*size)) == smart_resize_reference(*size)


@needs_native
@settings(max_examples=500, deadline=None)
@given(
    h=st.integers(1, MAX_IMAGE_SIDE),
    w=st.integers(1, MAX_IMAGE_SIDE),
    patch=st.integers(1, 64),
    merge=st.integers(1, 8),
    min_p=st.integers(1, 2**40),
    span=st.integers(0, 2**40),
    max_aspect=st.one_of(st.floats(1.0, 1e12), st.sampled_from([1.0, 200.0, 1e300])),
)
def test_native_equals_reference_any_arguments(h, w, patch, merge, min_p, span, max_aspect):
    """Same size or the same ValueError message, over the whole accepted argument range."""
    args = (h, w, patch, merge, min_p, min_p + span, max_aspect)
    assert _outcome(resize_mod._C.smart_resize, *args) == _outcome(smart_resize_reference, *args)


def test_fallback_to_reference_without_native(monkeypatch):
    monkeypatch.setattr(resize_mod, "_C", None)
    assert resize_mod._native() is None
    assert smart_resize(100, 100) == (256, 256)


def test_aspect_limit_inclusive():
    assert smart_resize(1, 200) == (10, 2048)
    assert smart_resize(7, 1400) == smart_resize_reference(7, 1400)
    for fn in (smart_resize, smart_resize_reference):
        with pytest.raises(
            ValueError, match=r"image 1x201 has aspect ratio 201/1 > max_aspect=200"
        ):
            fn(1, 201)
        with pytest.raises(ValueError, match=r"aspect ratio 3/2 > max_aspect=1\.25"):
            fn(3, 2, max_aspect=1.25)


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
    with pytest.raises(ValueError, match=r"max_patches \(3\) must be >= merge \* merge \(4\)"):
        fn(300, 300, min_patches=1, max_patches=3)
    for bad in (0.5, float("inf"), float("nan"), -3, "200", None, True):
        with pytest.raises(ValueError, match="max_aspect must be a finite number >= 1"):
            fn(300, 300, max_aspect=bad)
    # 1-pixel patches, no merge: a 1:7 image's counts are n * max(1, round(n / 7)), which jump
    # from 10 (n = 10) to 22 (n = 11), so none is in [15, 15]
    with pytest.raises(ValueError, match=r"no size keeping the aspect ratio of 1x7 .* \[15, 15\]"):
        fn(1, 7, 1, 1, 15, 15)


@needs_native
def test_native_errors_are_value_errors():
    """The C++ std::invalid_argument surfaces as ValueError with the reference's message."""
    cases = [
        (0, 5),
        (5, 2**31),
        (5, 5, 16, 2, 10, 5),
        (5, 5, 16, 2, 1, 3),
        (5, 5, 16, 2, 256, 24576, 0.5),
        (5, 5, 16, 2, 256, 24576, float("nan")),
        (1, 300),
        (1, 7, 1, 1, 15, 15),
    ]
    for args in cases:
        native = _outcome(resize_mod._C.smart_resize, *args)
        assert native[0] == "ValueError", args
        assert native == _outcome(smart_resize_reference, *args)


# ---- parity with transformers' Qwen2-VL smart_resize (factor 32) ---------------------------


@needs_qwen
@settings(max_examples=300, deadline=None)
@given(gh=st.integers(1, 400), gw=st.integers(1, 400))
def test_qwen_parity_multiples_of_32(gh, gw):
    """Sides already multiples of 32: in bounds both keep the size, out of bounds both resize."""
    h, w = 32 * gh, 32 * gw
    if max(h, w) > 200 * min(h, w):
        return
    ours, theirs = smart_resize(h, w), _qwen(h, w)
    in_bounds = MIN_P <= _count(h, w) <= MAX_P
    assert (ours == (h, w)) == in_bounds
    assert (theirs == (h, w)) == in_bounds
    if in_bounds:
        assert ours == theirs


@needs_qwen
@settings(max_examples=400, deadline=None)
@given(size=image_sizes())
def test_qwen_parity_bounds_decision(size):
    """NaViL keeps an image exactly when Qwen2-VL keeps its zero-padded version."""
    h, w = size
    ph, pw = 32 * math.ceil(h / 32), 32 * math.ceil(w / 32)
    if max(ph, pw) > 200 * min(ph, pw):
        return
    assert (smart_resize(h, w) == (h, w)) == (_qwen(ph, pw) == (ph, pw))
    # and whenever NaViL resamples, both land inside the bounds
    nh, nw = smart_resize(h, w)
    assert MIN_P <= _count(nh, nw) <= MAX_P


@needs_qwen
def test_qwen_aspect_limit_matches():
    for size in [(1, 200), (200, 1), (3, 600), (5, 1000)]:
        smart_resize(*size)
        _qwen(*size)
    for size in [(1, 201), (3, 601), (1000, 4)]:
        with pytest.raises(ValueError):
            smart_resize(*size)
        with pytest.raises(ValueError):
            _qwen(*size)


@needs_qwen
def test_qwen_documented_differences():
    """Where NaViL's rule and Qwen2-VL's differ by design (see ops/resize.py's docstring)."""
    # in bounds but not a multiple of 32: NaViL keeps (and pads), Qwen2-VL resamples
    assert smart_resize(500, 333) == (500, 333)
    assert _qwen(500, 333) == (512, 320)
    # bounds decision on padded vs rounded area
    assert smart_resize(240, 240) == (240, 240)
    assert _qwen(240, 240) != (240, 240)
    # out of bounds: NaViL keeps the aspect ratio, Qwen2-VL rounds sides to multiples of 32
    assert smart_resize(1, 200) == (10, 2048)
    assert _qwen(1, 200) == (32, 3648)
    assert smart_resize(4000, 3000) == (2880, 2160)
    assert _qwen(4000, 3000) == (2880, 2144)


def test_native_extension_built_in_ci():
    if os.environ.get("CI"):
        assert resize_mod._native() is not None, "megatron_navil._C lacks smart_resize"
    elif resize_mod._native() is None:
        pytest.skip("native extension not built")
