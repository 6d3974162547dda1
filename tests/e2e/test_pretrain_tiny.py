"""The README's main command, shortened: examples/pretrain_navil_tiny.sh makes the synthetic
corpus, indexes it, trains the tiny NaViL on 4 processes (TP=2 x PP=2, EP=2), stops half-way
with a checkpoint, resumes to the end, captions held-out images, exports to Hugging Face format
and captions them again through transformers."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.distributed
def test_tiny_pretraining_run(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, OUT=str(out), STEPS="16", CAPTION_LIMIT="8", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        ["bash", str(ROOT / "examples" / "pretrain_navil_tiny.sh")],
        env=env, capture_output=True, text=True, timeout=900, cwd=ROOT,
    )  # fmt: skip
    log = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0, log
    assert "== 3b. resume from the checkpoint" in proc.stdout, log
    lines = [json.loads(x) for x in (out / "logs" / "progress.txt").read_text().splitlines()]
    steps = [x for x in lines if "loss" in x]
    # held-out loss every quarter (4 steps), in both runs; it falls as the model learns
    evals = [x for x in lines if "eval_loss" in x]
    assert [e["step"] for e in evals] == [4, 8, 12, 16], evals
    assert list(evals[0]["eval_losses"]) == ["val"]
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"], evals
    # One log line per step over both runs: 1..8, then the resumed 9..16.
    assert [s["step"] for s in steps] == list(range(1, 17))
    assert all(s["skipped"] is False for s in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.5, (steps[0]["loss"], steps[-1]["loss"])
    assert sorted(p.name for p in (out / "ckpt").glob("iter_*")) == ["iter_0000008", "iter_0000016"]
    captions = json.loads((out / "captions.json").read_text())
    assert "exact" in json.dumps(captions) and "chance" in json.dumps(captions)
    assert (out / "logs" / "loss_curve.png").stat().st_size > 1000
    # The HF export captions the same held-out images identically through transformers.
    hf = json.loads((out / "captions_hf.json").read_text())
    assert hf["differ_from_megatron"] == 0 and len(hf["captions"]) == 8, proc.stdout[-2000:]
    # The corpus is indexed with one scale per image; the checkpoint's config and the HF
    # export's say so, so steps 4 and 5 prepare images as training did.
    saved = json.loads((out / "ckpt" / "iter_0000016" / "navil_config.json").read_text())
    assert saved["image"]["multi_scale"] is False, saved["image"]
    assert json.loads((out / "hf" / "config.json").read_text())["use_multi_scale"] is False
