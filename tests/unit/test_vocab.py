"""config/vocab.py: the model's vocabulary is the tokenizer's size (every special id inside it)
padded up to a multiple of ``--make-vocab-size-divisible-by`` x TP (Megatron-LM's rule)."""

from __future__ import annotations

import pytest

from megatron_navil.config.vocab import needed_vocab, padded_vocab_size


@pytest.mark.parametrize(
    ("size", "divisible_by", "tp", "want"),
    [
        (512, 128, 1, 512),  # already a multiple: unchanged
        (513, 128, 1, 640),
        (700, 128, 1, 768),
        (49164, 128, 1, 49280),  # SmolLM2's 49,152 + 12 NaViL tokens
        (151681, 128, 1, 151808),
        (151681, 128, 4, 152064),  # a multiple of 512
        (92556, 128, 8, 93184),
        (1, 128, 1, 128),
        (700, 1, 1, 700),  # no padding
        (700, 1, 3, 702),
    ],
)
def test_padded_vocab_size(size, divisible_by, tp, want):
    got = padded_vocab_size(size, divisible_by, tp)
    assert got == want
    assert got >= size and got % (divisible_by * tp) == 0 and got - size < divisible_by * tp


@pytest.mark.parametrize(
    ("args", "message"),
    [((0,), "tokenizer_size"), ((10, 0), "divisible_by"), ((10, 128, 0), "tp")],
)
def test_padded_vocab_size_rejects(args, message):
    with pytest.raises(ValueError, match=message):
        padded_vocab_size(*args)


def test_needed_vocab_counts_special_ids():
    assert needed_vocab(49152, range(49152, 49164)) == 49164  # appended after a full vocab
    assert needed_vocab(700, range(0, 12)) == 700  # inside: the tokenizer's size
    assert needed_vocab(700) == 700
    with pytest.raises(ValueError, match=">= 0"):
        needed_vocab(10, [-1])


def test_llm_import_plan_and_mean_rows():
    """conversion/importer.py: an LLM import's vocabulary and the rows it adds."""
    import torch

    from megatron_navil.conversion.importer import llm_vocab_plan, pad_vocab_rows

    # SmolLM2: 49,152 of 49,152 used, the 12 NaViL tokens appended by the tokenizer
    plan = llm_vocab_plan(49152, 49164, list(range(49152, 49164)), 128, 1)
    assert plan.vocab == 49280 and plan.new_rows == 128
    assert plan.describe() == (
        "vocab 49152 -> 49280 (12 NaViL tokens at 49152..49163 were outside the LLM's "
        "vocabulary; 128 new rows initialised to the mean embedding)"
    )
    # Qwen3: the tokens inside a vocabulary that splits over TP 8: unchanged (151936 is no
    # multiple of 128 x 8; padding it would leave the released NaViL-9B's size)
    plan = llm_vocab_plan(151936, 151681, list(range(151669, 151681)), 128, 8)
    assert plan.vocab == 151936 and plan.new_rows == 0
    assert plan.describe().startswith("vocab 151936 (")
    # a size TP does not divide is padded even when every id fits
    assert llm_vocab_plan(32001, 32001, list(range(12)), 128, 2).vocab == 32256
    assert llm_vocab_plan(32001, 32001, list(range(12)), 128, 1).vocab == 32001

    weight = torch.randn(5, 3) + torch.arange(5.0)[:, None]
    padded = pad_vocab_rows(weight, 8)
    assert padded.shape == (8, 3) and torch.equal(padded[:5], weight)
    assert torch.allclose(padded[5:], weight.mean(0).expand(3, -1))
    assert pad_vocab_rows(weight, 5) is weight
    with pytest.raises(ValueError, match="cannot pad 5"):
        pad_vocab_rows(weight, 4)
