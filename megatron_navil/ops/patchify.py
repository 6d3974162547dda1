"""uint8 RGB images -> normalised ViT patches in merge-unit order (``patchify``).

Layouts:
  image    [H, W, 3] uint8, channels last (numpy array or CPU torch tensor)
  patches  [n, 3 * patch * patch] float32 or bfloat16, n = gh * gw (``patches_nd``)
  grid     (gh, gw) = merged_grid(H, W, patch, merge) patches; the padded image is
           (gh * patch) x (gw * patch)
  packed   patchify_batch: [sum_i n_i, 3 * patch * patch], images in input order

Steps (NaViL, ../shared/NAVIL.md "Images"): zero-pad bottom/right to a multiple of
``patch * merge``; ``v = (x / 255 - mean) / std`` per channel (the padding goes through the
same formula: ``-mean / std``, i.e. -1 for mean = std = 0.5); cut into patches.
Patch order: ``merge x merge`` units in raster order over the padded image, the patches of a
unit row-major inside it; each patch flattened channel-major ``[C, ph, pw]``. That is Qwen2-VL's
``pixel_values`` layout with ``temporal_patch_size=1`` (its flattening is
``[C, temporal, ph, pw]``), which the vision encoder's patch embedding and 2x2 pixel shuffle
expect. Resampling (``smart_resize``) happens before, in the data pipeline.

``patchify`` / ``patchify_batch`` run the compiled ``megatron_navil._C`` op when built and the
pure-PyTorch ``*_reference`` otherwise; the two are bitwise equal (tests/unit/
test_ops_patchify.py): both compute ``s = float32(float64(x) * float64(1/255))`` then
``(s - float32(mean)) / float32(std)`` in float32, one rounding per step (the C++ is built with
``-ffp-contract=off``); bfloat16 output is that float32 value rounded to nearest even. The
scaling is transformers' (``rescale`` upcasts to float64), so float32 output also equals
``Qwen2VLImageProcessorPil``'s ``pixel_values`` bitwise for images it does not resample.
Inputs are validated here, before either path runs, so both raise the same ValueError messages.

The native op has two CPU kernels with identical results: on x86-64 CPUs with AVX2 and FMA it
computes the values 8 at a time in vector registers (chosen at run time, and only after checking
that it reproduces the portable kernel's per-channel table of all 256 values bit for bit); the
portable kernel looks each value up in that table. ``MEGATRON_NAVIL_PATCHIFY_PORTABLE=1`` forces
the portable one; ``megatron_navil._C._patchify_kernel(mean, std, dtype)`` says which runs.

Note: ``megatron_navil.ops.patchify`` (attribute of the package) is the function; import this
module with ``importlib.import_module("megatron_navil.ops.patchify")`` when you need it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import numpy as np
import torch

from megatron_navil.ops.grid import _C, merged_grid_reference
from megatron_navil.ops.resize import MAX_IMAGE_SIDE

ImageU8 = np.ndarray | torch.Tensor  # [H, W, 3] uint8
Grid = tuple[int, int]

CHANNELS = 3
NAVIL_MEAN = (0.5, 0.5, 0.5)
NAVIL_STD = (0.5, 0.5, 0.5)
_INT64_MAX = 2**63 - 1
_DTYPES = (torch.float32, torch.bfloat16)


def _native():
    """The compiled module when it is built and has this op (a stale build may not)."""
    return _C if _C is not None and hasattr(_C, "patchify_batch") else None


def _int(name: str, value: object) -> int:
    msg = f"patchify: {name} must be an integer in [1, {MAX_IMAGE_SIDE}], got {value!r}"
    if isinstance(value, bool):
        raise ValueError(msg)
    try:
        as_int = operator.index(value)
    except TypeError:
        raise ValueError(msg) from None
    if not 1 <= as_int <= MAX_IMAGE_SIDE:
        raise ValueError(msg)
    return as_int


def _channel_values(name: str, values: object, positive: bool) -> tuple[float, float, float]:
    what = "finite positive numbers" if positive else "finite numbers"
    msg = f"patchify: {name} must be 3 {what} (one per RGB channel), got {values!r}"
    try:
        out = tuple(float(v) for v in values)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        raise ValueError(msg) from None
    if len(out) != CHANNELS or not all(math.isfinite(v) and (v > 0 or not positive) for v in out):
        raise ValueError(msg)
    return out  # type: ignore[return-value]


def _params(
    patch: int, merge: int, mean: Sequence[float], std: Sequence[float], dtype: torch.dtype
) -> tuple[int, int, tuple[float, ...], tuple[float, ...], torch.dtype]:
    patch = _int("patch", patch)
    merge = _int("merge", merge)
    if CHANNELS * patch * patch > _INT64_MAX:
        raise ValueError(f"patchify: patch {patch} is too large")
    mean = _channel_values("mean", mean, positive=False)
    std = _channel_values("std", std, positive=True)
    if dtype not in _DTYPES:
        raise ValueError(f"patchify: dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    return patch, merge, mean, std, dtype


def _image(image: object, where: str) -> torch.Tensor:
    """The image as a contiguous CPU uint8 [H, W, 3] tensor (no copy when it already is one)."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"{where}: image must be uint8, got {image.dtype}")
        shape = tuple(image.shape)
    elif isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8:
            raise ValueError(f"{where}: image must be uint8, got {image.dtype}")
        if image.device.type != "cpu":
            raise ValueError(f"{where}: image must be on the CPU, got device {image.device}")
        shape = tuple(image.shape)
    else:
        raise ValueError(
            f"{where}: image must be a numpy array or torch tensor of uint8 [H, W, 3], got "
            f"{type(image).__name__}"
        )
    if len(shape) != 3 or shape[2] != CHANNELS:
        raise ValueError(
            f"{where}: image must have shape [H, W, 3] (RGB, channels last), got shape {shape}"
        )
    if shape[0] == 0 or shape[1] == 0:
        raise ValueError(f"{where}: image is empty, got shape {shape}")
    if shape[0] > MAX_IMAGE_SIDE or shape[1] > MAX_IMAGE_SIDE:
        raise ValueError(
            f"{where}: image sides must be at most {MAX_IMAGE_SIDE}, got shape {shape}"
        )
    if isinstance(image, np.ndarray):
        array = np.ascontiguousarray(image)
        if not array.flags.writeable:  # torch.from_numpy warns on read-only arrays
            array = array.copy()
        return torch.from_numpy(array)
    return image.contiguous()


def _check_sizes(images: list[torch.Tensor], patch: int, merge: int, where: list[str]) -> None:
    total = 0
    dim = CHANNELS * patch * patch
    for img, name in zip(images, where, strict=True):
        gh, gw = merged_grid_reference(img.shape[0], img.shape[1], patch, merge)
        total += gh * gw
        if gh * gw > _INT64_MAX or total * dim > _INT64_MAX:
            raise ValueError(f"{name}: output of {gh}x{gw} patches overflows int64")


def _reference_one(
    image: torch.Tensor,
    patch: int,
    merge: int,
    mean: tuple[float, ...],
    std: tuple[float, ...],
    dtype: torch.dtype,
) -> tuple[torch.Tensor, Grid]:
    height, width, _ = image.shape
    gh, gw = merged_grid_reference(height, width, patch, merge)
    padded_hwc = image.new_zeros((gh * patch, gw * patch, CHANNELS))
    padded_hwc[:height, :width] = image
    mean_c = torch.tensor(mean, dtype=torch.float32)
    std_c = torch.tensor(std, dtype=torch.float32)
    # x / 255 as float64(x) * float64(1 / 255) rounded once to float32 (transformers' rescale),
    # then subtraction and division in float32: the C++ kernels do the same steps.
    scaled_hwc = (padded_hwc.to(torch.float64) * (1.0 / 255.0)).to(torch.float32)
    values_hwc = (scaled_hwc - mean_c) / std_c
    # [units_h, merge, patch, units_w, merge, patch, C] -> [units_h, units_w, my, mx, C, ph, pw]
    units = values_hwc.reshape(gh // merge, merge, patch, gw // merge, merge, patch, CHANNELS)
    patches_nd = units.permute(0, 3, 1, 4, 6, 2, 5).reshape(gh * gw, CHANNELS * patch * patch)
    return patches_nd.to(dtype), (gh, gw)


def patchify_reference(
    image: ImageU8,
    patch: int = 16,
    merge: int = 2,
    mean: Sequence[float] = NAVIL_MEAN,
    std: Sequence[float] = NAVIL_STD,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, Grid]:
    """Pure-PyTorch reference of :func:`patchify` (same arguments, same result bitwise)."""
    patch, merge, mean, std, dtype = _params(patch, merge, mean, std, dtype)
    img = _image(image, "patchify")
    _check_sizes([img], patch, merge, ["patchify"])
    return _reference_one(img, patch, merge, mean, std, dtype)


def patchify_batch_reference(
    images: Sequence[ImageU8],
    patch: int = 16,
    merge: int = 2,
    mean: Sequence[float] = NAVIL_MEAN,
    std: Sequence[float] = NAVIL_STD,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[Grid]]:
    """Pure-PyTorch reference of :func:`patchify_batch`."""
    patch, merge, mean, std, dtype = _params(patch, merge, mean, std, dtype)
    where = [f"patchify_batch: image {k}" for k in range(len(images))]
    imgs = [_image(img, name) for img, name in zip(images, where, strict=True)]
    _check_sizes(imgs, patch, merge, where)
    outs = [_reference_one(img, patch, merge, mean, std, dtype) for img in imgs]
    if not outs:
        return torch.empty((0, CHANNELS * patch * patch), dtype=dtype), []
    return torch.cat([p for p, _ in outs]), [g for _, g in outs]


def patchify(
    image: ImageU8,
    patch: int = 16,
    merge: int = 2,
    mean: Sequence[float] = NAVIL_MEAN,
    std: Sequence[float] = NAVIL_STD,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, Grid]:
    """Pad, normalise and cut one uint8 ``[H, W, 3]`` image into patches (see module doc).

    Returns ``(patches [gh * gw, 3 * patch * patch], (gh, gw))`` with patches in merge-unit
    order; ``(gh, gw) == merged_grid(H, W, patch, merge)``. The image should already have its
    target size (``smart_resize``); it is never resampled here. Non-contiguous inputs are
    copied to contiguous memory first.

    Raises:
        ValueError: the image is not a numpy array / CPU tensor of uint8 with shape
            ``[H, W, 3]``, is empty, or has a side above 2**31 - 1; ``patch`` / ``merge`` not an
            integer in [1, 2**31 - 1]; ``mean`` / ``std`` not 3 finite numbers (``std`` > 0);
            ``dtype`` not float32 / bfloat16.
    """
    patch, merge, mean, std, dtype = _params(patch, merge, mean, std, dtype)
    img = _image(image, "patchify")
    _check_sizes([img], patch, merge, ["patchify"])
    native = _native()
    if native is None:
        return _reference_one(img, patch, merge, mean, std, dtype)
    patches_nd, (gh, gw) = native.patchify(img, patch, merge, list(mean), list(std), dtype)
    return patches_nd, (int(gh), int(gw))


def patchify_batch(
    images: Sequence[ImageU8],
    patch: int = 16,
    merge: int = 2,
    mean: Sequence[float] = NAVIL_MEAN,
    std: Sequence[float] = NAVIL_STD,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, list[Grid]]:
    """:func:`patchify` over many images into one packed tensor (the vision encoder's input).

    Returns ``(packed [sum_i gh_i * gw_i, 3 * patch * patch], [(gh_i, gw_i), ...])``, image
    ``i``'s patches at rows ``sum_{j<i} n_j`` onwards. An empty list gives a
    ``[0, 3 * patch * patch]`` tensor and ``[]``. The native op fills the output in one
    parallel pass (no per-image tensors and no concatenation).

    Raises:
        ValueError: as :func:`patchify`, the message naming the bad image's index.
    """
    patch, merge, mean, std, dtype = _params(patch, merge, mean, std, dtype)
    where = [f"patchify_batch: image {k}" for k in range(len(images))]
    imgs = [_image(img, name) for img, name in zip(images, where, strict=True)]
    _check_sizes(imgs, patch, merge, where)
    native = _native()
    if native is None:
        outs = [_reference_one(img, patch, merge, mean, std, dtype) for img in imgs]
        if not outs:
            return torch.empty((0, CHANNELS * patch * patch), dtype=dtype), []
        return torch.cat([p for p, _ in outs]), [g for _, g in outs]
    packed, grids = native.patchify_batch(imgs, patch, merge, list(mean), list(std), dtype)
    return packed, [(int(gh), int(gw)) for gh, gw in grids]


@torch.library.custom_op("megatron_navil::patchify", mutates_args=())
def patchify_op(
    image: torch.Tensor,
    patch: int,
    merge: int,
    mean: list[float],
    std: list[float],
    dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`patchify` as a ``torch.library`` op (``torch.ops.megatron_navil.patchify``): the
    patches only, so it composes with ``torch.compile`` (its fake implementation derives the
    output shape from the image shape; the grid is ``merged_grid(H, W, patch, merge)``)."""
    return patchify(image, patch, merge, mean, std, dtype)[0]


@patchify_op.register_fake
def _patchify_fake(
    image: torch.Tensor,
    patch: int,
    merge: int,
    mean: list[float],
    std: list[float],
    dtype: torch.dtype,
) -> torch.Tensor:
    gh, gw = merged_grid_reference(image.shape[0], image.shape[1], patch, merge)
    return image.new_empty((gh * gw, CHANNELS * patch * patch), dtype=dtype)
