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
