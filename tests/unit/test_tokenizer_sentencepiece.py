"""Sentencepiece samples are tokenised as transformers' sentencepiece-based slow tokenizer
tokenises the whole templated text (issue 16 item 8, second half).

Reference: ``transformers.tokenization_utils_sentencepiece.SentencePieceBackend`` with its
default ``legacy=True``, built on the same ``.model`` file with the 12 NaViL special tokens and
the 4 chat control tokens added (in ``TextTokenizer``'s order, so the ids agree). It splits a
text at added tokens and runs ``SentencePieceProcessor.encode`` once over each run of text
between them, so sentencepiece's dummy prefix ``▁`` starts every such run and nothing else; that
is also what InternLM2's remote ``InternLM2Tokenizer`` (NaViL-2B's tokenizer, whose ``_tokenize``
is ``sp_model.encode(text)``) and transformers 4.51's ``LlamaTokenizer(legacy=True)`` do (checked
by hand on models trained like these: the same ids). ``legacy=False`` (no dummy prefix after an
added token: ``<|im_start|>user`` -> ``u ser``) is not what InternLM2's tokenizer does.

Each rendered sample (data/templates.py) must equal, id for id (exact equality, no
tolerance), the tokenizer's prefix (BOS) followed by the reference's ids of the sample's
templated text with every image written as ``<img>`` (the placeholder's id). Before this change
the assistant answer was encoded on its own and started with an extra ``▁`` (``assistant\\n``
+ ``A frog.`` gave ``▁assistant \\n ▁A ▁frog .`` where the reference gives ``... \\n A ▁frog .``),
and so did every text part of a document: on that code every BPE case here failed, and the
Unigram document case (the Unigram conversations passed: its NFKC turns the header's newline
into the ``▁`` the answer began with anyway).

Three models, trained here in well under a second each: InternLM2-like (BPE, byte fallback,
identity normalisation, dummy prefix, some NaViL tokens as user-defined pieces), a default
Unigram (NFKC, whitespace collapsing: a newline becomes ``▁``, so a run's ids depend on what the
previous text ends with), and the InternLM2-like one with ``"\\n\\n"`` as a user-defined piece
(a piece across the prompt/answer boundary).
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from megatron_navil.config.model import DEFAULT_SYSTEM_MESSAGE
from megatron_navil.config.tokens import CONTROL_TOKENS, SPECIAL_TOKENS
from megatron_navil.data.templates import Renderer, SampleRejected
from megatron_navil.data.tokenizer import SENTENCEPIECE_RULE, TextTokenizer
from megatron_navil.testing.synthetic_corpus import train_tokenizer

spm = pytest.importorskip("sentencepiece")
backend = pytest.importorskip("transformers.tokenization_utils_sentencepiece")

CORPUS = [
    "A frog sits on a green leaf.",
    "Describe the image in detail.",
    "The red circle is on the left of the blue square.",
    "user assistant system",
    "Please find the red circle now.",
    "Two cats and a dog play in the garden.",
    "What colour is the frog? It is green.",
]
SYSTEM = "You are a helpful assistant."
CONVERSATIONS = [
    # (turns, renderer system)
    ([("user", "<image>\nDescribe."), ("assistant", "A frog.")], ""),
    ([("user", "<image>\nDescribe the image."), ("assistant", "A frog sits on a leaf.")], SYSTEM),
    ([("user", "Hi"), ("assistant", "Hello there.")], DEFAULT_SYSTEM_MESSAGE),
    (
        [
            ("user", "Where is <ref>the red circle</ref>?"),
            ("assistant", "<ref>the red circle</ref><box>[[12, 34, 56, 78]]</box> is left."),
        ],
        "",
    ),
    (
        [
            ("system", "Be brief."),
            ("user", "<image>\n<image>\nCompare the two images."),
            ("assistant", "The first has a frog."),
            ("user", "And the second?"),
            ("assistant", "  Two cats, <ref>a dog</ref>."),
            ("user", "Thanks"),
            ("assistant", "\tYou are welcome.\n"),
        ],
        SYSTEM,
    ),
    ([("user", "Draw it."), ("assistant", "Here: <image> done.")], ""),
]
PROMPTS = [
    # encode_prompt: text right after an <|im_end|> and its newline, spaces, grounding
    "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\nA frog.<|im_end|>\nThe end",
    "<|im_end|>\n the red circle<ref> x </ref>\n\n<|im_start|>  assistant",
]


def _train(path, **options) -> None:
    words = " ".join(CORPUS).split()
    lines = CORPUS * 30 + [" ".join(words[i : i + 1 + i % 7]) for i in range(len(words))] * 30
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, minloglevel=2, **options
    )
    path.write_bytes(buf.getvalue())


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sp_prefix")
    bpe, uni, nl = root / "bpe", root / "uni", root / "nl"
    for d in (bpe, uni, nl):
        d.mkdir()
    internlm2_like = dict(
        model_type="bpe",
        vocab_size=400,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        hard_vocab_limit=False,
    )
    _train(
        bpe / "tokenizer.model",
        user_defined_symbols=["<|im_start|>", "<ref>", "<IMG_CONTEXT>"],
        **internlm2_like,
    )
    _train(uni / "tokenizer.model", vocab_size=200, hard_vocab_limit=False)
    # "\n\n" as one piece: a header's "\n" and an answer's leading "\n" merge in the whole text
    _train(nl / "tokenizer.model", user_defined_symbols=["\n\n"], **internlm2_like)
    return {
        "bpe": bpe / "tokenizer.model",
        "uni": uni / "tokenizer.model",
        "nl": nl / "tokenizer.model",
    }


def _reference(path, legacy: bool = True):
    """transformers' sentencepiece-based slow tokenizer on ``path`` with NaViL's tokens."""
    ref = backend.SentencePieceBackend(
        vocab_file=str(path), legacy=legacy, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    ref.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS + CONTROL_TOKENS)})
    return ref


def _templated(turns, system: str, template: str) -> str:
    """The whole templated text (../shared/NAVIL.md, "Chat templates"), images as ``<img>``."""
    body = list(turns)
    if body and body[0][0] == "system":
        system = body.pop(0)[1]
    out = []
    for role, text in [("system", system), *body] if system else body:
        head = f"{role}\n"
        if role == "assistant" and template == "qwen3-chat":
            head = "assistant\n<think>\n\n</think>\n\n"
        out.append(f"<|im_start|>{head}{text.replace('<image>', '<img>')}<|im_end|>")
    return "".join(out)


def _ids(ref, text: str) -> list[int]:
    return ref(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["bpe", "uni"])
@pytest.mark.parametrize("template", ["internlm2-chat", "qwen3-chat"])
def test_rendered_conversations_equal_the_hf_slow_tokenizer(models, name, template):
    tok, ref = TextTokenizer(models[name]), _reference(models[name])
    assert [ref.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS + CONTROL_TOKENS] == [
        tok.special_ids[t] for t in SPECIAL_TOKENS + CONTROL_TOKENS
    ]
    assert tok.prefix_ids == (tok._sp.bos_id(),)
    for turns, system in CONVERSATIONS:
        out = Renderer(tok, template, system=system).conversation(turns)
        text = _templated(turns, system, template)
        assert out.ids == [*tok.prefix_ids, *_ids(ref, text)], (name, template, text)
        assert tok.encode_prompt(text) == _ids(ref, text)
        # the prompt up to the first answer is the generation prompt, id for id
        first = out.mask.index(True)
        head = "assistant\n<think>\n\n</think>\n\n" if template == "qwen3-chat" else "assistant\n"
        prompt = text[: text.index("<|im_start|>" + head) + len("<|im_start|>" + head)]
        assert out.ids[:first] == [*tok.prefix_ids, *_ids(ref, prompt)], (name, prompt)


@pytest.mark.parametrize("name", ["bpe", "uni"])
def test_captions_documents_and_prompts_equal_the_hf_slow_tokenizer(models, name):
    tok, ref = TextTokenizer(models[name]), _reference(models[name])
    r = Renderer(tok, "internlm2-chat", system="")
    pre = list(tok.prefix_ids)
    assert r.caption("A frog sits on a leaf.", "raw", "").ids == pre + _ids(
        ref, "<img>A frog sits on a leaf.<|im_end|>"
    )
    chat = r.caption("A frog.", "chat", "Describe the image.")
    assert chat.ids == pre + _ids(
        ref,
        "<|im_start|>user\n<img>\nDescribe the image.<|im_end|>"
        "<|im_start|>assistant\nA frog.<|im_end|>",
    )
    # consecutive text parts of an interleaved document continue each other
    parts = [
        ("text", "The red circle"),
        ("text", "s are on the left."),
        ("text", "\nA frog <ref>sits</ref>"),
        ("text", " on a leaf."),
        ("image", None),
        ("text", "Two cats"),
        ("text", ""),
        ("text", " and a dog."),
        ("image", None),
        ("image", None),
    ]
    text = "".join("<img>" if kind == "image" else value for kind, value in parts)
    assert r.document(parts).ids == pre + _ids(ref, text + "<|im_end|>")
    # encoded joined, adjacent parts are checked joined: a reserved string across two is refused
    with pytest.raises(SampleRejected, match="reserved_token_in_text"):
        r.document([("text", "a <|im_"), ("text", "end|> b")])
    for prompt in PROMPTS:
        assert tok.encode_prompt(prompt) == _ids(ref, prompt), prompt


def test_a_piece_across_the_answer_boundary_keeps_the_generation_prompt(models):
    """Where the whole text has a piece across the prompt/answer boundary (``"\\n\\n"`` from the
    header's newline and the answer's), the prompt keeps the generation prompt's ids and the
    answer is its text without a dummy prefix (the reference's ``legacy=False`` encoding of a
    run that continues other text), as the HF path keeps the inference split there
    (data/templates.py): never the old extra ``▁``."""
    tok, ref, bare = (
        TextTokenizer(models["nl"]),
        _reference(models["nl"]),
        _reference(models["nl"], legacy=False),
    )
    out = Renderer(tok, "internlm2-chat", system="").conversation(
        [("user", "Q"), ("assistant", "\nA frog.")]
    )
    prompt = "<|im_start|>user\nQ<|im_end|><|im_start|>assistant\n"
    pieces = bare.tokenize("\nA frog.")
    assert pieces[0] == "<0x0A>"  # the newline byte, no "▁" before it
    answer = bare.convert_tokens_to_ids(pieces)
    assert out.ids == [*tok.prefix_ids, *_ids(ref, prompt), *answer, tok.special_ids["<|im_end|>"]]
    # the whole text differs there: its run has the two newlines as one piece
    assert ref.tokenize(prompt)[-1] == "<0x0A>"
    assert ref.tokenize(prompt + "\nA frog.")[-len(pieces) :] == ["\n\n", *pieces[1:]]


def test_the_rule_is_recorded_for_sentencepiece_only(models, tmp_path):
    """Corpora indexed before this change tokenised differently: the manifest's tokenizer entry
    names the rule (data/shards/corpus.py refuses a sentencepiece corpus without it); an HF
    tokenizer.json's entry is unchanged."""
    entry = TextTokenizer(models["bpe"]).describe()
    assert entry["rule"] == SENTENCEPIECE_RULE == "hf-slow"
    json.dumps(entry)
    hf = train_tokenizer(["a red circle"], tmp_path / "tokenizer.json")
    assert "rule" not in TextTokenizer(hf).describe()
