"""training/accounting.py: every step's line says where the time went (this rank's compute,
its vision and LLM parts), the spread of compute over data-parallel ranks, and tokens/s per
modality; the timers and hooks leave nothing behind and change no number."""

from __future__ import annotations

import json
import warnings

import pytest

from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import navil_run as N

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _run(log_dir: str, slow_rank: int | None) -> dict:
    import time

    import torch

    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize
    from megatron_navil.testing import tiny_gpt as T
    from megatron_navil.training.loop import LoopConfig, train
    from megatron_navil.training.microbatch import MicroBatch
    from megatron_navil.training.optim import build_optimizer, wrap_ddp
    from megatron_navil.training.recipes import get_stage

    warnings.filterwarnings("ignore")
    cfg = get_config("tiny")
    groups = initialize(seed=11)  # DP2
    config = transformer_config(cfg)
    spec = N.BatchSpec(special_ids=N.special_ids_for(cfg))
    chunks = build_model(cfg, config, groups, special_ids=spec.special_ids)
    T.set_global_params(chunks, 7)
    chunks = wrap_ddp(chunks, config, distributed_optimizer=True)
    opt = build_optimizer(chunks, get_stage("s2"), lr=3e-3)
    visual = torch.tensor(sorted(spec.special_ids[i] for i in (2, 3, 4, 10, 11)))

    class Source(N.SyntheticSource):
        def next_step(self) -> list[MicroBatch]:
            out = super().next_step()
            for mb in out:
                mb.num_image_tokens = int(torch.isin(mb.inputs["input_ids"], visual).sum())
            return out

    if slow_rank is not None and torch.distributed.get_rank() == slow_rank:
        vision = chunks[0].module.vision_model
        vision.register_forward_hook(lambda *_: time.sleep(1.0))  # this rank's vision is slow
    loop = LoopConfig(steps=3, seq_length=spec.seq_length, log_dir=log_dir, progress_bar=False)
    losses = [r.loss for r in train(chunks, config, groups, opt, None, Source(cfg, spec), loop)]
    left = config.timers is None and not chunks[0].module.vision_model._forward_pre_hooks
    return {"losses": losses, "clean": left}


def test_step_lines_carry_the_time_breakdown(tmp_path):
    plain = run_distributed(_run, 2, str(tmp_path / "a"), None)
    slow = run_distributed(_run, 2, str(tmp_path / "b"), 1)
    assert plain[0]["losses"] == slow[0]["losses"]  # timing changes no number
    assert all(r["clean"] for r in plain + slow)  # timers uninstalled, vision hooks removed
    lines = [json.loads(x) for x in (tmp_path / "b" / "progress.txt").read_text().splitlines()]
    for line in lines:
        for key in ("compute_seconds", "vision_seconds", "llm_seconds", "dp_spread",
                    "text_tokens_per_s", "image_tokens_per_s", "images_patches_per_s"):  # fmt: skip
            assert key in line, key
        assert 0 < line["vision_seconds"] < line["compute_seconds"] <= line["step_seconds"]
        assert line["llm_seconds"] == pytest.approx(
            line["compute_seconds"] - line["vision_seconds"]
        )
        assert line["image_tokens_per_s"] > 0 and line["text_tokens_per_s"] > 0
        # rank 1's vision forward sleeps 1 s a step: the slowest rank shows (a tiny step
        # computes in well under 0.5 s even on a loaded 2-core machine)
        assert line["dp_spread"] > 1.3, line
    even = [json.loads(x) for x in (tmp_path / "a" / "progress.txt").read_text().splitlines()]
    assert all(line["dp_spread"] >= 1.0 for line in even)
