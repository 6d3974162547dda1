"""Tensor-parallel plumbing shared by the vision encoder and the connector.

These modules get their process groups as constructor arguments (DESIGN.md, "Parallelism"):
``tp_group`` is the group their heads / hidden units are split over. It may be smaller than
the model's TP group (navil-2b's 23 vision heads do not split in two: the caller then passes a
group of size 1 and the encoder is replicated), so everything here reads sizes and ranks from
the group it is given, never from megatron's global parallel state.

Parameters carry megatron's tensor-parallel attributes (``tensor_model_parallel``,
``partition_dim``, ``partition_stride``) set explicitly by :func:`mark_tensor_parallel`: true
only where this rank holds a slice of a tensor split over a ``tp_group`` of size > 1. (mcore's
linears mark their weights tensor-parallel even in a group of size 1, which would make the
optimizer count a replicated encoder's gradient norm once per model-TP rank.)

:class:`ShardedModule.sharded_state_dict` builds the checkpoint map from those same attributes:
a tensor-parallel parameter is a ShardedTensor sharded along ``partition_dim`` over
``tp_group``; everything else is replicated. ``replica_group`` names the ranks holding
identical copies of this module's shards beyond data parallelism (the model-TP group around a
replicated encoder); its rank enters the replica id so exactly one rank saves each piece.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from megatron.core.transformer.module import MegatronModule

ProcessGroup = Any  # torch.distributed.ProcessGroup (anything with size() and rank())


def group_size(group: ProcessGroup | None) -> int:
    """Ranks in ``group``; 1 for None (an optional group that is absent)."""
    return 1 if group is None else group.size()


def group_rank(group: ProcessGroup | None) -> int:
    """This process's rank in ``group``; 0 for None."""
    return 0 if group is None else group.rank()


def check_group(group: ProcessGroup | None, name: str, where: str) -> None:
    """``group`` must be given: with None, mcore's linears would fall back to megatron's global
    TP group (or fail in their first collective)."""
    if group is None:
        raise ValueError(
            f"{where}: {name} is None; pass the process group explicitly (a group of size 1 "
            "for a replicated module)"
        )


def linear_config(mcore_config: Any) -> Any:
    """A shallow copy of an mcore TransformerConfig for the vision side's linears: no
    sequence parallelism (inputs and outputs are replicated over the TP group), so no TP
    communication overlap either (TransformerEngine's userbuffers are sized for the LLM)."""
    out = copy.copy(mcore_config)
    out.sequence_parallel = False
    out.tp_comm_overlap = False
    return out


def standalone_linear_config(
    *,
    params_dtype: torch.dtype = torch.float32,
    init_std: float = 0.02,
    perform_initialization: bool = True,
) -> Any:
    """An mcore TransformerConfig carrying just what Column/RowParallelLinear read, for tests
    and for counting on the meta device (``perform_initialization=False``). Real runs pass the
    model's own config. CPU initialisation: weights are built with plain ``torch.empty``, so a
    ``torch.device('meta')`` context allocates nothing."""
    from megatron.core.transformer import TransformerConfig

    return TransformerConfig(
        num_layers=1,
        hidden_size=64,
        num_attention_heads=1,
        use_cpu_initialization=True,
        perform_initialization=perform_initialization,
        params_dtype=params_dtype,
        init_method_std=init_std,
        gradient_accumulation_fusion=False,
        sequence_parallel=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        apply_rope_fusion=False,
        cuda_graph_scope=[],
    )


def mark_tensor_parallel(param: torch.nn.Parameter, dim: int | None) -> None:
    """Set megatron's TP attributes: split along ``dim`` over the TP group, or (``None``)
    a full copy on every rank. Overwrites what mcore's linears set."""
    param.tensor_model_parallel = dim is not None
    param.partition_dim = -1 if dim is None else dim
    param.partition_stride = 1


def count_parameters(module: torch.nn.Module) -> int:
    """Elements of this rank's parameters (works on the meta device: nothing is read)."""
    return sum(p.numel() for p in module.parameters())


class ShardedModule(MegatronModule):
    """MegatronModule whose ``sharded_state_dict`` follows the TP attributes of its params."""

    def __init__(
        self, mcore_config: Any, tp_group: ProcessGroup, replica_group: ProcessGroup | None
    ) -> None:
        check_group(tp_group, "tp_group", type(self).__name__)
        super().__init__(mcore_config)
        self.tp_group = tp_group
        self.replica_group = replica_group

    @property
    def tp_size(self) -> int:
        return group_size(self.tp_group)

    def sharded_state_dict(
        self,
        prefix: str = "",
        sharded_offsets: tuple[tuple[int, int, int], ...] = (),
        metadata: dict | None = None,
    ) -> dict[str, Any]:
        """Every parameter (and mcore's empty ``_extra_state``) of this module's subtree:
        tensor-parallel ones sharded along ``partition_dim`` over ``tp_group``, the rest
        replicated. Replica ids: ``(0, r, dp)`` with ``r = replica rank * tp_size + tp rank``
        for replicated tensors and ``r = replica rank`` for TP shards, so exactly one rank in
        the model-TP x DP block holds the main replica of each piece."""
        from megatron.core.transformer.utils import (
            ensure_metadata_has_dp_cp_group,
            make_sharded_object_for_checkpoint,
        )
        from megatron.core.utils import (
            make_sharded_tensor_for_checkpoint,
            make_tp_sharded_tensor_for_checkpoint,
        )

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        dp_group = metadata["dp_cp_group"]
        dp_rank = group_rank(dp_group)
        tp_rank = group_rank(self.tp_group)
        replica = group_rank(self.replica_group)
        replicated_id = (0, replica * self.tp_size + tp_rank, dp_rank)
        groups = dict(tp_group=self.tp_group, dp_cp_group=dp_group)
        out: dict[str, Any] = {}
        for name, tensor in self.state_dict(prefix="", keep_vars=True).items():
            key = f"{prefix}{name}"
            if name.endswith("_extra_state"):
                out[key] = make_sharded_object_for_checkpoint(
                    tensor, key, sharded_offsets, replica_id=replicated_id
                )
            elif getattr(tensor, "tensor_model_parallel", False) and self.tp_size > 1:
                out[key] = make_tp_sharded_tensor_for_checkpoint(
                    tensor,
                    key,
                    tensor.partition_dim,
                    replica_id=(0, replica, dp_rank),
                    prepend_offsets=sharded_offsets,
                    **groups,
                )
            else:
                out[key] = make_sharded_tensor_for_checkpoint(
                    tensor, key, sharded_offsets, replica_id=replicated_id, **groups
                )
        return out
