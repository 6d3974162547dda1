"""A checkpoint's model, for inference: the special-token ids the model is built with, a cheap
check that a checkpoint holds a given config's model, and the whole model loaded from it.

One process, TP = PP = EP = 1: the caller initialises megatron_navil.parallel (a 1-rank group).
Captioning, the HF parity checks and the tools load models through here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from megatron_navil.checkpoint.errors import CheckpointError
from megatron_navil.checkpoint.store import load
from megatron_navil.config.model import NaViLConfig
from megatron_navil.config.tokens import SPECIAL_TOKENS


def model_special_ids(special_ids: Mapping[str, int]) -> tuple[int, ...]:
    """The 12 special-token ids in ``SPECIAL_TOKENS`` order, as the model needs them, from a
    tokenizer's token -> id map (``TextTokenizer.special_ids``, a corpus manifest's
    ``tokenizer.special_ids``). ValueError naming the tokens it lacks."""
    missing = [t for t in SPECIAL_TOKENS if t not in special_ids]
    if missing:
        raise ValueError(f"the tokenizer lacks special tokens {missing}")
    return tuple(int(special_ids[t]) for t in SPECIAL_TOKENS)


def check_checkpoint(cfg: NaViLConfig, checkpoint: str | Path) -> None:
    """Cheap check (the checkpoint's tensor metadata only, nothing is allocated) that
    ``checkpoint`` holds a model of ``cfg``'s shape: LM vocabulary and width, LLM layers,
    vision width, patch size and depth. CheckpointError naming the first difference."""
    from megatron.core import dist_checkpointing

    try:
        meta = dist_checkpointing.load_tensors_metadata(str(checkpoint))
    except Exception as exc:
        raise CheckpointError(f"{checkpoint}: unreadable checkpoint metadata ({exc})") from None
    shapes = {k: tuple(v.global_shape) for k, v in meta.items()}

    def layers(prefix: str) -> int:
        found = [re.match(re.escape(prefix) + r"(\d+)\.", k) for k in shapes]
        return 1 + max((int(m.group(1)) for m in found if m), default=-1)

    v, lm = cfg.vision, cfg.language
    expected = {
        "embedding.weight": (lm.vocab, lm.hidden),
        "output_layer.weight": (lm.vocab, lm.hidden),
        "vision_model.embeddings.patch_embedding.weight": (v.width, v.channels * v.patch**2),
        "LLM layers": lm.layers,
        "vision layers": v.depth,
    }
    found = {
        "LLM layers": layers("layers."),
        "vision layers": layers("vision_model.encoder.layers."),
    }
    for key, want in expected.items():
        got = found[key] if key in found else shapes.get(key)
        if got != want:
            raise CheckpointError(
                f"{checkpoint} does not hold a {cfg.name!r} model: {key} is {got}, "
                f"{cfg.name} has {want}"
            )


def load_model(
    cfg: NaViLConfig, checkpoint: str | Path, special_ids: Mapping[str, int], groups: Any
) -> Any:
    """The whole model (one stage, TP = PP = EP = 1) with the weights of ``checkpoint`` (a
    complete ``iter_*`` directory, saved in any layout), in eval mode; ``special_ids``: the
    tokenizer's token -> id map (:func:`model_special_ids`); ``groups``: those of a 1-rank
    parallel state (``megatron_navil.parallel.initialize()``). CheckpointError for a tokenizer
    or checkpoint that does not fit ``cfg``."""
    from megatron_navil.models.build import build_model, transformer_config

    sizes = (groups.tp.size(), groups.pp_size, groups.ep.size())
    if sizes != (1, 1, 1):
        raise RuntimeError(f"inference runs at TP=PP=EP=1, the parallel state has {sizes}")
    ids = model_special_ids(special_ids)
    if max(ids) >= cfg.language.vocab:
        raise CheckpointError(
            f"tokenizer special ids up to {max(ids)} do not fit {cfg.name}'s vocabulary "
            f"of {cfg.language.vocab} (import or train with a vocabulary padded to hold them)"
        )
    (model,) = build_model(cfg, transformer_config(cfg), groups, special_ids=ids)
    try:
        load(checkpoint, [model], None)
    except Exception as exc:  # megatron-core reports shape/key mismatches in many ways
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"cannot load {checkpoint} into the {cfg.name!r} model ({first[:300]})"
        ) from exc
    if torch.cuda.is_available():  # megatron-core's GPU path (parameters are built on CPU)
        model = model.cuda()
    return model.eval()
