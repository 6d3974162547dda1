"""Greedy captioning with a loaded model (``checkpoint.model.load_model``).

Generation (:class:`Captioner`): greedy (argmax), several samples per forward packed as
training packs them (``cu_seqlens`` per sample, positions ``0..t-1`` each), the whole sequences
recomputed every step (no KV cache: the tiny model makes this cheap), until ``<|im_end|>`` or
``max_new_tokens``; packing several samples per forward gives the same captions as one at a
time, several times faster (docs/performance.md, "Captioning"). The image-block
tokens (``<img>``, ``</img>``, ``<IMG_CONTEXT>``, ``<IMG_LINE_BREAK>``, ``<IMG_FRAME_BREAK>``)
are never generated: an ``<IMG_CONTEXT>`` without its patches cannot be fed back into the
model; ids beyond the tokenizer's vocabulary neither.

Scoring lives with the synthetic corpus whose grammar it knows
(``testing.caption_scores.caption_metrics``).

One process, TP = PP = EP = 1: the caller initialises megatron_navil.parallel (a 1-rank group).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from megatron_navil.config.tokens import IMAGE_BLOCK_TOKENS
from megatron_navil.data.tokenizer import TextTokenizer
from megatron_navil.inference.inputs import STOP_TOKEN, CaptionInput, pack_inputs


@dataclass
class Generation:
    """One greedy generation."""

    token_ids: list[int]
    """Generated ids, without the stop token."""
    text: str
    """Decoded and stripped."""
    stop: str
    """``"im_end"`` or ``"max_new_tokens"``."""


class Captioner:
    """Greedy generation with a loaded model (module doc)."""

    def __init__(self, model: Any, tokenizer: TextTokenizer, max_new_tokens: int = 48):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = int(max_new_tokens)
        self.stop_id = tokenizer.special_ids[STOP_TOKEN]
        self.banned = torch.tensor([tokenizer.special_ids[t] for t in IMAGE_BLOCK_TOKENS])
        self.vocab = min(int(model.cfg.language.vocab), int(tokenizer.vocab_size))
        cfg = model.cfg
        self.window = cfg.vision.window_units(cfg.connector.merge)  # the model's token order

    @torch.no_grad()
    def next_tokens(self, inputs: Sequence[CaptionInput], ids: Sequence[torch.Tensor]) -> list[int]:
        """The argmax next token after each ``ids[i]`` (the prompt of ``inputs[i]`` + what was
        generated for it so far), all in one forward: the sequences packed one after another
        as training packs samples (:func:`pack_inputs`), so each attends only to itself."""
        param = next(self.model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        kwargs = pack_inputs(inputs, ids, self.window)
        logits = self.model(**{k: v.to(device) for k, v in kwargs.items()})  # [t, 1, V]
        ends = kwargs["cu_seqlens"][1:].long() - 1
        last = logits[ends.to(device), 0, : self.vocab].float().cpu().clone()
        last[:, self.banned] = -math.inf
        return torch.argmax(last, dim=-1).tolist()

    def generate(self, inp: CaptionInput) -> Generation:
        """Greedy generation for one input."""
        return self.generate_batch([inp])[0]

    def generate_batch(self, inputs: Sequence[CaptionInput]) -> list[Generation]:
        """Greedy generation for several inputs at once: every step one forward of the
        unfinished ones packed together (a sample's tokens do not depend on its batch: its
        attention, RoPE positions and image patches are its own)."""
        ids = [inp.input_ids for inp in inputs]
        out: list[list[int]] = [[] for _ in inputs]
        stop = ["max_new_tokens"] * len(inputs)
        live = list(range(len(inputs)))
        for _ in range(self.max_new_tokens):
            if not live:
                break
            nxt = self.next_tokens([inputs[i] for i in live], [ids[i] for i in live])
            still = []
            for i, tok in zip(live, nxt, strict=True):
                if tok == self.stop_id:
                    stop[i] = "im_end"
                    continue
                out[i].append(tok)
                ids[i] = torch.cat([ids[i], torch.tensor([tok], dtype=ids[i].dtype)])
                still.append(i)
            live = still
        return [
            Generation(o, self.tokenizer.decode(o).strip(), s)
            for o, s in zip(out, stop, strict=True)
        ]


@dataclass
class CaptionResult:
    """One sample's outcome (JSON-ready with ``asdict``)."""

    source: str
    reference: str | None
    generated: str
    stop: str
    prompt_tokens: int
    new_tokens: int
    exact: bool | None = None
    """Exact match with the reference (None without one)."""


def caption_all(
    captioner: Captioner,
    inputs: Iterable[CaptionInput],
    progress: Any = None,
    batch_size: int = 16,
) -> list[CaptionResult]:
    """Generate for every input, ``batch_size`` at a time (:meth:`Captioner.generate_batch`);
    ``progress``: a tqdm-like object to ``update(n)`` per finished batch of ``n``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    results: list[CaptionResult] = []
    batch: list[CaptionInput] = []

    def flush() -> None:
        for inp, gen in zip(batch, captioner.generate_batch(batch), strict=True):
            results.append(
                CaptionResult(
                    source=inp.source,
                    reference=inp.reference,
                    generated=gen.text,
                    stop=gen.stop,
                    prompt_tokens=int(inp.input_ids.shape[0]),
                    new_tokens=len(gen.token_ids),
                    exact=None if inp.reference is None else gen.text == inp.reference.strip(),
                )
            )
        if progress is not None:
            progress.update(len(batch))
        batch.clear()

    for inp in inputs:
        batch.append(inp)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return results
