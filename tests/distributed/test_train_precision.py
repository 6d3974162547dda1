"""The train entry's bf16 path (megatron-core Float16Module, fp32 master weights, fp32 gradient
reduction) on CPU over two pipeline stages, next to the fp32 path on the same data, and a
layout that does not fit the world size as a one-line error. The same entry on a GPU (NCCL,
batches moved to the device) is exercised by scripts/gpu_checks.sh."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("corpus")
    run = dict(check=True, capture_output=True, timeout=300, cwd=ROOT)
    subprocess.run([sys.executable, "tools/make_synthetic_corpus.py", "--output", str(out),
                    "--num-train", "64", "--num-val", "4"], **run)  # fmt: skip
    subprocess.run([sys.executable, "tools/index_corpus.py", "build", "--input",
                    str(out / "train.jsonl"), "--tokenizer", str(out / "tokenizer.json"),
                    "--config", "tiny", "--template", "qwen3-chat", "--output",
                    str(out / "shards"), "--workers", "1", "--quiet"], **run)  # fmt: skip
    return out / "shards"


def _train(shards: Path, log_dir: Path, *args: str) -> subprocess.CompletedProcess:
    """2 ranks; no --config: tiny, or the config the --load/--init checkpoint carries."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
           "2", "-m", "megatron_navil.train", "--data", str(shards),
           "--seq-length", "512", "--global-batch", "4", "--lr", "2e-3", "--warmup", "1",
           "--no-progress", "--log-dir", str(log_dir), *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


def _losses(log_dir: Path) -> list[float]:
    lines = (log_dir / "progress.txt").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.fixture(scope="module")
def fp32_run(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """6 fp32 steps at PP=2 (EP=1) from the seed, saved at the end: the reference curve of the
    bf16 test, the EP=1 checkpoint of the EP-change test, and the fresh start (step 1) that
    the --init tests must differ from (layouts are equivalent to 1e-7: test_layouts)."""
    root = tmp_path_factory.mktemp("fp32")
    proc = _train(shards, root / "log", "--pp", "2", "--steps", "6", "--precision", "fp32",
                  "--save", str(root / "ckpt"))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '"precision": "fp32"' in proc.stdout
    return {"losses": _losses(root / "log"), "ckpt": root / "ckpt"}


def test_bf16_follows_fp32(shards, fp32_run, tmp_path):
    """bf16 weights/activations vs fp32 over 6 steps at PP=2: the same start (the bf16 model
    is the fp32 initialisation rounded to bf16) and a curve that stays close. Tolerance:
    bf16 keeps 8 bits of mantissa (relative rounding 2**-9 ~ 0.2% per op), so per-step
    losses agree to ~1e-2 on this tiny model; measured here: within 0.01."""
    proc = _train(shards, tmp_path, "--pp", "2", "--steps", "6", "--precision", "bf16")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert '"precision": "bf16"' in proc.stdout
    fp32, bf16 = fp32_run["losses"], _losses(tmp_path)
    assert len(fp32) == len(bf16) == 6
    assert bf16[-1] < bf16[0] - 0.3, bf16
    assert max(abs(a - b) for a, b in zip(fp32, bf16, strict=True)) < 0.05, (fp32, bf16)


def test_context_parallel_run_follows_fp32(shards, fp32_run, tmp_path):
    """--cp 2 on the 2 ranks (DP1 x CP2: each 512-token sequence split in 4 chunks) trains the
    same curve as the fp32 PP=2 run (DP1 too, so the same micro-batches): CP only reorders
    fp32 sums (test_context_parallel: gradients within 2e-6), Adam carries them along; 1e-5
    relative. The start line shows the layout really had CP (DP2 would give the same curve)."""
    proc = _train(shards, tmp_path, "--cp", "2", "--steps", "6", "--precision", "fp32")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    start = json.loads(next(line for line in proc.stdout.splitlines() if '"layout"' in line))
    assert start["layout"]["cp"] == 2 and start["layout"]["dp"] == 1, start
    fp32, cp = fp32_run["losses"], _losses(tmp_path)
    assert len(cp) == 6
    worst = max(abs(a - b) / abs(a) for a, b in zip(fp32, cp, strict=True))
    print(f"--cp 2 vs PP=2: max rel loss diff {worst:.1e}")
    assert worst <= 1e-5, (fp32, cp)


def test_layout_that_does_not_fit_is_a_one_line_error(shards, tmp_path):
    proc = _train(shards, tmp_path, "--tp", "2", "--ep", "2", "--steps", "2")
    assert proc.returncode != 0
    assert "error: world size 2 is not divisible by etp*ep*pp=4" in proc.stderr
    # torchrun prints its own ChildFailedError traceback; the ranks print none.
    assert "[rank0]: Traceback" not in proc.stderr and "ValueError" not in proc.stderr


def test_resume_across_an_expert_parallel_change(shards, fp32_run, tmp_path):
    """megatron-core 0.16.1 cannot map a MoE optimizer state saved at EP=1 onto EP=2 (one
    optimizer vs a chained pair): --load says so in one line and names --init, which starts
    from the same checkpoint's weights at EP=2."""
    save = tmp_path / "ckpt"
    shutil.copytree(fp32_run["ckpt"], save)  # --load appends to its directory
    ep2 = ("--tp", "2", "--ep", "2", "--etp", "1")
    resumed = _train(shards, tmp_path / "b", *ep2, "--steps", "8", "--load", str(save))
    assert resumed.returncode != 0  # the ranks exit 2, torchrun then 1
    assert "saved with expert parallelism = 1 and cannot be resumed" in resumed.stderr
    assert "--init" in resumed.stderr and "KeyError" not in resumed.stderr
    init = _train(shards, tmp_path / "c", *ep2, "--steps", "2", "--init", str(fp32_run["ckpt"]))
    assert init.returncode == 0, init.stderr[-3000:]
    assert "initialised the model from" in init.stdout
    # Not a fresh start: a fresh start at EP=2 with the same seed has the first loss of the
    # fp32 run (layouts are equivalent to 1e-7); the trained weights give another.
    assert abs(_losses(tmp_path / "c")[0] - fp32_run["losses"][0]) > 1e-4


def test_init_from_an_imported_hf_llm(shards, fp32_run, tmp_path):
    """The paper's start: an HF LLM (a random Qwen3 with the tiny config's widths, but 6 layers
    and another FFN: no registered config) imported by tools/convert_from_hf.py (text weights,
    visual experts copied, vision fresh), then `train --init` at another layout (TP2 x EP2)
    with no --config: the run takes the imported model's config from the checkpoint and starts
    from its weights. An explicit --config that differs is a one-line error. (Parity of the
    import itself: tests/distributed/test_hf_llm_init.py.)"""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    qwen = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=96,
                       num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                       head_dim=16, tie_word_embeddings=False, rope_theta=1e6)  # fmt: skip
    Qwen3ForCausalLM(qwen).save_pretrained(tmp_path / "qwen3")
    imported = tmp_path / "imported"
    cmd = [sys.executable, "tools/convert_from_hf.py", "llm", "--hf", str(tmp_path / "qwen3"),
           "--config", "tiny", "--tokenizer", str(shards.parent / "tokenizer.json"),
           "--output", str(imported)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    layout = ("--tp", "2", "--ep", "2", "--etp", "1", "--steps", "2")
    wrong = _train(shards, tmp_path / "wrong", *layout, "--config", "tiny", "--init", str(imported))
    assert wrong.returncode != 0
    assert "--config tiny differs from the --init checkpoint's model" in wrong.stderr
    init = _train(shards, tmp_path / "init", *layout, "--init", str(imported))
    assert init.returncode == 0, init.stderr[-3000:]
    assert f"initialised the model from {imported}" in init.stdout
    first = _losses(tmp_path / "init")[0]
    assert abs(first - fp32_run["losses"][0]) > 1e-3


def _start_line(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))


@pytest.mark.slow
def test_optimizer_kinds_resume_into_each_other_bit_exactly(shards, tmp_path):
    """bf16 at PP=2 (DP=1): a checkpoint of the plain optimizer (auto at DP=1) resumes with
    the distributed one (on) and vice versa (megatron-core's Float16 optimizer keeps its fp32
    master weights under another name than the distributed one: checkpoint.store), and the
    resumed run follows the uninterrupted one. Tolerance 1e-5 relative: the two optimizers
    sum the gradient norm (clipping, --clip-grad 1) over their tensors in another order, a
    last-bit difference in the clip factor (measured at step 4: 3e-6 in bf16, 2e-8 in fp32;
    bit-identical without clipping: test_optimizer_formats); a resume that lost Adam's
    state misses by ~1e-3 (test_optimizer_formats)."""
    common = ("--pp", "2", "--steps", "4", "--precision", "bf16")
    full = _train(shards, tmp_path / "full", *common)
    assert full.returncode == 0, full.stderr[-3000:]
    assert _start_line(full)["optimizer"] == "plain"
    ref = _losses(tmp_path / "full")
    for saved_by, resumed_by in (("on", "off"), ("off", "on")):
        ckpt, log = tmp_path / f"ckpt_{saved_by}", tmp_path / f"log_{saved_by}"
        first = _train(shards, log / "a", *common, "--exit-after", "2", "--save", str(ckpt),
                       "--use-distributed-optimizer", saved_by)  # fmt: skip
        assert first.returncode == 0, first.stderr[-3000:]
        rest = _train(shards, log / "b", *common, "--load", str(ckpt),
                      "--use-distributed-optimizer", resumed_by)  # fmt: skip
        assert rest.returncode == 0, rest.stderr[-3000:]
        kinds = {"on": "distributed", "off": "plain"}
        assert _start_line(first)["optimizer"] == kinds[saved_by]
        assert _start_line(rest)["optimizer"] == kinds[resumed_by]
        got = _losses(log / "a") + _losses(log / "b")
        assert got[:3] == ref[:3], (saved_by, got, ref)  # the same weights up to step 3
        assert abs(got[3] - ref[3]) <= 1e-5 * abs(ref[3]), (saved_by, got, ref)


@pytest.mark.slow
def test_overlapped_run_saves_and_resumes_the_same_curve(shards, tmp_path):
    """fp32 at DP=2 with overlapped grad reduce and param gather in small buckets, stopped
    and resumed after step 2: the same losses as the run without overlap (1e-6 relative:
    several buckets split gloo's reduce-scatter differently, last-bit gradient differences;
    tests/distributed/test_overlap.py). The save comes right after an optimizer step whose
    parameter all-gather overlap leaves to the next step: it must save the gathered weights
    (training.optim.sync_params), or the resumed losses would differ."""
    common = ("--steps", "4", "--precision", "fp32")
    plain = _train(shards, tmp_path / "plain", *common)
    assert plain.returncode == 0, plain.stderr[-3000:]
    assert _start_line(plain)["overlap"]["grad_reduce"] is False  # auto: off on CPU
    overlap = ("--overlap-grad-reduce", "on", "--overlap-param-gather", "on",
               "--ddp-bucket-size", "20000")  # fmt: skip
    ckpt = str(tmp_path / "ckpt")
    first = _train(shards, tmp_path / "a", *common, *overlap, "--exit-after", "2", "--save", ckpt)
    assert first.returncode == 0, first.stderr[-3000:]
    start = _start_line(first)
    assert start["optimizer"] == "distributed"
    assert start["overlap"] == dict(grad_reduce=True, param_gather=True, p2p=False,
                                    tp_comm=False, bucket_size=20000)  # fmt: skip
    rest = _train(shards, tmp_path / "b", *common, *overlap, "--load", ckpt)
    assert rest.returncode == 0, rest.stderr[-3000:]
    ref, got = _losses(tmp_path / "plain"), _losses(tmp_path / "a") + _losses(tmp_path / "b")
    assert len(got) == 4
    for a, b in zip(got, ref, strict=True):
        assert abs(a - b) <= 1e-6 * abs(b), (got, ref)


def test_tp_comm_overlap_without_transformer_engine_is_a_one_line_error(shards, tmp_path):
    proc = _train(shards, tmp_path, "--steps", "2", "--tp-comm-overlap", "--dry-run")
    assert proc.returncode != 0
    assert "error: --tp-comm-overlap needs TransformerEngine" in proc.stderr
    assert "[rank0]: Traceback" not in proc.stderr
