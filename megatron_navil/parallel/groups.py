"""This rank's process groups, read once from megatron-core's parallel state and handed to the
model and the training step as an argument (models/ and training/ never read the state).

megatron-core itself still reads its global state inside its schedules, DDP, optimizer and the
default groups of its tensor-parallel layers; :class:`ParallelGroups` is what *our* code uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from megatron_navil.parallel.state import ParallelLayout


@dataclass(frozen=True)
class ParallelGroups:
    """The groups of one rank in the layout ``initialize()`` set up.

    ``tp``: the LLM's tensor-parallel group; ``pp``: pipeline; ``dp``: data-parallel (without
    context parallelism: the ranks that see different micro-batches); ``ep`` / ``etp``: the MoE
    experts' expert-parallel and expert-tensor-parallel groups; ``cp``: context-parallel (the
    ranks that share one packed sequence, ``models.context_parallel``); ``dp_cp``: DP x CP
    (where megatron-core's DDP reduces gradients). ``pp_rank`` / ``pp_size``: this rank's
    pipeline stage and the number of stages (not counting virtual ones); ``vpp_size``: model
    chunks per rank (1 without interleaving).
    """

    layout: ParallelLayout
    tp: Any
    pp: Any
    dp: Any
    ep: Any
    etp: Any
    pp_rank: int
    pp_size: int
    vpp_size: int
    cp: Any = None
    dp_cp: Any = None

    @property
    def cp_size(self) -> int:
        return 1 if self.cp is None else self.cp.size()

    @property
    def cp_rank(self) -> int:
        return 0 if self.cp is None else self.cp.rank()

    @property
    def dp_rank(self) -> int:
        return self.dp.rank()

    @property
    def dp_size(self) -> int:
        return self.dp.size()

    def is_first_stage(self) -> bool:
        """This rank holds the first pipeline stage (the vision tower, ignoring virtual)."""
        return self.pp_rank == 0

    def is_last_stage(self) -> bool:
        """This rank holds the last pipeline stage (the LM head, ignoring virtual)."""
        return self.pp_rank == self.pp_size - 1


def current_groups() -> ParallelGroups:
    """The groups of megatron-core's current parallel state (set up by ``initialize()``, which
    returns the same); for callers outside models/ and training/ that did not keep them."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("no parallel state: call megatron_navil.parallel.initialize() first")
    tp = ps.get_tensor_model_parallel_world_size()
    etp = ps.get_expert_tensor_parallel_world_size()
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    layout = ParallelLayout(
        tp=tp,
        pp=ps.get_pipeline_model_parallel_world_size(),
        ep=ps.get_expert_model_parallel_world_size(),
        vpp=vpp,
        etp=None if etp == tp else etp,
        cp=ps.get_context_parallel_world_size(),
    )
    return ParallelGroups(
        layout=layout,
        tp=ps.get_tensor_model_parallel_group(),
        pp=ps.get_pipeline_model_parallel_group(),
        dp=ps.get_data_parallel_group(),
        ep=ps.get_expert_model_parallel_group(),
        etp=ps.get_expert_tensor_parallel_group(),
        pp_rank=ps.get_pipeline_model_parallel_rank(),
        pp_size=ps.get_pipeline_model_parallel_world_size(),
        vpp_size=vpp or 1,
        cp=ps.get_context_parallel_group(),
        dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
    )


def vision_groups(groups: ParallelGroups, splits: bool) -> tuple[Any, Any]:
    """``(tp_group, replica_group)`` of the vision tower: the LLM's TP group when the vision
    heads and MLP split over it (``splits``; replica group None), else a group of this rank
    alone with the LLM's TP group as the replica group (the tower is then replicated over TP:
    navil-2b has 23 vision heads). Collective: every rank must call it (``new_group`` for each
    singleton)."""
    import torch.distributed as dist

    if splits:
        return groups.tp, None
    mine = None
    for rank in range(dist.get_world_size()):
        single = dist.new_group([rank])
        if rank == dist.get_rank():
            mine = single
    return mine, groups.tp
