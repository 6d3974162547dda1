"""Context parallelism (``--cp``) equals the single-process model: loss and every gradient, the
parameters after one optimizer step, and checkpoints across CP sizes.

The micro-batches (128 tokens: 4 chunks at CP2, 8 at CP4) are checked to hold what the split
must get right: samples crossing chunk boundaries, a chunk of image tokens only, a chunk of
padding only, a text-only sequence (``test_batches_cover_the_cases``).

Tolerances, as tests/distributed/test_navil_layouts.py: loss and gradients 1e-5 relative to the
largest reference value of each tensor (fp32; CP only reorders sums: the keys' gradients are
summed over the CP ranks, the per-token losses too); SGD step 1e-5; Adam step 1e-3 (Adam
divides by sqrt(v) ~ |g|, so a 1e-7 gradient difference on a near-zero gradient becomes an
O(lr) update difference).
"""

from __future__ import annotations

import itertools
import warnings

import pytest
import torch

from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import navil_run as N
from megatron_navil.testing import tiny_gpt as T

pytestmark = pytest.mark.distributed

TOL = 1e-5
ADAM_TOL = 1e-3
# one sample whose second scale alone fills chunks: [32, 64) at CP2 is image tokens only
BIG_IMAGE = (N.Sample(1, (((8, 8), (12, 16)),), 1),)
MICRO_BATCHES = (N.TEXT_ONLY, N.MIXED, BIG_IMAGE, N.IMAGE_HEAVY)
LAYOUTS = [
    ("cp2", dict(cp=2)),  # and DP2
    ("cp4", dict(cp=4)),
    ("cp2xtp2", dict(cp=2, tp=2)),
    ("cp2xpp2", dict(cp=2, pp=2)),
    ("cp2xep2", dict(cp=2, ep=2)),  # and DP2
]


def _spec(cfg):
    return N.BatchSpec(micro_batches=MICRO_BATCHES, special_ids=N.special_ids_for(cfg))


def test_batches_cover_the_cases():
    """The micro-batches hold, at CP2 (chunks of 32 tokens): a sample crossing a chunk
    boundary, a chunk of image tokens only, a chunk of padding only, a text-only sequence."""
    cfg = N.windowed_tiny()
    spec = _spec(cfg)
    chunk = spec.seq_length // 4
    crossing = image_only = padding_only = text_only = False
    for batch in N.make_batches(cfg, spec, seed=3):
        ids, cu = batch["input_ids"], batch["cu_seqlens"].tolist()
        special = torch.isin(ids, torch.tensor(spec.special_ids))
        crossing |= any(a // chunk != (b - 1) // chunk for a, b in itertools.pairwise(cu))
        text_only |= "patches" not in batch
        for c in range(4):
            rows = slice(c * chunk, (c + 1) * chunk)
            image_only |= bool(special[rows].all())
            padding_only |= c * chunk >= cu[-2]  # inside the last (padding) segment
    assert crossing and image_only and padding_only and text_only


def _compare(layouts: list) -> dict:
    warnings.filterwarnings("ignore")
    cfg = N.windowed_tiny()
    spec = _spec(cfg)
    ref = N.setup_run(cfg, spec=spec)
    ref_loss = ref.step(batch_seed=3, full_batch=True, update=False)
    ref_grads = T.full_tensors(ref.shards("grad"))
    out = {}
    for name, layout in layouts:
        run = N.setup_run(cfg, layout, spec=spec)
        loss = run.step(batch_seed=3, update=False)
        grads = run.shards("grad")
        worst, where = T.max_rel_diff(grads, ref_grads)
        out[name] = dict(loss=loss, ref_loss=ref_loss, worst=worst, where=where, keys=set(grads))
    out["ref_keys"] = set(ref_grads)
    return out


@pytest.mark.slow
def test_loss_and_grads_match_single_process():
    results = run_distributed(_compare, 4, LAYOUTS, timeout=900)
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
    print(
        {n: f"{max(abs(r[n]['loss'] / r[n]['ref_loss'] - 1) for r in results):.1e}" for n in seen}
    )


def _after_step(layouts: list, kind: str, distributed: bool) -> dict:
    warnings.filterwarnings("ignore")
    cfg = N.windowed_tiny()
    spec = _spec(cfg)
    ref = N.setup_run(cfg, spec=spec, optimizer=kind, lr=1e-2)
    ref.step(batch_seed=5, full_batch=True)
    ref_params = T.full_tensors(ref.shards("param"))
    out = {}
    for name, layout in layouts:
        run = N.setup_run(
            cfg, layout, spec=spec, optimizer=kind, distributed_optimizer=distributed, lr=1e-2
        )
        run.step(batch_seed=5)
        out[name] = T.max_rel_diff(run.shards("param"), ref_params)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("kind", "tol"), [("sgd", TOL), ("adam", ADAM_TOL)])
def test_params_after_optimizer_step(kind, tol):
    # Adam with megatron-core's distributed optimizer: its state sharded over DP x CP
    layouts = [lay for lay in LAYOUTS if lay[0] in ("cp2", "cp2xtp2", "cp2xpp2")]
    results = run_distributed(_after_step, 4, layouts, kind, kind == "adam", timeout=900)
    for rank_result in results:
        for name, (worst, where) in rank_result.items():
            assert worst <= tol, f"{kind} {name}: {where} differs by {worst:.2e}"
    print(kind, {n: f"{max(r[n][0] for r in results):.1e}" for n in results[0]})


def _checkpoints(directory: str) -> dict:
    """Save after one Adam step (distributed optimizer) in one layout, load in the other with
    different weights, compare the next loss and the parameters after one more step."""
    warnings.filterwarnings("ignore")
    cfg = N.windowed_tiny()
    spec = _spec(cfg)
    opt = dict(optimizer="adam", distributed_optimizer=True, lr=1e-3)
    out = {}
    for name, src_layout, dst_layout in (
        ("cp2->cp1", dict(cp=2), {}),
        ("cp1->cp2", {}, dict(cp=2)),
        ("cp4->cp2xtp2", dict(cp=4), dict(cp=2, tp=2)),
    ):
        path = f"{directory}/{name.replace('>', '')}"
        src = N.setup_run(cfg, src_layout, spec=spec, **opt)
        src.step(batch_seed=1)
        T.save_checkpoint(src.chunks, src.optimizer, path)
        want = src.step(batch_seed=2, update=False)
        src.step(batch_seed=2)
        want_params = T.full_tensors(src.shards("param"))
        dst = N.setup_run(cfg, dst_layout, spec=spec, seed=99, **opt)
        T.load_checkpoint(dst.chunks, dst.optimizer, path)
        got = dst.step(batch_seed=2, update=False)
        dst.step(batch_seed=2)
        out[name] = (got, want, T.max_rel_diff(dst.shards("param"), want_params))
    return out


@pytest.mark.slow
def test_checkpoints_load_across_cp_sizes(tmp_path):
    results = run_distributed(_checkpoints, 4, str(tmp_path), timeout=900)
    print({n: (f"{abs(g / w - 1):.1e}", f"{d[0]:.1e}") for n, (g, w, d) in results[0].items()})
    for rank_result in results:
        for name, (got, want, (worst, where)) in rank_result.items():
            # a forward pass in another layout: the gradients' 1e-5
            assert got == pytest.approx(want, rel=TOL), (name, got, want)
            assert worst <= ADAM_TOL, f"{name}: resumed Adam step: {where} differs by {worst:.2e}"


def _variants(layouts: list) -> dict:
    """Two experts per modality with the per-modality load-balancing loss (megatron-core's
    router reduces its token counts over TP x CP; its loss scale carries the same x CP as the
    language-model loss), and full recompute of the LLM layers (the K/V all-gather runs again
    in the backward)."""
    import dataclasses

    from megatron_navil.config.model import Recompute

    warnings.filterwarnings("ignore")
    base = N.windowed_tiny()
    experts = dataclasses.replace(base.experts, per_modality=2, topk=1, aux_loss_coeff=0.1)
    out = {}
    for variant, cfg, recompute in (
        ("aux", base.replace(experts=experts).validate(), None),
        ("full", base, Recompute("full", "full")),
    ):
        spec = _spec(cfg)
        ref = N.setup_run(cfg, spec=spec, recompute=recompute)
        ref_loss = ref.step(batch_seed=3, full_batch=True, update=False)
        ref_grads = T.full_tensors(ref.shards("grad"))
        for name, layout in layouts:
            run = N.setup_run(cfg, layout, spec=spec, recompute=recompute)
            loss = run.step(batch_seed=3, update=False)
            worst, where = T.max_rel_diff(run.shards("grad"), ref_grads)
            out[variant, name] = (loss, ref_loss, worst, where)
    return out


@pytest.mark.slow
def test_aux_loss_and_full_recompute_match_single_process():
    layouts = [lay for lay in LAYOUTS if lay[0] in ("cp2", "cp2xtp2")]
    results = run_distributed(_variants, 4, layouts, timeout=900)
    for rank_result in results:
        for key, (loss, ref_loss, worst, where) in rank_result.items():
            assert abs(loss - ref_loss) <= TOL * abs(ref_loss), (key, loss, ref_loss)
            assert worst <= TOL, f"{key}: {where} differs by {worst:.2e}"
    print({f"{v}-{n}": f"{max(r[v, n][2] for r in results):.1e}" for v, n in results[0]})
