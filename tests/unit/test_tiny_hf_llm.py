"""The tiny random HF LLM of examples/finetune_from_hf_llm.sh (tools/make_tiny_hf_llm.py), and
tokenizers given as an HF model directory (``data/tokenizer.py: tokenizer_file``).

The tokenizer is a byte-level BPE of exactly the LLM's ``vocab_size`` ids, its family's added
tokens last, none of NaViL's: so TextTokenizer appends the 12 NaViL tokens after the LLM's
vocabulary and an import must pad it. transformers' AutoTokenizer on the directory and
TextTokenizer give the same ids (Llama's BOS before every text included)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from megatron_navil.config.tokens import SPECIAL_TOKENS
from megatron_navil.data.tokenizer import TextTokenizer, TokenizerError, tokenizer_file

ROOT = Path(__file__).resolve().parents[2]
# the tests that write HF models pay transformers' import (~5 s) and the writes: slow lane
# (docs/testing.md); the directory rule alone is fast
SLOW = pytest.mark.slow
TEXTS = ["Describe the image.", "two red squares on the left on a white background."]


@pytest.fixture(scope="module")
def llms(tmp_path_factory) -> dict[str, Path]:
    from megatron_navil.testing.tiny_hf_llm import write_tiny_llm

    root = tmp_path_factory.mktemp("llms")
    return {arch: write_tiny_llm(root / arch, arch, 600, TEXTS) for arch in ("qwen3", "llama")}


@SLOW
@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_tokenizer_fills_the_llm_vocabulary_without_navil_tokens(llms, arch):
    from transformers import AutoTokenizer

    from megatron_navil.testing.tiny_hf_llm import FAMILY_TOKENS

    d = llms[arch]
    config = json.loads((d / "config.json").read_text())
    assert config["vocab_size"] == 600 and config["model_type"] == arch
    raw = json.loads((d / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in raw["added_tokens"]}
    family = FAMILY_TOKENS[arch]
    assert added == {t: 600 - len(family) + i for i, t in enumerate(family)}
    tok = TextTokenizer(d)  # the directory: its tokenizer.json
    assert tok.path == d / "tokenizer.json"
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(600, 612))
    # the texts' words are single tokens; a BOS before every text for Llama only
    text = TEXTS[1]
    ids = tok.encode_text(text)
    assert len(ids) <= len(text.split()) + 1
    assert tok.prefix_ids == ((600 - 2,) if arch == "llama" else ())
    hf = AutoTokenizer.from_pretrained(str(d))
    assert hf(text).input_ids == [*tok.prefix_ids, *ids]


def test_tokenizer_file_of_a_directory(tmp_path):
    assert tokenizer_file(tmp_path / "x.json") == tmp_path / "x.json"
    (tmp_path / "tokenizer.model").write_bytes(b"\x0a")
    assert tokenizer_file(tmp_path) == tmp_path / "tokenizer.model"
    (tmp_path / "tokenizer.json").write_text("{}")
    assert tokenizer_file(tmp_path) == tmp_path / "tokenizer.json"
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match=r"without a tokenizer\.json or tokenizer\.model"):
        TextTokenizer(tmp_path / "empty")


@SLOW
def test_llm_import_takes_the_llm_directory_as_tokenizer(llms, capsys):
    """convert_from_hf.py llm --tokenizer DIR (its help says a directory works): the vocabulary
    plan of the LLM's own tokenizer, before any rank starts."""
    spec = importlib.util.spec_from_file_location("from_hf", ROOT / "tools" / "convert_from_hf.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    d = llms["qwen3"]
    argv = ["llm", "--hf", str(d), "--config", "tiny", "--tokenizer", str(d), "--output",
            str(d.parent / "out"), "--tp", "2"]  # fmt: skip
    import_spec = tool._resolve(tool.build_parser().parse_args(argv))
    assert list(import_spec.special_token_ids) == list(range(600, 612))
    assert import_spec.cfg["language"]["vocab"] == 768  # 612 ids padded to a multiple of 256
    out = capsys.readouterr().out
    assert "vocab 600 -> 768 (12 NaViL tokens at 600..611 were outside" in out


@SLOW
def test_make_tiny_hf_llm_cli(tmp_path):
    spec = importlib.util.spec_from_file_location("mk", ROOT / "tools" / "make_tiny_hf_llm.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    jsonl = tmp_path / "train.jsonl"
    conv = [{"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}]
    jsonl.write_text(json.dumps({"image": "a.png", "conversations": conv}) + "\nnot json\n")
    from megatron_navil.testing.tiny_hf_llm import jsonl_texts

    assert jsonl_texts(jsonl) == ["What is it?", "a cat"]
    out = tmp_path / "llm"
    argv = ["--output", str(out), "--arch", "llama", "--vocab-size", "400", "--layers", "2",
            "--texts", str(jsonl)]  # fmt: skip
    assert tool.main(argv) == 0
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert TextTokenizer(out).special_ids["<img>"] == 400 + SPECIAL_TOKENS.index("<img>")
    with pytest.raises(SystemExit) as exit_:
        tool.main(["--output", str(out), "--hidden", "30"])
    assert exit_.value.code == 2
