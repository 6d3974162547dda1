"""GPU-only: the compiled CUDA ops against the CPU op, and the shim staying out of the way on a
CUDA machine (only the upstream-bug fixes apply). Skipped without a GPU (tests/conftest.py).
The same kernel source also runs on CPU threads in tests/unit/test_cuda_emulated.py.
"""

from __future__ import annotations

import importlib

import numpy as np
import pytest
import torch

from megatron_navil.ops import patchify_batch, patchify_batch_cuda

pytestmark = pytest.mark.gpu

CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
NAVIL = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _random_images(seed: int, count: int) -> list[np.ndarray]:
    """Random sizes: 1-pixel sides, odd sizes, extreme aspect ratios, a few large ones."""
    rng = np.random.default_rng(seed)
    shapes = [(1, 1), (1, 513), (513, 1), (7, 3), (33, 31), (2, 2000), (2000, 3), (32, 32)]
    for _ in range(count):
        kind = rng.integers(0, 3)
        if kind == 0:
            shapes.append(tuple(int(v) for v in rng.integers(1, 700, 2)))
        elif kind == 1:
            shapes.append((int(rng.integers(1, 5)), int(rng.integers(1, 3000))))
        else:
            shapes.append((int(rng.integers(1, 3000)), int(rng.integers(1, 5))))
    shapes.append((1537, 2049))
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [NAVIL, CLIP], ids=["navil", "clip"])
@pytest.mark.parametrize("seed", [0, 1])
def test_patchify_cuda_equals_cpu_op(dtype, norm, seed):
    images = _random_images(seed, 40)
    got, grids = patchify_batch_cuda(images, mean=norm[0], std=norm[1], dtype=dtype)
    want, want_grids = patchify_batch(images, mean=norm[0], std=norm[1], dtype=dtype)
    assert got.device.type == "cuda" and got.dtype == dtype
    assert grids == want_grids
    assert torch.equal(got.cpu(), want)  # the same value table: bitwise


@pytest.mark.parametrize(("patch", "merge"), [(1, 1), (3, 2), (14, 2), (16, 3), (40, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_patchify_cuda_other_tilings(patch, merge, dtype):
    """Vector and scalar stores, merge-unit, whole-patch and split-patch tiles."""
    images = _random_images(7, 10)[:12]
    got, grids = patchify_batch_cuda(images, patch, merge, *CLIP, dtype=dtype)
    want, want_grids = patchify_batch(images, patch, merge, *CLIP, dtype=dtype)
    assert grids == want_grids and torch.equal(got.cpu(), want)


def test_patchify_cuda_empty_and_tensor_inputs():
    packed, grids = patchify_batch_cuda([], dtype=torch.float32)
    assert packed.shape == (0, 768) and packed.device.type == "cuda" and grids == []
    img = torch.randint(0, 256, (45, 70, 3), dtype=torch.uint8)
    view = img.permute(1, 0, 2).contiguous().permute(1, 0, 2)  # non-contiguous
    got, _ = patchify_batch_cuda([img, view, img.numpy()])
    assert torch.equal(got.cpu(), patchify_batch([img] * 3, dtype=torch.bfloat16)[0])


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        ([np.zeros((0, 5, 3), np.uint8)], {}, "image 0: image is empty"),
        ([np.zeros((5, 5, 4), np.uint8)], {}, r"image must have shape \[H, W, 3\]"),
        ([np.zeros((5, 5, 3), np.uint8)], {"patch": 0}, "patch must be an integer"),
        ([np.zeros((5, 5, 3), np.uint8)], {"std": (0.5, 0, 0.5)}, "std must be 3"),
        ([np.zeros((5, 5, 3), np.uint8)], {"dtype": torch.float16}, "dtype must be"),
        ([np.zeros((5, 5, 3), np.uint8)], {"device": "cpu"}, "must be a CUDA device"),
    ],
)
def test_patchify_cuda_bad_inputs(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        patchify_batch_cuda(args, **kwargs)


def test_patchify_cuda_rejects_gpu_images():
    image = torch.zeros((5, 5, 3), dtype=torch.uint8, device="cuda")
    with pytest.raises(ValueError, match="image 0: image must be on the CPU"):
        patchify_batch_cuda([image])


def test_patchify_packed_binding_rejects_bad_arguments():
    ops = importlib.import_module("megatron_navil._C_cuda")
    buf = torch.zeros(4 * 4 * 3, dtype=torch.uint8, device="cuda")
    shapes = torch.tensor([[4, 4]])
    m, s = [0.5] * 3, [0.5] * 3
    cases = [
        (lambda: ops.patchify_packed(buf.cpu(), shapes, 16, 2, m, s, torch.float32), "buffer"),
        (lambda: ops.patchify_packed(buf, shapes.cuda(), 16, 2, m, s, torch.float32), "shapes"),
        (lambda: ops.patchify_packed(buf[:-1], shapes, 16, 2, m, s, torch.float32), "need 48"),
        (lambda: ops.patchify_packed(buf, shapes * 0, 16, 2, m, s, torch.float32), "sides"),
        (lambda: ops.patchify_packed(buf, shapes, 0, 2, m, s, torch.float32), "patch and merge"),
        (lambda: ops.patchify_packed(buf, shapes, 16, 2, m, s, torch.float16), "dtype"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    packed, grids = ops.patchify_packed(buf, shapes, 16, 2, m, s, torch.float32)
    assert grids == [(2, 2)] and torch.equal(packed.cpu(), torch.full((4, 768), -1.0))


def test_only_upstream_fixes_apply_with_cuda():
    from megatron_navil.parallel import cpu_shim

    try:
        active = cpu_shim.apply()
        assert set(active) == {n for n, p in cpu_shim.PATCHES.items() if p.always}
        assert torch.cuda.current_device() != torch.device("cpu")
    finally:
        cpu_shim.revert_all()
