"""Python front of the csrc/ ops, each with a pure-Python/PyTorch reference.

Imports only ``config/`` and the compiled extension (see DESIGN.md, "Import rules").
"""

from megatron_navil.ops.grid import (
    merged_grid,
    merged_grid_reference,
    native_available,
    native_import_error,
)

__all__ = ["merged_grid", "merged_grid_reference", "native_available", "native_import_error"]
