"""Forward loss and gradients of a tiny megatron-core GPT in every parallel layout equal the
single-process run, shard by shard.

Tolerance: 1e-5 relative (to the largest reference value of each tensor). Layouts only
reorder fp32 sums (TP splits matmuls, SP and EP move tokens, DP averages); measured max
differences are ~5e-7. A perturbed shard must exceed the tolerance, so the check can fail.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from megatron.core import parallel_state as ps

from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import tiny_gpt as T

pytestmark = pytest.mark.distributed

TOL = 1e-5
DENSE = [dict(tp=2), dict(tp=4), dict(pp=2), dict(pp=2, vpp=2), dict(tp=2, pp=2), dict(pp=4)]
MOE = [dict(ep=2), dict(ep=4), dict(tp=2, ep=2), dict(tp=2, ep=2, etp=1), dict(pp=2, ep=2)]
CASES = (
    [("dense", "-", lay) for lay in DENSE]
    + [("moe", "alltoall", lay) for lay in MOE]
    + [("moe", "allgather", lay) for lay in MOE[:4]]
)


def _spec(kind: str, dispatcher: str) -> T.TinyGPTSpec:
    if kind == "dense":
        return T.TinyGPTSpec()
    return T.TinyGPTSpec(num_experts=4, dispatcher=dispatcher)


def _compare_all(cases: list) -> dict:
    """On each rank: the reference (TP=PP=EP=1, whole batch), then every layout."""
    warnings.filterwarnings("ignore")
    refs, out = {}, {}
    for kind, dispatcher in sorted({(k, d) for k, d, _ in cases}):  # same order on all ranks
        run = T.setup_run(_spec(kind, dispatcher))
        loss = run.step(batch_seed=3, full_batch=True, update=False)
        refs[kind, dispatcher] = (loss, T.full_tensors(run.shards("grad")))
    for kind, dispatcher, layout in cases:
        ref_loss, ref_grads = refs[kind, dispatcher]
        run = T.setup_run(_spec(kind, dispatcher), layout)
        loss = run.step(batch_seed=3, update=False)
        grads = run.shards("grad")
        worst, where = T.max_rel_diff(grads, ref_grads)
        out[kind, dispatcher, str(layout)] = dict(
            loss=loss,
            ref_loss=ref_loss,
            worst=worst,
            where=where,
            keys=sorted(grads),
            ref_keys=sorted(ref_grads),
        )
    # The check must be able to fail: perturb one element of one rank's TP shard.
    run = T.setup_run(_spec("dense", "-"), dict(tp=2))
    if ps.get_tensor_model_parallel_rank() == 1:
        with torch.no_grad():
            next(iter(run.chunks[0].module.decoder.layers[0].mlp.linear_fc1.parameters()))[
                0, 0
            ] += 0.05
    run.step(batch_seed=3, update=False)
    out["perturbed"] = T.max_rel_diff(run.shards("grad"), refs["dense", "-"][1])[0]
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(_compare_all, 4, CASES, timeout=420)


@pytest.mark.parametrize(("kind", "dispatcher", "layout"), CASES, ids=lambda v: str(v))
def test_layout_matches_single_process(results, kind, dispatcher, layout):
    per_rank = [r[kind, dispatcher, str(layout)] for r in results]
    for r in per_rank:
        assert r["loss"] == pytest.approx(r["ref_loss"], rel=TOL)
        assert r["worst"] <= TOL, f"gradient of {r['where']} differs by {r['worst']:.2e}"
    # Together the ranks hold every parameter of the model.
    assert sorted({k for r in per_rank for k in r["keys"]}) == per_rank[0]["ref_keys"]


def test_a_perturbed_shard_is_detected(results):
    assert max(r["perturbed"] for r in results) > 100 * TOL
