"""Per-modality matrix products on a text-first sorted token block: one grouped GEMM where the
backend has one, else one plain matmul per group.

Layouts: ``x_sorted`` ``[t, K]`` whose rows come in consecutive groups of ``sizes`` rows (text
then visual for the modality experts); ``weights[i]`` ``[N, K]`` (``torch.nn.Linear`` layout);
the result is ``[t, N]``, group ``i``'s rows times ``weights[i].T``.

Backends:
  grouped GEMM  ``torch.nn.functional.grouped_mm`` (``torch._grouped_mm``): one kernel for all
                groups. torch 2.13 documents it for bf16 on CUDA with compute capability >= 8.0
                and 16-byte aligned strides (``_meta_registrations._meta_grouped_mm_common``), so
                it is used only there. The weights are stacked into ``[G, N, K]`` each call
                (one copy of the expert weights; with two large groups the gain over two
                matmuls is the saved launch and tail, small, so the copy is kept visible here).
  matmuls       ``F.linear`` per group (CPU, fp32, other GPUs): an empty group gives a zero
                gradient for its weight, not a missing one.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def grouped_mm_usable(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> bool:
    """Whether :func:`grouped_linear` may use torch's grouped GEMM for these operands (see the
    module doc for the constraints, which are torch's CUDA kernel's)."""
    grouped_mm = getattr(F, "grouped_mm", None)
    if grouped_mm is None or not x.is_cuda or x.dtype != torch.bfloat16:
        return False
    if any(w.dtype != torch.bfloat16 or w.device != x.device for w in weights):
        return False
    if torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    alignment = 16 // x.element_size()  # 16-byte aligned rows and columns
    return x.shape[-1] % alignment == 0 and weights[0].shape[0] % alignment == 0


def grouped_linear(
    x_sorted: torch.Tensor,
    sizes: Sequence[int],
    weights: Sequence[torch.Tensor],
    grouped: bool | None = None,
) -> torch.Tensor:
    """``[t, K]`` rows in groups of ``sizes`` -> ``[t, N]``, each group through its weight.

    ``grouped``: force (True) or forbid (False) the grouped GEMM; None decides with
    :func:`grouped_mm_usable`."""
    if len(sizes) != len(weights) or sum(sizes) != x_sorted.shape[0]:
        raise ValueError(
            f"grouped_linear: group sizes {list(sizes)} must match {len(weights)} weights and "
            f"the {x_sorted.shape[0]} rows"
        )
    if grouped is None:
        grouped = grouped_mm_usable(x_sorted, weights)
    if grouped:
        ends = torch.tensor(sizes, dtype=torch.int32).cumsum(0, dtype=torch.int32)
        stacked = torch.stack(list(weights)).transpose(-2, -1)  # [G, K, N], column-major
        return F.grouped_mm(x_sorted, stacked, offs=ends.to(x_sorted.device))
    blocks = x_sorted.split(list(sizes))
    return torch.cat([F.linear(b, w) for b, w in zip(blocks, weights, strict=True)])
