"""megatron_navil.ops.patchify: native == reference bitwise, layout oracle, Qwen2-VL parity.

Layouts: image [H, W, 3] uint8; patches [gh * gw, 3 * patch * patch] in merge-unit order, each
row channel-major [C, ph, pw]; packed batches concatenate images' patches in input order.
"""

from __future__ import annotations

import importlib
import math
import os
import platform
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_navil.ops import (
    merged_grid_reference,
    patchify,
    patchify_batch,
    patchify_batch_reference,
    patchify_reference,
    smart_resize,
)

# The package attribute `megatron_navil.ops.patchify` is the function; this is the module.
pmod = importlib.import_module("megatron_navil.ops.patchify")
needs_native = pytest.mark.skipif(pmod._native() is None, reason="native patchify not built")

NAVIL = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
CLIP = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _oracle(img: np.ndarray, patch: int, merge: int, mean, std) -> tuple[np.ndarray, tuple]:
    """Patch-by-patch numpy loop, independent of the reference's reshape/permute."""
    h, w, _ = img.shape
    unit = patch * merge
    ph, pw = math.ceil(h / unit) * unit, math.ceil(w / unit) * unit
    padded = np.zeros((ph, pw, 3), np.uint8)
    padded[:h, :w] = img
    scaled = (padded.astype(np.float64) * (1.0 / 255.0)).astype(np.float32)
    values = (scaled - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    gh, gw = ph // patch, pw // patch
    rows = []
    for uy in range(gh // merge):
        for ux in range(gw // merge):
            for my in range(merge):
                for mx in range(merge):
                    py, px = uy * merge + my, ux * merge + mx
                    block = values[py * patch : (py + 1) * patch, px * patch : (px + 1) * patch]
                    rows.append(block.transpose(2, 0, 1).reshape(-1))  # [C, ph, pw]
    return np.stack(rows), (gh, gw)


# Image sizes: small and odd, 1-pixel wide, and extreme aspect ratios both ways.
sizes = st.one_of(
    st.tuples(st.integers(1, 300), st.integers(1, 300)),
    st.tuples(st.integers(1, 4), st.integers(1, 3000)),
    st.tuples(st.integers(1, 3000), st.integers(1, 4)),
)
norms = st.one_of(
    st.sampled_from([NAVIL, CLIP]),
    st.tuples(
        st.tuples(*[st.floats(-2, 2)] * 3),
        st.tuples(*[st.floats(1e-3, 4)] * 3),
    ),
)
dtypes = st.sampled_from([torch.float32, torch.bfloat16])


@needs_native
@settings(max_examples=200, deadline=None)
@given(
    size=sizes,
    patch=st.sampled_from([1, 2, 3, 7, 14, 16]),
    merge=st.integers(1, 4),
    norm=norms,
    dtype=dtypes,
    as_numpy=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_native_equals_reference(size, patch, merge, norm, dtype, as_numpy, seed):
    img = _image(*size, seed=seed)
    arg = img if as_numpy else torch.from_numpy(img)
    mean, std = norm
    got, grid = patchify(arg, patch, merge, mean, std, dtype)
    want, want_grid = patchify_reference(arg, patch, merge, mean, std, dtype)
    assert grid == want_grid == merged_grid_reference(size[0], size[1], patch, merge)
    assert got.dtype == want.dtype == dtype
    assert got.shape == (grid[0] * grid[1], 3 * patch * patch)
    assert torch.equal(got, want)


@settings(max_examples=100, deadline=None)
@given(
    size=st.tuples(st.integers(1, 70), st.integers(1, 70)),
    patch=st.integers(1, 8),
    merge=st.integers(1, 3),
    norm=norms,
    seed=st.integers(0, 2**32 - 1),
)
def test_matches_patch_by_patch_oracle(size, patch, merge, norm, seed):
    img = _image(*size, seed=seed)
    want, want_grid = _oracle(img, patch, merge, *norm)
    for fn in (patchify, patchify_reference):
        got, grid = fn(img, patch, merge, *norm)
        assert grid == want_grid
        assert torch.equal(got, torch.from_numpy(want))


def test_bfloat16_is_rounded_float32():
    img = _image(45, 77, seed=3)
    for mean, std in (NAVIL, CLIP):
        f32, _ = patchify(img, mean=mean, std=std)
        bf16, _ = patchify(img, mean=mean, std=std, dtype=torch.bfloat16)
        assert torch.equal(bf16, f32.to(torch.bfloat16))


def test_padding_and_value_range():
    img = np.zeros((1, 1, 3), np.uint8)
    img[0, 0] = (255, 0, 128)
    for fn in (patchify, patchify_reference):
        patches, grid = fn(img)
        assert grid == (2, 2) and patches.shape == (4, 768)
        first = patches[0].reshape(3, 16, 16)
        assert first[0, 0, 0] == 1.0 and first[1, 0, 0] == -1.0
        assert first[2, 0, 0] == pytest.approx(128 / 255 * 2 - 1, abs=1e-7)
        first[:, 0, 0] = -1.0
        assert torch.all(patches == -1.0)  # all padding is (0 - 0.5) / 0.5


def test_merge_unit_order_small_example():
    """A 2x4-patch image (patch 1, merge 2): units (0,0) then (0,1), row-major inside each."""
    img = np.zeros((2, 4, 3), np.uint8)
    img[..., 0] = np.arange(8, dtype=np.uint8).reshape(2, 4)  # pixel id in the red channel
    patches, grid = patchify(img, patch=1, merge=2, mean=(0, 0, 0), std=(1 / 255,) * 3)
    assert grid == (2, 4)
    red = patches[:, 0].round().to(torch.int64).tolist()
    assert red == [0, 1, 4, 5, 2, 3, 6, 7]


def test_input_forms_agree():
    img = _image(37, 61, seed=5)
    want, grid = patchify_reference(img)
    t = torch.from_numpy(img)
    variants = [
        img,
        t,
        np.asfortranarray(img),  # non-contiguous numpy
        t.permute(1, 0, 2).contiguous().permute(1, 0, 2),  # non-contiguous tensor view
        _image(74, 122, seed=5)[::2, ::2] * 0 + img,  # strided result array
    ]
    readonly = img.copy()
    readonly.flags.writeable = False
    variants.append(readonly)
    for v in variants:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # e.g. torch's non-writable numpy array warning
            for fn in (patchify, patchify_reference):
                got, g = fn(v)
                assert g == grid and torch.equal(got, want)


def _batch_images(seed: int) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = [(1, 1), (33, 70), (1, 900), (64, 64), (5, 3), (250, 17), (2, 2)]
    shapes += [tuple(int(v) for v in rng.integers(1, 120, 2)) for _ in range(20)]
    return [_image(h, w, seed=seed + k) for k, (h, w) in enumerate(shapes)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_equals_singles(dtype):
    images = _batch_images(11)
    packed, grids = patchify_batch(images, dtype=dtype, mean=CLIP[0], std=CLIP[1])
    ref_packed, ref_grids = patchify_batch_reference(images, dtype=dtype, mean=CLIP[0], std=CLIP[1])
    singles = [patchify(img, dtype=dtype, mean=CLIP[0], std=CLIP[1]) for img in images]
    assert grids == ref_grids == [g for _, g in singles]
    assert torch.equal(packed, ref_packed)
    assert torch.equal(packed, torch.cat([p for p, _ in singles]))


@needs_native
def test_batch_independent_of_thread_count():
    """The native op splits patch rows of all images across threads; any split is the same."""
    images = _batch_images(7)
    want, _ = patchify_batch_reference(images)
    old = torch.get_num_threads()
    try:
        for threads in (1, 2, 3, 8):
            torch.set_num_threads(threads)
            got, _ = patchify_batch(images)
            assert torch.equal(got, want), threads
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("fn", [patchify_batch, patchify_batch_reference])
def test_empty_batch(fn):
    packed, grids = fn([], dtype=torch.bfloat16)
    assert packed.shape == (0, 768) and packed.dtype == torch.bfloat16 and grids == []


# ---- bad inputs ----------------------------------------------------------------------------

BAD_IMAGES = [
    (np.zeros((0, 5, 3), np.uint8), "image is empty"),
    (np.zeros((5, 0, 3), np.uint8), "image is empty"),
    (torch.zeros((0, 0, 3), dtype=torch.uint8), "image is empty"),
    (np.zeros((5, 5, 4), np.uint8), r"image must have shape \[H, W, 3\].*\(5, 5, 4\)"),
    (np.zeros((5, 5), np.uint8), r"image must have shape \[H, W, 3\].*\(5, 5\)"),
    (torch.zeros((1, 5, 5, 3), dtype=torch.uint8), r"image must have shape \[H, W, 3\]"),
    (
        torch.zeros((3, 5, 5), dtype=torch.uint8),
        r"image must have shape \[H, W, 3\]",
    ),  # channels first
    (np.zeros((5, 5, 3), np.float32), "image must be uint8, got float32"),
    (np.zeros((5, 5, 3), np.int16), "image must be uint8, got int16"),
    (torch.zeros((5, 5, 3)), "image must be uint8, got torch.float32"),
    (torch.zeros((5, 5, 3), dtype=torch.uint8, device="meta"), "image must be on the CPU"),
    ([[[0, 0, 0]]], "image must be a numpy array or torch tensor"),
]


@pytest.mark.parametrize("fn", [patchify, patchify_reference])
@pytest.mark.parametrize(("image", "match"), BAD_IMAGES)
def test_bad_images(fn, image, match):
    with pytest.raises(ValueError, match="patchify: " + match):
        fn(image)


@pytest.mark.parametrize("fn", [patchify_batch, patchify_batch_reference])
@pytest.mark.parametrize(("image", "match"), BAD_IMAGES)
def test_bad_images_in_batch_name_the_index(fn, image, match):
    good = _image(8, 8)
    with pytest.raises(ValueError, match="patchify_batch: image 2: " + match):
        fn([good, good, image, good])


BAD_PARAMS = [
    ({"patch": 0}, "patch must be an integer in"),
    ({"patch": 2.0}, "patch must be an integer in"),
    ({"merge": -1}, "merge must be an integer in"),
    ({"merge": True}, "merge must be an integer in"),
    ({"mean": (0.5, 0.5)}, "mean must be 3 finite numbers"),
    ({"mean": (0.5, float("nan"), 0.5)}, "mean must be 3 finite numbers"),
    ({"mean": "abc"}, "mean must be 3 finite numbers"),
    ({"std": (0.5, 0.0, 0.5)}, "std must be 3 finite positive numbers"),
    ({"std": (0.5, 0.5, -1.0)}, "std must be 3 finite positive numbers"),
    ({"std": None}, "std must be 3 finite positive numbers"),
    ({"dtype": torch.float16}, "dtype must be torch.float32 or torch.bfloat16"),
    ({"dtype": np.float32}, "dtype must be torch.float32 or torch.bfloat16"),
]


@pytest.mark.parametrize("fn", [patchify, patchify_reference, patchify_batch])
@pytest.mark.parametrize(("kwargs", "match"), BAD_PARAMS)
def test_bad_parameters(fn, kwargs, match):
    img = _image(8, 8)
    arg = [img] if fn is patchify_batch else img
    with pytest.raises(ValueError, match="patchify: " + match):
        fn(arg, **kwargs)


@needs_native
def test_native_errors_are_value_errors():
    """Direct calls to the C++ op: std::invalid_argument surfaces as ValueError."""
    c = pmod._C
    ok = torch.zeros((4, 4, 3), dtype=torch.uint8)
    m, s = [0.5] * 3, [0.5] * 3
    cases = [
        (lambda: c.patchify(ok.float(), 16, 2, m, s, torch.float32), "must be uint8"),
        (
            lambda: c.patchify(ok[..., :2], 16, 2, m, s, torch.float32),
            r"image must have shape \[H, W, 3\]",
        ),
        (lambda: c.patchify(ok[:0], 16, 2, m, s, torch.float32), "image is empty"),
        (lambda: c.patchify(ok, 0, 2, m, s, torch.float32), "patch must be an integer"),
        (lambda: c.patchify(ok, 16, 2, m[:2], s, torch.float32), "mean must be 3"),
        (lambda: c.patchify(ok, 16, 2, m, [0.5, 0, 1], torch.float32), "std must be 3"),
        (lambda: c.patchify(ok, 16, 2, m, s, torch.float16), "dtype must be"),
        (lambda: c.patchify(ok, 2**31 - 1, 2, m, s, torch.float32), "too large"),
        (lambda: c.patchify_batch([ok, ok[:0]], 16, 2, m, s, torch.float32), "image 1: image"),
    ]
    for call, match in cases:
        with pytest.raises(ValueError, match=match):
            call()
    # a non-contiguous tensor is accepted and made contiguous
    view = torch.from_numpy(_image(9, 13)).transpose(0, 1)
    got, _ = c.patchify(view, 16, 2, m, s, torch.float32)
    assert torch.equal(got, patchify_reference(view.contiguous())[0])


def test_fallback_to_reference_without_native(monkeypatch):
    img = _image(20, 50)
    want = patchify(img)
    monkeypatch.setattr(pmod, "_C", None)
    assert pmod._native() is None
    got = patchify(img)
    assert got[1] == want[1] and torch.equal(got[0], want[0])
    packed, grids = patchify_batch([img, img])
    assert grids == [want[1]] * 2 and torch.equal(packed, torch.cat([want[0]] * 2))


def test_native_extension_built_in_ci():
    if os.environ.get("CI"):
        assert pmod._native() is not None, "megatron_navil._C lacks patchify"
    elif pmod._native() is None:
        pytest.skip("native extension not built")


# ---- parity with transformers' Qwen2-VL image processor ------------------------------------


def _qwen_processor_classes() -> list:
    """Qwen2-VL image processors importable here (no hub download: built from the class)."""
    classes = []
    try:  # transformers 5.x: PIL/numpy backend, no torchvision needed
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
            Qwen2VLImageProcessorPil,
        )

        classes.append(Qwen2VLImageProcessorPil)
    except ImportError:
        pass
    try:  # 5.x: torchvision backend (needs torchvision); 4.x: the numpy processor
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import Qwen2VLImageProcessor

        classes.append(Qwen2VLImageProcessor)
    except ImportError:
        pass
    return classes


QWEN_CLASSES = _qwen_processor_classes()
needs_qwen = pytest.mark.skipif(not QWEN_CLASSES, reason="transformers Qwen2-VL processor missing")


def _qwen(cls, mean, std):
    """Qwen2-VL configured as NaViL: patch 16, merge 2, temporal patch 1, NaViL's bounds."""
    return cls(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=1,
        image_mean=list(mean),
        image_std=list(std),
        min_pixels=256 * 16 * 16,
        max_pixels=24576 * 16 * 16,
    )


def _run_qwen(proc, images: list[np.ndarray]) -> tuple[torch.Tensor, list]:
    out = proc(images=images, return_tensors="pt", input_data_format="channels_last")
    return out["pixel_values"], out["image_grid_thw"].tolist()


# Sides multiples of 32 with 256 to 24576 patches (Qwen2-VL does not resample these): square,
# portrait, landscape, thin (32 px high), the exact minimum and the exact maximum.
PARITY_SIZES = [
    (256, 256),
    (512, 320),
    (320, 224),
    (32, 2048),
    (2048, 32),
    (448, 800),
    (2048, 3072),
]


@pytest.mark.slow
@needs_qwen
@pytest.mark.parametrize("cls", QWEN_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize("norm", [NAVIL, CLIP], ids=["navil", "clip"])
def test_qwen_parity_multiples_of_32(cls, norm):
    proc = _qwen(cls, *norm)
    images = [_image(h, w, seed=k) for k, (h, w) in enumerate(PARITY_SIZES)]
    theirs, thw = _run_qwen(proc, images)
    ours, grids = patchify_batch(images, mean=norm[0], std=norm[1])
    assert thw == [[1, gh, gw] for gh, gw in grids]
    assert theirs.shape == ours.shape and theirs.dtype == torch.float32
    max_abs = (theirs - ours).abs().max().item()
    assert max_abs <= 1e-6, max_abs
    if cls.__name__ == "Qwen2VLImageProcessorPil":
        assert max_abs == 0.0  # same float64 rescale and float32 normalise: bitwise equal
    for img, (gh, gw) in zip(images, grids, strict=True):  # and image by image
        single, single_thw = _run_qwen(proc, [img])
        assert single_thw == [[1, gh, gw]]
        assert (single - patchify(img, mean=norm[0], std=norm[1])[0]).abs().max() <= 1e-6


# Sizes NaViL keeps (65,536 to 6,291,456 pixels) that are not all multiples of 32: both sides
# at least 256, or 33 to 63 rows and a long width (two unit rows, aspect ratio <= 200).
kept_sizes = st.one_of(
    st.tuples(st.integers(256, 700), st.integers(256, 700)),
    st.tuples(st.integers(33, 63), st.integers(2017, 2200)),
    st.tuples(st.integers(2017, 2200), st.integers(33, 63)),
)


@needs_qwen
@pytest.mark.parametrize("cls", QWEN_CLASSES, ids=lambda c: c.__name__)
@settings(max_examples=15, deadline=None)
@given(size=kept_sizes, seed=st.integers(0, 2**32 - 1))
def test_qwen_parity_on_zero_padded_image(cls, size, seed):
    """Any size NaViL keeps: Qwen2-VL on the image zero-padded to 32 equals ours on the image."""
    h, w = size
    ph, pw = 32 * math.ceil(h / 32), 32 * math.ceil(w / 32)
    assert smart_resize(h, w) == (h, w)  # NaViL does not resample it
    img = _image(h, w, seed=seed)
    padded = np.zeros((ph, pw, 3), np.uint8)
    padded[:h, :w] = img
    theirs, thw = _run_qwen(_qwen(cls, *NAVIL), [padded])
    ours, (gh, gw) = patchify(img)
    assert thw == [[1, gh, gw]]
    max_abs = (theirs - ours).abs().max().item()
    assert max_abs <= 1e-6, max_abs


@needs_qwen
@pytest.mark.parametrize("cls", QWEN_CLASSES, ids=lambda c: c.__name__)
def test_qwen_bfloat16_is_its_float32_rounded(cls):
    img = _image(256, 320, seed=9)
    theirs, _ = _run_qwen(_qwen(cls, *NAVIL), [img])
    ours, _ = patchify(img, dtype=torch.bfloat16)
    assert torch.equal(ours, theirs.to(torch.bfloat16))


def _navil_pixels(img: np.ndarray) -> np.ndarray:
    """The released rule's resize, as the data pipeline does it: smart_resize's size, Pillow
    bicubic from the full image (load_image_scales without draft)."""
    from PIL import Image

    h, w = smart_resize(img.shape[0], img.shape[1])
    if (h, w) == img.shape[:2]:
        return img
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BICUBIC))


# (size, rule-2 target): upsampled small images, one kept, downsampled large ones
RESIZED = [
    ((100, 100), (256, 256)),
    ((50, 70), (217, 303)),
    ((1, 200), (19, 3621)),
    ((200, 300), (210, 314)),
    ((333, 500), (333, 500)),
    ((3000, 4000), (2172, 2896)),
    ((2560, 2560), (2508, 2508)),
]


@needs_qwen
@pytest.mark.parametrize("cls", QWEN_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("size", "target"), RESIZED, ids=str)
def test_qwen_factor_1_resize_is_bitwise_ours(cls, size, target):
    """The released code's own configuration of the resize: Qwen2-VL with factor 1 (patch 1,
    merge 1) and NaViL's pixel bounds resizes to rule 2's size, and its pixels, bicubic from
    the full image then rescaled and normalised, are bitwise ours (patchify with 1x1 patches
    is the normalised image in raster order)."""
    img = _image(*size, seed=sum(size))
    proc = cls(
        patch_size=1,
        merge_size=1,
        temporal_patch_size=1,
        image_mean=list(NAVIL[0]),
        image_std=list(NAVIL[1]),
        min_pixels=256 * 16 * 16,
        max_pixels=24576 * 16 * 16,
    )
    theirs, thw = _run_qwen(proc, [img])
    assert smart_resize(*size) == target and thw == [[1, *target]]
    ours, grid = patchify(_navil_pixels(img), patch=1, merge=1)
    assert grid == target and theirs.shape == ours.shape
    if cls.__name__ == "Qwen2VLImageProcessorPil":
        assert torch.equal(theirs, ours)
    else:  # a tensor/numpy backend resamples on its own: close, not bitwise
        assert (theirs - ours).abs().max() <= 1e-6


# (size, target): rule 2's size is a multiple of 32 and Qwen2-VL at factor 32 (patch 16,
# merge 2) lands on it too, so its whole pipeline (resize, rescale, normalise, patches in
# merge-unit order) does NaViL's job: upsampled small images and downsampled large ones.
SAME_AT_FACTOR_32 = [
    ((23, 23), (256, 256)),
    ((21, 84), (128, 512)),
    ((64, 64), (256, 256)),
    ((2439, 3146), (2208, 2848)),
    ((4096, 6144), (2048, 3072)),
]


@pytest.mark.slow
@needs_qwen
@pytest.mark.parametrize("cls", QWEN_CLASSES, ids=lambda c: c.__name__)
@pytest.mark.parametrize(("size", "target"), SAME_AT_FACTOR_32, ids=str)
def test_qwen_resize_and_patches_bitwise_where_sizes_agree(cls, size, target):
    img = _image(*size, seed=size[0])
    assert smart_resize(*size) == target
    theirs, thw = _run_qwen(_qwen(cls, *NAVIL), [img])
    assert thw == [[1, target[0] // 16, target[1] // 16]]
    ours, grid = patchify(_navil_pixels(img))
    assert list(grid) == thw[0][1:]
    if cls.__name__ == "Qwen2VLImageProcessorPil":
        assert torch.equal(theirs, ours)
    else:
        assert (theirs - ours).abs().max() <= 1e-6


@needs_qwen
def test_qwen_difference_unpadded_size():
    """Qwen2-VL at factor 32 (its own configuration, not the released NaViL code's): in bounds
    but not a multiple of 32, it resamples to the nearest multiples of 32 (500x333 -> 512x320,
    grid 32x20) where NaViL keeps the size and pads (grid 32x22)."""
    img = _image(500, 333)
    _, thw = _run_qwen(_qwen(QWEN_CLASSES[0], *NAVIL), [img])
    assert thw == [[1, 32, 20]]
    assert patchify(img)[1] == (32, 22)


def test_torch_library_op_matches_and_compiles():
    """torch.ops.megatron_navil.patchify: same patches, a consistent fake implementation
    (opcheck), and no graph break under torch.compile."""
    module = importlib.import_module("megatron_navil.ops.patchify")
    image = torch.randint(0, 256, (45, 70, 3), dtype=torch.uint8)
    args = (image, 16, 2, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5], torch.float32)
    want, _ = module.patchify(*args)
    assert torch.equal(torch.ops.megatron_navil.patchify(*args), want)
    torch.library.opcheck(torch.ops.megatron_navil.patchify.default, args)

    def encode_input(img: torch.Tensor) -> torch.Tensor:
        return (
            torch.ops.megatron_navil.patchify(img, 16, 2, [0.5] * 3, [0.5] * 3, torch.float32) * 2.0
        )

    compiled = torch.compile(encode_input, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(image), want * 2.0)


def test_patchify_batch_cuda_without_extension_says_why(monkeypatch):
    """No megatron_navil._C_cuda (always so with a CPU-only torch): a ValueError naming the
    extension and the reason, after the usual argument checks."""
    from megatron_navil.ops import patchify_batch_cuda

    cuda_mod = importlib.import_module("megatron_navil.ops.patchify_cuda")

    def missing(name):
        raise ImportError(f"No module named {name!r}")

    monkeypatch.setattr(cuda_mod.importlib, "import_module", missing)
    with pytest.raises(
        ValueError,
        match=r"patchify_batch_cuda: the CUDA extension megatron_navil._C_cuda is not available: "
        r".*(CPU-only build|no CUDA toolkit|not built).*No module named 'megatron_navil._C_cuda'",
    ):
        patchify_batch_cuda([_image(8, 8)])
    # argument errors come first, with patchify_batch's messages
    with pytest.raises(ValueError, match="patchify_batch: image 0: image is empty"):
        patchify_batch_cuda([np.zeros((0, 3, 3), np.uint8)])
    with pytest.raises(ValueError, match="patchify: dtype must be"):
        patchify_batch_cuda([_image(8, 8)], dtype=torch.float16)
    with pytest.raises(ValueError, match="must be a CUDA device, got cpu"):
        patchify_batch_cuda([_image(8, 8)], device="cpu")
    monkeypatch.undo()
    if torch.version.cuda is None:  # the real import fails too, saying why
        with pytest.raises(ValueError, match=r"this torch .* is a CPU-only build"):
            patchify_batch_cuda([_image(8, 8)])


# ---- the native op's two CPU kernels ---------------------------------------------------------

PORTABLE_ENV = "MEGATRON_NAVIL_PATCHIFY_PORTABLE"


def _cpu_has_avx2_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx2" in flags and "fma" in flags


def _kernel(mean, std, dtype) -> str:
    return pmod._C._patchify_kernel(list(mean), list(std), dtype)


@needs_native
def test_kernel_choice(monkeypatch):
    """The AVX2 kernel runs on x86-64 CPUs with AVX2 + FMA (for NaViL's and CLIP's values,
    where multiplying by 1 / std is not exact); the environment variable forces the portable
    one. The choice is made at each call."""
    monkeypatch.delenv(PORTABLE_ENV, raising=False)
    want = "avx2" if platform.machine() in ("x86_64", "AMD64") and _cpu_has_avx2_fma() else None
    for dtype in (torch.float32, torch.bfloat16):
        for norm in (NAVIL, CLIP):
            got = _kernel(*norm, dtype)
            assert got in ("avx2", "portable")
            if want is not None:
                assert got == want
            monkeypatch.setenv(PORTABLE_ENV, "1")
            assert _kernel(*norm, dtype) == "portable"
            monkeypatch.setenv(PORTABLE_ENV, "0")
            assert _kernel(*norm, dtype) == got
            monkeypatch.delenv(PORTABLE_ENV)
    with pytest.raises(ValueError, match="std must be 3"):
        pmod._C._patchify_kernel([0.5] * 3, [0.5, 0.0, 0.5], torch.float32)


def _both_kernels(monkeypatch, fn):
    """fn() with the dispatched kernel and with the portable one forced."""
    monkeypatch.delenv(PORTABLE_ENV, raising=False)
    fast = fn()
    monkeypatch.setenv(PORTABLE_ENV, "1")
    portable = fn()
    monkeypatch.delenv(PORTABLE_ENV)
    return fast, portable


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32 if t.dtype == torch.float32 else torch.int16)


@needs_native
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("norm", [NAVIL, CLIP, ((0.1, -1.7, 3.0), (0.013, 2.9, 1e-3))])
@pytest.mark.parametrize("patch", [16, 14, 8, 7, 3])
def test_kernels_bitwise_equal(monkeypatch, dtype, norm, patch):
    """Dispatched (AVX2 where available) and portable kernels against the reference, bit for
    bit: odd sizes, 1-pixel wide / high images, widths that leave 1..15 valid columns in the
    last patch (the AVX2 kernel's overlapping last group and its table fallback below 8)."""
    rng = np.random.default_rng(patch)
    sizes = [(1, 1), (1, 37), (45, 1), (17, 9), (33, 70), (64, 64), (31, 8 * patch + 7)]
    sizes += [(int(h), int(w)) for h, w in rng.integers(1, 150, (8, 2))]
    images = [_image(h, w, seed=k) for k, (h, w) in enumerate(sizes)]
    images.append(np.tile(np.arange(256, dtype=np.uint8)[:, None, None], (1, 21, 3)))
    mean, std = norm
    fast, portable = _both_kernels(
        monkeypatch, lambda: patchify_batch(images, patch, 2, mean, std, dtype)[0]
    )
    want, _ = patchify_batch_reference(images, patch, 2, mean, std, dtype)
    assert torch.equal(_bits(fast), _bits(want))
    assert torch.equal(_bits(portable), _bits(want))


@needs_native
def test_kernels_equal_on_non_finite_values(monkeypatch):
    """A std that rounds to 0 in float32 gives inf and NaN (0 / 0): both kernels write the
    same bits (bfloat16 NaN is 0x7FC0, as c10::BFloat16)."""
    img = _image(19, 40, seed=1)
    img[0, :3] = 0
    for dtype in (torch.float32, torch.bfloat16):
        args = (img, 16, 2, (0.0, 0.5, 1e40), (1e-300, 0.5, 1.0), dtype)
        fast, portable = _both_kernels(monkeypatch, lambda args=args: patchify(*args)[0])
        assert torch.isnan(fast).any() and torch.isinf(fast).any()
        assert torch.equal(_bits(fast), _bits(portable))
