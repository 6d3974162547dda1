"""``NaViLConfig`` <-> the HF ``config.json`` of the official NaViL release format.

Written to ../shared/NAVIL.md, "The released code's exact behaviour", 6: ``architectures``
``["NaViL"]``, ``model_type`` ``navil_chat``, every official top-level field (``template``,
``system_message``, ``downsample_ratio``, ``min_dynamic_patch``/``max_dynamic_patch``,
``scale_downsample_ratio`` (0.7071, here too), ``anyres_image_size``, ``force_image_size``,
``pad2square``, ``ps_version``, ``select_layer``, ``use_backbone_lora``, ``use_llm_lora``),
every official ``vision_config`` field (``window_size``, ``fullatt_block_indexes``,
``qkv_bias``, ...), and an ``llm_config`` whose ``architectures`` is the released class
(``InternLM2VEForCausalLM`` / ``Qwen3VEForCausalLM``; the released code refuses anything
else) with InternLM2's ``bias`` written false (its default is true). So the authors' code
loads an export, and this project reads theirs.

Fields of ours besides (ignored by the released code): ``special_token_ids`` (the 12 ids, also
in the tokenizer), ``use_multi_scale``, ``max_aspect_ratio``, ``navil_config_name``, and in
``llm_config`` ``qk_norm`` and ``wo_then_wo_ve`` (absent in official configs: True for InternLM2,
the released 2B code's behaviour; our HF code and importer default to that).

A backbone the released code has no class for (a Llama/SmolLM-style LLM: Qwen3 layers without
the per-head QK-norm) exports with ``llm_config.model_type`` ``llama``: our remote code runs it,
the authors' cannot (:func:`released_code_can_load` says why).
"""

from __future__ import annotations

from typing import Any

from megatron_navil.config.model import (
    ConnectorConfig,
    ImageConfig,
    LanguageConfig,
    NaViLConfig,
    PromptConfig,
    VisionConfig,
)
from megatron_navil.conversion.mapping import ConversionError, check_supported

AUTO_MAP = {
    "AutoConfig": "configuration_navil.NaViLChatConfig",
    "AutoModel": "modeling_navil.NaViL",
    "AutoModelForCausalLM": "modeling_navil.NaViL",
}
REMOTE_CODE_FILES = ("configuration_navil.py", "modeling_navil.py", "processing_navil.py")
LLM_ARCHITECTURES = {"internlm2": "InternLM2VEForCausalLM", "qwen3": "Qwen3VEForCausalLM"}
"""The released code's LLM classes (its config refuses any other)."""
LLAMA_ARCHITECTURE = "LlamaVEForCausalLM"
"""Ours for Qwen3-style layers without QK-norm; the released code has no such class."""
VISION_IMAGE_SIZE = 448
"""``vision_config.image_size``: read by the released code only for fixed-resolution (not
``anyres``) inputs, which NaViL never uses; InternVL's value."""


def released_code_can_load(cfg: NaViLConfig) -> str | None:
    """None when the authors' released code can run an export of ``cfg``, else why not."""
    lm = cfg.language
    if lm.variant == "qwen3" and not lm.qk_norm:
        return (
            "Qwen3-style layers without QK-norm (a Llama/SmolLM-initialised LLM): the released "
            "code has only InternLM2VEForCausalLM and Qwen3VEForCausalLM"
        )
    if lm.variant == "internlm2" and not lm.wo_then_wo_ve:
        return (
            "an InternLM2 LLM with the paper's visual attention output (wo_ve alone): the "
            "released 2B code applies wo then wo_ve"
        )
    if cfg.vision.window_size is None:
        return "raster token order (window_size None): the released code always permutes"
    if not cfg.image.multi_scale:
        return (
            "one scale per image (use_multi_scale false, e.g. a corpus indexed with "
            "--no-multi-scale): the released demo always packs every scale, so its code would "
            "run the model on inputs unlike its training"
        )
    return None


def to_hf_config(cfg: NaViLConfig, special_token_ids: list[int], dtype: str) -> dict[str, Any]:
    """The ``config.json`` dict of ``cfg`` (``dtype``: "float32" or "bfloat16")."""
    check_supported(cfg)
    v, lm, im = cfg.vision, cfg.language, cfg.image
    llama = lm.variant == "qwen3" and not lm.qk_norm
    llm: dict[str, Any] = {
        "architectures": [LLAMA_ARCHITECTURE if llama else LLM_ARCHITECTURES[lm.variant]],
        "model_type": "llama" if llama else lm.variant,
        "hidden_size": lm.hidden,
        "num_hidden_layers": lm.layers,
        "num_attention_heads": lm.heads,
        "num_key_value_heads": lm.kv_heads,
        "head_dim": lm.head_dim,
        "intermediate_size": lm.ffn,
        "vocab_size": lm.vocab,
        "rope_theta": lm.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": lm.norm_eps,
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "tie_word_embeddings": False,
        "torch_dtype": dtype,
        "qk_norm": lm.qk_norm,
        "wo_then_wo_ve": lm.wo_then_wo_ve,
    }
    if lm.variant == "internlm2":
        llm["bias"] = False  # InternLM2Config's default is True: 4 bias tensors a layer
    else:
        llm["attention_bias"] = False
    merge = cfg.connector.merge
    vision = {
        "architectures": ["NaViLVisionModelAnyRes"],
        "hidden_size": v.width,
        "num_hidden_layers": v.depth,
        "intermediate_size": v.mlp,
        "num_attention_heads": v.heads,
        "patch_size": v.patch,
        "image_size": VISION_IMAGE_SIZE,
        "num_channels": v.channels,
        "layer_norm_eps": v.norm_eps,
        "rope_theta": v.rope_theta,
        "qkv_bias": False,
        "qk_normalization": True,
        "norm_type": "rms_norm",
        "hidden_act": "gelu",
        "initializer_factor": v.layer_scale_init,
        "initializer_range": 0.02,
        "use_flash_attn": False,  # the released code takes flash-attn when installed anyway
        "drop_path_rate": 0.0,
        "dropout": 0.0,
        "attention_dropout": 0.0,
        "downsample_ratio": 1.0 / merge,
        "window_size": v.window_size,
        "fullatt_block_indexes": (
            None if v.fullatt_block_indexes is None else list(v.fullatt_block_indexes)
        ),
        "torch_dtype": dtype,
    }
    return {
        "architectures": ["NaViL"],
        "model_type": "navil_chat",
        "auto_map": dict(AUTO_MAP),
        "torch_dtype": dtype,
        "vision_config": vision,
        "llm_config": llm,
        "template": cfg.prompt.template,
        "system_message": cfg.prompt.system_message,
        "downsample_ratio": 1.0 / merge,
        "min_dynamic_patch": im.min_patches,
        "max_dynamic_patch": im.max_patches,
        "scale_downsample_ratio": im.scale_ratio,
        "anyres_image_size": True,
        "force_image_size": None,
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "use_multi_scale": im.multi_scale,
        "max_aspect_ratio": im.max_aspect,
        "special_token_ids": [int(i) for i in special_token_ids],
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
        variant = {"llama": "qwen3"}.get(lm["model_type"], lm["model_type"])
        if variant not in ("internlm2", "qwen3"):
            raise ConversionError(
                f"llm_config.model_type={lm['model_type']!r}: internlm2, qwen3 or llama"
            )
        # absent: InternLM2Config's default (true) in an official config; our exports
        # before this field was written had no biases either
        if variant == "internlm2" and lm.get("bias", "navil_config_name" not in config):
            raise ConversionError(
                "llm_config.bias is true (InternLM2's default): NaViL's LLM has no biases "
                "(the released 2B config says false)"
            )
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
            # the official config's defaults: window order of 8 patches, every block global
            window_size=v.get("window_size", 8),
            fullatt_block_indexes=(
                None if v.get("fullatt_block_indexes") is None
                else tuple(v["fullatt_block_indexes"])
            ),
        )  # fmt: skip
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
            qk_norm=lm.get("qk_norm", lm["model_type"] == "qwen3"),
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
    if ids is not None and list(ids) == list(range(ids[0], ids[0] + 12)):
        first = ids[0]
    template = config.get("template") or (
        "internlm2-chat" if variant == "internlm2" else "qwen3-chat"
    )
    prompt = PromptConfig(template=template)
    if config.get("system_message") is not None:
        prompt = PromptConfig(template=template, system_message=config["system_message"])
    cfg = NaViLConfig(
        name=name or config.get("navil_config_name", "hf"),
        vision=vision,
        language=language,
        connector=ConnectorConfig(merge=merge),
        image=image,
        prompt=prompt,
        special_token_first_id=first,
    )
    try:
        return cfg.validate()
    except ValueError as exc:
        raise ConversionError(f"config.json: {exc}") from None


def special_token_ids_of(config: dict[str, Any]) -> list[int] | None:
    """The 12 special token ids an HF NaViL config carries (ours do), or None (official
    configs do not: the ids come from the tokenizer, NAVIL.md section 5)."""
    ids = config.get("special_token_ids")
    return None if ids is None else [int(i) for i in ids]
