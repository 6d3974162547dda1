"""The fast path on a GPU: the fused varlen attention kernels against the bucketed SDPA, and
the TransformerEngine model against the local one with weights mapped in both directions.
Skipped without a CUDA GPU or the backend's package (scripts/gpu_checks.sh runs them with
``-m gpu``); the selection logic and the wiring are tested on CPU (test_impl.py,
test_impl_wiring.py).

Tolerances (bf16 inputs, 8 mantissa bits, unit roundoff 2^-9 ~ 2e-3): every kernel is
compared with an fp32 SDPA on the same bf16-rounded inputs; the fused kernel's error may be at
most twice the bf16 SDPA's own plus 1e-2 absolute (bf16 output rounding of O(1) values is
~4e-3; the kernels accumulate in fp32 in a different order). The TE model's per-token losses
(~log vocab ~ 6) must agree with the local model's within 2e-2 absolute: both run bf16 GEMMs
(cuBLAS vs TE's), the norm kernels differ (TE fused vs torch), and each of the tiny model's
few layers adds bf16 rounding of its residual stream.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_navil.models.attention import varlen_attention
from megatron_navil.models.impl import attention_problem, te_problem

CUDA = torch.cuda.is_available()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")]


def _inputs(heads: int, kv_heads: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    bounds = [0, 1, 40, 41, 300, 317, 1000]  # 1-token, mid, long segments
    t, d = bounds[-1], 64
    q, k, v = (torch.randn(t, h, d, generator=gen) for h in (heads, kv_heads, kv_heads))
    cu = torch.tensor(bounds, dtype=torch.int32, device="cuda")
    return [x.cuda().to(torch.bfloat16).requires_grad_() for x in (q, k, v)], cu


def _run(backend: str, qkv, cu, causal: bool, dtype=None):
    q, k, v = (x.detach().to(dtype or x.dtype).requires_grad_() for x in qkv)
    out = varlen_attention(q, k, v, cu, causal=causal, backend=backend)
    gen = torch.Generator(device="cuda").manual_seed(7)
    weight = torch.randn(out.shape, generator=gen, device="cuda", dtype=torch.float32)
    (out.float() * weight).sum().backward()
    return [t.detach().float() for t in (out, q.grad, k.grad, v.grad)]


def _backend(name: str):
    """``name`` as a parameter, skipped where it cannot run: no CUDA GPU, or its package
    (flash-attn; torch's ``varlen_attn``) missing (``attention_problem`` says which)."""
    problem = attention_problem(name, CUDA, torch.bfloat16)
    reason = f"needs a CUDA GPU with the {name} backend: {problem}"
    return pytest.param(name, marks=pytest.mark.skipif(problem is not None, reason=reason))


@pytest.mark.parametrize("backend", [_backend("flash"), _backend("torch")])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize(("heads", "kv_heads"), [(8, 8), (8, 2)])
def test_fused_backend_matches_sdpa_in_bf16(backend, causal, heads, kv_heads):
    qkv, cu = _inputs(heads, kv_heads, seed=heads + kv_heads)
    reference = _run("sdpa", qkv, cu, causal, dtype=torch.float32)
    sdpa = _run("sdpa", qkv, cu, causal)
    fused = _run(backend, qkv, cu, causal)
    for name, ref, s, f in zip(("out", "dq", "dk", "dv"), reference, sdpa, fused, strict=True):
        sdpa_err = (s - ref).abs().max().item()
        fused_err = (f - ref).abs().max().item()
        assert fused_err <= 2 * sdpa_err + 1e-2, (name, fused_err, sdpa_err)


def _te_cases() -> dict:
    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.models.impl import map_state_dict
    from megatron_navil.parallel import initialize
    from megatron_navil.testing import navil_run as N

    warnings.filterwarnings("ignore")
    groups = initialize(seed=0)
    cfg = get_config("tiny")
    spec = N.BatchSpec(special_ids=N.special_ids_for(cfg))
    mcore = transformer_config(cfg, dtype=torch.bfloat16)
    batch = N.pack(N.MIXED, spec, cfg, torch.Generator().manual_seed(0))
    batch = {k: v.cuda() for k, v in batch.items()}
    batch["patches"] = batch["patches"].to(torch.bfloat16)

    def model(impl: str, seed: int):
        (m,) = build_model(
            cfg, mcore, groups, special_ids=spec.special_ids, init_seed=seed,
            transformer_impl=impl, attention_backend="sdpa",
        )  # fmt: skip
        return m.cuda().eval()

    def loss(m):
        with torch.no_grad():
            return m(**batch).float().cpu()

    local, te = model("local", 1), model("te", 2)
    out = {"local": loss(local), "te_seed2": loss(te)}
    missing, unexpected = te.load_state_dict(map_state_dict(local.state_dict(), "te"), strict=False)
    out["local_to_te"] = loss(te)
    out["l2t_missing"] = [k for k in missing if not k.endswith("_extra_state")]
    out["l2t_unexpected"] = list(unexpected)
    local2 = model("local", 3)
    missing, unexpected = local2.load_state_dict(
        map_state_dict(te.state_dict(), "local"), strict=False
    )
    out["te_to_local"] = loss(local2)
    out["t2l_missing"] = [k for k in missing if not k.endswith("_extra_state")]
    out["t2l_unexpected"] = list(unexpected)
    return out


@pytest.mark.slow
@pytest.mark.skipif(CUDA and te_problem(True) is not None, reason="TransformerEngine missing")
def test_te_model_loads_local_weights_and_back():
    from megatron_navil.parallel.spawn import run_distributed

    res = run_distributed(_te_cases, 1)[0]
    for key in ("l2t_missing", "l2t_unexpected", "t2l_missing", "t2l_unexpected"):
        assert res[key] == [], (key, res[key])
    assert not torch.equal(res["te_seed2"], res["local"])  # the load really changed weights
    assert torch.allclose(res["local_to_te"], res["local"], rtol=0, atol=2e-2)
    assert torch.allclose(res["te_to_local"], res["local"], rtol=0, atol=2e-2)
