"""NaViL (tiny) in every parallel layout equals the single-process model: loss and every
gradient, then parameters after an optimizer step.

The global batch has four packed micro-batches: two with several samples and images of
different sizes and scales, one text-only (the visual experts get no tokens), one nearly all
image tokens; every layout processes all of them (DP splits them between replicas).

Tolerances (relative to the largest reference value of each tensor): forward loss and
gradients 1e-5 (layouts only reorder fp32 sums; measured maxima are printed by the test);
parameters after one SGD step 1e-5; after one Adam step 1e-3, because Adam divides by
sqrt(v) ~ |g|, which turns a 1e-7 gradient difference on a near-zero gradient into an O(lr)
update difference (see MCORE_CPU.md: 3e-4 on the tiny GPT).
"""

from __future__ import annotations

import warnings

import pytest

from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import navil_run as N
from megatron_navil.testing import tiny_gpt as T

pytestmark = pytest.mark.distributed

TOL = 1e-5
ADAM_TOL = 1e-3
LAYOUTS = [
    ("tp2", dict(tp=2), None),
    ("pp2", dict(pp=2), None),
    ("pp2-vpp2", dict(pp=2, vpp=2), None),
    ("pp2-first1", dict(pp=2), 1),
    ("ep2", dict(ep=2), None),
    ("tp2xpp2", dict(tp=2, pp=2), None),
    ("tp2xep2", dict(tp=2, ep=2), None),
    ("dp4", dict(), None),
    # the vision tower data-parallel over the TP ranks (models/vision_dp.py)
    ("tp2-vdp", dict(tp=2, vision_parallel="dp"), None),
    ("tp2xpp2-vdp", dict(tp=2, pp=2, vision_parallel="dp"), None),
    ("tp2xep2-vdp", dict(tp=2, ep=2, vision_parallel="dp"), None),
]


def _cfg():
    # window order and window attention on, with images the windows really permute
    return N.windowed_tiny()


def _compare(layouts: list) -> dict:
    warnings.filterwarnings("ignore")
    cfg = _cfg()
    ref = N.setup_run(cfg)
    ref_loss = ref.step(batch_seed=3, full_batch=True, update=False)
    ref_grads = T.full_tensors(ref.shards("grad"))
    out = {}
    for name, layout, first in layouts:
        run = N.setup_run(cfg, layout, first_stage_layers=first)
        loss = run.step(batch_seed=3, update=False)
        grads = run.shards("grad")
        worst, where = T.max_rel_diff(grads, ref_grads)
        out[name] = dict(loss=loss, ref_loss=ref_loss, worst=worst, where=where, keys=set(grads))
    out["ref_keys"] = set(ref_grads)
    return out


def test_loss_and_grads_match_single_process():
    results = run_distributed(_compare, 4, LAYOUTS, timeout=600)
    ref_keys = results[0].pop("ref_keys")
    seen: dict[str, set] = {}
    for rank_result in results:
        rank_result.pop("ref_keys", None)
        for name, r in rank_result.items():
            assert abs(r["loss"] - r["ref_loss"]) <= TOL * abs(r["ref_loss"]), (name, r)
            assert r["worst"] <= TOL, f"{name}: {r['where']} differs by {r['worst']:.2e}"
            seen.setdefault(name, set()).update(r["keys"])
    for name, keys in seen.items():
        assert keys == ref_keys, f"{name}: gradients missing for {sorted(ref_keys - keys)[:5]}"
    print({n: f"{max(r[n]['worst'] for r in results):.1e}" for n in seen})


def _after_step(layouts: list, kind: str, distributed: bool) -> dict:
    warnings.filterwarnings("ignore")
    cfg = _cfg()
    ref = N.setup_run(cfg, optimizer=kind, lr=1e-2)
    ref.step(batch_seed=5, full_batch=True)
    ref_params = T.full_tensors(ref.shards("param"))
    out = {}
    for name, layout, first in layouts:
        run = N.setup_run(
            cfg, layout, first_stage_layers=first, optimizer=kind,
            distributed_optimizer=distributed, lr=1e-2,
        )  # fmt: skip
        run.step(batch_seed=5)
        out[name] = T.max_rel_diff(run.shards("param"), ref_params)
    return out


@pytest.mark.parametrize(("kind", "tol"), [("sgd", TOL), ("adam", ADAM_TOL)])
def test_params_after_optimizer_step(kind, tol):
    picked = ("tp2xpp2", "tp2xep2", "dp4", "pp2-vpp2", "tp2xpp2-vdp")
    layouts = [lay for lay in LAYOUTS if lay[0] in picked]
    results = run_distributed(_after_step, 4, layouts, kind, kind == "adam", timeout=600)
    for rank_result in results:
        for name, (worst, where) in rank_result.items():
            assert worst <= tol, f"{kind} {name}: {where} differs by {worst:.2e}"
    print({n: f"{max(r[n][0] for r in results):.1e}" for n in results[0]})
