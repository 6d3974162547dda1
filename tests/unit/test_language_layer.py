"""The modality-expert decoder layer (gather/scatter + megatron-core MoE with the modality
router) against the released code's compute-all-then-mask form, on one rank.

Tolerance 1e-5 relative to the largest reference value: both sides run the same float32
maths in a different order (sorted blocks vs full matrices, varlen SDPA vs one masked SDPA).
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from megatron_navil.parallel.spawn import run_distributed

TOL = 1e-5


def _layer(lm_overrides: dict, experts: int = 1):
    from megatron_navil.config.model import ExpertsConfig
    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import transformer_config
    from megatron_navil.models.language import ModalityDecoderLayer
    from megatron_navil.parallel import current_groups

    cfg = get_config("tiny")
    cfg = cfg.replace(
        language=dataclasses.replace(cfg.language, **lm_overrides),
        experts=ExpertsConfig(per_modality=experts, topk=1, aux_loss_coeff=0.01 * (experts > 1)),
    ).validate()
    config = transformer_config(cfg)
    layer = ModalityDecoderLayer(config, cfg.language, 1, current_groups().tp)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return cfg, layer


def _inputs(visual_mask: torch.Tensor, lengths: list[int]):
    from megatron_navil.models.language import LayerInputs, rope_tables
    from megatron_navil.models.modality import ModalitySplit

    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cos, sin = rope_tables(pos, 16, 1e6)
    inputs = LayerInputs(
        ModalitySplit.from_mask(visual_mask), visual_mask.view(-1, 1), cos, sin, cu
    )
    return inputs, pos, cu


def _parity_cases() -> dict:
    from megatron_navil.parallel import initialize
    from megatron_navil.testing.masked_reference import masked_layer_forward

    warnings.filterwarnings("ignore")
    initialize(seed=0)
    out = {}
    variants = {
        "qwen3": {},
        "internlm2": dict(variant="internlm2", qk_norm=False),
        "internlm2-wo-then-wo_ve": dict(variant="internlm2", qk_norm=False, wo_then_wo_ve=True),
    }
    masks = {"mixed": torch.rand(24, generator=torch.Generator().manual_seed(1)) < 0.5}
    masks["text-only"] = torch.zeros(24, dtype=torch.bool)
    masks["visual-only"] = torch.ones(24, dtype=torch.bool)
    for vname, overrides in variants.items():
        _, layer = _layer(overrides)
        for mname, visual in masks.items():
            inputs, pos, cu = _inputs(visual, [10, 8, 6])
            x = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
            x1 = x.clone().requires_grad_()
            got = layer(x1.view(24, 1, 64), inputs).view(24, 64)
            got.square().sum().backward()
            missing = [n for n, p in layer.named_parameters() if p.grad is None]
            assert not missing, (vname, mname, missing)
            grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
            layer.zero_grad()
            x2 = x.clone().requires_grad_()
            want = masked_layer_forward(layer, x2, visual, pos, cu)
            want.square().sum().backward()
            rel = float((got - want).abs().max() / want.abs().max())
            grad_rel = float((x1.grad - x2.grad).abs().max() / x2.grad.abs().max())
            worst_param = max(
                float((grads[n] - p.grad).abs().max() / p.grad.abs().max().clamp(min=1e-30))
                for n, p in layer.named_parameters()
                if p.grad.abs().max() > 0
            )
            unused = sorted(
                n for n, g in grads.items() if g.abs().max() == 0
            )  # experts with no tokens: zero (not None) gradients
            layer.zero_grad()
            out[vname, mname] = dict(rel=rel, grad_rel=grad_rel, param=worst_param, unused=unused)
    # More than one expert per modality: learned top-1 routing inside each modality's group.
    _, layer = _layer({}, experts=2)
    visual = masks["mixed"]
    inputs, _, _ = _inputs(visual, [24])
    x = torch.randn(24, 1, 64, requires_grad=True)
    layer.train()
    y = layer(x, inputs)
    y.sum().backward()
    normed = layer.post_attention_layernorm(x.detach())
    _, routing = layer.mlp.router(normed, visual.view(-1, 1))
    out["topk"] = dict(
        routing=routing.clone(),
        visual=visual.clone(),
        router_grad=float(layer.mlp.router.weight.grad.abs().sum()),
        n_params=sum(p.numel() for p in layer.mlp.router.parameters()),
    )
    return out


@pytest.fixture(scope="module")
def parity() -> dict:
    return run_distributed(_parity_cases, 1)[0]


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["qwen3", "internlm2", "internlm2-wo-then-wo_ve"])
@pytest.mark.parametrize("mix", ["mixed", "text-only", "visual-only"])
def test_matches_compute_all_then_mask(parity, variant, mix):
    r = parity[variant, mix]
    assert r["rel"] <= TOL and r["grad_rel"] <= TOL and r["param"] <= TOL, r


@pytest.mark.slow
def test_expert_without_tokens_gets_zero_gradient(parity):
    # Zero gradients (not None) for the idle expert's weights, so DDP and optimizers see them.
    text_only = parity["qwen3", "text-only"]["unused"]
    assert any("visual" in n for n in text_only) and not any("text" in n for n in text_only)
    assert "mlp.experts.local_experts.1.linear_fc1.weight" in text_only
    visual_only = parity["qwen3", "visual-only"]["unused"]
    assert "mlp.experts.local_experts.0.linear_fc1.weight" in visual_only


@pytest.mark.slow
def test_topk_routing_stays_inside_modality_group(parity):
    r = parity["topk"]
    routing, visual = r["routing"], r["visual"]
    assert routing.shape == (24, 4)
    assert routing.sum(dim=1).eq(1).all()  # top-1
    assert not routing[visual][:, :2].any() and not routing[~visual][:, 2:].any()
    assert r["router_grad"] > 0  # the gate learns (pre-softmax probabilities)
    assert r["n_params"] == 4 * 64


def test_modality_split_roundtrip():
    from megatron_navil.models.modality import ModalitySplit

    visual = torch.tensor([True, False, False, True, False])
    split = ModalitySplit.from_mask(visual)
    assert split.perm.tolist() == [1, 2, 4, 0, 3] and split.n_text == 3
    x = torch.arange(10.0).view(5, 2)
    assert torch.equal(split.unsort(split.sort(x)), x)
    with pytest.raises(ValueError, match="1-D bool"):
        ModalitySplit.from_mask(visual.long())
