"""The FFN experts' two paths (``ModalityMoELayer.moe_path``) on one rank: the attention's
gather/scatter (``split``, the default at EP=1 with one expert per modality) and megatron-core's
token dispatcher, on the same layer and weights.

Tolerance: none, results are compared bit for bit (fp32). Both paths hand each expert the same
rows in the same order (the dispatcher's permutation of a two-expert routing map is the stable
text-first sort) and run the same matmuls and activation; the dispatcher's extra work is a
multiplication by the routing probability 1.0 and a scatter-add into zeros, both exact. The
TP=2 / sequence-parallel case is tests/distributed/test_moe_path.py.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

TOKENS, HIDDEN = 24, 64


@pytest.fixture(scope="module", autouse=True)
def _state():
    """A one-process group in this pytest process for the module, then everything undone (the
    group, megatron's state, the CPU shim's patches, the launcher variables it set), so the
    tests after it see a clean process."""
    import os

    from megatron_navil.parallel import cpu_shim, initialize
    from megatron_navil.parallel.state import destroy

    warnings.filterwarnings("ignore")
    env = {k: os.environ.get(k) for k in ("MASTER_ADDR", "MASTER_PORT")}
    initialize(seed=0)
    yield
    destroy()
    cpu_shim.revert_all()
    for k, v in env.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _layer(experts: int = 1, recompute: str = "none", moe_path: str = "auto", **lm):
    from megatron_navil.config.model import ExpertsConfig
    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import transformer_config
    from megatron_navil.models.language import ModalityDecoderLayer
    from megatron_navil.parallel import current_groups

    cfg = get_config("tiny")
    cfg = cfg.replace(
        language=dataclasses.replace(cfg.language, **lm),
        experts=ExpertsConfig(per_modality=experts, topk=1, aux_loss_coeff=0.0),
    ).validate()
    layer = ModalityDecoderLayer(
        transformer_config(cfg), cfg.language, 1, current_groups().tp,
        recompute=recompute, moe_path=moe_path,
    )  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return layer


MASKS = {
    "mixed": torch.rand(TOKENS, generator=torch.Generator().manual_seed(1)) < 0.5,
    "text-only": torch.zeros(TOKENS, dtype=torch.bool),
    "visual-only": torch.ones(TOKENS, dtype=torch.bool),
}


def _inputs(visual: torch.Tensor):
    from megatron_navil.models.language import LayerInputs, rope_tables
    from megatron_navil.models.modality import ModalitySplit

    lengths = [10, 8, 6]
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cos, sin = rope_tables(pos, 16, 1e6)
    return LayerInputs(ModalitySplit.from_mask(visual), visual.view(-1, 1), cos, sin, cu)


def _run(layer, path: str, visual: torch.Tensor):
    """Output, input gradient and every parameter gradient of one forward + backward."""
    layer.mlp.moe_path = path
    layer.zero_grad(set_to_none=True)
    x = torch.randn(TOKENS, HIDDEN, generator=torch.Generator().manual_seed(2))
    x.requires_grad_()
    out = layer(x.view(TOKENS, 1, HIDDEN), _inputs(visual)).view(TOKENS, HIDDEN)
    out.square().sum().backward()
    grads = {n: p.grad.clone() for n, p in layer.named_parameters() if p.grad is not None}
    return out.detach(), x.grad, grads


@pytest.mark.parametrize("recompute", ["none", "selective"])
@pytest.mark.parametrize("mask", list(MASKS))
def test_split_path_equals_the_dispatcher_bit_for_bit(mask, recompute):
    layer = _layer(recompute=recompute)
    assert layer.mlp.moe_path == "split"  # auto at EP=1, one expert per modality
    out_s, dx_s, g_s = _run(layer, "split", MASKS[mask])
    out_d, dx_d, g_d = _run(layer, "dispatcher", MASKS[mask])
    assert set(g_s) == set(g_d) == {n for n, _ in layer.named_parameters()}
    torch.testing.assert_close(out_s, out_d, rtol=0, atol=0)
    torch.testing.assert_close(dx_s, dx_d, rtol=0, atol=0)
    for name in g_d:
        torch.testing.assert_close(g_s[name], g_d[name], rtol=0, atol=0, msg=name)
    # The comparison can fail: a changed visual expert weight changes the split path's output
    # on a mixed micro-batch (not on a text-only one, where that expert has no token).
    if mask != "text-only":
        with torch.no_grad():
            layer.mlp.experts.local_experts[1].linear_fc2.weight[0, 0] += 0.01
        assert not torch.equal(_run(layer, "split", MASKS[mask])[0], out_d)


def test_split_path_does_not_touch_the_dispatcher():
    """``split`` must really bypass routing and dispatch (not silently use them), and
    ``dispatcher`` must use them."""
    layer = _layer()
    mlp = layer.mlp

    def refuse(*_args, **_kwargs):
        raise AssertionError("token dispatcher called")

    mlp.router.forward = refuse
    mlp.token_dispatcher.dispatch_preprocess = refuse
    _run(layer, "split", MASKS["mixed"])
    with pytest.raises(AssertionError, match="token dispatcher called"):
        _run(layer, "dispatcher", MASKS["mixed"])


def test_auto_keeps_the_dispatcher_with_several_experts_per_modality():
    layer = _layer(experts=2)
    assert layer.mlp.moe_path == "dispatcher"
    assert "2 experts per modality" in layer.mlp.split_problem()
    with pytest.raises(ValueError, match="moe_path='split' does not apply: 2 experts"):
        _layer(experts=2, moe_path="split")
    with pytest.raises(ValueError, match="moe_path must be one of"):
        _layer(moe_path="grouped")


def test_parameters_are_the_same_on_both_paths():
    """Checkpoints, init-by-name and the HF mapping key on these names and shapes."""

    def names(layer):
        sharded = {k: tuple(v.global_shape) for k, v in layer.sharded_state_dict().items()
                   if hasattr(v, "global_shape")}  # fmt: skip
        plain = {k: tuple(getattr(v, "shape", ())) for k, v in layer.state_dict().items()}
        return plain, sharded

    split, dispatcher = _layer(moe_path="split"), _layer(moe_path="dispatcher")
    assert split.mlp.moe_path == "split" and dispatcher.mlp.moe_path == "dispatcher"
    assert names(split) == names(dispatcher)


def test_build_model_passes_the_path_to_every_layer():
    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import current_groups
    from megatron_navil.testing.navil_run import special_ids_for

    cfg = get_config("tiny")
    ids = special_ids_for(cfg)
    for path, expected in (("auto", "split"), ("dispatcher", "dispatcher"), ("split", "split")):
        (chunk,) = build_model(
            cfg, transformer_config(cfg), current_groups(), special_ids=ids, moe_path=path
        )
        paths = {layer.mlp.moe_path for layer in chunk.layers.children()}
        assert paths == {expected}, (path, paths)
    with pytest.raises(ValueError, match="moe_path must be one of"):
        build_model(cfg, transformer_config(cfg), current_groups(), special_ids=ids, moe_path="x")


def test_grouped_linear_backends_agree():
    """The grouped-GEMM branch's wiring (offsets, stacked and transposed weights) against two
    matmuls. torch's grouped GEMM is documented for bf16 on CUDA only, but its CPU kernel runs
    the fp32 forward, enough to check the wiring here; gradients are checked on a GPU
    (the ``gpu`` test below, run by scripts/gpu_checks.sh). Tolerance 1e-6 relative: another
    kernel may sum the products in another order."""
    from megatron_navil.models.grouped import grouped_linear, grouped_mm_usable

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(10, 16, generator=gen)
    weights = [torch.randn(8, 16, generator=gen), torch.randn(8, 16, generator=gen)]
    assert not grouped_mm_usable(x, weights)  # the CPU takes the matmuls
    for sizes in ((4, 6), (0, 10), (10, 0)):
        plain = grouped_linear(x, sizes, weights)
        torch.testing.assert_close(plain[: sizes[0]], x[: sizes[0]] @ weights[0].T)
        with torch.no_grad():
            grouped = grouped_linear(x, sizes, weights, grouped=True)
        torch.testing.assert_close(grouped, plain, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="group sizes"):
        grouped_linear(x, (4, 5), weights)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_grouped_gemm_on_cuda_matches_two_matmuls():
    """bf16 on the GPU: forward and gradients within bf16 tolerance (2e-2 relative to the
    largest value: another kernel, bf16 outputs)."""
    from megatron_navil.models.grouped import grouped_linear, grouped_mm_usable

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(384, 256, generator=gen).cuda().bfloat16().requires_grad_()
    ws = [torch.randn(512, 256, generator=gen).cuda().bfloat16().requires_grad_() for _ in "ab"]
    assert grouped_mm_usable(x, ws)
    results = []
    for grouped in (True, False):
        out = grouped_linear(x, (128, 256), ws, grouped=grouped)
        grads = torch.autograd.grad(out.float().square().sum(), [x, *ws])
        results.append([out, *grads])
    for a, b in zip(*results, strict=True):
        scale = float(b.float().abs().max())
        assert float((a.float() - b.float()).abs().max()) <= 2e-2 * scale


@pytest.mark.slow
def test_train_cli_passes_moe_path_to_the_model(tmp_path):
    """``--moe-path`` reaches the built model: the start line reports the path the layers took
    (``build.moe_path_of``), so a flag the trainer ignored would show ``split`` for both."""
    import json
    import os
    import subprocess
    import sys

    from megatron_navil.parallel.spawn import free_port
    from megatron_navil.testing import synthetic_corpus as S
    from megatron_navil.testing.loader_corpus import index

    written = S.write_corpus(tmp_path / "src", num_train=4, num_val=0, seed=1, max_side=64)
    shards = index([written["train"]], tmp_path / "shards", written["tokenizer"],
                   "--config", "tiny", "--template", "qwen3-chat", "--no-multi-scale")  # fmt: skip
    for flag, expected in (([], "split"), (["--moe-path", "dispatcher"], "dispatcher")):
        proc = subprocess.run(
            [sys.executable, "-m", "megatron_navil.train", "--data", str(shards), "--steps", "5",
             "--warmup", "1", "--dry-run", *flag],
            capture_output=True, text=True, timeout=120, check=False,
            env={**os.environ, "MASTER_PORT": str(free_port())},  # this process holds one
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr
        assert json.loads(proc.stdout.strip().splitlines()[-1])["moe_path"] == expected
