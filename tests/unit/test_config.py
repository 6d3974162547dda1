"""Model configs: the registry's sizes against the paper, and validation naming the field."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_navil.config import (
    REGISTRY,
    SPECIAL_TOKENS,
    ExpertsConfig,
    ImageConfig,
    LanguageConfig,
    VisionConfig,
    get_config,
    param_counts,
)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_registered_configs_validate(name):
    assert get_config(name).name == name


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown model config 'navil-3b'; known: tiny"):
        get_config("navil-3b")


def test_twelve_special_tokens_in_table_order():
    assert len(SPECIAL_TOKENS) == 12
    assert SPECIAL_TOKENS[2] == "<IMG_CONTEXT>" and SPECIAL_TOKENS[-1] == "<IMG_FRAME_BREAK>"


# Paper figures (NAVIL.md "Sizes"): 2B vision ~626M, connector ~16M, total 4.0-4.2B;
# 9B vision ~1.24B, connector ~46M, activated ~9.2B. Tolerance 1% where the paper gives
# three digits, its stated range otherwise.
def test_navil_2b_sizes():
    c = param_counts(get_config("navil-2b"))
    assert c["vision"] == pytest.approx(626e6, rel=0.01)
    assert c["connector"] == pytest.approx(16e6, rel=0.03)
    assert 4.0e9 <= c["total"] <= 4.2e9


def test_navil_9b_sizes():
    c = param_counts(get_config("navil-9b"))
    assert c["vision"] == pytest.approx(1.24e9, rel=0.01)
    assert c["connector"] == pytest.approx(46e6, rel=0.01)
    assert 9.2e9 <= c["activated"] <= 9.5e9
    assert 15.5e9 <= c["total"] <= 16.5e9


def test_experts_add_parameters_not_activation():
    cfg = get_config("tiny")
    more = cfg.replace(experts=ExpertsConfig(per_modality=4, topk=1))
    base, wide = param_counts(cfg), param_counts(more)
    assert wide["total"] > base["total"]
    ffn = 3 * cfg.language.hidden * cfg.language.ffn
    router = 2 * cfg.language.hidden * 4
    assert wide["activated"] - base["activated"] == cfg.language.layers * router
    assert wide["total"] - base["total"] == cfg.language.layers * (2 * 3 * ffn + router)


@pytest.mark.parametrize(
    ("part", "change", "match"),
    [
        ("vision", dict(heads=5), r"VisionConfig.heads=5: must divide width=32"),
        ("vision", dict(width=24, heads=4), r"VisionConfig.heads=4: head dim 6 must be a mul"),
        ("vision", dict(fullatt_block_indexes=(3,)), r"fullatt_block_indexes=\(3,\): block 3"),
        ("vision", dict(window_size=0), r"VisionConfig.window_size=0: must be > 0"),
        (
            "vision",
            dict(window_size=None, fullatt_block_indexes=(0,)),
            r"fullatt_block_indexes=\(0,\): window attention needs window_size",
        ),
        ("vision", dict(window_size=5), r"window_size=5: must be a multiple of the merge size 2"),
        ("language", dict(kv_heads=3), r"LanguageConfig.kv_heads=3: must divide heads=4"),
        ("language", dict(variant="llama"), r"LanguageConfig.variant='llama'"),
        ("language", dict(wo_then_wo_ve=True), r"wo_then_wo_ve=True: is a quirk of the released"),
        ("language", dict(hidden=0), r"LanguageConfig.hidden=0: must be > 0"),
        ("image", dict(min_patches=100), r"ImageConfig.min_patches=100: exceeds max_patches=64"),
        ("image", dict(scale_ratio=1.0), r"ImageConfig.scale_ratio=1.0"),
        ("image", dict(max_aspect=0.5), r"ImageConfig.max_aspect=0.5: must be a finite ratio"),
        ("experts", dict(topk=2), r"ExpertsConfig.topk=2: cannot exceed per_modality=1"),
    ],
)
def test_bad_values_name_the_field(part, change, match):
    cfg = get_config("tiny")
    bad = cfg.replace(**{part: dataclasses.replace(getattr(cfg, part), **change)})
    with pytest.raises(ValueError, match=match):
        bad.validate()


def test_replace_rejects_unknown_fields():
    with pytest.raises(ValueError, match="no field"):
        get_config("tiny").replace(visoin=None)


def test_parts_are_importable_types():
    cfg = get_config("navil-2b")
    assert isinstance(cfg.vision, VisionConfig) and isinstance(cfg.language, LanguageConfig)
    assert isinstance(cfg.image, ImageConfig) and cfg.merged_width == 4 * 1472
