"""Every NaViL parameter: its megatron dist-checkpoint key, its official HF name(s), and the
exact transform between them, for one :class:`NaViLConfig`.

Megatron keys are the *global* tensors of the dist checkpoint, the same for every TP/PP/EP
layout (megatron-core stores each tensor's shards with their offsets in the full tensor):

  embedding.weight [V, H], output_layer.weight [V, H], final_layernorm.weight [H],
  special_token_embedding [12, H]
  layers.{i}.{input_layernorm,post_attention_layernorm}.weight [H]
  layers.{i}.self_attention.linear_qkv.{text,visual}.weight [(heads + 2 kv) d, H], grouped:
      per kv group its query heads, then its key head, then its value head
  layers.{i}.self_attention.linear_proj.{text,visual}.weight [H, heads d]
  layers.{i}.self_attention.{q,k}_layernorm.{text,visual}.weight [d] (Qwen3)
  layers.{i}.mlp.experts.experts.linear_fc1.weight [2, 2 ffn, H]: expert 0 text, 1 visual;
      rows [gate; up] (megatron's SwiGLU chunk order)
  layers.{i}.mlp.experts.experts.linear_fc2.weight [2, H, ffn]
  mlp1.{0,1,3}.{weight,bias}; vision_model.* (see models/vision.py for the two layouts that
      differ from the official ones: patch embedding [W, C*p*p] and per-head qkv)

Each :class:`Rule` maps one megatron key to one or more HF tensors; ``to_hf`` and
``from_hf`` are exact inverses (reshapes, slices and concatenations only: bit-exact round
trips). ``rules(cfg)`` is the complete list; converters compare it with what a checkpoint
holds and fail naming any tensor that is missing or unknown.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from megatron_navil.config.model import NaViLConfig

Tensors = tuple[torch.Tensor, ...]


class ConversionError(ValueError):
    """A checkpoint that cannot be converted exactly (one line, names the tensor)."""


@dataclass(frozen=True)
class Rule:
    """One megatron tensor <-> ``hf`` tensors."""

    megatron: str
    shape: tuple[int, ...]
    hf: tuple[str, ...]
    hf_shapes: tuple[tuple[int, ...], ...]
    to_hf: Callable[[torch.Tensor], Tensors]
    from_hf: Callable[[Sequence[torch.Tensor]], torch.Tensor]


def _same(name: str, meg: str, shape: tuple[int, ...]) -> Rule:
    return Rule(meg, shape, (name,), (shape,), lambda t: (t,), lambda ts: ts[0])


def _reshaped(meg: str, shape: tuple[int, ...], name: str, hf_shape: tuple[int, ...]) -> Rule:
    return Rule(
        meg, shape, (name,), (hf_shape,),
        lambda t: (t.reshape(hf_shape),), lambda ts: ts[0].reshape(shape),
    )  # fmt: skip


def _experts(meg: str, shape: tuple[int, ...], names: Sequence[Sequence[str]],
             sizes: Sequence[int], dim: int) -> Rule:  # fmt: skip
    """``[2, ...]`` expert stack: expert e's slice split into ``names[e]`` along ``dim``."""
    inner = shape[1:]
    hf_names, hf_shapes = [], []
    for group in names:
        for name, size in zip(group, sizes, strict=True):
            s = list(inner)
            s[dim] = size
            hf_names.append(name)
            hf_shapes.append(tuple(s))
    per = len(sizes)

    def to_hf(t: torch.Tensor) -> Tensors:
        out: list[torch.Tensor] = []
        for e in range(shape[0]):
            out += [p.contiguous() for p in torch.split(t[e], list(sizes), dim=dim)]
        return tuple(out)

    def from_hf(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        experts = [torch.cat(list(ts[e * per : (e + 1) * per]), dim=dim) for e in range(shape[0])]
        return torch.stack(experts)

    return Rule(meg, shape, tuple(hf_names), tuple(hf_shapes), to_hf, from_hf)


def _vision_qkv(meg: str, heads: int, width: int, name: str) -> Rule:
    hd = width // heads
    shape = (3 * width, width)

    def to_hf(t: torch.Tensor) -> Tensors:  # per-head [q_h; k_h; v_h] -> [q; k; v]
        return (t.view(heads, 3, hd, width).transpose(0, 1).reshape(shape).contiguous(),)

    def from_hf(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        return ts[0].view(3, heads, hd, width).transpose(0, 1).reshape(shape).contiguous()

    return Rule(meg, shape, (name,), (shape,), to_hf, from_hf)


def _llm_qkv_split(meg: str, heads: int, kv: int, d: int, hidden: int,
                   names: Sequence[str]) -> Rule:  # fmt: skip
    """Grouped ``[kv, per + 2, d, H]`` <-> separate q ``[heads d, H]``, k, v ``[kv d, H]``."""
    per = heads // kv
    shape = ((heads + 2 * kv) * d, hidden)

    def to_hf(t: torch.Tensor) -> Tensors:
        g = t.view(kv, per + 2, d, hidden)
        q = g[:, :per].reshape(heads * d, hidden).contiguous()
        return (
            q,
            g[:, per].reshape(kv * d, hidden).contiguous(),
            g[:, per + 1].reshape(kv * d, hidden).contiguous(),
        )

    def from_hf(ts: Sequence[torch.Tensor]) -> torch.Tensor:
        q = ts[0].view(kv, per, d, hidden)
        k = ts[1].view(kv, 1, d, hidden)
        v = ts[2].view(kv, 1, d, hidden)
        return torch.cat([q, k, v], dim=1).reshape(shape).contiguous()

    hf_shapes = ((heads * d, hidden), (kv * d, hidden), (kv * d, hidden))
    return Rule(meg, shape, tuple(names), hf_shapes, to_hf, from_hf)


def check_supported(cfg: NaViLConfig) -> None:
    """ConversionError for configs the official format (and our HF code) cannot express."""
    if cfg.experts.per_modality != 1:
        raise ConversionError(
            f"ExpertsConfig.per_modality={cfg.experts.per_modality}: the HF format has one "
            "FFN expert per modality (NaViL); learned routing inside a modality is megatron-only"
        )
    if cfg.language.tie_embeddings:
        raise ConversionError("LanguageConfig.tie_embeddings=True is not supported")
    if cfg.language.variant == "internlm2" and cfg.language.qk_norm:
        raise ConversionError(
            "LanguageConfig: InternLM2-style layers with qk_norm have no HF names"
        )
    if cfg.connector.norm_eps != 1e-5:
        raise ConversionError(
            f"ConnectorConfig.norm_eps={cfg.connector.norm_eps}: the HF connector uses 1e-5"
        )
    if tuple(cfg.image.mean) != (0.5, 0.5, 0.5) or tuple(cfg.image.std) != (0.5, 0.5, 0.5):
        raise ConversionError("ImageConfig.mean/std: the HF preprocessing normalises with 0.5")


def rules(cfg: NaViLConfig) -> list[Rule]:
    """The complete mapping for ``cfg`` (ConversionError for configs it cannot express)."""
    check_supported(cfg)
    v, lm = cfg.vision, cfg.language
    w, h, d = v.width, lm.hidden, lm.head_dim
    out: list[Rule] = []
    # vision encoder
    patch_in = v.channels * v.patch * v.patch
    out.append(
        _reshaped(
            "vision_model.embeddings.patch_embedding.weight", (w, patch_in),
            "vision_model.embeddings.patch_embedding.weight", (w, v.channels, v.patch, v.patch),
        )
    )  # fmt: skip
    out.append(
        _same(
            "vision_model.embeddings.patch_embedding.bias",
            "vision_model.embeddings.patch_embedding.bias",
            (w,),
        )
    )
    for i in range(v.depth):
        p = f"vision_model.encoder.layers.{i}."
        out.append(_vision_qkv(p + "attn.qkv.weight", v.heads, w, p + "attn.qkv.weight"))
        for name, shape in (
            ("attn.q_norm.weight", (w,)), ("attn.k_norm.weight", (w,)),
            ("attn.proj.weight", (w, w)), ("attn.proj.bias", (w,)),
            ("mlp.fc1.weight", (v.mlp, w)), ("mlp.fc1.bias", (v.mlp,)),
            ("mlp.fc2.weight", (w, v.mlp)), ("mlp.fc2.bias", (w,)),
            ("norm1.weight", (w,)), ("norm2.weight", (w,)), ("ls1", (w,)), ("ls2", (w,)),
        ):  # fmt: skip
            out.append(_same(p + name, p + name, shape))
    # connector and special tokens
    unit = cfg.merged_width
    for name, shape in (
        ("mlp1.0.weight", (unit,)), ("mlp1.0.bias", (unit,)),
        ("mlp1.1.weight", (h, unit)), ("mlp1.1.bias", (h,)),
        ("mlp1.3.weight", (h, h)), ("mlp1.3.bias", (h,)),
    ):  # fmt: skip
        out.append(_same(name, name, shape))
    out.append(_same("special_token_embedding.weight", "special_token_embedding", (12, h)))
    # language model
    internlm2 = lm.variant == "internlm2"
    base = "language_model.model."
    embed = "tok_embeddings" if internlm2 else "embed_tokens"
    out.append(_same(base + embed + ".weight", "embedding.weight", (lm.vocab, h)))
    out.append(_same(base + "norm.weight", "final_layernorm.weight", (h,)))
    head = "language_model.output.weight" if internlm2 else "language_model.lm_head.weight"
    out.append(_same(head, "output_layer.weight", (lm.vocab, h)))
    qkv_rows = (lm.heads + 2 * lm.kv_heads) * d
    for i in range(lm.layers):
        m, p = f"layers.{i}.", f"{base}layers.{i}."
        norms = ("attention_norm", "ffn_norm") if internlm2 else (
            "input_layernorm", "post_attention_layernorm"
        )  # fmt: skip
        out.append(_same(p + norms[0] + ".weight", m + "input_layernorm.weight", (h,)))
        out.append(_same(p + norms[1] + ".weight", m + "post_attention_layernorm.weight", (h,)))
        for modality, sfx in (("text", ""), ("visual", "_ve")):
            qkv = f"{m}self_attention.linear_qkv.{modality}.weight"
            proj = f"{m}self_attention.linear_proj.{modality}.weight"
            if internlm2:
                out.append(_same(f"{p}attention.wqkv{sfx}.weight", qkv, (qkv_rows, h)))
                out.append(_same(f"{p}attention.wo{sfx}.weight", proj, (h, lm.heads * d)))
            else:
                names = [f"{p}self_attn.{x}_proj{sfx}.weight" for x in "qkv"]
                out.append(_llm_qkv_split(qkv, lm.heads, lm.kv_heads, d, h, names))
                out.append(_same(f"{p}self_attn.o_proj{sfx}.weight", proj, (h, lm.heads * d)))
                if lm.qk_norm:
                    for x in "qk":
                        meg = f"{m}self_attention.{x}_layernorm.{modality}.weight"
                        out.append(_same(f"{p}self_attn.{x}_norm{sfx}.weight", meg, (d,)))
        ffn = ("feed_forward", "feed_forward_ve") if internlm2 else ("mlp", "mlp_ve")
        gate, up, down = ("w1", "w3", "w2") if internlm2 else ("gate_proj", "up_proj", "down_proj")
        fc1 = [[f"{p}{f}.{gate}.weight", f"{p}{f}.{up}.weight"] for f in ffn]
        fc2 = [[f"{p}{f}.{down}.weight"] for f in ffn]
        out.append(
            _experts(f"{m}mlp.experts.experts.linear_fc1.weight", (2, 2 * lm.ffn, h), fc1,
                     (lm.ffn, lm.ffn), dim=0)
        )  # fmt: skip
        out.append(
            _experts(f"{m}mlp.experts.experts.linear_fc2.weight", (2, h, lm.ffn), fc2,
                     (h,), dim=0)
        )  # fmt: skip
    return out


def megatron_shapes(cfg: NaViLConfig) -> dict[str, tuple[int, ...]]:
    """Global shape of every megatron key of ``cfg``."""
    return {r.megatron: r.shape for r in rules(cfg)}


def hf_shapes(cfg: NaViLConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every HF tensor of ``cfg``."""
    return {n: s for r in rules(cfg) for n, s in zip(r.hf, r.hf_shapes, strict=True)}


def check_names(found: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                where: str) -> None:  # fmt: skip
    """ConversionError naming the first missing, unknown or wrongly shaped tensor."""
    missing = sorted(set(expected) - set(found))
    unknown = sorted(set(found) - set(expected))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(f"{where}: expected tensor {missing[0]!r} is missing{more}")
    if unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise ConversionError(
            f"{where}: tensor {unknown[0]!r} is not part of the model{more}; refusing to drop it"
        )
    for name, shape in expected.items():
        if tuple(found[name]) != tuple(shape):
            raise ConversionError(
                f"{where}: tensor {name!r} has shape {tuple(found[name])}, expected {tuple(shape)}"
            )
