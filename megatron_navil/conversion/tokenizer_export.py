"""The tokenizer files of an HF export, loadable by transformers 4.51 (the released NaViL code's
pin) and 5.x, with ``use_fast`` True or False, giving :class:`TextTokenizer`'s ids.

The files are written here field by field (not with one version's ``save_pretrained``: 5.x
writes ``"tokenizer_class": "TokenizersBackend"``, a class 4.51 does not have).

HF ``tokenizer.json`` source:

* ``tokenizer.json``: the source with the tokens :class:`TextTokenizer` adds (``tokenizers``'
  own serialisation); its post-processor is kept, so ``add_special_tokens=True`` adds
  :attr:`TextTokenizer.prefix_ids` / ``suffix_ids`` (a Qwen3 ``tokenizer.json``: nothing);
* ``tokenizer_config.json``: ``tokenizer_class`` ``PreTrainedTokenizerFast`` (4.51 loads that
  class for ``use_fast`` True and False, 5.x maps it to ``TokenizersBackend``); no
  ``add_bos_token`` / ``add_eos_token`` (5.x would rebuild the post-processor from them).

sentencepiece ``.model`` source (InternLM2's, NaViL-2B's tokenizer):

* ``tokenizer.model``: the source, byte for byte;
* ``tokenization_navil.py``: remote code (``megatron_navil/hf/tokenization_navil.py``) with the
  slow ``NaViLTokenizer`` (sentencepiece) and ``NaViLTokenizerFast`` (``tokenizer.json``);
* ``tokenizer.json``: the same tokenizer for the ``tokenizers`` library (:func:`sp_to_fast`),
  written only when it encodes a probe set (every piece, whitespace, scripts, special tokens)
  exactly as sentencepiece does; otherwise the export is slow-only (a warning says why, and
  ``auto_map`` names no fast class, so both versions load ``NaViLTokenizer``);
* ``tokenizer_config.json``: ``tokenizer_class`` ``NaViLTokenizer``, ``auto_map`` to the remote
  classes, ``add_bos_token`` / ``add_eos_token`` from :attr:`TextTokenizer.prefix_ids` /
  ``suffix_ids`` (InternLM2: BOS ``<s>``, no EOS), ``bos_token`` / ``eos_token`` /
  ``unk_token`` the model's own pieces.

Common ``tokenizer_config.json`` fields: ``added_tokens_decoder`` (id -> the token and its
flags: the 12 NaViL special tokens and the 4 control tokens at TextTokenizer's ids, all
``special``, never normalised or stripped, plus the source's other added tokens),
``additional_special_tokens`` (those 16, the name both versions read), ``pad_token``
``<|im_end|>`` (the exported ``generation_config.json`` pads with it too), ``eos_token``
``<|im_end|>`` for a ``tokenizer.json`` source (generation stops at the end of a turn),
``clean_up_tokenization_spaces`` false, ``chat_template`` (also in ``chat_template.jinja``:
5.x and 4.51 read that file first, older 4.x only the config field).

Known difference, inherent in HF tokenizers: the literal strings of named special tokens
(``<s>``, ``</s>``, ``<unk>`` of a sentencepiece model) in text become those tokens, while
sentencepiece (:class:`TextTokenizer`) encodes them as text.
"""

from __future__ import annotations

import json
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_navil.config.tokens import CONTROL_TOKENS, SPECIAL_TOKENS
from megatron_navil.conversion.mapping import ConversionError
from megatron_navil.data.tokenizer import TextTokenizer, TokenizerError

HF_SOURCE = Path(__file__).resolve().parent.parent / "hf"
REMOTE_TOKENIZER_FILE = "tokenization_navil.py"
NAVIL_TOKENS = SPECIAL_TOKENS + CONTROL_TOKENS
PAD_TOKEN = "<|im_end|>"

# sentencepiece ModelProto.SentencePiece.Type and TrainerSpec.ModelType values
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_UNIGRAM, _BPE = 1, 2
_REGEX_SPECIAL = set("\\^$.|?*+()[]{}-")


class FastUnsupported(Exception):
    """The sentencepiece model has a feature :func:`sp_to_fast` does not reproduce."""


@dataclass
class TokenizerExport:
    """What :func:`write_tokenizer_files` wrote."""

    special_ids: list[int]
    im_end: int
    files: list[str]
    fast: bool
    slow_class: str | None = None
    note: str = ""
    prefix_ids: list[int] = field(default_factory=list)
    suffix_ids: list[int] = field(default_factory=list)


def write_tokenizer_files(tokenizer_path: str | Path, out: Path, template: str) -> TokenizerExport:
    """Write the tokenizer files of ``tokenizer_path`` (``tokenizer.json`` or a sentencepiece
    ``.model``) into ``out`` with ``template``'s chat template; see the module doc.
    ConversionError (one line) for a file that cannot be used."""
    from megatron_navil.hf.processing_navil import CHAT_TEMPLATES

    if template not in CHAT_TEMPLATES:
        raise ConversionError(
            f"unknown chat template {template!r}; known: {', '.join(CHAT_TEMPLATES)}"
        )
    try:
        text = TextTokenizer(tokenizer_path)
    except TokenizerError as exc:
        raise ConversionError(str(exc)) from None
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    chat_template = CHAT_TEMPLATES[template]
    if text.kind == "hf":
        result = _write_hf(text, out)
    else:
        result = _write_sp(text, out)
    config = result.pop("config")
    config["clean_up_tokenization_spaces"] = False
    config["chat_template"] = chat_template
    (out / "tokenizer_config.json").write_text(
        json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    (out / "chat_template.jinja").write_text(chat_template, encoding="utf-8")
    files = sorted([*result.pop("files"), "tokenizer_config.json", "chat_template.jinja"])
    ids = [text.special_ids[t] for t in SPECIAL_TOKENS]
    return TokenizerExport(
        special_ids=ids,
        im_end=text.special_ids["<|im_end|>"],
        files=files,
        prefix_ids=list(text.prefix_ids),
        suffix_ids=list(text.suffix_ids),
        **result,
    )


def _added_token_entry(content: str, special: bool = True, **flags: bool) -> dict[str, Any]:
    """One ``added_tokens_decoder`` value: the fields both transformers versions read."""
    entry = {
        "content": content,
        "lstrip": False,
        "normalized": False,
        "rstrip": False,
        "single_word": False,
        "special": special,
    }
    entry.update(flags)
    return entry


# ---- tokenizer.json source ---------------------------------------------------------------


def _write_hf(text: TextTokenizer, out: Path) -> dict[str, Any]:
    raw = text._hf.to_str()
    (out / "tokenizer.json").write_text(raw, encoding="utf-8")
    # the added tokens exactly as tokenizer.json holds them (same flags: transformers re-adds
    # any token whose flags differ)
    decoder = {}
    for tok in json.loads(raw).get("added_tokens", []):
        flags = {k: bool(tok[k]) for k in ("lstrip", "rstrip", "single_word", "normalized")}
        decoder[str(tok["id"])] = _added_token_entry(tok["content"], bool(tok["special"]), **flags)
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "additional_special_tokens": list(NAVIL_TOKENS),
        "eos_token": "<|im_end|>",
        "pad_token": PAD_TOKEN,
    }
    return {"config": config, "files": ["tokenizer.json"], "fast": True}


# ---- sentencepiece source ----------------------------------------------------------------


def _write_sp(text: TextTokenizer, out: Path) -> dict[str, Any]:
    sp = text._sp
    named = {
        "unk_token": sp.unk_id(),
        "bos_token": sp.bos_id(),
        "eos_token": sp.eos_id(),
    }
    named_pieces = {k: (sp.id_to_piece(v) if v >= 0 else None) for k, v in named.items()}
    # ids -> token: the model's named pieces, then the 16 NaViL tokens at TextTokenizer's ids
    added: dict[int, str] = {v: sp.id_to_piece(v) for v in named.values() if v >= 0}
    for t in NAVIL_TOKENS:
        added[text.special_ids[t]] = t
    shutil.copyfile(text.path, out / "tokenizer.model")
    shutil.copyfile(HF_SOURCE / REMOTE_TOKENIZER_FILE, out / REMOTE_TOKENIZER_FILE)
    files = ["tokenizer.model", REMOTE_TOKENIZER_FILE]
    note = ""
    try:
        fast = sp_to_fast(text, added)
        mismatch = check_fast(fast, text, exclude=[p for p in named_pieces.values() if p])
        if mismatch:
            raise FastUnsupported(f"the tokenizers version encodes {mismatch}")
    except FastUnsupported as exc:
        fast = None
        note = f"no tokenizer.json (slow tokenizer only): {exc}"
        warnings.warn(f"{text.path}: {note}", stacklevel=3)
    if fast is not None:
        (out / "tokenizer.json").write_text(fast.to_str(), encoding="utf-8")
        files.append("tokenizer.json")
    module = REMOTE_TOKENIZER_FILE.removesuffix(".py")
    config = {
        "tokenizer_class": "NaViLTokenizer",
        "auto_map": {
            "AutoTokenizer": [
                f"{module}.NaViLTokenizer",
                f"{module}.NaViLTokenizerFast" if fast is not None else None,
            ]
        },
        "added_tokens_decoder": {str(i): _added_token_entry(t) for i, t in sorted(added.items())},
        "additional_special_tokens": list(NAVIL_TOKENS),
        **named_pieces,
        "pad_token": PAD_TOKEN,
        "add_bos_token": bool(text.prefix_ids),
        "add_eos_token": bool(text.suffix_ids),
    }
    return {
        "config": config,
        "files": files,
        "fast": fast is not None,
        "slow_class": "NaViLTokenizer",
        "note": note,
    }


def _load_proto(raw: bytes) -> Any:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(raw)
    return proto


def _regex_escape(piece: str) -> str:
    return "".join("\\" + c if c in _REGEX_SPECIAL else c for c in piece)


def sp_to_fast(text: TextTokenizer, added: dict[int, str]) -> Any:
    """A ``tokenizers.Tokenizer`` that encodes like ``text``'s sentencepiece model, with the
    ``added`` tokens (id -> token, all special) at their ids. Each text segment between added
    tokens is normalised as sentencepiece does (its precompiled character map, optional
    whitespace clean-up, ``▁`` dummy prefix, spaces -> ``▁``), user-defined pieces are cut out
    (sentencepiece matches them before segmenting), then the model: Unigram with the pieces'
    scores, or BPE whose merges are every split of a normal piece into two normal pieces, ranked
    by the merged piece's score (sentencepiece merges the best-scoring adjacent pair first).
    Byte fallback as in the model. Post-processor: :attr:`TextTokenizer.prefix_ids` /
    ``suffix_ids``. FastUnsupported for what this does not cover; :func:`check_fast` then
    compares it with sentencepiece."""
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
    )

    try:
        proto = _load_proto(text.path.read_bytes())
    except Exception as exc:  # a model sentencepiece loads but protobuf does not parse
        raise FastUnsupported(f"cannot read the model's protobuf ({type(exc).__name__})") from None
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    pieces = [(p.piece, float(p.score), int(p.type)) for p in proto.pieces]
    if trainer.treat_whitespace_as_suffix:
        raise FastUnsupported("treat_whitespace_as_suffix is set")
    unk = [i for i, (_, _, t) in enumerate(pieces) if t == _UNKNOWN]
    if len(unk) != 1:
        raise FastUnsupported(f"{len(unk)} unknown pieces")
    if len({p for p, _, _ in pieces}) != len(pieces):
        raise FastUnsupported("duplicate pieces")
    byte_fallback = bool(trainer.byte_fallback)
    user_defined = [p for p, _, t in pieces if t == _USER_DEFINED]
    if trainer.model_type == _UNIGRAM:
        vocab = [(p, s) for p, s, _ in pieces]
        model = models.Unigram(vocab, unk_id=unk[0], byte_fallback=byte_fallback)
    elif trainer.model_type == _BPE:
        model = _bpe(pieces, unk[0], byte_fallback, ignore_merges=bool(user_defined))
        if user_defined:
            # with ignore_merges a word that is a piece is taken whole (user-defined pieces
            # are such words); sentencepiece agrees only if the merges build every piece
            _check_pieces_reachable(pieces, unk[0])
    else:
        raise FastUnsupported(f"sentencepiece model type {trainer.model_type} (not BPE/Unigram)")
    tok = Tokenizer(model)
    steps = []
    if norm.precompiled_charsmap:
        steps.append(normalizers.Precompiled(norm.precompiled_charsmap))
    if norm.remove_extra_whitespaces:
        steps += [
            normalizers.Strip(left=True, right=True),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    if norm.add_dummy_prefix:
        steps.append(normalizers.Prepend("▁"))
    if norm.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "▁"))
    if steps:
        tok.normalizer = normalizers.Sequence(steps)
    if user_defined:
        longest_first = sorted(user_defined, key=len, reverse=True)
        pattern = "|".join(_regex_escape(p) for p in longest_first)
        tok.pre_tokenizer = pre_tokenizers.Split(Regex(pattern), behavior="isolated")
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(" ", 1, 0)] if norm.add_dummy_prefix else [])
    )
    for token_id, token in sorted(added.items()):
        tok.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        got = tok.token_to_id(token)
        if got != token_id:
            raise FastUnsupported(f"{token} gets id {got} in tokenizers, not {token_id}")
    tok.post_processor = _template(text)
    return tok


def _bpe(pieces: list[tuple[str, float, int]], unk: int, byte_fallback: bool, ignore_merges: bool):
    from tokenizers import models

    vocab = {p: i for i, (p, _, _) in enumerate(pieces)}
    normal = {p for p, _, t in pieces if t == _NORMAL}
    ranked = []
    for pid, (piece, score, kind) in enumerate(pieces):
        if kind != _NORMAL:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-score, pid, vocab[left], (left, right)))
    ranked.sort()
    return models.BPE(
        vocab=vocab,
        merges=[pair for *_, pair in ranked],
        unk_token=pieces[unk][0],
        fuse_unk=True,
        byte_fallback=byte_fallback,
        ignore_merges=ignore_merges,
    )


def _check_pieces_reachable(pieces: list[tuple[str, float, int]], unk: int) -> None:
    from tokenizers import Tokenizer

    plain = Tokenizer(_bpe(pieces, unk, byte_fallback=False, ignore_merges=False))
    normal = [(i, p) for i, (p, _, t) in enumerate(pieces) if t == _NORMAL and len(p) > 1]
    encoded = plain.encode_batch([p for _, p in normal], add_special_tokens=False)
    for (pid, piece), enc in zip(normal, encoded, strict=True):
        if enc.ids != [pid]:
            raise FastUnsupported(f"piece {piece!r} is not built by its merges")


def _template(text: TextTokenizer) -> Any:
    """Post-processor adding ``prefix_ids`` / ``suffix_ids`` (a pair: both around each text,
    as the slow class's ``build_inputs_with_special_tokens``)."""
    from tokenizers import processors

    sp = text._sp
    pre = [(sp.id_to_piece(i), i) for i in text.prefix_ids]
    post = [(sp.id_to_piece(i), i) for i in text.suffix_ids]
    single = [f"{t}:0" for t, _ in pre] + ["$A:0"] + [f"{t}:0" for t, _ in post]
    pair = single + [f"{t}:1" for t, _ in pre] + ["$B:1"] + [f"{t}:1" for t, _ in post]
    special = sorted(set(pre + post), key=lambda x: x[1])
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


PROBE_TEXTS = (
    "",
    " ",
    "   ",
    "\n",
    "\n\n",
    "a  b   c",
    " leading space",
    "trailing space ",
    "tab\there\r\nwindows line",
    "Describe the image in detail.",
    "The quick brown fox jumps over the lazy dog 1234567890 3.14159 -42 1e-9",
    "naïve café Ångström ﬁ ligature ① \uff26\uff35\uff2c\uff2c x\u3000y zero\u200bwidth",
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型\uff0c英文名叫InternVL, "
    "是一个有用无害的人工智能助手。",
    "日本語のテキスト 한국어 텍스트 русский текст العربية हिन्दी ελληνικά",
    "emoji 😀👍🏽 and symbols ©®™ § ¶ • … ‰ ← → ∑ √ ∞",
    "code: def f(x):\n    return x ** 2  # comment\n\tif a != b: pass",
    "<ref>the cat</ref><box>[[10, 20, 30, 40]]</box> and <quad>q</quad>",
    "<|im_start|>system\nS<|im_end|><|im_start|>user\n<img><IMG_CONTEXT><IMG_CONTEXT>"
    "<IMG_LINE_BREAK><IMG_FRAME_BREAK></img>\nWhat is it?<|im_end|><|im_start|>assistant\n"
    "<think>\n\n</think>\n\n",
    "x<img_uncond>y <IMG_CONTEXT>z",
)


def probe_texts(text: TextTokenizer, exclude: list[str]) -> list[str]:
    """Texts to compare a fast tokenizer with sentencepiece on: :data:`PROBE_TEXTS`, every
    piece's text alone and after a space, runs of pieces, user-defined pieces inside words;
    none containing a string of ``exclude`` (the named special tokens, see the module doc)."""
    sp = text._sp
    surfaces = [sp.id_to_piece(i).replace("▁", " ") for i in range(sp.get_piece_size())]
    probes = list(PROBE_TEXTS)
    probes += surfaces
    probes += [" " + s for s in surfaces]
    for start in range(0, len(surfaces), 64):
        run = surfaces[start : start + 64]
        probes += ["".join(run), "\n".join(run), " ".join(run)]
    proto = _load_proto(text.path.read_bytes())
    probes += [f"x{p.piece}y {p.piece} " for p in proto.pieces if p.type == _USER_DEFINED]
    return [p for p in probes if not any(e in p for e in exclude)]


def check_fast(fast: Any, text: TextTokenizer, exclude: list[str]) -> str | None:
    """None when ``fast`` gives :meth:`TextTokenizer.encode_prompt` (and, with special tokens,
    ``prefix_ids + ids + suffix_ids``) on every :func:`probe_texts` text, else the first
    difference in words."""
    probes = probe_texts(text, exclude)
    plain = fast.encode_batch(probes, add_special_tokens=False)
    full = fast.encode_batch(probes, add_special_tokens=True)
    pre, post = list(text.prefix_ids), list(text.suffix_ids)
    for probe, a, b in zip(probes, plain, full, strict=True):
        want = text.encode_prompt(probe)
        if a.ids != want:
            return f"{probe[:40]!r} as {a.ids[:12]}, sentencepiece as {want[:12]}"
        if b.ids != pre + want + post:
            return f"{probe[:40]!r} with special tokens as {b.ids[:12]}"
    return None
