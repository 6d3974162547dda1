"""Checkpoints of the partly frozen stages (S1.1, S1.2) with the distributed optimizer: they
save, and a resumed run continues bit-exactly. Two layouts that could not save before:

* EP=2: the rank holding the text expert (frozen) has an empty expert optimizer, and it is
  rank 0, whose common state (Adam's step) the checkpoint keeps (cpu_shim ``distopt_empty``);
* TP=2 (EP=1): the stacked experts' optimizer state covers only the visual experts, so it is
  saved as a stack of the trainable experts (``checkpoint/store.py: optimizer_template``),
  which also loads at another layout."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import navil_run as N

pytestmark = pytest.mark.distributed

ADAM = dict(optimizer="adam", distributed_optimizer=True, lr=1e-3)


def _scenario(root: str, stage: str) -> dict:
    from torch.distributed.checkpoint import FileSystemReader

    from megatron_navil.checkpoint.directory import latest
    from megatron_navil.checkpoint.store import load, save
    from megatron_navil.config.registry import get_config

    warnings.filterwarnings("ignore")
    cfg = get_config("tiny")
    out = {}
    for name, layout in (("ep2", dict(ep=2)), ("tp2", dict(tp=2))):
        path = Path(root) / name
        run = N.setup_run(cfg, layout, stage=stage, **ADAM)
        for s in range(2):
            run.step(batch_seed=s)
        save(path, 2, run.chunks, run.optimizer, {})
        uninterrupted = [run.step(batch_seed=s) for s in (2, 3, 4)]
        resumed = N.setup_run(cfg, layout, stage=stage, seed=11, **ADAM)
        load(latest(path), resumed.chunks, resumed.optimizer)
        again = [resumed.step(batch_seed=s) for s in (2, 3, 4)]
        optimizers = getattr(resumed.optimizer, "chained_optimizers", [resumed.optimizer])
        steps = {float(st["step"]) for o in optimizers for st in o.optimizer.state.values()}
        out[name] = dict(uninterrupted=uninterrupted, again=again, steps=steps)
    # the EP=1 checkpoint at another layout (DP=2): the first loss after loading
    other = N.setup_run(cfg, dict(), stage=stage, seed=11, **ADAM)
    load(latest(Path(root) / "tp2"), other.chunks, other.optimizer)
    out["other"] = other.step(batch_seed=2, update=False)
    for name in ("ep2", "tp2"):
        saved = FileSystemReader(str(Path(root) / name / "iter_0000002")).read_metadata()
        out[name]["shapes"] = {
            k: tuple(v.size)
            for k, v in saved.state_dict_metadata.items()
            if "layers.0.mlp.experts.experts.linear_fc" in k and k.endswith("weight")
        }
    return out


@pytest.mark.parametrize("stage", ["s1.1", "s1.2"])
def test_partly_frozen_stage_saves_and_resumes_exactly(stage, tmp_path):
    r = run_distributed(_scenario, 2, str(tmp_path), stage, timeout=600)[0]
    for name in ("ep2", "tp2"):
        assert r[name]["again"] == r[name]["uninterrupted"], name
        # 2 steps before the save, 3 after (the last step's update included)
        assert r[name]["steps"] == {5.0}, (name, r[name]["steps"])
    first = r["tp2"]["uninterrupted"][0]
    assert abs(r["other"] - first) <= 1e-5 * abs(first), (r["other"], first)
    # the model stacks both experts; the optimizer state stacks the visual expert alone
    # (EP=2: in the expert optimizer, "chained_1.")
    for name, prefix in (("ep2", "chained_1."), ("tp2", "")):
        shapes = r[name]["shapes"]
        for fc, shape in (("linear_fc1", (256, 64)), ("linear_fc2", (64, 128))):
            key = f"layers.0.mlp.experts.experts.{fc}.weight"
            assert shapes[key] == (2, *shape), (name, sorted(shapes))
            for state in ("exp_avg", "exp_avg_sq", "param"):
                got = shapes.get(f"{prefix}optimizer.state.{state}.{key}")
                assert got == (1, *shape), (name, sorted(shapes))
