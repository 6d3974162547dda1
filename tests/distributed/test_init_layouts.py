"""models/init.py: the initial weights (and so the step-1 loss) are the same in every layout,
and each matrix keeps the distribution of the model's own initialisation."""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import navil_run as N
from megatron_navil.training.microbatch import MicroBatch

pytestmark = pytest.mark.distributed
SEED = 77


def _to_numpy(shards: dict) -> dict:
    """Shards by value: tensors sent back through the spawner's queue travel as shared-memory
    file descriptors, which vanish when the rank exits before the caller reads them."""
    return {k: [(g, sl, t.numpy()) for g, sl, t in v] for k, v in shards.items()}


def _to_torch(shards: dict) -> dict:
    return {k: [(g, sl, torch.from_numpy(a)) for g, sl, a in v] for k, v in shards.items()}


def _build(layout: dict, first: int | None, init_seed: int | None):
    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize

    cfg = get_config("tiny")
    groups = initialize(**layout, seed=3)
    config = transformer_config(cfg, **layout)
    spec = N.BatchSpec(special_ids=N.special_ids_for(cfg))
    chunks = build_model(cfg, config, groups, special_ids=spec.special_ids,
                         first_stage_layers=first, init_seed=init_seed)  # fmt: skip
    return cfg, config, groups, spec, chunks


def _layouts(cases: list) -> dict:
    from megatron.core import parallel_state as ps

    from megatron_navil.testing import tiny_gpt as T
    from megatron_navil.training.optim import build_optimizer, wrap_ddp
    from megatron_navil.training.recipes import get_stage
    from megatron_navil.training.step import train_step

    warnings.filterwarnings("ignore")
    out = {}
    for name, layout, first, init_seed in cases:
        cfg, config, groups, spec, chunks = _build(layout, first, init_seed)
        shards = _to_numpy(T.local_shards(chunks))
        chunks = wrap_ddp(chunks, config, distributed_optimizer=True)
        opt = build_optimizer(chunks, get_stage("s2"), lr=1e-3)
        batches = N.make_batches(cfg, spec, seed=0)
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per = len(batches) // dp
        mine = [MicroBatch.of(b) for b in batches[rank * per : (rank + 1) * per]]
        loss = train_step(chunks, config, groups, opt, None, mine, spec.seq_length).loss
        out[name] = {"shards": shards, "loss": loss}
    return out


def test_initial_weights_and_step_one_loss_equal_across_layouts():
    from megatron_navil.testing import tiny_gpt as T

    cases = [
        ("one", {}, None, SEED),  # DP4: the whole model on every rank
        ("tp2", dict(tp=2), None, SEED),
        ("pp2", dict(pp=2), None, SEED),
        ("pp2_first1", dict(pp=2), 1, SEED),
        ("pp2xvpp2", dict(pp=2, vpp=2), None, SEED),
        ("ep2", dict(ep=2), None, SEED),
        ("tp2xpp2xep2", dict(tp=2, pp=2, ep=2, etp=1), None, SEED),
        ("pp2_megatron_draw", dict(pp=2), None, None),  # the draw before: layout-dependent
    ]
    ranks = run_distributed(_layouts, 4, cases, timeout=900)
    ref = T.full_tensors(_to_torch(ranks[0]["one"]["shards"]))
    ref_loss = ranks[0]["one"]["loss"]
    for name, *_ in cases:
        shards = {}
        for r in ranks:
            for key, pieces in _to_torch(r[name]["shards"]).items():
                shards.setdefault(key, []).extend(pieces)
        assert set(shards) == set(ref), name
        diff = [
            key
            for key, pieces in shards.items()
            for _, sl, piece in pieces
            if not torch.equal(piece, ref[key][sl].reshape(piece.shape))
        ]
        loss = ranks[0][name]["loss"]
        if name == "pp2_megatron_draw":
            # what the issue found: the same seed at PP2 started from other weights
            assert diff and loss != pytest.approx(ref_loss, rel=1e-6), (name, loss, ref_loss)
            continue
        assert not diff, (name, sorted(set(diff))[:5])  # bit-identical initial weights
        # fp32; layouts reorder the sums (the layout tests' 1e-6)
        assert loss == pytest.approx(ref_loss, rel=1e-6), (name, loss, ref_loss)


def _distribution() -> dict:
    from megatron_navil.testing import tiny_gpt as T

    warnings.filterwarnings("ignore")
    out = {}
    for name, init_seed in (("megatron", None), ("by_name", SEED)):
        *_, chunks = _build({}, None, init_seed)
        out[name] = {k: v.numpy() for k, v in T.full_tensors(T.local_shards(chunks)).items()}
    return out


def test_each_matrix_keeps_the_models_own_init_distribution():
    """The key -> init-function table (LLM output projections scaled by the LLM depth, vision
    output projections by the vision depth, everything else the plain std) matches what the
    constructors draw: per matrix of >= 2048 values, the standard deviations agree within 10%
    (sampling error of a std over n values is ~1/sqrt(2n), < 2% here); constants are kept."""
    got = run_distributed(_distribution, 1)[0]
    before = {k: torch.from_numpy(v) for k, v in got["megatron"].items()}
    after = {k: torch.from_numpy(v) for k, v in got["by_name"].items()}
    checked = 0
    for key, old in before.items():
        new = after[key]
        if old.dim() < 2:
            assert torch.equal(old, new), key
            continue
        assert not torch.equal(old, new), key  # redrawn
        if old.numel() >= 2048:
            ratio = float(new.std()) / float(old.std())
            assert 0.9 < ratio < 1.1, (key, ratio)
            assert abs(float(new.mean())) < 0.1 * float(old.std()), key
            checked += 1
    assert checked >= 20, checked
