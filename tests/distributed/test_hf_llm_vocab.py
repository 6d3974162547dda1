"""An LLM import whose vocabulary is full (tools/convert_from_hf.py llm): a tiny random
``LlamaForCausalLM`` with 512 of 512 ids used and a ``tokenizer.json`` of exactly those 512
ids, without the NaViL tokens, so the tokenizer appends them (and the 4 template control
tokens) at 512..527. Imported at TP=2, NaViL's vocabulary is 528 padded to a multiple of
128 x 2 = 768; the log says so in one line; every special id is inside it; embedding and LM-head
rows 0..511 are the LLM's and rows 512..767 the mean of its rows; tools/caption.py captions
with it and tools/convert_to_hf.py exports it with ``vocab_size`` 768."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("from_hf", ROOT / "tools" / "convert_from_hf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "tools" / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)


def _full_tokenizer(path: Path, size: int) -> None:
    """A byte-level BPE of exactly ``size`` ids, none of them a NaViL or template token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    words = ["".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(3, 8)))
             for _ in range(2000)]  # fmt: skip
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=size, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator([" ".join(words[i : i + 8]) for i in range(0, 2000, 8)], trainer)
    assert tok.get_vocab_size(with_added_tokens=True) == size
    path.write_text(tok.to_str())


def test_full_llm_vocab_is_padded(tmp_path, capsys):
    from PIL import Image
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_navil.config.tokens import SPECIAL_TOKENS
    from megatron_navil.conversion.dist_reader import DistCheckpointReader
    from megatron_navil.data.tokenizer import TextTokenizer

    torch.manual_seed(0)
    llm = LlamaForCausalLM(LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        max_position_embeddings=256, rope_theta=1e6, tie_word_embeddings=False,
    ))  # fmt: skip
    with torch.no_grad():  # rows whose mean is not ~0, so "the mean" is checkable
        llm.model.embed_tokens.weight.add_(0.5)
        llm.lm_head.weight.sub_(0.25)
    llm.save_pretrained(str(tmp_path / "llm"))
    tok_path = tmp_path / "tokenizer.json"
    _full_tokenizer(tok_path, 512)
    tok = TextTokenizer(tok_path)
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(512, 524))
    assert tok.vocab_size == 528  # + <|im_start|> <|im_end|> <think> </think>

    capsys.readouterr()
    out = tmp_path / "navil"
    argv = ["llm", "--hf", str(tmp_path / "llm"), "--config", "tiny", "--tokenizer",
            str(tok_path), "--output", str(out), "--tp", "2"]  # fmt: skip
    assert _tool().main(argv) == 0, capsys.readouterr().err
    log = capsys.readouterr().out
    line = [x for x in log.splitlines() if x.startswith("vocab ")]
    assert line == [
        "vocab 512 -> 768 (12 NaViL tokens at 512..523 were outside the LLM's vocabulary; "
        "the tokenizer has 528 ids; 256 new rows initialised to the mean embedding)"
    ], log
    ckpt = out / "iter_0000000"
    config = json.loads((ckpt / "navil_config.json").read_text())
    assert config["language"]["vocab"] == 768
    reader = DistCheckpointReader(ckpt)
    for key, src in (("embedding.weight", llm.model.embed_tokens.weight),
                     ("output_layer.weight", llm.lm_head.weight)):  # fmt: skip
        got = reader.read(key)
        assert got.shape == (768, 64), key
        assert torch.equal(got[:512], src.detach()), key
        mean = src.detach().mean(0)
        assert torch.allclose(got[512:], mean.expand(256, -1), atol=1e-6, rtol=0), key

    image = tmp_path / "a.png"
    Image.new("RGB", (96, 64), (200, 30, 30)).save(image)
    caption = _cli("caption.py", "--checkpoint", str(out), "--images", str(image),
                   "--tokenizer", str(tok_path), "--template", "qwen3-chat",
                   "--max-new-tokens", "3", "--quiet")  # fmt: skip
    assert caption.returncode == 0, caption.stderr[-2000:]

    export = _cli("convert_to_hf.py", "--checkpoint", str(out), "--tokenizer", str(tok_path),
                  "--output", str(tmp_path / "hf"), "--dtype", "float32", "--quiet")  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    hf_config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert hf_config["llm_config"]["vocab_size"] == 768
    assert hf_config["special_token_ids"] == list(range(512, 524))
    name = "language_model.model.embed_tokens.weight"
    shapes = {}
    for file in (tmp_path / "hf").glob("*.safetensors"):
        with safe_open(str(file), "pt") as f:
            shapes |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert shapes[name] == (768, 64)
    assert shapes["language_model.lm_head.weight"] == (768, 64)
