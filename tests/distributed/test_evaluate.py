"""training/evaluate.py: the held-out loss is the training objective on held-out batches, the
same in every layout, leaves training untouched, and is the same after a resume."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import navil_run as N

pytestmark = pytest.mark.distributed


def _setup(layout: dict, steps: int = 4):
    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize
    from megatron_navil.testing import tiny_gpt as T
    from megatron_navil.training.optim import build_optimizer, build_scheduler, wrap_ddp
    from megatron_navil.training.recipes import get_stage

    warnings.filterwarnings("ignore")
    cfg = get_config("tiny")
    groups = initialize(**layout, seed=11)
    config = transformer_config(cfg, **layout)
    spec = N.BatchSpec(special_ids=N.special_ids_for(cfg))
    chunks = build_model(cfg, config, groups, special_ids=spec.special_ids)
    T.set_global_params(chunks, 7)
    chunks = wrap_ddp(chunks, config, distributed_optimizer=True)
    recipe = get_stage("s2")
    opt = build_optimizer(chunks, recipe, lr=3e-3)
    sched = build_scheduler(opt, recipe, steps, lr=3e-3, warmup_steps=1)
    return cfg, spec, chunks, config, groups, opt, sched


def _eval_sets(cfg, spec):
    from megatron_navil.training.evaluate import EvalSet

    return [
        EvalSet("a", N.SyntheticSource(cfg, spec, seed=50, repeat=False)),
        EvalSet("b", N.SyntheticSource(cfg, spec, seed=90, repeat=False)),
    ]


def _layouts(layouts: list) -> dict:
    from megatron_navil.training.evaluate import evaluate
    from megatron_navil.training.step import train_step

    out = {}
    for name, layout in layouts:
        cfg, spec, chunks, config, groups, opt, sched = _setup(layout)
        sets = _eval_sets(cfg, spec)
        before = [p.detach().clone() for c in chunks for p in c.parameters()]
        first = evaluate(chunks, config, groups, sets, 2, spec.seq_length)
        again = evaluate(chunks, config, groups, sets, 2, spec.seq_length)
        after = [p.detach() for c in chunks for p in c.parameters()]
        one = evaluate(chunks, config, groups, sets[:1], 1, spec.seq_length)
        # the training objective on set a's first batch, before the update
        sets[0].rewind()
        trained = train_step(chunks, config, groups, opt, sched, sets[0].source.next_step(),
                             spec.seq_length).loss  # fmt: skip
        out[name] = {
            "first": (first.loss, first.losses, first.loss_tokens),
            "repeat_equal": (first.loss, first.losses) == (again.loss, again.losses),
            "unchanged": all(torch.equal(a, b) for a, b in zip(before, after, strict=True)),
            "one": one.loss,
            "trained": trained,
        }
    return out


def test_held_out_loss_equal_across_layouts_and_is_the_objective():
    layouts = [
        ("dp4", {}),
        ("tp2xpp2", dict(tp=2, pp=2)),
        ("pp2xvpp2", dict(pp=2, vpp=2)),
        ("ep2", dict(ep=2)),
        ("cp2", dict(cp=2)),  # and DP2
        ("cp2xpp2", dict(cp=2, pp=2)),
    ]
    got = run_distributed(_layouts, 4, layouts, timeout=900)[0]
    ref_loss, ref_losses, ref_tokens = got["dp4"]["first"]
    assert set(ref_losses) == {"a", "b"} and ref_losses["a"] != ref_losses["b"]
    assert min(ref_losses.values()) < ref_loss < max(ref_losses.values())
    for name, r in got.items():
        loss, losses, tokens = r["first"]
        assert r["repeat_equal"] and r["unchanged"], (name, r)
        assert tokens == ref_tokens, (name, tokens, ref_tokens)
        # fp32 forward, float64 sums; layouts reorder the sums (the training curves' 1e-6)
        for k in ("a", "b"):
            assert abs(losses[k] - ref_losses[k]) <= 1e-6 * ref_losses[k], (name, k, losses)
        assert abs(loss - ref_loss) <= 1e-6 * ref_loss, (name, loss, ref_loss)
        # one global batch of set a == the training step's reported loss on that batch
        assert abs(r["one"] - r["trained"]) <= 1e-6 * r["trained"], (name, r)


def _loop(save: str, log: str, with_eval: bool, exit_after: int | None, load: bool) -> list:
    from megatron_navil.training.loop import LoopConfig, train

    cfg, spec, chunks, config, groups, opt, sched = _setup(dict(tp=2, pp=2), steps=4)
    source = N.SyntheticSource(cfg, spec, seed=3, repeat=False)
    loop = LoopConfig(
        steps=4, exit_after=exit_after, seq_length=spec.seq_length, save_dir=save,
        load_dir=save if load else None, log_dir=log, progress_bar=False,
        eval_sets=_eval_sets(cfg, spec) if with_eval else [], eval_interval=2, eval_iters=1,
    )  # fmt: skip
    return [r.loss for r in train(chunks, config, groups, opt, sched, source, loop)]


def _evals(log) -> dict:
    lines = [json.loads(x) for x in (log / "progress.txt").read_text().splitlines()]
    return {e["step"]: e["eval_losses"] for e in lines if "eval_loss" in e}


def test_evaluation_leaves_training_alone_and_resumes_exactly(tmp_path):
    plain = run_distributed(_loop, 4, str(tmp_path / "p"), str(tmp_path / "lp"), False, None,
                            False)[0]  # fmt: skip
    full = run_distributed(_loop, 4, str(tmp_path / "f"), str(tmp_path / "lf"), True, None,
                           False)[0]  # fmt: skip
    assert full == plain  # bit-identical: evaluation changes nothing training uses
    evals = _evals(tmp_path / "lf")
    assert sorted(evals) == [2, 4] and evals[2] != evals[4]
    # stop after step 3 (the interval's step 2 evaluated), resume to 4: step 4's evaluation
    # is the uninterrupted run's, bit for bit
    run_distributed(_loop, 4, str(tmp_path / "r"), str(tmp_path / "lr"), True, 3, False)
    rest = run_distributed(_loop, 4, str(tmp_path / "r"), str(tmp_path / "lr"), True, None,
                           True)[0]  # fmt: skip
    assert rest == full[3:]
    assert _evals(tmp_path / "lr") == evals
    # the loss curve carries the held-out points; the training curve ignores their lines
    from megatron_navil.training.loop import loss_history

    assert [s for s, _ in loss_history(tmp_path / "lf" / "progress.txt")] == [1, 2, 3, 4]
    held = loss_history(tmp_path / "lf" / "progress.txt", key="eval_loss")
    assert [s for s, _ in held] == [2, 4]
