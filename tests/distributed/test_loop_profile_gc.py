"""training/loop.py with ``profile_steps`` (training/profiling.py) and ``manual_gc_interval``
(training/manual_gc.py): the trace covers exactly the asked steps and holds the named ranges;
automatic GC is off in the loop and collections happen at the interval and before saves; the
losses are bit-identical to a run without either."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import navil_run as N

pytestmark = pytest.mark.distributed
STEPS = 4


def _train(root: Path, profile: tuple[int, int] | None, gc_interval: int) -> dict:
    import gc
    import types

    from megatron.core.utils import get_model_config

    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize
    from megatron_navil.testing import tiny_gpt as T
    from megatron_navil.training import manual_gc
    from megatron_navil.training.loop import LoopConfig, train
    from megatron_navil.training.optim import build_optimizer, build_scheduler, wrap_ddp
    from megatron_navil.training.recipes import get_stage

    cfg = get_config("tiny")
    groups = initialize(seed=11)
    config = transformer_config(cfg)
    spec = N.BatchSpec(special_ids=N.special_ids_for(cfg))
    chunks = build_model(cfg, config, groups, special_ids=spec.special_ids)
    T.set_global_params(chunks, 7)
    chunks = wrap_ddp(chunks, config, distributed_optimizer=True)
    recipe = get_stage("s2")
    opt = build_optimizer(chunks, recipe, lr=3e-3)
    sched = build_scheduler(opt, recipe, STEPS, lr=3e-3, warmup_steps=1)
    source = N.SyntheticSource(cfg, spec, seed=3, repeat=False)

    fetched, enabled_in_loop, collects = [0], [], []
    next_step = source.next_step

    def counting_next_step() -> list:
        fetched[0] += 1
        enabled_in_loop.append(gc.isenabled())
        return next_step()

    source.next_step = counting_next_step
    # manual_gc's view of the gc module: the real one, its collections recorded with the
    # number of steps fetched so far
    manual_gc.gc = types.SimpleNamespace(
        isenabled=gc.isenabled, enable=gc.enable, disable=gc.disable,
        collect=lambda: (collects.append(fetched[0]), gc.collect())[1],
    )  # fmt: skip
    try:
        loop = LoopConfig(
            steps=STEPS, seq_length=spec.seq_length, save_dir=str(root / "ckpt"),
            save_interval=2, log_dir=str(root / "log"), progress_bar=False,
            profile_steps=profile, manual_gc_interval=gc_interval,
        )  # fmt: skip
        losses = [r.loss for r in train(chunks, config, groups, opt, sched, source, loop)]
    finally:
        manual_gc.gc = gc
    vision = [m for c in chunks for n, m in c.named_modules() if n.endswith("vision_model")]
    return dict(
        losses=losses, collects=collects, enabled_in_loop=enabled_in_loop,
        enabled_after=gc.isenabled(), timers_after=get_model_config(chunks[0]).timers,
        hooks_after=sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in vision),
        vision_modules=len(vision),
    )  # fmt: skip


def _scenario(root: str) -> dict:
    warnings.filterwarnings("ignore")
    plain = _train(Path(root) / "plain", None, 0)
    tuned = _train(Path(root) / "tuned", (2, 3), 2)
    return dict(plain=plain, tuned=tuned)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("profile_gc")
    return {**run_distributed(_scenario, 1, str(root), timeout=600)[0], "root": root}


def test_losses_unchanged(runs):
    assert runs["tuned"]["losses"] == runs["plain"]["losses"]  # bit-identical
    assert len(runs["plain"]["losses"]) == STEPS


def test_manual_gc_is_wired(runs):
    plain, tuned = runs["plain"], runs["tuned"]
    assert plain["collects"] == [] and all(plain["enabled_in_loop"])
    assert not any(tuned["enabled_in_loop"]) and tuned["enabled_after"]
    # on entry; before the step-2 save and after step 2; after step 4 and before the last save
    assert tuned["collects"] == [0, 2, 2, 4, 4]


def test_profile_trace_holds_the_asked_steps_and_ranges(runs):
    profile = runs["root"] / "tuned" / "log" / "profile"
    assert sorted(p.name for p in profile.iterdir()) == ["rank0.steps2-3.pt.trace.json"]
    trace = json.loads((profile / "rank0.steps2-3.pt.trace.json").read_text())
    names = [e.get("name") for e in trace["traceEvents"]]
    assert sorted(n for n in set(names) if n.startswith("step ")) == ["step 2", "step 3"]
    assert names.count("data") == 2  # one per profiled step, none of the others
    for wanted in ("vision", "forward-compute", "backward-compute", "forward-backward",
                   "optimizer", "checkpoint", "optimizer-inner-step"):  # fmt: skip
        assert wanted in names, wanted
    # The ranges are taken down after the window: megatron-core's timers and the hooks.
    tuned = runs["tuned"]
    assert tuned["timers_after"] is None and tuned["vision_modules"] == 1
    assert tuned["hooks_after"] == 0
    assert not (runs["root"] / "plain" / "log" / "profile").exists()
