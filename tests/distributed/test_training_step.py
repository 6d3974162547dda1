"""training/step.py: loss curves equal across layouts, the global-batch loss normalisation and
its weighting modes, and the NaN/inf policy."""

from __future__ import annotations

import itertools
import math
import warnings

import pytest
import torch

from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import navil_run as N

pytestmark = pytest.mark.distributed
STEPS = 12


def _setup(layout: dict):
    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize
    from megatron_navil.testing import tiny_gpt as T
    from megatron_navil.training.optim import build_optimizer, build_scheduler, wrap_ddp
    from megatron_navil.training.recipes import get_stage

    cfg = get_config("tiny")
    groups = initialize(**layout)
    config = transformer_config(cfg, **layout)
    spec = N.BatchSpec(special_ids=N.special_ids_for(cfg))
    chunks = build_model(cfg, config, groups, special_ids=spec.special_ids)
    T.set_global_params(chunks, 7)
    chunks = wrap_ddp(chunks, config, distributed_optimizer=True)
    recipe = get_stage("s2")
    opt = build_optimizer(chunks, recipe, lr=3e-3, clip_grad=1.0)
    sched = build_scheduler(opt, recipe, STEPS, lr=3e-3, warmup_steps=2)
    return cfg, spec, chunks, config, groups, opt, sched


def _my_batches(cfg, spec, weighting: str = "token"):
    from megatron.core import parallel_state as ps

    from megatron_navil.training.microbatch import MicroBatch

    batches = [MicroBatch.of(b, _weights(b, weighting)) for b in N.make_batches(cfg, spec, 0)]
    dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    per = len(batches) // dp
    return batches[rank * per : (rank + 1) * per], batches


def _weights(batch, mode: str) -> torch.Tensor:
    has = (batch["labels"] != -100).float()
    if mode == "token":
        return has
    w = torch.zeros_like(has)
    cu = batch["cu_seqlens"].tolist()
    for s, e in itertools.pairwise(cu):
        n = float(has[s:e].sum())
        if n:
            w[s:e] = has[s:e] / (n if mode == "sample" else math.sqrt(n))
    return w


def _curves(layouts: list) -> dict:
    from megatron_navil.training.step import train_step

    warnings.filterwarnings("ignore")
    out = {}
    for name, layout in layouts:
        cfg, spec, chunks, config, groups, opt, sched = _setup(layout)
        mine, _ = _my_batches(cfg, spec)
        out[name] = [
            train_step(chunks, config, groups, opt, sched, mine, spec.seq_length, step=i).loss
            for i in range(STEPS)
        ]
    return out


def test_loss_curves_equal_across_layouts_and_decrease():
    layouts = [
        ("dp4", {}),
        ("tp2xpp2", dict(tp=2, pp=2)),
        ("ep2", dict(ep=2)),
        ("cp2", dict(cp=2)),  # DP2 x CP2: loss weights split, reported loss summed over CP
        ("cp2xtp2", dict(cp=2, tp=2)),
    ]
    curves = run_distributed(_curves, 4, layouts, timeout=900)[0]
    ref = curves["dp4"]
    assert ref[-1] < ref[0] - 0.5, ref  # it learns the (repeated) batch
    for name, curve in curves.items():
        worst = max(abs(a - b) / abs(b) for a, b in zip(curve, ref, strict=True))
        print(name, f"max rel diff {worst:.1e}", [round(x, 4) for x in curve[::4]])
        # fp32; layouts reorder sums, Adam carries the differences along (measured <= 8e-8).
        assert worst <= 1e-6, (name, curve, ref)


def _normalisation(modes: list[str], layout: dict) -> dict:
    from megatron_navil.training.step import train_step

    warnings.filterwarnings("ignore")
    out = {}
    for mode in modes:
        cfg, spec, chunks, config, groups, opt, _ = _setup(layout)
        mine, everything = _my_batches(cfg, spec, mode)
        # Reference: the same (pre-step) model in this one process over the whole batch.
        num = den = 0.0
        with torch.no_grad():
            for b in everything:
                # under CP the model returns this rank's tokens' losses: sum over the CP ranks
                per_token = chunks[0].module(**b.inputs)
                part = (per_token * b.local_loss_weights(groups.cp)).sum().reshape(1)
                torch.distributed.all_reduce(part, group=groups.cp)
                num += float(part)
                den += float(b.loss_weights.sum())
        got = train_step(chunks, config, groups, opt, None, mine, spec.seq_length).loss
        out[mode] = (got, num / den)
    return out


@pytest.mark.parametrize("layout", [{}, dict(cp=2)], ids=["dp2", "cp2"])
def test_step_loss_is_the_weighted_mean_over_the_global_batch(layout):
    # DP = world size; CP2: both ranks share every micro-batch, each with its own chunks
    results = run_distributed(_normalisation, 2, ["token", "sample", "square"], layout)[0]
    for mode, (got, want) in results.items():
        assert abs(got - want) <= 1e-6 * abs(want), (mode, got, want)
    # The modes weight differently, so the objectives differ.
    assert len({round(want, 6) for _, want in results.values()}) == 3


def _nan(policies: list[str]) -> dict:
    from megatron_navil.training.step import TrainingDivergedError, train_step

    warnings.filterwarnings("ignore")
    out = {}
    for policy in policies:
        cfg, spec, chunks, config, groups, opt, sched = _setup({})
        mine, _ = _my_batches(cfg, spec)
        for b in mine:
            b.loss_weights = b.loss_weights * float("nan")
        before = [p.detach().clone() for c in chunks for p in c.parameters()]
        try:
            result = train_step(
                chunks, config, groups, opt, sched, mine, spec.seq_length, policy, 7
            )
            outcome = f"skipped={result.skipped}"
        except TrainingDivergedError as exc:
            outcome = str(exc)
        after = [p.detach() for c in chunks for p in c.parameters()]
        unchanged = all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
        out[policy] = {"outcome": outcome, "unchanged": unchanged}
    return out


def test_nan_loss_policy():
    r = run_distributed(_nan, 2, ["stop", "skip"])[0]
    assert r["stop"] == {"outcome": "step 7: loss is nan; stopping (nan_policy)", "unchanged": True}
    assert r["skip"] == {"outcome": "skipped=True", "unchanged": True}
