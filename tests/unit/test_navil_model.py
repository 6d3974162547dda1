"""The whole NaViL model on one rank: sample isolation, text-only loss, bad inputs, and the
parameter counts of navil-2b / navil-9b built on the meta device.

All cases run in one spawned rank (megatron-core needs its parallel state) and report back.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_navil.parallel.spawn import run_distributed


def _per_token(model, batch):
    with torch.no_grad():
        return model(**batch)


def _error(fn) -> str:
    try:
        fn()
    except ValueError as exc:
        return str(exc)
    return "no error"


def _cases() -> dict:
    from megatron_navil.config.registry import get_config
    from megatron_navil.config.tokens import IGNORE_INDEX
    from megatron_navil.models.build import build_model, meta_parameter_counts, transformer_config
    from megatron_navil.parallel import initialize
    from megatron_navil.testing import navil_run as N
    from megatron_navil.testing import tiny_gpt as T

    warnings.filterwarnings("ignore")
    groups = initialize(seed=0)
    cfg = get_config("tiny")
    spec = N.BatchSpec(special_ids=N.special_ids_for(cfg))
    (model,) = build_model(cfg, transformer_config(cfg), groups, special_ids=spec.special_ids)
    T.set_global_params([model], seed=1)
    model.eval()
    batch = N.pack(N.MIXED, spec, cfg, torch.Generator().manual_seed(0))
    base = _per_token(model, batch)
    out: dict = {"base": base, "labels": batch["labels"], "cu": batch["cu_seqlens"]}

    # Perturb the last (text-only) sample's ids, then the first image's patches.
    cu = batch["cu_seqlens"].tolist()
    changed = dict(batch, input_ids=batch["input_ids"].clone())
    changed["input_ids"][cu[2] : cu[3]] = (changed["input_ids"][cu[2] : cu[3]] + 1) % 400
    out["text_perturbed"] = _per_token(model, changed)
    first_image = int(batch["vision_cu_seqlens"][2])  # sample 0 has one image of two scales
    changed = dict(batch, patches=batch["patches"].clone())
    changed["patches"][:first_image] += 1.0
    out["image_perturbed"] = _per_token(model, changed)

    # Bad inputs.
    ctx = spec.special_ids[2]
    fewer = dict(batch, input_ids=batch["input_ids"].clone())
    fewer["input_ids"][(fewer["input_ids"] == ctx).nonzero()[0]] = 7
    out["err_count"] = _error(lambda: model(**fewer))
    no_patches = {k: v for k, v in batch.items() if "patch" not in k and "vision" not in k}
    out["err_no_patches"] = _error(lambda: model(**no_patches))
    bad_labels = dict(batch, labels=batch["labels"].clone())
    bad_labels["labels"][0] = cfg.language.vocab
    out["err_label"] = _error(lambda: model(**bad_labels))
    out["err_2d"] = _error(lambda: model(**dict(batch, input_ids=batch["input_ids"].view(1, -1))))
    # An image whose patch grid is not a multiple of the merge size: 67 patches in all.
    vcu = batch["vision_cu_seqlens"].clone()
    vcu[-1] -= 1
    index = batch["vision_window_index"]
    odd = dict(
        batch,
        patches=batch["patches"][:-1],
        patch_positions=batch["patch_positions"][:-1],
        vision_cu_seqlens=vcu,
        vision_window_index=index[index != index.numel() - 1],
    )
    out["err_odd_patches"] = _error(lambda: model(**odd))
    from megatron_navil.ops import patch_positions

    out["err_odd_grid"] = _error(lambda: patch_positions([(3, 4)], 2))

    # All labels ignored: zero loss everywhere (no text targets, e.g. an image-only sample).
    silent = dict(batch, labels=torch.full_like(batch["labels"], IGNORE_INDEX))
    out["silent"] = _per_token(model, silent)

    out["counts"] = {
        n: meta_parameter_counts(get_config(n), groups) for n in ("navil-2b", "navil-9b")
    }
    initialize(tp=1, seed=0)
    out["err_config"] = _error(lambda: get_config("navil-7b"))
    from megatron_navil.models.build import stage_layer_ranges

    out["err_stages"] = _error(lambda: stage_layer_ranges(4, 3))
    out["err_first"] = _error(lambda: stage_layer_ranges(4, 2, first_stage_layers=5))
    return out


@pytest.fixture(scope="module")
def res() -> dict:
    return run_distributed(_cases, 1)[0]


def _sample_slices(res):
    cu = res["cu"].tolist()
    return [slice(cu[i], cu[i + 1]) for i in range(len(cu) - 1)]


@pytest.mark.slow
def test_perturbing_one_sample_leaves_the_others_bit_identical(res):
    s0, s1, s2, _pad = _sample_slices(res)
    base, text = res["base"], res["text_perturbed"]
    assert torch.equal(base[s0], text[s0]) and torch.equal(base[s1], text[s1])
    assert not torch.equal(base[s2], text[s2])
    image = res["image_perturbed"]
    assert not torch.equal(base[s0], image[s0])  # the image feeds its own sample...
    assert torch.equal(base[s1], image[s1]) and torch.equal(base[s2], image[s2])  # ...only


@pytest.mark.slow
def test_loss_only_on_text_targets(res):
    labels, base = res["labels"], res["base"]
    ignored = labels == -100
    assert ignored.any() and (~ignored).any()
    assert torch.equal(base[ignored], torch.zeros(int(ignored.sum())))
    assert (base[~ignored] > 0).all()
    assert torch.equal(res["silent"], torch.zeros_like(res["silent"]))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("key", "match"),
    [
        ("err_count", r"image features \(\d+ tokens from \d+ patches\) and <IMG_CONTEXT>"),
        ("err_no_patches", "<IMG_CONTEXT> tokens in input_ids but no patches"),
        ("err_label", "outside the LM head's vocabulary"),
        ("err_2d", r"must both be \[t\]"),
        ("err_odd_patches", "multiple of"),
        ("err_odd_grid", "multiple of"),
        ("err_config", "unknown model config 'navil-7b'"),
        ("err_stages", "does not split evenly over 3 pipeline stages"),
        ("err_first", r"first_stage_layers=5 outside \[0, 4\]"),
    ],
)
def test_bad_inputs_raise_clear_errors(res, key, match):
    import re

    assert re.search(match, res[key]), res[key]


def test_uneven_first_stage():
    from megatron_navil.models.build import stage_layer_ranges

    ranges = [list(r) for r in stage_layer_ranges(7, 4, first_stage_layers=1)]
    assert ranges == [[0], [1, 2], [3, 4], [5, 6]]
    assert [len(r) for r in stage_layer_ranges(8, 4, first_stage_layers=0)] == [0, 3, 3, 2]


@pytest.mark.slow
def test_meta_device_counts_match_the_paper(res):
    from megatron_navil.config.params import param_counts
    from megatron_navil.config.registry import get_config

    c2, c9 = res["counts"]["navil-2b"], res["counts"]["navil-9b"]
    for name, counts in (("navil-2b", c2), ("navil-9b", c9)):
        analytic = param_counts(get_config(name))
        assert {k: counts[k] for k in analytic if k in counts} == {
            k: analytic[k] for k in counts
        }, name
    assert abs(c2["vision"] - 626e6) <= 0.01 * 626e6
    assert 4.0e9 <= c2["total"] <= 4.2e9
    # The issue says "~2.4-2.5B"; with the LM head and input embeddings counted it is 2.53B.
    assert 2.4e9 <= c2["activated"] <= 2.55e9
    assert abs(c9["vision"] - 1.24e9) <= 0.01 * 1.24e9
    assert 9.2e9 <= c9["activated"] <= 9.5e9
