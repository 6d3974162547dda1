"""megatron-core DDP, optimizer (AdamW, plain or distributed) and LR/WD scheduler for a stage
recipe, and the rules that pick a run's optimizer and communication overlap."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from megatron_navil.training.recipes import StageRecipe

CHOICES = ("auto", "on", "off")
"""The values of an ``auto`` / ``on`` / ``off`` switch (the overlap and optimizer flags)."""


def expert_dp_size(groups: Any) -> int:
    """The expert-data-parallel size: the ranks that hold the same experts (megatron-core's
    ``get_expert_data_parallel_world_size``: world / (PP x EP x expert-TP), world = DP x TP x
    PP). It differs from DP when EP > 1 or expert-TP != TP: TP=4 x EP=2 at DP=1 has
    expert-DP 2."""
    layout = groups.layout
    return groups.dp_size * layout.tp // (layout.ep * (layout.etp or layout.tp))


def use_distributed_optimizer(choice: str, groups: Any) -> bool:
    """``--use-distributed-optimizer``: ``on`` / ``off``, or ``auto``: on when DP > 1 or
    expert-DP > 1. megatron-core builds the expert and non-expert optimizers from ONE
    ``OptimizerConfig.use_distributed_optimizer`` (shared by the DDP config), so the choice is
    one for both parameter sets; when either has replicas to shard its state over, the
    distributed optimizer saves memory there, otherwise (DP = expert-DP = 1) it only adds the
    flat-buffer copies and the plain optimizer gives the same numbers."""
    if choice not in CHOICES:
        raise ValueError(f"use_distributed_optimizer must be one of {CHOICES}, got {choice!r}")
    if choice != "auto":
        return choice == "on"
    return groups.dp_size > 1 or expert_dp_size(groups) > 1


@dataclass(frozen=True)
class Overlap:
    """Which communications overlap compute: DP gradient reduction (``grad_reduce``, in buckets
    of ``bucket_size`` parameters, megatron-core's default when None), the distributed
    optimizer's parameter all-gather (``param_gather``, with the next forward), pipeline
    p2p of the interleaved schedule (``p2p``) and TransformerEngine's TP userbuffers
    (``tp_comm``)."""

    grad_reduce: bool = False
    param_gather: bool = False
    p2p: bool = False
    tp_comm: bool = False
    bucket_size: int | None = None


def resolve_overlap(
    *,
    grad_reduce: str = "auto",
    param_gather: str = "auto",
    p2p: str = "auto",
    tp_comm: bool = False,
    bucket_size: int | None = None,
    distributed_optimizer: bool,
    vpp: int | None,
    cuda: bool,
    te_available: bool,
) -> Overlap:
    """The run's :class:`Overlap` from its ``auto`` / ``on`` / ``off`` flags. ``auto`` is on
    where overlap is the fast path: on CUDA (NCCL runs collectives on their own streams
    while compute continues); off on CPU, where gloo's "asynchronous" collectives run on
    the same cores as the compute (measured on the tiny model at DP=2: no gain, slower with
    small buckets; docs/performance.md).
    ``param_gather`` needs the distributed optimizer (ValueError when asked for without it;
    ``auto`` follows it), ``p2p`` the interleaved schedule (``vpp`` > 1; ignored otherwise,
    as megatron-core does), ``tp_comm`` TransformerEngine (ValueError without it)."""
    for name, value in (("grad_reduce", grad_reduce), ("param_gather", param_gather),
                        ("p2p", p2p)):  # fmt: skip
        if value not in CHOICES:
            raise ValueError(f"overlap {name} must be one of {CHOICES}, got {value!r}")
    if tp_comm and not te_available:
        raise ValueError(
            "--tp-comm-overlap needs TransformerEngine (its userbuffers), which does not import "
            "here; drop the flag or install transformer-engine"
        )
    if param_gather == "on" and not distributed_optimizer:
        raise ValueError(
            "--overlap-param-gather on needs the distributed optimizer "
            "(--use-distributed-optimizer on, or auto at DP > 1)"
        )
    if bucket_size is not None and bucket_size < 1:
        raise ValueError(f"--ddp-bucket-size must be >= 1 parameters, got {bucket_size}")

    def pick(value: str) -> bool:
        return cuda if value == "auto" else value == "on"

    reduce = pick(grad_reduce)
    if param_gather == "on" and not reduce:
        raise ValueError(
            "--overlap-param-gather on needs --overlap-grad-reduce (megatron-core gathers "
            "parameters in the gradient buckets): on, or auto on CUDA"
        )
    return Overlap(
        grad_reduce=reduce,
        # megatron-core gathers parameters in the grad buckets: overlap needs both
        param_gather=distributed_optimizer and pick(param_gather) and reduce,
        p2p=(vpp or 1) > 1 and pick(p2p),
        tp_comm=tp_comm,
        bucket_size=bucket_size,
    )


def te_importable() -> bool:
    """TransformerEngine is installed (found without importing it: its import initialises
    CUDA)."""
    import importlib.util

    return importlib.util.find_spec("transformer_engine") is not None


def wrap_ddp(
    chunks: list[torch.nn.Module],
    config: Any,
    distributed_optimizer: bool,
    overlap: Overlap | None = None,
) -> list[Any]:
    """megatron-core DDP around each chunk, wired into the schedule as Megatron-LM does
    (fp32 gradient buffers). DDP's own NaN check is off: ``training.step`` decides what a
    non-finite loss does (stop or skip), which a raise inside the reduction would pre-empt.

    ``overlap`` (default: none), wired as Megatron-LM's ``setup_model_and_optimizer`` does:
    overlapped grad reduce dispatches each bucket's reduction from the backward hooks and
    hands the schedule ``grad_sync_func`` (the interleaved schedule starts a chunk's
    reduction after its last backward). Overlapped param gather registers DDP's forward
    pre-hooks (a module waits for its bucket's all-gather) with the gathers aligned
    (``align_param_gather``): :func:`start_param_gather` dispatches every bucket in one
    fixed order at the start of a step, as Megatron-LM's ``param_sync_func`` does for the
    interleaved schedule, because the hooks' own chaining follows the modules a rank runs
    and NaViL's vision tower does not run on a micro-batch without images (the ranks would
    gather in different orders). Parameters are stale between the optimizer step and that
    dispatch: :func:`sync_params` before anything that reads them (saves, evaluation)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    overlap = overlap or Overlap()
    if overlap.param_gather and not (distributed_optimizer and overlap.grad_reduce):
        raise ValueError("overlapped param gather needs the distributed optimizer and "
                         "overlapped grad reduce")  # fmt: skip
    wrapped = []
    for i, chunk in enumerate(chunks):
        ddp_config = DistributedDataParallelConfig(
            grad_reduce_in_fp32=True,
            overlap_grad_reduce=overlap.grad_reduce,
            overlap_param_gather=overlap.param_gather,
            align_param_gather=overlap.param_gather,
            use_distributed_optimizer=distributed_optimizer,
            check_for_nan_in_grad=False,
            bucket_size=overlap.bucket_size,
        )
        wrapped.append(DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0))

    def per_chunk(name: str) -> Any:
        funcs = [getattr(m, name) for m in wrapped]
        return funcs[0] if len(funcs) == 1 else funcs

    config.no_sync_func = per_chunk("no_sync")
    config.grad_sync_func = per_chunk("start_grad_sync") if overlap.grad_reduce else None
    config.param_sync_func = None  # start_param_gather dispatches every chunk's gathers
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


def _gathering(chunks: list[Any]) -> list[Any]:
    """The chunks whose parameters are gathered by overlapped param gather."""
    return [c for c in chunks if getattr(c, "use_forward_hook", False)]


def start_param_gather(chunks: list[Any]) -> None:
    """Dispatch the asynchronous all-gathers of every bucket (chunk by chunk, in bucket
    order: the same on every rank) that overlapped param gather needs before a step's
    forward; each module's forward pre-hook then waits only for its own bucket. A no-op
    without overlapped param gather. Collective over DP."""
    for chunk in _gathering(chunks):
        finish_param_gather([chunk])  # none should be in flight; never two at once
        chunk.start_param_sync()


def finish_param_gather(chunks: list[Any]) -> None:
    """Wait for the all-gathers no forward waited for (the buckets of modules this rank did
    not run, e.g. the vision tower on a micro-batch without images), so that none is in
    flight when the next step dispatches again."""
    for chunk in _gathering(chunks):
        for group in chunk.bucket_groups + chunk.expert_parallel_bucket_groups:
            if group.param_gather_handle is not None:
                group.param_gather_handle.wait()
                group.param_gather_handle = None


def sync_params(chunks: list[Any]) -> None:
    """Gather the parameters that overlapped param gather leaves to the next step
    (Megatron-LM's ``disable_forward_pre_hook(param_sync=True)``, keeping the hooks: a
    finished gather leaves them nothing to do), so that they are the optimizer's; a no-op
    without overlapped param gather. Collective over DP."""
    finish_param_gather(chunks)
    for chunk in _gathering(chunks):
        chunk.start_param_sync(force_sync=True)


def build_optimizer(
    chunks: list[Any],
    recipe: StageRecipe,
    *,
    lr: float | None = None,
    min_lr: float = 0.0,
    clip_grad: float = 1.0,
    bf16: bool = False,
    distributed: bool = True,
) -> Any:
    """AdamW with the recipe's betas, eps and weight decay (fp32 master weights under bf16;
    the distributed optimizer shards them and Adam's state over data-parallel ranks).
    ``lr`` / ``min_lr`` become the param groups' ``max_lr`` / ``min_lr`` that megatron-core's
    scheduler reads (``min_lr`` only matters for the cosine schedule)."""
    peak = recipe.lr if lr is None else lr
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer="adam",
        lr=peak,
        min_lr=min_lr if recipe.lr_schedule == "cosine" else peak,
        weight_decay=recipe.weight_decay,
        adam_beta1=recipe.betas[0],
        adam_beta2=recipe.betas[1],
        adam_eps=recipe.eps,
        clip_grad=clip_grad,
        bf16=bf16,
        params_dtype=torch.bfloat16 if bf16 else torch.float32,
        use_distributed_optimizer=distributed,
    )
    return get_megatron_optimizer(config, chunks)


def build_scheduler(
    optimizer: Any,
    recipe: StageRecipe,
    total_steps: int,
    *,
    lr: float | None = None,
    warmup_steps: int | None = None,
    min_lr: float = 0.0,
) -> Any:
    """megatron-core's OptimizerParamScheduler: linear warm-up from 0, then the recipe's
    schedule (constant, or cosine down to ``min_lr`` at ``total_steps``); constant WD."""
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    peak = recipe.lr if lr is None else lr
    warmup = recipe.warmup_steps if warmup_steps is None else warmup_steps
    if total_steps < 1 or not 0 <= warmup <= total_steps:
        raise ValueError(f"need 0 <= warmup ({warmup}) <= total steps ({total_steps}), steps >= 1")
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=peak,
        min_lr=min_lr if recipe.lr_schedule == "cosine" else peak,
        lr_warmup_steps=warmup,
        lr_decay_steps=total_steps,
        lr_decay_style=recipe.lr_schedule,
        start_wd=recipe.weight_decay,
        end_wd=recipe.weight_decay,
        wd_incr_steps=total_steps,
        wd_incr_style="constant",
    )


def initialize_tp_comm_overlap(
    mcore_config: Any, seq_length: int, micro_batch_size: int = 1
) -> None:
    """TransformerEngine's userbuffers for TP communication overlap, as Megatron-LM's
    ``_initialize_tp_communicators`` sets them up (default configs): one buffer of
    ``[seq_length x micro_batch_size, hidden]`` per TP group. Needs TransformerEngine and a
    CUDA device; the LLM's TE layers then overlap their TP all-gather / reduce-scatter with
    the GEMMs (``tp_comm_overlap`` on the TransformerConfig)."""
    from transformer_engine.pytorch import module as te_module

    te_module.base.initialize_ub(
        shape=[seq_length * micro_batch_size, mcore_config.hidden_size],
        tp_size=mcore_config.tensor_model_parallel_size,
        use_fp8=bool(getattr(mcore_config, "fp8", None)),
    )
