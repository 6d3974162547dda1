"""examples/finetune_from_hf_llm.sh, shortened: an HF LLM with a tokenizer that is not the tiny
one -> index with it -> import (vocabulary padded for the NaViL tokens) -> stage S1.1 -> stage
S2 from the S1.1 checkpoint (--init) -> captions -> HF export -> captions through
transformers, equal. Twice: at the defaults (the tiny random Qwen3 and the synthetic corpus
the script writes; 4 processes, TP=2 x PP=2, EP=2), and as a user runs it on their own LLM
directory (a Llama with a BOS before every text) and JSONL files given by HF_LLM / DATA / VAL,
at another layout (2 processes, PP=2)."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from megatron_navil.config.tokens import SPECIAL_TOKENS

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "examples" / "finetune_from_hf_llm.sh"
PHASES = ("1. data", "2. LLM", "3. index", "4. import", "5. stage S1.1", "6. stage S2",
          "7. caption", "8. export")  # fmt: skip


def _run(env: dict[str, str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=900, cwd=ROOT)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for phase in PHASES:
        assert f"== {phase}" in proc.stdout, (phase, proc.stdout[-3000:])
    assert "total wall time: " in proc.stdout
    return proc


def _steps(log_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (log_dir / "progress.txt").read_text().splitlines()]


def _check_run(out: Path, proc, llm: Path, s11: int, s2: int, captions: int) -> None:
    """Every phase's outputs: shards with the LLM's tokenizer, the padded import, both stages'
    checkpoints (S2 started from S1.1's), captions, the HF export and its equal captions."""
    manifest = json.loads((out / "shards" / "train" / "manifest.json").read_text())
    ids = manifest["tokenizer"]["special_ids"]
    # the 12 NaViL tokens appended after the LLM's 1000 ids
    assert [ids[t] for t in SPECIAL_TOKENS] == list(range(1000, 1012))
    assert json.loads((llm / "config.json").read_text())["vocab_size"] == 1000
    init = json.loads((out / "init" / "iter_0000000" / "navil_config.json").read_text())
    assert init["language"]["vocab"] == 1024
    assert "vocab 1000 -> 1024 (12 NaViL tokens at 1000..1011" in proc.stdout
    s11_ckpt = out / "ckpt_s1.1" / f"iter_{s11:07d}"
    s2_ckpt = out / "ckpt_s2" / f"iter_{s2:07d}"
    for ckpt in (s11_ckpt, s2_ckpt):
        assert json.loads((ckpt / "navil_config.json").read_text())["language"]["vocab"] == 1024
    assert json.loads((s11_ckpt / "train_state.json").read_text())["stage"] == "s1.1"
    assert json.loads((s2_ckpt / "train_state.json").read_text())["stage"] == "s2"
    assert f"initialised the model from {out}/ckpt_s1.1/iter_{s11:07d}" in proc.stdout
    first, second = _steps(out / "logs_s1.1"), _steps(out / "logs_s2")
    assert [s["step"] for s in first] == list(range(1, s11 + 1))
    assert [s["step"] for s in second] == list(range(1, s2 + 1))
    # S2 starts where S1.1 ended, not from the import (whose first loss is S1.1's first)
    assert second[0]["loss"] < first[0]["loss"] - 0.05, (first[0], second[0])
    megatron = json.loads((out / "captions.json").read_text())
    assert len(megatron["captions"]) == captions
    config = json.loads((out / "hf" / "config.json").read_text())
    assert config["llm_config"]["vocab_size"] == 1024
    assert config["special_token_ids"] == list(range(1000, 1012))
    hf = json.loads((out / "captions_hf.json").read_text())
    assert hf["differ_from_megatron"] == 0 and len(hf["captions"]) == captions


@pytest.mark.distributed
def test_finetune_at_the_defaults(tmp_path):
    out = tmp_path / "run"
    proc = _run(dict(OUT=str(out), S11_STEPS="4", S2_STEPS="6", CAPTION_LIMIT="6"))
    _check_run(out, proc, out / "llm", 4, 6, 6)
    assert json.loads((out / "llm" / "config.json").read_text())["model_type"] == "qwen3"


@pytest.mark.distributed
def test_finetune_your_llm_and_jsonl(tmp_path):
    from megatron_navil.testing.synthetic_corpus import write_corpus
    from megatron_navil.testing.tiny_hf_llm import jsonl_texts, write_tiny_llm

    data, llm = tmp_path / "mydata", tmp_path / "my-llama"
    write_corpus(data, num_train=120, num_val=4, min_side=96, max_side=128)
    write_tiny_llm(llm, "llama", 1000, jsonl_texts(data / "train.jsonl"))
    out = tmp_path / "run"
    env = dict(OUT=str(out), HF_LLM=str(llm), DATA=str(data / "train.jsonl"),
               VAL=str(data / "val.jsonl"), NPROC="2", TP="1", PP="2", EP="1",
               S11_STEPS="3", S2_STEPS="3", CAPTION_LIMIT="4")  # fmt: skip
    proc = _run(env)
    assert f"LLM: {llm}; tokenizer: {llm}/tokenizer.json" in proc.stdout
    assert not (out / "llm").exists() and not (out / "data").exists()
    _check_run(out, proc, llm, 3, 3, 4)
    # Llama's BOS (its id 998) starts every indexed sample
    from megatron_navil.data import ShardDataset

    shards = ShardDataset(out / "shards" / "val")
    assert all(int(shards.sample(i).tokens[0]) == 998 for i in range(len(shards)))
