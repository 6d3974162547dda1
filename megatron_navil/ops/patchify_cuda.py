"""``patchify_batch`` on the GPU: many uint8 images -> one packed patch tensor in one launch.

Layouts: as :mod:`megatron_navil.ops.patchify` (images ``[H, W, 3]`` uint8 on the CPU;
output ``[sum_i gh_i * gw_i, 3 * patch * patch]`` in merge-unit order, channel-major rows),
but the output lives on the GPU. The images are copied into one pinned uint8 host buffer back
to back (``H * W * 3`` bytes each, no gaps), sent to the GPU with one non-blocking copy (4x
fewer bytes than sending float32) and patchified by ``megatron_navil._C_cuda.patchify_packed``
(csrc/cuda/patchify.cu) on the current stream. Its values come from the same host-computed
table as the CPU op, so the result equals :func:`patchify_batch`'s bit for bit, float32 and
bfloat16 alike (tests/unit/test_cuda_kernels.py on a GPU, tests/unit/test_cuda_emulated.py on
CPU).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from types import ModuleType

import torch

from megatron_navil.ops.patchify import (
    NAVIL_MEAN,
    NAVIL_STD,
    Grid,
    ImageU8,
    _check_sizes,
    _image,
    _params,
)


def _cuda_ops() -> ModuleType:
    """megatron_navil._C_cuda, imported on first use; ValueError saying why it is missing."""
    try:
        return importlib.import_module("megatron_navil._C_cuda")
    except ImportError as exc:
        if torch.version.cuda is None:
            why = f"this torch ({torch.__version__}) is a CPU-only build"
        else:
            from torch.utils import cpp_extension

            if cpp_extension.CUDA_HOME is None:
                why = "no CUDA toolkit (nvcc / CUDA_HOME) was found when building"
            else:
                why = "it was not built or does not load (rebuild: python setup.py build_ext)"
        raise ValueError(
            f"patchify_batch_cuda: the CUDA extension megatron_navil._C_cuda is not available: "
            f"{why} ({type(exc).__name__}: {exc})"
        ) from None


def _cuda_device(device: torch.device | str | int) -> torch.device:
    try:
        dev = torch.device(device)
    except (TypeError, RuntimeError):
        raise ValueError(
            f"patchify_batch_cuda: device must be a CUDA device, got {device!r}"
        ) from None
    if dev.type != "cuda":
        raise ValueError(f"patchify_batch_cuda: device must be a CUDA device, got {dev}")
    return dev


def patchify_batch_cuda(
    images: Sequence[ImageU8],
    patch: int = 16,
    merge: int = 2,
    mean: Sequence[float] = NAVIL_MEAN,
    std: Sequence[float] = NAVIL_STD,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str | int = "cuda",
) -> tuple[torch.Tensor, list[Grid]]:
    """:func:`~megatron_navil.ops.patchify_batch` computed on ``device`` (see module doc).

    Returns ``(packed [sum_i n_i, 3 * patch * patch] on device, [(gh_i, gw_i), ...])``. The
    copy and the kernel are enqueued on the device's current stream; the call returns without
    waiting for them. An empty list gives a ``[0, 3 * patch * patch]`` tensor on the device.

    Raises:
        ValueError: the arguments or images are bad (the same checks and messages as
            :func:`~megatron_navil.ops.patchify_batch`), ``device`` is not a CUDA device, or
            ``megatron_navil._C_cuda`` is not built (CPU-only torch, or no nvcc at build time).
    """
    patch, merge, mean, std, dtype = _params(patch, merge, mean, std, dtype)
    where = [f"patchify_batch: image {k}" for k in range(len(images))]
    imgs = [_image(img, name) for img, name in zip(images, where, strict=True)]
    _check_sizes(imgs, patch, merge, where)
    dev = _cuda_device(device)
    ops = _cuda_ops()
    shapes = torch.tensor([[img.shape[0], img.shape[1]] for img in imgs], dtype=torch.int64)
    shapes = shapes.reshape(len(imgs), 2)
    total = sum(img.numel() for img in imgs)
    host = torch.empty(total, dtype=torch.uint8, pin_memory=True)
    offset = 0
    for img in imgs:
        host[offset : offset + img.numel()].copy_(img.reshape(-1))
        offset += img.numel()
    # Pinned + non_blocking: an asynchronous copy on the current stream; torch keeps the
    # pinned block from being reused until the copy has run.
    buffer_u8 = host.to(dev, non_blocking=True)
    packed, grids = ops.patchify_packed(
        buffer_u8, shapes, patch, merge, list(mean), list(std), dtype
    )
    return packed, [(int(gh), int(gw)) for gh, gw in grids]
