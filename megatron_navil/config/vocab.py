"""How big the model's vocabulary (embedding and LM-head rows) is.

Megatron-LM's rule (``--make-vocab-size-divisible-by``, default 128): the tokenizer's size
padded up to a multiple of ``divisible_by * tp``, so every tensor-parallel rank holds an equal
slice of the vocabulary-parallel embedding and LM head, each a multiple of ``divisible_by``
rows (fast GEMM shapes). Rows beyond the tokenizer are never produced by it; captioning never
samples them (``inference/generate.py``).

The size a model needs is the tokenizer's: ``max(vocab_size, max special id + 1)`` (a
tokenizer's ids are ``0 .. vocab_size - 1``; the 12 NaViL ids are looked up in the LLM
embedding first, so they must be inside it too).
"""

from __future__ import annotations

from collections.abc import Iterable

DEFAULT_DIVISIBLE_BY = 128


def needed_vocab(tokenizer_size: int, special_ids: Iterable[int] = ()) -> int:
    """Rows a model needs for a tokenizer of ``tokenizer_size`` ids whose special tokens have
    ``special_ids``: every id must be a row."""
    ids = [int(i) for i in special_ids]
    if any(i < 0 for i in ids):
        raise ValueError(f"special token ids must be >= 0, got {min(ids)}")
    return max(int(tokenizer_size), max(ids, default=-1) + 1)


def padded_vocab_size(tokenizer_size: int, divisible_by: int = DEFAULT_DIVISIBLE_BY,
                      tp: int = 1) -> int:  # fmt: skip
    """``tokenizer_size`` rounded up to a multiple of ``divisible_by * tp`` (Megatron-LM's
    ``_vocab_size_with_padding``). ValueError for a size < 1 or a multiple < 1."""
    if tokenizer_size < 1:
        raise ValueError(f"tokenizer_size must be >= 1, got {tokenizer_size}")
    if divisible_by < 1:
        raise ValueError(f"make_vocab_size_divisible_by must be >= 1, got {divisible_by}")
    if tp < 1:
        raise ValueError(f"tp must be >= 1, got {tp}")
    multiple = divisible_by * tp
    return -(-tokenizer_size // multiple) * multiple
