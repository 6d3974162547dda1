"""``NaViLConfig`` <-> the HF ``config.json`` of the official NaViL release format.

Exact both ways for what the HF model can express (``mapping.check_supported``), including
``LanguageConfig.wo_then_wo_ve`` (``llm_config.wo_then_wo_ve``; absent in official configs,
where it defaults to True for InternLM2, the released 2B code's behaviour) and ``scale_ratio``
(``scale_downsample_ratio``, 0.7071 in official configs and by default here too).
"""

from __future__ import annotations

from typing import Any

from megatron_navil.config.model import (
    ConnectorConfig,
    ImageConfig,
    LanguageConfig,
    NaViLConfig,
    VisionConfig,
)
from megatron_navil.conversion.mapping import ConversionError, check_supported

AUTO_MAP = {
    "AutoConfig": "configuration_navil.NaViLChatConfig",
    "AutoModel": "modeling_navil.NaViL",
    "AutoModelForCausalLM": "modeling_navil.NaViL",
}
REMOTE_CODE_FILES = ("configuration_navil.py", "modeling_navil.py", "processing_navil.py")
LLM_ARCHITECTURES = {"internlm2": "InternLM2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def to_hf_config(
    cfg: NaViLConfig, special_token_ids: list[int], dtype: str, template: str | None = None
) -> dict[str, Any]:
    """The ``config.json`` dict of ``cfg`` (``dtype``: "float32" or "bfloat16")."""
    check_supported(cfg)
    v, lm, im = cfg.vision, cfg.language, cfg.image
    llm = {
        "architectures": [LLM_ARCHITECTURES[lm.variant]],
        "model_type": lm.variant,
        "hidden_size": lm.hidden,
        "num_hidden_layers": lm.layers,
        "num_attention_heads": lm.heads,
        "num_key_value_heads": lm.kv_heads,
        "head_dim": lm.head_dim,
        "intermediate_size": lm.ffn,
        "vocab_size": lm.vocab,
        "rope_theta": lm.rope_theta,
        "rms_norm_eps": lm.norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "qk_norm": lm.qk_norm,
        "wo_then_wo_ve": lm.wo_then_wo_ve,
    }
    vision = {
        "hidden_size": v.width,
        "num_hidden_layers": v.depth,
        "intermediate_size": v.mlp,
        "num_attention_heads": v.heads,
        "patch_size": v.patch,
        "num_channels": v.channels,
        "layer_norm_eps": v.norm_eps,
        "rope_theta": v.rope_theta,
        "qk_normalization": True,
        "norm_type": "rms_norm",
        "hidden_act": "gelu",
        "initializer_factor": v.layer_scale_init,
    }
    return {
        "architectures": ["NaViL"],
        "model_type": "navil_chat",
        "auto_map": dict(AUTO_MAP),
        "torch_dtype": dtype,
        "vision_config": vision,
        "llm_config": llm,
        "downsample_ratio": 1.0 / cfg.connector.merge,
        "min_dynamic_patch": im.min_patches,
        "max_dynamic_patch": im.max_patches,
        "scale_downsample_ratio": im.scale_ratio,
        "use_multi_scale": im.multi_scale,
        "max_aspect_ratio": im.max_aspect,
        "special_token_ids": [int(i) for i in special_token_ids],
        "template": template or ("internlm2-chat" if lm.variant == "internlm2" else "qwen3-chat"),
        "tie_word_embeddings": False,
        "navil_config_name": cfg.name,
    }


def from_hf_config(config: dict[str, Any], name: str | None = None) -> NaViLConfig:
    """The ``NaViLConfig`` of an HF NaViL ``config.json`` dict (ours or official)."""
    if config.get("model_type") != "navil_chat":
        raise ConversionError(
            f"config.json model_type={config.get('model_type')!r}: not a NaViL checkpoint "
            "(expected 'navil_chat')"
        )
    try:
        v, lm = config["vision_config"], config["llm_config"]
        variant = lm["model_type"]
        if variant not in ("internlm2", "qwen3"):
            raise ConversionError(f"llm_config.model_type={variant!r}: internlm2 or qwen3")
        merge = round(1 / float(config.get("downsample_ratio", 0.5)))
        vision = VisionConfig(
            depth=v["num_hidden_layers"],
            width=v["hidden_size"],
            mlp=v["intermediate_size"],
            heads=v["num_attention_heads"],
            patch=v.get("patch_size", 16),
            channels=v.get("num_channels", 3),
            rope_theta=v.get("rope_theta", 10000.0),
            norm_eps=v.get("layer_norm_eps", 1e-6),
            layer_scale_init=v.get("initializer_factor", 0.1),
        )
        language = LanguageConfig(
            variant=variant,
            hidden=lm["hidden_size"],
            layers=lm["num_hidden_layers"],
            heads=lm["num_attention_heads"],
            kv_heads=lm["num_key_value_heads"],
            head_dim=lm.get("head_dim") or lm["hidden_size"] // lm["num_attention_heads"],
            ffn=lm["intermediate_size"],
            vocab=lm["vocab_size"],
            rope_theta=lm.get("rope_theta", 1e6),
            norm_eps=lm.get("rms_norm_eps", 1e-6),
            qk_norm=lm.get("qk_norm", variant == "qwen3"),
            wo_then_wo_ve=lm.get("wo_then_wo_ve", variant == "internlm2"),
        )
        image = ImageConfig(
            min_patches=config.get("min_dynamic_patch", 256),
            max_patches=config.get("max_dynamic_patch", 24576),
            max_aspect=config.get("max_aspect_ratio", 200.0),
            multi_scale=config.get("use_multi_scale", True),
            scale_ratio=config.get("scale_downsample_ratio", 0.7071),
        )
    except KeyError as exc:
        raise ConversionError(f"config.json lacks field {exc.args[0]!r}") from None
    ids = config.get("special_token_ids")
    first = None
    if ids is None or list(ids) == list(range(ids[0], ids[0] + 12)):
        first = lm["vocab_size"] if ids is None else ids[0]
    cfg = NaViLConfig(
        name=name or config.get("navil_config_name", "hf"),
        vision=vision,
        language=language,
        connector=ConnectorConfig(merge=merge),
        image=image,
        special_token_first_id=first,
    )
    try:
        return cfg.validate()
    except ValueError as exc:
        raise ConversionError(f"config.json: {exc}") from None


def special_token_ids_of(config: dict[str, Any]) -> list[int]:
    """The 12 special token ids of an HF NaViL config (default: after the vocabulary)."""
    ids = config.get("special_token_ids")
    if ids is None:
        return [config["llm_config"]["vocab_size"] + i for i in range(12)]
    return [int(i) for i in ids]


def same_model(a: NaViLConfig, b: NaViLConfig) -> list[str]:
    """Fields (``part.field``) in which two configs' models differ (names ignored)."""
    out = []
    for part in ("vision", "language", "connector", "experts", "image"):
        pa, pb = getattr(a, part), getattr(b, part)
        for field in pa.__dataclass_fields__:
            if getattr(pa, field) != getattr(pb, field):
                out.append(f"{part}.{field}: {getattr(pa, field)!r} vs {getattr(pb, field)!r}")
    return out
