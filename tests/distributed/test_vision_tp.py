"""Vision encoder + connector: TP=2 (heads split) and a replicated encoder inside a TP=2
model (a vision group of one rank) equal TP=1 on the same global weights and packed batch.

One 2-rank gloo group runs every layout in a row (start-up dominates). Weights are set from
their global names and a seed (tiny_gpt.set_global_params), so every layout holds the same
model; gradient shards of all ranks are gathered and assembled into full tensors (which also
checks that together they cover every element) and compared with the TP=1 gradients.

Tolerance: 1e-5 relative to each tensor's largest reference value. Layouts only reorder fp32
sums (split matmuls, an all-reduced sum of squares): measured <= 7.4e-7 (gradients),
<= 2.7e-7 (outputs); the replicated encoder is bit-identical to TP=1. Two
checks show the comparison can fail: an all-reduce with an identity backward in the
full-width QK-norm (megatron's reduce_from_tensor_model_parallel_region) gives wrong
gradients, and a replicated encoder without ``replica_group`` gives a checkpoint sharding
that megatron's validation rejects (two main replicas of every tensor).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_navil.config.model import VisionConfig
from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import tiny_gpt as T

pytestmark = pytest.mark.distributed

TOL = 1e-5
HIDDEN = 48
SEED = 11
# Three images, each at two scales (the second smaller), all of different sizes.
GRIDS = [(8, 12), (6, 8), (4, 6), (2, 4), (6, 6), (4, 4)]
CONFIGS = {
    "full": VisionConfig(depth=2, width=64, mlp=128, heads=4),  # window order of 4x4 units
    "window": VisionConfig(
        depth=3, width=64, mlp=128, heads=4, window_size=4, fullatt_block_indexes=(1,)
    ),
    "raster": VisionConfig(depth=2, width=64, mlp=128, heads=4, window_size=None),
}
LAYOUTS = ["tp2", "replicated"]


def _model(cfg: VisionConfig, group, replica_group):
    """Encoder and connector under the official top-level names, in one MegatronModule."""
    from megatron.core.transformer.module import MegatronModule

    from megatron_navil.models.connector import Connector
    from megatron_navil.models.tp import standalone_linear_config
    from megatron_navil.models.vision import VisionEncoder

    config = standalone_linear_config()
    model = MegatronModule(config)
    model.vision_model = VisionEncoder(cfg, config, group, replica_group=replica_group)
    model.mlp1 = Connector(cfg.width, HIDDEN, config, group, replica_group=replica_group)
    T.set_global_params([model], SEED)
    return model


def _step(model, cfg: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    from megatron_navil.ops import vision_kwargs

    kw = vision_kwargs(GRIDS, 2, cfg.window_units(2))
    cu = kw["vision_cu_seqlens"]
    gen = torch.Generator().manual_seed(5)
    patches = torch.randn(int(cu[-1]), 768, generator=gen)
    feats = model.vision_model(
        patches, kw["patch_positions"], cu, kw.get("vision_window_index"),
        kw.get("vision_window_cu_seqlens"),
    )  # fmt: skip
    tokens = model.mlp1(feats)
    weights = torch.randn(tokens.shape, generator=gen)
    (tokens * weights).sum().backward()
    return feats.detach(), tokens.detach()


def _gathered_grads(model) -> dict[str, torch.Tensor]:
    """Every rank's gradient shards, assembled into full tensors (NaN-free or it raises)."""
    shards = T.local_shards([model], "grad")
    everyone = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(everyone, shards)
    merged: T.Shards = {}
    for rank_shards in everyone:
        for key, pieces in rank_shards.items():
            merged.setdefault(key, []).extend(pieces)
    return T.full_tensors(merged)


def _sharding_error(model) -> str | None:
    """megatron's checkpoint sharding validation over all ranks (None when valid)."""
    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.validation import (
        determine_global_metadata,
        validate_sharding_integrity,
    )

    _, global_metadata = determine_global_metadata(model.sharded_state_dict())
    try:
        validate_sharding_integrity(global_metadata)
    except CheckpointingException as err:
        return str(err)[:200]
    return None


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).abs().max() / ref.abs().max())


def _worst(grads: dict, ref: dict) -> tuple[float, str]:
    return max((_rel(grads[k], ref[k]), k) for k in ref)


def _compare_all() -> dict:
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import reduce_from_tensor_model_parallel_region

    from megatron_navil.models import norms
    from megatron_navil.parallel import initialize

    warnings.filterwarnings("ignore")
    world = torch.distributed  # initialised by the first initialize()
    out: dict = {}
    refs = {}
    initialize(tp=1)
    for name, cfg in CONFIGS.items():
        model = _model(cfg, ps.get_tensor_model_parallel_group(), None)
        feats, tokens = _step(model, cfg)
        shapes = {k: tuple(v.global_shape) for k, v in model.sharded_state_dict().items()}
        refs[name] = (feats, tokens, _gathered_grads(model), shapes)

    initialize(tp=2)
    tp_group = ps.get_tensor_model_parallel_group()
    singles = [world.new_group([r]) for r in range(world.get_world_size())]  # collective
    own = singles[world.get_rank()]
    for name, cfg in CONFIGS.items():
        ref_feats, ref_tokens, ref_grads, ref_shapes = refs[name]
        for layout in LAYOUTS:
            group, replicas = (tp_group, None) if layout == "tp2" else (own, tp_group)
            model = _model(cfg, group, replicas)
            feats, tokens = _step(model, cfg)
            grads = _gathered_grads(model)
            sharded = model.sharded_state_dict()
            out[name, layout] = dict(
                feats=_rel(feats, ref_feats),
                tokens=_rel(tokens, ref_tokens),
                grads=_worst(grads, ref_grads),
                keys=sorted(grads) == sorted(ref_grads),
                shapes={k: tuple(v.global_shape) for k, v in sharded.items()} == ref_shapes,
                sharding_error=_sharding_error(model),
                qkv_local=tuple(model.vision_model.encoder["layers"][0].attn.qkv.weight.shape),
                tp_params=sorted(n for n, p in model.named_parameters() if p.tensor_model_parallel),
            )

    # The checks can fail. (1) An identity-backward all-reduce in the QK-norm:
    cfg = CONFIGS["full"]
    patched = norms.all_reduce_sum
    norms.all_reduce_sum = lambda x, group: (
        x if group is None else reduce_from_tensor_model_parallel_region(x, group)
    )
    try:
        model = _model(cfg, tp_group, None)
        feats, _ = _step(model, cfg)
        out["identity_backward"] = (
            _rel(feats, refs["full"][0]),
            _worst(_gathered_grads(model), refs["full"][2]),
        )
    finally:
        norms.all_reduce_sum = patched
    # (2) A replicated encoder that does not know its replicas.
    out["no_replica_group"] = _sharding_error(_model(cfg, own, None))
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_compare_all, 2, timeout=240)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_matches_tp1(results, name, layout):
    for r in results:
        got = r[name, layout]
        assert got["feats"] <= TOL and got["tokens"] <= TOL, got
        worst, where = got["grads"]
        assert worst <= TOL, f"gradient of {where} differs by {worst:.2e}"
        assert got["keys"] and got["shapes"], "checkpoint keys or global shapes differ from TP=1"
        assert got["sharding_error"] is None, got["sharding_error"]


def test_heads_are_split_only_in_the_tp_group(results):
    cfg = CONFIGS["full"]
    for r in results:
        assert r["full", "tp2"]["qkv_local"] == (3 * cfg.width // 2, cfg.width)
        assert r["full", "replicated"]["qkv_local"] == (3 * cfg.width, cfg.width)
        assert r["full", "replicated"]["tp_params"] == []
        split = {
            n.rsplit(".", 2)[-2] + "." + n.rsplit(".", 1)[-1] for n in r["full", "tp2"]["tp_params"]
        }
        assert split == {
            "qkv.weight", "q_norm.weight", "k_norm.weight", "proj.weight", "fc1.weight",
            "fc1.bias", "fc2.weight", "1.weight", "1.bias", "3.weight",
        }  # fmt: skip


def test_the_checks_can_fail(results):
    for r in results:
        feats_diff, (grad_diff, _) = r["identity_backward"]
        assert feats_diff <= TOL  # the forward is the same ...
        assert grad_diff > 100 * TOL  # ... the backward misses the other rank's terms
    assert "Invalid access pattern" in (results[0]["no_replica_group"] or "")
