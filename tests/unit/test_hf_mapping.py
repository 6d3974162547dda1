"""The megatron <-> HF parameter mapping (conversion/mapping.py), the HF config round trip
(conversion/hf_config.py) and the safetensors shard writer/reader, without processes:

* every rule's ``from_hf(to_hf(t))`` is bit-exact, HF names are unique;
* the HF names and shapes of the rules are exactly the HF model's ``state_dict`` (both
  backbones, tiny cases and the real navil-2b / navil-9b built on the meta device);
* config.json -> NaViLConfig -> config.json keeps every model field, ``wo_then_wo_ve`` both
  ways; an official 2B config without the flag gets the released code's behaviour (True);
* a missing, unknown or mis-shaped tensor fails with its name.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_navil.config.compare import same_model
from megatron_navil.config.registry import get_config
from megatron_navil.conversion import hf_config
from megatron_navil.conversion.hf_io import SafetensorsDir, ShardedWriter
from megatron_navil.conversion.mapping import ConversionError, check_names, hf_shapes, rules
from megatron_navil.testing.hf_cases import CASES, tiny_case

IDS = list(range(500, 512))


@pytest.mark.parametrize("case", CASES)
def test_rules_round_trip_bit_exact(case):
    cfg = tiny_case(case)
    gen = torch.Generator().manual_seed(0)
    names = [n for r in rules(cfg) for n in r.hf]
    assert len(names) == len(set(names))
    for rule in rules(cfg):
        t = torch.randn(rule.shape, generator=gen)
        pieces = rule.to_hf(t)
        assert [tuple(p.shape) for p in pieces] == list(rule.hf_shapes), rule.megatron
        back = rule.from_hf(pieces)
        assert back.shape == t.shape and torch.equal(back, t), rule.megatron


def _hf_model_shapes(cfg, meta: bool):
    from megatron_navil.hf.configuration_navil import NaViLChatConfig
    from megatron_navil.hf.modeling_navil import NaViL

    config = NaViLChatConfig(**hf_config.to_hf_config(cfg, IDS, "float32"))
    if meta:
        with torch.device("meta"):
            model = NaViL(config)
    else:
        model = NaViL(config)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", CASES)
def test_hf_names_are_the_hf_models(case):
    cfg = tiny_case(case)
    assert _hf_model_shapes(cfg, meta=False) == hf_shapes(cfg)


@pytest.mark.parametrize("name", ["navil-2b", "navil-9b"])
def test_official_names_of_the_real_sizes(name):
    cfg = get_config(name)
    shapes = hf_shapes(cfg)
    assert _hf_model_shapes(cfg, meta=True) == shapes
    lm = "language_model.model.layers.3."
    if name == "navil-2b":  # NAVIL.md, "Official HF release format"
        assert shapes[lm + "attention.wqkv.weight"] == ((16 + 2 * 8) * 128, 2048)
        assert shapes[lm + "feed_forward_ve.w2.weight"] == (2048, 8192)
        assert "language_model.output.weight" in shapes
        assert "language_model.model.tok_embeddings.weight" in shapes
    else:
        assert shapes[lm + "self_attn.k_norm_ve.weight"] == (128,)
        assert shapes[lm + "mlp_ve.gate_proj.weight"] == (12288, 4096)
        assert "language_model.lm_head.weight" in shapes
    assert shapes["vision_model.embeddings.patch_embedding.weight"][1:] == (3, 16, 16)
    assert shapes["special_token_embedding.weight"][0] == 12
    assert {"mlp1.0.weight", "mlp1.1.weight", "mlp1.3.weight"} <= set(shapes)


@pytest.mark.parametrize("case", [*CASES, "navil-2b", "navil-9b"])
def test_config_round_trip(case):
    cfg = tiny_case(case) if case.startswith("tiny") else get_config(case)
    config = hf_config.to_hf_config(cfg, IDS, "bfloat16")
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_navil.NaViL"
    assert config["model_type"] == "navil_chat" and config["architectures"] == ["NaViL"]
    back = hf_config.from_hf_config(config)
    assert same_model(cfg, back) == []
    assert back.language.wo_then_wo_ve == cfg.language.wo_then_wo_ve
    assert hf_config.special_token_ids_of(config) == IDS


def test_official_2b_config_without_the_flag_uses_the_quirk():
    config = hf_config.to_hf_config(get_config("navil-2b"), IDS, "bfloat16")
    del config["llm_config"]["wo_then_wo_ve"], config["special_token_ids"]
    config["scale_downsample_ratio"] = 0.7071
    cfg = hf_config.from_hf_config(config)
    assert cfg.language.wo_then_wo_ve is True
    # official configs carry no special-token ids: they come from the tokenizer (section 5)
    assert cfg.special_token_first_id is None
    assert hf_config.special_token_ids_of(config) is None
    from megatron_navil.hf.configuration_navil import NaViLChatConfig

    assert NaViLChatConfig(**config).llm_config["wo_then_wo_ve"] is True
    with pytest.raises(ConversionError, match="not a NaViL checkpoint"):
        hf_config.from_hf_config({"model_type": "llama"})
    config["llm_config"]["bias"] = True  # InternLM2Config's default: biases NaViL does not have
    with pytest.raises(ConversionError, match=r"llm_config\.bias is true"):
        hf_config.from_hf_config(config)


@pytest.mark.parametrize("name", ["navil-2b", "navil-9b"])
def test_exported_config_is_what_the_released_code_reads(name):
    """NAVIL.md section 6: the released class names, InternLM2's bias written false, every
    official top-level and vision field, the template and system message."""
    from megatron_navil.testing import official_reference as R

    cfg = get_config(name)
    config = hf_config.to_hf_config(cfg, IDS, "bfloat16")
    assert R.check_config(config) == []
    arch = config["llm_config"]["architectures"]
    if name == "navil-2b":
        assert arch == ["InternLM2VEForCausalLM"] and config["llm_config"]["bias"] is False
        assert config["template"] == "internlm2-chat"
    else:
        assert arch == ["Qwen3VEForCausalLM"] and config["template"] == "qwen3-chat"
    assert config["system_message"] == R.DEFAULT_SYSTEM_MESSAGE
    assert config["vision_config"]["window_size"] == 8
    assert config["vision_config"]["fullatt_block_indexes"] is None
    assert config["scale_downsample_ratio"] == 0.7071 or name  # the helper's default
    assert hf_config.released_code_can_load(cfg) is None
    # the released code's own names for its tensors are exactly ours
    expected = R.expected_tensors(config)
    assert hf_shapes(cfg) == expected
    # a Llama-style backbone: our remote code only
    llama = cfg.replace(
        language=dataclasses.replace(
            cfg.language, variant="qwen3", qk_norm=False, wo_then_wo_ve=False
        )
    )
    config = hf_config.to_hf_config(llama, IDS, "bfloat16")
    assert config["llm_config"]["model_type"] == "llama"
    assert "QK-norm" in hf_config.released_code_can_load(llama)
    single = cfg.replace(image=dataclasses.replace(cfg.image, multi_scale=False))
    assert "one scale per image" in hf_config.released_code_can_load(single)
    raster = cfg.replace(vision=dataclasses.replace(cfg.vision, window_size=None))
    assert "raster token order" in hf_config.released_code_can_load(raster)
    assert R.check_config(config)  # refused by the released code
    assert same_model(hf_config.from_hf_config(config), llama) == []


def test_check_names_names_the_tensor():
    expected = {"a.weight": (2, 3), "b.weight": (4,)}
    with pytest.raises(ConversionError, match=r"'b\.weight' is missing"):
        check_names({"a.weight": (2, 3)}, expected, "src")
    with pytest.raises(ConversionError, match=r"'c\.bias' is not part of the model"):
        check_names({**expected, "c.bias": (1,)}, expected, "src")
    with pytest.raises(ConversionError, match=r"'b\.weight' has shape \(5,\), expected \(4,\)"):
        check_names({"a.weight": (2, 3), "b.weight": (5,)}, expected, "src")


def test_per_modality_experts_are_refused():
    from megatron_navil.config.model import ExpertsConfig

    cfg = get_config("tiny").replace(experts=ExpertsConfig(per_modality=2))
    with pytest.raises(ConversionError, match="per_modality=2"):
        rules(cfg)


def test_shard_writer_and_reader(tmp_path):
    gen = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(10 + i, 7, generator=gen) for i in range(6)}
    writer = ShardedWriter(tmp_path / "multi", max_shard_bytes=900)
    for name, t in tensors.items():
        writer.add(name, t)
    files = writer.close()
    assert len(files) > 1 and files[0].name == f"model-00001-of-{len(files):05d}.safetensors"
    for single in (False, True):
        d = tmp_path / ("one" if single else "multi")
        if single:
            w = ShardedWriter(d)
            for name, t in tensors.items():
                w.add(name, t)
            assert [f.name for f in w.close()] == ["model.safetensors"]
        reader = SafetensorsDir(d)
        assert {k: tuple(v.shape) for k, v in tensors.items()} == reader.shapes
        assert all(torch.equal(reader.read(k), v) for k, v in tensors.items())
    with pytest.raises(ConversionError, match="'t0' written twice"):
        writer = ShardedWriter(tmp_path / "dup")
        writer.add("t0", tensors["t0"])
        writer.add("t0", tensors["t0"])


def test_reader_skips_optimizer_state_of_every_layout():
    """A checkpoint saved at EP > 1 holds megatron-core's chained optimizers
    (``chained_N.optimizer.*``), one at EP = 1 a plain ``optimizer.*``: neither is a model
    tensor; a model key that merely contains the word is not skipped."""
    from megatron_navil.conversion.dist_reader import _is_skipped

    assert _is_skipped("optimizer.state.exp_avg.embedding.weight")
    assert _is_skipped("chained_0.optimizer.state.exp_avg.embedding.weight")
    assert _is_skipped("chained_12.optimizer.param_state_sharding_type")
    assert _is_skipped("output_layer._extra_state/shard_0_1")
    assert not _is_skipped("embedding.weight")
    assert not _is_skipped("layers.0.optimizer.weight")
