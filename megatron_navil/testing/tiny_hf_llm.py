"""A tiny random Hugging Face causal LM with a tokenizer of its own, as a user's LLM directory
looks: what ``examples/finetune_from_hf_llm.sh`` imports by default.

The directory (``save_pretrained`` of transformers) holds ``config.json``,
``model.safetensors`` and the tokenizer files (``tokenizer.json``, ``tokenizer_config.json``).
The LLM's ``vocab_size`` equals the tokenizer's size, as Llama's and SmolLM's do, so the 12
NaViL special tokens the indexer adds land after the LLM's vocabulary and the import must pad
it (``tools/convert_from_hf.py llm --make-vocab-size-divisible-by``). The tokenizer is a
byte-level BPE like the families' own and, like them, knows nothing of NaViL's tokens:

* ``qwen3``: ``Qwen3ForCausalLM`` (per-head QK-norm, tied embeddings as the small Qwen3s),
  Qwen's added tokens ``<|endoftext|> <|im_start|> <|im_end|> <think> </think>`` at the end
  of the vocabulary, nothing added around a text;
* ``llama``: ``LlamaForCausalLM`` (untied), Llama 3's ``<|begin_of_text|>`` and
  ``<|end_of_text|>`` at the end, ``<|begin_of_text|>`` put before every text by the
  post-processor (so every indexed sample and every prompt starts with it).

The BPE merges are learnt from ``texts`` (e.g. a corpus's captions and prompts) first, then
from seeded pseudo-words until the vocabulary is full, so the given texts tokenise compactly
and the size is exactly ``vocab_size``. Everything is a function of the arguments and
``seed``.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from pathlib import Path

ARCHS = ("qwen3", "llama")
FAMILY_TOKENS = {
    "qwen3": ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"),
    "llama": ("<|begin_of_text|>", "<|end_of_text|>"),
}
"""The added tokens of each family's tokenizer, at the end of its vocabulary in this order."""


def jsonl_texts(path: str | Path) -> list[str]:
    """Every text of an InternVL-style JSONL (conversation turns, captions, documents), the
    ``<image>`` placeholders removed; lines that are not such records are ignored."""
    out = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict):
            continue
        values = [t.get("value") for t in rec.get("conversations") or [] if isinstance(t, dict)]
        values += [rec.get("caption"), rec.get("text")]
        texts = rec.get("texts")
        values += texts if isinstance(texts, list) else []
        out += [v.replace("<image>", "").strip() for v in values if isinstance(v, str)]
    return [t for t in out if t]


def _filler(seed: int, n: int = 4000) -> list[str]:
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz"
    weights = [8, 2, 3, 4, 12, 2, 2, 6, 7, 1, 1, 4, 2, 7, 8, 2, 1, 6, 6, 9, 3, 1, 2, 1, 2, 1]
    words = ["".join(rng.choices(letters, weights, k=rng.randint(2, 9))) for _ in range(n)]
    return [" ".join(words[i : i + 12]) + "." for i in range(0, n, 12)]


def make_tokenizer(arch: str, vocab_size: int, texts: Iterable[str] = (), seed: int = 0):
    """A ``tokenizers.Tokenizer`` of exactly ``vocab_size`` ids: the family's added tokens
    last (:data:`FAMILY_TOKENS`), BPE merges from ``texts`` then from pseudo-words."""
    from tokenizers import (
        AddedToken,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    if arch not in ARCHS:
        raise ValueError(f"arch {arch!r}: one of {', '.join(ARCHS)}")
    added = FAMILY_TOKENS[arch]
    base = vocab_size - len(added)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if base <= len(alphabet):
        raise ValueError(f"vocab_size {vocab_size}: needs more than {len(alphabet) + len(added)}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    # texts repeated so their merges come first; the filler fills the rest of the vocabulary
    given = sorted(set(texts))
    trainer = trainers.BpeTrainer(vocab_size=base, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(given * 50 + _filler(seed), trainer=trainer)
    if tok.get_vocab_size() != base:
        raise ValueError(f"the BPE has {tok.get_vocab_size()} ids, not {base}: more text needed")
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    if arch == "llama":
        bos = added[0]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, base)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    assert tok.get_vocab_size(with_added_tokens=True) == vocab_size
    return tok


def write_tiny_llm(
    out: str | Path,
    arch: str = "qwen3",
    vocab_size: int = 1000,
    texts: Iterable[str] = (),
    seed: int = 0,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    kv_heads: int = 2,
    ffn: int = 128,
) -> Path:
    """Write the random LLM and its tokenizer to ``out`` (created); returns ``out``."""
    import torch
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    tok = make_tokenizer(arch, vocab_size, texts, seed)
    added = FAMILY_TOKENS[arch]
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
        head_dim=hidden // heads, rms_norm_eps=1e-6, max_position_embeddings=4096,
        rope_theta=1e6,
    )  # fmt: skip
    ids = {t: vocab_size - len(added) + i for i, t in enumerate(added)}
    torch.manual_seed(seed)
    if arch == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(
            **common, tie_word_embeddings=True, bos_token_id=None,
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
        ))  # fmt: skip
        names = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")
    else:
        model = LlamaForCausalLM(LlamaConfig(
            **common, tie_word_embeddings=False, bos_token_id=ids["<|begin_of_text|>"],
            eos_token_id=ids["<|end_of_text|>"],
        ))  # fmt: skip
        names = dict(bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **names)
    fast.save_pretrained(str(out))
    # the tokenizer exactly as trained (save_pretrained may rewrite its post-processor)
    (out / "tokenizer.json").write_text(tok.to_str(pretty=True), encoding="utf-8")
    return out
