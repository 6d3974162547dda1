"""GPU-only: the compiled CUDA ops against their reference, and the shim staying out of the way
on a CUDA machine (only the upstream-bug fixes apply). Skipped without a GPU (tests/conftest.py).
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytestmark = pytest.mark.gpu


def test_normalize_u8_matches_reference():
    cuda_ops = importlib.import_module("megatron_navil._C_cuda")
    image = torch.randint(0, 256, (37, 53, 3), dtype=torch.uint8)
    mean, std = [0.5, 0.4, 0.3], [0.5, 0.25, 0.2]
    got = cuda_ops.normalize_u8(image.cuda(), mean, std).cpu()
    want = (image.float() / 255 - torch.tensor(mean)) / torch.tensor(std)
    # fp32 on both sides; the kernel may fuse the divide into a multiply-add (1 ulp-ish).
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_only_upstream_fixes_apply_with_cuda():
    from megatron_navil.parallel import cpu_shim

    try:
        active = cpu_shim.apply()
        assert set(active) == {n for n, p in cpu_shim.PATCHES.items() if p.always}
        assert torch.cuda.current_device() != torch.device("cpu")
    finally:
        cpu_shim.revert_all()
