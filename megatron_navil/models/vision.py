"""NaViL's native vision encoder (trained from scratch), tensor-parallel over attention heads.

Layouts (packed, one row per patch; ``t`` patches of all images and scales of a batch):
  patches_td    [t, C*p*p]   patchify output: merge-unit order, channel-major per patch
  positions     [t, 2] int   (row, col) of each patch in its grid (ops.patch_positions)
  cu_seqlens    [segments+1] int32, one segment per image and per scale (ops.vision_cu_seqlens)
  x             [t, W]       residual stream, replicated over the TP group
  q, k, v       [t, heads/tp, head_dim] this rank's heads
  output        [t, W]       in the input's patch order, replicated over the TP group

Block i (pre-norm, layer scale, no CLS token, no absolute positions, no final norm)::

    x = x + ls1 * attn(norm1(x))        attn: qkv (no bias) -> full-width RMSNorm of q and of k
    x = x + ls2 * mlp(norm2(x))               -> 2D RoPE -> bidirectional attention inside each
                                              cu_seqlens segment -> proj (bias)
                                        mlp: fc1 (bias) -> GELU (erf) -> fc2 (bias)

Parameter names follow the official HF checkpoint below ``vision_model.``:
``embeddings.patch_embedding.{weight,bias}``, ``encoder.layers.{i}.{norm1,norm2}.weight``,
``.ls1``, ``.ls2``, ``.attn.qkv.weight``, ``.attn.{q_norm,k_norm}.weight``,
``.attn.proj.{weight,bias}``, ``.mlp.{fc1,fc2}.{weight,bias}``. Two layouts differ from it:

* ``patch_embedding.weight`` is ``[W, C*p*p]``, a Linear over the flattened patch; the official
  Conv2d weight ``[W, C, p, p]`` is the same numbers: ``conv.reshape(W, C*p*p)`` (patches are
  flattened channel-major ``[C, ph, pw]``, the Conv2d kernel's own order).
* ``attn.qkv.weight`` ``[3W, W]`` is interleaved per head: rows ``[q_0; k_0; v_0; q_1; k_1;
  v_1; ...]`` (``head_dim`` rows each), so the TP column split hands rank ``r`` its contiguous
  heads as ``[q_h; k_h; v_h]`` per head and the global tensor is the same for every TP size
  (checkpoints reshard). Official ``[q; k; v]`` (each ``[W, W]``, heads inside) converts with
  ``ours = official.view(3, heads, hd, W).transpose(0, 1).reshape(3W, W)`` and back with
  ``official = ours.view(heads, 3, hd, W).transpose(0, 1).reshape(3W, W)``.

Tensor parallelism (heads split over ``tp_group``): qkv and fc1 are column-parallel, proj and
fc2 row-parallel linears (mcore's, or TransformerEngine's with ``transformer_impl="te"``),
built without sequence parallelism. q_norm / k_norm hold this
rank's heads' slice of the full-width weight (tensor-parallel, partition_dim 0) and all-reduce
their sum of squares (norms.py). The patch embedding, norm1/norm2 and ls1/ls2 are replicated.
Any group works, including a group of size 1 inside a larger model-TP group (navil-2b's 23
heads): its parameters are then not tensor-parallel.

Token order (``VisionConfig.window_size``, the released NaViL code; ../shared/NAVIL.md, "The
released code's exact behaviour", 1): the embedded patches and their RoPE angles are gathered
into window order (``window_index``, from ``ops.vision_kwargs``) before the first block and the
output stays in that order, so the connector's tokens fill the ``<IMG_CONTEXT>`` slots in
window order. With ``fullatt_block_indexes`` None every block attends over its whole image/
scale (``cu_seqlens``: the order changes nothing but the output order); with a tuple, the
blocks not listed attend within each window (``window_cu_seqlens``). ``window_size`` None:
raster order, no permutation.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from megatron_navil.config.model import Recompute, VisionConfig
from megatron_navil.models.attention import check_cu_seqlens, varlen_attention
from megatron_navil.models.norms import RMSNorm
from megatron_navil.models.recompute import DropOutput, checkpoint_full
from megatron_navil.models.rope import apply_vision_rope, vision_rope_cos_sin
from megatron_navil.models.tp import (
    ProcessGroup,
    ShardedModule,
    linear_config,
    mark_tensor_parallel,
)


def _linears(mcore_config: Any, transformer_impl: str) -> tuple[type, type, Any]:
    """The column- and row-parallel linear classes of ``transformer_impl`` (mcore's or
    TransformerEngine's, ``models.impl.spec_provider``) and the config to build them with.
    Both take the same arguments here (``skip_bias_add`` / ``is_expert`` always given, as TE's
    require) and return ``(out, None)`` with the bias added."""
    from megatron_navil.models.impl import spec_provider

    provider = spec_provider(transformer_impl)
    return (
        provider.column_parallel_linear(),
        provider.row_parallel_linear(),
        linear_config(mcore_config),
    )


def _init_methods(mcore_config: Any, depth: int) -> tuple[Any, Any]:
    """N(0, std) for input projections, N(0, std / sqrt(2 * depth)) for output projections
    (megatron's scheme with the encoder's own depth)."""
    from megatron.core.utils import init_method_normal, scaled_init_method_normal

    std = mcore_config.init_method_std
    return init_method_normal(std), scaled_init_method_normal(std, depth)


def _apply(linear: torch.nn.Module, x_td: torch.Tensor) -> torch.Tensor:
    """mcore linears take ``[s, b, h]``: run on ``[t, 1, h]`` and drop the batch axis."""
    out, _ = linear(x_td.unsqueeze(1))
    return out.squeeze(1)


class VisionAttention(ShardedModule):
    """Full-width QK-norm + 2D RoPE + bidirectional varlen attention; heads split over TP."""

    def __init__(
        self,
        cfg: VisionConfig,
        mcore_config: Any,
        tp_group: ProcessGroup,
        replica_group: ProcessGroup | None = None,
        *,
        selective: bool = False,
        transformer_impl: str = "local",
        attention_backend: str = "sdpa",
    ) -> None:
        super().__init__(mcore_config, tp_group, replica_group)
        self.selective = selective  # recompute q_norm / k_norm in the backward
        self.attention_backend = attention_backend
        tp = self.tp_size
        if cfg.heads % tp:
            raise ValueError(
                f"VisionAttention: heads={cfg.heads} do not split over a TP group of {tp} ranks; "
                "pass a group of size 1 (replicated encoder)"
            )
        w, self.head_dim = cfg.width, cfg.head_dim
        self.local_heads = cfg.heads // tp
        local_w = self.local_heads * self.head_dim
        column, row, lin_cfg = _linears(mcore_config, transformer_impl)
        init_in, init_out = _init_methods(mcore_config, cfg.depth)
        self.qkv = column(
            w, 3 * w, config=lin_cfg, init_method=init_in, bias=False, gather_output=False,
            skip_bias_add=False, is_expert=False, tp_group=tp_group,
        )  # fmt: skip
        norm = dict(full_width=w, group=tp_group, dtype=mcore_config.params_dtype)
        self.q_norm = RMSNorm(local_w, cfg.norm_eps, **norm)
        self.k_norm = RMSNorm(local_w, cfg.norm_eps, **norm)
        self.proj = row(
            w, w, config=lin_cfg, init_method=init_out, bias=True, input_is_parallel=True,
            skip_bias_add=False, is_expert=False, tp_group=tp_group,
        )  # fmt: skip
        split = 0 if tp > 1 else None
        mark_tensor_parallel(self.qkv.weight, split)
        mark_tensor_parallel(self.q_norm.weight, split)
        mark_tensor_parallel(self.k_norm.weight, split)
        mark_tensor_parallel(self.proj.weight, 1 if tp > 1 else None)
        mark_tensor_parallel(self.proj.bias, None)

    def forward(
        self, x_td: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        t = x_td.shape[0]
        qkv = _apply(self.qkv, x_td).view(t, self.local_heads, 3, self.head_dim)
        q, k, v = qkv.unbind(2)
        drop_q = DropOutput(self.selective)
        q = drop_q(self.q_norm, q.reshape(t, -1)).view(t, self.local_heads, self.head_dim)
        drop_k = DropOutput(self.selective)
        k = drop_k(self.k_norm, k.reshape(t, -1)).view(t, self.local_heads, self.head_dim)
        q, k = apply_vision_rope(q, cos, sin), apply_vision_rope(k, cos, sin)
        o = varlen_attention(
            q, k, v, cu_seqlens, causal=False, softmax_scale=self.head_dim**-0.5,
            backend=self.attention_backend,
        )  # fmt: skip
        out = _apply(self.proj, o.reshape(t, -1))
        drop_q.release(out)
        drop_k.release(out)
        return out


class VisionMLP(ShardedModule):
    """fc1 (column-parallel, bias) -> GELU -> fc2 (row-parallel, bias)."""

    def __init__(
        self,
        cfg: VisionConfig,
        mcore_config: Any,
        tp_group: ProcessGroup,
        replica_group: ProcessGroup | None = None,
        *,
        selective: bool = False,
        transformer_impl: str = "local",
    ) -> None:
        super().__init__(mcore_config, tp_group, replica_group)
        self.selective = selective  # recompute the GELU in the backward
        tp = self.tp_size
        if cfg.mlp % tp:
            raise ValueError(f"VisionMLP: mlp={cfg.mlp} does not split over {tp} TP ranks")
        column, row, lin_cfg = _linears(mcore_config, transformer_impl)
        init_in, init_out = _init_methods(mcore_config, cfg.depth)
        self.fc1 = column(
            cfg.width, cfg.mlp, config=lin_cfg, init_method=init_in, bias=True,
            gather_output=False, skip_bias_add=False, is_expert=False, tp_group=tp_group,
        )  # fmt: skip
        self.fc2 = row(
            cfg.mlp, cfg.width, config=lin_cfg, init_method=init_out, bias=True,
            input_is_parallel=True, skip_bias_add=False, is_expert=False, tp_group=tp_group,
        )  # fmt: skip
        split = 0 if tp > 1 else None
        mark_tensor_parallel(self.fc1.weight, split)
        mark_tensor_parallel(self.fc1.bias, split)
        mark_tensor_parallel(self.fc2.weight, 1 if tp > 1 else None)
        mark_tensor_parallel(self.fc2.bias, None)

    def forward(self, x_td: torch.Tensor) -> torch.Tensor:
        drop = DropOutput(self.selective)
        out = _apply(self.fc2, drop(F.gelu, _apply(self.fc1, x_td)))
        drop.release(out)
        return out


class VisionBlock(ShardedModule):
    """``x + ls1 * attn(norm1(x))`` then ``x + ls2 * mlp(norm2(x))``.

    ``selective``: the norms (norm1, norm2, q/k norms) and the GELU keep only their inputs and
    are recomputed in the backward (models/recompute.py). ``transformer_impl`` picks the
    linear classes, ``attention_backend`` the varlen kernel (``models.impl``)."""

    def __init__(
        self,
        cfg: VisionConfig,
        mcore_config: Any,
        tp_group: ProcessGroup,
        replica_group: ProcessGroup | None = None,
        *,
        selective: bool = False,
        transformer_impl: str = "local",
        attention_backend: str = "sdpa",
    ) -> None:
        super().__init__(mcore_config, tp_group, replica_group)
        dtype, w = mcore_config.params_dtype, cfg.width
        self.selective = selective
        self.norm1 = RMSNorm(w, cfg.norm_eps, dtype=dtype)
        self.attn = VisionAttention(
            cfg, mcore_config, tp_group, replica_group, selective=selective,
            transformer_impl=transformer_impl, attention_backend=attention_backend,
        )  # fmt: skip
        self.ls1 = torch.nn.Parameter(torch.full((w,), cfg.layer_scale_init, dtype=dtype))
        self.norm2 = RMSNorm(w, cfg.norm_eps, dtype=dtype)
        self.mlp = VisionMLP(
            cfg, mcore_config, tp_group, replica_group, selective=selective,
            transformer_impl=transformer_impl,
        )  # fmt: skip
        self.ls2 = torch.nn.Parameter(torch.full((w,), cfg.layer_scale_init, dtype=dtype))
        for p in (self.norm1.weight, self.norm2.weight, self.ls1, self.ls2):
            mark_tensor_parallel(p, None)

    def forward(
        self, x_td: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor
    ) -> torch.Tensor:
        drop = DropOutput(self.selective)
        attn = self.attn(drop(self.norm1, x_td), cos, sin, cu_seqlens)
        drop.release(attn)
        x_td = x_td + self.ls1 * attn
        drop = DropOutput(self.selective)
        mlp = self.mlp(drop(self.norm2, x_td))
        drop.release(mlp)
        return x_td + self.ls2 * mlp


class VisionEmbeddings(ShardedModule):
    """``patch_embedding``: Linear(C*p*p -> W) with bias, replicated (see the module doc)."""

    def __init__(
        self,
        cfg: VisionConfig,
        mcore_config: Any,
        tp_group: ProcessGroup,
        replica_group: ProcessGroup | None = None,
    ) -> None:
        super().__init__(mcore_config, tp_group, replica_group)
        self.patch_embedding = torch.nn.Linear(
            cfg.channels * cfg.patch**2, cfg.width, dtype=mcore_config.params_dtype
        )
        if mcore_config.perform_initialization:
            with torch.no_grad():
                mcore_config.init_method(self.patch_embedding.weight)
                self.patch_embedding.bias.zero_()
        for p in self.patch_embedding.parameters():
            mark_tensor_parallel(p, None)

    def forward(self, patches_td: torch.Tensor) -> torch.Tensor:
        # Patches arrive as fp32 (or bf16 from the CUDA op) keyword arguments, which
        # megatron-core's Float16Module does not cast: match the weights here.
        return self.patch_embedding(patches_td.to(self.patch_embedding.weight.dtype))


class VisionEncoder(ShardedModule):
    """The vision encoder: ``forward(patches_td, positions, cu_seqlens, window_index=None,
    window_cu_seqlens=None) -> [t, W]`` (in window order when the config has one).

    Args:
        cfg: sizes (validated).
        mcore_config: the model's megatron-core TransformerConfig (dtype, initialisation, CPU init);
            a copy without sequence parallelism builds the linears.
        tp_group: heads are split over it; its size must divide ``cfg.heads`` and
            ``cfg.mlp``. Required (a group of size 1 for a replicated encoder).
        replica_group: ranks holding identical copies of this rank's shards beyond DP (the
            model-TP group when ``tp_group`` is a sub-group of it, e.g. of size 1); used only
            for checkpoint replica ids.
        recompute: ``Recompute.vision``: ``none``, ``selective`` (norms and GELU recomputed)
            or ``full`` (each block keeps only its input and runs again in the backward).
        transformer_impl: ``local`` (mcore's linears) or ``te`` (TransformerEngine's);
            attention_backend: ``sdpa``, ``flash`` or ``torch`` (``models.impl``).
    """

    def __init__(
        self,
        cfg: VisionConfig,
        mcore_config: Any,
        tp_group: ProcessGroup,
        *,
        replica_group: ProcessGroup | None = None,
        recompute: str = "none",
        transformer_impl: str = "local",
        attention_backend: str = "sdpa",
    ) -> None:
        cfg.validate()
        Recompute(vision=recompute).validate()
        super().__init__(mcore_config, tp_group, replica_group)
        self.cfg = cfg
        self.full_recompute = recompute == "full"
        self.embeddings = VisionEmbeddings(cfg, mcore_config, tp_group, replica_group)
        selective = recompute == "selective"
        layers = [
            VisionBlock(
                cfg,
                mcore_config,
                tp_group,
                replica_group,
                selective=selective,
                transformer_impl=transformer_impl,
                attention_backend=attention_backend,
            )
            for _ in range(cfg.depth)
        ]
        self.encoder = torch.nn.ModuleDict({"layers": torch.nn.ModuleList(layers)})
        full = cfg.fullatt_block_indexes
        self._windowed = frozenset(
            () if full is None else (i for i in range(cfg.depth) if i not in full)
        )

    def _check(
        self,
        patches_td: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor,
        window_index: torch.Tensor | None,
        window_cu_seqlens: torch.Tensor | None,
    ) -> None:
        cfg = self.cfg
        width = cfg.channels * cfg.patch**2
        if patches_td.dim() != 2 or patches_td.shape[1] != width:
            raise ValueError(
                f"VisionEncoder: patches_td must be [t, {cfg.channels}*{cfg.patch}*{cfg.patch}"
                f"={width}], got {tuple(patches_td.shape)}"
            )
        t = patches_td.shape[0]
        if positions.shape != (t, 2) or positions.dtype.is_floating_point:
            raise ValueError(
                f"VisionEncoder: positions must be an integer [t={t}, 2] tensor of (row, col), "
                f"got {positions.dtype} {tuple(positions.shape)}"
            )
        check_cu_seqlens(cu_seqlens, t, "VisionEncoder")
        if (window_index is None) != (cfg.window_size is None):
            state = "missing" if window_index is None else "given"
            raise ValueError(
                f"VisionEncoder: vision_window_index {state} but VisionConfig.window_size="
                f"{cfg.window_size} (build the vision inputs with ops.vision_kwargs(grids, merge, "
                "cfg.vision.window_units(merge)))"
            )
        if window_index is not None and window_index.shape != (t,):
            raise ValueError(
                f"VisionEncoder: vision_window_index must be [t={t}], got "
                f"{tuple(window_index.shape)}"
            )
        if self._windowed:
            if window_cu_seqlens is None:
                raise ValueError(
                    "VisionEncoder: fullatt_block_indexes is set, the windowed blocks need "
                    "vision_window_cu_seqlens"
                )
            check_cu_seqlens(window_cu_seqlens, t, "VisionEncoder (vision_window_cu_seqlens)")

    def forward(
        self,
        patches_td: torch.Tensor,
        positions: torch.Tensor,
        cu_seqlens: torch.Tensor,
        window_index: torch.Tensor | None = None,
        window_cu_seqlens: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``[t, C*p*p]`` patches -> ``[t, W]`` features, replicated over the TP group, in
        window order (``x[window_index]``) when the config has a ``window_size``.

        Raises:
            ValueError: a wrong patch width, positions not ``[t, 2]`` integers, cu_seqlens not
                rising from 0 to ``t``, a window index missing/unexpected for the config or of
                the wrong length, window segments missing where blocks attend within windows.
        """
        self._check(patches_td, positions, cu_seqlens, window_index, window_cu_seqlens)
        x = self.embeddings(patches_td)
        cos, sin = vision_rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta)
        if window_index is not None:  # the released code's order, never undone
            x, cos, sin = x[window_index], cos[window_index], sin[window_index]
        for i, layer in enumerate(self.encoder["layers"]):
            cu = window_cu_seqlens if i in self._windowed else cu_seqlens
            if self.full_recompute:  # keep only the block's inputs
                x = checkpoint_full(layer, x, cos, sin, cu)
            else:
                x = layer(x, cos, sin, cu)
        return x


def tp_size_for(cfg: VisionConfig, model_tp: int) -> int:
    """The TP size the encoder can use inside a model-TP group of ``model_tp`` ranks:
    ``model_tp`` when it divides heads and MLP, else 1 (replicated)."""
    return model_tp if cfg.heads % model_tp == 0 and cfg.mlp % model_tp == 0 else 1


__all__ = [
    "VisionAttention",
    "VisionBlock",
    "VisionEmbeddings",
    "VisionEncoder",
    "VisionMLP",
    "tp_size_for",
]
