"""megatron-core DDP, optimizer (AdamW, distributed) and LR/WD scheduler for a stage recipe."""

from __future__ import annotations

from typing import Any

import torch

from megatron_navil.training.recipes import StageRecipe


def wrap_ddp(chunks: list[torch.nn.Module], config: Any, distributed_optimizer: bool) -> list[Any]:
    """megatron-core DDP around each chunk, wired into the schedule as Megatron-LM does
    (fp32 gradient buffers). DDP's own NaN check is off: ``training.step`` decides what a
    non-finite loss does (stop or skip), which a raise inside the reduction would pre-empt."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=distributed_optimizer,
        check_for_nan_in_grad=False,
    )
    wrapped = [
        DistributedDataParallel(config, ddp_config, chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]
    config.no_sync_func = [m.no_sync for m in wrapped]
    if len(wrapped) == 1:
        config.no_sync_func = config.no_sync_func[0]
    config.finalize_model_grads_func = finalize_model_grads
    return wrapped


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
