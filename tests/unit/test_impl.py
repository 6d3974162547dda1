"""models/impl.py: which transformer implementation and attention backend a run gets, the
one-line errors when one asked for cannot run, and the state-dict names across
implementations. Pure selection logic (availability is faked), so it runs on any machine;
the wiring into the model is tests/unit/test_impl_wiring.py, the GPU equivalence
tests/unit/test_impl_gpu.py."""

from __future__ import annotations

import pytest
import torch

from megatron_navil.models import impl
from megatron_navil.models.attention import varlen_attention
from megatron_navil.models.impl import (
    BackendUnavailable,
    map_state_dict,
    resolve_attention_backend,
    resolve_transformer_impl,
)


@pytest.fixture
def fake_installed(monkeypatch):
    """Pretend exactly the named modules import: ``fake_installed({"flash_attn"})``."""

    def install(present: set[str], torch_varlen: bool = True) -> None:
        def imports(module: str) -> str | None:
            return None if module.split(".")[0] in present else "not installed"

        monkeypatch.setattr(impl, "_imports", imports)
        monkeypatch.setattr(impl, "_torch_varlen", lambda: object() if torch_varlen else None)

    return install


@pytest.mark.parametrize(
    ("requested", "cuda", "present", "expected"),
    [
        ("auto", False, {"transformer_engine"}, "local"),  # no GPU: never TE
        ("auto", True, {"transformer_engine"}, "te"),
        ("auto", True, set(), "local"),
        ("local", True, {"transformer_engine"}, "local"),  # asked for local: local
        ("te", True, {"transformer_engine"}, "te"),
    ],
)
def test_transformer_impl_selection(fake_installed, requested, cuda, present, expected):
    fake_installed(present)
    assert resolve_transformer_impl(requested, cuda) == expected


@pytest.mark.parametrize(
    ("cuda", "match"),
    [(False, "needs a CUDA GPU"), (True, "transformer_engine does not import")],
)
def test_transformer_impl_te_unavailable_is_one_line(fake_installed, cuda, match):
    fake_installed(set())
    with pytest.raises(BackendUnavailable, match=match) as err:
        resolve_transformer_impl("te", cuda)
    assert "\n" not in str(err.value) and str(err.value).startswith("--transformer-impl te:")


def test_transformer_impl_rejects_unknown_names():
    with pytest.raises(ValueError, match="transformer_impl must be one of"):
        resolve_transformer_impl("fast", False)


@pytest.mark.parametrize(
    ("cuda", "dtype", "present", "torch_varlen", "expected"),
    [
        (False, torch.bfloat16, {"flash_attn"}, True, "sdpa"),  # CPU: only sdpa runs
        (True, torch.bfloat16, {"flash_attn"}, True, "flash"),  # flash first
        (True, torch.float16, set(), True, "torch"),  # then torch's varlen_attn
        (True, torch.bfloat16, set(), False, "sdpa"),  # an old torch: sdpa
        (True, torch.float32, {"flash_attn"}, True, "sdpa"),  # fp32: no fused kernel
    ],
)
def test_attention_backend_auto_order(fake_installed, cuda, dtype, present, torch_varlen, expected):
    fake_installed(present, torch_varlen)
    assert resolve_attention_backend("auto", cuda, dtype) == expected


@pytest.mark.parametrize(
    ("requested", "cuda", "dtype", "present", "torch_varlen", "match"),
    [
        ("flash", True, torch.bfloat16, set(), True, "flash_attn not installed"),
        ("flash", False, torch.bfloat16, {"flash_attn"}, True, "needs a CUDA GPU"),
        ("torch", False, torch.bfloat16, set(), True, "needs a CUDA GPU"),
        ("torch", True, torch.float32, set(), True, "needs fp16/bf16"),
        ("torch", True, torch.bfloat16, set(), False, "varlen_attn is missing"),
    ],
)
def test_attention_backend_unavailable_is_one_line(
    fake_installed, requested, cuda, dtype, present, torch_varlen, match
):
    fake_installed(present, torch_varlen)
    with pytest.raises(BackendUnavailable, match=match) as err:
        resolve_attention_backend(requested, cuda, dtype)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(f"--attention-backend {requested}:")


def test_explicit_sdpa_always_resolves(fake_installed):
    fake_installed({"flash_attn"})
    assert resolve_attention_backend("sdpa", True, torch.bfloat16) == "sdpa"


def test_this_machine_without_gpu_packages_gets_the_cpu_path():
    """The real detection (nothing faked): here neither TE nor flash-attn imports, so auto is
    local + sdpa (skipped where they do, i.e. on a GPU cluster image)."""
    cuda = torch.cuda.is_available()
    if cuda and impl.te_problem(True) is None:
        pytest.skip("TransformerEngine imports here")
    assert resolve_transformer_impl("auto", cuda) == "local"
    if not cuda:
        assert resolve_attention_backend("auto", cuda, torch.bfloat16) == "sdpa"
    with pytest.raises(BackendUnavailable):
        impl.spec_provider("te") if cuda else resolve_transformer_impl("te", cuda)


@pytest.mark.parametrize("backend", ["flash", "torch"])
def test_fused_backends_refuse_cpu_tensors_in_one_line(backend):
    q = torch.randn(6, 2, 4)
    with pytest.raises(ValueError, match=f"the {backend} backend needs CUDA fp16/bf16") as err:
        varlen_attention(q, q, q, torch.tensor([0, 6]), causal=True, backend=backend)
    assert "\n" not in str(err.value)


def test_unknown_attention_backend_in_varlen_attention():
    q = torch.randn(6, 2, 4)
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        varlen_attention(q, q, q, torch.tensor([0, 6]), causal=True, backend="cudnn")


# --------------------------------------------------------------------------------------------
# State-dict names: local SequentialMLP experts <-> TE grouped-GEMM experts.

LOCAL = {
    "layers.0.input_layernorm.weight": "n0",
    "layers.0.self_attention.linear_qkv.text.weight": "q",
    "layers.0.self_attention.linear_qkv.text._extra_state": "x",
    "layers.0.mlp.experts.local_experts.0.linear_fc1.weight": "e0f1",
    "layers.0.mlp.experts.local_experts.0.linear_fc1._extra_state": "x",
    "layers.0.mlp.experts.local_experts.1.linear_fc1.weight": "e1f1",
    "layers.0.mlp.experts.local_experts.0.linear_fc2.weight": "e0f2",
    "layers.0.mlp.experts.local_experts.1.linear_fc2.weight": "e1f2",
    "layers.12.mlp.experts.local_experts.1.linear_fc2.weight": "l12e1f2",
    "vision_model.encoder.layers.0.mlp.fc1.bias": "vb",
}
TE = {
    "layers.0.input_layernorm.weight": "n0",
    "layers.0.self_attention.linear_qkv.text.weight": "q",
    "layers.0.mlp.experts.linear_fc1.weight0": "e0f1",
    "layers.0.mlp.experts.linear_fc1.weight1": "e1f1",
    "layers.0.mlp.experts.linear_fc2.weight0": "e0f2",
    "layers.0.mlp.experts.linear_fc2.weight1": "e1f2",
    "layers.12.mlp.experts.linear_fc2.weight1": "l12e1f2",
    "vision_model.encoder.layers.0.mlp.fc1.bias": "vb",
}


def test_map_state_dict_local_to_te_and_back():
    assert map_state_dict(LOCAL, "te") == TE
    without_extra = {k: v for k, v in LOCAL.items() if not k.endswith("_extra_state")}
    assert map_state_dict(TE, "local") == without_extra
    # Mapping to the implementation a dict already has changes nothing but _extra_state.
    assert map_state_dict(TE, "te") == TE
    assert map_state_dict(LOCAL, "local") == without_extra


def test_map_state_dict_keeps_tensors_and_drops_te_fp8_state():
    w = torch.ones(2)
    te = {"layers.0.mlp.experts.linear_fc1.weight1": w, "layers.0.x._extra_state": b"fp8"}
    out = map_state_dict(te, "local")
    assert list(out) == ["layers.0.mlp.experts.local_experts.1.linear_fc1.weight"]
    assert out["layers.0.mlp.experts.local_experts.1.linear_fc1.weight"] is w


def test_map_state_dict_refuses_collisions_and_unknown_targets():
    both = {
        "a.experts.linear_fc1.weight0": 1,
        "a.experts.local_experts.0.linear_fc1.weight": 2,
    }
    with pytest.raises(ValueError, match="two entries map to"):
        map_state_dict(both, "te")
    with pytest.raises(ValueError, match="target must be one of"):
        map_state_dict({}, "apex")
