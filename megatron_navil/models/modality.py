"""Routing tokens to their modality's expert: a permutation for the attention projections and
a megatron-core MoE router whose decision is a function of the token's modality.

Layouts: packed tokens ``[t, H]``; ``visual_mask`` bool ``[t]`` (True: the token uses the visual
expert: ``<IMG_CONTEXT>`` and ``<img>``). Under sequence parallelism the MoE layer sees this
rank's slice ``[t / tp, 1, H]`` and the matching slice of the mask.

Why two mechanisms: attention runs jointly over all tokens, only its q/k/v/o projections are
per modality, so :class:`ModalitySplit` sorts the (TP-gathered) tokens text-first, runs each
projection on its contiguous block and unsorts, which is gather/scatter without per-expert
index bookkeeping; the FFN experts go through megatron-core's ``MoELayer`` so expert
parallelism (all-to-all token dispatch) comes from megatron-core unchanged, with
:class:`ModalityRouter` in place of the learned router.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.router import TopKRouter

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
        """Each block through its own weight (no bias), in sorted order. An empty block still
        produces a (zero) gradient for its weight, so a text-only micro-batch is fine."""
        x_text, x_visual = self.blocks(x_sorted)
        return torch.cat([F.linear(x_text, w_text), F.linear(x_visual, w_visual)])

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


class ModalityMoELayer(MoELayer):
    """megatron-core ``MoELayer`` taking the visual mask, for :class:`ModalityRouter`."""

    def forward(  # type: ignore[override]
        self, hidden_states: torch.Tensor, visual_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``hidden_states`` ``[s, b, H]``, ``visual_mask`` bool ``[s, b]`` (this rank's
        tokens). MoELayer transposes its ``padding_mask`` from ``[b, s]``, hence ``.t()``."""
        if visual_mask.shape != hidden_states.shape[:2]:
            raise ValueError(
                f"visual mask {tuple(visual_mask.shape)} does not match hidden states "
                f"{tuple(hidden_states.shape[:2])}"
            )
        return super().forward(hidden_states, padding_mask=visual_mask.t())
