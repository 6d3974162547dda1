"""Stage recipes: which parameters each stage trains, and frozen parameters staying
bit-identical through optimizer steps (no gradient, no optimizer state)."""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_navil.parallel.spawn import run_distributed


def _freeze_and_step(stage: str) -> dict:
    from megatron_navil.config.registry import get_config
    from megatron_navil.testing import navil_run as N
    from megatron_navil.training.recipes import _visual_expert_locals, get_stage, parameter_group

    warnings.filterwarnings("ignore")
    cfg = get_config("tiny")
    run = N.setup_run(cfg, optimizer="adam", distributed_optimizer=True, lr=1e-2, stage=stage)
    model = run.chunks[0].module
    locals_ = _visual_expert_locals(model)
    groups = {n: parameter_group(n, locals_) for n, _ in model.named_parameters()}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for step in range(2):
        run.step(batch_seed=step)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    trains = set(get_stage(stage).trains)
    return {
        "groups": groups,
        "changed": {n: not torch.equal(before[n], after[n]) for n in before},
        "trains": trains,
        "opt_params": sum(p.numel() for g in run.optimizer.param_groups for p in g["params"]),
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
    }


@pytest.fixture(scope="module", params=["s1.1", "s1.2"])
def stage_run(request) -> dict:
    return run_distributed(_freeze_and_step, 1, request.param)[0]


# In the last layer a visual token's own output reaches no loss (labels sit on text targets and
# no later layer attends to it), so these get exactly zero gradient and Adam (no weight decay
# here) leaves them unchanged; the visual k/v of that layer do feed later text tokens.
NO_GRADIENT = {
    "layers.3.self_attention.linear_proj.visual.weight",
    "layers.3.self_attention.q_layernorm.visual.weight",
    "layers.3.mlp.experts.local_experts.1.linear_fc1.weight",
    "layers.3.mlp.experts.local_experts.1.linear_fc2.weight",
}


@pytest.mark.slow
def test_frozen_parameters_are_bit_identical_and_trained_ones_move(stage_run):
    for name, group in stage_run["groups"].items():
        changed = stage_run["changed"][name]
        if group in stage_run["trains"] and name not in NO_GRADIENT:
            assert changed, f"{name} ({group}) should train"
        else:
            assert not changed, f"{name} ({group}) is frozen but changed"


@pytest.mark.slow
def test_optimizer_holds_only_trainable_parameters(stage_run):
    assert stage_run["opt_params"] == stage_run["trainable"]


@pytest.mark.slow
def test_groups_cover_the_model(stage_run):
    groups = stage_run["groups"]
    assert groups["special_token_embedding"] == "special_tokens"
    assert groups["layers.0.self_attention.linear_qkv.visual.weight"] == "visual_experts"
    assert groups["layers.0.self_attention.q_layernorm.text.weight"] == "text_attention"
    assert groups["layers.0.mlp.experts.local_experts.1.linear_fc1.weight"] == "visual_experts"
    assert groups["layers.0.mlp.experts.local_experts.0.linear_fc1.weight"] == "rest"
    assert groups["embedding.weight"] == "rest" and groups["output_layer.weight"] == "rest"


def test_unknown_stage():
    from megatron_navil.training.recipes import get_stage

    with pytest.raises(ValueError, match=r"unknown stage 's3'; known: s1\.1, s1\.2, s2"):
        get_stage("s3")
