"""megatron_navil.ops.vmp: visual multi-scale packing scales and the image-block token layout.

The scales follow the released NaViL demo's chain (NAVIL.md, "The released code's exact
behaviour", point 3). The reference here is a literal transcription of that chain with torch
tensors (``_demo_scales``): its budget is the demo's float32 tensor, and each step runs either
a transcription of Qwen2-VL's smart_resize (factor 1) or transformers' own function on it.
Sizes are (height, width) in pixels; a grid is merged_grid's padded patch grid. Layouts are
int64 indices into config.tokens.SPECIAL_TOKENS.
"""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_navil.config.model import ImageConfig
from megatron_navil.config.registry import get_config
from megatron_navil.config.tokens import SPECIAL_TOKENS
from megatron_navil.ops import merged_grid, smart_resize
from megatron_navil.ops import vmp as vmp_mod
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


# ----------------------------------------------------------------------------- the demo


def _qwen_step(height, width, min_pixels, max_pixels):
    """Qwen2-VL's smart_resize with factor 1, transcribed; ``max_pixels`` may be the demo's
    float32 tensor, and then Python and torch do what they do with it."""
    if max(height, width) / min(height, width) > 200:
        raise ValueError("aspect ratio above 200")
    h_bar, w_bar = round(height / 1) * 1, round(width / 1) * 1
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = max(1, math.floor(height / beta / 1) * 1)
        w_bar = max(1, math.floor(width / beta / 1) * 1)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / 1) * 1
        w_bar = math.ceil(width * beta / 1) * 1
    return int(h_bar), int(w_bar)


def _transformers_step():
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize
    except ImportError:
        try:
            from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
        except ImportError:
            return None

    def step(height, width, min_pixels, max_pixels):
        got = smart_resize(height, width, factor=1, min_pixels=min_pixels, max_pixels=max_pixels)
        return int(got[0]), int(got[1])

    return step


transformers_step = _transformers_step()
needs_qwen = pytest.mark.skipif(transformers_step is None, reason="transformers Qwen2-VL missing")


def _demo_scales(
    height, width, patch=16, merge=2, min_patches=256, max_patches=24576, ratio=0.7071, step=None
):
    """The demo's anyres_preprocess_multi_scale on sizes: torch grids, a float32 budget."""
    step = step or _qwen_step
    min_pixels, max_pixels = min_patches * patch**2, max_patches * patch**2
    size = step(height, width, min_pixels, max_pixels)
    grids = [torch.tensor([1, *merged_grid(*size, patch, merge)])]  # (t, h, w), int64
    sizes = [size]
    while True:
        current_pixels = grids[0].prod() * (patch**2)
        max_pixels = current_pixels * (ratio**2)
        assert max_pixels.dtype == torch.float32 and max_pixels.dim() == 0
        if max_pixels < min_pixels:
            break
        size = step(height, width, min_pixels, max_pixels)
        grid = torch.tensor([1, *merged_grid(*size, patch, merge)])
        if grid.prod() >= grids[0].prod():
            break
        grids.insert(0, grid)
        sizes.insert(0, size)
    return sizes


def _double_scales(height, width, ratio=0.7071):
    """The chain with the budget and the division in double: NOT the demo (see below)."""
    min_pixels = 256 * 256
    sizes = [smart_resize(height, width)]
    while True:
        count = _count(sizes[0])
        budget = count * 256 * ratio**2
        if budget < min_pixels:
            break
        if height * width > budget:
            beta = math.sqrt(height * width / budget)
            size = (max(1, math.floor(height / beta)), max(1, math.floor(width / beta)))
        else:
            size = smart_resize(height, width)
        if _count(size) >= count:
            break
        sizes.insert(0, size)
    return sizes


# ----------------------------------------------------------------------------- scales

# size -> the chain's padded grids, smallest first (the last is the base scale's)
KNOWN_GRIDS = {
    (200, 300): [(14, 20)],
    (2560, 2560): [(22, 22), (30, 30), (42, 42), (58, 58), (80, 80), (112, 112), (158, 158)],
    (3000, 4000): [(14, 20), (20, 26), (26, 34), (36, 48), (50, 68), (70, 94), (98, 130),
                   (136, 182)],
    (512, 512): [(18, 18), (24, 24), (32, 32)],
    (64, 2048): [(4, 128)],  # budget 131,072 * f32(0.7071**2) = 65,534.7 < 65,536
    (1000, 747): [(20, 14), (26, 20), (34, 26), (46, 34), (64, 48)],
    (16, 16): [(16, 16)],
    (100, 100): [(16, 16)],
    (50, 70): [(14, 20)],
    (255, 255): [(16, 16)],
    (1, 200): [(2, 228)],
    (200, 1): [(228, 2)],
    (256, 256): [(16, 16)],
    (4096, 4096): [(22, 22), (30, 30), (42, 42), (58, 58), (80, 80), (112, 112), (158, 158)],
    (333, 500): [(16, 24), (22, 32)],
    (1024, 1024): [(18, 18), (24, 24), (34, 34), (46, 46), (64, 64)],
}  # fmt: skip
KNOWN_SCALES = {
    (2560, 2560): [(339, 339), (475, 475), (656, 656), (905, 905), (1267, 1267), (1787, 1787),
                   (2508, 2508)],
    (1000, 747): [(298, 222), (389, 290), (517, 386), (725, 541), (1000, 747)],
    (1024, 1024): [(271, 271), (384, 384), (520, 520), (724, 724), (1024, 1024)],
    (100, 100): [(256, 256)],  # upsampled to the minimum: no smaller scale
    (333, 500): [(244, 367), (333, 500)],
    (1, 200): [(19, 3621)],
}  # fmt: skip


@pytest.mark.parametrize("size", list(KNOWN_GRIDS), ids=str)
def test_known_chains(size):
    scales = scales_for_image(*size)
    assert [merged_grid(*s) for s in scales] == KNOWN_GRIDS[size]
    if size in KNOWN_SCALES:
        assert scales == KNOWN_SCALES[size]
    assert scales[-1] == smart_resize(*size)
    assert scales_for_image_reference(*size) == scales
    assert _demo_scales(*size) == scales
    assert len(set(scales)) == len(scales)  # no two scales equal
    counts = [_count(s) for s in scales]
    assert all(a < b for a, b in itertools.pairwise(counts))


@needs_qwen
@pytest.mark.parametrize("size", list(KNOWN_GRIDS), ids=str)
def test_known_chains_with_the_transformers_step(size):
    assert _demo_scales(*size, step=transformers_step) == scales_for_image(*size)


def test_rejected_sizes():
    for size in [(7000, 30), (30, 7000), (1, 201)]:
        for fn in (scales_for_image, scales_for_image_reference):
            with pytest.raises(ValueError, match=r"^scales_for_image: smart_resize: image .*"):
                fn(*size)
        with pytest.raises(ValueError, match="aspect ratio above 200"):
            _demo_scales(*size)


def test_config_defaults_agree():
    from megatron_navil.hf import processing_navil
    from megatron_navil.ops.geometry import ImageGeometry

    assert NAVIL_SCALE_RATIO == 0.7071  # the released configs' value, not sqrt(2) / 2
    assert ImageConfig().scale_ratio == NAVIL_SCALE_RATIO
    assert ImageGeometry().scale_ratio == NAVIL_SCALE_RATIO
    assert ImageGeometry.of_config(get_config("navil-2b")) == ImageGeometry()
    assert processing_navil.NaViLImageProcessor().scale_ratio == NAVIL_SCALE_RATIO
    assert scales_for_image(4000, 3000)[-1] == smart_resize(4000, 3000) == (2896, 2172)


def test_released_ratio_is_not_sqrt2_over_2():
    """0.7071**2 rounds to float32 0.4999904, (sqrt(2)/2)**2 to exactly 0.5: 64x2048 (512
    padded patches) stops at one scale with the former and takes a second with the latter."""
    assert scales_for_image(64, 2048) == [(64, 2048)] == _demo_scales(64, 2048)
    root_half = math.sqrt(2) / 2
    longer = [(45, 1448), (64, 2048)]
    assert scales_for_image(64, 2048, scale_ratio=root_half) == longer
    assert _demo_scales(64, 2048, ratio=root_half) == longer


# Sizes where float32 decides: a double budget or division gives another chain.
FLOAT32_SIZES = [(3455, 6347), (3428, 2713), (5153, 7790), (5302, 488)]


@pytest.mark.parametrize("size", FLOAT32_SIZES, ids=str)
def test_float32_arithmetic_matters(size):
    scales = scales_for_image(*size)
    assert scales == _demo_scales(*size) == scales_for_image_reference(*size)
    assert _double_scales(*size) != scales


def test_reflected_division_matters():
    """The demo's ``(H * W) / max_pixels`` is ``max_pixels.reciprocal() * (H * W)`` in
    float32, not a float32 division: for 4833x3585 the two give different second scales."""
    size = (4833, 3585)
    scales = scales_for_image(*size)
    assert scales == _demo_scales(*size)
    budget = np.float32(_count(scales[-1]) * 256) * np.float32(0.7071**2)
    pixels = np.float32(size[0] * size[1])
    by_reciprocal = (np.float32(1) / budget) * pixels
    by_division = pixels / budget
    assert torch.tensor(budget).reciprocal().item() == float(np.float32(1) / budget)
    assert (size[0] * size[1]) / torch.tensor(budget) == torch.tensor(by_reciprocal)
    assert by_reciprocal != by_division
    beta = math.sqrt(float(by_division))  # what a plain float32 division would give
    plain = (math.floor(size[0] / beta), math.floor(size[1] / beta))
    assert scales[-2] == (2066, 1532) and plain == (2066, 1533)


def _check_chain(h, w, scales, min_patches=256, patch=16, merge=2):
    assert scales, "at least the base scale"
    assert len(set(scales)) == len(scales)  # no two scales equal
    counts = [_count(s, patch, merge) for s in scales]
    assert all(a < b for a, b in itertools.pairwise(counts))  # smallest first, strictly
    for s in scales[:-1]:  # each smaller scale is a downsampling of the original image
        assert s[0] <= h and s[1] <= w
        assert s[0] * s[1] >= min_patches * patch * patch * 0.49  # budget >= min_pixels


@settings(max_examples=300, deadline=None)
@given(size=image_sizes())
def test_chain_equals_the_demo_navil_defaults(size):
    h, w = size
    scales = scales_for_image(h, w)
    _check_chain(h, w, scales)
    assert scales[-1] == smart_resize(h, w)
    assert scales == _demo_scales(h, w)
    assert scales == scales_for_image_reference(h, w)


@needs_qwen
@settings(max_examples=150, deadline=None)
@given(size=image_sizes(max_side=12000))
def test_chain_equals_the_demo_with_transformers(size):
    assert scales_for_image(*size) == _demo_scales(*size, step=transformers_step)


@settings(max_examples=150, deadline=None)
@given(
    size=image_sizes(max_side=3000),
    patch=st.sampled_from([1, 2, 14, 16]),
    merge=st.integers(1, 3),
    min_patches=st.integers(1, 400),
    extra=st.integers(0, 5000),
    ratio=st.one_of(st.floats(0.3, 0.95), st.sampled_from([0.7071, math.sqrt(2) / 2])),
)
def test_chain_equals_the_demo_other_bounds(size, patch, merge, min_patches, extra, ratio):
    h, w = size
    args = (h, w, patch, merge, min_patches, min_patches + extra, 200, ratio)
    scales = scales_for_image(*args)
    _check_chain(h, w, scales, min_patches, patch, merge)
    assert scales == _demo_scales(*args[:6], ratio=ratio)
    assert scales == scales_for_image_reference(*args)
    if transformers_step is not None:
        assert scales == _demo_scales(*args[:6], ratio=ratio, step=transformers_step)


def test_tiny_config_chains():
    """The tiny config (16..64 patches, 4,096..16,384 px): its 96..128 px images are in
    bounds, so the base scale is the image itself (as under the earlier rule)."""
    assert scales_for_image(96, 96, 16, 2, 16, 64) == [(96, 96)]
    assert scales_for_image(96, 97, 16, 2, 16, 64) == [(77, 78), (96, 97)]
    assert scales_for_image(128, 128, 16, 2, 16, 64) == [(90, 90), (128, 128)]
    rng = random.Random(0)
    for _ in range(200):
        h, w = rng.randint(96, 128), rng.randint(96, 128)
        scales = scales_for_image(h, w, 16, 2, 16, 64)
        assert scales[-1] == (h, w)
        assert scales == _demo_scales(h, w, 16, 2, 16, 64)


def test_tiny_minimum_terminates():
    scales = scales_for_image(64, 64, 1, 1, 1, 64 * 64)
    assert scales[0] == (1, 1) and scales[-1] == (64, 64) and len(scales) == 10
    assert scales == _demo_scales(64, 64, 1, 1, 1, 64 * 64)


@pytest.mark.slow
@settings(max_examples=2000, deadline=None)
@given(
    x=st.one_of(
        st.floats(1e-30, 1e30, allow_nan=False, allow_infinity=False),
        st.integers(1, 2**63 - 1).map(float),
    )
)
def test_exact_float32_rounding_of_the_reference(x):
    """The reference's rational rounding equals numpy's double -> float32 cast."""
    from fractions import Fraction

    assert vmp_mod._to_f32(Fraction(x)) == Fraction(float(np.float32(x)))


@settings(max_examples=1000, deadline=None)
@given(n=st.integers(1, 2**63 - 1))
def test_int64_to_float32_is_one_rounding(n):
    """An int64 -> float32 cast (torch's, numpy's) rounds the integer once, even above 2**53
    where going through a double would round twice."""
    from fractions import Fraction

    want = vmp_mod._to_f32(Fraction(n))
    assert Fraction(float(vmp_mod._f32(n))) == want
    assert Fraction(torch.tensor(n, dtype=torch.int64).to(torch.float32).item()) == want


@pytest.mark.parametrize("fn", [scales_for_image, scales_for_image_reference])
def test_int64_overflow_is_a_value_error(fn):
    with pytest.raises(ValueError, match=r"^scales_for_image: .* more than int64 holds"):
        fn(100, 100, 2**26, 2**10, 1, 1)  # padded grid 1024x1024 of 2**52 px


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
