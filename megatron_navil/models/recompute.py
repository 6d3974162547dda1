"""Activation recompute for the LLM decoder layers and the vision blocks (``config.Recompute``).

Two mechanisms, both megatron-core's, so the model-parallel RNG tracker (the CPU shim's on CPU)
is restored around every recomputation exactly as in Megatron:

- :func:`checkpoint_full`: ``tensor_parallel.checkpoint`` (reentrant): the function runs under
  ``no_grad``, only its tensor arguments are saved, and the backward runs it again with grad and
  back-propagates through the fresh graph. ``full`` recompute wraps each decoder layer / vision
  block in it (megatron-core's ``TransformerBlock._checkpointed_forward`` with
  ``recompute_method='uniform', recompute_num_layers=1``). Per-micro-batch side inputs that are
  not the hidden states (the LLM's ``LayerInputs``: modality permutation, RoPE tables,
  ``cu_seqlens``, this rank's visual mask) are closed over by the caller: every layer shares
  them, they live until the micro-batch's backward anyway, and the recomputation sees the very
  same tensors. The visual mask reaches megatron-core's MoE router as ``padding_mask`` (an
  argument, not module state), so the recomputed routing is the forward's.
- :class:`DropOutput`: ``tensor_parallel.CheckpointWithoutOutput``: the function runs under
  ``no_grad`` keeping its inputs; once the next block has used its output, :meth:`release`
  frees that output's storage and registers its recomputation as a gradient hook on the next
  block's output, so whatever saved the output (a linear's input) gets it back just before its
  own backward. ``selective`` recompute puts the RMSNorms and the MLP activations under it
  (megatron-core's ``layernorm`` and ``moe_act`` recompute modules).

Both need an input that requires grad, else the checkpointed parameters would get no gradient
(the checkpoint's outputs only connect to its inputs): an input that does not (everything
upstream frozen) is detached and marked ``requires_grad``, which changes nothing else. Without
grad (evaluation) everything runs plainly.

megatron-core's own recompute flags (``TransformerConfig.recompute_granularity`` /
``recompute_modules``) are not read from the user's config: ``build_model`` rejects them (the
MoE layer would checkpoint itself inside a fully recomputed layer, a double recomputation);
``selective`` sets ``moe_act`` on the MoE layer's private config copy instead
(:func:`moe_config`), which megatron-core's TEGroupedMLP honours natively and
:class:`ModalitySequentialMLP` (the CPU / non-grouped experts, which megatron-core's
SequentialMLP leaves without it) implements with :class:`ActRecomputeMLP`.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_navil.config.model import Recompute


def check_megatron_flags(mcore_config: Any) -> None:
    """ValueError when the TransformerConfig asks for megatron-core's own recompute: NaViL's
    layers are not megatron-core TransformerLayers, and its MoE layer would checkpoint itself
    inside a fully recomputed layer. Use ``Recompute`` (``build_model(recompute=...)``)."""
    granularity = getattr(mcore_config, "recompute_granularity", None)
    if granularity is not None:
        raise ValueError(
            f"TransformerConfig.recompute_granularity={granularity!r}: NaViL's recompute is set "
            "with build_model(recompute=Recompute(llm=..., vision=...)), leave megatron-core's "
            "flags unset"
        )


def moe_config(mcore_config: Any, mode: str) -> Any:
    """The MoE layer's config: ``mcore_config`` itself, or under ``selective`` a shallow copy with
    megatron-core's ``moe_act`` expert-activation recompute (and nothing else: no ``moe``,
    which would checkpoint the whole MoE layer)."""
    if mode != "selective":
        return mcore_config
    out = copy.copy(mcore_config)
    out.recompute_granularity = "selective"
    out.recompute_modules = ["moe_act"]
    return out


def _needs_grad(first: torch.Tensor) -> torch.Tensor:
    if first.requires_grad or not first.is_floating_point():
        return first
    return first.detach().requires_grad_()


def checkpoint_full(function: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``function(*args)`` keeping only ``args`` for the backward, which recomputes it
    (megatron-core's ``tensor_parallel.checkpoint``; ``args[0]`` is the hidden state). Plain
    call when grad is disabled."""
    if not torch.is_grad_enabled():
        return function(*args)
    from megatron.core import tensor_parallel

    return tensor_parallel.checkpoint(function, False, _needs_grad(args[0]), *args[1:])


class DropOutput:
    """One ``selective`` recomputation: ``y = drop(fn, x)`` keeps ``x`` only; after the next
    block ``z`` used ``y``, ``drop.release(z)`` frees ``y`` and recomputes it when ``z``'s
    gradient arrives. A no-op wrapper when disabled or without grad.

    Use a fresh object per call (the hook closes over it), as megatron-core's layers do.
    """

    def __init__(self, enabled: bool, fp8: Any = None) -> None:
        self.enabled = enabled and torch.is_grad_enabled()
        self.fp8 = fp8
        self._checkpoint: Any = None

    def __call__(self, function: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
        if not self.enabled:
            return function(*args)
        from megatron.core.tensor_parallel import CheckpointWithoutOutput

        # fp8=None: CheckpointWithoutOutput treats any other value (its default False too)
        # as "fp8 may be on" and asks TransformerEngine.
        self._checkpoint = CheckpointWithoutOutput(fp8=self.fp8)
        return self._checkpoint.checkpoint(function, _needs_grad(args[0]), *args[1:])

    def release(self, after: torch.Tensor) -> None:
        """Free the output; recompute it when ``after``'s gradient is computed (``after`` must
        come from the output, and everything that saved the output must run its backward after
        ``after``'s gradient)."""
        if self._checkpoint is not None:
            self._checkpoint.discard_output_and_register_recompute(after)
            self._checkpoint = None


def mlp_activation(
    config: Any,
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """megatron-core ``MLP.forward``'s unfused activation, op for op (bit-identical results):
    bias, then the (clamped) GLU or the plain activation, then the per-token routing scale.
    Shared by :class:`ActRecomputeMLP` and the modality experts' split path
    (``modality.ModalityMoELayer``)."""
    if bias is not None:
        x = x + bias
    if config.gated_linear_unit:
        x_glu, x_linear = torch.chunk(x, 2, dim=-1)
        if (val := config.activation_func_clamp_value) is not None:
            x_glu = x_glu.clamp(min=None, max=val)
            x_linear = x_linear.clamp(min=-val, max=val)
        x = config.activation_func(x_glu) * (x_linear + config.glu_linear_offset)
    else:
        x = config.activation_func(x)
    if scale is not None:
        dtype = x.dtype
        x = (x * scale.unsqueeze(-1)).to(dtype)
    return x


class ActRecomputeMLP(MLP):
    """A megatron-core expert ``MLP`` whose activation (GLU, scaled by the routing
    probability) keeps only the fc1 output and is recomputed before fc2's backward: what
    TEGroupedMLP's ``moe_act`` recompute does, for the unfused path (the only one on CPU).
    Adds no state: :class:`ModalitySequentialMLP` turns its experts into this class."""

    def forward(  # type: ignore[override]
        self, hidden_states: torch.Tensor, per_token_scale: torch.Tensor | None = None, **_: Any
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        config = self.config
        fc1, bias = self.linear_fc1(hidden_states)

        def activation(x: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
            return mlp_activation(config, x, bias, scale)

        drop = DropOutput(True, fp8=config.fp8)
        out, out_bias = self.linear_fc2(drop(activation, fc1, per_token_scale))
        drop.release(out)
        if per_token_scale is not None and out_bias is not None:
            out = out + out_bias.unsqueeze(0) * per_token_scale.unsqueeze(-1)
            out_bias = None
        return out, out_bias


class ModalitySequentialMLP(SequentialMLP):
    """megatron-core's SequentialMLP (one MLP per local expert, the non-grouped-GEMM experts)
    honouring ``moe_act`` in ``recompute_modules`` as its grouped siblings do."""

    def __init__(self, num_local_experts: int, config: Any, submodules: Any, **kwargs: Any):
        super().__init__(num_local_experts, config, submodules, **kwargs)
        modules = config.recompute_modules or ()
        self.activation_recompute = (
            config.recompute_granularity == "selective" and "moe_act" in modules
        )
        if not self.activation_recompute:
            return
        if config.bias_activation_fusion or config.use_te_activation_func:
            raise ValueError(
                "selective recompute of the expert activation supports the unfused "
                "activation only (TransformerConfig.bias_activation_fusion / "
                "use_te_activation_func must be False)"
            )
        for expert in self.local_experts:
            expert.__class__ = ActRecomputeMLP


def modes(recompute: Recompute | None) -> Recompute:
    """``recompute`` validated (None: no recompute)."""
    return (recompute or Recompute()).validate()


__all__ = [
    "ActRecomputeMLP",
    "DropOutput",
    "ModalitySequentialMLP",
    "check_megatron_flags",
    "checkpoint_full",
    "mlp_activation",
    "modes",
    "moe_config",
]
