"""megatron_navil.ops.grid: native merged_grid == pure-Python reference, and input checks."""

from __future__ import annotations

import math
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_navil.ops import grid
from megatron_navil.ops.grid import merged_grid, merged_grid_reference, native_available

needs_native = pytest.mark.skipif(not native_available(), reason="native extension not built")

sides = st.integers(min_value=1, max_value=100_000)
patches = st.integers(min_value=1, max_value=64)
merges = st.integers(min_value=1, max_value=8)
# Near the int64 limit, where a naive (side + unit - 1) // unit in C++ would overflow.
huge = st.integers(min_value=2**62, max_value=2**63 - 1)


def _expected(side: int, patch: int, merge: int) -> int:
    # Independent of the reference's integer arithmetic; float division is exact at these sizes.
    return math.ceil(side / (patch * merge)) * merge


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((448, 448), (28, 28)),  # exact multiple of 32
        ((100, 33), (8, 4)),
        ((1, 1), (2, 2)),  # a 1-pixel image still takes one merged token
        ((32, 33, 16, 2), (2, 4)),
        ((224, 224, 14, 2), (16, 16)),
        ((10, 10, 14, 1), (1, 1)),
        ((1000, 7, 14, 4), (72, 4)),
    ],
)
def test_known_values(args, expected):
    assert merged_grid_reference(*args) == expected
    assert merged_grid(*args) == expected


@settings(max_examples=300, deadline=None)
@given(height=sides, width=sides, patch=patches, merge=merges)
def test_reference_properties(height, width, patch, merge):
    h, w = merged_grid_reference(height, width, patch, merge)
    unit = patch * merge
    for side, n in ((height, h), (width, w)):
        assert n % merge == 0
        assert n == _expected(side, patch, merge)
        # padded side covers the image and pads by less than one merged unit
        assert side <= n * patch < side + unit


@needs_native
@settings(max_examples=500, deadline=None)
@given(height=sides, width=sides, patch=patches, merge=merges)
def test_native_equals_reference(height, width, patch, merge):
    expected = merged_grid_reference(height, width, patch, merge)
    assert merged_grid(height, width, patch, merge) == expected
    assert tuple(grid._C.merged_grid(height, width, patch, merge)) == expected


def _outcome(fn, *args):
    try:
        return tuple(fn(*args))
    except ValueError as exc:
        return ("ValueError", str(exc))


@pytest.mark.slow
@needs_native
@settings(max_examples=300, deadline=None)
@given(height=huge, width=huge, patch=patches, merge=merges)
def test_native_equals_reference_near_int64_max(height, width, patch, merge):
    """Same result, or the same overflow ValueError, where int64 arithmetic runs out."""
    args = (height, width, patch, merge)
    assert _outcome(grid._C.merged_grid, *args) == _outcome(merged_grid_reference, *args)


@pytest.mark.parametrize("fn", [merged_grid, merged_grid_reference])
def test_result_overflow_raises(fn):
    with pytest.raises(ValueError, match="padded width patch count overflows"):
        fn(10, 2**63 - 3, 1, 4)
    assert fn(10, 2**63 - 4, 1, 4) == (12, 2**63 - 4)


@needs_native
def test_native_defaults_match_reference():
    assert tuple(grid._C.merged_grid(500, 300)) == merged_grid_reference(500, 300)


def test_fallback_to_reference_without_native(monkeypatch):
    monkeypatch.setattr(grid, "_C", None)
    assert not grid.native_available()
    assert merged_grid(100, 33) == (8, 4)


BAD_VALUES = [0, -1, -(2**40), 1.5, 2.0, True, "3", None, 2**63]


@pytest.mark.parametrize("position", range(4))
@pytest.mark.parametrize("bad", BAD_VALUES)
@pytest.mark.parametrize("fn", [merged_grid, merged_grid_reference])
def test_bad_inputs_raise_value_error(fn, bad, position):
    args = [64, 64, 16, 2]
    args[position] = bad
    name = ("height", "width", "patch", "merge")[position]
    with pytest.raises(ValueError, match=name):
        fn(*args)


@pytest.mark.parametrize("fn", [merged_grid, merged_grid_reference])
def test_patch_times_merge_overflow_raises(fn):
    with pytest.raises(ValueError, match="overflows"):
        fn(10, 10, 2**62, 4)


@needs_native
@pytest.mark.parametrize("position", range(4))
@pytest.mark.parametrize("bad", [0, -1, -(2**63)])
def test_native_bad_inputs_raise_value_error(bad, position):
    """The C++ std::invalid_argument must surface as ValueError (pybind11 translation)."""
    args = [64, 64, 16, 2]
    args[position] = bad
    name = ("height", "width", "patch", "merge")[position]
    with pytest.raises(ValueError, match=f"{name} must be a positive integer"):
        grid._C.merged_grid(*args)


@needs_native
def test_native_overflow_raises_value_error():
    with pytest.raises(ValueError, match="overflows"):
        grid._C.merged_grid(10, 10, 2**62, 4)


def test_native_extension_built_in_ci():
    if os.environ.get("CI"):
        assert native_available(), f"megatron_navil._C not importable: {grid.native_import_error()}"
    elif not native_available():
        pytest.skip("native extension not built")
