"""Tokenizer files of an HF export (conversion/tokenizer_export.py) in transformers 5.x and 4.51.

Sources, all made here: two HF ``tokenizer.json`` (a Qwen3-like byte-level BPE with some NaViL
tokens inside its vocabulary, as added tokens or as plain entries, and a post-processor that adds
nothing; a BERT-like WordPiece whose
post-processor puts ``[CLS]`` before and ``[SEP]`` after a text) and three sentencepiece models
(InternLM2-like: BPE, byte fallback, identity normalisation, BOS/EOS/UNK pieces, three NaViL
tokens and one other user-defined piece in the vocabulary; a default Unigram with NFKC and a
``tokenizer_config.json`` next to it asking for EOS and no BOS; a character model, which has no
``tokenizers`` equivalent here, so its export is slow-only). Each is exported, loaded back with
``AutoTokenizer.from_pretrained(dir, trust_remote_code=True, use_fast=...)`` (True and False) by
tests/unit/hf_tokenizer_probe.py, in this environment's transformers and in a virtualenv with
transformers 4.51 (made under ~/.cache/megatron_navil/tf451 or $NAVIL_TF451_VENV, reused when
present; ~15 s to make here), and compared with :class:`TextTokenizer`: the ids of the 16
special and control tokens, of ordinary text, of text with grounding tokens and of whole
templated prompts (``add_special_tokens=False``), ``prefix_ids + ids + suffix_ids`` with
special tokens, the chat template, and decoding.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_navil.config.tokens import CONTROL_TOKENS, SPECIAL_TOKENS
from megatron_navil.conversion.export import write_tokenizer
from megatron_navil.conversion.mapping import ConversionError
from megatron_navil.conversion.tokenizer_export import write_tokenizer_files
from megatron_navil.data.tokenizer import TextTokenizer, TokenizerError
from megatron_navil.hf.processing_navil import CHAT_TEMPLATES

HERE = Path(__file__).resolve().parent
PROBE = HERE / "hf_tokenizer_probe.py"
TOKENS = list(SPECIAL_TOKENS + CONTROL_TOKENS)
TF451 = "4.51.0"
TF451_REQUIREMENTS = (f"transformers=={TF451}", "sentencepiece", "protobuf", "jinja2")
SYSTEM = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型\uff0c英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)
ORDINARY = [
    "the red circle is on the left",
    "Two  spaces,\ttab and a newline\nhere. 12345 3.14",
    "你好\uff0c世界 café naïve",
    " leading and trailing ",
    "a[UNUSED_TOKEN_1]b [UNUSED_TOKEN_1]",  # a user-defined piece of the InternLM2-like model
]
GROUNDING = [
    "Please find <ref>the red circle</ref><box>[[12, 34, 56, 78]]</box> now.",
    "<quad>x</quad> and <box></box><ref></ref>",
]
IMAGE_BLOCK = (
    "<img>"
    + ("<IMG_CONTEXT>" * 2 + "<IMG_LINE_BREAK>") * 2
    + "<IMG_FRAME_BREAK>"
    + "<IMG_CONTEXT><IMG_LINE_BREAK><IMG_FRAME_BREAK></img>"
)
PROMPTS = [
    f"<|im_start|>system\n{SYSTEM}<|im_end|><|im_start|>user\n{IMAGE_BLOCK}\nDescribe "
    "<ref>the cat</ref>.<|im_end|><|im_start|>assistant\n",
    f"<|im_start|>user\n{IMAGE_BLOCK}\nWhat is it?<|im_end|><|im_start|>assistant\n"
    "<think>\n\n</think>\n\n<img_uncond>",
]
DECODE = ["the red circle is on the left"]
MESSAGES = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi <image>"}]
CORPUS = [
    "the red circle is on the left of the blue square",
    "two green triangles sit above a yellow star",
    "Describe the image. What is it? Where is the cat?",
    "tab\tand  double spaces, newline\nnumbers 12345 3.14 [[12, 34, 56, 78]]",
    "你好\uff0c世界 你是由上海人工智能实验室 多模态 café naïve",
]


# ---- sources ---------------------------------------------------------------------------------


def _hf_bytelevel(path: Path) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=[
            "<|endoftext|>",
            "<|im_start|>",
            "<|im_end|>",
            "<img>",
            "</img>",
            "<IMG_CONTEXT>",
        ],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    # two NaViL tokens as plain vocabulary entries (no added tokens, no merges make them)
    data = json.loads(tok.to_str())
    vocab = data["model"]["vocab"]
    for t in ("<ref>", "</ref>"):
        vocab[t] = len(vocab)
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


def _hf_wordpiece(path: Path) -> Path:
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(
        vocab_size=300,
        special_tokens=["[UNK]", "[CLS]", "[SEP]", "[PAD]", "<box>", "</box>"],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", tok.token_to_id("[CLS]")), ("[SEP]", tok.token_to_id("[SEP]"))],
    )
    tok.save(str(path))
    return path


def _sentencepiece(directory: Path, name: str, **options) -> Path:
    spm = pytest.importorskip("sentencepiece")
    directory.mkdir(parents=True, exist_ok=True)
    corpus = directory / f"{name}.txt"
    words = " ".join(CORPUS).split()
    lines = [" ".join(words[i : i + 1 + i % 7]) for i in range(len(words))] * 30
    corpus.write_text("\n".join(CORPUS * 30 + lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / name), minloglevel=2, **options
    )
    return directory / f"{name}.model"


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tok_sources")
    (root / "hf_bytelevel").mkdir()
    (root / "hf_wordpiece").mkdir()
    unigram_dir = root / "sp_unigram"
    out = {
        "hf-bytelevel": _hf_bytelevel(root / "hf_bytelevel" / "tokenizer.json"),
        "hf-wordpiece": _hf_wordpiece(root / "hf_wordpiece" / "tokenizer.json"),
        "sp-internlm2": _sentencepiece(
            root / "sp_internlm2",
            "tokenizer",
            model_type="bpe",
            vocab_size=420,
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=True,
            split_digits=True,
            allow_whitespace_only_pieces=True,
            character_coverage=0.9995,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=-1,
            user_defined_symbols=["<|im_start|>", "<ref>", "<IMG_CONTEXT>", "[UNUSED_TOKEN_1]"],
        ),
        "sp-unigram": _sentencepiece(
            unigram_dir, "tokenizer", vocab_size=150, hard_vocab_limit=False
        ),
        "sp-char": _sentencepiece(
            root / "sp_char", "tokenizer", model_type="char", vocab_size=100, hard_vocab_limit=False
        ),
    }
    (unigram_dir / "tokenizer_config.json").write_text(
        json.dumps({"add_bos_token": False, "add_eos_token": True})
    )
    return out


TEMPLATE = {"hf-bytelevel": "qwen3-chat", "hf-wordpiece": "qwen3-chat"}


@pytest.fixture(scope="module")
def exports(sources, tmp_path_factory) -> dict[str, dict]:
    root = tmp_path_factory.mktemp("tok_exports")
    out = {}
    for name, path in sources.items():
        directory = root / name
        template = TEMPLATE.get(name, "internlm2-chat")
        slow_only = name == "sp-char"
        expect = pytest.warns(UserWarning, match="slow tokenizer only")
        with expect if slow_only else contextlib.nullcontext():
            result = write_tokenizer_files(path, directory, template)
        out[name] = {
            "dir": directory,
            "result": result,
            "text": TextTokenizer(path),
            "template": template,
        }
    return out


def _expected(text: TextTokenizer, template: str) -> dict:
    plain = [text.encode_prompt(t) for t in ORDINARY + GROUNDING + PROMPTS]
    affix = list(text.prefix_ids), list(text.suffix_ids)
    return {
        "tokens": [text.special_ids[t] for t in TOKENS],
        "plain": plain,
        "full": [affix[0] + ids + affix[1] for ids in plain],
        "chat_template": CHAT_TEMPLATES[template],
        "prompt": _render(CHAT_TEMPLATES[template]),
        "decoded": DECODE,
    }


def _render(template: str) -> str:
    """The generation prompt of MESSAGES as transformers renders chat templates (a sandboxed
    jinja2 environment with trim_blocks and lstrip_blocks)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=MESSAGES, add_generation_prompt=True)


def _spec(exports: dict) -> dict:
    return {
        "dirs": [str(e["dir"]) for e in exports.values()],
        "tokens": TOKENS,
        "texts": ORDINARY + GROUNDING + PROMPTS,
        "decode": DECODE,
        "messages": MESSAGES,
    }


def _check(exports: dict, report: dict, version: str) -> dict[tuple[str, str], str]:
    """Compare every loaded tokenizer with TextTokenizer; returns (source, mode) -> class."""
    assert report["transformers"] == version
    loaded = {}
    for name, e in exports.items():
        want = _expected(e["text"], e["template"])
        for mode, got in report["results"][str(e["dir"])].items():
            where = f"transformers {version}, {name}, use_fast={mode == 'fast'}"
            assert "error" not in got, f"{where}: {got.get('error')}"
            for key, value in want.items():
                assert got[key] == value, f"{where}: {key} differs"
            assert got["prompt"].startswith("<|im_start|>system\nS<|im_end|>"), where
            loaded[name, mode] = f"{got['class']}{' (fast)' if got['is_fast'] else ''}"
    return loaded


def _run_probe(python: str, spec: dict, tmp_path: Path) -> dict:
    spec_file = tmp_path / "spec.json"
    spec_file.write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run(
        [python, str(PROBE), str(spec_file)], capture_output=True, text=True, env=env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---- TextTokenizer's reference -----------------------------------------------------------------


def test_text_tokenizer_prefix_and_prompt_encoding(sources, tmp_path):
    qwen = TextTokenizer(sources["hf-bytelevel"])
    assert qwen.prefix_ids == () and qwen.suffix_ids == ()
    # inside the vocabulary: as added tokens (<img>) or plain entries (<ref>); else appended
    base = qwen._hf.get_vocab_size(with_added_tokens=False)
    assert qwen.special_ids["<img>"] < base and qwen.special_ids["<ref>"] == base - 2
    assert "<img>" not in qwen.added and "<ref>" not in qwen.added and "<box>" in qwen.added
    assert qwen.special_ids["<box>"] >= base
    assert qwen.encode_prompt("a<ref>b") == [
        *qwen.encode_prompt("a"),
        base - 2,
        *qwen.encode_prompt("b"),
    ]
    bert = TextTokenizer(sources["hf-wordpiece"])
    assert bert._hf.id_to_token(bert.prefix_ids[0]) == "[CLS]" and len(bert.prefix_ids) == 1
    assert bert._hf.id_to_token(bert.suffix_ids[0]) == "[SEP]" and len(bert.suffix_ids) == 1
    intern = TextTokenizer(sources["sp-internlm2"])
    assert intern.prefix_ids == (intern._sp.bos_id(),) == (1,) and intern.suffix_ids == ()
    uni = TextTokenizer(sources["sp-unigram"])  # tokenizer_config.json: EOS, no BOS
    assert uni.prefix_ids == () and uni.suffix_ids == (uni._sp.eos_id(),)
    # a whole prompt: every special/control token is one id, the rest plain
    for tok in (qwen, intern, uni):
        ids = tok.encode_prompt(PROMPTS[0])
        for t in ("<|im_start|>", "<|im_end|>", "<img>", "<IMG_CONTEXT>", "</img>", "<ref>"):
            assert ids.count(tok.special_ids[t]) == PROMPTS[0].count(t), (tok.kind, t)
        assert tok.encode_prompt(GROUNDING[0]) == tok.encode_text(GROUNDING[0])
    # InternLM2-like: NaViL tokens inside the vocabulary keep their piece ids, others appended
    base = intern._sp.get_piece_size()
    assert intern.special_ids["<ref>"] == intern._sp.piece_to_id("<ref>") < base
    assert intern.special_ids["<|im_start|>"] < base and intern.special_ids["<box>"] >= base
    # a bad tokenizer_config.json next to a .model is a one-line TokenizerError
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "tokenizer.model").write_bytes(sources["sp-char"].read_bytes())
    (bad / "tokenizer_config.json").write_text('{"add_bos_token": "yes"}')
    with pytest.raises(TokenizerError, match="add_bos_token must be true or false"):
        TextTokenizer(bad / "tokenizer.model")
    (bad / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a readable JSON file"):
        TextTokenizer(bad / "tokenizer.model")


# ---- the exported files -------------------------------------------------------------------------


def test_exported_files(exports):
    for name, e in exports.items():
        d, result = e["dir"], e["result"]
        config = json.loads((d / "tokenizer_config.json").read_text(encoding="utf-8"))
        assert config["chat_template"] == CHAT_TEMPLATES[e["template"]]
        assert (d / "chat_template.jinja").read_text(encoding="utf-8") == config["chat_template"]
        assert config["additional_special_tokens"] == TOKENS
        decoder = {int(k): v["content"] for k, v in config["added_tokens_decoder"].items()}
        for t in TOKENS:
            assert decoder[e["text"].special_ids[t]] == t, (name, t)
        assert result.special_ids == [e["text"].special_ids[t] for t in SPECIAL_TOKENS]
        assert result.im_end == e["text"].special_ids["<|im_end|>"]
        assert sorted(p.name for p in d.iterdir()) == result.files
        if name.startswith("hf"):
            # not transformers 5's TokenizersBackend, which 4.51 cannot load
            assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
            assert "add_bos_token" not in config and result.fast
        else:
            assert config["tokenizer_class"] == "NaViLTokenizer"
            assert (d / "tokenizer.model").read_bytes() == e["text"].path.read_bytes()
            assert config["add_bos_token"] == bool(e["text"].prefix_ids)
            assert config["add_eos_token"] == bool(e["text"].suffix_ids)
            fast_ref = config["auto_map"]["AutoTokenizer"][1]
            assert result.fast == (name != "sp-char") == (fast_ref is not None)
            assert (d / "tokenizer.json").exists() == result.fast
    # write_tokenizer keeps its signature and return value
    e = exports["hf-bytelevel"]
    assert write_tokenizer(e["text"].path, e["dir"].parent / "again", "qwen3-chat") == (
        e["result"].special_ids,
        e["result"].im_end,
    )


def test_fast_tokenizer_json_checked_against_sentencepiece(exports):
    """The probe comparison that decides whether tokenizer.json is written catches a wrong
    conversion: a tokenizer.json whose BPE merges are reversed is refused."""
    from tokenizers import Tokenizer

    from megatron_navil.conversion import tokenizer_export as T

    e = exports["sp-internlm2"]
    fast = Tokenizer.from_file(str(e["dir"] / "tokenizer.json"))
    assert T.check_fast(fast, e["text"], exclude=["<s>", "</s>", "<unk>"]) is None
    data = json.loads(fast.to_str())
    data["model"]["merges"] = data["model"]["merges"][::-1]
    data["model"]["ignore_merges"] = False
    broken = Tokenizer.from_str(json.dumps(data))
    assert T.check_fast(broken, e["text"], exclude=["<s>", "</s>", "<unk>"]) is not None


@pytest.mark.parametrize(
    "content, match",
    [
        (None, "cannot read tokenizer"),
        (b"not a sentencepiece model", "not a sentencepiece model"),
        (b"{broken json", "not an HF tokenizer.json"),
    ],
)
def test_bad_tokenizer_file_is_one_line_conversion_error(tmp_path, content, match):
    path = tmp_path / ("tokenizer.json" if content and content.startswith(b"{") else "x.model")
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConversionError, match=match) as exc:
        write_tokenizer(path, tmp_path / "out", "internlm2-chat")
    assert "\n" not in str(exc.value)


def test_directory_is_not_a_tokenizer(tmp_path):
    """A directory is taken as an HF model directory (its tokenizer.json, else tokenizer.model);
    one holding neither is a one-line error saying so."""
    with pytest.raises(ConversionError, match=r"a directory without a tokenizer\.json or") as exc:
        write_tokenizer(tmp_path, tmp_path / "out", "internlm2-chat")
    assert "\n" not in str(exc.value)


def test_unknown_template(sources, tmp_path):
    with pytest.raises(ConversionError, match="unknown chat template 'vicuna'"):
        write_tokenizer(sources["hf-bytelevel"], tmp_path / "out", "vicuna")
    assert not (tmp_path / "out").exists()


# ---- loading in both transformers versions ----------------------------------------------


@pytest.mark.slow
def test_loads_in_current_transformers(exports, tmp_path):
    import transformers

    report = _run_probe(sys.executable, _spec(exports), tmp_path)
    loaded = _check(exports, report, transformers.__version__)
    # transformers 5 ignores use_fast: the fast class wherever there is a tokenizer.json
    assert loaded["sp-internlm2", "slow"] == "NaViLTokenizerFast (fast)"
    assert loaded["sp-char", "fast"] == loaded["sp-char", "slow"] == "NaViLTokenizer"
    print(json.dumps({f"{k[0]} use_fast={k[1] == 'fast'}": v for k, v in loaded.items()}))


def test_slow_class_directly_in_current_transformers(exports):
    """The slow class on its own (what AutoTokenizer gives when an export is slow-only),
    here on the exports that also have a tokenizer.json."""
    spec = importlib.util.spec_from_file_location("navil_probe", PROBE)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    for name in ("sp-internlm2", "sp-unigram"):
        e = exports[name]
        module_spec = importlib.util.spec_from_file_location(
            f"tokenization_navil_{name.replace('-', '_')}", e["dir"] / "tokenization_navil.py"
        )
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        tok = module.NaViLTokenizer.from_pretrained(str(e["dir"]))
        assert not tok.is_fast
        text = e["text"]
        assert [tok.convert_tokens_to_ids(t) for t in TOKENS] == [
            text.special_ids[t] for t in TOKENS
        ]
        for t in ORDINARY + GROUNDING + PROMPTS:
            assert tok(t, add_special_tokens=False)["input_ids"] == text.encode_prompt(t), (name, t)
        # transformers 5 drops add_bos_token/add_eos_token next to a tokenizer.json (module
        # doc of tokenization_navil.py): the class defaults, BOS yes / EOS no, apply
        ids = tok(DECODE[0])["input_ids"]
        assert ids[0] == text._sp.bos_id() and ids[1:] == text.encode_prompt(DECODE[0])


@pytest.fixture(scope="session")
def tf451_python() -> str:
    """A virtualenv with transformers 4.51 (no torch), made once and reused."""
    venv = Path(
        os.environ.get("NAVIL_TF451_VENV", Path.home() / ".cache" / "megatron_navil" / "tf451")
    )
    python = venv / "bin" / "python"
    stamp = venv / ".navil-requirements"
    want = "\n".join(TF451_REQUIREMENTS)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one maker at a time (parallel test runs)
        if not (stamp.is_file() and stamp.read_text() == want and python.exists()):
            subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
            cmd = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
            proc = subprocess.run(
                [*cmd, *TF451_REQUIREMENTS], capture_output=True, text=True, timeout=900
            )
            assert proc.returncode == 0, f"making {venv} failed: {proc.stderr[-2000:]}"
            stamp.write_text(want)
    return str(python)


@pytest.mark.slow
def test_loads_in_transformers_4_51(exports, tf451_python, tmp_path):
    report = _run_probe(tf451_python, _spec(exports), tmp_path)
    loaded = _check(exports, report, TF451)
    # 4.51 honours use_fast through auto_map; PreTrainedTokenizerFast is fast either way
    assert loaded["sp-internlm2", "fast"] == "NaViLTokenizerFast (fast)"
    assert loaded["sp-internlm2", "slow"] == "NaViLTokenizer"
    assert loaded["sp-char", "fast"] == loaded["sp-char", "slow"] == "NaViLTokenizer"
    assert loaded["hf-bytelevel", "slow"] == "PreTrainedTokenizerFast (fast)"
    print(json.dumps({f"{k[0]} use_fast={k[1] == 'fast'}": v for k, v in loaded.items()}))
