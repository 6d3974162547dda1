"""Python front of the csrc/ ops, each with a pure-Python/PyTorch reference.

Imports only ``config/`` and the compiled extension (see DESIGN.md, "Import rules").
"""

from megatron_navil.ops.grid import (
    merged_grid,
    merged_grid_reference,
    native_available,
    native_import_error,
)
from megatron_navil.ops.patchify import (
    patchify,
    patchify_batch,
    patchify_batch_reference,
    patchify_reference,
)
from megatron_navil.ops.resize import smart_resize, smart_resize_reference

__all__ = [
    "merged_grid",
    "merged_grid_reference",
    "native_available",
    "native_import_error",
    "patchify",
    "patchify_batch",
    "patchify_batch_reference",
    "patchify_reference",
    "smart_resize",
    "smart_resize_reference",
]
