"""Tokenizer classes of a NaViL HF export made from a sentencepiece ``tokenizer.model``.

This file travels inside exported checkpoints (remote code, ``trust_remote_code=True``) and
imports only ``transformers`` and ``sentencepiece``; it is written against the API common to
transformers 4.51 (the authors' pin) and 5.x. ``tokenizer_config.json`` of the export names it in
``auto_map``: ``NaViLTokenizer`` (slow, sentencepiece) and, when the exporter could write a
``tokenizer.json`` that encodes identically, ``NaViLTokenizerFast`` (that file, unchanged).

Encoding (both classes): the added tokens of ``tokenizer_config.json`` (the 12 NaViL special
tokens, the chat control tokens and the model's ``<s>``/``</s>``/``<unk>``) are cut out of the
text first and become their ids; every piece between them goes through
``SentencePieceProcessor.encode`` on its own (so each gets sentencepiece's dummy-prefix ``▁``
when the model adds one). ``add_bos_token`` / ``add_eos_token`` put ``bos_token`` before /
``eos_token`` after a text when ``add_special_tokens=True``, as Llama's and InternLM2's slow
tokenizers do.

transformers 5 drops ``add_bos_token`` / ``add_eos_token`` from ``tokenizer_config.json`` when a
``tokenizer.json`` sits next to it (the fast class takes them from that file's post-processor);
``NaViLTokenizer`` then falls back to its defaults (BOS yes, EOS no). AutoTokenizer never picks
the slow class in transformers 5 while ``auto_map`` names the fast one, so only a direct
``NaViLTokenizer.from_pretrained`` of such a directory sees those defaults.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, ClassVar

import sentencepiece as spm
from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}


class NaViLTokenizer(PreTrainedTokenizer):
    """Slow tokenizer: sentencepiece for the text between added tokens (see the module doc)."""

    vocab_files_names: ClassVar[dict[str, str]] = VOCAB_FILES_NAMES
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: Any = "<unk>",
        bos_token: Any = "<s>",
        eos_token: Any = "</s>",
        pad_token: Any = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        clean_up_tokenization_spaces: bool = False,
        **kwargs: Any,
    ):
        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.sp_model = spm.SentencePieceProcessor()
        self.sp_model.Load(vocab_file)
        super().__init__(
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            add_bos_token=add_bos_token,
            add_eos_token=add_eos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            **kwargs,
        )

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["sp_model"] = self.sp_model.serialized_model_proto()
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__ = state
        proto = state["sp_model"]
        self.sp_model = spm.SentencePieceProcessor()
        self.sp_model.LoadFromSerializedProto(proto)

    @property
    def vocab_size(self) -> int:
        """Pieces of the sentencepiece model (added tokens beyond it not counted)."""
        return self.sp_model.get_piece_size()

    def get_vocab(self) -> dict[str, int]:
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text: str, **kwargs: Any) -> list[str]:
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token: str) -> int:
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index: int) -> str:
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        """Runs of sentencepiece pieces are decoded by sentencepiece; added tokens are written
        out as they are."""
        added = self.added_tokens_encoder
        out: list[str] = []
        run: list[str] = []
        for token in tokens:
            if (token in added and added[token] >= self.vocab_size) or self._is_control(token):
                if run:
                    out.append(self.sp_model.decode(run))
                    run = []
                out.append(token)
            else:
                run.append(token)
        if run:
            out.append(self.sp_model.decode(run))
        return "".join(out)

    def _is_control(self, token: str) -> bool:
        pid = self.sp_model.piece_to_id(token)
        return self.sp_model.id_to_piece(pid) == token and (
            self.sp_model.is_control(pid) or self.sp_model.is_unknown(pid)
        )

    def build_inputs_with_special_tokens(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        out = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            out = out + bos + list(token_ids_1) + eos
        return out

    def get_special_tokens_mask(
        self,
        token_ids_0: list[int],
        token_ids_1: list[int] | None = None,
        already_has_special_tokens: bool = False,
    ) -> list[int]:
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, True)
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        out = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            out = out + bos + [0] * len(token_ids_1) + eos
        return out

    def create_token_type_ids_from_sequences(
        self, token_ids_0: list[int], token_ids_1: list[int] | None = None
    ) -> list[int]:
        first = len(self.build_inputs_with_special_tokens(token_ids_0))
        if token_ids_1 is None:
            return [0] * first
        return [0] * first + [1] * (len(self.build_inputs_with_special_tokens(token_ids_1)))

    def save_vocabulary(
        self, save_directory: str, filename_prefix: str | None = None
    ) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        target = os.path.join(save_directory, name)
        if os.path.abspath(self.vocab_file) != os.path.abspath(target):
            if os.path.isfile(self.vocab_file):
                shutil.copyfile(self.vocab_file, target)
            else:
                with open(target, "wb") as f:
                    f.write(self.sp_model.serialized_model_proto())
        return (target,)


class NaViLTokenizerFast(PreTrainedTokenizerFast):
    """Fast tokenizer: the export's ``tokenizer.json`` as written (see the module doc)."""

    vocab_files_names: ClassVar[dict[str, str]] = {
        **VOCAB_FILES_NAMES,
        "tokenizer_file": "tokenizer.json",
    }
    slow_tokenizer_class = NaViLTokenizer
    model_input_names: ClassVar[list[str]] = ["input_ids", "attention_mask"]

    def _vocab_file(self) -> str | None:
        # transformers 5 sets ``vocab_file``; 4.51 keeps it in ``init_kwargs`` only
        return getattr(self, "vocab_file", None) or self.init_kwargs.get("vocab_file")

    @property
    def can_save_slow_tokenizer(self) -> bool:
        vocab_file = self._vocab_file()
        return bool(vocab_file) and os.path.isfile(vocab_file)

    def save_vocabulary(
        self, save_directory: str, filename_prefix: str | None = None
    ) -> tuple[str]:
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        target = os.path.join(save_directory, name)
        vocab_file = self._vocab_file()
        if not vocab_file or not os.path.isfile(vocab_file):
            raise ValueError("this fast tokenizer has no tokenizer.model to save")
        if os.path.abspath(vocab_file) != os.path.abspath(target):
            shutil.copyfile(vocab_file, target)
        return (target,)
