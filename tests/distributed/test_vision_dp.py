"""models/vision_dp.py: the vision tower and connector data-parallel over a group of ranks
(each encodes a cost-balanced share of the image segments, the features are gathered back in
segment order) equal one process running all of them: the features, and the gradients summed
over the ranks (what finalize_model_grads does for the parameters marked ``sequence_parallel``).

4 ranks, raster and windowed configs, many segments and fewer segments than ranks (ranks with
no image still join the gather). Tolerance 1e-5 relative: the split only changes which rows a
matmul sees and the order of the gradient sum (measured maxima printed).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_navil.config.model import VisionConfig
from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import tiny_gpt as T

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TOL = 1e-5
HIDDEN = 48
MANY = [(8, 12), (6, 8), (4, 6), (2, 4), (6, 6), (4, 4), (12, 8), (2, 2)]
FEW = [(8, 8), (4, 4)]  # two segments for four ranks
CONFIGS = {
    "raster": VisionConfig(depth=2, width=64, mlp=128, heads=4, window_size=None),
    "window": VisionConfig(
        depth=3, width=64, mlp=128, heads=4, window_size=4, fullatt_block_indexes=(1,)
    ),
}


def _model(cfg: VisionConfig):
    from megatron.core.transformer.module import MegatronModule

    from megatron_navil.models.connector import Connector
    from megatron_navil.models.tp import standalone_linear_config
    from megatron_navil.models.vision import VisionEncoder

    config = standalone_linear_config()
    me = torch.distributed.new_group([torch.distributed.get_rank()])  # unsplit on every rank
    model = MegatronModule(config)
    model.vision_model = VisionEncoder(cfg, config, me)
    model.mlp1 = Connector(cfg.width, HIDDEN, config, me)
    T.set_global_params([model], 11)
    return model


def _compare(_: int) -> dict:
    from megatron_navil.models.vision_dp import assign_segments, encode_data_parallel
    from megatron_navil.ops import vision_kwargs
    from megatron_navil.parallel import initialize

    warnings.filterwarnings("ignore")
    initialize()  # DP4: the process group (the models are built outside megatron's state)
    group = torch.distributed.new_group(list(range(torch.distributed.get_world_size())))
    out = {}
    for name, cfg in CONFIGS.items():
        for batch, grids in (("many", MANY), ("few", FEW)):
            kw = vision_kwargs(grids, 2, cfg.window_units(2))
            cu = kw["vision_cu_seqlens"]
            gen = torch.Generator().manual_seed(5)
            patches = torch.randn(int(cu[-1]), 768, generator=gen)
            weights = torch.randn(int(cu[-1]) // 4, HIDDEN, generator=gen)
            args = (patches, kw["patch_positions"], cu, kw.get("vision_window_index"),
                    kw.get("vision_window_cu_seqlens"))  # fmt: skip
            ref = _model(cfg)
            want = ref.mlp1(ref.vision_model(*args))
            (want * weights).sum().backward()
            model = _model(cfg)
            got = encode_data_parallel(
                model.vision_model, model.mlp1, group, *args, 2, (1.0, 0.01), HIDDEN
            )
            (got * weights).sum().backward()
            worst = float((got - want).abs().max() / want.abs().max())
            for p, q in zip(model.parameters(), ref.parameters(), strict=True):
                grad = torch.zeros_like(p) if p.grad is None else p.grad.clone()
                torch.distributed.all_reduce(grad, group=group)
                worst = max(worst, float((grad - q.grad).abs().max() / q.grad.abs().max()))
            lengths = (cu[1:] - cu[:-1]).tolist()
            shares = assign_segments(lengths, 4, 1.0, 0.01)
            out[f"{name}-{batch}"] = dict(worst=worst, empty=sum(not s for s in shares))
    return out


def test_vision_data_parallel_equals_one_process():
    results = run_distributed(_compare, 4, 0, timeout=600)
    for rank_result in results:
        for name, r in rank_result.items():
            assert r["worst"] <= TOL, (name, r)
    assert results[0]["raster-few"]["empty"] == 2  # two ranks encoded nothing
    assert results[0]["raster-many"]["empty"] == 0
    print({n: f"{max(r[n]['worst'] for r in results):.1e}" for n in results[0]})


def test_assign_segments_balances_cost():
    from megatron_navil.models.vision_dp import assign_segments

    lengths = [1024, 16, 16, 16, 512, 512, 64, 64]
    shares = assign_segments(lengths, 2, 1.0, 0.0)
    assert sorted(s for share in shares for s in share) == list(range(8))
    totals = [sum(lengths[s] for s in share) for share in shares]
    assert totals == [1120, 1104] and assign_segments(lengths, 2, 1.0, 0.0) == shares


def test_auto_picks_dp_where_the_heads_do_not_divide_tp():
    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import resolve_vision_parallel

    two, nine = get_config("navil-2b"), get_config("navil-9b")
    assert resolve_vision_parallel("auto", two, 2) == "dp"  # 23 heads
    assert resolve_vision_parallel("auto", two, 1) == "tp"
    assert resolve_vision_parallel("auto", nine, 4) == "tp"  # 28 heads split over 4
    assert resolve_vision_parallel("dp", nine, 4) == "dp"
    with pytest.raises(ValueError, match="vision_parallel must be"):
        resolve_vision_parallel("ddp", two, 2)


def _across_modes(root: str) -> dict:
    from pathlib import Path

    from megatron_navil.checkpoint.directory import latest
    from megatron_navil.checkpoint.store import load, save
    from megatron_navil.testing import navil_run as N

    warnings.filterwarnings("ignore")
    cfg = N.windowed_tiny()  # 2 vision heads: split over TP2 with tp, whole with dp
    adam = dict(optimizer="adam", distributed_optimizer=True, lr=1e-3)
    out = {}
    for saver, loader in (("tp", "dp"), ("dp", "tp")):
        path = Path(root) / saver
        run = N.setup_run(cfg, dict(tp=2, vision_parallel=saver), **adam)
        run.step(batch_seed=0)
        save(path, 1, run.chunks, run.optimizer, {})
        run.step(batch_seed=1)  # one more Adam step after the save
        expected = run.step(batch_seed=2, update=False)
        other = N.setup_run(cfg, dict(tp=2, vision_parallel=loader), seed=11, **adam)
        before = other.step(batch_seed=2, update=False)  # other weights: another loss
        load(latest(path), other.chunks, other.optimizer)  # weights and Adam state
        other.step(batch_seed=1)
        out[saver] = (expected, other.step(batch_seed=2, update=False), before)
    return out


def test_checkpoints_resume_across_the_two_modes(tmp_path):
    """A checkpoint (weights and distributed-optimizer state) saved with the tower's heads
    split over TP2 resumes with the tower data-parallel and vice versa: the loss after the
    next Adam step agrees within the Adam tolerance of the layout tests (1e-3 relative;
    measured in the test output)."""
    results = run_distributed(_across_modes, 2, str(tmp_path), timeout=600)[0]
    for saver, (want, got, before) in results.items():
        assert abs(got - want) <= 1e-3 * abs(want), (saver, want, got)
        assert abs(before - want) > 2e-3 * abs(want), (saver, want, before)  # it can fail
    print({k: f"{abs(g - w) / abs(w):.1e}" for k, (w, g, _) in results.items()})
