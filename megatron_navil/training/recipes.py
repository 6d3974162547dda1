"""NaViL's training stages (../shared/NAVIL.md, "Training recipe") and parameter freezing.

| stage | trains                                                          | LR            | WD   |
| S1.1  | vision encoder, connector, visual experts, special-token table | 5e-5 constant | 0.05 |
| S1.2  | S1.1 + the text experts' attention (q/k/v/o and q/k norms)      | 5e-5 constant | 0.1  |
| S2    | everything                                                      | 2e-5 cosine   | 0.01 |

All stages: AdamW (0.9, 0.95, eps 1e-8), 200 warm-up steps. Freezing sets ``requires_grad =
False`` *before* megatron-core's DDP and optimizer are built, so frozen parameters get no
gradient buffer and no optimizer state.

Which parameters are "visual" is read from the model's names and its MoE layers: attention
``*.visual.*`` parameters, and the FFN experts whose *global* index falls in the visual group
``[E, 2E)`` (a rank's ``local_experts.i`` is global expert ``local_expert_indices[i]`` under
expert parallelism).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class StageRecipe:
    """Hyper-parameters and trainable set of one stage."""

    name: str
    trains: tuple[str, ...]  # parameter groups, see ``GROUPS``
    lr: float
    lr_schedule: str  # "constant" or "cosine" (after warm-up)
    weight_decay: float
    max_patches_per_image: int
    warmup_steps: int = 200
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8


GROUPS = ("vision", "connector", "special_tokens", "visual_experts", "text_attention", "rest")

STAGES: dict[str, StageRecipe] = {
    "s1.1": StageRecipe(
        "s1.1", ("vision", "connector", "special_tokens", "visual_experts"), 5e-5, "constant",
        0.05, 4096,
    ),
    "s1.2": StageRecipe(
        "s1.2",
        ("vision", "connector", "special_tokens", "visual_experts", "text_attention"),
        5e-5, "constant", 0.1, 12188,
    ),
    "s2": StageRecipe("s2", GROUPS, 2e-5, "cosine", 0.01, 24576),
}  # fmt: skip


def get_stage(name: str) -> StageRecipe:
    """The recipe called ``name`` (``s1.1``, ``s1.2``, ``s2``); ValueError listing them."""
    if name not in STAGES:
        raise ValueError(f"unknown stage {name!r}; known: {', '.join(STAGES)}")
    return STAGES[name]


_EXPERT = re.compile(r"\.mlp\.experts\.local_experts\.(\d+)\.")
_ATTENTION = re.compile(r"\.self_attention\.\w+\.(text|visual)\.")


def _visual_expert_locals(chunk: torch.nn.Module) -> dict[str, set[int]]:
    """Per MoE layer name: the local expert indices that are visual experts."""
    out: dict[str, set[int]] = {}
    for name, module in chunk.named_modules():
        indices = getattr(module, "local_expert_indices", None)
        if indices is None or not hasattr(module, "router"):
            continue
        per_modality = module.config.num_moe_experts // 2
        out[name] = {i for i, g in enumerate(indices) if g >= per_modality}
    return out


def parameter_group(name: str, visual_locals: dict[str, set[int]]) -> str:
    """The ``GROUPS`` entry of parameter ``name`` (a NaViLModel parameter name)."""
    if name.startswith("vision_model."):
        return "vision"
    if name.startswith("mlp1."):
        return "connector"
    if name == "special_token_embedding":
        return "special_tokens"
    attention = _ATTENTION.search("." + name)
    if attention:
        return "visual_experts" if attention.group(1) == "visual" else "text_attention"
    expert = _EXPERT.search("." + name)
    if expert:
        layer = name[: expert.start() + len(".mlp") - 1]
        if int(expert.group(1)) in visual_locals.get(layer, set()):
            return "visual_experts"
    return "rest"


def apply_freezing(chunks: Iterable[torch.nn.Module], recipe: StageRecipe) -> dict[str, Any]:
    """Set ``requires_grad`` of every parameter by ``recipe.trains``; returns counts per group
    and trainable/frozen totals (this rank's shards). Call before wrapping in DDP."""
    counts: dict[str, int] = dict.fromkeys(GROUPS, 0)
    trainable = frozen = 0
    for chunk in chunks:
        visual_locals = _visual_expert_locals(chunk)
        for name, param in chunk.named_parameters():
            group = parameter_group(name, visual_locals)
            counts[group] += param.numel()
            param.requires_grad_(group in recipe.trains)
            if param.requires_grad:
                trainable += param.numel()
            else:
                frozen += param.numel()
    return {"groups": counts, "trainable": trainable, "frozen": frozen}
