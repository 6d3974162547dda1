"""Activation recompute in tensor-, pipeline- and expert-parallel layouts: TP2xPP2 and TP2xEP2
(one 4-rank group), each with full and selective recompute of the LLM layers and the vision
blocks, against the same layout without recompute, over the global batch of navil_run (the
text-only micro-batch leaves the visual expert's EP rank without tokens; the 1F1B schedule
recomputes micro-batches in another order than it ran them; the recomputed MoE layer repeats its
all-to-alls and the vision q/k norms their all-reduce inside the backward).

Tolerances as in tests/unit/test_recompute.py: ``full`` equals the run without recompute bit
for bit (loss and every gradient piece); ``selective`` has the same loss bit for bit and
gradients within 1e-5 of each tensor's largest value (one fp32 rounding per element where a
recomputed norm's input gradient is summed in another order; measured maxima printed).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from megatron_navil.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed

TOL = 1e-5
LAYOUTS = [("tp2xpp2", dict(tp=2, pp=2)), ("tp2xep2", dict(tp=2, ep=2))]
MODES = [("full", "full"), ("selective", "selective")]


def _grads(run) -> dict:
    return {
        (key, i): piece
        for key, pieces in run.shards("grad").items()
        for i, (_, _, piece) in enumerate(pieces)
    }


def _compare() -> dict:
    from megatron_navil.config.model import Recompute
    from megatron_navil.testing import navil_run as N

    warnings.filterwarnings("ignore")
    cfg = N.windowed_tiny()  # window order and window attention in the vision blocks
    out = {}
    for name, layout in LAYOUTS:
        ref = N.setup_run(cfg, layout)
        ref_loss = ref.step(batch_seed=3, update=False)
        ref_grads = _grads(ref)
        for llm, vision in MODES:
            run = N.setup_run(cfg, layout, recompute=Recompute(llm, vision))
            loss = run.step(batch_seed=3, update=False)
            grads = _grads(run)
            worst = max(
                float((grads[k] - g).abs().max()) / (float(g.abs().max()) or 1.0)
                for k, g in ref_grads.items()
            )
            out[name, llm, vision] = dict(
                loss=loss,
                ref_loss=ref_loss,
                keys=set(grads) == set(ref_grads),
                exact=all(torch.equal(grads[k], g) for k, g in ref_grads.items()),
                worst=worst,
            )
    return out


def test_recompute_matches_no_recompute_in_parallel_layouts():
    results = run_distributed(_compare, 4, timeout=600)
    for rank, rank_result in enumerate(results):
        for (layout, llm, vision), r in rank_result.items():
            where = f"rank {rank} {layout} {llm}/{vision}"
            assert r["keys"], f"{where}: gradients missing"
            assert r["loss"] == r["ref_loss"], (where, r)
            if llm == vision == "full":
                assert r["exact"], f"{where}: differs by {r['worst']:.2e}"
            assert r["worst"] <= TOL, f"{where}: differs by {r['worst']:.2e}"
    print({k: f"{max(r[k]['worst'] for r in results):.1e}" for k in results[0]})
