"""RMSNorm, optionally over a width split across a tensor-parallel group (full-width QK-norm).

Layouts: ``x [..., width]`` where ``width`` is this rank's slice of ``full_width`` features
(the whole width when the group has one rank); ``weight [width]`` is the same slice of the
full weight.

``y = weight * x / sqrt(sum(x^2 over full_width) / full_width + eps)``, computed in float32 and
cast back (InternViT's RMSNorm). Under TP the per-rank sums of squares are added with an
all-reduce whose backward is an all-reduce too: each rank's loss depends on every rank's
features through that sum, so the gradient of a rank's slice collects the contributions of all
ranks. (megatron's ``reduce_from_tensor_model_parallel_region`` has an identity backward, which
is only right when the reduced value feeds a replicated computation; here it would drop the
cross-rank terms. tests/distributed/test_vision_tp.py shows the difference.)
"""

from __future__ import annotations

from typing import Any

import torch


class _AllReduceSum(torch.autograd.Function):
    """Sum over ``group`` in the forward AND in the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, group: Any) -> torch.Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        out = grad.clone(memory_format=torch.contiguous_format)
        torch.distributed.all_reduce(out, group=ctx.group)
        return out, None


def all_reduce_sum(x: torch.Tensor, group: Any) -> torch.Tensor:
    """Autograd-correct sum over ``group`` (identity for None or a group of size 1)."""
    if group is None or group.size() == 1:
        return x
    return _AllReduceSum.apply(x, group)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    full_width: int | None = None,
    group: Any = None,
) -> torch.Tensor:
    """RMSNorm of ``x``'s last dimension; see the module doc for ``full_width`` / ``group``."""
    x32 = x.float()
    sum_sq = all_reduce_sum(x32.pow(2).sum(-1, keepdim=True), group)
    x32 = x32 * torch.rsqrt(sum_sq / (full_width or x.shape[-1]) + eps)
    return weight * x32.to(x.dtype)


class RMSNorm(torch.nn.Module):
    """RMSNorm with a ``weight`` of this rank's ``width`` features (init 1).

    ``full_width`` / ``group``: the features are a slice of ``full_width`` split over
    ``group`` and the statistic is taken over all of them (the encoder's QK-norm).
    """

    def __init__(
        self,
        width: int,
        eps: float,
        *,
        full_width: int | None = None,
        group: Any = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.eps = eps
        self.full_width = full_width or width
        self.group = group
        self.weight = torch.nn.Parameter(torch.ones(width, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, full_width=self.full_width, group=self.group)
