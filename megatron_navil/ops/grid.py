"""Patch-grid arithmetic for variable-resolution images.

``merged_grid`` dispatches to the compiled ``megatron_navil._C`` when it is built and to the
pure-Python ``merged_grid_reference`` otherwise; both give the same results and the same
ValueError messages (inputs are validated here, before either path runs).
"""

from __future__ import annotations

import operator

# The compiled csrc ops; absent when built with MEGATRON_NAVIL_SKIP_EXT=1. torch is imported
# first because the extension links against libtorch/libc10 and needs them loaded.
_C_IMPORT_ERROR: str | None = None
try:
    import torch  # noqa: F401

    from megatron_navil import _C
except ImportError as exc:
    _C = None
    _C_IMPORT_ERROR = f"{type(exc).__name__}: {exc}"

_INT64_MAX = 2**63 - 1


def native_available() -> bool:
    """Whether the compiled C++ extension ``megatron_navil._C`` was importable."""
    return _C is not None


def native_import_error() -> str | None:
    """Why ``megatron_navil._C`` could not be imported (None when it was)."""
    return _C_IMPORT_ERROR


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"merged_grid: {name} must be a positive integer, got {value!r}")
    try:
        as_int = operator.index(value)  # accepts int and numpy integers, rejects floats
    except TypeError:
        raise ValueError(f"merged_grid: {name} must be a positive integer, got {value!r}") from None
    if as_int <= 0:
        raise ValueError(f"merged_grid: {name} must be a positive integer, got {as_int}")
    if as_int > _INT64_MAX:
        raise ValueError(f"merged_grid: {name} must fit in int64, got {as_int}")
    return as_int


def _validate(height: int, width: int, patch: int, merge: int) -> tuple[int, int, int, int]:
    height = _positive_int("height", height)
    width = _positive_int("width", width)
    patch = _positive_int("patch", patch)
    merge = _positive_int("merge", merge)
    if patch * merge > _INT64_MAX:
        raise ValueError(
            f"merged_grid: patch * merge overflows int64 (patch={patch}, merge={merge})"
        )
    return height, width, patch, merge


def merged_grid_reference(
    height: int, width: int, patch: int = 16, merge: int = 2
) -> tuple[int, int]:
    """Pure-Python reference of :func:`merged_grid`."""
    height, width, patch, merge = _validate(height, width, patch, merge)
    unit = patch * merge
    counts = []
    for name, side in (("height", height), ("width", width)):
        count = -(-side // unit) * merge  # ceil(side / unit) * merge
        if count > _INT64_MAX:  # same limit as the int64 C++ op
            raise ValueError(
                f"merged_grid: padded {name} patch count overflows int64 ({name}={side})"
            )
        counts.append(count)
    return counts[0], counts[1]


def merged_grid(height: int, width: int, patch: int = 16, merge: int = 2) -> tuple[int, int]:
    """Patch grid ``(h_patches, w_patches)`` of a ``height x width`` image.

    The image is zero-padded on each side up to a multiple of ``patch * merge`` (``merge x
    merge`` patches become one token after pixel shuffle), so each count is
    ``ceil(side / (patch * merge)) * merge``. Example: ``merged_grid(100, 33) == (8, 4)``.

    Raises:
        ValueError: an argument is not a positive integer, or an argument or result does not
            fit in int64 (the C++ op's integer type).
    """
    height, width, patch, merge = _validate(height, width, patch, merge)
    if _C is None:
        return merged_grid_reference(height, width, patch, merge)
    return tuple(_C.merged_grid(height, width, patch, merge))
