"""Cost-aware data: a sample's cost from the index (``data.cost``), the pack planner's cost
budget (``SequenceStream(max_cost=...)``) and the data-parallel deal by cost
(``PackedSampler(balance=True)``): deterministic, resumable mid-epoch and across a DP-size
change, and more even than contiguous shares on skewed costs."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_navil.config.registry import get_config
from megatron_navil.data.loader import build_data_loader
from megatron_navil.data.packing import SequenceStream
from megatron_navil.data.sampler import PackedSampler, balanced_shares
from megatron_navil.data.shards.corpus import ShardDataset
from megatron_navil.planning.flops import llm_flops, vision_flops
from megatron_navil.training.flops import cost_model


def _meta(n: int, seed: int):
    """Skewed costs: mostly cheap samples, a few with huge images (a heavy tail)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(10, 300, n).astype(np.int64)
    heavy = rng.random(n) < 0.1
    patches = np.where(heavy, rng.integers(150, 250, n), rng.integers(0, 20, n)).astype(np.int64)
    costs = tokens + np.where(heavy, patches**2, patches)
    return tokens, patches, costs.astype(np.int64)


def _stream(max_cost=None, costs=True):
    metas = [_meta(n, 10 + i) for i, n in enumerate((300, 120))]
    return SequenceStream(
        [m[0] for m in metas], [m[1] for m in metas], 512, 400, seed=1, window=100,
        costs=[m[2] for m in metas] if costs else None, max_cost=max_cost,
    )  # fmt: skip


def test_patches_sq_from_the_index(loader_corpora):
    d = ShardDataset(loader_corpora["photos"])
    want = [sum((gh * gw) ** 2 for im in d.sample(i).images for gh, gw in im.grids)
            for i in range(len(d))]  # fmt: skip
    assert d.patches_sq.tolist() == want and max(want) > 0


def test_cost_model_is_the_flop_counter():
    cfg = get_config("navil-2b")
    c = cost_model(cfg)
    got = c.flops(np.array([700]), np.array([4096 + 1024]), np.array([4096**2 + 1024**2]))[0]
    assert got == pytest.approx(llm_flops(cfg, [700]) + vision_flops(cfg, [4096, 1024]), 1e-12)


def test_sequence_costs_and_the_cost_budget():
    free, budget = _stream(), _stream(max_cost=60_000)
    metas = [_meta(n, 10 + i) for i, n in enumerate((300, 120))]
    plan = free.window_plan(0, 0)
    for seq, cost in zip(plan.sequences, plan.costs, strict=True):
        assert cost == sum(int(metas[d][2][s]) for d, s in seq.tolist())
    assert free.fingerprint() == _stream(costs=False).fingerprint()  # costs alone: same stream
    assert budget.fingerprint() != free.fingerprint()  # a budget changes the plans
    for w in range(budget.num_windows):
        p = budget.window_plan(0, w)
        for seq, cost in zip(p.sequences, p.costs, strict=True):
            assert cost <= 60_000 or len(seq) == 1  # only a sample over budget exceeds it
    assert len(budget.epoch_sequences(0)) > len(free.epoch_sequences(0))
    # every sample still in the epoch once (the budget never drops one)
    for s in (free, budget):
        drawn = sorted(tuple(x) for q in s.epoch_sequences(0) for x in q.tolist())
        assert len(drawn) == len(set(drawn)) == 420 - sum(len(o) for o in s.oversize)


def test_balanced_shares_lpt():
    costs = [100, 1, 1, 1, 90, 2, 2, 80]
    shares = balanced_shares(costs, 4)
    assert sorted(j for s in shares for j in s) == list(range(8))
    assert all(len(s) == 2 and s == sorted(s) for s in shares)
    totals = [sum(costs[j] for j in s) for s in shares]
    contiguous = [sum(costs[2 * r : 2 * r + 2]) for r in range(4)]
    assert totals == [101, 91, 81, 4] and contiguous == [101, 2, 92, 82]
    assert np.std(totals) < np.std(contiguous)  # the same max here (one sample of 100)
    assert balanced_shares(costs, 4) == shares  # deterministic
    with pytest.raises(ValueError, match="needs a stream with sequence costs"):
        PackedSampler(_stream(costs=False), 4, 0, 2, balance=True)


def _steps(stream, gb, dp, steps, state=None):
    samplers = [PackedSampler(stream, gb, r, dp, balance=True) for r in range(dp)]
    for s in samplers if state is not None else []:
        s.load_state_dict(state)
    iters = [iter(s) for s in samplers]
    out = []
    for _ in range(steps):
        shares = [[next(it) for _ in range(gb // dp)] for it in iters]
        out.append([[r.index for r in share] for share in shares])
    return out, samplers[0].state_dict()


def test_balanced_sampler_resumes_and_changes_dp():
    stream = _stream()
    ref, _ = _steps(stream, 8, 1, 30)
    for dp in (2, 4):
        got, _ = _steps(stream, 8, dp, 30)
        for step, shares in zip(ref, got, strict=True):
            assert sorted(i for s in shares for i in s) == step[0]  # the same global batch
            costs = [stream_cost(stream, i) for i in step[0]]
            want = balanced_shares(costs, dp)
            assert shares == [[step[0][j] for j in s] for s in want]
    _, state = _steps(stream, 8, 2, 11)  # save at DP2 mid-epoch, resume at DP4
    fresh = _stream()
    got, _ = _steps(fresh, 8, 4, 19, state)
    want, _ = _steps(_stream(), 8, 4, 30)
    assert got == want[11:]


def stream_cost(stream: SequenceStream, index: int) -> int:
    pos = next(p for p, _ in stream.iterate() if p.consumed == index)
    return stream.sequence_cost(pos)


def test_balance_evens_the_ranks(loader_corpora):
    """On the loader's corpora (photos cost far more than text), the deal by cost lowers the
    slowest rank's cost against contiguous shares over 40 steps at DP4."""
    cfg = get_config("tiny")
    data = [ShardDataset(loader_corpora[k]) for k in ("photos", "text", "shapes")]
    kw = dict(seq_length=512, global_batch=8, seed=0, cost_model=cost_model(cfg))
    ratios = {}
    for balance in (False, True):
        per_rank = np.zeros((40, 4))
        for r in range(4):
            loader = build_data_loader(data, dp_rank=r, dp_size=4, balance=balance, pixels=False,
                                       **kw)  # fmt: skip
            it = iter(loader.sampler)
            for step in range(40):
                for _ in range(2):
                    ref = next(it)
                    per_rank[step, r] += float(
                        cost_model(cfg).flops(*_counts(data, ref.draws)).sum()
                    )
        ratios[balance] = float(np.mean(per_rank.max(1) / per_rank.mean(1)))
    assert ratios[True] < ratios[False], ratios


def _counts(data, draws):
    d, s = draws[:, 0], draws[:, 1]
    pick = lambda name: np.array([getattr(data[a], name)[b] for a, b in zip(d, s, strict=True)])  # noqa: E731
    return pick("llm_tokens"), pick("patches"), pick("patches_sq")
