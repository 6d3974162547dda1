"""megatron_navil.ops.vmp: visual multi-scale packing scales and the image-block token layout.

Sizes are (height, width) in pixels; "count" is the padded patch count of merged_grid (sides
zero-padded up to a multiple of patch * merge), the count smart_resize bounds. Layouts are
int64 indices into config.model.SPECIAL_TOKENS.
"""

from __future__ import annotations

import itertools
import math
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_navil.config.model import SPECIAL_TOKENS, ImageConfig
from megatron_navil.ops import merged_grid, smart_resize
from megatron_navil.ops.positions import vision_cu_seqlens
from megatron_navil.ops.vmp import (
    NAVIL_SCALE_RATIO,
    image_token_layout,
    image_token_layout_reference,
    scales_for_image,
    scales_for_image_reference,
)

CTX = SPECIAL_TOKENS.index("<IMG_CONTEXT>")
LINE = SPECIAL_TOKENS.index("<IMG_LINE_BREAK>")
FRAME = SPECIAL_TOKENS.index("<IMG_FRAME_BREAK>")


def _count(size, patch=16, merge=2):
    gh, gw = merged_grid(size[0], size[1], patch, merge)
    return gh * gw


@st.composite
def image_sizes(draw, max_side: int = 8000):
    """Sizes smart_resize accepts (aspect ratio <= 200)."""
    long_side = draw(st.integers(1, max_side))
    short_side = draw(st.integers(max(1, math.ceil(long_side / 200)), long_side))
    return (long_side, short_side) if draw(st.booleans()) else (short_side, long_side)


# ----------------------------------------------------------------------------- scales


@pytest.mark.parametrize(
    ("size", "expected"),
    [
        ((1024, 1024), [(255, 255), (361, 361), (511, 511), (724, 724), (1024, 1024)]),
        ((100, 100), [(256, 256)]),  # upscaled to the minimum: no smaller scale fits
        ((256, 256), [(256, 256)]),
        ((1, 200), [(10, 2048)]),
        ((512, 256), [(362, 181), (512, 256)]),  # 181x362 pads to 12x24 = 288 >= 256
    ],
)
def test_known_scales(size, expected):
    assert scales_for_image(*size) == expected
    assert scales_for_image_reference(*size) == expected


def test_config_defaults_agree():
    cfg = ImageConfig()
    assert cfg.scale_ratio == NAVIL_SCALE_RATIO
    assert scales_for_image(4000, 3000)[-1] == smart_resize(4000, 3000) == (2880, 2160)


def _check_scales(h, w, scales, min_patches=256, max_patches=24576, patch=16, merge=2, ratio=None):
    ratio = NAVIL_SCALE_RATIO if ratio is None else ratio
    assert scales, "at least the base scale"
    assert scales[-1] == smart_resize(h, w, patch, merge, min_patches, max_patches)  # base
    long_side, short_side = max(h, w), min(h, w)
    for s in scales[:-1]:  # the smaller scales: never below the minimum, never above the max
        assert min_patches <= _count(s, patch, merge) <= _count(scales[-1], patch, merge)
    for s in scales:
        new_long, new_short = max(s), min(s)
        assert (s[0] >= s[1]) == (h >= w) or s[0] == s[1]  # orientation kept
        # the aspect-preserving family of the ORIGINAL image (smart_resize's rounding)
        assert new_short == max(1, (2 * short_side * new_long + long_side) // (2 * long_side))
    for small, big in itertools.pairwise(scales):
        area, prev = small[0] * small[1], big[0] * big[1]
        assert area < prev  # strictly decreasing towards the front: smallest first
        assert area <= prev * ratio * ratio  # within the budget ...
        # ... and as close below it as the family allows: one more long-side pixel adds at most
        # new_long + new_short + 1 pixels (the short side grows by at most 1).
        assert area > prev * ratio * ratio - (max(small) + min(small) + 1)


@settings(max_examples=150, deadline=None)
@given(size=image_sizes())
def test_scale_properties(size):
    h, w = size
    scales = scales_for_image(h, w)
    _check_scales(h, w, scales)
    assert 256 <= _count(scales[-1]) <= 24576  # NaViL's bounds are reachable for every size
    assert scales == scales_for_image_reference(h, w)


@settings(max_examples=80, deadline=None)
@given(
    size=image_sizes(max_side=3000),
    min_patches=st.integers(1, 400),
    extra=st.integers(0, 5000),
    ratio=st.floats(0.3, 0.9),
)
def test_scale_properties_other_bounds(size, min_patches, extra, ratio):
    h, w = size
    max_patches = max(min_patches + extra, 4)
    args = (h, w, 16, 2, min_patches, max_patches, 200, ratio)
    try:
        smart_resize(*args[:7])
    except ValueError as exc:  # no size of this aspect ratio fits the bounds: same error
        with pytest.raises(ValueError, match=f"^scales_for_image: {re.escape(str(exc))}$"):
            scales_for_image(*args)
        return
    scales = scales_for_image(*args)
    _check_scales(h, w, scales, min_patches, max_patches, ratio=ratio)
    assert scales == scales_for_image_reference(*args)


def test_halving_stops_below_minimum():
    """The scale after the smallest would be below min_patches (or not exist)."""
    scales = scales_for_image(2048, 1536)
    smallest = scales[0]
    budget = smallest[0] * smallest[1] * NAVIL_SCALE_RATIO**2
    # the largest 4:3 size within the budget is under 256 padded patches
    candidates = [(4 * k, 3 * k) for k in range(1, 600) if 12 * k * k <= budget]
    assert _count(candidates[-1]) < 256
    assert len(scales) == 6


def test_tiny_minimum_terminates():
    scales = scales_for_image(64, 64, min_patches=1, max_patches=64)
    assert scales[0] == (1, 1)
    assert all(a[0] * a[1] < b[0] * b[1] for a, b in itertools.pairwise(scales))


@pytest.mark.parametrize("fn", [scales_for_image, scales_for_image_reference])
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"height": 0}, "height must be a positive integer"),
        ({"width": -5}, "width must be a positive integer"),
        ({"height": 1.5}, "height must be a positive integer"),
        ({"height": 1, "width": 500}, "aspect ratio 500/1 > max_aspect=200"),
        ({"min_patches": 0}, "min_patches must be a positive integer"),
        ({"min_patches": 500, "max_patches": 300}, "must be <= max_patches"),
        ({"scale_ratio": 1.0}, "scale_ratio must be a number in"),
        ({"scale_ratio": 0}, "scale_ratio must be a number in"),
        ({"scale_ratio": float("nan")}, "scale_ratio must be a number in"),
        ({"scale_ratio": True}, "scale_ratio must be a number in"),
        ({"scale_ratio": "0.7"}, "scale_ratio must be a number in"),
    ],
)
def test_bad_inputs_raise(fn, kwargs, match):
    args = {"height": 300, "width": 300, **kwargs}
    with pytest.raises(ValueError, match=f"^scales_for_image: .*{match}"):
        fn(**args)


# ----------------------------------------------------------------------------- token layout


def test_layout_known_value():
    names = [SPECIAL_TOKENS[i] for i in image_token_layout([(1, 2), (2, 1)]).tolist()]
    assert names == [
        "<img>",
        "<IMG_CONTEXT>", "<IMG_CONTEXT>", "<IMG_LINE_BREAK>",
        "<IMG_FRAME_BREAK>",
        "<IMG_CONTEXT>", "<IMG_LINE_BREAK>",
        "<IMG_CONTEXT>", "<IMG_LINE_BREAK>",
        "<IMG_FRAME_BREAK>",
        "</img>",
    ]  # fmt: skip


merged_lists = st.lists(st.tuples(st.integers(1, 40), st.integers(1, 40)), min_size=1, max_size=6)


@settings(max_examples=200, deadline=None)
@given(merged=merged_lists)
def test_layout_properties(merged):
    layout = image_token_layout(merged)
    assert layout.dtype == torch.int64
    assert torch.equal(layout, image_token_layout_reference(merged))
    assert layout[0] == SPECIAL_TOKENS.index("<img>")
    assert layout[-1] == SPECIAL_TOKENS.index("</img>")
    assert len(layout) == 2 + sum(h * (w + 1) + 1 for h, w in merged)
    assert int((layout == CTX).sum()) == sum(h * w for h, w in merged)
    assert int((layout == LINE).sum()) == sum(h for h, _ in merged)
    assert int((layout == FRAME).sum()) == len(merged)
    assert int(layout.min()) >= 0 and int(layout.max()) < len(SPECIAL_TOKENS)


@settings(max_examples=40, deadline=None)
@given(size=image_sizes(max_side=4000))
def test_layout_matches_vision_segments(size):
    """One <IMG_CONTEXT> per merge unit of every scale: the connector's output fills them."""
    scales = scales_for_image(*size)
    grids = [merged_grid(h, w) for h, w in scales]
    merged = [(gh // 2, gw // 2) for gh, gw in grids]
    layout = image_token_layout(merged)
    cu = vision_cu_seqlens(grids)
    assert len(cu) == len(scales) + 1  # one vision segment per scale
    assert int((layout == CTX).sum()) * 4 == int(cu[-1])


@pytest.mark.parametrize("fn", [image_token_layout, image_token_layout_reference])
@pytest.mark.parametrize(
    ("merged", "match"),
    [
        ([], "an image block needs at least one scale"),
        ([(0, 3)], r"scale 0 must be a pair \(h, w\) of positive integers"),
        ([(2, 2), (3, -1)], "scale 1 must be a pair"),
        ([(2,)], "scale 0 must be a pair"),
        ([(True, 2)], "scale 0 must be a pair"),
        ([(2.0, 2)], "scale 0 must be a pair"),
        ([5], "scale 0 must be a pair"),
    ],
)
def test_layout_bad_inputs_raise(fn, merged, match):
    with pytest.raises(ValueError, match=f"^image_token_layout: {match}"):
        fn(merged)
