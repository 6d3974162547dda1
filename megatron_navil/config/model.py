"""Typed configs of the NaViL model, composed into :class:`NaViLConfig` with ``validate()``.

Every field has a docstring-comment; ``validate()`` raises ValueError naming the field and the
bad value. Sizes follow ../shared/NAVIL.md (the paper and the released inference code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal


def _check(ok: bool, owner: str, name: str, value: object, why: str) -> None:
    if not ok:
        raise ValueError(f"{owner}.{name}={value!r}: {why}")


def _positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _check(value > 0, type(obj).__name__, name, value, "must be > 0")


@dataclass(frozen=True)
class VisionConfig:
    """The native vision encoder, trained from scratch (no CLS token, no absolute positions)."""

    depth: int  # number of transformer blocks
    width: int  # hidden size W
    mlp: int  # GELU MLP inner size (fc1: W -> mlp, fc2: mlp -> W, both with bias)
    heads: int  # attention heads (head dim = width / heads, 64 in the released models)
    patch: int = 16  # pixels per patch side; the patch embedding sees 3 x patch x patch values
    channels: int = 3  # input channels
    rope_theta: float = 10000.0  # 2D RoPE base: half the frequencies rows, half columns
    norm_eps: float = 1e-6  # RMSNorm epsilon (norm1, norm2, and the full-width QK-norm)
    layer_scale_init: float = 0.1  # initial value of ls1/ls2
    window_size: int | None = 8  # the released code's token order (NAVIL.md "The released
    # code's exact behaviour", 1): patches of each image/scale are permuted, whole merge units
    # at a time, into windows of window_size/merge x window_size/merge units before the first
    # block, and the encoder's (and connector's) outputs stay in that order. In patches, a
    # multiple of the merge size. None: raster order (the paper's form; no permutation).
    fullatt_block_indexes: tuple[int, ...] | None = None  # None: every block attends over the
    # whole image/scale; a tuple: the blocks listed do, the others attend within each window

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    def validate(self) -> None:
        _positive(self, "depth", "width", "mlp", "heads", "patch", "channels")
        _check(
            self.width % self.heads == 0,
            "VisionConfig",
            "heads",
            self.heads,
            f"must divide width={self.width}",
        )
        _check(
            self.head_dim % 4 == 0,
            "VisionConfig",
            "heads",
            self.heads,
            f"head dim {self.head_dim} must be a multiple of 4 (2D RoPE: rows and columns "
            "each rotate pairs)",
        )
        if self.window_size is not None:
            _check(
                self.window_size > 0, "VisionConfig", "window_size", self.window_size, "must be > 0"
            )
        if self.fullatt_block_indexes is not None:
            _check(
                self.window_size is not None,
                "VisionConfig",
                "fullatt_block_indexes",
                self.fullatt_block_indexes,
                "window attention needs window_size",
            )
            for layer in self.fullatt_block_indexes:
                _check(
                    0 <= layer < self.depth,
                    "VisionConfig",
                    "fullatt_block_indexes",
                    self.fullatt_block_indexes,
                    f"block {layer} outside [0, {self.depth})",
                )

    def window_units(self, merge: int) -> int | None:
        """The window side in merge units (``window_size // merge``), None in raster order."""
        return None if self.window_size is None else self.window_size // merge


@dataclass(frozen=True)
class ConnectorConfig:
    """Pixel shuffle (merge x merge patches -> one token) + LayerNorm -> Linear -> GELU ->
    Linear into the LLM width."""

    merge: int = 2  # patches per side merged into one LLM token
    norm_eps: float = 1e-5  # LayerNorm epsilon over merge^2 * W features

    def validate(self) -> None:
        _positive(self, "merge")


@dataclass(frozen=True)
class LanguageConfig:
    """The causal LLM; every layer has a text and a visual expert (q/k/v/o and SwiGLU FFN)."""

    variant: Literal["internlm2", "qwen3"]  # backbone family (2B: InternLM2, 9B: Qwen3)
    hidden: int  # hidden size H
    layers: int  # decoder layers
    heads: int  # query heads
    kv_heads: int  # key/value heads (grouped-query attention)
    head_dim: int  # per-head size (128 in both backbones)
    ffn: int  # SwiGLU inner size
    vocab: int  # embedding rows (the 12 special tokens' own table is separate)
    rope_theta: float = 1e6  # 1D RoPE base over the flat sequence
    norm_eps: float = 1e-6  # RMSNorm epsilon
    qk_norm: bool = False  # per-head RMSNorm on q and k (Qwen3)
    tie_embeddings: bool = False  # share input embedding and LM head (neither backbone does)
    wo_then_wo_ve: bool = False  # released 2B code: visual attention output goes through wo,
    # then wo_ve (on in navil-2b, as its released weights were trained); off = the paper's
    # formula (wo_ve alone).

    def validate(self) -> None:
        _positive(self, "hidden", "layers", "heads", "kv_heads", "head_dim", "ffn", "vocab")
        _check(
            self.variant in ("internlm2", "qwen3"),
            "LanguageConfig",
            "variant",
            self.variant,
            "must be 'internlm2' or 'qwen3'",
        )
        _check(
            self.heads % self.kv_heads == 0,
            "LanguageConfig",
            "kv_heads",
            self.kv_heads,
            f"must divide heads={self.heads}",
        )
        _check(
            self.head_dim % 2 == 0,
            "LanguageConfig",
            "head_dim",
            self.head_dim,
            "must be even (RoPE rotates pairs)",
        )
        _check(
            not (self.wo_then_wo_ve and self.variant != "internlm2"),
            "LanguageConfig",
            "wo_then_wo_ve",
            self.wo_then_wo_ve,
            "is a quirk of the released 2B (InternLM2) code only",
        )


@dataclass(frozen=True)
class ExpertsConfig:
    """Modality experts. One expert per modality with hard routing is exactly NaViL; more
    experts per modality add learned top-k routing inside each modality's group."""

    per_modality: int = 1  # FFN experts per modality (text, visual)
    topk: int = 1  # experts a token uses inside its modality's group
    aux_loss_coeff: float = 0.0  # load-balancing loss per modality (only with per_modality > 1)

    def validate(self) -> None:
        _positive(self, "per_modality", "topk")
        _check(
            self.topk <= self.per_modality,
            "ExpertsConfig",
            "topk",
            self.topk,
            f"cannot exceed per_modality={self.per_modality}",
        )
        _check(
            self.aux_loss_coeff >= 0,
            "ExpertsConfig",
            "aux_loss_coeff",
            self.aux_loss_coeff,
            "must be >= 0",
        )


@dataclass(frozen=True)
class ImageConfig:
    """NaViL's image processing: native resolution, zero padding, multi-scale packing."""

    min_patches: int = 256  # fewer 16x16 patches than this: upscale (keep aspect ratio)
    max_patches: int = 24576  # more than this: downscale (keep aspect ratio)
    max_aspect: float = 200.0  # reject longer/shorter side ratios above this
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)  # per-channel normalisation
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)
    multi_scale: bool = True  # visual multi-scale packing (VMP)
    # per-side factor between scales (area about halves): the released configs'
    # scale_downsample_ratio, 0.7071 exactly (not sqrt(2)/2; ops/vmp.py says why it matters)
    scale_ratio: float = 0.7071

    def validate(self) -> None:
        _positive(self, "min_patches", "max_patches")
        _check(
            math.isfinite(self.max_aspect) and self.max_aspect >= 1,
            "ImageConfig",
            "max_aspect",
            self.max_aspect,
            "must be a finite ratio >= 1 (long/short side)",
        )
        _check(
            self.min_patches <= self.max_patches,
            "ImageConfig",
            "min_patches",
            self.min_patches,
            f"exceeds max_patches={self.max_patches}",
        )
        _check(all(s > 0 for s in self.std), "ImageConfig", "std", self.std, "must be > 0")
        _check(
            0 < self.scale_ratio < 1,
            "ImageConfig",
            "scale_ratio",
            self.scale_ratio,
            "must be in (0, 1)",
        )


CHAT_TEMPLATES: tuple[str, ...] = ("internlm2-chat", "qwen3-chat")
"""Chat templates (NAVIL.md "Chat templates"); data/templates.py renders them."""

DEFAULT_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "  # noqa: RUF001
    "是一个有用无害的人工智能助手。"
)
"""InternVL's default system message, which both of the released NaViL templates carry
(NAVIL.md, "The released code's exact behaviour", 4)."""


@dataclass(frozen=True)
class PromptConfig:
    """How conversations are rendered for this model: the official config.json's top-level
    ``template`` and ``system_message``. Training takes them from the corpus it reads (the
    indexer rendered its samples with them), so a checkpoint says how its prompts looked and
    captioning and the HF export build prompts the same way."""

    template: str = "qwen3-chat"  # internlm2-chat | qwen3-chat
    system_message: str = DEFAULT_SYSTEM_MESSAGE  # the system turn of every conversation;
    # "" = no system turn (e.g. the tiny run, whose small tokenizer would spend ~100 tokens
    # a sample on it)

    def validate(self) -> None:
        _check(
            self.template in CHAT_TEMPLATES,
            "PromptConfig",
            "template",
            self.template,
            f"must be one of {CHAT_TEMPLATES}",
        )


RECOMPUTE_MODES: tuple[str, ...] = ("none", "selective", "full")
"""Activation recompute modes, shared with the planner's memory model
(``planning/activations.py``)."""


@dataclass(frozen=True)
class Recompute:
    """Activation recompute (checkpointing): the backward re-runs parts of the forward instead
    of keeping their activations. A training choice, not part of the model: handed to
    ``models.build.build_model`` next to the config; the default is no recompute.

    - ``none``: autograd keeps every activation (no extra work).
    - ``selective``: the cheap, memory-heavy element-wise parts keep only their inputs and are
      recomputed in the backward: the RMSNorms (LLM input / post-attention norms and Qwen3's
      per-head q/k norms; vision norm1 / norm2 and the full-width q/k norms) and the MLP
      activation (the experts' SwiGLU with its routing-probability scale; the vision GELU).
      Their outputs are released after the next block and rebuilt when its gradient arrives
      (megatron-core's ``CheckpointWithoutOutput``, its ``layernorm`` / ``moe_act`` recompute).
    - ``full``: each LLM decoder layer / vision block keeps only its input and is run again,
      whole, in the backward (megatron-core's ``tensor_parallel.checkpoint``).
    """

    llm: str = "none"  # LLM decoder layers: none | selective | full
    vision: str = "none"  # vision encoder blocks: none | selective | full

    def validate(self) -> Recompute:
        for name in ("llm", "vision"):
            value = getattr(self, name)
            _check(
                value in RECOMPUTE_MODES,
                "Recompute",
                name,
                value,
                f"must be one of {RECOMPUTE_MODES}",
            )
        return self

    @property
    def enabled(self) -> bool:
        """Anything recomputed at all."""
        return (self.llm, self.vision) != ("none", "none")


@dataclass(frozen=True)
class NaViLConfig:
    """The whole model: vision encoder, connector, modality-expert LLM, tokens, images."""

    name: str
    vision: VisionConfig
    language: LanguageConfig
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    image: ImageConfig = field(default_factory=ImageConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    special_token_first_id: int | None = None  # id of '</box>' when the 12 ids are contiguous
    # (2B: 92544..92555 appended to InternLM2's vocab); None: the tokenizer resolves them.

    def validate(self) -> NaViLConfig:
        """Check every part and their agreement; returns self for chaining."""
        parts = (self.vision, self.language, self.connector, self.experts, self.image)
        for part in (*parts, self.prompt):
            part.validate()
        window, merge = self.vision.window_size, self.connector.merge
        if window is not None:
            _check(
                window % merge == 0,
                "VisionConfig",
                "window_size",
                window,
                f"must be a multiple of the merge size {merge} (windows hold whole merge units)",
            )
        first = self.special_token_first_id
        if first is not None:
            _check(first >= 0, "NaViLConfig", "special_token_first_id", first, "must be >= 0")
        return self

    @property
    def merged_width(self) -> int:
        """Features per LLM image token after pixel shuffle: merge^2 * W."""
        return self.connector.merge**2 * self.vision.width

    def replace(self, **parts: object) -> NaViLConfig:
        """A copy with some parts (or fields) replaced, e.g. ``cfg.replace(experts=...)``."""
        known = {f.name for f in fields(self)}
        unknown = set(parts) - known
        if unknown:
            raise ValueError(f"NaViLConfig has no field(s) {sorted(unknown)}")
        import dataclasses

        return dataclasses.replace(self, **parts)  # type: ignore[arg-type]
