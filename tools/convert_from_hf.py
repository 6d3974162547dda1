#!/usr/bin/env python
"""Hugging Face -> megatron_navil dist checkpoint, at a chosen TP/PP/EP layout.

Two sources::

    # an HF NaViL directory (exported by convert_to_hf.py, or the official release format)
    python tools/convert_from_hf.py navil --hf runs/tiny/hf --output runs/from_hf --tp 2 --pp 2

    # an HF LLM (Llama/Mistral, Qwen3, InternLM2) -> an initial NaViL: text weights mapped,
    # visual experts copied from the text experts, vision encoder + connector fresh
    python tools/convert_from_hf.py llm --hf Qwen3-8B/ --config navil-9b \\
        --tokenizer Qwen3-8B/tokenizer.json --output runs/navil9b_init --tp 8 --pp 4

The output is ``OUTPUT/iter_0000000`` (model only, no optimizer) written by the real model in
the chosen layout through ``checkpoint/store.py``, with ``navil_config.json`` (the model
config it holds; for an LLM import the language part comes from the LLM, its vocabulary
padded to hold every tokenizer and special id: --make-vocab-size-divisible-by). It spawns
TP x PP x DP gloo processes on this machine (DP the least that fits EP x ETP). Every source
tensor must map and every expected tensor must be there, or the conversion stops naming it;
a layout the model does not split into (9 heads at TP 2, 30 layers over PP 4 without
--first-stage-layers) stops before any rank starts. Exit status 2 on bad input.

LLM families: Llama / Mistral / Qwen2-style layouts without biases (SmolLM, ...), Qwen3 (with
its per-head QK-norm) and InternLM2, all with SwiGLU, RMSNorm and plain RoPE. Refused with the
reason: attention or MLP biases (Qwen2, Qwen2.5), scaled RoPE (Llama 3.1+ 'llama3', YaRN),
other activations.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from megatron_navil.cli import OneLineParser, nonneg_int, positive_int

PROG = "convert_from_hf.py"


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "source",
        choices=("navil", "llm"),
        help="navil: an HF NaViL directory; llm: an HF causal LM to initialise NaViL from",
    )
    p.add_argument("--hf", required=True, metavar="DIR", help="the HF directory to read")
    p.add_argument("--output", required=True, metavar="DIR", help="new (or empty) save directory")
    p.add_argument(
        "--config",
        metavar="NAME|PATH",
        help="model config (a registered name, a navil_config.json or a checkpoint carrying "
        "one). navil: optional, checked against the HF config.json; "
        "llm: required, gives the vision encoder, connector and image rules",
    )
    p.add_argument("--tp", type=positive_int, default=1, help="tensor-parallel size (1)")
    p.add_argument("--pp", type=positive_int, default=1, help="pipeline-parallel size (1)")
    p.add_argument("--ep", type=positive_int, default=1, help="expert-parallel size (1)")
    p.add_argument("--etp", type=positive_int, help="expert tensor-parallel size (default: --tp)")
    p.add_argument(
        "--first-stage-layers",
        type=nonneg_int,
        metavar="N",
        help="LLM layers on pipeline stage 0 (which also holds the vision tower); the rest "
        "split over the other stages (default: an even split, which must divide)",
    )
    p.add_argument(
        "--tokenizer",
        metavar="FILE",
        help="the tokenizer (tokenizer.json / tokenizer.model, or a directory) whose 12 NaViL "
        "special token ids the model uses; navil: default the --hf directory's tokenizer; "
        "llm: the tokenizer.json to train with",
    )
    p.add_argument(
        "--special-token-ids",
        type=int,
        nargs=12,
        metavar="ID",
        help="llm: the 12 special token ids when there is no --tokenizer and the config does "
        "not fix them",
    )
    p.add_argument(
        "--make-vocab-size-divisible-by",
        type=positive_int,
        default=128,
        metavar="N",
        help="llm: NaViL's vocabulary is max(the LLM's vocab_size, the tokenizer's ids, the "
        "largest special id + 1) padded up to a multiple of N x --tp (Megatron-LM's rule; "
        "default 128), unless the LLM's own size already holds them and splits over --tp; "
        "embedding and LM-head rows beyond the LLM's are initialised to the mean of its "
        "rows, and the log says how many",
    )
    p.add_argument(
        "--seed", type=int, default=1234, help="llm: seed of the fresh vision/connector init"
    )
    return p


def _navil_ids(args: argparse.Namespace, hf: Path, config: dict, cfg) -> list[int]:
    """The 12 special-token ids of an HF NaViL directory: from --tokenizer, else the
    directory's tokenizer (the released code takes them from the tokenizer), checked against
    the ``special_token_ids`` our exports also write; every id inside the LLM vocabulary."""
    from megatron_navil.conversion import hf_config
    from megatron_navil.conversion import importer as I
    from megatron_navil.conversion.mapping import ConversionError

    written = hf_config.special_token_ids_of(config)
    source = args.tokenizer or hf
    try:
        ids = I.tokenizer_special_ids(source)
    except ConversionError:
        if args.tokenizer is not None or written is None:
            raise ConversionError(
                f"{hf}: the 12 special token ids come from the tokenizer (the official config "
                "carries none) and there is none: give --tokenizer"
            ) from None
        ids = written
    if written is not None and written != ids:
        raise ConversionError(
            f"the tokenizer ({source}) gives special token ids {ids}, config.json says {written}"
        )
    outside = [i for i in ids if not 0 <= i < cfg.language.vocab]
    if outside:
        raise ConversionError(
            f"special token ids {outside} are outside the LLM vocabulary of {cfg.language.vocab}"
        )
    print(f"special token ids from {source}: {ids}")
    return ids


def _resolve(args: argparse.Namespace):
    from megatron_navil.checkpoint.config import resolve_config
    from megatron_navil.config.compare import same_model
    from megatron_navil.config.io import config_to_dict
    from megatron_navil.conversion import hf_config
    from megatron_navil.conversion import importer as I
    from megatron_navil.conversion.mapping import ConversionError

    hf = Path(args.hf)
    if not (hf / "config.json").is_file():
        raise ConversionError(f"{hf}: no config.json")
    base = None
    if args.config is not None:
        try:
            base = resolve_config(args.config)
        except ValueError as exc:
            raise ConversionError(str(exc)) from None
    config = json.loads((hf / "config.json").read_text())
    tied = False
    if args.source == "navil":
        cfg = hf_config.from_hf_config(config, base.name if base else None)
        if base is not None:
            diff = same_model(base, cfg)
            if diff:
                raise ConversionError(f"{hf} is not a {args.config!r} model: {diff[0]}")
        ids = _navil_ids(args, hf, config, cfg)
    else:
        if base is None:
            raise ConversionError("llm needs --config (vision encoder, connector, image rules)")
        cfg, tied = I.llm_navil_config(base, hf)
        diff = same_model(base, cfg)
        for line in diff:
            print(f"note: the LLM differs from {args.config}: {line}")
        tokenizer_size = 0
        if args.tokenizer is not None:
            from megatron_navil.checkpoint.model import model_special_ids
            from megatron_navil.data.tokenizer import TextTokenizer

            tokenizer = TextTokenizer(args.tokenizer)
            ids = list(model_special_ids(tokenizer.special_ids))
            tokenizer_size = tokenizer.vocab_size
        elif args.special_token_ids is not None:
            ids = list(args.special_token_ids)
        elif cfg.special_token_first_id is not None:
            ids = list(range(cfg.special_token_first_id, cfg.special_token_first_id + 12))
        else:
            raise ConversionError("the 12 special token ids are unknown: give --tokenizer")
        # every id the tokenizer gives (the 12 NaViL ids included: the released code looks
        # them up in the LLM embedding first) must be a row: pad the vocabulary to hold them
        plan = I.llm_vocab_plan(
            cfg.language.vocab, tokenizer_size, ids, args.make_vocab_size_divisible_by, args.tp
        )
        cfg = cfg.replace(language=replace(cfg.language, vocab=plan.vocab)).validate()
        print(plan.describe())
    spec = I.ImportSpec(
        kind=args.source, source=str(hf), out=str(args.output), cfg=config_to_dict(cfg),
        special_token_ids=tuple(ids), tp=args.tp, pp=args.pp, ep=args.ep, etp=args.etp,
        seed=args.seed, tied=tied, first_stage_layers=args.first_stage_layers,
    )  # fmt: skip
    from megatron_navil.models.build import layout_problem

    problem = layout_problem(cfg, args.tp, args.pp, args.ep, args.etp, args.first_stage_layers)
    if problem is not None:
        raise ConversionError(f"layout TP={args.tp} PP={args.pp} EP={args.ep}: {problem}")
    # Check every tensor here, before spawning any rank.
    (I.NaViLSource if args.source == "navil" else I.LLMSource)(
        *((hf, cfg) if args.source == "navil" else (hf, cfg, tied))
    )
    return spec


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.filterwarnings("ignore")
    from megatron_navil.conversion import importer as I
    from megatron_navil.conversion.mapping import ConversionError
    from megatron_navil.data.tokenizer import TokenizerError

    try:
        spec = _resolve(args)
        ranks = I.world_size(spec.tp, spec.pp, spec.ep, spec.etp)
        print(
            f"writing {args.output} with {ranks} rank(s) (TP={spec.tp} PP={spec.pp} EP={spec.ep})"
        )
        start = time.perf_counter()
        # the ranks ignore warnings as this process does: the fork server they come from would
        # print megatron-core's apex/TE notices on importing it (unless the user set otherwise)
        os.environ.setdefault("PYTHONWARNINGS", "ignore")
        path = I.run_import(spec)
    except (ConversionError, TokenizerError, ValueError) as exc:
        print(f"{PROG}: error: {str(exc).strip().splitlines()[-1]}", file=sys.stderr)
        return 2
    print(f"{args.hf} -> {path} in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
