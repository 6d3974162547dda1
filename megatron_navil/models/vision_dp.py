"""The vision tower data-parallel over the tensor-parallel ranks (``--vision-parallel dp``).

With ``tp`` (the default) the tower's heads are split over the model's TP group, or, when they
do not divide it (navil-2b: 23 heads), every TP rank runs the whole tower on the whole
micro-batch: TP-fold the same work. With ``dp`` the tower and connector are whole (unsplit)
on every TP rank of the first pipeline stage and the ranks split the micro-batch's image
*segments* (one per image and scale, ``vision_cu_seqlens``) between them: each encodes its
share, and the connector's outputs are gathered back in segment order, so every rank holds
the same features as one process would.

* Assignment (:func:`assign_segments`): longest-processing-time by a segment's cost, the vision
  FLOP formula's ``a p + b p**2`` for ``p`` patches (per-patch matmuls, per-image attention);
  deterministic from ``vision_cu_seqlens`` alone, so every rank computes the same split. A
  rank may get no segment (fewer segments than ranks): it still joins the gather.
* Gather (:class:`_GatherSegments`): each rank's features are padded to the largest share and
  all-gathered over the TP group. Backward: the features' gradient is the same on every TP rank
  (the LLM's TP/SP backward all-reduces / all-gathers it), so each rank takes its own rows.
* Gradients: a rank's vision and connector gradients then hold its segments' part only; their
  parameters are marked ``sequence_parallel`` so that megatron-core's ``finalize_model_grads``
  sums them over the TP group (``_allreduce_non_tensor_model_parallel_grads``, as it does for
  sequence-parallel norms; the model's TP > 1 always runs with sequence parallelism), before
  the usual data-parallel reduction.

Windowed blocks (``fullatt_block_indexes``): windows never cross a segment and the window
order keeps segments in place, so a segment's slice of ``vision_window_index`` (minus its
start) and of ``vision_window_cu_seqlens`` are its own window inputs.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from megatron_navil.ops.balance import lpt


def assign_segments(
    lengths: list[int], ranks: int, linear: float, square: float
) -> list[list[int]]:
    """Segment indices for each of ``ranks`` ranks (ascending), dealt costliest first to the
    least loaded rank (``ops.balance.lpt``); a segment of ``p`` patches costs
    ``linear * p + square * p**2``."""
    return lpt([linear * p + square * p * p for p in lengths], ranks)


class _GatherSegments(torch.autograd.Function):
    """All-gather of each rank's ``[n_r, H]`` rows over ``group`` (``counts[r] = n_r``) into
    ``[sum n_r, H]`` in rank order; backward: this rank's rows of the gradient (module doc),
    summed over ``group`` first when ``partial`` (context parallelism: each CP rank's loss
    reaches only the image tokens of its own chunks)."""

    @staticmethod
    def forward(
        ctx: Any, local: torch.Tensor, counts: list[int], group: Any, partial: bool
    ) -> torch.Tensor:
        rank = torch.distributed.get_rank(group)
        ctx.group, ctx.partial = group, partial
        ctx.start, ctx.stop = sum(counts[:rank]), sum(counts[: rank + 1])
        width = max(counts)
        padded = local.new_zeros(width, local.shape[1])
        padded[: local.shape[0]] = local
        every = [torch.empty_like(padded) for _ in counts]
        torch.distributed.all_gather(every, padded.contiguous(), group=group)
        return torch.cat([g[:n] for g, n in zip(every, counts, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        if ctx.partial:  # each rank holds part of the gradient: sum them first
            grad = grad.contiguous()
            torch.distributed.all_reduce(grad, group=ctx.group)
        return grad[ctx.start : ctx.stop], None, None, None


def mark_tp_summed(*modules: torch.nn.Module) -> None:
    """Have ``finalize_model_grads`` sum these modules' gradients over the TP group."""
    for module in modules:
        for param in module.parameters():
            param.sequence_parallel = True


def encode_data_parallel(
    vision: torch.nn.Module,
    connector: torch.nn.Module,
    group: Any,
    patches: torch.Tensor,
    positions: torch.Tensor,
    cu_seqlens: torch.Tensor,
    window_index: torch.Tensor | None,
    window_cu_seqlens: torch.Tensor | None,
    merge: int,
    cost: tuple[float, float],
    out_features: int,
    partial_grads: bool = False,
) -> torch.Tensor:
    """The connector's ``[patches / merge**2, out_features]`` features of every segment, in
    segment order, this rank encoding only its share (module doc). Collective over
    ``group``. ``partial_grads``: the features' gradient differs between the ranks and is
    their sum (the CP group; False: the TP group, where every rank has the whole gradient);
    the parameters' gradients are then summed by megatron-core's DDP over DP x CP."""
    bounds = cu_seqlens.tolist()
    lengths = [b - a for a, b in itertools.pairwise(bounds)]
    shares = assign_segments(lengths, torch.distributed.get_world_size(group), *cost)
    mine = shares[torch.distributed.get_rank(group)]
    unit = merge * merge
    if mine:
        rows = torch.cat([torch.arange(bounds[s], bounds[s + 1]) for s in mine])
        rows = rows.to(patches.device)
        sub_cu = torch.tensor([0, *torch.tensor([lengths[s] for s in mine]).cumsum(0).tolist()])
        sub_cu = sub_cu.to(device=cu_seqlens.device, dtype=cu_seqlens.dtype)
        sub_index = sub_window_cu = None
        if window_index is not None:
            sub_index = _sub_window_index(window_index, bounds, mine)
        if window_cu_seqlens is not None:
            sub_window_cu = _sub_window_cu(window_cu_seqlens, bounds, mine)
        local = connector(vision(patches[rows], positions[rows], sub_cu, sub_index, sub_window_cu))
    else:  # no segment here: an empty share that still joins the gather
        weight = next(connector.parameters())
        local = weight.new_zeros(0, out_features, requires_grad=weight.requires_grad)
    counts = [sum(lengths[s] for s in share) // unit for share in shares]
    gathered = _GatherSegments.apply(local, counts, group, partial_grads)
    # rows of the gathered features per segment, then the segments in their packed order
    starts, offset = {}, 0
    for share in shares:
        for s in share:
            starts[s] = offset
            offset += lengths[s] // unit
    order = torch.cat(
        [torch.arange(starts[s], starts[s] + lengths[s] // unit) for s in range(len(lengths))]
    )
    return gathered.index_select(0, order.to(gathered.device))


def _sub_window_index(index: torch.Tensor, bounds: list[int], segments: list[int]) -> torch.Tensor:
    parts, offset = [], 0
    for s in segments:
        a, b = bounds[s], bounds[s + 1]
        parts.append(index[a:b] - a + offset)
        offset += b - a
    return torch.cat(parts)


def _sub_window_cu(window_cu: torch.Tensor, bounds: list[int], segments: list[int]) -> torch.Tensor:
    cu = window_cu.tolist()
    out, offset = [0], 0
    for s in segments:
        a, b = bounds[s], bounds[s + 1]
        inside = [x for x in cu if a < x <= b]  # the segment's window ends
        out += [x - a + offset for x in inside]
        offset += b - a
    return torch.tensor(out, dtype=window_cu.dtype, device=window_cu.device)
