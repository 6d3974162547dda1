"""Tokenizers for indexing: an HF ``tokenizer.json`` or a sentencepiece ``.model``.

Both are wrapped by :class:`TextTokenizer`, which guarantees that the 12 NaViL special tokens
(``config.SPECIAL_TOKENS``) and the chat template's control tokens (``<|im_start|>``,
``<|im_end|>``, ``<think>``, ``</think>``) are single ids:

* HF: tokens the vocabulary lacks are added as special tokens (``Tokenizer.add_special_tokens``,
  appended after the vocabulary, in ``SPECIAL_TOKENS`` order then the control tokens); tokens it
  has as plain entries are declared special too, keeping their ids (never split in a text);
* sentencepiece: pieces the model has are used (``piece_to_id``, not ``<unk>``); missing ones
  get ids ``vocab_size + k`` in the same order (NaViL-2B's 92544..92555 for InternLM2).

User text is encoded by :meth:`TextTokenizer.encode_text`: the grounding tokens ``<ref> </ref>
<box> </box> <quad> </quad>`` in it become their ids, every other piece goes through the
backend without special-token handling. Reserved strings (image tokens and template control
tokens, :data:`RESERVED`) must not appear in user text; :meth:`find_reserved` finds them so the
indexer can skip such samples instead of silently routing text as image tokens.

Inference-side encoding (what an HF export of this tokenizer gives, see
``conversion/tokenizer_export.py``): :meth:`TextTokenizer.encode_prompt` encodes a rendered
prompt in which every special and control token is one id; :attr:`TextTokenizer.prefix_ids` /
:attr:`TextTokenizer.suffix_ids` are the ids the tokenizer's own special-token handling puts
before / after a text (``tokenizer(text)`` with ``add_special_tokens=True``, the released NaViL
code's call): for ``tokenizer.json``, what its post-processor adds; for a sentencepiece
``.model``, which has no such setting, the ``add_bos_token`` (default true) and ``add_eos_token``
(default false) of a ``tokenizer_config.json`` next to the file, with the model's own BOS / EOS
pieces, as Llama's and InternLM2's slow tokenizers do (InternLM2: BOS ``<s>``, no EOS). The
indexer puts :attr:`~TextTokenizer.prefix_ids` before every sample (data/templates.py), as the
released code's ``tokenizer(query)`` does before every prompt; the suffix is left out (a
tokenizer that appends EOS to every text would end the prompt with it).

Sentencepiece text runs (:data:`SENTENCEPIECE_RULE`): a sample is tokenised as the model's HF
tokenizer tokenises its whole templated text. The reference is transformers' sentencepiece-based
slow tokenizer (``SentencePieceBackend`` in transformers 5, ``LlamaTokenizer`` in 4.51, both
with their default ``legacy=True``; InternLM2's remote ``InternLM2Tokenizer``, NaViL-2B's, does
the same): it cuts the text at added tokens and encodes each run of text between two of them
with one ``SentencePieceProcessor.encode``, so the dummy prefix ``▁`` (when the model adds one)
starts every run and nowhere else. E.g. with a small BPE model,
``<|im_start|>user\\n<img>\\nDescribe.<|im_end|><|im_start|>assistant\\nA frog.<|im_end|>``
is ``<|im_start|> ▁user \\n <img> ▁ \\n Des cribe . <|im_end|> <|im_start|> ▁assistant \\n A
▁frog . <|im_end|>``: a ``▁`` after each added token, none before ``A``. Callers encode a sample
in pieces (template markup, user text, grounding tokens, placeholders). A piece that continues
text of the same run (the answer after ``assistant\\n``) is passed that text as ``context`` and
gets the ids the whole run has after the context's own ids: no ``▁`` of its own, and the
boundary normalised as in the whole text (a Unigram model's NFKC turns ``\\n`` into ``▁``).
Where a piece spans the boundary (the context's ids are not a prefix of the run's), the context
keeps its own ids (for the answer: the generation prompt's) and the text is encoded without the
dummy prefix, as the HF path keeps the inference split there (data/templates.py). Adjacent text
parts of a document, all in the loss, are encoded joined (:meth:`TextTokenizer.encode_texts`).
Corpora indexed before this rule put a ``▁`` before every piece (each answer started with one):
their manifest's tokenizer entry has no ``rule`` and data/shards/corpus.py refuses them. The HF
``tokenizer.json`` path is as before: no ``context``, every piece encoded on its own.

Fingerprint: ``sha256(sha256(file bytes) + json(12 special ids))`` (:attr:`fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from megatron_navil.config.tokens import CONTROL_TOKENS, SPECIAL_TOKENS, TEXT_SPECIALS

if TYPE_CHECKING:
    import sentencepiece as spm

RESERVED = tuple(t for t in SPECIAL_TOKENS if t not in TEXT_SPECIALS) + CONTROL_TOKENS
"""Strings that must not occur in user text."""

_TEXT_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in TEXT_SPECIALS) + ")")
_ALL_SPECIAL_RE = re.compile(
    "(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS + CONTROL_TOKENS) + ")"
)
_RESERVED_RE = re.compile("|".join(re.escape(t) for t in RESERVED))

SENTENCEPIECE_RULE = "hf-slow"
"""How a sentencepiece tokenizer's samples are tokenised, recorded as the manifest's
``tokenizer["rule"]`` for ``kind == "sentencepiece"`` (see the module doc): ``"hf-slow"``, each
run of text between added tokens encoded as one, as transformers' slow tokenizer does. A
change that alters a sentencepiece sample's ids needs a new name here."""


def is_json(raw: bytes) -> bool:
    """Whether tokenizer bytes are an HF ``tokenizer.json`` (a JSON object) rather than a
    sentencepiece model (a binary protobuf, whose first byte is a field tag, never ``{``)."""
    return raw.lstrip(b"\xef\xbb\xbf \t\r\n")[:1] == b"{"


class TokenizerError(ValueError):
    """The tokenizer file cannot be used (one-line message)."""


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model")
"""What an HF model directory holds its tokenizer in, in order of preference."""


def tokenizer_file(path: str | Path) -> Path:
    """``path`` itself for a file; for a directory (an HF model directory) the tokenizer file
    it holds, its ``tokenizer.json`` first, else its ``tokenizer.model``. TokenizerError for
    a directory holding neither; a missing path is returned as is (reading it fails)."""
    p = Path(path)
    if not p.is_dir():
        return p
    for name in TOKENIZER_FILES:
        if (p / name).is_file():
            return p / name
    raise TokenizerError(f"{p}: a directory without a tokenizer.json or tokenizer.model")


class TextTokenizer:
    """A loaded tokenizer with NaViL's special tokens; see the module doc. ``path``: a
    ``tokenizer.json`` / sentencepiece model, or a directory holding one
    (:func:`tokenizer_file`)."""

    def __init__(self, path: str | Path):
        self.path = tokenizer_file(path)
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise TokenizerError(f"{self.path}: cannot read tokenizer ({exc.strerror})") from None
        self.file_sha256 = hashlib.sha256(raw).hexdigest()
        self.added: list[str] = []
        self.prefix_ids: tuple[int, ...] = ()
        """Ids ``tokenizer(text)`` puts before the text (``add_special_tokens=True``)."""
        self.suffix_ids: tuple[int, ...] = ()
        """Ids ``tokenizer(text)`` puts after the text (``add_special_tokens=True``)."""
        if is_json(raw):
            self.kind = "hf"
            self._init_hf(raw)
        else:  # by content, not suffix: mistral-common ships tokenizer.model.v1/.v3/.v7
            self.kind = "sentencepiece"
            self._init_sp(raw)
        ids = [self.special_ids[t] for t in SPECIAL_TOKENS]
        if len(set(ids)) != len(ids):
            raise TokenizerError(f"{self.path}: special tokens do not map to distinct ids")
        payload = (self.file_sha256 + json.dumps(ids)).encode()
        self.fingerprint = hashlib.sha256(payload).hexdigest()

    # backends -----------------------------------------------------------------------------

    def _init_hf(self, raw: bytes) -> None:
        from tokenizers import AddedToken, Tokenizer

        try:
            tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TokenizerError(f"{self.path}: not an HF tokenizer.json ({msg})") from None
        missing = [t for t in SPECIAL_TOKENS + CONTROL_TOKENS if tok.token_to_id(t) is None]
        if missing:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
            self.added = missing
        # tokens the vocabulary has as plain entries become added special tokens with their
        # ids too, so the backend never splits them (as an HF export, which declares all 16
        # special, does not); user text cannot contain them (RESERVED, grounding split apart)
        declared = {t.content for t in tok.get_added_tokens_decoder().values()}
        plain = [t for t in SPECIAL_TOKENS + CONTROL_TOKENS if t not in declared]
        if plain:
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in plain])
        self._hf = tok
        self.special_ids = {t: int(tok.token_to_id(t)) for t in SPECIAL_TOKENS + CONTROL_TOKENS}
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))
        self.prefix_ids, self.suffix_ids = self._hf_affixes(tok)

    def _hf_affixes(self, tok) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """What the post-processor adds around a text: encode a probe with and without
        special tokens and find the plain ids inside the other encoding."""
        for probe in ("a", "0", " ", "."):
            plain = tok.encode(probe, add_special_tokens=False).ids
            if plain:
                break
        full = tok.encode(probe, add_special_tokens=True).ids
        if not plain:
            return tuple(full), ()
        for start in range(len(full) - len(plain) + 1):
            if full[start : start + len(plain)] == plain:
                return tuple(full[:start]), tuple(full[start + len(plain) :])
        raise TokenizerError(
            f"{self.path}: its post-processor changes the text's ids ({plain} -> {full})"
        )

    def _init_sp(self, raw: bytes) -> None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(raw)
        except Exception as exc:
            raise TokenizerError(
                f"{self.path}: not a sentencepiece model ({exc}), nor an HF tokenizer.json "
                "(not a JSON object)"
            ) from None
        self._sp = sp
        self._sp_bare: spm.SentencePieceProcessor | None = None
        base = sp.get_piece_size()
        self.special_ids = {}
        nxt = base
        for t in SPECIAL_TOKENS + CONTROL_TOKENS:
            pid = sp.piece_to_id(t)
            if pid != sp.unk_id() and sp.id_to_piece(pid) == t:
                self.special_ids[t] = int(pid)
            else:
                self.special_ids[t] = nxt
                self.added.append(t)
                nxt += 1
        self.vocab_size = nxt
        self._sp_extra = {v: k for k, v in self.special_ids.items() if v >= base}
        settings = self._sp_settings()
        for flag, attr, piece_id, name in (
            ("add_bos_token", "prefix_ids", sp.bos_id(), "BOS"),
            ("add_eos_token", "suffix_ids", sp.eos_id(), "EOS"),
        ):
            if settings[flag]:
                if piece_id < 0:
                    raise TokenizerError(
                        f"{self.path}: {flag} is set but the model has no {name} piece"
                    )
                setattr(self, attr, (int(piece_id),))

    def _sp_settings(self) -> dict[str, bool]:
        """``add_bos_token`` / ``add_eos_token`` of a ``tokenizer_config.json`` next to the
        ``.model`` (defaults: BOS yes, EOS no, as Llama/InternLM2 slow tokenizers)."""
        settings = {"add_bos_token": True, "add_eos_token": False}
        config = self.path.parent / "tokenizer_config.json"
        if not config.is_file():
            return settings
        try:
            data = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise TokenizerError(f"{config}: not a readable JSON file ({msg})") from None
        if not isinstance(data, dict):
            raise TokenizerError(f"{config}: not a JSON object")
        for key in settings:
            value = data.get(key)
            if value is None:
                continue
            if not isinstance(value, bool):
                raise TokenizerError(f"{config}: {key} must be true or false, not {value!r}")
            settings[key] = value
        return settings

    # encoding ---------------------------------------------------------------------------

    def _encode_plain(self, text: str, context: str = "") -> list[int]:
        """Ids of ``text`` (no special tokens in it); for sentencepiece, as the continuation of
        ``context`` in one run (see the module doc)."""
        if not text:
            return []
        if self.kind == "hf":
            return self._hf.encode(text, add_special_tokens=False).ids
        # the run the text continues starts after the context's last special/control token
        context = _ALL_SPECIAL_RE.split(context)[-1]
        if not context:
            return self._sp.encode(text)
        head = self._sp.encode(context)
        whole = self._sp.encode(context + text)
        if whole[: len(head)] == head:
            return whole[len(head) :]
        return self._bare_sp().encode(text)  # a piece spans the boundary: see the module doc

    def _bare_sp(self) -> spm.SentencePieceProcessor:
        """The sentencepiece model without its dummy prefix (``normalizer_spec.
        add_dummy_prefix`` cleared, as transformers' ``legacy=False`` does), made on first use."""
        if self._sp_bare is None:
            import sentencepiece as spm
            from sentencepiece import sentencepiece_model_pb2

            try:
                proto = sentencepiece_model_pb2.ModelProto.FromString(
                    self._sp.serialized_model_proto()
                )
            except Exception as exc:  # a model sentencepiece loads but protobuf does not parse
                raise TokenizerError(
                    f"{self.path}: cannot read the model's protobuf ({type(exc).__name__})"
                ) from None
            if not proto.normalizer_spec.add_dummy_prefix:
                self._sp_bare = self._sp
            else:
                proto.normalizer_spec.add_dummy_prefix = False
                bare = spm.SentencePieceProcessor()
                bare.LoadFromSerializedProto(proto.SerializeToString())
                self._sp_bare = bare
        return self._sp_bare

    def encode_text(self, text: str, context: str = "") -> list[int]:
        """Ids of user text (grounding tokens become their ids; see the module doc).

        ``context``: the text the caller encoded right before ``text`` in the same sample, with
        no id of its own in between (``"assistant\\n"`` before an answer); sentencepiece encodes
        ``text`` as its continuation (no dummy prefix of its own), the HF path ignores it."""
        out: list[int] = []
        for k, piece in enumerate(_TEXT_SPECIAL_RE.split(text)):
            if k % 2:
                out.append(self.special_ids[piece])
            else:
                out.extend(self._encode_plain(piece, context if k == 0 else ""))
        return out

    def encode_texts(self, texts: Sequence[str]) -> list[int]:
        """Ids of consecutive texts with no id between them (a document's adjacent text parts,
        all in the loss): sentencepiece encodes them joined, as one text (the ids the whole text
        has, at the cost of one encode; see the module doc); the HF path each on its own."""
        if self.kind == "hf":
            return [i for text in texts for i in self.encode_text(text)]
        return self.encode_text("".join(texts))

    def encode_markup(self, text: str) -> list[int]:
        """Ids of template text (no user content): plain encoding, nothing is checked."""
        return self._encode_plain(text)

    def encode_prompt(self, text: str) -> list[int]:
        """Ids of a rendered prompt as an HF tokenizer gives them with
        ``add_special_tokens=False``: every special and control token is its id, the text
        between them is encoded plainly (for ``tokenizer.json`` the backend with its own added
        tokens, for sentencepiece each run between them with one encode, the dummy prefix at its
        start). Without :attr:`prefix_ids` / :attr:`suffix_ids`."""
        if self.kind == "hf":
            return self._hf.encode(text, add_special_tokens=False).ids if text else []
        out: list[int] = []
        for k, piece in enumerate(_ALL_SPECIAL_RE.split(text)):
            if k % 2:
                out.append(self.special_ids[piece])
            else:
                out.extend(self._encode_plain(piece))
        return out

    @staticmethod
    def find_reserved(text: str) -> str | None:
        """The first reserved string occurring in ``text``, or None."""
        m = _RESERVED_RE.search(text)
        return m.group(0) if m else None

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids`` with special tokens written out."""
        if self.kind == "hf":
            return self._hf.decode(list(map(int, ids)), skip_special_tokens=False)
        out, run = [], []
        for i in map(int, ids):
            if i in self._sp_extra:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._sp_extra[i])
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)

    def describe(self) -> dict:
        """The manifest's ``tokenizer`` entry; a sentencepiece one names the tokenisation
        rule (:data:`SENTENCEPIECE_RULE`), an HF one is as it has always been."""
        entry = {
            "kind": self.kind,
            "file": self.path.name,
            "file_sha256": self.file_sha256,
            "fingerprint": self.fingerprint,
            "special_ids": dict(self.special_ids),
            "added_tokens": list(self.added),
            "vocab_size": self.vocab_size,
        }
        if self.kind == "sentencepiece":
            entry["rule"] = SENTENCEPIECE_RULE
        return entry


def fingerprints(entry: dict) -> set[str]:
    """The fingerprints a manifest's ``tokenizer`` entry stands for: the indexed file's and its
    corpus copy's (``copy_fingerprint``: the copy holds the added NaViL tokens, so its file,
    and so its fingerprint, differs from the user's original when tokens were added)."""
    return {fp for fp in (entry.get("fingerprint"), entry.get("copy_fingerprint")) if fp}


def same_tokenizer(entry: dict, tokenizer: TextTokenizer) -> bool:
    """Whether ``tokenizer`` (the original file or the corpus copy) is the one a manifest's
    ``tokenizer`` entry was indexed with."""
    return tokenizer.fingerprint in fingerprints(entry)
