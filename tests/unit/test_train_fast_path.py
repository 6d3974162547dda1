"""train.py's --transformer-impl / --attention-backend: the start line says what was picked, and
asking for a backend this machine cannot run is a one-line usage error (exit 2, no
traceback). On a CPU machine auto must pick local + sdpa (the tiny run's numbers stay
bit-identical); where a GPU with TE is present that test is skipped."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from megatron_navil.testing import synthetic_corpus as S
    from megatron_navil.testing.loader_corpus import index

    root = tmp_path_factory.mktemp("fast_path")
    written = S.write_corpus(root / "src", num_train=4, num_val=0, seed=1, max_side=64)
    return index([written["train"]], root / "shards", written["tokenizer"],
                 "--config", "tiny", "--template", "qwen3-chat")  # fmt: skip


def _dry_run(shards, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "megatron_navil.train", "--data", str(shards), "--steps", "5",
         "--warmup", "1", "--dry-run", *extra],
        capture_output=True, text=True, timeout=120, check=False,
        # one process of its own: not the port an in-process group of this pytest holds
        env={k: v for k, v in os.environ.items() if k not in ("MASTER_PORT", "MASTER_ADDR")},
    )  # fmt: skip


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="auto picks the GPU path here")
def test_start_line_names_the_picked_impl_and_backend(shards):
    proc = _dry_run(shards)
    assert proc.returncode == 0, proc.stderr
    start = json.loads(proc.stdout.strip().splitlines()[-1])
    assert start["transformer_impl"] == "local" and start["attention_backend"] == "sdpa"
    assert start["vision_parallel"] == "tp"  # one process: nothing to split


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="these may run on a GPU")
@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--transformer-impl", "te"), "--transformer-impl te: TransformerEngine needs a CUDA"),
        (("--attention-backend", "flash"), "--attention-backend flash: flash-attn's varlen"),
        (("--attention-backend", "torch"), "--attention-backend torch: the torch varlen"),
    ],
)
def test_unavailable_choice_is_a_one_line_usage_error(shards, flags, message):
    proc = _dry_run(shards, *flags)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert message in proc.stderr
