"""training/loop.py: a run stopped after a checkpoint and resumed in a fresh process group
continues bit-exactly like an uninterrupted run; logs (progress.txt, TensorBoard, loss PNG)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import navil_run as N

pytestmark = pytest.mark.distributed
LAYOUT = dict(tp=2, pp=2)


def _run(save_dir: str, log_dir: str, steps: int, load: bool, non_repeating: bool) -> list:
    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize
    from megatron_navil.testing import tiny_gpt as T
    from megatron_navil.training.loop import LoopConfig, train
    from megatron_navil.training.optim import build_optimizer, build_scheduler, wrap_ddp
    from megatron_navil.training.recipes import get_stage

    warnings.filterwarnings("ignore")
    cfg = get_config("tiny")
    groups = initialize(**LAYOUT, seed=11)
    config = transformer_config(cfg, **LAYOUT)
    spec = N.BatchSpec(special_ids=N.special_ids_for(cfg))
    chunks = build_model(cfg, config, groups, special_ids=spec.special_ids)
    T.set_global_params(chunks, 7)
    chunks = wrap_ddp(chunks, config, distributed_optimizer=True)
    recipe = get_stage("s2")
    opt = build_optimizer(chunks, recipe, lr=3e-3)
    sched = build_scheduler(opt, recipe, 6, lr=3e-3, warmup_steps=2)
    source = N.SyntheticSource(cfg, spec, seed=3, repeat=not non_repeating)
    loop = LoopConfig(
        steps=steps, seq_length=spec.seq_length, save_dir=save_dir, save_interval=2,
        load_dir=save_dir if load else None, log_dir=log_dir, progress_bar=False,
    )  # fmt: skip
    return [r.loss for r in train(chunks, config, groups, opt, sched, source, loop)]


def test_resume_continues_bit_exactly(tmp_path):
    full = run_distributed(_run, 4, str(tmp_path / "a"), str(tmp_path / "log_a"), 6, False, True)
    first = run_distributed(_run, 4, str(tmp_path / "b"), str(tmp_path / "log_b"), 3, False, True)
    rest = run_distributed(_run, 4, str(tmp_path / "b"), str(tmp_path / "log_b"), 6, True, True)
    assert first[0] == full[0][:3]
    # The stop at step 3 saved iter_3 (the end of that run); the resume continues from it.
    assert rest[0] == full[0][3:], (rest[0], full[0])
    lines = (tmp_path / "log_a" / "progress.txt").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2, 3, 4, 5, 6]
    assert json.loads(lines[0])["loss"] == pytest.approx(full[0][0])
    assert (tmp_path / "log_a" / "loss_curve.png").stat().st_size > 1000
    # the resumed run's curve is the whole run's (progress.txt of both runs), not steps 4-6
    from megatron_navil.training.loop import loss_history

    whole = loss_history(tmp_path / "log_b" / "progress.txt")
    assert [s for s, _ in whole] == [1, 2, 3, 4, 5, 6]
    assert [v for _, v in whole] == pytest.approx(full[0])
    assert any(p.name.startswith("events.out.tfevents") for p in (tmp_path / "log_a").iterdir())
    assert sorted(p.name for p in Path(tmp_path / "a").glob("iter_*")) == [
        "iter_0000004",
        "iter_0000006",
    ]
