"""Python front of the csrc/ ops, each with a pure-Python/PyTorch reference.

Imports only ``config/`` and the compiled extension (see DESIGN.md, "Import rules").
"""

from megatron_navil.ops.geometry import ImageGeometry
from megatron_navil.ops.grid import (
    merged_grid,
    merged_grid_reference,
    native_available,
    native_import_error,
)
from megatron_navil.ops.pack import PackPlan, plan_packing, plan_packing_reference
from megatron_navil.ops.patchify import (
    patchify,
    patchify_batch,
    patchify_batch_reference,
    patchify_reference,
)
from megatron_navil.ops.patchify_cuda import patchify_batch_cuda
from megatron_navil.ops.positions import (
    patch_positions,
    patch_positions_reference,
    vision_cu_seqlens,
    vision_cu_seqlens_reference,
    vision_kwargs,
    window_permutation,
    window_permutation_reference,
)
from megatron_navil.ops.resize import smart_resize, smart_resize_reference
from megatron_navil.ops.vmp import (
    image_token_layout,
    image_token_layout_reference,
    scales_for_image,
    scales_for_image_reference,
)

__all__ = [
    "ImageGeometry",
    "PackPlan",
    "image_token_layout",
    "image_token_layout_reference",
    "merged_grid",
    "merged_grid_reference",
    "native_available",
    "native_import_error",
    "patch_positions",
    "patch_positions_reference",
    "patchify",
    "patchify_batch",
    "patchify_batch_cuda",
    "patchify_batch_reference",
    "patchify_reference",
    "plan_packing",
    "plan_packing_reference",
    "scales_for_image",
    "scales_for_image_reference",
    "smart_resize",
    "smart_resize_reference",
    "vision_cu_seqlens",
    "vision_cu_seqlens_reference",
    "vision_kwargs",
    "window_permutation",
    "window_permutation_reference",
]
