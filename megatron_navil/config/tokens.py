"""The image/token contract, declared once: the label of positions without loss and the named
special tokens the data, the model, generation and the tokenizer export agree on.

``hf/`` (standalone remote code shipped with exports) keeps its own copies on purpose;
``tests/unit/test_hf_processing.py`` holds them equal to these.
"""

from __future__ import annotations

IGNORE_INDEX = -100
"""Label of positions without loss (prompts, image blocks, the last token of a sample,
padding): the data pipeline writes it, the model's loss and the training step skip it."""

SPECIAL_TOKENS: tuple[str, ...] = (
    "</box>",
    "<box>",
    "<IMG_CONTEXT>",
    "</img>",
    "<img>",
    "</quad>",
    "<quad>",
    "</ref>",
    "<ref>",
    "<img_uncond>",
    "<IMG_LINE_BREAK>",
    "<IMG_FRAME_BREAK>",
)
"""The 12 special tokens, in the row order of the ``special_token_embedding`` table."""

VISUAL_TOKENS: tuple[str, ...] = ("<IMG_CONTEXT>", "<img>")
"""Tokens routed to the visual experts; every other token (line/scale breaks, ``</img>``,
generated text) uses the text experts."""

IMAGE_BLOCK_TOKENS: tuple[str, ...] = (
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<IMG_LINE_BREAK>",
    "<IMG_FRAME_BREAK>",
)
"""The tokens of an image block, never generated: an ``<IMG_CONTEXT>`` without its patches
cannot be fed back into the model."""

CONTROL_TOKENS: tuple[str, ...] = ("<|im_start|>", "<|im_end|>", "<think>", "</think>")
"""Chat-template control tokens a tokenizer must hold besides the 12 special ones."""

TEXT_SPECIALS: tuple[str, ...] = ("</box>", "<box>", "</quad>", "<quad>", "</ref>", "<ref>")
"""Special tokens allowed inside user text (grounding markup)."""
