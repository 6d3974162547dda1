"""Megatron dist checkpoint (any TP/PP/EP layout) -> HF NaViL directory, streaming.

Steps: check that the checkpoint holds exactly the tensors of ``cfg`` with the right global
shapes (``mapping.check_names``: a missing or an unknown tensor fails, named); then per rule
read one global tensor (``DistCheckpointReader``), transform it to its HF tensor(s), cast,
hand them to the shard writer. Peak memory: one megatron tensor, its HF pieces and the
current output shard. Then ``config.json`` (``auto_map`` to the remote code),
``generation_config.json``, the remote-code files and, with a tokenizer, the tokenizer files
with the 12 special tokens and the chat template (``tokenizer_export.py``).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from megatron_navil.config.model import NaViLConfig
from megatron_navil.conversion import hf_config
from megatron_navil.conversion.dist_reader import DistCheckpointReader
from megatron_navil.conversion.hf_io import ShardedWriter
from megatron_navil.conversion.mapping import ConversionError, check_names, rules

HF_SOURCE = Path(__file__).resolve().parent.parent / "hf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def copy_remote_code(out: Path) -> None:
    """The standalone HF modeling files next to the weights (``trust_remote_code``)."""
    for name in hf_config.REMOTE_CODE_FILES:
        shutil.copyfile(HF_SOURCE / name, out / name)


def write_tokenizer(tokenizer_path: str | Path, out: Path, template: str) -> tuple[list[int], int]:
    """The tokenizer files (HF ``tokenizer.json`` or sentencepiece ``.model`` source) with
    NaViL's 12 special tokens and the chat template's control tokens as special tokens and the
    chat template, loadable by ``AutoTokenizer.from_pretrained(out, trust_remote_code=True)`` in
    transformers 4.51 and 5.x with the ids of ``TextTokenizer`` (see
    ``conversion/tokenizer_export.py``); returns the 12 special ids and the id of
    ``<|im_end|>`` (end of a turn: generation stops there). ConversionError for a tokenizer
    file that cannot be used."""
    from megatron_navil.conversion.tokenizer_export import write_tokenizer_files

    result = write_tokenizer_files(tokenizer_path, out, template)
    return result.special_ids, result.im_end


def export(
    checkpoint: str | Path,
    out: str | Path,
    cfg: NaViLConfig,
    *,
    special_token_ids: Sequence[int] | None = None,
    tokenizer: str | Path | None = None,
    template: str | None = None,
    system_message: str | None = None,
    dtype: str = "bfloat16",
    max_shard_bytes: int = 2 * 1024**3,
    progress: Any = None,
) -> dict[str, Any]:
    """Convert; returns a summary (tensor count, bytes, files, and ``released_code``: None
    when the authors' released code can load the result, else why not). ``template`` /
    ``system_message`` override ``cfg.prompt`` (the prompts the model was trained with).
    ``progress``: a tqdm-like object updated with the bytes of every megatron tensor read."""
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r}: one of {', '.join(DTYPES)}")
    if template is not None and template != cfg.prompt.template:
        cfg = cfg.replace(prompt=dataclasses.replace(cfg.prompt, template=template)).validate()
    if system_message is not None:
        prompt = dataclasses.replace(cfg.prompt, system_message=system_message)
        cfg = cfg.replace(prompt=prompt).validate()
    template = cfg.prompt.template
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"{out}: output directory exists and is not empty")
    table = rules(cfg)
    reader = DistCheckpointReader(checkpoint)
    check_names(reader.shapes, {r.megatron: r.shape for r in table}, str(checkpoint))
    out.mkdir(parents=True, exist_ok=True)
    ids: list[int] | None = None
    im_end: int | None = None
    if tokenizer is not None:
        ids, im_end = write_tokenizer(tokenizer, out, template)
        if special_token_ids is not None and list(special_token_ids) != ids:
            raise ConversionError(
                f"--special-token-ids {list(special_token_ids)} differ from the tokenizer's {ids}"
            )
    elif special_token_ids is not None:
        ids = [int(i) for i in special_token_ids]
    elif cfg.special_token_first_id is not None:
        ids = list(range(cfg.special_token_first_id, cfg.special_token_first_id + 12))
    else:
        raise ConversionError("the 12 special token ids are unknown: give a tokenizer or their ids")
    outside = [i for i in ids if not 0 <= i < cfg.language.vocab]
    if outside:  # the released code looks every id up in the LLM embedding first
        raise ConversionError(
            f"special token ids {outside} are outside the model's vocabulary of "
            f"{cfg.language.vocab}: the released code (and ours) looks them up in the LLM "
            "embedding first; import or train with a vocabulary padded to hold them"
        )
    target = DTYPES[dtype]
    writer = ShardedWriter(out, max_shard_bytes)
    for rule in table:
        tensor = reader.read(rule.megatron)
        if progress is not None:
            progress.update(tensor.numel() * tensor.element_size())
        for name, piece in zip(rule.hf, rule.to_hf(tensor), strict=True):
            writer.add(name, piece.to(target))
        del tensor
    files = writer.close()
    config = hf_config.to_hf_config(cfg, ids, dtype)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"do_sample": False}
    if im_end is not None:
        generation.update(eos_token_id=im_end, pad_token_id=im_end)
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    copy_remote_code(out)
    return {
        "tensors": sum(len(r.hf) for r in table),
        "bytes": writer.total,
        "files": [f.name for f in files],
        "released_code": hf_config.released_code_can_load(cfg),
    }


def checkpoint_total_bytes(checkpoint: str | Path) -> int:
    """Bytes of the model tensors of a checkpoint (for a progress bar's total)."""
    reader = DistCheckpointReader(checkpoint)
    total = 0
    for key, shape in reader.shapes.items():
        n = 1
        for s in shape:
            n *= s
        total += n * torch.empty(0, dtype=reader.dtypes[key]).element_size()
    return total
