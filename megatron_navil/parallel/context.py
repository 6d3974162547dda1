"""Context parallelism (CP): one packed sequence split over the ranks of the CP group.

The split (:func:`local_token_index`): the sequence of ``t`` tokens is cut into ``2 N`` equal
chunks for ``N`` CP ranks and rank ``r`` holds chunks ``r`` and ``2N - 1 - r`` (the usual
causal load balance: an early chunk has few keys, its partner many). Everything that depends on
the whole sequence (position ids, labels, loss weights, the visual-token mask, the per-sample
``cu_seqlens``) is computed on the whole sequence first and then indexed with the same rows.

The exchange (:class:`GatherSequence`): all-gather of this rank's rows into the whole sequence
in global order (keys and values of the attention); backward: the gradients of the whole
sequence summed over the group, of which each rank keeps its own rows (reduce-scatter on NCCL;
gloo has none, so there all-reduce and slice).
"""

from __future__ import annotations

from typing import Any

import torch


def split_problem(t: int, cp: int, tp: int = 1) -> str | None:
    """Why a packed length ``t`` cannot be split over ``cp`` ranks (one line), or None: it must
    divide into ``2 cp`` chunks, and under sequence parallelism a rank's ``t / cp`` tokens must
    divide over ``tp``."""
    if cp < 1:
        return f"context parallel size must be >= 1, got {cp}"
    if cp == 1:
        return None if t % tp == 0 else f"packed length {t} is not a multiple of TP={tp}"
    if t % (2 * cp):
        return (
            f"packed length {t} does not split into 2*cp={2 * cp} equal chunks for context "
            f"parallelism (pad the sequence length to a multiple of {2 * cp})"
        )
    if (t // cp) % tp:
        return f"a CP rank's {t // cp} tokens are not a multiple of TP={tp} (sequence parallel)"
    return None


def local_token_index(
    t: int, cp: int, rank: int, device: torch.device | None = None
) -> torch.Tensor:
    """Global positions (int64 ``[t / cp]``, ascending) of the tokens CP rank ``rank`` of
    ``cp`` holds: chunks ``rank`` and ``2 cp - 1 - rank`` of ``2 cp``. ValueError when ``t``
    does not split (:func:`split_problem`)."""
    problem = split_problem(t, cp)
    if problem:
        raise ValueError(problem)
    if cp == 1:
        return torch.arange(t, device=device)
    chunk = t // (2 * cp)
    first, second = rank, 2 * cp - 1 - rank
    return torch.cat(
        [
            torch.arange(first * chunk, (first + 1) * chunk, device=device),
            torch.arange(second * chunk, (second + 1) * chunk, device=device),
        ]
    )


def local_chunks(t: int, cp: int, rank: int) -> list[tuple[int, int]]:
    """The ``(start, end)`` global rows of this rank's two chunks, in local order."""
    chunk = t // (2 * cp)
    return [(c * chunk, (c + 1) * chunk) for c in (rank, 2 * cp - 1 - rank)]


class GatherSequence(torch.autograd.Function):
    """``[t / cp, ...]`` local rows -> ``[t, ...]`` the whole sequence in global order, over
    ``group``; backward: the whole sequence's gradient summed over the group, this rank's
    rows (module docstring)."""

    @staticmethod
    def forward(ctx: Any, local: torch.Tensor, group: Any) -> torch.Tensor:
        cp, rank = group.size(), group.rank()
        t = local.shape[0] * cp
        parts = [torch.empty_like(local) for _ in range(cp)]
        torch.distributed.all_gather(parts, local.contiguous(), group=group)
        order = torch.cat([local_token_index(t, cp, r, local.device) for r in range(cp)])
        full = torch.empty((t, *local.shape[1:]), dtype=local.dtype, device=local.device)
        full[order] = torch.cat(parts)
        ctx.group, ctx.order, ctx.rank, ctx.n = group, order, rank, local.shape[0]
        return full

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        by_rank = grad[ctx.order].contiguous()  # rank 0's rows, then rank 1's, ...
        if torch.distributed.get_backend(ctx.group) == "nccl":
            out = by_rank.new_empty((ctx.n, *grad.shape[1:]))
            torch.distributed.reduce_scatter_tensor(out, by_rank, group=ctx.group)
            return out, None
        torch.distributed.all_reduce(by_rank, group=ctx.group)
        return by_rank[ctx.rank * ctx.n : (ctx.rank + 1) * ctx.n], None


def gather_sequence(local: torch.Tensor, group: Any) -> torch.Tensor:
    """:class:`GatherSequence` (differentiable all-gather into global order)."""
    return GatherSequence.apply(local, group)
