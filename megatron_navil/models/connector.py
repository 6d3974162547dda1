"""Pixel shuffle + MLP connector from the vision encoder's width W to the LLM's hidden size H.

Layouts:
  x          [t, W]        vision encoder output in patchify's merge-unit order, replicated
  shuffled   [t/m^2, m^2*W] one row per merge unit: [p00, p01, p10, p11] concatenated (m = 2)
  hidden     [t/m^2, H/tp] this rank's slice after the column-parallel Linear
  output     [t/m^2, H]    one LLM token per merge unit, replicated over the TP group

Because patchify already emits the ``m x m`` patches of a merge unit contiguously and row-major
(ops/patchify.py), the pixel shuffle is a reshape. Then ``LayerNorm(m^2 W) -> Linear(m^2 W, H)
-> GELU -> Linear(H, H)``, children named like the official ``mlp1`` Sequential: ``0``
(LayerNorm), ``1`` (Linear, mcore ColumnParallelLinear) and ``3`` (Linear, RowParallelLinear);
index 2 is the parameter-free GELU. Parameter names below ``mlp1.``: ``0.{weight,bias}``,
``1.{weight,bias}``, ``3.{weight,bias}``, official layouts. The LayerNorm is replicated.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megatron_navil.models.tp import (
    ProcessGroup,
    ShardedModule,
    linear_config,
    mark_tensor_parallel,
)


def pixel_shuffle(x_td: torch.Tensor, merge: int = 2) -> torch.Tensor:
    """``[t, W] -> [t / merge^2, merge^2 * W]``: concatenate each merge unit's patches.

    Raises:
        ValueError: ``x_td`` not 2-D, or ``t`` not a multiple of ``merge^2``.
    """
    unit = merge * merge
    if x_td.dim() != 2 or x_td.shape[0] % unit:
        raise ValueError(
            f"pixel_shuffle: expected [t, W] with t a multiple of merge^2={unit} (whole merge "
            f"units), got {tuple(x_td.shape)}"
        )
    return x_td.reshape(x_td.shape[0] // unit, unit * x_td.shape[1])


class Connector(ShardedModule):
    """``forward(x [t, W]) -> [t / merge^2, hidden]``, column-then-row parallel over TP.

    Args:
        vision_width: W, the encoder's output width.
        hidden: H, the LLM hidden size; must be divisible by the TP group's size.
        mcore_config: the model's megatron-core TransformerConfig (a copy without sequence
            parallelism builds the linears).
        tp_group: the group the hidden units are split over (required; size 1: replicated).
        merge: patches per side of a merge unit (ConnectorConfig.merge).
        norm_eps: LayerNorm epsilon (ConnectorConfig.norm_eps).
        replica_group: see VisionEncoder (checkpoint replica ids only).
    """

    def __init__(
        self,
        vision_width: int,
        hidden: int,
        mcore_config: Any,
        tp_group: ProcessGroup,
        *,
        merge: int = 2,
        norm_eps: float = 1e-5,
        replica_group: ProcessGroup | None = None,
    ) -> None:
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
        from megatron.core.utils import init_method_normal

        super().__init__(mcore_config, tp_group, replica_group)
        tp = self.tp_size
        if hidden % tp:
            raise ValueError(f"Connector: hidden={hidden} does not split over {tp} TP ranks")
        self.merge = merge
        width = merge * merge * vision_width
        lin_cfg = linear_config(mcore_config)
        init = init_method_normal(mcore_config.init_method_std)
        self.add_module(
            "0", torch.nn.LayerNorm(width, eps=norm_eps, dtype=mcore_config.params_dtype)
        )
        self.add_module(
            "1",
            ColumnParallelLinear(
                width, hidden, config=lin_cfg, init_method=init, bias=True,
                gather_output=False, tp_group=tp_group,
            ),
        )  # fmt: skip
        self.add_module(
            "3",
            RowParallelLinear(
                hidden, hidden, config=lin_cfg, init_method=init, bias=True,
                input_is_parallel=True, skip_bias_add=False, tp_group=tp_group,
            ),
        )  # fmt: skip
        norm, fc1, fc2 = self.parts()
        split = 0 if tp > 1 else None
        for p in norm.parameters():
            mark_tensor_parallel(p, None)
        mark_tensor_parallel(fc1.weight, split)
        mark_tensor_parallel(fc1.bias, split)
        mark_tensor_parallel(fc2.weight, 1 if tp > 1 else None)
        mark_tensor_parallel(fc2.bias, None)

    def parts(self) -> tuple[torch.nn.LayerNorm, torch.nn.Module, torch.nn.Module]:
        """The LayerNorm (``0``), first Linear (``1``) and second Linear (``3``)."""
        return getattr(self, "0"), getattr(self, "1"), getattr(self, "3")

    def forward(self, x_td: torch.Tensor) -> torch.Tensor:
        norm, fc1, fc2 = self.parts()
        h = norm(pixel_shuffle(x_td, self.merge)).unsqueeze(1)  # mcore linears: [s, b, h]
        h, _ = fc1(h)
        h, _ = fc2(F.gelu(h))
        return h.squeeze(1)
