"""python -m megatron_navil.train on a corpus whose tokenizer is larger than the config's
vocabulary: a registered config (tiny, 512 rows) takes the tokenizer's size padded to a
multiple of --make-vocab-size-divisible-by x TP, says so in one line and trains; its
checkpoint records the padded size and resumes with --config tiny; weights from a checkpoint
that is too small (--init) are a one-line error (exit 2)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # runs train.py in a subprocess

ROOT = Path(__file__).resolve().parents[2]


def _train(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "megatron_navil.train", "--seq-length", "256",
           "--global-batch", "2", "--warmup", "1", "--no-progress", *args]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The synthetic corpus indexed twice: with its own 512-id tokenizer and with one of
    ~700 ids (extra words give BPE merges enough to reach it)."""
    from megatron_navil.testing import synthetic_corpus as S
    from megatron_navil.testing.loader_corpus import index

    root = tmp_path_factory.mktemp("vocab")
    written = S.write_corpus(root / "src", num_train=6, num_val=0, seed=3, max_side=64)
    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))
             for _ in range(3000)]  # fmt: skip
    texts = [" ".join(words[i : i + 10]) for i in range(0, len(words), 10)]
    big = S.train_tokenizer(texts, root / "big.json", vocab_size=700)
    out = {}
    for name, tok in (("small", written["tokenizer"]), ("big", big)):
        out[name] = index([written["train"]], root / name, tok, "--config", "tiny",
                          "--template", "qwen3-chat", "--no-multi-scale")  # fmt: skip
    manifest = json.loads((out["big"] / "manifest.json").read_text())
    assert 600 < manifest["tokenizer"]["vocab_size"] <= 700, manifest["tokenizer"]
    out["big_size"] = manifest["tokenizer"]["vocab_size"]
    return out


def test_tiny_takes_the_padded_tokenizer_vocab(corpora, tmp_path):
    size = corpora["big_size"]
    proc = _train("--config", "tiny", "--data", str(corpora["big"]), "--steps", "2",
                  "--save", str(tmp_path / "ckpt"))  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    notes = [line for line in proc.stdout.splitlines() if line.startswith("vocab ")]
    assert notes == [
        f"vocab 512 -> 768: the corpus tokenizer needs {size} ids > tiny's 512; padded to a "
        "multiple of 128 (--make-vocab-size-divisible-by 128 x TP 1)"
    ], proc.stdout
    assert "done: 2 steps" in proc.stdout
    saved = json.loads((tmp_path / "ckpt" / "iter_0000002" / "navil_config.json").read_text())
    assert saved["language"]["vocab"] == 768
    # resuming with the registered name adopts the checkpoint's padded vocabulary (no note)
    proc = _train("--config", "tiny", "--data", str(corpora["big"]), "--steps", "3",
                  "--load", str(tmp_path / "ckpt"), "--dry-run")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [line for line in proc.stdout.splitlines() if line.startswith("vocab ")]
    # another multiple: 64 -> 704 (the tokenizer's size rounded up to 64)
    proc = _train("--config", "tiny", "--data", str(corpora["big"]), "--steps", "2",
                  "--make-vocab-size-divisible-by", "64", "--dry-run")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"vocab 512 -> {-(-size // 64) * 64}:" in proc.stdout


def test_a_fitting_tokenizer_keeps_the_vocab(corpora):
    """The flag pads only a vocabulary that is too small: tiny's 512 holds the 512-id
    tokenizer and stays (no line), whatever the multiple."""
    proc = _train("--config", "tiny", "--data", str(corpora["small"]), "--steps", "2",
                  "--make-vocab-size-divisible-by", "384", "--dry-run")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not [line for line in proc.stdout.splitlines() if line.startswith("vocab ")]


def test_init_from_a_too_small_checkpoint_is_one_line(corpora, tmp_path):
    proc = _train("--data", str(corpora["small"]), "--steps", "2", "--save", str(tmp_path / "c"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    proc = _train("--data", str(corpora["big"]), "--steps", "2", "--init", str(tmp_path / "c"))
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if "error:" in line]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert f"needs {corpora['big_size']} vocabulary rows" in err[0]
    assert "has 512: re-import it with a padded vocabulary" in err[0]
