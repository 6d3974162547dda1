"""The CUDA patchify kernel's logic on CPU: csrc/cuda/patchify.cu compiled with g++ against the
stand-in CUDA headers in tests/unit/cuda_emulation/ (a block = 256 std::threads meeting at a
std::barrier for __syncthreads, blocks one after another) and compared bitwise with the CPU op.

What this proves without a GPU: the tiling, the image lookup, the uint4 loads and their scalar
tails (images and rows at every alignment), the merge-unit output order, the vector and scalar
store paths, the value table and the launcher's validation. What it cannot: GPU memory-model
or timing effects; tests/unit/test_cuda_kernels.py runs the real thing on a GPU.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_navil.ops import merged_grid_reference, patchify_batch

pytestmark = pytest.mark.slow  # compiles the kernel's CPU emulation in a subprocess (about 40 s)

ROOT = Path(__file__).resolve().parents[2]
EMU = Path(__file__).resolve().parent / "cuda_emulation"
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
NAVIL = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
INVALID = 1  # cudaErrorInvalidValue


class Meta(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int64) for n in ("offset", "height", "width", "first_patch")]


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    gxx = shutil.which("g++")
    if gxx is None:
        pytest.skip("g++ not found")
    lib = tmp_path_factory.mktemp("emu") / "emu.so"
    cmd = [gxx, "-std=c++20", "-O1", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Werror"]
    cmd += ["-pthread", "-shared", "-fPIC", f"-I{EMU}", "-o", str(lib), str(EMU / "harness.cpp")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr}"
    return ctypes.CDLL(str(lib))


def _run(
    emu,
    images,
    patch=16,
    merge=2,
    norm=NAVIL,
    dtype=torch.float32,
    sms=1,
    lead=0,
    meta_edit=None,
    out_rows=None,
    images_bytes=None,
):
    """Packs `images` back to back after `lead` bytes and runs the emulated launcher."""
    sizes = [img.size for img in images]
    offsets = np.cumsum([lead, *sizes])[:-1]
    buf = np.zeros(lead + sum(sizes) + 1, np.uint8)[1:]  # numpy's base +1: odd alignment
    for img, off in zip(images, offsets, strict=True):
        buf[off : off + img.size] = img.reshape(-1)
    meta = (Meta * max(1, len(images)))()
    total = 0
    ok = 1 <= patch < 2**31 and 1 <= merge < 2**31  # bad ones: meta as for the defaults
    for k, img in enumerate(images):
        gh, gw = merged_grid_reference(*img.shape[:2], *((patch, merge) if ok else (16, 2)))
        meta[k] = Meta(int(offsets[k]), img.shape[0], img.shape[1], total)
        total += gh * gw
    if meta_edit is not None:
        meta_edit(meta)
    rows = total if out_rows is None else out_rows
    dim = 3 * patch * patch if ok else 768
    out = torch.full((max(rows, 0), dim), float("nan"), dtype=dtype)
    mean = (ctypes.c_double * 3)(*norm[0])
    std = (ctypes.c_double * 3)(*norm[1])
    launches = ctypes.c_long(0)
    err = emu.emu_patchify(
        buf.ctypes.data_as(ctypes.c_void_p),
        ctypes.c_int64(buf.size if images_bytes is None else images_bytes),
        meta,
        ctypes.c_int64(len(images)),
        ctypes.c_int64(patch),
        ctypes.c_int64(merge),
        mean,
        std,
        ctypes.c_int(0 if dtype == torch.float32 else 1),
        ctypes.c_void_p(out.data_ptr()),
        ctypes.c_int64(rows),
        ctypes.c_int(sms),
        ctypes.byref(launches),
    )
    return err, out, launches.value


def _images(shapes, seed):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]


# 1-pixel sides, odd sizes, extreme aspect ratios, exact multiples of 32, one unit and less.
SHAPES = [(1, 1), (1, 77), (77, 1), (5, 3), (31, 33), (32, 32), (64, 96), (33, 250), (250, 2)]
SHAPES += [(3, 700), (17, 19)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [NAVIL, CLIP], ids=["navil", "clip"])
@pytest.mark.parametrize("lead", [0, 5])  # image starts at every alignment mod 16
def test_navil_shapes_equal_cpu_op(emu, dtype, norm, lead):
    images = _images(SHAPES, seed=lead)
    err, got, launches = _run(emu, images, norm=norm, dtype=dtype, lead=lead)
    want, _ = patchify_batch(images, mean=norm[0], std=norm[1], dtype=dtype)
    assert err == 0 and launches == 1
    assert torch.equal(got, want)


# Unit tiles (unit <= 32, vector or scalar stores), whole-patch tiles (patch <= 32, unit > 32)
# and split patches (patch > 32; > 1024 splits across too), with patch sides that do and do
# not allow 16-byte stores.
@pytest.mark.parametrize(
    ("patch", "merge"),
    [
        (1, 1),
        (1, 3),
        (3, 2),
        (4, 2),
        (8, 4),
        (14, 2),
        (16, 1),
        (16, 3),
        (24, 2),
        (33, 1),
        (40, 2),
        (48, 1),
        (1100, 1),  # wider than a tile: split across too
    ],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tilings_equal_cpu_op(emu, patch, merge, dtype):
    rng = np.random.default_rng(patch * 10 + merge)
    shapes = [(1, 1), (int(rng.integers(1, 90)), int(rng.integers(1, 90))), (2, 130), (97, 3)]
    if patch > 1024:  # one 1100 x 1100 patch per image: one image (odd size) is enough
        shapes = [(3, 1099)]
    images = _images(shapes, seed=patch)
    err, got, _ = _run(emu, images, patch=patch, merge=merge, norm=CLIP, dtype=dtype, lead=3)
    want, _ = patchify_batch(images, patch, merge, CLIP[0], CLIP[1], dtype)
    assert err == 0
    assert torch.equal(got, want)


def test_grid_stride_loop_covers_every_tile(emu):
    """Far more tiles (about 300) than blocks (1 "SM" -> 16): every output row is written."""
    images = _images([(200, 190), (45, 300), (1, 1)], seed=9)
    err, got, _ = _run(emu, images, sms=1)
    assert err == 0 and torch.equal(got, patchify_batch(images)[0])


def test_empty_is_a_no_op(emu):
    err, out, launches = _run(emu, [])
    assert err == 0 and launches == 0 and out.shape == (0, 768)


def _set(k, field, value):
    def edit(meta):
        setattr(meta[k], field, value)

    return edit


@pytest.mark.parametrize(
    "kwargs",
    [
        {"patch": 0},
        {"merge": 0},
        {"patch": 2**31},
        {"norm": ((0.5, 0.5, 0.5), (0.5, 0.0, 0.5))},
        {"norm": ((0.5, float("nan"), 0.5), (0.5, 0.5, 0.5))},
        {"out_rows": 3},  # not the total patch count
        {"images_bytes": 10},  # image 1 ends past the buffer
        {"meta_edit": _set(1, "first_patch", 5)},  # not the running sum
        {"meta_edit": _set(0, "height", 0)},
        {"meta_edit": _set(1, "width", -4)},
        {"meta_edit": _set(1, "offset", -1)},
        {"meta_edit": _set(1, "height", 2**31)},
    ],
)
def test_launcher_rejects_bad_arguments(emu, kwargs):
    err, _, launches = _run(emu, _images([(4, 4), (3, 5)], seed=0), **kwargs)
    assert err == INVALID and launches == 0
