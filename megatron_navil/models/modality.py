"""Routing tokens to their modality's expert: a permutation for the attention projections and
a megatron-core MoE router whose decision is a function of the token's modality.

Layouts: packed tokens ``[t, H]``; ``visual_mask`` bool ``[t]`` (True: the token uses the visual
expert: ``<IMG_CONTEXT>`` and ``<img>``). Under sequence parallelism the MoE layer sees this
rank's slice ``[t / tp, 1, H]`` and the matching slice of the mask.

Two mechanisms: attention runs jointly over all tokens, only its q/k/v/o projections are per
modality, so :class:`ModalitySplit` sorts the (TP-gathered) tokens text-first, runs each
projection on its contiguous block (one grouped GEMM where the backend has one) and unsorts,
which is gather/scatter without per-expert index bookkeeping. The FFN experts live in
megatron-core's ``MoELayer`` (:class:`ModalityMoELayer`): with one expert per modality and no
expert parallelism they take the attention's gather/scatter path too; with expert parallelism
(all-to-all token dispatch) or several experts per modality (a learned gate inside each
modality) they go through megatron-core's token dispatcher with :class:`ModalityRouter` in
place of the learned router. Both paths use the same parameters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter

from megatron_navil.models.grouped import grouped_linear

TEXT, VISUAL = 0, 1


@dataclass(frozen=True)
class ModalitySplit:
    """The text-first order of a packed sequence's tokens.

    ``perm`` lists text token indices then visual ones (each ascending), ``inverse`` undoes it,
    ``n_text`` is where the visual block starts. Built once per micro-batch and shared by
    every layer.
    """

    perm: torch.Tensor
    inverse: torch.Tensor
    n_text: int

    @staticmethod
    def from_mask(visual_mask: torch.Tensor) -> ModalitySplit:
        """Split of the tokens marked True (visual) / False (text) in a 1-D bool mask."""
        if visual_mask.dim() != 1 or visual_mask.dtype != torch.bool:
            raise ValueError(
                f"visual_mask must be a 1-D bool tensor, got {visual_mask.dtype} of shape "
                f"{tuple(visual_mask.shape)}"
            )
        # A stable sort of the 0/1 mask: text (0) first, each block in ascending position.
        perm = torch.sort(visual_mask.to(torch.uint8), stable=True).indices
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        return ModalitySplit(perm, inverse, int((~visual_mask).sum()))

    def sort(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of ``x`` (first dim = tokens) in text-first order."""
        return x.index_select(0, self.perm)

    def unsort(self, x_sorted: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`sort`."""
        return x_sorted.index_select(0, self.inverse)

    def blocks(self, x_sorted: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The text and visual blocks of sorted rows (either may have 0 rows)."""
        return x_sorted[: self.n_text], x_sorted[self.n_text :]

    def linear(
        self, x_sorted: torch.Tensor, w_text: torch.Tensor, w_visual: torch.Tensor
    ) -> torch.Tensor:
        """Each block through its own weight (no bias), in sorted order: one grouped GEMM where
        the backend has one (``grouped.grouped_linear``). An empty block still produces a
        (zero) gradient for its weight, so a text-only micro-batch is fine."""
        return grouped_linear(x_sorted, self.sizes(x_sorted), (w_text, w_visual))

    def sizes(self, x_sorted: torch.Tensor) -> tuple[int, int]:
        """Rows of the text and visual blocks of ``x_sorted``."""
        return self.n_text, x_sorted.shape[0] - self.n_text

    def apply(
        self, x_sorted: torch.Tensor, text: torch.nn.Module, visual: torch.nn.Module
    ) -> torch.Tensor:
        """Each block through its own module (e.g. a per-modality norm), in sorted order."""
        x_text, x_visual = self.blocks(x_sorted)
        return torch.cat([text(x_text), visual(x_visual)])


class ModalityRouter(TopKRouter):
    """megatron-core (top-k) router whose routing is decided by the token's modality.

    Experts ``[0, E)`` are the text group, ``[E, 2E)`` the visual group (``E`` =
    ``num_moe_experts / 2`` experts per modality).

    - ``E == 1`` (NaViL): hard routing, probability 1, no parameters, no auxiliary loss.
    - ``E > 1``: a learned linear gate, the other modality's logits masked out, top-k inside the
      group (``moe_router_topk``); with top-1 the probability is the pre-top-k softmax (so the
      gate learns from the language-model loss), with top-k > 1 the softmax over the k chosen.
      Optional load-balancing loss *per modality* (``moe_aux_loss_coeff``), each group balanced
      on its own tokens (a global balance would push text tokens towards visual experts).

    The modality reaches the router through ``MoELayer.forward``'s ``padding_mask`` argument
    (see :class:`ModalityMoELayer`): the one per-token tensor megatron-core hands its router,
    carried through activation recomputation as an argument, not as module state.
    """

    def __init__(self, config: Any, pg_collection: Any = None) -> None:
        super().__init__(config=config, pg_collection=pg_collection)
        if config.num_moe_experts % 2:
            raise ValueError(
                f"num_moe_experts={config.num_moe_experts} must be even (text + visual groups)"
            )
        self.per_modality = config.num_moe_experts // 2
        self.topk = config.moe_router_topk
        if self.topk > self.per_modality:
            raise ValueError(
                f"moe_router_topk={self.topk} exceeds the {self.per_modality} experts per modality"
            )
        self.aux_loss_coeff = float(config.moe_aux_loss_coeff or 0.0)
        if self.per_modality == 1:
            # Hard routing needs no gate: drop the weight Router.__init__ made.
            del self.weight
            self.register_parameter("weight", None)
            if self.bias is not None:
                del self.bias
                self.register_parameter("bias", None)

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``input`` ``[s, b, H]``, ``padding_mask`` bool ``[s, b]`` = *visual* mask. Returns
        ``(probs, routing_map)``, both ``[s * b, num_experts]``."""
        if padding_mask is None:
            raise ValueError("ModalityRouter needs the visual mask (ModalityMoELayer passes it)")
        visual = padding_mask.reshape(-1)
        if visual.numel() != input.numel() // input.shape[-1]:
            raise ValueError(
                f"visual mask has {visual.numel()} tokens, hidden states "
                f"{input.numel() // input.shape[-1]}"
            )
        e = self.per_modality
        group = torch.arange(2 * e, device=visual.device) >= e  # False: text experts
        allowed = group.unsqueeze(0) == visual.unsqueeze(1)  # [N, 2E]
        if e == 1:
            return allowed.to(input.dtype), allowed

        from megatron.core.transformer.moe.moe_utils import topk_routing_with_score_function

        logits = self.gating(input).view(-1, 2 * e)
        masked = logits.masked_fill(~allowed, float("-inf"))
        probs, routing_map = topk_routing_with_score_function(
            masked, self.topk, use_pre_softmax=self.topk == 1, score_function="softmax"
        )
        if self.aux_loss_coeff > 0 and self.training and torch.is_grad_enabled():
            probs = self._attach_group_aux_losses(probs, logits, routing_map, visual)
        return probs, routing_map

    def _attach_group_aux_losses(
        self,
        probs: torch.Tensor,
        logits: torch.Tensor,
        routing_map: torch.Tensor,
        visual: torch.Tensor,
    ) -> torch.Tensor:
        """Switch-style balance loss inside each modality's group, over the tokens of the
        whole TP(xCP) group (megatron-core's token counting), attached to ``probs``."""
        from megatron.core.transformer.moe.moe_utils import (
            get_tokens_per_expert_and_token_count,
            switch_load_balancing_loss_func,
        )

        e = self.per_modality
        for modality, name in ((TEXT, "text"), (VISUAL, "visual")):
            rows = (visual == bool(modality)).nonzero().squeeze(1)
            cols = slice(modality * e, (modality + 1) * e)
            group_map = routing_map[rows, cols]
            scores = torch.softmax(logits[rows, cols].float(), dim=-1)
            # A collective: every rank of the group calls it, also with 0 rows here.
            tokens_per_expert, _, _ = get_tokens_per_expert_and_token_count(
                group_map, reduce_group=self.tp_cp_group, topk=self.topk, with_padding_mask=True
            )
            total = tokens_per_expert.sum() / self.topk
            if float(total) == 0:
                continue  # no token of this modality anywhere in the group
            aux = switch_load_balancing_loss_func(
                probs=scores,
                tokens_per_expert=tokens_per_expert,
                total_num_tokens=total,
                topk=self.topk,
                num_experts=e,
                moe_aux_loss_coeff=self.aux_loss_coeff,
            )
            probs = self.attach_and_log_load_balancing_loss(
                probs,
                self.aux_loss_coeff,
                aux,
                f"load_balancing_loss_{name}",
                self.tp_cp_group,
                valid_token_count=int(rows.numel()),
            )
        return probs


MOE_PATHS = ("auto", "dispatcher", "split")


class ModalityMoELayer(MoELayer):
    """megatron-core ``MoELayer`` taking the visual mask, for :class:`ModalityRouter`, with two
    ways to reach its experts (the same parameters, so checkpoints do not depend on it):

    - ``dispatcher``: megatron-core's route -> permute -> all-to-all (EP) / all-gather (expert
      TP) -> experts -> reduce-scatter -> all-to-all -> unpermute, with the modality router.
    - ``split``: the attention experts' gather/scatter (:class:`ModalitySplit`): the same
      expert-TP all-gather of the sequence-parallel tokens the dispatcher does, the micro-batch's
      text-first sort, each projection as one grouped GEMM over the text and visual blocks
      (``grouped.grouped_linear``; two matmuls on CPU), unsort, the same reduce-scatter. No
      routing, permutation bookkeeping or all-to-all. Only for hard routing (one expert per
      modality) without expert parallelism; the tokens each expert sees, and their order, are
      the dispatcher's, so results are the same (the tests compare both on one layer).

    ``moe_path``: one of :data:`MOE_PATHS`; ``auto`` takes ``split`` where it applies
    (:meth:`split_problem` is None), else the dispatcher. ``split`` where it does not apply is
    a ValueError naming why.
    """

    def __init__(
        self,
        config: Any,
        submodules: Any = None,
        layer_number: int | None = None,
        pg_collection: Any = None,
        moe_path: str = "auto",
    ) -> None:
        super().__init__(config, submodules, layer_number, pg_collection)
        if moe_path not in MOE_PATHS:
            raise ValueError(f"moe_path must be one of {MOE_PATHS}, got {moe_path!r}")
        problem = self.split_problem()
        if moe_path == "split" and problem is not None:
            raise ValueError(f"moe_path='split' does not apply: {problem}")
        if moe_path == "auto":
            moe_path = "split" if problem is None else "dispatcher"
        self.moe_path = moe_path

    def split_problem(self) -> str | None:
        """Why the split path cannot replace the dispatcher here (one line), or None."""
        import torch.distributed as dist
        from megatron.core.transformer.moe.experts import SequentialMLP

        config = self.config
        if self.ep_group.size() > 1:
            return f"expert parallelism (EP={self.ep_group.size()}) needs the token dispatcher"
        if config.num_moe_experts != 2:
            return (
                f"{config.num_moe_experts // 2} experts per modality need the learned router "
                "and the token dispatcher"
            )
        if config.add_bias_linear or config.moe_latent_size or self.use_shared_expert:
            return "expert biases, latent projections and shared experts are dispatcher-only"
        if config.moe_pad_expert_input_to_capacity or config.moe_expert_capacity_factor:
            return "expert capacity (token dropping / padding) is dispatcher-only"
        if isinstance(self.experts, SequentialMLP) and (
            config.bias_activation_fusion or config.use_te_activation_func
        ):
            return "the split path's local experts use the unfused activation"
        etp, tp = self.token_dispatcher.tp_group, self.attn_tp_group
        if etp.size() > 1 and (
            etp.size() != tp.size()
            or dist.get_process_group_ranks(etp) != dist.get_process_group_ranks(tp)
        ):
            # The micro-batch's ModalitySplit orders the tokens gathered over the LLM's TP group.
            return f"expert TP ({etp.size()}) differs from the LLM's TP ({tp.size()})"
        if etp.size() == 1 and tp.size() > 1:
            return f"expert TP 1 under TP={tp.size()}: tokens stay sequence-sharded"
        return None

    def forward(  # type: ignore[override]
        self,
        hidden_states: torch.Tensor,
        visual_mask: torch.Tensor,
        split: ModalitySplit | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states`` ``[s, b, H]``, ``visual_mask`` bool ``[s, b]`` (this rank's
        tokens), ``split``: the micro-batch's order of all its (TP-gathered) tokens, needed by
        the split path. MoELayer transposes its ``padding_mask`` from ``[b, s]``, hence
        ``.t()``."""
        if visual_mask.shape != hidden_states.shape[:2]:
            raise ValueError(
                f"visual mask {tuple(visual_mask.shape)} does not match hidden states "
                f"{tuple(hidden_states.shape[:2])}"
            )
        if self.moe_path == "split":
            if split is None:
                raise ValueError("the split MoE path needs the micro-batch's ModalitySplit")
            return self._split_forward(hidden_states, split), None
        return super().forward(hidden_states, padding_mask=visual_mask.t())

    def _split_forward(self, hidden_states: torch.Tensor, split: ModalitySplit) -> torch.Tensor:
        """The split path (class doc): ``[s, b, H]`` -> ``[s, b, H]``."""
        from megatron.core.tensor_parallel import (
            gather_from_sequence_parallel_region,
            reduce_scatter_to_sequence_parallel_region,
        )

        shape = hidden_states.shape
        tokens = hidden_states.reshape(-1, shape[-1])
        group = self.token_dispatcher.tp_group  # expert TP: the dispatcher's all-gather group
        if group.size() > 1:
            tokens = gather_from_sequence_parallel_region(tokens, group=group)
        if tokens.shape[0] != split.perm.numel():
            raise ValueError(
                f"the split orders {split.perm.numel()} tokens, the MoE layer has "
                f"{tokens.shape[0]} after the expert-TP gather"
            )
        out = split.unsort(self._experts_sorted(split.sort(tokens), split))
        if group.size() > 1:
            out = reduce_scatter_to_sequence_parallel_region(out, group=group)
        return out.view(shape)

    def _experts_sorted(self, x_sorted: torch.Tensor, split: ModalitySplit) -> torch.Tensor:
        """Text-first sorted tokens through their modality's expert (this rank's expert-TP
        shard: a partial sum over expert TP, reduced by the caller)."""
        from megatron.core.transformer.moe.experts import SequentialMLP

        from megatron_navil.models.recompute import DropOutput, mlp_activation

        sizes = split.sizes(x_sorted)
        experts = self.experts
        if not isinstance(experts, SequentialMLP):
            # TransformerEngine's grouped experts: hand them the tokens as the dispatcher
            # would, routing probability 1 (exact in any dtype).
            probs = x_sorted.new_ones(x_sorted.shape[0])
            out, _ = experts(x_sorted, torch.tensor(sizes), probs)
            return out
        text, visual = experts.local_experts
        config = self.config
        fc1 = grouped_linear(x_sorted, sizes, (text.linear_fc1.weight, visual.linear_fc1.weight))
        # The experts' selective recompute of the activation (ModalitySequentialMLP's moe_act).
        drop = DropOutput(bool(getattr(experts, "activation_recompute", False)), config.fp8)
        act = drop(lambda x: mlp_activation(config, x), fc1)
        out = grouped_linear(act, sizes, (text.linear_fc2.weight, visual.linear_fc2.weight))
        drop.release(out)
        return out
