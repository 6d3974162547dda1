"""megatron_navil.ops.positions: 2D positions, cu_seqlens, window permutation.

Layouts as in the module: grids [(gh, gw), ...] in patches (multiples of merge), positions
[n, 2] (row, col) in patchify's merge-unit order, cu_seqlens int32 [len(grids) + 1], window
perm / inverse int64 [n], window cu_seqlens int32. Integer ops: every comparison is exact.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_navil.ops import patchify_batch
from megatron_navil.ops import positions as pos_mod
from megatron_navil.ops.positions import (
    INT32_MAX,
    patch_positions,
    patch_positions_reference,
    vision_cu_seqlens,
    vision_cu_seqlens_reference,
    window_permutation,
    window_permutation_reference,
)

needs_native = pytest.mark.skipif(
    pos_mod._native() is None, reason="native extension (with positions ops) not built"
)


@st.composite
def packed_grids(draw, max_units: int = 12, max_grids: int = 6):
    """(grids, merge): a packed list of patch grids, each a whole number of merge units."""
    merge = draw(st.integers(1, 3))
    units = st.tuples(st.integers(1, max_units), st.integers(1, max_units))
    grids = draw(st.lists(units, min_size=0, max_size=max_grids))
    return [(uh * merge, uw * merge) for uh, uw in grids], merge


windows = st.integers(1, 6)


def _offsets(grids):
    return np.concatenate([[0], np.cumsum([gh * gw for gh, gw in grids], dtype=np.int64)])


# ------------------------------------------------- the released code's order (NAVIL.md, 1)


def released_window_order(gh: int, gw: int, window_size: int = 8, merge: int = 2) -> list[int]:
    """Section 1 of "The released code's exact behaviour", literally: the patches of one
    image (patchify order: merge units in raster order, row-major inside a unit) permuted a
    whole unit at a time into windows of ``window_size / merge`` units a side, windows in
    raster order over the merged grid, units in raster order inside a window. Built by
    walking windows and units, not by the ops' padding-and-reshape."""
    side = window_size // merge
    uh, uw = gh // merge, gw // merge
    unit = merge * merge
    order = []
    for wr in range(0, uh, side):
        for wc in range(0, uw, side):
            for ur in range(wr, min(wr + side, uh)):
                for uc in range(wc, min(wc + side, uw)):
                    first = (ur * uw + uc) * unit  # patchify's index of the unit's first patch
                    order.extend(range(first, first + unit))
    return order


@pytest.mark.parametrize(
    "image", [(64, 256), (1000, 747), (256, 256)], ids=["64x256", "1000x747", "16x16-patches"]
)
def test_released_window_order(image):
    """The window order of images wider than 4 merge units (at NaViL's image rules) against
    section 1; raster order (what the model used before) is not it, so the test fails for
    raster."""
    from megatron_navil.hf.modeling_navil import window_order
    from megatron_navil.ops import merged_grid, smart_resize, vision_kwargs

    grid = merged_grid(*smart_resize(*image))
    assert grid[1] > 8  # wider than one window of 4 merge units
    want = released_window_order(*grid)
    assert want != list(range(grid[0] * grid[1]))  # permuted: every NaViL-size image is
    perm, inverse, _ = window_permutation([grid], 4)
    assert perm.tolist() == want
    assert inverse[perm].tolist() == list(range(len(want)))
    assert vision_kwargs([grid], 2, 4)["vision_window_index"].tolist() == want
    index, _ = window_order(torch.tensor([grid]), 2, 4)  # the exported remote code's copy
    assert index.tolist() == want
    # Two images packed: each permuted inside its own range.
    both, _, _ = window_permutation([grid, (2, 12)], 4)
    n = grid[0] * grid[1]
    assert both.tolist() == want + [n + i for i in released_window_order(2, 12)]


def test_window_order_is_the_identity_up_to_one_window_wide():
    for grid in [(2, 2), (8, 8), (16, 8), (64, 8)]:  # merged width <= 4 units
        assert released_window_order(*grid) == list(range(grid[0] * grid[1]))
        assert window_permutation([grid], 4)[0].tolist() == list(range(grid[0] * grid[1]))
    assert released_window_order(4, 10) != list(range(40))  # 2 rows of 5 units: permuted


# ----------------------------------------------------------------------------- known values


def test_positions_known_values():
    expected = [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    for fn in (patch_positions, patch_positions_reference):
        assert fn([(2, 4)]).tolist() == expected
        assert fn([(2, 4)], merge=1).tolist() == [[r, c] for r in range(2) for c in range(4)]
        both = fn([(2, 2), (2, 4)], dtype=torch.int32)
        assert both.dtype == torch.int32
        assert both.tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], *expected]


def test_cu_seqlens_known_values():
    for fn in (vision_cu_seqlens, vision_cu_seqlens_reference):
        cu = fn([(2, 4), (4, 2), (32, 16)])
        assert cu.dtype == torch.int32
        assert cu.tolist() == [0, 8, 16, 528]


def test_window_permutation_known_values():
    # grid (4, 6), merge 2: 2 x 3 units [[0, 1, 2], [3, 4, 5]]; window 2: {0, 1, 3, 4}, {2, 5};
    # then a second grid (2, 2) = one unit, patches 24..27, its own window.
    units = [0, 1, 3, 4, 2, 5]
    expected = [u * 4 + j for u in units for j in range(4)] + [24, 25, 26, 27]
    for fn in (window_permutation, window_permutation_reference):
        perm, inverse, window_cu = fn([(4, 6), (2, 2)], window=2)
        assert perm.dtype == inverse.dtype == torch.int64
        assert window_cu.dtype == torch.int32
        assert perm.tolist() == expected
        assert inverse[perm].tolist() == list(range(28))
        assert window_cu.tolist() == [0, 16, 24, 28]
        # window 1: every unit alone, units in raster order: the identity
        perm1, _, cu1 = fn([(4, 6)], window=1)
        assert perm1.tolist() == list(range(24))
        assert cu1.tolist() == list(range(0, 25, 4))


@pytest.mark.parametrize("native", [True, False])
def test_empty_list(native, monkeypatch):
    if not native:
        monkeypatch.setattr(pos_mod, "_C", None)
    elif pos_mod._native() is None:
        pytest.skip("native extension not built")
    assert patch_positions([]).shape == (0, 2)
    assert vision_cu_seqlens([]).tolist() == [0]
    perm, inverse, window_cu = window_permutation([], window=4)
    assert perm.numel() == inverse.numel() == 0
    assert window_cu.tolist() == [0]


# ----------------------------------------------------------------------------- properties


@settings(max_examples=150, deadline=None)
@given(packed=packed_grids())
def test_positions_cover_each_grid_once(packed):
    grids, merge = packed
    positions = patch_positions(grids, merge).numpy()
    offsets = _offsets(grids)
    assert positions.shape == (offsets[-1], 2)
    for k, (gh, gw) in enumerate(grids):
        seg = positions[offsets[k] : offsets[k + 1]]
        assert seg[:, 0].min() >= 0 and seg[:, 0].max() < gh
        assert seg[:, 1].min() >= 0 and seg[:, 1].max() < gw
        flat = seg[:, 0] * gw + seg[:, 1]
        assert np.array_equal(np.sort(flat), np.arange(gh * gw))  # each patch exactly once
        # merge-unit order: consecutive merge*merge patches form one unit, units in raster order
        unit_ids = (seg[:, 0] // merge) * (gw // merge) + seg[:, 1] // merge
        assert np.array_equal(unit_ids, np.repeat(np.arange(gh * gw // merge**2), merge**2))


@settings(max_examples=150, deadline=None)
@given(packed=packed_grids())
def test_cu_seqlens_properties(packed):
    grids, merge = packed
    cu = vision_cu_seqlens(grids, merge)
    assert cu.dtype == torch.int32
    assert cu.shape == (len(grids) + 1,)  # one segment per grid (image or scale)
    assert cu[0] == 0
    assert bool((cu[1:] > cu[:-1]).all())  # strictly increasing: no empty segment
    assert cu[-1] == sum(gh * gw for gh, gw in grids)
    assert cu.tolist() == _offsets(grids).tolist()


@settings(max_examples=150, deadline=None)
@given(packed=packed_grids(), window=windows)
def test_window_permutation_properties(packed, window):
    grids, merge = packed
    perm, inverse, window_cu = window_permutation(grids, window, merge)
    n = sum(gh * gw for gh, gw in grids)
    identity = torch.arange(n)
    assert torch.equal(torch.sort(perm).values, identity)  # a permutation
    assert torch.equal(inverse[perm], identity)  # inverse o perm = identity
    assert torch.equal(perm[inverse], identity)
    x = torch.randn(n, 3)
    assert torch.equal(x[perm][inverse], x)  # restores the order exactly

    # each merge unit's patches stay contiguous and in order
    unit = merge * merge
    rows = perm.view(-1, unit)
    assert torch.equal(rows - rows[:, :1], torch.arange(unit).expand_as(rows))
    assert bool((rows[:, 0] % unit == 0).all())

    # every window segment lies in one window of one grid, and holds all of that window
    positions = patch_positions(grids, merge).numpy()
    grid_of = np.repeat(np.arange(len(grids)), [gh * gw for gh, gw in grids])
    side = window * merge  # window side in patches
    cu = window_cu.tolist()
    assert cu[0] == 0 and cu[-1] == n
    assert all(a < b for a, b in itertools.pairwise(cu))
    image_bounds = set(_offsets(grids).tolist())
    assert image_bounds <= set(cu)  # windows never span two grids
    expected_windows = sum(-(-gh // side) * -(-gw // side) for gh, gw in grids)
    assert len(cu) - 1 == expected_windows
    perm_np = perm.numpy()
    for a, b in itertools.pairwise(cu):
        idx = perm_np[a:b]
        assert len(set(grid_of[idx].tolist())) == 1
        wy, wx = positions[idx, 0] // side, positions[idx, 1] // side
        assert len(set(wy.tolist())) == 1 and len(set(wx.tolist())) == 1
        gh, gw = grids[grid_of[idx[0]]]
        full = (min(side, gh - wy[0] * side)) * (min(side, gw - wx[0] * side))
        assert b - a == full  # partial windows only at the right/bottom edges


def test_positions_match_patchify_order():
    """positions[i] is the (row, col) of patchify's patch i: encode them in the pixels."""
    rng = np.random.default_rng(0)
    images, grids = [], []
    for gh, gw in [(2, 4), (6, 2), (4, 8)]:
        img = rng.integers(0, 256, size=(gh * 16, gw * 16, 3), dtype=np.uint8)
        img[:, :, 0] = (np.arange(gh * 16) // 16)[:, None]
        img[:, :, 1] = (np.arange(gw * 16) // 16)[None, :]
        images.append(img)
        grids.append((gh, gw))
    patches, got_grids = patchify_batch(images)
    assert got_grids == grids
    # channel-major patch rows: channel c's first pixel is column c * 256
    decoded = ((patches[:, [0, 256]] * 0.5 + 0.5) * 255).round().to(torch.int64)
    assert torch.equal(decoded, patch_positions(grids))


# ----------------------------------------------------------------------------- peer parity


def _qwen_vision_utils():
    """transformers' Qwen2.5-VL position / segment / window helpers, or None (older versions)."""
    try:
        from transformers import vision_utils

        for name in ("get_vision_position_ids", "get_vision_cu_seqlens", "get_vision_window_index"):
            getattr(vision_utils, name)
    except (ImportError, AttributeError):
        return None
    return vision_utils


qwen = _qwen_vision_utils()
needs_qwen = pytest.mark.skipif(qwen is None, reason="transformers.vision_utils (5.x) missing")


@needs_qwen
@settings(max_examples=60, deadline=None)
@given(packed=packed_grids(max_units=10, max_grids=4), window=windows)
def test_parity_with_qwen2_5_vl(packed, window):
    """Same positions, cu_seqlens and window order as Qwen2.5-VL's vision tower (t = 1)."""
    grids, merge = packed
    if not grids:
        return
    patch = 16
    grid_thw = torch.tensor([(1, gh, gw) for gh, gw in grids])
    assert torch.equal(patch_positions(grids, merge), qwen.get_vision_position_ids(grid_thw, merge))
    assert torch.equal(vision_cu_seqlens(grids, merge), qwen.get_vision_cu_seqlens(grid_thw))
    # Qwen2.5-VL: window_size in pixels, window_index over merge units (its forward expands it
    # to the units' patches), empty padded windows dropped by unique_consecutive.
    unit_index, qwen_cu = qwen.get_vision_window_index(
        grid_thw, merge, window * merge * patch, patch
    )
    unit = merge * merge
    qwen_perm = (unit_index.unsqueeze(1) * unit + torch.arange(unit)).flatten()
    perm, inverse, window_cu = window_permutation(grids, window, merge)
    assert torch.equal(perm, qwen_perm)
    assert torch.equal(inverse, torch.argsort(qwen_perm))
    assert torch.equal(window_cu, qwen_cu)


# ----------------------------------------------------------------------------- native == ref


@needs_native
@settings(max_examples=200, deadline=None)
@given(packed=packed_grids(max_units=20, max_grids=8), window=windows, wide=st.booleans())
def test_native_equals_reference(packed, window, wide):
    grids, merge = packed
    dtype = torch.int64 if wide else torch.int32
    native, ref = pos_mod._native(), pos_mod
    got = native.patch_positions(grids, merge, dtype)
    want = ref.patch_positions_reference(grids, merge, dtype)
    assert got.dtype == want.dtype and torch.equal(got, want)
    got_cu, want_cu = (
        native.vision_cu_seqlens(grids, merge),
        vision_cu_seqlens_reference(grids, merge),
    )
    assert got_cu.dtype == want_cu.dtype and torch.equal(got_cu, want_cu)
    got_w = native.window_permutation(grids, window, merge)
    want_w = window_permutation_reference(grids, window, merge)
    for g, w in zip(got_w, want_w, strict=True):
        assert g.dtype == w.dtype and torch.equal(g, w)


@needs_native
def test_native_large_window_and_grid():
    grids = [(200, 160), (2, 2)]
    for window in (1, 3, 4, 7, 100, 2**31 - 1):
        for g, w in zip(
            window_permutation(grids, window),
            window_permutation_reference(grids, window),
            strict=True,
        ):
            assert torch.equal(g, w)


def test_fallback_to_reference_without_native(monkeypatch):
    monkeypatch.setattr(pos_mod, "_C", None)
    assert pos_mod._native() is None
    assert torch.equal(patch_positions([(4, 6)]), patch_positions_reference([(4, 6)]))
    assert vision_cu_seqlens([(4, 6)]).tolist() == [0, 24]
    assert window_permutation([(4, 6)], 2)[2].tolist() == [0, 16, 24]


def test_grids_as_tensor_or_array():
    grids = [(4, 6), (2, 2)]
    for as_array in (torch.tensor(grids), np.array(grids)):
        assert torch.equal(patch_positions(as_array), patch_positions(grids))
        assert torch.equal(vision_cu_seqlens(as_array), vision_cu_seqlens(grids))


# ----------------------------------------------------------------------------- bad inputs

OPS = {
    "patch_positions": lambda grids, merge=2, **kw: patch_positions(grids, merge),
    "vision_cu_seqlens": lambda grids, merge=2, **kw: vision_cu_seqlens(grids, merge),
    "window_permutation": lambda grids, merge=2, window=2: window_permutation(grids, window, merge),
}
BAD_GRIDS = [
    ([(3, 4)], r"grid 0 \(3, 4\) is not a multiple of merge=2"),
    ([(2, 2), (4, 5)], r"grid 1 \(4, 5\) is not a multiple of merge=2"),
    ([(0, 4)], r"grid 0 sides must be integers in \[1, 2147483647\], got \(0, 4\)"),
    ([(4, -2)], r"grid 0 sides must be integers in \[1, 2147483647\], got \(4, -2\)"),
    ([(2**31, 2)], r"grid 0 sides must be integers"),
    ([(2.0, 2)], "grid 0 must be a pair"),
    ([(True, 2)], "grid 0 must be a pair"),
    ([(2, 2, 2)], "grid 0 must be a pair"),
    ([2], "grid 0 must be a pair"),
    ([(46342, 46342)], "more than 2147483647 patches in total"),
]


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize(("grids", "match"), BAD_GRIDS)
@pytest.mark.parametrize("op", sorted(OPS))
def test_bad_grids_raise(op, grids, match, native, monkeypatch):
    if not native:
        monkeypatch.setattr(pos_mod, "_C", None)
    with pytest.raises(ValueError, match=f"^{op}: {match}"):
        OPS[op](grids)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("bad", [0, -1, 2**31, 1.5, True, None])
@pytest.mark.parametrize("op", sorted(OPS))
def test_bad_merge_raises(op, bad, native, monkeypatch):
    if not native:
        monkeypatch.setattr(pos_mod, "_C", None)
    with pytest.raises(ValueError, match=rf"^{op}: merge must be an integer in \[1, 2147483647\]"):
        OPS[op]([(2, 2)], merge=bad)


@pytest.mark.parametrize("bad", [0, -3, 2**31, 2.0, False, "4"])
def test_bad_window_raises(bad):
    match = r"^window_permutation: window must be an integer in \[1, 2147483647\]"
    for fn in (window_permutation, window_permutation_reference):
        with pytest.raises(ValueError, match=match):
            fn([(2, 2)], bad)


def test_bad_dtype_raises():
    for fn in (patch_positions, patch_positions_reference):
        with pytest.raises(ValueError, match=r"dtype must be torch\.int32 or torch\.int64"):
            fn([(2, 2)], dtype=torch.float32)


def _error(fn, *args) -> str | None:
    """The ValueError message of fn(*args), None when it returns."""
    try:
        fn(*args)
    except ValueError as exc:
        return str(exc)
    return None


@needs_native
@pytest.mark.parametrize(
    ("grids", "merge", "window"),
    [
        ([(3, 4)], 2, 2),
        ([(2, 2), (4, 5)], 2, 2),
        ([(0, 4)], 2, 2),
        ([(4, -2)], 2, 2),
        ([(2**31, 2)], 2, 2),
        ([(46342, 46342)], 2, 2),
        ([(2, 2)], 0, 2),
        ([(2, 2)], -1, 2),
        ([(2, 2)], 2**31, 2),
        ([(2, 2)], 2, 0),
        ([(2, 2)], 2, -5),
        ([(2, 2)], 2, 2**31),
    ],
)
def test_native_errors_equal_reference_errors(grids, merge, window):
    """The C++ checks (direct calls) raise ValueError with the Python front's exact message."""
    native = pos_mod._native()
    pairs = [
        (lambda: native.patch_positions(grids, merge, torch.int64), patch_positions_reference),
        (lambda: native.vision_cu_seqlens(grids, merge), vision_cu_seqlens_reference),
    ]
    for call_native, ref in pairs:  # window-only cases: no error from these two
        assert _error(call_native) == _error(ref, grids, merge)
    want = _error(window_permutation_reference, grids, window, merge)
    assert want is not None
    assert _error(lambda: native.window_permutation(grids, window, merge)) == want


def test_native_extension_built_in_ci():
    if os.environ.get("CI"):
        assert pos_mod._native() is not None, "megatron_navil._C lacks the positions ops"
    elif pos_mod._native() is None:
        pytest.skip("native extension not built")


def test_int32_limit_constant():
    assert INT32_MAX == torch.iinfo(torch.int32).max
