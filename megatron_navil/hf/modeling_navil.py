"""NaViL as an HF ``PreTrainedModel`` (remote code shipped in exported checkpoints).

Standalone: imports torch, transformers and the two sibling files only. Parameter names are
the official release's (../shared/NAVIL.md, "Official HF release format"):

  vision_model.embeddings.patch_embedding.{weight [W, 3, 16, 16], bias}
  vision_model.encoder.layers.{i}.{norm1,norm2}.weight, .ls1, .ls2,
      .attn.qkv.weight [3W, W] ([q; k; v]), .attn.{q_norm,k_norm}.weight [W] (full width),
      .attn.proj.{weight,bias}, .mlp.{fc1,fc2}.{weight,bias}
  mlp1.0.{weight,bias} (LayerNorm 4W), mlp1.1.* (Linear 4W -> H), mlp1.3.* (Linear H -> H)
  special_token_embedding.weight [12, H]
  language_model.*: Qwen3 style (``model.embed_tokens``, ``self_attn.{q,k,v,o}_proj`` and
      ``*_ve``, ``self_attn.{q,k}_norm`` and ``*_ve``, ``mlp`` / ``mlp_ve``, ``lm_head``) or
      InternLM2 style (``model.tok_embeddings``, ``attention.{wqkv,wo}`` and ``*_ve``,
      ``feed_forward`` / ``feed_forward_ve`` with w1 gate, w3 up, w2 down, ``output``)

Layouts: ``input_ids`` ``[B, T]`` (left padding with ``attention_mask`` for batches);
``pixel_values`` ``[p, 3 * 16 * 16]`` and ``image_grid_hw`` ``[segments, 2]`` as
processing_navil.py packs them (every scale of every image of the batch, in order; each scale
is one bidirectional attention segment of the vision encoder; the released code's ``[p, 3, 16,
16]`` and ``image_grid_thw`` are accepted too). The vision encoder runs on the patches in the
released code's window order (``vision_config.window_size``: windows of merge units, blocks not
in ``fullatt_block_indexes`` attend within them when it is set) and keeps it, so the
connector's outputs fill the ``<IMG_CONTEXT>`` positions in that order, row-major over the
batch's slots. Tokens ``<IMG_CONTEXT>`` and
``<img>`` use the visual experts (q/k/v/o, QK-norms and FFN), every other token the text
experts; the 12 special tokens take their rows of ``special_token_embedding``.

``generate`` is greedy (or sampling) decoding with a key/value cache: the prompt's modality
mask applies to the prefill, generated tokens always use the text experts, image-block tokens
are never generated.

The released model's API (../shared/NAVIL.md, "The released code's exact behaviour", 7) is
offered beside ours: ``model.image_processor`` (one scale per call, as its demo chains them),
``model.init_special_token_ids(tokenizer)`` (official configs carry no ids) and ``model.chat(
tokenizer, pixel_values, question, generation_config, history=None, return_history=False,
num_patches_list=None, num_scales=[...])``; ours is ``chat_images(tokenizer, question,
images)`` (preprocessing inside).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_navil import NaViLChatConfig, sub
from .processing_navil import (
    CHAT_TEMPLATES,
    IGNORE_INDEX,
    IMAGE_BLOCK_TOKENS,
    SPECIAL_TOKENS,
    VISUAL_TOKENS,
    NaViLImageProcessor,
    ReleasedImageProcessor,
    expand_images,
)

# ------------------------------------------------------------------------------------------
# shared pieces


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, statistics in float32."""

    def __init__(self, width: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


# ------------------------------------------------------------------------------------------
# vision encoder


def vision_positions(grids: torch.Tensor, merge: int) -> torch.Tensor:
    """``[p, 2]`` (row, col) of every patch of ``grids`` ``[segments, 2]`` in merge-unit
    order (Qwen2-VL's ``rot_pos_emb`` construction)."""
    parts = []
    for gh, gw in grids.tolist():
        shape = (gh // merge, merge, gw // merge, merge)
        rows = torch.arange(gh).unsqueeze(1).expand(gh, gw).reshape(shape).permute(0, 2, 1, 3)
        cols = torch.arange(gw).unsqueeze(0).expand(gh, gw).reshape(shape).permute(0, 2, 1, 3)
        parts.append(torch.stack([rows.flatten(), cols.flatten()], dim=-1))
    return torch.cat(parts) if parts else torch.zeros(0, 2, dtype=torch.long)


def window_order(
    grids: torch.Tensor, merge: int, window: int | None
) -> tuple[torch.Tensor | None, list[int]]:
    """The released code's token order of the packed patches of ``grids`` ``[segments, 2]``:
    ``(index, bounds)`` with ``x[index]`` in window order and ``bounds`` the window segments.
    ``window`` is ``vision_config.window_size // merge`` (merge units a side; None: raster
    order, ``(None, [])``). Per grid: the merged grid padded up to whole windows, windows in
    raster order, merge units in raster order inside a window (padding dropped), each unit's
    ``merge * merge`` patches kept together (Qwen2.5-VL's window index)."""
    if window is None:
        return None, []
    unit = merge * merge
    index, bounds, base = [], [0], 0
    for gh, gw in grids.tolist():
        uh, uw = gh // merge, gw // merge
        ids = torch.arange(uh * uw).view(uh, uw)
        padded = F.pad(ids, (0, -uw % window, 0, -uh % window), value=-1)
        nh, nw = padded.shape[0] // window, padded.shape[1] // window
        tiles = padded.view(nh, window, nw, window).permute(0, 2, 1, 3).reshape(nh * nw, -1)
        for tile in tiles:
            units = tile[tile >= 0]
            if units.numel():
                index.append(base + (units[:, None] * unit + torch.arange(unit)).flatten())
                bounds.append(bounds[-1] + units.numel() * unit)
        base += gh * gw
    return (torch.cat(index) if index else torch.zeros(0, dtype=torch.long)), bounds


class VisionEmbeddings(nn.Module):
    def __init__(self, v: Any) -> None:
        super().__init__()
        self.patch_embedding = nn.Conv2d(
            v.num_channels, v.hidden_size, kernel_size=v.patch_size, stride=v.patch_size
        )
        self.channels, self.patch = v.num_channels, v.patch_size

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """``[p, C*P*P]`` flattened patches -> ``[p, W]`` (the Conv2d as one matmul)."""
        weight = self.patch_embedding.weight.reshape(self.patch_embedding.weight.shape[0], -1)
        return F.linear(pixel_values.to(weight.dtype), weight, self.patch_embedding.bias)


class VisionAttention(nn.Module):
    def __init__(self, v: Any) -> None:
        super().__init__()
        self.heads = v.num_attention_heads
        self.head_dim = v.hidden_size // self.heads
        self.qkv = nn.Linear(v.hidden_size, 3 * v.hidden_size, bias=False)
        self.q_norm = RMSNorm(v.hidden_size, v.layer_norm_eps)
        self.k_norm = RMSNorm(v.hidden_size, v.layer_norm_eps)
        self.proj = nn.Linear(v.hidden_size, v.hidden_size, bias=True)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bounds: list[int]
    ) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q = self.q_norm(q).view(t, self.heads, self.head_dim)
        k = self.k_norm(k).view(t, self.heads, self.head_dim)
        v = v.reshape(t, self.heads, self.head_dim)

        def rope(y: torch.Tensor) -> torch.Tensor:
            y32 = y.float()
            return (y32 * cos[:, None] + rotate_half(y32) * sin[:, None]).to(y.dtype)

        q, k = rope(q), rope(k)
        out = q.new_empty(q.shape)
        for start, end in itertools.pairwise(bounds):
            if end > start:
                seg = [y[start:end].transpose(0, 1).unsqueeze(0) for y in (q, k, v)]
                o = F.scaled_dot_product_attention(*seg, scale=self.head_dim**-0.5)
                out[start:end] = o.squeeze(0).transpose(0, 1)
        return self.proj(out.reshape(t, -1))


class VisionMLP(nn.Module):
    def __init__(self, v: Any) -> None:
        super().__init__()
        self.fc1 = nn.Linear(v.hidden_size, v.intermediate_size)
        self.fc2 = nn.Linear(v.intermediate_size, v.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class VisionLayer(nn.Module):
    def __init__(self, v: Any) -> None:
        super().__init__()
        self.norm1 = RMSNorm(v.hidden_size, v.layer_norm_eps)
        self.attn = VisionAttention(v)
        self.ls1 = nn.Parameter(torch.full((v.hidden_size,), float(v.initializer_factor)))
        self.norm2 = RMSNorm(v.hidden_size, v.layer_norm_eps)
        self.mlp = VisionMLP(v)
        self.ls2 = nn.Parameter(torch.full((v.hidden_size,), float(v.initializer_factor)))

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bounds: list[int]
    ) -> torch.Tensor:
        x = x + self.ls1 * self.attn(self.norm1(x), cos, sin, bounds)
        return x + self.ls2 * self.mlp(self.norm2(x))


class VisionEncoder(nn.Module):
    def __init__(self, v: Any) -> None:
        super().__init__()
        self.v = v
        self.layers = nn.ModuleList([VisionLayer(v) for _ in range(v.num_hidden_layers)])


class VisionModel(nn.Module):
    """Patches ``[p, C*P*P]`` + grids -> features ``[p, W]`` (no final norm)."""

    def __init__(self, v: Any, merge: int) -> None:
        super().__init__()
        self.v, self.merge = v, merge
        self.head_dim = v.hidden_size // v.num_attention_heads
        self.embeddings = VisionEmbeddings(v)
        self.encoder = VisionEncoder(v)

    def forward(self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor) -> torch.Tensor:
        """Features ``[p, W]`` in the released code's window order (``window_size``): the
        order the connector's tokens fill the ``<IMG_CONTEXT>`` slots in."""
        counts = (image_grid_hw[:, 0] * image_grid_hw[:, 1]).tolist()
        if sum(counts) != pixel_values.shape[0]:
            raise ValueError(
                f"image_grid_hw covers {sum(counts)} patches, pixel_values has "
                f"{pixel_values.shape[0]}"
            )
        bounds = [0]
        for c in counts:
            bounds.append(bounds[-1] + int(c))
        x = self.embeddings(pixel_values)
        grids = image_grid_hw.cpu()
        positions = vision_positions(grids, self.merge).to(x.device)
        dim = self.head_dim // 2
        inv_freq = 1.0 / (
            self.v.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim)
        ).to(x.device)
        freqs = (positions.float()[..., None] * inv_freq).flatten(1)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        window = getattr(self.v, "window_size", None)
        index, window_bounds = window_order(
            grids, self.merge, None if window is None else int(window) // self.merge
        )
        if index is not None:  # never undone: the released models' token order
            index = index.to(x.device)
            x, cos, sin = x[index], cos[index], sin[index]
        full = getattr(self.v, "fullatt_block_indexes", None)
        for i, layer in enumerate(self.encoder.layers):
            windowed = full is not None and i not in full
            x = layer(x, cos, sin, window_bounds if windowed else bounds)
        return x


class Connector(nn.Sequential):
    """``mlp1``: LayerNorm(4W) -> Linear(4W, H) -> GELU -> Linear(H, H) on pixel-shuffled
    features (the 2x2 patches of a merge unit are contiguous: a reshape)."""

    def __init__(self, width: int, hidden: int, merge: int) -> None:
        unit = merge * merge * width
        super().__init__(
            nn.LayerNorm(unit, eps=1e-5),
            nn.Linear(unit, hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
        )
        self.unit = unit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.reshape(-1, self.unit))


# ------------------------------------------------------------------------------------------
# language model with modality experts


def _route(
    x: torch.Tensor, visual: torch.Tensor | None, text_fn: Any, visual_fn: Any
) -> torch.Tensor:
    """``text_fn`` on the text rows of ``x`` ``[n, ...]``, ``visual_fn`` on the visual rows
    (gather/scatter; ``visual`` None: all text)."""
    if visual is None or not bool(visual.any()):
        return text_fn(x)
    if bool(visual.all()):
        return visual_fn(x)
    text_out = text_fn(x[~visual])
    out = text_out.new_empty((x.shape[0], *text_out.shape[1:]))
    out[~visual] = text_out
    out[visual] = visual_fn(x[visual])
    return out


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` with Qwen3 or InternLM2 (w1 gate, w3 up, w2 down)
    names."""

    def __init__(self, hidden: int, ffn: int, internlm2: bool) -> None:
        super().__init__()
        self.names = ("w1", "w3", "w2") if internlm2 else ("gate_proj", "up_proj", "down_proj")
        for name, (i, o) in zip(
            self.names, ((hidden, ffn), (hidden, ffn), (ffn, hidden)), strict=True
        ):
            self.add_module(name, nn.Linear(i, o, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up, down = (getattr(self, n) for n in self.names)
        return down(F.silu(gate(x)) * up(x))


class ModalityAttention(nn.Module):
    """Joint causal attention with per-modality q/k/v/o (and Qwen3 QK-norms)."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.internlm2 = lm.model_type == "internlm2"
        self.heads, self.kv_heads, self.head_dim = (
            lm.num_attention_heads, lm.num_key_value_heads, lm.head_dim,
        )  # fmt: skip
        self.qk_norm = bool(lm.qk_norm)
        self.wo_then_wo_ve = bool(lm.wo_then_wo_ve)
        hidden, q_out, kv_out = (
            lm.hidden_size,
            self.heads * lm.head_dim,
            self.kv_heads * lm.head_dim,
        )
        if self.internlm2:
            for suffix in ("", "_ve"):
                self.add_module("wqkv" + suffix, nn.Linear(hidden, q_out + 2 * kv_out, bias=False))
                self.add_module("wo" + suffix, nn.Linear(q_out, hidden, bias=False))
        else:
            for suffix in ("", "_ve"):
                self.add_module("q_proj" + suffix, nn.Linear(hidden, q_out, bias=False))
                self.add_module("k_proj" + suffix, nn.Linear(hidden, kv_out, bias=False))
                self.add_module("v_proj" + suffix, nn.Linear(hidden, kv_out, bias=False))
                self.add_module("o_proj" + suffix, nn.Linear(q_out, hidden, bias=False))
                if self.qk_norm:
                    self.add_module("q_norm" + suffix, RMSNorm(lm.head_dim, lm.rms_norm_eps))
                    self.add_module("k_norm" + suffix, RMSNorm(lm.head_dim, lm.rms_norm_eps))

    def _qkv(self, x: torch.Tensor, suffix: str) -> torch.Tensor:
        """``[n, H]`` -> ``[n, heads + 2 kv_heads, head_dim]`` (q heads, k heads, v heads)."""
        n, d = x.shape[0], self.head_dim
        if self.internlm2:  # grouped layout: per kv group its q heads, then k, then v
            per = self.heads // self.kv_heads
            qkv = getattr(self, "wqkv" + suffix)(x).view(n, self.kv_heads, per + 2, d)
            q = qkv[:, :, :per].reshape(n, self.heads, d)
            k, v = qkv[:, :, per], qkv[:, :, per + 1]
        else:
            q = getattr(self, "q_proj" + suffix)(x).view(n, self.heads, d)
            k = getattr(self, "k_proj" + suffix)(x).view(n, self.kv_heads, d)
            v = getattr(self, "v_proj" + suffix)(x).view(n, self.kv_heads, d)
            if self.qk_norm:
                q = getattr(self, "q_norm" + suffix)(q)
                k = getattr(self, "k_norm" + suffix)(k)
        return torch.cat([q, k, v], dim=1)

    def _out(self, ctx: torch.Tensor, visual: torch.Tensor | None) -> torch.Tensor:
        if self.internlm2:
            if self.wo_then_wo_ve:  # the released 2B code: wo for all, then wo_ve for visual
                out = self.wo(ctx)
                return _route(out, visual, lambda y: y, self.wo_ve)
            return _route(ctx, visual, self.wo, self.wo_ve)
        return _route(ctx, visual, self.o_proj, self.o_proj_ve)

    def forward(
        self,
        x: torch.Tensor,
        visual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        b, t, h = x.shape
        flat = x.reshape(b * t, h)
        vis = None if visual is None else visual.reshape(-1)
        qkv = _route(flat, vis, lambda y: self._qkv(y, ""), lambda y: self._qkv(y, "_ve"))
        qkv = qkv.view(b, t, -1, self.head_dim).transpose(1, 2)  # [b, heads, t, d]
        q = qkv[:, : self.heads]
        k = qkv[:, self.heads : self.heads + self.kv_heads]
        v = qkv[:, self.heads + self.kv_heads :]

        def rope(y: torch.Tensor) -> torch.Tensor:
            y32 = y.float()
            return (y32 * cos[:, None] + rotate_half(y32) * sin[:, None]).to(y.dtype)

        q, k = rope(q), rope(k)
        if cache is not None:
            if cache:
                k = torch.cat([cache[0], k], dim=2)
                v = torch.cat([cache[1], v], dim=2)
            cache[:] = [k, v]
        ctx = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.kv_heads != self.heads
        )
        ctx = ctx.transpose(1, 2).reshape(b * t, self.heads * self.head_dim)
        return self._out(ctx, vis).view(b, t, h)


class DecoderLayer(nn.Module):
    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.internlm2 = lm.model_type == "internlm2"
        hidden, eps = lm.hidden_size, lm.rms_norm_eps
        names = (
            ("attention_norm", "attention", "ffn_norm", "feed_forward")
            if self.internlm2
            else ("input_layernorm", "self_attn", "post_attention_layernorm", "mlp")
        )
        self.names = names
        self.add_module(names[0], RMSNorm(hidden, eps))
        self.add_module(names[1], ModalityAttention(lm))
        self.add_module(names[2], RMSNorm(hidden, eps))
        self.add_module(names[3], SwiGLU(hidden, lm.intermediate_size, self.internlm2))
        self.add_module(names[3] + "_ve", SwiGLU(hidden, lm.intermediate_size, self.internlm2))

    def forward(
        self,
        x: torch.Tensor,
        visual: torch.Tensor | None,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        norm1, attn, norm2, ffn = (getattr(self, n) for n in self.names)
        ffn_ve = getattr(self, self.names[3] + "_ve")
        x = x + attn(norm1(x), visual, cos, sin, mask, cache)
        b, t, h = x.shape
        y = norm2(x).reshape(b * t, h)
        vis = None if visual is None else visual.reshape(-1)
        return x + _route(y, vis, ffn, ffn_ve).view(b, t, h)


class LanguageBackbone(nn.Module):
    """``language_model.model``: embeddings, decoder layers, final norm."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        embed = "tok_embeddings" if lm.model_type == "internlm2" else "embed_tokens"
        self.embed_name = embed
        self.add_module(embed, nn.Embedding(lm.vocab_size, lm.hidden_size))
        self.layers = nn.ModuleList([DecoderLayer(lm) for _ in range(lm.num_hidden_layers)])
        self.norm = RMSNorm(lm.hidden_size, lm.rms_norm_eps)


class LanguageModel(nn.Module):
    """``language_model``: ``model`` + LM head (``lm_head`` or InternLM2's ``output``)."""

    def __init__(self, lm: Any) -> None:
        super().__init__()
        self.lm = lm
        self.model = LanguageBackbone(lm)
        self.head_name = "output" if lm.model_type == "internlm2" else "lm_head"
        self.add_module(self.head_name, nn.Linear(lm.hidden_size, lm.vocab_size, bias=False))

    def embed(self) -> nn.Embedding:
        return getattr(self.model, self.model.embed_name)

    def forward(
        self,
        embeds: torch.Tensor,
        visual: torch.Tensor | None,
        position_ids: torch.Tensor,
        mask: torch.Tensor,
        caches: list[list[torch.Tensor]] | None,
    ) -> torch.Tensor:
        lm = self.lm
        inv_freq = 1.0 / (
            lm.rope_theta
            ** (torch.arange(0, lm.head_dim, 2, dtype=torch.float32, device=embeds.device)
                / lm.head_dim)
        )  # fmt: skip
        freqs = position_ids.to(torch.float32).unsqueeze(-1) * inv_freq  # [b, t, d/2]
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()  # [b, t, d]
        x = embeds
        for i, layer in enumerate(self.model.layers):
            x = layer(x, visual, cos, sin, mask, None if caches is None else caches[i])
        return getattr(self, self.head_name)(self.model.norm(x))


# ------------------------------------------------------------------------------------------
# the model


class NaViLPreTrainedModel(PreTrainedModel):
    config_class = NaViLChatConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["VisionLayer", "DecoderLayer"]
    _supports_sdpa = True

    def _init_weights(self, module: nn.Module) -> None:
        std = 0.02
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.normal_(module.weight, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)
        elif isinstance(module, VisionLayer):
            scale = float(sub(self.config.vision_config).initializer_factor)
            nn.init.constant_(module.ls1, scale)
            nn.init.constant_(module.ls2, scale)


class NaViL(NaViLPreTrainedModel):
    """The whole model; ``forward`` returns ``CausalLMOutputWithPast`` (logits ``[B, T, V]``,
    the shifted next-token loss with ``labels``, -100 ignored)."""

    def __init__(self, config: NaViLChatConfig) -> None:
        super().__init__(config)
        v, lm = sub(config.vision_config), sub(config.llm_config)
        if lm.model_type not in ("internlm2", "qwen3", "llama"):
            raise ValueError(f"llm_config.model_type={lm.model_type!r}: internlm2/qwen3/llama")
        # Qwen3: per-head QK-norm; "llama": Qwen3-style names without it (a Llama-initialised
        # NaViL); InternLM2 never has it.
        lm.qk_norm = bool(getattr(lm, "qk_norm", lm.model_type == "qwen3"))
        if lm.model_type == "internlm2" and getattr(lm, "bias", False):
            raise ValueError(
                "llm_config.bias is true (InternLM2's default): NaViL's LLM has no biases; "
                "the released 2B config says false"
            )
        if lm.model_type == "internlm2" and lm.qk_norm:
            raise ValueError("llm_config: InternLM2-style layers have no QK-norm")
        self.merge = round(1 / config.downsample_ratio)
        self.vision_model = VisionModel(v, self.merge)
        self.mlp1 = Connector(v.hidden_size, lm.hidden_size, self.merge)
        self.special_token_embedding = nn.Embedding(len(SPECIAL_TOKENS), lm.hidden_size)
        self.language_model = LanguageModel(lm)
        # Plain lists, not buffers: from_pretrained builds the model on the meta device and
        # would leave non-persistent buffers uninitialised. Official configs carry no ids:
        # init_special_token_ids(tokenizer) sets them (NAVIL.md section 5).
        self.special_token_ids: list[int] | None = None
        if getattr(config, "special_token_ids", None) is not None:
            self._set_special_ids([int(i) for i in config.special_token_ids])
        self.image_processor = ReleasedImageProcessor.from_config(config)
        self.post_init()

    def _set_special_ids(self, ids: list[int]) -> None:
        vocab = self.language_model.lm.vocab_size
        outside = [i for i in ids if not 0 <= i < vocab]
        if len(ids) != len(SPECIAL_TOKENS) or outside:
            raise ValueError(
                f"special token ids {ids}: need {len(SPECIAL_TOKENS)} ids inside the LLM "
                f"vocabulary of {vocab} (outside: {outside})"
            )
        self.special_token_ids = ids
        self.visual_token_ids = [ids[SPECIAL_TOKENS.index(t)] for t in VISUAL_TOKENS]
        self.img_context_token_id = ids[SPECIAL_TOKENS.index("<IMG_CONTEXT>")]
        self.img_start_token_id = ids[SPECIAL_TOKENS.index("<img>")]
        self.img_end_token_id = ids[SPECIAL_TOKENS.index("</img>")]

    def init_special_token_ids(self, tokenizer: Any) -> None:
        """The 12 special-token ids from ``tokenizer`` (``convert_tokens_to_ids``), the
        released API; each must be inside the LLM vocabulary."""
        self._set_special_ids([int(tokenizer.convert_tokens_to_ids(t)) for t in SPECIAL_TOKENS])

    def _ids(self) -> list[int]:
        if self.special_token_ids is None:
            raise ValueError(
                "the special-token ids are unknown (an official config carries none): call "
                "model.init_special_token_ids(tokenizer) first"
            )
        return self.special_token_ids

    # embeddings -----------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Embedding:
        return self.language_model.embed()

    def extract_feature(
        self, pixel_values: torch.Tensor, image_grid_hw: torch.Tensor
    ) -> torch.Tensor:
        """Patches -> one LLM-width feature per merge unit ``[p / 4, H]``."""
        return self.mlp1(self.vision_model(pixel_values, image_grid_hw))

    def embed(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[B, T]`` ids -> ``[B, T, H]``: LLM embedding, the special-token table for the 12
        special ids, image features at the ``<IMG_CONTEXT>`` positions."""
        special_ids = torch.tensor(self._ids(), device=input_ids.device)
        match = input_ids.unsqueeze(-1) == special_ids  # [B, T, 12]
        is_special = match.any(-1)
        emb = self.language_model.embed()(torch.where(is_special, 0, input_ids))
        special = self.special_token_embedding.weight[match.long().argmax(-1)]
        emb = torch.where(is_special.unsqueeze(-1), special.to(emb.dtype), emb)
        slots = input_ids == self.img_context_token_id
        n_slots = int(slots.sum())
        if pixel_values is None or pixel_values.shape[0] == 0:
            if n_slots:
                raise ValueError(f"{n_slots} <IMG_CONTEXT> tokens but no pixel_values")
            return emb
        if image_grid_hw is None:
            raise ValueError("pixel_values need image_grid_hw")
        features = self.extract_feature(pixel_values.to(emb.dtype), image_grid_hw)
        if features.shape[0] != n_slots:
            raise ValueError(
                f"{features.shape[0]} image features but {n_slots} <IMG_CONTEXT> tokens"
            )
        return emb.masked_scatter(slots.unsqueeze(-1), features.to(emb.dtype))

    def _visual_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """True where a token uses the visual experts (``<IMG_CONTEXT>``, ``<img>``)."""
        return torch.isin(input_ids, torch.tensor(self.visual_token_ids, device=input_ids.device))

    # forward ----------------------------------------------------------------------------------
    @staticmethod
    def _mask(attention_mask: torch.Tensor, q_len: int) -> torch.Tensor:
        """Bool ``[B, 1, q, k]``: causal over the last ``q`` of ``k`` keys and not padding; a
        query row with no allowed key (left padding) attends to all (its output is unused)."""
        k_len = attention_mask.shape[1]
        q_pos = torch.arange(k_len - q_len, k_len, device=attention_mask.device)
        k_pos = torch.arange(k_len, device=attention_mask.device)
        allowed = (k_pos[None, :] <= q_pos[:, None])[None] & attention_mask.bool()[:, None, :]
        allowed = allowed | ~allowed.any(-1, keepdim=True)
        return allowed.unsqueeze(1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        return_dict: bool = True,
        image_grid_thw: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> CausalLMOutputWithPast:
        """Logits (and the shifted loss with ``labels``). Images as ours (``pixel_values``
        ``[p, 3*P*P]``, ``image_grid_hw``) or as the released code passes them
        (``[p, 3, P, P]``, ``image_grid_thw`` with ``t = 1``)."""
        pixel_values, image_grid_hw = _as_ours(pixel_values, image_grid_hw, image_grid_thw)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if position_ids is None:
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        embeds = self.embed(input_ids, pixel_values, image_grid_hw)
        visual = self._visual_mask(input_ids)
        mask = self._mask(attention_mask, input_ids.shape[1])
        logits = self.language_model(embeds, visual, position_ids, mask, None).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                ignore_index=IGNORE_INDEX,
            )  # fmt: skip
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # generation -------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_hw: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        max_new_tokens: int = 64,
        eos_token_id: int | list[int] | None = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        **kwargs: Any,
    ) -> torch.Tensor:
        """Prompt ``[B, T]`` (left-padded) -> ``[B, T + n]`` with the generated tokens; rows
        that stopped at ``eos_token_id`` are padded with it. Greedy unless ``do_sample``."""
        pixel_values, image_grid_hw = _as_ours(
            pixel_values, image_grid_hw, kwargs.pop("image_grid_thw", None)
        )
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if eos_token_id is None:
            eos_token_id = getattr(self.generation_config, "eos_token_id", None)
        eos = [] if eos_token_id is None else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        )  # fmt: skip
        banned = [self._ids()[SPECIAL_TOKENS.index(t)] for t in IMAGE_BLOCK_TOKENS]
        vocab = self.language_model.lm.vocab_size
        caches: list[list[torch.Tensor]] = [[] for _ in self.language_model.model.layers]
        positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        embeds = self.embed(input_ids, pixel_values, image_grid_hw)
        visual = self._visual_mask(input_ids)
        logits = self.language_model(
            embeds, visual, positions, self._mask(attention_mask, input_ids.shape[1]), caches
        )[:, -1]
        out = input_ids
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
        next_pos = positions[:, -1:] + 1
        for _ in range(max_new_tokens):
            scores = logits.float()[:, :vocab].clone()
            scores[:, [b for b in banned if b < vocab]] = -math.inf
            if do_sample:
                probs = torch.softmax(scores / max(temperature, 1e-6), dim=-1)
                token = torch.multinomial(probs, 1).squeeze(1)
            else:
                token = scores.argmax(-1)
            if eos:
                token = torch.where(done, torch.full_like(token, eos[0]), token)
            out = torch.cat([out, token[:, None]], dim=1)
            if eos:
                done = done | torch.isin(token, torch.tensor(eos, device=token.device))
                if bool(done.all()):
                    break
            attention_mask = torch.cat([attention_mask, torch.ones_like(token[:, None])], dim=1)
            embeds = self.embed(token[:, None])
            logits = self.language_model(
                embeds, None, next_pos, self._mask(attention_mask, 1), caches
            )[:, -1]
            next_pos = next_pos + 1
        return out

    # chat -------------------------------------------------------------------------------------
    def _messages(self, content: str, system: str | None) -> list[dict[str, str]]:
        system = getattr(self.config, "system_message", None) if system is None else system
        return ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": content}
        ]

    def build_inputs(
        self,
        tokenizer: Any,
        question: str,
        images: list[Any] | None = None,
        system: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """Model inputs of one user turn: each ``<image>`` in ``question`` becomes the next
        image's block (one ``<image>\\n`` per image is prepended when there is none),
        rendered with the config's chat template and system message (``system`` overrides;
        ``""``: none), tokenized with the tokenizer's own special-token handling (BOS where
        it adds one), as the released ``chat`` does."""
        images = list(images or [])
        if images and "<image>" not in question:
            question = "<image>\n" * len(images) + question
        processed = NaViLImageProcessor.from_config(self.config)(images)
        content = expand_images(question, processed["image_blocks"])
        text = tokenizer.apply_chat_template(
            self._messages(content, system), chat_template=CHAT_TEMPLATES[self.config.template],
            tokenize=False, add_generation_prompt=True,
        )  # fmt: skip
        ids = tokenizer(text, return_tensors="pt")["input_ids"]
        return {
            "input_ids": ids,
            "pixel_values": processed["pixel_values"],
            "image_grid_hw": processed["image_grid_hw"],
        }

    def chat_images(
        self,
        tokenizer: Any,
        question: str,
        images: list[Any] | None = None,
        max_new_tokens: int = 64,
        system: str | None = None,
    ) -> str:
        """Answer ``question`` about ``images`` (PIL images), greedily, until ``<|im_end|>``
        (this project's API: images in, preprocessing inside)."""
        inputs = self.build_inputs(tokenizer, question, images, system)
        return self._answer(tokenizer, inputs, {"max_new_tokens": max_new_tokens})

    def _answer(
        self,
        tokenizer: Any,
        inputs: dict[str, Any],
        generation: dict[str, Any],
        skip_special_tokens: bool = False,
    ) -> str:
        """Generate until ``<|im_end|>`` (or ``max_new_tokens``), decode the new tokens."""
        device = self.special_token_embedding.weight.device
        inputs = {k: v.to(device) for k, v in inputs.items() if v is not None}
        eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
        kwargs = {k: v for k, v in generation.items() if k in ("max_new_tokens", "do_sample")}
        out = self.generate(**inputs, eos_token_id=eos, **kwargs)
        new = out[0, inputs["input_ids"].shape[1] :].tolist()
        if eos in new:
            new = new[: new.index(eos)]
        return tokenizer.decode(new, skip_special_tokens=skip_special_tokens).strip()

    def chat(
        self,
        tokenizer: Any,
        pixel_values: torch.Tensor | None,
        question: str,
        generation_config: dict[str, Any],
        history: list[tuple[str, str]] | None = None,
        return_history: bool = False,
        num_patches_list: Any = None,
        num_scales: Any = (2,),
        IMG_START_TOKEN: str = "<img>",  # the released signature's names
        IMG_END_TOKEN: str = "</img>",
        IMG_CONTEXT_TOKEN: str = "<IMG_CONTEXT>",
        IMG_LINE_BREAK_TOKEN: str = "<IMG_LINE_BREAK>",
        IMG_FRAME_BREAK_TOKEN: str = "<IMG_FRAME_BREAK>",
        anyres_image_size: bool = True,
        verbose: bool = False,
    ) -> Any:
        """The released model's ``chat`` (NAVIL.md section 7): ``pixel_values`` from
        ``model.image_processor`` (``[p, 3, P, P]`` or ``[p, 3*P*P]``, every scale of every
        image, smallest scale first), ``num_patches_list`` one ``(t, h, w)`` patch grid per
        scale, ``num_scales`` the scales of each image; ``<image>\\n`` per image is
        prepended when the question has none; greedy unless ``generation_config`` says
        ``do_sample``. Returns the answer (and the history with ``return_history``)."""
        if not anyres_image_size:
            raise ValueError("NaViL takes native-resolution images: anyres_image_size=True")
        if self.special_token_ids is None:
            self.init_special_token_ids(tokenizer)
        if history is None and pixel_values is not None and "<image>" not in question:
            question = "<image>\n" * len(num_scales) + question
        history = list(history or [])
        assistant = "<|im_start|>assistant\n"
        if self.config.template != "internlm2-chat":
            assistant += "<think>\n\n</think>\n\n"
        system = getattr(self.config, "system_message", None)
        query = f"<|im_start|>system\n{system}<|im_end|>" if system else ""
        for old_question, old_answer in history:
            query += f"<|im_start|>user\n{old_question}<|im_end|>{assistant}{old_answer}<|im_end|>"
        query += f"<|im_start|>user\n{question}<|im_end|>{assistant}"
        grids = [] if num_patches_list is None else [list(map(int, g)) for g in num_patches_list]
        scales = [int(n) for n in num_scales]
        for image, n in enumerate(scales):  # the first <image>s of the whole query, in order
            start = sum(scales[:image])
            block = IMG_START_TOKEN
            for t, h, w in grids[start : start + n]:
                row = IMG_CONTEXT_TOKEN * (w // self.merge) + IMG_LINE_BREAK_TOKEN
                block += (row * (h // self.merge) + IMG_FRAME_BREAK_TOKEN) * t
            query = query.replace("<image>", block + IMG_END_TOKEN, 1)
        inputs = {"input_ids": tokenizer(query, return_tensors="pt")["input_ids"]}
        if pixel_values is not None:
            inputs["pixel_values"] = pixel_values.reshape(pixel_values.shape[0], -1)
            inputs["image_grid_hw"] = torch.tensor([[h, w] for _, h, w in grids])
        generation = {k: v for k, v in dict(generation_config).items() if k != "eos_token_id"}
        response = self._answer(tokenizer, inputs, generation, skip_special_tokens=True)
        if verbose:
            print(question, response)
        history.append((question, response))
        return (response, history) if return_history else response


def _as_ours(
    pixel_values: torch.Tensor | None,
    image_grid_hw: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``pixel_values [p, 3*P*P]`` and ``image_grid_hw`` from either form (module doc)."""
    if pixel_values is not None and pixel_values.dim() == 4:
        pixel_values = pixel_values.reshape(pixel_values.shape[0], -1)
    if image_grid_hw is None and image_grid_thw is not None:
        thw = torch.as_tensor(image_grid_thw).reshape(-1, 3)
        if bool((thw[:, 0] != 1).any()):
            raise ValueError("image_grid_thw: NaViL images have t = 1")
        image_grid_hw = thw[:, 1:]
    return pixel_values, image_grid_hw


NaViLChatModel = NaViL
