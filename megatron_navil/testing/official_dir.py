"""A small HF directory in the *released* NaViL format, with random weights, for tests.

Built from the documented names and fields alone (../shared/NAVIL.md, "Official HF release
format" and "The released code's exact behaviour", 6; the names come from
:func:`official_reference.expected_tensors`), not from this project's exporter: a
``config.json`` with the official top-level and vision fields, ``llm_config.architectures``
the released class, no ``special_token_ids`` and no ``system_message`` (the released configs
carry neither: the ids come from the tokenizer, the system message is the template's
default), float32 safetensors under the official names, and a byte-level BPE
``tokenizer.json`` whose 12 NaViL tokens sit *inside* the vocabulary (at ids 0..11, as
Qwen3's special tokens do, not after it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from megatron_navil.testing import official_reference as R


def official_config(
    variant: str = "qwen3",
    *,
    vocab: int = 512,
    window_size: int | None = 8,
    fullatt_block_indexes: list[int] | None = None,
    min_dynamic_patch: int = 16,
    max_dynamic_patch: int = 64,
) -> dict[str, Any]:
    """A tiny model's ``config.json`` in the released format (``variant``: "qwen3" for the
    9B's Qwen3VE layout, "internlm2" for the 2B's InternLM2VE layout)."""
    llm: dict[str, Any] = {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 128,
        "vocab_size": vocab,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 4096,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
    }
    if variant == "internlm2":
        llm |= {"architectures": ["InternLM2VEForCausalLM"], "model_type": "internlm2",
                "bias": False}  # fmt: skip
    else:
        llm |= {"architectures": ["Qwen3VEForCausalLM"], "model_type": "qwen3", "head_dim": 16,
                "attention_bias": False}  # fmt: skip
    return {
        "architectures": ["NaViL"],
        "model_type": "navil_chat",
        "auto_map": {
            "AutoConfig": "configuration_navil_chat.NaViLChatConfig",
            "AutoModel": "modeling_navil_chat.NaViL",
        },
        "template": "internlm2-chat" if variant == "internlm2" else "qwen3-chat",
        "downsample_ratio": 0.5,
        "min_dynamic_patch": min_dynamic_patch,
        "max_dynamic_patch": max_dynamic_patch,
        "scale_downsample_ratio": 0.7071,
        "anyres_image_size": True,
        "force_image_size": None,
        "pad2square": False,
        "ps_version": "v2",
        "select_layer": -1,
        "use_backbone_lora": 0,
        "use_llm_lora": 0,
        "torch_dtype": "float32",
        "vision_config": {
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "patch_size": 16,
            "image_size": 448,
            "num_channels": 3,
            "qkv_bias": False,
            "qk_normalization": True,
            "norm_type": "rms_norm",
            "hidden_act": "gelu",
            "layer_norm_eps": 1e-6,
            "initializer_factor": 0.1,
            "use_flash_attn": False,
            "drop_path_rate": 0.0,
            "downsample_ratio": 0.5,
            "window_size": window_size,
            "fullatt_block_indexes": fullatt_block_indexes,
        },
        "llm_config": llm,
    }


def random_weights(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """float32 tensors under the official names: norms and layer scales around their inits
    (1 and 0.1), the rest N(0, 0.1) (large enough that every part changes the logits)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in sorted(R.expected_tensors(config).items()):
        t = torch.randn(shape, generator=gen)
        if name.endswith(("norm.weight", "norm1.weight", "norm2.weight", "layernorm.weight",
                          "norm_ve.weight", "mlp1.0.weight")):  # fmt: skip
            t = 1 + 0.2 * t
        elif name.endswith(("ls1", "ls2")):
            t = 0.1 + 0.05 * t
        else:
            t = 0.1 * t
        out[name] = t.contiguous()
    return out


def make_official_dir(out: str | Path, variant: str = "qwen3", seed: int = 0, bos: bool = False,
                      **config_args: Any) -> Path:  # fmt: skip
    """Write ``config.json``, ``model.safetensors`` and ``tokenizer.json`` (module doc);
    ``bos``: the tokenizer puts ``<s>`` before every text, as InternLM2's does."""
    from safetensors.torch import save_file

    from megatron_navil.testing.synthetic_corpus import train_tokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = official_config(variant, **config_args)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(random_weights(config, seed), str(out / "model.safetensors"))
    texts = ["Describe the image.", "What is in this picture?", "A red circle on a gray field."]
    vocab = config["llm_config"]["vocab_size"]
    path = train_tokenizer(texts, out / "tokenizer.json", vocab_size=vocab - 8 if bos else vocab)
    if bos:
        from tokenizers import AddedToken, Tokenizer, processors

        tok = Tokenizer.from_file(str(path))
        tok.add_special_tokens([AddedToken("<s>", special=True, normalized=False)])
        bos_id = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
        path.write_text(tok.to_str(pretty=True))
    return out
