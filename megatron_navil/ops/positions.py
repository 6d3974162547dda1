"""2D RoPE positions, vision-encoder segments and the window permutation of packed patches.

Layouts (``n = sum_i gh_i * gw_i``; one grid per image *scale*, in packing order, as
``patchify_batch`` returns them):
  grids        [(gh, gw), ...] patch grids; both sides multiples of ``merge``
  positions    [n, 2] int64 (or int32): ``(row, col)`` of each patch inside its grid, in
               patchify's order: ``merge x merge`` units in raster order, row-major inside a unit
  cu_seqlens   [len(grids) + 1] int32: ``0, n_0, n_0 + n_1, ...``; the vision encoder attends
               within each segment only (one per image and per scale, NAVIL.md "Architecture")
  perm         [n] int64: window order -> packed index, ``x_window = x[perm]``
  inverse      [n] int64: packed index -> window order, ``x = x_window[inverse]``
  window_cu    [num_windows + 1] int32: one segment per window of the window order

Windows (the released NaViL code's token order, Qwen2.5-VL's window index): ``window x window``
merge units tiled from the top-left of each grid, partial at the right and bottom edges, in
raster order; inside a window the units stay in raster order and each unit's ``merge * merge``
patches stay contiguous, so the 2x2 pixel shuffle after the encoder still sees whole units.
Windows never span two grids. The released models run their vision encoder on the patches in
this order and never restore raster order (../shared/NAVIL.md, "The released code's exact
behaviour", 1); :func:`vision_kwargs` gives the model what it needs for that.

Each op runs the compiled ``megatron_navil._C`` (csrc/positions.cpp: per-patch loops, which run
in data-loader workers) when built and the pure-PyTorch ``*_reference`` otherwise; the results
are equal exactly (tests/unit/test_ops_positions.py). Inputs are validated here, before either
path runs, so both raise the same ValueError messages.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from megatron_navil.ops.grid import _C
from megatron_navil.ops.resize import MAX_IMAGE_SIDE

Grid = tuple[int, int]
GridsLike = Sequence[Sequence[int]] | np.ndarray | torch.Tensor

INT32_MAX = 2**31 - 1
_POSITION_DTYPES = (torch.int32, torch.int64)


def _native():
    """The compiled module when it is built and has these ops (a stale build may not)."""
    return _C if _C is not None and hasattr(_C, "window_permutation") else None


def _as_int(value: object) -> int | None:
    """``value`` as a Python int (int or numpy integer), None for anything else (bool too)."""
    if isinstance(value, bool):
        return None
    try:
        return operator.index(value)
    except TypeError:
        return None


def _param(op: str, name: str, value: object) -> int:
    as_int = _as_int(value)
    shown = value if as_int is None else as_int
    if as_int is None or not 1 <= as_int <= MAX_IMAGE_SIDE:
        raise ValueError(f"{op}: {name} must be an integer in [1, {MAX_IMAGE_SIDE}], got {shown!r}")
    return as_int


def _grids(op: str, grids: GridsLike, merge: int) -> list[Grid]:
    """Validated grids as a list of int pairs (same checks and messages as csrc/positions.cpp)."""
    merge = _param(op, "merge", merge)
    if isinstance(grids, (np.ndarray, torch.Tensor)):
        grids = grids.tolist()
    out: list[Grid] = []
    total = 0
    for k, grid in enumerate(grids):
        try:
            gh, gw = (_as_int(v) for v in grid)
        except (TypeError, ValueError):
            gh = gw = None
        if gh is None or gw is None:
            raise ValueError(
                f"{op}: grid {k} must be a pair (gh, gw) of integers in patches, got {grid!r}"
            )
        pair = f"({gh}, {gw})"
        if not (1 <= gh <= MAX_IMAGE_SIDE and 1 <= gw <= MAX_IMAGE_SIDE):
            raise ValueError(
                f"{op}: grid {k} sides must be integers in [1, {MAX_IMAGE_SIDE}], got {pair}"
            )
        if gh % merge or gw % merge:
            raise ValueError(
                f"{op}: grid {k} {pair} is not a multiple of merge={merge} "
                "(patchify grids are whole merge units)"
            )
        total += gh * gw
        if total > INT32_MAX:
            raise ValueError(
                f"{op}: more than {INT32_MAX} patches in total (cu_seqlens are int32): "
                f"{total} after grid {k}"
            )
        out.append((gh, gw))
    return out


def _dtype(dtype: torch.dtype) -> torch.dtype:
    if dtype not in _POSITION_DTYPES:
        raise ValueError(f"patch_positions: dtype must be torch.int32 or torch.int64, got {dtype}")
    return dtype


# ----------------------------------------------------------------------------- references


def _positions_one(gh: int, gw: int, merge: int) -> torch.Tensor:
    # Qwen2-VL's rot_pos_emb construction: raster ids reshaped into merge units.
    shape = (gh // merge, merge, gw // merge, merge)
    rows = torch.arange(gh).unsqueeze(1).expand(gh, gw).reshape(shape).permute(0, 2, 1, 3)
    cols = torch.arange(gw).unsqueeze(0).expand(gh, gw).reshape(shape).permute(0, 2, 1, 3)
    return torch.stack([rows.flatten(), cols.flatten()], dim=-1)


def patch_positions_reference(
    grids: GridsLike, merge: int = 2, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`patch_positions`."""
    dtype = _dtype(dtype)
    grid_list = _grids("patch_positions", grids, merge)
    parts = [_positions_one(gh, gw, merge) for gh, gw in grid_list]
    if not parts:
        return torch.empty((0, 2), dtype=dtype)
    return torch.cat(parts).to(dtype)


def vision_cu_seqlens_reference(grids: GridsLike, merge: int = 2) -> torch.Tensor:
    """Pure-PyTorch reference of :func:`vision_cu_seqlens`."""
    grid_list = _grids("vision_cu_seqlens", grids, merge)
    counts = torch.tensor([0] + [gh * gw for gh, gw in grid_list], dtype=torch.int64)
    return counts.cumsum(0).to(torch.int32)


def window_permutation_reference(
    grids: GridsLike, window: int, merge: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pure-PyTorch reference of :func:`window_permutation` (Qwen2.5-VL's get_window_index)."""
    window = _param("window_permutation", "window", window)
    grid_list = _grids("window_permutation", grids, merge)
    unit = merge * merge
    perms: list[torch.Tensor] = []
    counts: list[torch.Tensor] = [torch.zeros(1, dtype=torch.int64)]
    base = 0
    for gh, gw in grid_list:
        uh, uw = gh // merge, gw // merge
        win = min(window, max(uh, uw))  # a larger window gives the same tiling
        ids = torch.arange(uh * uw).reshape(uh, uw)
        padded = F.pad(ids, (0, (-uw) % win, 0, (-uh) % win), value=-1)
        nh, nw = padded.shape[0] // win, padded.shape[1] // win
        tiles = padded.reshape(nh, win, nw, win).permute(0, 2, 1, 3).reshape(nh * nw, win * win)
        units = tiles[tiles >= 0]  # row-major: windows in raster order, units inside in raster
        perms.append(base + (units.unsqueeze(1) * unit + torch.arange(unit)).flatten())
        counts.append((tiles >= 0).sum(dim=1) * unit)
        base += gh * gw
    perm = torch.cat(perms) if perms else torch.empty(0, dtype=torch.int64)
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(perm.numel())
    window_cu = torch.cat(counts).cumsum(0).to(torch.int32)
    return perm, inverse, window_cu


# ----------------------------------------------------------------------------- public ops


def patch_positions(
    grids: GridsLike, merge: int = 2, dtype: torch.dtype = torch.int64
) -> torch.Tensor:
    """2D RoPE positions ``[n, 2]`` = ``(row, col)`` of every packed patch (see module doc).

    ``row`` in ``[0, gh)`` and ``col`` in ``[0, gw)`` of the patch's own grid, in the order
    ``patchify`` emits patches, so ``positions[i]`` belongs to ``patches[i]``. Example:
    ``patch_positions([(2, 4)])`` is ``[[0,0],[0,1],[1,0],[1,1],[0,2],[0,3],[1,2],[1,3]]``.

    Raises:
        ValueError: ``merge`` not an integer in [1, 2**31 - 1]; a grid not a pair of integers
            in [1, 2**31 - 1], or not a multiple of ``merge``; more than 2**31 - 1 patches in
            total; ``dtype`` not int32 / int64.
    """
    dtype = _dtype(dtype)
    grid_list = _grids("patch_positions", grids, merge)
    native = _native()
    if native is None:
        return patch_positions_reference(grid_list, merge, dtype)
    return native.patch_positions(grid_list, merge, dtype)


def vision_cu_seqlens(grids: GridsLike, merge: int = 2) -> torch.Tensor:
    """int32 ``cu_seqlens [len(grids) + 1]`` of the packed patches, one segment per grid.

    Pass one grid per image and per scale (VMP scales are separate grids), so the vision
    encoder's varlen attention never mixes two images or two scales. ``merge`` is only used to
    validate the grids. An empty list gives ``[0]``.

    Raises:
        ValueError: as :func:`patch_positions` (without ``dtype``).
    """
    grid_list = _grids("vision_cu_seqlens", grids, merge)
    native = _native()
    if native is None:
        return vision_cu_seqlens_reference(grid_list, merge)
    return native.vision_cu_seqlens(grid_list, merge)


def window_permutation(
    grids: GridsLike, window: int, merge: int = 2
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Window order of the packed patches: ``(perm, inverse, window_cu_seqlens)``.

    ``window`` is the window side in merge units (NaViL's released code: 4, i.e. 128 pixels;
    ``VisionConfig.window``). ``x[perm]`` groups each window's patches contiguously (segments
    ``window_cu_seqlens``, int32), ``x_window[inverse]`` restores the packed order exactly;
    ``perm`` and ``inverse`` are int64 ``[n]``. See the module doc for the window tiling.

    Raises:
        ValueError: ``window`` not an integer in [1, 2**31 - 1]; otherwise as
            :func:`patch_positions`.
    """
    window = _param("window_permutation", "window", window)
    grid_list = _grids("window_permutation", grids, merge)
    native = _native()
    if native is None:
        return window_permutation_reference(grid_list, window, merge)
    perm, inverse, window_cu = native.window_permutation(grid_list, window, merge)
    return perm, inverse, window_cu


def vision_kwargs(
    grids: GridsLike, merge: int = 2, window: int | None = None
) -> dict[str, torch.Tensor]:
    """The vision inputs of ``NaViLModel.forward`` for packed patch ``grids`` (one per image
    scale, in packing order), besides the patches themselves:

    * ``patch_positions`` ``[n, 2]`` int64 and ``vision_cu_seqlens`` int32 (one segment per
      grid);
    * with ``window`` (the window side in merge units, ``VisionConfig.window_units``):
      ``vision_window_index`` ``[n]`` int64 (the encoder runs on ``x[index]``: the released
      code's window order) and ``vision_window_cu_seqlens`` int32 (one segment per window,
      for the blocks that attend within windows).

    The single place that turns grids into these tensors (data loader, captioning, tests).

    Raises:
        ValueError: as :func:`window_permutation`.
    """
    out = {
        "patch_positions": patch_positions(grids, merge),
        "vision_cu_seqlens": vision_cu_seqlens(grids, merge),
    }
    if window is not None:
        perm, _, window_cu = window_permutation(grids, window, merge)
        out["vision_window_index"] = perm
        out["vision_window_cu_seqlens"] = window_cu
    return out
