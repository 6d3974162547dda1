"""``build_model``'s ``transformer_impl`` and ``attention_backend`` reach every layer.

The real TE layers and fused attention kernels need a GPU (tests/unit/test_impl_gpu.py); here
each option is wired to a stand-in that computes exactly what the CPU path computes but
records that it was used: a spec provider whose linear classes are marker subclasses of
megatron-core's and whose norms are tagged (``te``), and a varlen kernel that runs the
bucketed SDPA and counts its calls (``torch``). A model that ignored either option would
build the local classes / never call the kernel, and these tests fail. Because the stand-ins
compute the same maths, the per-token losses must be bit-identical to the local/sdpa model's
(same seed, same batch): the options change which code runs, not what it computes.
"""

from __future__ import annotations

import warnings
from unittest import mock

import pytest
import torch

from megatron_navil.parallel.spawn import run_distributed


def _tiny_model(groups, **options):
    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.testing import navil_run as N

    cfg = get_config("tiny")
    spec = N.BatchSpec(special_ids=N.special_ids_for(cfg))
    (model,) = build_model(
        cfg, transformer_config(cfg), groups, special_ids=spec.special_ids, init_seed=3,
        **options,
    )  # fmt: skip
    model.eval()
    batch = N.pack(N.MIXED, spec, cfg, torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model, model(**batch)


def _attention_cases() -> dict:
    from megatron_navil.models import attention, impl
    from megatron_navil.parallel import initialize

    warnings.filterwarnings("ignore")
    groups = initialize(seed=0)
    _, base = _tiny_model(groups, transformer_impl="local", attention_backend="sdpa")
    calls: list[bool] = []

    def recorder(q, k, v, cu, max_len, causal, softmax_scale):
        calls.append(causal)
        return attention.varlen_attention(q, k, v, cu, causal, softmax_scale, backend="sdpa")

    with (
        mock.patch.dict(attention.FUSED_BACKENDS, {"torch": recorder}),
        mock.patch.object(impl, "attention_problem", lambda *a, **k: None),
    ):
        model, out = _tiny_model(groups, transformer_impl="local", attention_backend="torch")
    return {
        "base": base,
        "out": out,
        "causal_calls": sum(calls),
        "bidirectional_calls": len(calls) - sum(calls),
        "cfg_layers": model.cfg.language.layers,
        "vision_depth": model.cfg.vision.depth,
    }


def _te_cases() -> dict:
    from megatron.core.models.backends import LocalSpecProvider
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    from megatron_navil.models import impl
    from megatron_navil.parallel import initialize

    warnings.filterwarnings("ignore")
    groups = initialize(seed=0)
    local_model, base = _tiny_model(groups, transformer_impl="local", attention_backend="sdpa")

    class MarkedColumn(ColumnParallelLinear):
        pass

    class MarkedRow(RowParallelLinear):
        pass

    grouped_requests: list[bool] = []

    class FakeTE(LocalSpecProvider):
        def column_parallel_linear(self):
            return MarkedColumn

        def row_parallel_linear(self):
            return MarkedRow

        def layer_norm(self, rms_norm=False, for_qk=False):
            base_cls = super().layer_norm(rms_norm, for_qk)

            def make(**kwargs):
                norm = base_cls(**kwargs)
                norm.from_te_spec = True
                return norm

            return make

        def grouped_mlp_modules(self, grouped, legacy):
            grouped_requests.append(grouped)  # te asks for grouped GEMM; build local ones here
            return super().grouped_mlp_modules(False, legacy)

    real = impl.spec_provider
    with (
        mock.patch.object(impl, "te_problem", lambda *a, **k: None),
        mock.patch.object(impl, "spec_provider", lambda i: FakeTE() if i == "te" else real(i)),
    ):
        model, out = _tiny_model(groups, transformer_impl="te", attention_backend="sdpa")
    vision = [m for n, m in model.named_modules() if n.startswith("vision_model.")]
    norms = {
        n: getattr(m, "from_te_spec", False)
        for n, m in model.named_modules()
        if n.endswith(("input_layernorm", "post_attention_layernorm", "final_layernorm"))
    }
    return {
        "base": base,
        "out": out,
        "vision_columns": sum(isinstance(m, MarkedColumn) for m in vision),
        "vision_rows": sum(isinstance(m, MarkedRow) for m in vision),
        "vision_depth": model.cfg.vision.depth,
        "norms": norms,
        "grouped_requests": grouped_requests,
        "names_local": sorted(local_model.state_dict()),
        "names_te": sorted(model.state_dict()),
    }


@pytest.mark.slow
def test_attention_backend_reaches_the_llm_and_the_vision_tower():
    res = run_distributed(_attention_cases, 1)[0]
    # one causal call per LLM layer, one bidirectional call per vision block
    assert res["causal_calls"] == res["cfg_layers"]
    assert res["bidirectional_calls"] == res["vision_depth"]
    assert torch.equal(res["out"], res["base"])  # same kernel underneath: bit-identical


@pytest.mark.slow
def test_transformer_impl_picks_every_layer_class_from_the_spec_provider():
    res = run_distributed(_te_cases, 1)[0]
    depth = res["vision_depth"]
    assert res["vision_columns"] == 2 * depth  # qkv, fc1 per block
    assert res["vision_rows"] == 2 * depth  # proj, fc2 per block
    assert res["norms"] and all(res["norms"].values()), res["norms"]
    assert res["grouped_requests"] and all(res["grouped_requests"])  # TE: grouped-GEMM experts
    assert res["names_te"] == res["names_local"]  # same parameter names: checkpoints load
    assert torch.equal(res["out"], res["base"])
