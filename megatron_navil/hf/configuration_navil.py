"""Configuration of the NaViL HF model (remote code shipped in exported checkpoints).

Field names follow the official NaViL release (``model_type: "navil_chat"``, top-level
``downsample_ratio``, ``min_dynamic_patch``, ``max_dynamic_patch``, ``scale_downsample_ratio``,
nested ``vision_config`` and ``llm_config``), so an official ``config.json`` loads here and ours
loads with the official code's readers of those fields. ``vision_config`` and ``llm_config``
are kept as plain dicts (the modeling code reads them through :func:`sub`), which serialise
the same in every ``transformers`` version.

``llm_config["model_type"]`` picks the backbone: ``"internlm2"`` (NaViL-2B: fused grouped
``wqkv``, ``feed_forward.w1/w2/w3``) or ``"qwen3"`` (NaViL-9B: ``q/k/v/o_proj`` and per-head
``q_norm``/``k_norm``); ``"llama"`` is accepted as Qwen3-style without QK-norm.
``llm_config["wo_then_wo_ve"]``: a visual token's attention output goes through ``wo`` and
then ``wo_ve`` (the released 2B code); absent means True for InternLM2 (the released code's
behaviour) and False otherwise.

Official fields used here: ``template`` (default "internlm2-chat" for InternLM2, else
"qwen3-chat"), ``system_message`` (default InternVL's, which both released templates carry),
``vision_config.window_size`` (8) and ``fullatt_block_indexes`` (None); the other official
fields (``anyres_image_size``, ``ps_version``, ...) are kept as they are. Fields beyond the
official ones (absent in official configs, defaults shown): ``special_token_ids`` (the 12 ids
in ``SPECIAL_TOKENS`` order; None: ``model.init_special_token_ids(tokenizer)`` sets them, as
the released API does), ``use_multi_scale`` (True), ``max_aspect_ratio`` (200).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

from transformers import PretrainedConfig

DEFAULT_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "  # noqa: RUF001
    "是一个有用无害的人工智能助手。"
)
"""InternVL's default system message (a copy: this file is standalone; a test keeps it equal
to ``megatron_navil.config.model.DEFAULT_SYSTEM_MESSAGE``)."""
VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 1472,
    "num_hidden_layers": 24,
    "intermediate_size": 5888,
    "num_attention_heads": 23,
    "patch_size": 16,
    "num_channels": 3,
    "layer_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "qk_normalization": True,
    "norm_type": "rms_norm",
    "initializer_factor": 0.1,
    "window_size": 8,
    "fullatt_block_indexes": None,
}
LLM_DEFAULTS: dict[str, Any] = {
    "model_type": "internlm2",
    "hidden_size": 2048,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": None,
    "intermediate_size": 8192,
    "vocab_size": 92544,
    "rope_theta": 1e6,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}


def sub(config: Any) -> SimpleNamespace:
    """Attribute view of a nested config (a dict or a config object) with defaults filled."""
    data = config if isinstance(config, dict) else config.to_dict()
    return SimpleNamespace(**data)


class NaViLChatConfig(PretrainedConfig):
    """NaViL: native vision encoder + connector (``mlp1``) + modality-expert LLM."""

    model_type = "navil_chat"

    def __init__(
        self,
        vision_config: dict[str, Any] | None = None,
        llm_config: dict[str, Any] | None = None,
        downsample_ratio: float = 0.5,
        min_dynamic_patch: int = 256,
        max_dynamic_patch: int = 24576,
        scale_downsample_ratio: float = 0.7071,
        special_token_ids: list[int] | None = None,
        use_multi_scale: bool = True,
        max_aspect_ratio: float = 200.0,
        template: str | None = None,
        system_message: str | None = None,
        **kwargs: Any,
    ) -> None:
        vision = dict(VISION_DEFAULTS)
        vision.update(_as_dict(vision_config))
        llm = dict(LLM_DEFAULTS)
        llm.update(_as_dict(llm_config))
        if llm.get("head_dim") is None:
            llm["head_dim"] = llm["hidden_size"] // llm["num_attention_heads"]
        llm.setdefault("wo_then_wo_ve", llm["model_type"] == "internlm2")
        self.vision_config = vision
        self.llm_config = llm
        self.downsample_ratio = float(downsample_ratio)
        self.min_dynamic_patch = int(min_dynamic_patch)
        self.max_dynamic_patch = int(max_dynamic_patch)
        self.scale_downsample_ratio = float(scale_downsample_ratio)
        self.special_token_ids = (
            None if special_token_ids is None else [int(i) for i in special_token_ids]
        )
        self.use_multi_scale = bool(use_multi_scale)
        self.max_aspect_ratio = float(max_aspect_ratio)
        if template is None:
            template = "internlm2-chat" if llm["model_type"] == "internlm2" else "qwen3-chat"
        self.template = template
        self.system_message = DEFAULT_SYSTEM_MESSAGE if system_message is None else system_message
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(**kwargs)
        if self.special_token_ids is not None and len(self.special_token_ids) != 12:
            raise ValueError(f"special_token_ids needs 12 ids, got {self.special_token_ids}")


def _as_dict(value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return dict(value)
    return value.to_dict()
