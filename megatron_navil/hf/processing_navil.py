"""NaViL image preprocessing and prompt building, standalone (torch, numpy, Pillow only).

This file travels inside exported checkpoints (remote code), so it repeats, in plain Python,
the rules that ``megatron_navil.ops`` implements in C++; tests/unit/test_hf_processing.py keeps
the two equal. Layouts:

  image          PIL RGB image, or uint8 ``[H, W, 3]``
  pixel_values   float32 ``[p, 3 * patch * patch]``: every scale of every image, packed in
                 order (images in prompt order, scales smallest first), patches in 2x2
                 merge-unit order, each patch flattened channel-major ``[C, ph, pw]``
  image_grid_hw  int64 ``[segments, 2]``: the patch grid (rows, cols) of each packed scale;
                 one vision-encoder attention segment each

Rules (the released NaViL code's; NAVIL.md "The released code's exact behaviour", 2 and 3):
the target size is transformers' Qwen2-VL ``smart_resize`` with factor 1 on raw pixels
(``min/max_pixels = min/max_patches * patch**2``: above the maximum scale down by
``beta = sqrt(H * W / max_pixels)`` with floor, below the minimum scale up with ceil, so small
images are upsampled); aspect ratios above ``max_aspect`` are rejected; bicubic resample,
zero-pad bottom/right to a multiple of ``patch * merge``; ``(x / 255 - 0.5) / 0.5``.
Multi-scale packing, as the released demo does it: after the base scale, re-run the resize on
the original size with the float32 budget ``f32(previous padded grid area in pixels) *
f32(scale_ratio ** 2)`` (the demo's int64 tensor times a float), stopping when the budget is
below ``min_pixels`` or the padded patch count does not decrease; smallest scale first. Inside
that resize the budget stays float32 as in torch: ``f32(H * W) > budget`` and ``(H * W) /
budget`` as ``f32(f32(1 / budget) * f32(H * W))`` (``Tensor.__rtruediv__``). ``scale_ratio``
is the config's ``scale_downsample_ratio`` (0.7071 in the released configs).
The image block in the token stream is ``<img>``, per scale
(smallest first) ``h`` rows of ``w`` ``<IMG_CONTEXT>`` + ``<IMG_LINE_BREAK>`` then
``<IMG_FRAME_BREAK>``, finally ``</img>`` (``h, w`` the merged grid = patch grid / merge).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

SPECIAL_TOKENS = (
    "</box>",
    "<box>",
    "<IMG_CONTEXT>",
    "</img>",
    "<img>",
    "</quad>",
    "<quad>",
    "</ref>",
    "<ref>",
    "<img_uncond>",
    "<IMG_LINE_BREAK>",
    "<IMG_FRAME_BREAK>",
)
"""The 12 special tokens, in the row order of ``special_token_embedding``."""
VISUAL_TOKENS = ("<IMG_CONTEXT>", "<img>")
"""Tokens routed to the visual experts."""
IMAGE_BLOCK_TOKENS = ("<img>", "</img>", "<IMG_CONTEXT>", "<IMG_LINE_BREAK>", "<IMG_FRAME_BREAK>")
"""Never generated: an ``<IMG_CONTEXT>`` without its patches cannot be fed back."""
IGNORE_INDEX = -100
"""Label of positions without loss (``labels`` of ``NaViL.forward``)."""

# The chat templates (NAVIL.md "Chat templates") as Jinja for ``tokenizer.apply_chat_template``;
# ``<image>`` in a message is replaced by the image block before tokenization.
CHAT_TEMPLATES = {
    "internlm2-chat": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{{ message['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "qwen3-chat": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% if message['role'] == 'assistant' %}<think>\n\n</think>\n\n{% endif %}"
        "{{ message['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n<think>\n\n</think>\n\n{% endif %}"
    ),
}


def merged_grid(height: int, width: int, patch: int = 16, merge: int = 2) -> tuple[int, int]:
    """Patch grid ``(rows, cols)`` after zero-padding each side to a multiple of
    ``patch * merge``."""
    unit = patch * merge
    return -(-height // unit) * merge, -(-width // unit) * merge


def _f32(n: int) -> np.float32:
    """An integer rounded once to float32, as torch casts an int64."""
    return np.int64(n).astype(np.float32)


def _resize(height: int, width: int, min_pixels: int, max_pixels: Any) -> tuple[int, int]:
    """Qwen2-VL's smart_resize with factor 1; ``max_pixels`` an int or a numpy float32."""
    pixels = height * width
    if isinstance(max_pixels, np.float32):  # the demo's float32 tensor budget
        above = _f32(pixels) > max_pixels
        ratio = float((np.float32(1.0) / max_pixels) * _f32(pixels)) if above else 0.0
    else:
        above = pixels > max_pixels
        ratio = pixels / max_pixels if above else 0.0
    if above:
        beta = math.sqrt(ratio)
        return max(1, math.floor(height / beta)), max(1, math.floor(width / beta))
    if pixels < min_pixels:
        beta = math.sqrt(min_pixels / pixels)
        return math.ceil(height * beta), math.ceil(width * beta)
    return height, width


def smart_resize(
    height: int,
    width: int,
    patch: int = 16,
    merge: int = 2,
    min_patches: int = 256,
    max_patches: int = 24576,
    max_aspect: float = 200.0,
) -> tuple[int, int]:
    """``(height, width)`` to resample to: Qwen2-VL's smart_resize with factor 1,
    ``min_pixels = min_patches * patch**2``, ``max_pixels = max_patches * patch**2`` (``merge``
    takes no part; the padded grid may exceed ``max_patches``). ValueError for aspect >
    max_aspect."""
    if height < 1 or width < 1:
        raise ValueError(f"image size {height}x{width} must be positive")
    long_side, short_side = max(height, width), min(height, width)
    if float(long_side) > float(max_aspect) * float(short_side):
        raise ValueError(
            f"image {height}x{width} has aspect ratio {long_side}/{short_side} > "
            f"max_aspect={max_aspect:g}"
        )
    return _resize(height, width, min_patches * patch * patch, max_patches * patch * patch)


def scales_for_image(
    height: int,
    width: int,
    patch: int = 16,
    merge: int = 2,
    min_patches: int = 256,
    max_patches: int = 24576,
    max_aspect: float = 200.0,
    scale_ratio: float = 0.7071,
    multi_scale: bool = True,
) -> list[tuple[int, int]]:
    """Pixel sizes of an image's scales, smallest first; the last is :func:`smart_resize`'s,
    the others the released demo's chain (module doc)."""
    base = smart_resize(height, width, patch, merge, min_patches, max_patches, max_aspect)
    if not multi_scale:
        return [base]
    min_pixels = min_patches * patch * patch
    ratio_sq = np.float32(scale_ratio**2)
    scales = [base]
    gh, gw = merged_grid(base[0], base[1], patch, merge)
    while True:
        budget = _f32(gh * gw * patch * patch) * ratio_sq
        if budget < _f32(min_pixels):
            break
        size = _resize(height, width, min_pixels, budget)
        nh, nw = merged_grid(size[0], size[1], patch, merge)
        if nh * nw >= gh * gw:
            break
        scales.insert(0, size)
        gh, gw = nh, nw
    return scales


def patchify(
    image_hwc: np.ndarray | torch.Tensor,
    patch: int = 16,
    merge: int = 2,
    mean: Sequence[float] = (0.5, 0.5, 0.5),
    std: Sequence[float] = (0.5, 0.5, 0.5),
) -> tuple[torch.Tensor, tuple[int, int]]:
    """uint8 ``[H, W, 3]`` -> float32 patches ``[gh * gw, 3 * patch * patch]`` and the grid.

    ``x / 255`` is computed as float64 times float64(1/255), rounded once to float32, then
    ``(s - mean) / std`` in float32 (transformers' rescale; bitwise what ops.patchify does)."""
    image = torch.as_tensor(np.array(image_hwc, copy=True))
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[2] != 3:
        raise ValueError(f"patchify needs a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
    height, width, _ = image.shape
    gh, gw = merged_grid(height, width, patch, merge)
    padded = image.new_zeros((gh * patch, gw * patch, 3))
    padded[:height, :width] = image
    scaled = (padded.to(torch.float64) * (1.0 / 255.0)).to(torch.float32)
    values = (scaled - torch.tensor(mean, dtype=torch.float32)) / torch.tensor(
        std, dtype=torch.float32
    )
    units = values.reshape(gh // merge, merge, patch, gw // merge, merge, patch, 3)
    patches = units.permute(0, 3, 1, 4, 6, 2, 5).reshape(gh * gw, 3 * patch * patch)
    return patches.contiguous(), (gh, gw)


def image_block(merged_grids: Sequence[tuple[int, int]]) -> str:
    """The image block's text (special tokens only) for the merged grids of its scales."""
    parts = ["<img>"]
    for h, w in merged_grids:
        parts.append(("<IMG_CONTEXT>" * w + "<IMG_LINE_BREAK>") * h + "<IMG_FRAME_BREAK>")
    parts.append("</img>")
    return "".join(parts)


class NaViLImageProcessor:
    """PIL images -> ``pixel_values``, ``image_grid_hw`` and each image's block text.

    Settings come from the model config (:meth:`from_config`): patch size, merge, the patch
    bounds, the scale ratio and whether multi-scale packing is on."""

    def __init__(
        self,
        patch: int = 16,
        merge: int = 2,
        min_patches: int = 256,
        max_patches: int = 24576,
        max_aspect: float = 200.0,
        scale_ratio: float = 0.7071,
        multi_scale: bool = True,
    ) -> None:
        self.patch, self.merge = int(patch), int(merge)
        self.min_patches, self.max_patches = int(min_patches), int(max_patches)
        self.max_aspect, self.scale_ratio = float(max_aspect), float(scale_ratio)
        self.multi_scale = bool(multi_scale)

    @classmethod
    def from_config(cls, config: Any) -> NaViLImageProcessor:
        """From a ``NaViLChatConfig`` (official field names, see configuration_navil.py)."""
        vision = config.vision_config
        patch = vision["patch_size"] if isinstance(vision, dict) else vision.patch_size
        return cls(
            patch=patch,
            merge=round(1 / config.downsample_ratio),
            min_patches=config.min_dynamic_patch,
            max_patches=config.max_dynamic_patch,
            max_aspect=getattr(config, "max_aspect_ratio", 200.0),
            scale_ratio=config.scale_downsample_ratio,
            multi_scale=getattr(config, "use_multi_scale", True),
        )

    def scales(self, height: int, width: int) -> list[tuple[int, int]]:
        """Pixel sizes of the image's scales, smallest first."""
        return scales_for_image(
            height, width, self.patch, self.merge, self.min_patches, self.max_patches,
            self.max_aspect, self.scale_ratio, self.multi_scale,
        )  # fmt: skip

    def __call__(self, images: Sequence[Any]) -> dict[str, Any]:
        """``{"pixel_values", "image_grid_hw", "image_blocks"}`` for ``images`` in order."""
        from PIL import Image

        patches, grids, blocks = [], [], []
        for image in images:
            if not isinstance(image, Image.Image):
                image = Image.fromarray(np.asarray(image, dtype=np.uint8))
            image = image.convert("RGB")
            merged = []
            for h, w in self.scales(image.height, image.width):
                scaled = image
                if (image.height, image.width) != (h, w):
                    scaled = image.resize((w, h), Image.Resampling.BICUBIC)
                values, grid = patchify(np.asarray(scaled), self.patch, self.merge)
                patches.append(values)
                grids.append(grid)
                merged.append((grid[0] // self.merge, grid[1] // self.merge))
            blocks.append(image_block(merged))
        width = 3 * self.patch * self.patch
        return {
            "pixel_values": torch.cat(patches) if patches else torch.zeros(0, width),
            "image_grid_hw": torch.tensor(grids, dtype=torch.long).view(-1, 2),
            "image_blocks": blocks,
        }


def expand_images(text: str, blocks: Sequence[str]) -> str:
    """Replace each ``<image>`` in ``text`` by the next image block; their counts must match."""
    pieces = text.split("<image>")
    if len(pieces) - 1 != len(blocks):
        raise ValueError(f"{len(pieces) - 1} <image> placeholders for {len(blocks)} images")
    out = [pieces[0]]
    for block, piece in zip(blocks, pieces[1:], strict=True):
        out += [block, piece]
    return "".join(out)


class ReleasedImageProcessor:
    """``model.image_processor`` of the released NaViL API (NAVIL.md, "The released code's
    exact behaviour", 2 and 7): one image, one scale per call::

        out = processor(image, return_tensors="pt", min_pixels=..., max_pixels=...)
        out["pixel_values"]    float32 [gh * gw, 3 * P * P], merge-unit order
        out["image_grid_thw"]  int64 [[1, gh, gw]]

    The size is Qwen2-VL's ``smart_resize`` with factor 1 on the raw pixels (bicubic when it
    differs), then zero padding to multiples of ``patch * merge`` and ``(x / 255 - 0.5) / 0.5``.
    ``max_pixels`` may be the 0-dim float32 tensor the released demo computes for its smaller
    scales (``grid.prod() * P**2 * ratio**2``): the arithmetic below is written on the given
    objects, so it is the demo's (a float32 comparison and division), not a float64 copy."""

    def __init__(self, patch: int = 16, merge: int = 2, min_pixels: int = 256 * 256,
                 max_pixels: int = 24576 * 256) -> None:  # fmt: skip
        self.patch_size, self.merge_size, self.temporal_patch_size = int(patch), int(merge), 1
        self.min_pixels, self.max_pixels = min_pixels, max_pixels

    @classmethod
    def from_config(cls, config: Any) -> ReleasedImageProcessor:
        vision = config.vision_config
        patch = vision["patch_size"] if isinstance(vision, dict) else vision.patch_size
        area = patch * patch
        return cls(
            patch, round(1 / config.downsample_ratio),
            config.min_dynamic_patch * area, config.max_dynamic_patch * area,
        )  # fmt: skip

    @staticmethod
    def target_size(height: int, width: int, min_pixels: Any, max_pixels: Any) -> tuple[int, int]:
        """Qwen2-VL ``smart_resize(height, width, factor=1, min_pixels, max_pixels)``."""
        if max(height, width) / min(height, width) > 200:
            raise ValueError(f"image {height}x{width}: aspect ratio above 200")
        h, w = height, width
        if h * w > max_pixels:
            beta = math.sqrt((height * width) / max_pixels)
            h, w = max(1, math.floor(height / beta)), max(1, math.floor(width / beta))
        elif h * w < min_pixels:
            beta = math.sqrt(min_pixels / (height * width))
            h, w = math.ceil(height * beta), math.ceil(width * beta)
        return int(h), int(w)

    def __call__(self, image: Any, return_tensors: str | None = "pt", min_pixels: Any = None,
                 max_pixels: Any = None, **kwargs: Any) -> dict[str, torch.Tensor]:  # fmt: skip
        from PIL import Image

        if isinstance(image, (list, tuple)):
            if len(image) != 1:
                raise ValueError("one image per call (the released demo's use)")
            image = image[0]
        if not isinstance(image, Image.Image):
            image = Image.fromarray(np.asarray(image, dtype=np.uint8))
        image = image.convert("RGB")
        lo = self.min_pixels if min_pixels is None else min_pixels
        hi = self.max_pixels if max_pixels is None else max_pixels
        h, w = self.target_size(image.height, image.width, lo, hi)
        if (h, w) != (image.height, image.width):
            image = image.resize((w, h), Image.Resampling.BICUBIC)
        values, (gh, gw) = patchify(np.asarray(image), self.patch_size, self.merge_size)
        return {"pixel_values": values, "image_grid_thw": torch.tensor([[1, gh, gw]])}
