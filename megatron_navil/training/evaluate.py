"""Held-out evaluation during training: the loss of fixed held-out batches, per corpus and
overall, under the same packing and loss weighting as training.

Each held-out corpus is an :class:`EvalSet`: a batch source (the packed-sequence loader over
that corpus alone, or synthetic batches in tests) and its position at the start. An evaluation
rewinds every set to that position and runs ``iters`` global batches of it through
megatron-core's pipeline schedule with ``forward_only=True`` under ``torch.no_grad()``, so

* every evaluation of a run sees the same sequences (losses at different steps compare), and a
  resumed run evaluates exactly what the uninterrupted run did at the same step;
* the held-out loss is ``sum(w_i * l_i) / sum(w_i)`` over the loss tokens ``i`` of those
  batches, with the training objective's weights ``w`` (``training.step``), summed over
  micro-batches, pipeline stages and data-parallel ranks in float64: the same number, up to
  float rounding, in every parallel layout (tests/distributed/test_evaluate.py);
* nothing the training step uses changes: parameters, gradients, optimizer, RNG state and the
  training data's position (the model's layers draw no random numbers: no dropout).

The overall loss is the weight-pooled mean over every set (a token of a large set counts as
much as one of a small set), the per-corpus losses are each set's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_navil.parallel.groups import ParallelGroups
from megatron_navil.training.microbatch import MicroBatch
from megatron_navil.training.optim import sync_params
from megatron_navil.training.step import collective_device


@dataclass
class EvalSet:
    """One held-out corpus: a ``training.loop.BatchSource`` and its start position."""

    name: str  # the label in the logs (e.g. the corpus directory's name)
    source: Any  # training.loop.BatchSource over the held-out corpus alone
    start: dict[str, Any] = field(default_factory=dict)  # its state_dict() before any batch

    def __post_init__(self) -> None:
        if not self.start:
            self.start = self.source.state_dict()

    def rewind(self) -> None:
        """Back to the first held-out batch."""
        self.source.load_state_dict(self.start)


@dataclass
class EvalResult:
    """One evaluation; the same on every rank."""

    loss: float  # weight-pooled over every set
    losses: dict[str, float]  # per set
    loss_tokens: int  # tokens with a loss, over every set

    def log_entry(self) -> dict[str, Any]:
        """The ``progress.txt`` fields (no ``loss`` key: that one is the training loss's)."""
        return {"eval_loss": self.loss, "eval_losses": self.losses,
                "eval_loss_tokens": self.loss_tokens}  # fmt: skip


def eval_sums(
    chunks: list[Any],
    mcore_config: Any,
    groups: ParallelGroups,
    micro_batches: Sequence[MicroBatch],
    seq_length: int,
) -> tuple[float, float, int]:
    """``(sum(w * l), sum(w), loss tokens)`` of one global batch (this rank's
    ``micro_batches``), summed over the pipeline and data-parallel (x context-parallel)
    groups. Collective over the
    whole world; no gradient is computed."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        weights = batch.local_loss_weights(groups.cp).to(torch.float64)
        out = model(**batch.inputs)

        def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            weighted = (per_token.double() * weights.to(per_token.device)).sum()
            report = torch.stack([weighted, weights.sum().to(weighted)]).cpu()
            return weighted.float(), {"sums": report}

        return out, loss_func

    sync_params(chunks)  # overlapped param gather: the weights of the last optimizer step
    iters = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    with torch.no_grad():
        reports = get_forward_backward_func()(
            forward_step_func=forward_step,
            data_iterator=iters,
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(micro_batches),
            seq_length=seq_length,
            micro_batch_size=1,
            forward_only=True,
        )
    device = collective_device()
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    if groups.is_last_stage():
        for r in reports:
            sums[:2] += r["sums"].to(device)
    # every stage (and CP rank) holds the labels: count the loss tokens on the first stage's
    # first CP rank, so the sums count them once
    if groups.is_first_stage() and groups.cp_rank == 0:
        sums[2] = float(sum(mb.loss_tokens for mb in micro_batches))
    torch.distributed.all_reduce(sums, group=groups.pp)
    # under CP each rank's weighted sums cover its own chunks: sum them over DP x CP
    torch.distributed.all_reduce(sums, group=groups.dp_cp if groups.cp_size > 1 else groups.dp)
    return float(sums[0]), float(sums[1]), int(sums[2])


def evaluate(
    chunks: list[Any],
    mcore_config: Any,
    groups: ParallelGroups,
    sets: Sequence[EvalSet],
    iters: int,
    seq_length: int,
) -> EvalResult:
    """The held-out loss of the first ``iters`` global batches of every set (module doc).
    Collective over the whole world; the model is put back in training mode after."""
    if iters < 1:
        raise ValueError(f"eval iters must be >= 1, got {iters}")
    for chunk in chunks:
        chunk.eval()
    try:
        losses, total_wl, total_w, tokens = {}, 0.0, 0.0, 0
        for s in sets:
            s.rewind()
            wl = w = 0.0
            for _ in range(iters):
                a, b, n = eval_sums(chunks, mcore_config, groups, s.source.next_step(), seq_length)
                wl, w, tokens = wl + a, w + b, tokens + n
            losses[s.name] = wl / w if w > 0 else float("nan")
            total_wl, total_w = total_wl + wl, total_w + w
    finally:
        for chunk in chunks:
            chunk.train()
    overall = total_wl / total_w if total_w > 0 else float("nan")
    return EvalResult(loss=overall, losses=losses, loss_tokens=tokens)


def set_names(paths: Sequence[str]) -> list[str]:
    """Log labels of held-out corpora: each directory's name, made unique with ``#k``
    (``shards/val`` and ``other/val`` -> ``val``, ``val#2``)."""
    from pathlib import Path

    names: list[str] = []
    for p in paths:
        base = Path(str(p).rstrip("/")).name or str(p)
        name, k = base, 1
        while name in names:
            k += 1
            name = f"{base}#{k}"
        names.append(name)
    return names
