"""One training step: megatron-core's pipeline schedule over this rank's micro-batches, loss
normalised over the whole global batch, NaN/inf guard, optimizer and LR-scheduler step.

Loss normalisation: the objective of a step is ``sum(w_i * l_i) / sum(w_i)`` over every loss
token ``i`` of the global batch (all micro-batches, all data-parallel ranks), where ``w_i`` is the
token's loss weight (1 for per-token weighting, ``1/n`` or ``1/sqrt(n)`` for per-sample or
square weighting of a sample with ``n`` loss tokens). The denominator is all-reduced over DP
before the schedule runs; megatron-core then divides each micro-batch's loss by the number of
micro-batches and DDP averages gradients over DP, so each micro-batch returns
``sum(w l) * M * D / W`` and the gradients are exactly those of the objective.

Context parallelism (``groups.cp``, ``C`` ranks sharing each micro-batch): the weights and
counts are those of the whole micro-batches, all-reduced over DP only (every CP rank of a
replica holds the same ones, so that is the global denominator of DP x CP); each CP rank's
micro-batch returns ``sum(w l)`` over its own chunks times the same ``M * D / W``.
megatron-core's schedule multiplies a micro-batch's loss by ``C`` and DDP averages over
DP x CP, which cancel; the per-rank gradients sum to those of the whole sequence (the keys'
and values' gradients are summed over CP in the attention's backward), so the gradients are
again exactly the objective's. The reported loss is summed over DP x CP. (megatron-core's
own ``calculate_per_token_loss`` counts integer tokens only, so it cannot carry float weights.)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_navil.parallel.groups import ParallelGroups
from megatron_navil.training.microbatch import MicroBatch
from megatron_navil.training.optim import finish_param_gather, start_param_gather


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or inf and the policy is to stop."""


@dataclass
class StepResult:
    """What a step did; the same on every rank."""

    loss: float  # the step's objective (weighted mean over the global batch)
    grad_norm: float | None  # after clipping's measurement; None when the step was skipped
    skipped: bool  # NaN/inf loss under the "skip" policy: no parameter changed
    loss_tokens: int  # tokens with a loss in the global batch
    tokens: int  # real (non-padding) tokens in the global batch
    patches: int  # vision-encoder patches in the global batch
    lr: float
    model_flops: float = 0.0  # the micro-batches' ``model_flops`` summed over the global batch
    image_tokens: int = 0  # LLM tokens of image blocks in the global batch


def collective_device() -> torch.device:
    """Where the step's small all-reduces run: the current GPU under NCCL, else the CPU."""
    if torch.distributed.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def train_step(
    chunks: list[Any],
    mcore_config: Any,
    groups: ParallelGroups,
    optimizer: Any,
    scheduler: Any,
    micro_batches: Sequence[MicroBatch],
    seq_length: int,
    nan_policy: str = "stop",
    step: int = 0,
) -> StepResult:
    """Forward/backward over this rank's ``micro_batches`` (their counts go to the logs),
    then an optimizer step. ``groups``: this rank's process groups (``parallel.initialize()``).
    Collective over the whole world. ``nan_policy`` for a non-finite loss: ``stop`` raises
    :class:`TrainingDivergedError`, ``skip`` drops the update and goes on (a finite loss with
    a non-finite gradient norm always stops)."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if nan_policy not in ("stop", "skip"):
        raise ValueError(f"nan_policy must be 'stop' or 'skip', got {nan_policy!r}")
    dp_group = groups.dp
    device = collective_device()
    dp, num_micro = dp_group.size(), len(micro_batches)
    counts = torch.tensor(
        [
            sum(float(mb.loss_weights.to(torch.float64).sum()) for mb in micro_batches),
            sum(mb.loss_tokens for mb in micro_batches),
            sum(mb.num_real_tokens for mb in micro_batches),
            sum(mb.num_patches for mb in micro_batches),
            sum(mb.model_flops for mb in micro_batches),
            sum(mb.num_image_tokens for mb in micro_batches),
        ],
        dtype=torch.float64,
        device=device,
    )
    torch.distributed.all_reduce(counts, group=dp_group)
    total_weight = float(counts[0])
    scale = num_micro * dp / total_weight if total_weight > 0 else 0.0

    def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        batch = next(data_iterator)
        weights = batch.local_loss_weights(groups.cp).to(torch.float32)
        out = model(**batch.inputs)

        def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
            weighted = (per_token.float() * weights).sum()
            contribution = weighted.detach() / total_weight if total_weight > 0 else weighted
            # The schedule divides by num_micro and scales in place: report a detached copy.
            return weighted * scale, {"loss": contribution.clone()}

        return out, loss_func

    for chunk in chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    start_param_gather(chunks)  # overlapped param gather: the forward waits per bucket
    iters = [iter(micro_batches) for _ in chunks] if len(chunks) > 1 else iter(micro_batches)
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iters,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=num_micro,
        seq_length=seq_length,
        micro_batch_size=1,
        forward_only=False,
    )
    finish_param_gather(chunks)
    loss = torch.zeros(1, dtype=torch.float64, device=device)
    if groups.is_last_stage():
        loss += sum(float(r["loss"]) for r in reports)
    torch.distributed.all_reduce(loss, group=groups.pp)
    torch.distributed.all_reduce(loss, group=groups.dp_cp if groups.cp_size > 1 else dp_group)
    value = float(loss)
    lr = float(optimizer.param_groups[0]["lr"]) if optimizer.param_groups else 0.0
    base = dict(
        loss=value, loss_tokens=int(counts[1]), tokens=int(counts[2]), patches=int(counts[3]),
        lr=lr, model_flops=float(counts[4]), image_tokens=int(counts[5]),
    )  # fmt: skip
    if not math.isfinite(value):
        if nan_policy == "stop":
            raise TrainingDivergedError(f"step {step}: loss is {value}; stopping (nan_policy)")
        optimizer.zero_grad()
        return StepResult(grad_norm=None, skipped=True, **base)
    with torch.profiler.record_function("optimizer"):  # a named range for profiles
        ok, grad_norm, _ = optimizer.step()
    if not ok:  # megatron-core's own skip (fp16 loss-scale overflow)
        return StepResult(grad_norm=None, skipped=True, **base)
    norm = float(grad_norm) if grad_norm is not None else None
    if norm is not None and not math.isfinite(norm):
        # A finite loss with non-finite gradients: the update has already been applied, so
        # the parameters cannot be trusted whatever the policy; resume from a checkpoint.
        raise TrainingDivergedError(
            f"step {step}: gradient norm is {norm} with a finite loss {value}; stopping"
        )
    if scheduler is not None:
        scheduler.step(increment=1)
    return StepResult(grad_norm=norm, skipped=False, **base)
