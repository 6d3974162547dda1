"""Tokenizers for indexing: an HF ``tokenizer.json`` or a sentencepiece ``.model``.

Both are wrapped by :class:`TextTokenizer`, which guarantees that the 12 NaViL special tokens
(``config.SPECIAL_TOKENS``) and the chat template's control tokens (``<|im_start|>``,
``<|im_end|>``, ``<think>``, ``</think>``) are single ids:

* HF: tokens the vocabulary lacks are added as special tokens (``Tokenizer.add_special_tokens``,
  appended after the vocabulary, in ``SPECIAL_TOKENS`` order then the control tokens);
* sentencepiece: pieces the model has are used (``piece_to_id``, not ``<unk>``); missing ones
  get ids ``vocab_size + k`` in the same order (NaViL-2B's 92544..92555 for InternLM2).

User text is encoded by :meth:`TextTokenizer.encode_text`: the grounding tokens ``<ref> </ref>
<box> </box> <quad> </quad>`` in it become their ids, every other piece goes through the
backend without special-token handling. Reserved strings (image tokens and template control
tokens, :data:`RESERVED`) must not appear in user text; :meth:`find_reserved` finds them so the
indexer can skip such samples instead of silently routing text as image tokens.

Fingerprint: ``sha256(sha256(file bytes) + json(12 special ids))`` (:attr:`fingerprint`).
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from megatron_navil.config.model import SPECIAL_TOKENS

CONTROL_TOKENS = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
TEXT_SPECIALS = ("</box>", "<box>", "</quad>", "<quad>", "</ref>", "<ref>")
"""Special tokens allowed inside user text (grounding markup)."""
RESERVED = tuple(t for t in SPECIAL_TOKENS if t not in TEXT_SPECIALS) + CONTROL_TOKENS
"""Strings that must not occur in user text."""

_TEXT_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in TEXT_SPECIALS) + ")")
_RESERVED_RE = re.compile("|".join(re.escape(t) for t in RESERVED))


class TokenizerError(ValueError):
    """The tokenizer file cannot be used (one-line message)."""


class TextTokenizer:
    """A loaded tokenizer with NaViL's special tokens; see the module doc."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            raw = self.path.read_bytes()
        except OSError as exc:
            raise TokenizerError(f"{self.path}: cannot read tokenizer ({exc.strerror})") from None
        self.file_sha256 = hashlib.sha256(raw).hexdigest()
        self.added: list[str] = []
        if self.path.suffix == ".model":
            self.kind = "sentencepiece"
            self._init_sp(raw)
        else:
            self.kind = "hf"
            self._init_hf(raw)
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
        self._hf = tok
        self.special_ids = {t: int(tok.token_to_id(t)) for t in SPECIAL_TOKENS + CONTROL_TOKENS}
        self.vocab_size = int(tok.get_vocab_size(with_added_tokens=True))

    def _init_sp(self, raw: bytes) -> None:
        import sentencepiece as spm

        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(raw)
        except Exception as exc:
            raise TokenizerError(f"{self.path}: not a sentencepiece model ({exc})") from None
        self._sp = sp
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

    # encoding ---------------------------------------------------------------------------

    def _encode_plain(self, text: str) -> list[int]:
        if not text:
            return []
        if self.kind == "hf":
            return self._hf.encode(text, add_special_tokens=False).ids
        return self._sp.encode(text)

    def encode_text(self, text: str) -> list[int]:
        """Ids of user text (grounding tokens become their ids; see the module doc)."""
        out: list[int] = []
        for k, piece in enumerate(_TEXT_SPECIAL_RE.split(text)):
            if k % 2:
                out.append(self.special_ids[piece])
            else:
                out.extend(self._encode_plain(piece))
        return out

    def encode_markup(self, text: str) -> list[int]:
        """Ids of template text (no user content): plain encoding, nothing is checked."""
        return self._encode_plain(text)

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
        """The manifest's ``tokenizer`` entry."""
        return {
            "kind": self.kind,
            "file": self.path.name,
            "file_sha256": self.file_sha256,
            "fingerprint": self.fingerprint,
            "special_ids": dict(self.special_ids),
            "added_tokens": list(self.added),
            "vocab_size": self.vocab_size,
        }
