"""``ImageGeometry``: how an image becomes vision patches, as one object.

The model's image settings (``config.model.ImageConfig``) plus the vision tower's patch size and
the connector's merge: the resize bounds, the aspect limit, multi-scale packing and its ratio,
and the per-channel normalisation. The indexer records it in a corpus's manifest (``image``),
the loader normalises pixels with the manifest's mean and std, and inference prepares images
from the model's config: all through this object, so an image is sized and normalised the same
way everywhere. :meth:`ImageGeometry.scales` is the one place that decides between the
multi-scale chain and the single base scale.

The kernels underneath (``smart_resize``, ``scales_for_image``, ``patchify_batch``) keep their
explicit arguments: they mirror the C++ ops and the standalone copies in ``hf/``, and their
tests compare them with transformers' functions argument by argument.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from megatron_navil.config.model import ImageConfig, NaViLConfig
from megatron_navil.ops.grid import merged_grid
from megatron_navil.ops.patchify import NAVIL_MEAN, NAVIL_STD, patchify_batch
from megatron_navil.ops.resize import smart_resize
from megatron_navil.ops.vmp import NAVIL_SCALE_RATIO, Size, scales_for_image


@dataclass(frozen=True)
class ImageGeometry:
    """Patch size, merge, resize bounds, multi-scale packing and normalisation of images
    (defaults: NaViL's)."""

    patch: int = 16
    merge: int = 2
    min_patches: int = 256
    max_patches: int = 24576
    max_aspect: float = 200.0
    multi_scale: bool = True
    scale_ratio: float = NAVIL_SCALE_RATIO
    mean: tuple[float, float, float] = NAVIL_MEAN
    std: tuple[float, float, float] = NAVIL_STD

    @classmethod
    def of_config(cls, cfg: NaViLConfig) -> ImageGeometry:
        """The geometry of model ``cfg``: its ``ImageConfig``, vision patch and merge."""
        im = cfg.image
        fields = {f.name: getattr(im, f.name) for f in dataclasses.fields(ImageConfig)}
        return cls(patch=cfg.vision.patch, merge=cfg.connector.merge, **fields)

    @classmethod
    def from_manifest(cls, image: Mapping[str, Any]) -> ImageGeometry:
        """The geometry a corpus manifest's ``image`` section records; the normalisation of a
        corpus indexed before manifests recorded it is NaViL's (0.5, 0.5), which was the
        only one then. Other keys (``config``, ``rule``) are the manifest's, not geometry."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {k: v for k, v in image.items() if k in names}
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(x) for x in values[key])
        return cls(**values)

    def to_manifest(self) -> dict[str, Any]:
        """The JSON form (``from_manifest`` reads it back)."""
        out = dataclasses.asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        return out

    def scales(self, height: int, width: int) -> list[Size]:
        """The pixel sizes to resample a ``height x width`` image to, smallest first: the
        multi-scale chain (``ops.scales_for_image``) or, without multi-scale packing, the base
        scale alone (``ops.smart_resize``). ValueError as those raise it."""
        bounds = (self.patch, self.merge, self.min_patches, self.max_patches, self.max_aspect)
        if self.multi_scale:
            return scales_for_image(height, width, *bounds, self.scale_ratio)
        return [tuple(smart_resize(height, width, *bounds))]  # type: ignore[list-item]

    def grid(self, height: int, width: int) -> tuple[int, int]:
        """The padded patch grid ``(gh, gw)`` of an image resampled to ``height x width``."""
        gh, gw = merged_grid(height, width, self.patch, self.merge)
        return int(gh), int(gw)

    def patchify(
        self, images: Sequence[np.ndarray | torch.Tensor], dtype: torch.dtype = torch.float32
    ) -> tuple[torch.Tensor, list[tuple[int, int]]]:
        """``ops.patchify_batch`` of uint8 ``[H, W, 3]`` images (already at their scales) with
        this geometry's patch, merge, mean and std."""
        return patchify_batch(images, self.patch, self.merge, self.mean, self.std, dtype)
