"""The modality-expert decoder layer of NaViL's LLM, on megatron-core building blocks.

Layouts:
  hidden      ``[s, 1, H]``: packed tokens, micro-batch 1; ``s = t / tp`` under sequence
              parallelism (required with TP > 1: megatron-core's MoE needs it), else ``s = t``
  tokens      ``[t]`` after the sequence-parallel all-gather inside attention
  q / k / v   ``[t, heads / tp, head_dim]`` (this rank's heads)

Each layer: ``h = x + attn(norm1(x))``, ``out = h + ffn(norm2(h))``. Attention is computed
jointly over all tokens of a sample (causal, per-sample ``cu_seqlens``), but q/k/v/o (and the
Qwen3 per-head q/k RMSNorms) exist twice, text and visual, and each token goes through its
modality's copy (gather/scatter via :class:`ModalitySplit`). The FFN is a megatron-core MoE
layer with one (or more) SwiGLU experts per modality: at EP=1 with one expert per modality it
takes the same gather/scatter path, else megatron-core's dispatcher with
:class:`ModalityRouter` (:class:`ModalityMoELayer`).

Tensor parallelism is megatron-core's: the projections are ``ColumnParallelLinear`` /
``RowParallelLinear`` parameters (their init, TP attributes and checkpoint sharding), applied
with ``F.linear`` on each modality's block between one sequence-parallel all-gather and one
reduce-scatter, so splitting by modality adds no communication.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule

from megatron_navil.config.model import LanguageConfig
from megatron_navil.models.attention import varlen_attention
from megatron_navil.models.cp_attention import ContextParallel
from megatron_navil.models.modality import ModalityMoELayer, ModalityRouter, ModalitySplit
from megatron_navil.models.recompute import DropOutput, ModalitySequentialMLP, moe_config


@dataclass
class LayerInputs:
    """What every decoder layer needs besides the hidden states; built once per micro-batch.

    ``split`` orders all ``t`` tokens; ``visual_mask_local`` is this rank's ``[s, 1]`` slice
    for the MoE router; ``cos``/``sin`` ``[t, head_dim]`` are the 1D RoPE tables at each
    token's per-sample position; ``cu_seqlens`` int32 delimits the packed samples.
    ``context_parallel``: under context parallelism (``models.cp_attention``) ``split``,
    the mask and the tables hold this CP rank's ``t / cp`` tokens and ``cu_seqlens`` is the
    whole sequence's; None without.
    """

    split: ModalitySplit
    visual_mask_local: torch.Tensor
    cos: torch.Tensor
    sin: torch.Tensor
    cu_seqlens: torch.Tensor
    context_parallel: ContextParallel | None = None


def rope_tables(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` ``[t, head_dim]`` float32 of the rotate-half RoPE used by Qwen3 and
    InternLM2 (frequencies ``theta^(-2i/d)``, the pair (i, i + d/2) rotated together)."""
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=position_ids.device)
                  / head_dim)
    )  # fmt: skip
    freqs = position_ids.to(torch.float32).unsqueeze(1) * inv_freq.unsqueeze(0)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def apply_rope(x_thd: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``[t, heads, d]`` by per-token tables ``[t, d]`` (math in float32)."""
    half = x_thd.shape[-1] // 2
    x = x_thd.float()
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos.unsqueeze(1) + rotated * sin.unsqueeze(1)).to(x_thd.dtype)


def norm_class(transformer_impl: str = "local") -> Any:
    """megatron-core's RMSNorm class for ``transformer_impl``: ``TENorm`` (TransformerEngine's
    fused norm) for ``te``, the torch norm for ``local`` (the CPU shim lets it run under
    sequence parallelism). Chosen by ``models.impl.spec_provider``, never by what is
    installed."""
    from megatron_navil.models.impl import spec_provider

    return spec_provider(transformer_impl).layer_norm(rms_norm=True)


class _Pair(MegatronModule):
    """Two modules of the same shape, ``text`` and ``visual`` (parameter names
    ``<name>.text.*`` / ``<name>.visual.*``); a MegatronModule so checkpoint sharding recurses
    into the megatron-core linears."""

    def __init__(self, mcore_config: Any, make: Any) -> None:
        super().__init__(mcore_config)
        self.text = make()
        self.visual = make()


class HeadRMSNorm(torch.nn.Module):
    """Per-head RMSNorm over ``head_dim`` (Qwen3's q/k norm); the weight is shared by the
    heads, so under TP each rank's gradient is partial: it is named ``*_layernorm`` and the
    config sets ``qk_layernorm=True``, which makes megatron-core's ``finalize_model_grads``
    all-reduce it over TP."""

    def __init__(self, head_dim: int, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(head_dim, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)


class ModalityAttention(MegatronModule):
    """Joint causal self-attention with per-modality q/k/v/o (see module docstring).

    Parameters (this rank's TP shard): ``linear_qkv.{text,visual}.weight``
    ``[(heads + 2 kv_heads) head_dim / tp, H]`` in megatron-core's fused layout (per query
    group: its query heads, then its key head, then its value head);
    ``linear_proj.{text,visual}.weight`` ``[H, heads head_dim / tp]``; Qwen3:
    ``q_layernorm.{text,visual}.weight``, ``k_layernorm...`` ``[head_dim]``.
    ``wo_then_wo_ve``: a visual token's output is ``wo_ve(wo(ctx))`` (the released 2B code).
    ``attention_backend``: ``models.attention.varlen_attention``'s backend (``sdpa``,
    ``flash``, ``torch``; ``models.impl.resolve_attention_backend`` picks it).
    """

    def __init__(
        self,
        mcore_config: Any,
        lm: LanguageConfig,
        tp_group: Any,
        *,
        selective: bool = False,
        attention_backend: str = "sdpa",
    ) -> None:
        super().__init__(mcore_config)
        from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

        tp = tp_group.size()
        for name, count in (("heads", lm.heads), ("kv_heads", lm.kv_heads)):
            if count % tp:
                raise ValueError(f"LanguageConfig.{name}={count} is not divisible by TP={tp}")
        self.lm = lm
        self.tp_group = tp_group
        self.selective = selective  # recompute the q/k norms in the backward (Recompute)
        self.attention_backend = attention_backend
        self.sequence_parallel = bool(mcore_config.sequence_parallel)
        self.heads_local = lm.heads // tp
        self.kv_heads_local = lm.kv_heads // tp
        qkv_out = (lm.heads + 2 * lm.kv_heads) * lm.head_dim

        def qkv() -> Any:
            return ColumnParallelLinear(
                lm.hidden, qkv_out, config=mcore_config, init_method=mcore_config.init_method,
                bias=False, gather_output=False, tp_group=tp_group,
            )  # fmt: skip

        def proj() -> Any:
            return RowParallelLinear(
                lm.heads * lm.head_dim, lm.hidden, config=mcore_config,
                init_method=mcore_config.output_layer_init_method, bias=False,
                input_is_parallel=True, skip_bias_add=True, tp_group=tp_group,
            )  # fmt: skip

        self.linear_qkv = _Pair(mcore_config, qkv)
        self.linear_proj = _Pair(mcore_config, proj)
        if lm.qk_norm:
            dtype = mcore_config.params_dtype

            def head_norm() -> HeadRMSNorm:
                return HeadRMSNorm(lm.head_dim, lm.norm_eps, dtype)

            self.q_layernorm = _Pair(mcore_config, head_norm)
            self.k_layernorm = _Pair(mcore_config, head_norm)
        if lm.wo_then_wo_ve and lm.heads * lm.head_dim != lm.hidden:
            raise ValueError(
                "LanguageConfig.wo_then_wo_ve needs heads * head_dim == hidden "
                f"({lm.heads} * {lm.head_dim} != {lm.hidden})"
            )

    def _gather(self, hidden: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as tpl

        if self.sequence_parallel:
            return tpl.gather_from_sequence_parallel_region(hidden, group=self.tp_group)
        return tpl.copy_to_tensor_model_parallel_region(hidden, group=self.tp_group)

    def _reduce(self, partial: torch.Tensor) -> torch.Tensor:
        from megatron.core import tensor_parallel as tpl

        if self.sequence_parallel:
            return tpl.reduce_scatter_to_sequence_parallel_region(partial, group=self.tp_group)
        return tpl.reduce_from_tensor_model_parallel_region(partial, group=self.tp_group)

    def forward(self, hidden: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        """``[s, 1, H]`` -> ``[s, 1, H]``."""
        lm, split = self.lm, inputs.split
        x = self._gather(hidden)  # [t, 1, H]
        t = x.shape[0]
        x_sorted = split.sort(x.view(t, lm.hidden))
        qkv = split.linear(x_sorted, self.linear_qkv.text.weight, self.linear_qkv.visual.weight)
        groups = self.kv_heads_local
        per_group = self.heads_local // groups
        qkv = qkv.view(t, groups, per_group + 2, lm.head_dim)
        q = qkv[:, :, :per_group].reshape(t, self.heads_local, lm.head_dim)
        k, v = qkv[:, :, per_group], qkv[:, :, per_group + 1]
        drops: list[DropOutput] = []
        if lm.qk_norm:
            q = self._head_norm(q, self.q_layernorm, split, drops)
            k = self._head_norm(k, self.k_layernorm, split, drops)
        q, k, v = split.unsort(q), split.unsort(k), split.unsort(v)
        q = apply_rope(q, inputs.cos, inputs.sin)
        k = apply_rope(k, inputs.cos, inputs.sin)
        if inputs.context_parallel is not None:
            ctx = inputs.context_parallel.attention(q, k, v, self.attention_backend)
        else:
            ctx = varlen_attention(
                q, k, v, inputs.cu_seqlens, causal=True, backend=self.attention_backend
            )
        ctx_sorted = split.sort(ctx.reshape(t, self.heads_local * lm.head_dim))
        if lm.wo_then_wo_ve:
            out_sorted = self._wo_then_wo_ve(ctx_sorted, split)
        else:
            out_sorted = split.linear(
                ctx_sorted, self.linear_proj.text.weight, self.linear_proj.visual.weight
            )
        out = self._reduce(split.unsort(out_sorted).view(t, 1, lm.hidden))
        for drop in drops:  # the normalised q / k are recomputed before the attention backward
            drop.release(out)
        return out

    def _head_norm(
        self, x_sorted: torch.Tensor, norms: Any, split: ModalitySplit, drops: list[DropOutput]
    ) -> torch.Tensor:
        """Each modality's per-head RMSNorm; under selective recompute only its input is kept
        (the ``DropOutput`` goes to ``drops``, released after the attention output)."""
        drop = DropOutput(self.selective, self.config.fp8)
        drops.append(drop)
        return drop(lambda x: split.apply(x, norms.text, norms.visual), x_sorted)

    def _wo_then_wo_ve(self, ctx_sorted: torch.Tensor, split: ModalitySplit) -> torch.Tensor:
        """Released-2B quirk: every token through ``wo``; visual tokens' (TP-reduced) result
        then through ``wo_ve`` as a row-parallel linear on this rank's slice of features."""
        from megatron.core import tensor_parallel as tpl

        partial = F.linear(ctx_sorted, self.linear_proj.text.weight)
        text_part, visual_part = split.blocks(partial)
        wo_ve = self.linear_proj.visual.weight
        if visual_part.shape[0] == 0:  # the same on every TP rank: they all see all tokens
            # An empty product keeps wo_ve in the graph: a zero (not missing) gradient.
            return torch.cat([text_part, F.linear(partial.new_zeros(0, wo_ve.shape[1]), wo_ve)])
        full = tpl.reduce_from_tensor_model_parallel_region(visual_part, group=self.tp_group)
        local = tpl.scatter_to_tensor_model_parallel_region(full, group=self.tp_group)
        return torch.cat([text_part, F.linear(local, wo_ve)])


def moe_spec(transformer_impl: str) -> Any:
    """megatron-core MoE spec with :class:`ModalityMoELayer` and :class:`ModalityRouter`; the
    non-grouped experts are :class:`ModalitySequentialMLP` (SequentialMLP + ``moe_act``).
    ``transformer_impl``: ``local`` (megatron-core's torch modules) or ``te``
    (TransformerEngine, grouped GEMM), through ``models.impl.spec_provider``."""
    from megatron.core.models.gpt.moe_module_specs import get_moe_module_spec_for_backend
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_navil.models.impl import spec_provider

    te = transformer_impl == "te"
    spec = get_moe_module_spec_for_backend(
        spec_provider(transformer_impl), num_experts=2, moe_grouped_gemm=te
    )
    spec.module = ModalityMoELayer
    spec.submodules.router = ModalityRouter
    spec.submodules.shared_experts = None
    if spec.submodules.experts.module is SequentialMLP:
        spec.submodules.experts.module = ModalitySequentialMLP
    return spec


class ModalityDecoderLayer(MegatronModule):
    """``x + attn(input_layernorm(x))``, then ``+ mlp(post_attention_layernorm(.))``; norms
    shared by the experts.

    ``transformer_impl`` (``local``/``te``) picks the norm and expert classes,
    ``attention_backend`` the varlen attention kernel (``models.impl``).
    ``recompute``: ``Recompute.llm``. ``selective`` keeps only the inputs of the two norms, the
    q/k norms and the experts' SwiGLU (see models/recompute.py); ``full`` is applied around
    the whole layer by the caller (``NaViLModel``), so the layer itself runs plainly then.
    ``moe_path``: how the FFN reaches its experts (``modality.MOE_PATHS``; ``auto``: the
    attention's gather/scatter where it applies, else megatron-core's token dispatcher).
    """

    def __init__(
        self,
        mcore_config: Any,
        lm: LanguageConfig,
        layer_number: int,
        tp_group: Any,
        transformer_impl: str = "local",
        recompute: str = "none",
        attention_backend: str = "sdpa",
        moe_path: str = "auto",
    ) -> None:
        super().__init__(mcore_config)
        from megatron.core.transformer.spec_utils import build_module

        norm = norm_class(transformer_impl)
        self.selective = recompute == "selective"
        self.layer_number = layer_number  # 1-based, global (megatron-core's convention)
        hidden, eps = lm.hidden, lm.norm_eps
        self.input_layernorm = norm(config=mcore_config, hidden_size=hidden, eps=eps)
        self.self_attention = ModalityAttention(
            mcore_config, lm, tp_group, selective=self.selective,
            attention_backend=attention_backend,
        )  # fmt: skip
        self.post_attention_layernorm = norm(config=mcore_config, hidden_size=hidden, eps=eps)
        self.mlp = build_module(
            moe_spec(transformer_impl),
            config=moe_config(mcore_config, recompute),
            layer_number=layer_number,
            moe_path=moe_path,
        )
        self.mlp.set_layer_number(layer_number)

    def forward(self, hidden: torch.Tensor, inputs: LayerInputs) -> torch.Tensor:
        drop = DropOutput(self.selective, self.config.fp8)
        attn = self.self_attention(drop(self.input_layernorm, hidden), inputs)
        drop.release(attn)
        hidden = hidden + attn
        drop = DropOutput(self.selective, self.config.fp8)
        normed = drop(self.post_attention_layernorm, hidden)
        out, _ = self.mlp(normed, inputs.visual_mask_local, inputs.split)
        drop.release(out)
        return hidden + out
