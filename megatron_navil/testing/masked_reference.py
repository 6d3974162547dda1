"""Plain-PyTorch reference of one NaViL decoder layer in the *released code's* form: every
projection and FFN runs on all tokens for both experts, and a mask picks each token's result
(``compute-all-then-mask``, 2x the expert FLOPs).

Two uses: the parity test of :class:`~megatron_navil.models.language.ModalityDecoderLayer`
(gather/scatter + megatron-core MoE must give the same numbers), and the benchmark that
measures what gather/scatter saves. Takes its weights from a single-rank (TP=EP=1) layer.
Attention here is an explicit ``[t, t]`` block-diagonal causal mask, independent of
``varlen_attention``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_navil.models.attention import varlen_attention
from megatron_navil.models.language import apply_rope, rope_tables


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps) * weight.float()).to(x.dtype)


def _pick(visual: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return torch.where(visual.view(-1, *([1] * (t.dim() - 1))), v, t)


def block_causal_mask(cu_seqlens: torch.Tensor, t: int) -> torch.Tensor:
    """bool ``[t, t]``: True where query i may attend key j (same sample, j <= i)."""
    seg = torch.zeros(t, dtype=torch.long)
    bounds = cu_seqlens.tolist()
    for i in range(len(bounds) - 1):
        seg[bounds[i] : bounds[i + 1]] = i
    return (seg[:, None] == seg[None, :]) & torch.ones(t, t, dtype=torch.bool).tril()


def masked_layer_forward(
    layer: torch.nn.Module,
    x_td: torch.Tensor,
    visual: torch.Tensor,
    position_ids: torch.Tensor,
    cu_seqlens: torch.Tensor,
    mask: torch.Tensor | None = None,
    varlen: bool = False,
) -> torch.Tensor:
    """``[t, H]`` -> ``[t, H]`` with ``layer``'s weights (a TP=EP=1 ModalityDecoderLayer).
    ``mask``: a precomputed :func:`block_causal_mask`. ``varlen``: attention through
    ``varlen_attention`` instead (the benchmark, so both sides share the attention core)."""
    attn = layer.self_attention
    lm = attn.lm
    t, d = x_td.shape[0], lm.head_dim
    eps = lm.norm_eps
    h = _rms(x_td, layer.input_layernorm.weight, eps)
    qkv = _pick(
        visual,
        F.linear(h, attn.linear_qkv.visual.weight),
        F.linear(h, attn.linear_qkv.text.weight),
    )
    groups, per_group = lm.kv_heads, lm.heads // lm.kv_heads
    qkv = qkv.view(t, groups, per_group + 2, d)
    q = qkv[:, :, :per_group].reshape(t, lm.heads, d)
    k, v = qkv[:, :, per_group], qkv[:, :, per_group + 1]
    if lm.qk_norm:
        qn, kn = attn.q_layernorm, attn.k_layernorm
        q = _pick(visual, _rms(q, qn.visual.weight, eps), _rms(q, qn.text.weight, eps))
        k = _pick(visual, _rms(k, kn.visual.weight, eps), _rms(k, kn.text.weight, eps))
    cos, sin = rope_tables(position_ids, d, lm.rope_theta)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if varlen:
        ctx = varlen_attention(q, k, v, cu_seqlens, causal=True).reshape(t, lm.heads * d)
    else:
        if mask is None:
            mask = block_causal_mask(cu_seqlens, t)
        k = k.repeat_interleave(per_group, dim=1)
        v = v.repeat_interleave(per_group, dim=1)
        ctx = F.scaled_dot_product_attention(
            q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), attn_mask=mask
        )
        ctx = ctx.transpose(0, 1).reshape(t, lm.heads * d)
    wo, wo_ve = attn.linear_proj.text.weight, attn.linear_proj.visual.weight
    out_text = F.linear(ctx, wo)
    out_visual = F.linear(out_text, wo_ve) if lm.wo_then_wo_ve else F.linear(ctx, wo_ve)
    x_td = x_td + _pick(visual, out_visual, out_text)
    h = _rms(x_td, layer.post_attention_layernorm.weight, eps)
    experts = layer.mlp.experts.local_experts
    if len(experts) != 2:
        raise ValueError("the masked reference covers one expert per modality (NaViL)")

    def swiglu(expert: torch.nn.Module) -> torch.Tensor:
        gate, up = F.linear(h, expert.linear_fc1.weight).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, expert.linear_fc2.weight)

    return x_td + _pick(visual, swiglu(experts[1]), swiglu(experts[0]))
