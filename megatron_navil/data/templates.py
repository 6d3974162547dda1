"""Chat templates and sample rendering into (token ids, loss mask) with image placeholders.

Templates (../shared/NAVIL.md, "Chat templates"), written here exactly as there:

* ``internlm2-chat``: ``<|im_start|>system\\n{SYS}<|im_end|><|im_start|>user\\n{Q}<|im_end|>
  <|im_start|>assistant\\n{A}<|im_end|>`` (no newline after ``<|im_end|>``); the system block is
  written when there is a system message: the record's own ``system`` turn, else the
  renderer's ``system`` (the indexer's ``--system``, by default InternVL's default system
  message, ``config.DEFAULT_SYSTEM_MESSAGE``, as the released models are prompted and as
  InternVL's training adds it to every sample; ``--no-system`` / ``""``: none); turns repeat
  for multi-turn conversations;
* ``qwen3-chat``: the same, with the assistant prefix followed by an empty think block:
  ``<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n{A}<|im_end|>``.

Loss: the answer ``{A}`` and its ``<|im_end|>`` of every assistant turn (not the prefix).
Each ``<image>`` in a turn becomes one placeholder id (``<img>``, see data/shards/format.py); a
placeholder is never in the loss. A role header and the content of its turn are encoded as one
string between placeholders (``"user\\n" + Q``), control tokens by id, and the assistant answer
on its own: so the prompt up to the answer has exactly the ids of the generation prompt an HF
tokenizer gives at inference (``...<|im_start|>assistant\\n`` or ``...</think>\\n\\n``), and the
answer the ids of the answer alone. (Tokenizing the whole templated string at once can merge
across that boundary, e.g. byte-level BPE splits ``"\\n\\nA"`` as ``"\\n" "\\n" "A"`` but the
prompt's trailing ``"\\n\\n"`` as one token; this project follows the inference split.) A
sentencepiece tokenizer encodes the answer as the continuation of its header, and a document's
adjacent text parts as one text: the ids the whole text has there, not a dummy prefix ``▁`` of
their own (data/tokenizer.py, "Sentencepiece text runs"). A document's adjacent text parts are
checked for reserved strings together (one could end where the next begins).

Every sample starts with the tokenizer's :attr:`~TextTokenizer.prefix_ids` (no loss): what its
own special-token handling puts before a text, e.g. InternLM2's BOS ``<s>``, nothing for Qwen3
(NAVIL.md, "The released code's exact behaviour", 4: the released code tokenizes the prompt with
``tokenizer(query)``).

Other sample kinds (no template): caption pairs ``raw`` = ``<img>`` + caption + ``<|im_end|>``
(loss on caption and ``<|im_end|>``), or ``chat`` = a one-turn conversation with a fixed prompt;
text-only documents and interleaved documents = their text (and placeholders, in order)
+ ``<|im_end|>``, loss on every text token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megatron_navil.config.model import CHAT_TEMPLATES
from megatron_navil.data.tokenizer import TextTokenizer

IMAGE_MARK = "<image>"
TEMPLATES = CHAT_TEMPLATES
ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "system": "system",
}


class SampleRejected(ValueError):
    """A record that cannot become a sample; ``reason`` is the skip reason."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Rendered:
    """Token ids (placeholders included), per-token loss flags, placeholder count."""

    ids: list[int]
    mask: list[bool]
    placeholders: int = 0

    def add(self, ids: Sequence[int], loss: bool) -> None:
        self.ids.extend(ids)
        self.mask.extend([loss] * len(ids))


class Renderer:
    """Renders records with one tokenizer and template (see the module doc)."""

    def __init__(self, tok: TextTokenizer, template: str, system: str = ""):
        if template not in TEMPLATES:
            raise ValueError(f"unknown chat template {template!r}; known: {', '.join(TEMPLATES)}")
        self.tok, self.template, self.system = tok, template, system
        ids = tok.special_ids
        self.placeholder = ids["<img>"]
        self.im_start, self.im_end = ids["<|im_start|>"], ids["<|im_end|>"]
        self.think = (ids["<think>"], ids["</think>"])

    def check_text(self, text: str) -> None:
        found = self.tok.find_reserved(text)
        if found is not None:
            raise SampleRejected("reserved_token_in_text", f"text contains {found!r}")

    def _text_with_images(self, out: Rendered, text: str, loss: bool, context: str = "") -> None:
        """``text`` with each ``<image>`` as a placeholder; ``context``: the markup encoded right
        before it, which its first piece continues (``TextTokenizer.encode_text``)."""
        pieces = text.split(IMAGE_MARK)
        for k, piece in enumerate(pieces):
            if k:
                out.add([self.placeholder], False)
                out.placeholders += 1
            out.add(self.tok.encode_text(piece, context if k == 0 else ""), loss)

    def _start(self) -> Rendered:
        """A sample's start: the tokenizer's prefix (BOS where it adds one), no loss."""
        out = Rendered([], [])
        out.add(self.tok.prefix_ids, False)
        return out

    def conversation(self, turns: Sequence[tuple[str, str]]) -> Rendered:
        """``turns``: ``(role, text)`` with role ``system``/``user``/``assistant``."""
        out = self._start()
        system = self.system
        body = list(turns)
        if body and body[0][0] == "system":
            system = body.pop(0)[1]
        for role, text in [("system", system), *body] if system else body:
            self.check_text(text)
            out.add([self.im_start], False)
            if role == "assistant":
                header = "assistant\n"  # the markup the answer's first piece continues
                out.add(self.tok.encode_markup(header), False)
                if self.template == "qwen3-chat":
                    out.add([self.think[0]], False)
                    out.add(self.tok.encode_markup("\n\n"), False)
                    out.add([self.think[1]], False)
                    header = "\n\n"
                    out.add(self.tok.encode_markup(header), False)
                self._text_with_images(out, text, True, context=header)
                out.add([self.im_end], True)
            elif role in ("user", "system"):
                self._text_with_images(out, f"{role}\n{text}", False)
                out.add([self.im_end], False)
            else:
                raise SampleRejected("bad_record", f"unknown role {role!r}")
        return out

    def caption(self, caption: str, fmt: str, prompt: str) -> Rendered:
        """An image-caption pair: ``raw`` or ``chat`` (see the module doc)."""
        if fmt == "chat":
            return self.conversation([("user", f"{IMAGE_MARK}\n{prompt}"), ("assistant", caption)])
        self.check_text(caption)
        if IMAGE_MARK in caption:
            raise SampleRejected("placeholder_mismatch", "caption contains '<image>'")
        out = self._start()
        out.add([self.placeholder], False)
        out.placeholders += 1
        out.add(self.tok.encode_text(caption), True)
        out.add([self.im_end], True)
        return out

    def document(self, parts: Sequence[tuple[str, str | None]]) -> Rendered:
        """Text and images in order: ``("text", s)`` or ``("image", None)``; loss on text."""
        out = self._start()
        texts: list[str] = []  # adjacent text parts, encoded together (encode_texts)

        def flush() -> None:
            if texts:
                self.check_text("".join(texts))  # '<image>' in a document is plain text
                out.add(self.tok.encode_texts(texts), True)
                texts.clear()

        for kind, value in parts:
            if kind == "image":
                flush()
                out.add([self.placeholder], False)
                out.placeholders += 1
            else:
                assert value is not None
                texts.append(value)
        flush()
        out.add([self.im_end], True)
        return out
