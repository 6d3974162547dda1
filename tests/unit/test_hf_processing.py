"""megatron_navil/hf/processing_navil.py (standalone: it travels inside exported checkpoints)
against the project's own ops, which training uses: the same target sizes, scales, patches
(bitwise) and image-token blocks, so the HF model sees exactly what training saw."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_navil import ops
from megatron_navil.config.tokens import SPECIAL_TOKENS
from megatron_navil.hf import processing_navil as P

# (patch, merge, min_patches, max_patches): NaViL's and the tiny config's rules
RULES = [(16, 2, 256, 24576), (16, 2, 16, 64)]
SIZES = [(100, 100), (4000, 3000), (500, 333), (1, 200), (240, 240), (37, 901), (64, 128),
         (1024, 1024), (3, 3), (7000, 20), (8192, 8192), (200, 300), (2560, 2560), (3000, 4000),
         (512, 512), (64, 2048), (1000, 747), (16, 16), (200, 1), (256, 256), (4096, 4096),
         (7000, 30), (333, 500),
         # where the demo's float32 budget and reflected division decide a scale
         (3455, 6347), (3428, 2713), (5153, 7790), (5302, 488), (4833, 3585),
         (2312, 2259)]  # fmt: skip


def _sizes():
    rng = random.Random(5)
    return SIZES + [(rng.randint(1, 3000), rng.randint(1, 3000)) for _ in range(60)]


@pytest.mark.parametrize("rule", RULES)
def test_sizes_and_scales_equal_the_ops(rule):
    patch, merge, lo, hi = rule
    for h, w in _sizes():
        try:
            want = ops.smart_resize(h, w, patch, merge, lo, hi)
        except ValueError:
            with pytest.raises(ValueError):
                P.smart_resize(h, w, patch, merge, lo, hi)
            continue
        assert P.smart_resize(h, w, patch, merge, lo, hi) == want, (h, w)
        assert P.scales_for_image(h, w, patch, merge, lo, hi) == ops.scales_for_image(
            h, w, patch, merge, lo, hi
        ), (h, w)
        assert P.scales_for_image(h, w, patch, merge, lo, hi, multi_scale=False) == [want]
        for ratio in (0.7071, 2**-0.5, 0.6):
            assert P.scales_for_image(h, w, patch, merge, lo, hi, 200.0, ratio) == (
                ops.scales_for_image(h, w, patch, merge, lo, hi, 200.0, ratio)
            ), (h, w, ratio)


@settings(max_examples=300, deadline=None)
@given(long_side=st.integers(1, 12000), frac=st.floats(0.005, 1.0), tall=st.booleans())
def test_scales_equal_the_ops_any_size(long_side, frac, tall):
    short_side = max(1, min(long_side, round(long_side * frac)))
    if long_side > 200 * short_side:
        short_side += 1
    h, w = (long_side, short_side) if tall else (short_side, long_side)
    assert P.smart_resize(h, w) == ops.smart_resize(h, w)
    assert P.scales_for_image(h, w) == ops.scales_for_image(h, w)


def test_default_ratio_is_the_released_one():
    assert P.NaViLImageProcessor().scale_ratio == 0.7071
    assert P.scales_for_image(64, 2048) == [(64, 2048)]  # 2**-0.5 would add (45, 1448)
    assert P.scales_for_image(64, 2048, scale_ratio=2**-0.5) == [(45, 1448), (64, 2048)]
    assert P.smart_resize(2560, 2560) == (2508, 2508)
    assert P.merged_grid(2508, 2508) == (158, 158)


def test_patchify_is_bitwise_the_op():
    rng = np.random.default_rng(0)
    for h, w in [(32, 32), (33, 65), (100, 7), (64, 128)]:
        image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        got, grid = P.patchify(image)
        want, want_grid = ops.patchify(image)
        assert grid == want_grid and torch.equal(got, want)


def test_image_block_is_the_token_layout():
    grids = [(2, 3), (4, 5)]
    layout = ops.image_token_layout(grids)
    assert P.image_block(grids) == "".join(SPECIAL_TOKENS[i] for i in layout.tolist())
    assert P.SPECIAL_TOKENS == SPECIAL_TOKENS


def test_processor_packs_scales_in_order():
    from PIL import Image

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in
              [(96, 160), (50, 70)]]  # fmt: skip
    proc = P.NaViLImageProcessor(min_patches=16, max_patches=64)
    out = proc(images)
    grids, patches = [], []
    for image in images:
        for h, w in ops.scales_for_image(image.height, image.width, 16, 2, 16, 64):
            scaled = image if (h, w) == (image.height, image.width) else image.resize(
                (w, h), Image.Resampling.BICUBIC
            )  # fmt: skip
            values, grid = ops.patchify(np.asarray(scaled))
            patches.append(values)
            grids.append(grid)
    assert out["image_grid_hw"].tolist() == [list(g) for g in grids]
    assert torch.equal(out["pixel_values"], torch.cat(patches))
    assert len(out["image_blocks"]) == 2 and out["image_blocks"][0].startswith("<img>")
    with pytest.raises(ValueError, match="2 <image> placeholders for 1 images"):
        P.expand_images("<image><image>", ["<img></img>"])


def test_standalone_copies_of_the_prompt_constants_agree():
    """hf/ (shipped inside exports) and the independent reference keep their own copies of
    InternVL's default system message, the special-token lists and the no-loss label, on
    purpose: equal to config's here."""
    from megatron_navil.config import tokens as T
    from megatron_navil.config.model import CHAT_TEMPLATES, DEFAULT_SYSTEM_MESSAGE
    from megatron_navil.hf import configuration_navil as HC
    from megatron_navil.testing import official_reference as R

    assert HC.DEFAULT_SYSTEM_MESSAGE == R.DEFAULT_SYSTEM_MESSAGE == DEFAULT_SYSTEM_MESSAGE
    assert R.SPECIAL_TOKEN_LIST == SPECIAL_TOKENS == P.SPECIAL_TOKENS
    assert P.VISUAL_TOKENS == T.VISUAL_TOKENS
    assert P.IMAGE_BLOCK_TOKENS == T.IMAGE_BLOCK_TOKENS
    assert P.IGNORE_INDEX == T.IGNORE_INDEX
    assert set(P.CHAT_TEMPLATES) == set(CHAT_TEMPLATES)
