"""Train NaViL: ``torchrun --nproc-per-node N -m megatron_navil.train --data SHARDS ...``.

Wires the pieces: process groups and the CPU shim (``parallel``), the model for this rank's
pipeline stages (``models.build``), the stage recipe's freezing, megatron-core DDP, distributed
AdamW and LR schedule (``training``), the packed-sequence loader over indexed shards
(``data``), and the loop with checkpoints, resume and logging (``training.loop``).
``--help`` lists every option; ``--dry-run`` prints the resolved setup and exits.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import warnings
from typing import Any

import torch

from megatron_navil.cli import OneLineParser, add_options, options_from_args
from megatron_navil.config.vocab import needed_vocab, padded_vocab_size
from megatron_navil.training.flops import batch_flops, detect_peak_flops, step_model_flops
from megatron_navil.training.microbatch import LoaderSource
from megatron_navil.training.options import CheckpointOptions, TrainConfig


def build_parser() -> argparse.ArgumentParser:
    """The command line, generated from ``training.options.TrainConfig`` (its fields are the
    flags, its groups the sections of ``--help``)."""
    # errors are one line (no usage block): several ranks print them into one torchrun log
    p = OneLineParser(
        prog="python -m megatron_navil.train",
        description="Train NaViL with megatron-core parallelism (run it under torchrun; one "
        "process without).",
    )
    add_options(p, TrainConfig)
    return p


def parse_config(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.ArgumentParser]:
    """The run's ``TrainConfig`` from ``argv`` (bad values exit 2 with one line)."""
    parser = build_parser()
    tc = options_from_args(TrainConfig, parser.parse_args(argv))
    assert isinstance(tc, TrainConfig)
    return tc, parser


def place_chunks(chunks: list[Any], mcore_config: Any, device: torch.device) -> list[Any]:
    """Move each model chunk to ``device`` and, when ``mcore_config.bf16``, wrap it in
    megatron-core's Float16Module (bf16 weights; the optimizer keeps fp32 master copies),
    in Megatron-LM's order: device, then precision, then DDP."""
    from megatron.core.transformer.module import Float16Module

    placed = [chunk.to(device) for chunk in chunks]
    if mcore_config.bf16:
        placed = [Float16Module(mcore_config, chunk) for chunk in placed]
    return placed


def mfu_peak_flops(peak_tflops: float | None) -> float | None:
    """Peak FLOP/s per GPU for MFU: ``--peak-tflops``, else the detected GPU's, else None
    (CPU: MFU against a GPU peak would mean nothing, so it is not logged)."""
    if peak_tflops is not None:
        return peak_tflops * 1e12
    return detect_peak_flops()


def init_weights(ck: CheckpointOptions, chunks: list[Any], rank0: bool) -> None:
    """``--init``: load the model weights (only) of the newest complete checkpoint in
    ``ck.init`` into ``chunks``, unless ``--load`` has a checkpoint to resume (a restarted
    stage continues from its own checkpoint, not from the previous stage's)."""
    from megatron_navil.checkpoint.directory import latest
    from megatron_navil.checkpoint.store import load_weights

    if not ck.init or (ck.load and latest(ck.load) is not None):
        return
    path = latest(ck.init)  # main() checked there is one
    load_weights(path, chunks)
    if rank0:
        print(f"initialised the model from {path}", flush=True)


def open_eval_data(
    paths: list[str] | None, train: Any, parser: argparse.ArgumentParser
) -> list[Any]:
    """The ``--eval-data`` corpora, opened and checked against the first ``--data`` corpus
    ``train``: the same tokenizer and image settings (``data.assemble.check_compatible``) and
    a sample at least; errors are one line."""
    from megatron_navil.data import ShardDataset
    from megatron_navil.data.assemble import check_compatible

    out = []
    for path in paths or []:
        try:
            d = ShardDataset(path, verify="size")
        except (OSError, ValueError) as exc:
            parser.error(f"--eval-data: {exc}")
        if len(d) == 0:
            parser.error(f"--eval-data {path}: the corpus holds no sample")
        try:
            check_compatible([train, d])
        except ValueError as exc:
            parser.error(f"--eval-data {path}: {exc}")
        out.append(d)
    return out


def eval_sets_of(
    tc: TrainConfig, datasets: list[Any], cfg: Any, groups: Any, device: Any
) -> list[Any]:
    """One ``training.evaluate.EvalSet`` per held-out corpus: its own packed-sequence loader
    (the training's sequence length, patch budget, global batch and loss weighting; seed
    fixed), this rank's data-parallel share (``groups``: ``parallel.ParallelGroups``)."""
    from megatron_navil.data.loader import build_data_loader
    from megatron_navil.training.evaluate import EvalSet, set_names

    sets, dp, dp_rank, data = [], groups.dp_size, groups.dp_rank, tc.data
    for name, d in zip(set_names([str(d.root) for d in datasets]), datasets, strict=True):
        loader = build_data_loader(
            [d], seq_length=data.seq_length, global_batch=data.global_batch,
            max_patches=data.max_patches, seed=tc.optim.seed, dp_rank=dp_rank, dp_size=dp,
            loss_weighting=data.loss_weighting,
            pixels=groups.is_first_stage(), vision_window_size=cfg.vision.window_size,
        )  # fmt: skip
        sets.append(EvalSet(name, LoaderSource(loader, data.global_batch // dp, device)))
    return sets


def data_costs(data: Any, cfg: Any) -> dict[str, Any]:
    """The loader's cost arguments (``build_data_loader``) of ``--balance-data`` and
    ``--max-sequence-cost`` (``data``: the ``DataOptions``) for model ``cfg``."""
    from megatron_navil.training.flops import cost_model

    costs = cost_model(cfg)
    budget = None
    if data.max_sequence_cost is not None:  # a multiple of one full-length text sample's
        budget = data.max_sequence_cost * float(costs.flops([data.seq_length], [0], [0])[0])
    balance = {"auto": None, "on": True, "off": False}[data.balance_data]
    return {"cost_model": costs, "max_sequence_cost": budget, "balance": balance}


def corpus_image_config(cfg: Any, images: list[dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    """``cfg`` with the image preprocessing of the corpora it trains on (``images``: each
    manifest's ``image`` section), and the fields that changed. The checkpoint's config then
    says how the training images were prepared (e.g. corpora indexed with
    ``--no-multi-scale``), so captioning and the HF export prepare images the same way; a
    field on which a blend's corpora disagree keeps ``cfg``'s value. The patch size and merge
    are the model's: a corpus with others is a ValueError."""
    from megatron_navil.config.model import ImageConfig
    from megatron_navil.ops.geometry import ImageGeometry

    for image in images:
        for key, want in (("patch", cfg.vision.patch), ("merge", cfg.connector.merge)):
            if key in image and int(image[key]) != want:
                raise ValueError(
                    f"the corpus was indexed with {key} {image[key]}, the model's {key} is "
                    f"{want} (re-index with --config {cfg.name})"
                )
    # what the manifest records (ops.ImageGeometry) that is the config's image preprocessing
    geometries = [ImageGeometry.from_manifest(image) for image in images]
    changes = {}
    for name in ImageConfig.__dataclass_fields__:
        values = {getattr(g, name) for g in geometries}
        if len(values) == 1:
            value = values.pop()
            if value != getattr(cfg.image, name):
                changes[name] = value
    if not changes:
        return cfg, {}
    image_cfg = dataclasses.replace(cfg.image, **changes)
    return dataclasses.replace(cfg, image=image_cfg).validate(), changes


def corpus_prompt_config(cfg: Any, settings: list[dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    """``cfg`` with the chat template and system message the corpora were rendered with
    (``settings``: each manifest's ``settings``), and the fields that changed; a field on
    which a blend's corpora disagree keeps ``cfg``'s value. The checkpoint's config then says
    how its prompts looked, for captioning and the HF export."""
    changes = {}
    for field, key in (("template", "template"), ("system_message", "system")):
        values = {s.get(key) for s in settings}
        if len(values) == 1 and None not in values:
            value = values.pop()
            if value != getattr(cfg.prompt, field):
                changes[field] = value
    if not changes:
        return cfg, {}
    prompt = dataclasses.replace(cfg.prompt, **changes)
    return dataclasses.replace(cfg, prompt=prompt).validate(), changes


def corpus_vocab_config(
    cfg: Any, manifests: list[dict[str, Any]], divisible_by: int, tp: int, checkpoint: str | None
) -> tuple[Any, str | None]:
    """``cfg`` with a vocabulary that holds the corpora's tokenizer (``manifests``: each
    corpus's manifest), and a one-line note when it changed. Needed: the tokenizer's
    ``vocab_size`` and every special id + 1 (the 12 NaViL ids are looked up in the LLM
    embedding). A vocabulary that holds them is kept (never shrunk); a smaller one becomes
    ``padded_vocab_size(needed, divisible_by, tp)``, unless the weights come from
    ``checkpoint`` (``--load``/``--init``), whose embedding has the old size: a ValueError
    telling to re-import (or re-train) with a padded vocabulary."""
    need = max(
        needed_vocab(int(m["tokenizer"]["vocab_size"]), m["tokenizer"]["special_ids"].values())
        for m in manifests
    )
    have = cfg.language.vocab
    if need <= have:
        return cfg, None
    if checkpoint is not None:
        raise ValueError(
            f"the corpus tokenizer needs {need} vocabulary rows (ids and special ids), the "
            f"checkpoint {checkpoint} has {have}: re-import it with a padded vocabulary "
            f"(tools/convert_from_hf.py llm --tokenizer TOKENIZER pads to hold it)"
        )
    new = padded_vocab_size(need, divisible_by, tp)
    language = dataclasses.replace(cfg.language, vocab=new)
    note = (
        f"vocab {have} -> {new}: the corpus tokenizer needs {need} ids > {cfg.name}'s {have}; "
        f"padded to a multiple of {divisible_by * tp} (--make-vocab-size-divisible-by "
        f"{divisible_by} x TP {tp})"
    )
    return cfg.replace(language=language).validate(), note


def _model_config(config: str | None, load: str | None, init: str | None) -> Any:
    """``--config`` when given (a name, a file or a checkpoint), else the config saved with
    the checkpoint that ``--load`` resumes, else with ``--init``'s, else ``tiny``. A checkpoint
    that carries a config different from an explicit ``--config`` is a ValueError naming the
    first differing field (loading would fail later with a shape error, or worse, not at all
    for a difference of e.g. RoPE base); the image preprocessing is not compared, the corpus
    sets it (:func:`corpus_image_config`)."""
    from megatron_navil.checkpoint.config import checkpoint_config_file, resolve_config
    from megatron_navil.config.compare import same_model

    carried = [
        (flag, found)
        for flag, path in (("--load", load), ("--init", init))
        if path and (found := checkpoint_config_file(path)) is not None
    ]
    if config is None:
        return resolve_config(carried[0][1] if carried else "tiny")
    cfg = resolve_config(config)
    for flag, found in carried:
        saved = resolve_config(found)
        if saved.language.vocab > cfg.language.vocab:
            # a checkpoint of this config trained on a larger tokenizer: its vocabulary was
            # padded from the tokenizer (corpus_vocab_config), and its weights have that size
            cfg = cfg.replace(
                language=dataclasses.replace(cfg.language, vocab=saved.language.vocab)
            ).validate()
        diff = [d for d in same_model(cfg, saved) if not d.startswith(("image.", "prompt."))]
        if diff:
            raise ValueError(
                f"--config {config} differs from the {flag} checkpoint's model ({found}): {diff[0]}"
            )
    return cfg


def main(argv: list[str] | None = None) -> int:
    tc, parser = parse_config(argv)
    from megatron_navil.training.recipes import get_stage

    ck, optim = tc.checkpoint, tc.optim
    try:
        cfg = _model_config(tc.layout.config, ck.load, ck.init)
        recipe = get_stage(optim.stage)
    except ValueError as exc:
        parser.error(str(exc))
    warmup = recipe.warmup_steps if optim.warmup is None else optim.warmup
    if not 0 <= warmup <= optim.steps:
        default = " (the stage's default)" if optim.warmup is None else ""
        parser.error(f"--warmup {warmup}{default} must be in [0, --steps {optim.steps}]")
    if ck.init:
        from megatron_navil.checkpoint.directory import latest

        if latest(ck.init) is None:
            parser.error(f"--init {ck.init}: no complete checkpoint (iter_NNNNNNN) there")
    from megatron_navil.parallel.context import split_problem

    problem = split_problem(tc.data.seq_length, tc.layout.cp, tc.layout.tp)
    if tc.layout.cp > 1 and problem:
        parser.error(f"--seq-length {tc.data.seq_length} with --cp {tc.layout.cp}: {problem}")
    if tc.layout.cp > 1 and tc.layout.vision_parallel == "dp":
        parser.error("--cp runs the vision tower data-parallel over the CP ranks; it does not "
                     "combine with --vision-parallel dp (use tp or auto)")  # fmt: skip
    from megatron_navil.training.profiling import check_profile_args

    rt = tc.runtime
    try:
        check_profile_args(rt.profile_steps, rt.nvtx, tc.log.log_dir, torch.cuda.is_available())
    except ValueError as exc:
        parser.error(str(exc))
    # Library notices that are not the user's to act on, printed by every rank (each step for
    # some): megatron-core's apex/TE fallbacks and torch's deprecations inside megatron-core.
    warnings.filterwarnings("ignore", module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    return run(tc, cfg, recipe, parser)


def run(tc: TrainConfig, cfg: Any, recipe: Any, parser: argparse.ArgumentParser) -> int:
    """Build and train (``main`` checked the options that need no process group)."""
    from megatron_navil.checkpoint.directory import latest
    from megatron_navil.checkpoint.errors import CheckpointLayoutError
    from megatron_navil.checkpoint.model import model_special_ids
    from megatron_navil.config.model import Recompute
    from megatron_navil.data import ShardDataset
    from megatron_navil.data.loader import build_data_loader
    from megatron_navil.models.build import (
        build_model,
        moe_path_of,
        resolve_vision_parallel,
        transformer_config,
    )
    from megatron_navil.parallel import initialize
    from megatron_navil.training.loop import LoopConfig, train
    from megatron_navil.training.optim import (
        build_optimizer,
        build_scheduler,
        initialize_tp_comm_overlap,
        resolve_overlap,
        te_importable,
        use_distributed_optimizer,
        wrap_ddp,
    )
    from megatron_navil.training.profiling import parse_profile_steps
    from megatron_navil.training.recipes import apply_freezing

    lay, data, optim, ck, log = tc.layout, tc.data, tc.optim, tc.checkpoint, tc.log
    try:
        datasets = [ShardDataset(d, verify="size") for d in data.data]
    except (OSError, ValueError) as exc:
        parser.error(f"--data: {exc}")
    for path, d in zip(data.data, datasets, strict=True):
        if len(d) == 0:  # the blend needs a sample of every corpus
            skipped = d.manifest.get("counts", {}).get("skipped", 0)
            parser.error(f"--data {path}: the corpus holds no sample ({skipped:,} records were "
                         "skipped at indexing; see its manifest.json 'skipped')")  # fmt: skip
    try:
        special = model_special_ids(datasets[0].manifest["tokenizer"]["special_ids"])
    except ValueError as exc:
        parser.error(f"--data {data.data[0]}: {exc}")
    eval_datasets = open_eval_data(tc.eval.eval_data, datasets[0], parser)
    try:
        cfg, image_changes = corpus_image_config(cfg, [d.manifest["image"] for d in datasets])
        cfg, prompt_changes = corpus_prompt_config(cfg, [d.manifest["settings"] for d in datasets])
    except ValueError as exc:
        parser.error(f"--data: {exc}")

    resumed = ck.load and latest(ck.load) is not None
    weights = str(latest(ck.load)) if resumed else (str(latest(ck.init)) if ck.init else None)
    try:
        cfg, vocab_note = corpus_vocab_config(
            cfg, [d.manifest for d in datasets], lay.make_vocab_size_divisible_by, lay.tp, weights
        )
    except ValueError as exc:
        parser.error(str(exc))

    layout = lay.as_layout()
    try:
        groups = initialize(**layout, seed=optim.seed)
    except ValueError as exc:  # a layout that does not fit the world size
        parser.error(str(exc))
    cuda = torch.cuda.is_available()
    dp, dp_rank = groups.dp_size, groups.dp_rank
    if data.global_batch % dp:
        parser.error(f"--global-batch {data.global_batch} is not a multiple of DP={dp}")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    bf16 = lay.precision == "bf16" or (lay.precision == "auto" and cuda)
    dtype = torch.bfloat16 if bf16 else torch.float32
    fast = tc.fast
    try:
        distributed_optimizer = use_distributed_optimizer(fast.use_distributed_optimizer, groups)
        overlap = resolve_overlap(
            grad_reduce=fast.overlap_grad_reduce, param_gather=fast.overlap_param_gather,
            p2p=fast.overlap_p2p_comm, tp_comm=fast.tp_comm_overlap,
            bucket_size=fast.ddp_bucket_size, distributed_optimizer=distributed_optimizer,
            vpp=lay.vpp, cuda=cuda, te_available=te_importable(),
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    mcore_config = transformer_config(
        cfg, **layout, dtype=dtype, overlap_p2p_comm=overlap.p2p, tp_comm_overlap=overlap.tp_comm
    )
    recompute = Recompute(llm=lay.recompute_llm, vision=lay.recompute_vision)
    # under --cp the CP ranks share the images (models/vision_dp.py), the TP ranks do not
    vision_parallel = (
        "tp" if lay.cp > 1 else resolve_vision_parallel(lay.vision_parallel, cfg, lay.tp)
    )
    from megatron_navil.models.impl import (
        BackendUnavailable,
        resolve_attention_backend,
        resolve_transformer_impl,
    )

    try:
        impl = resolve_transformer_impl(tc.fast.transformer_impl, cuda)
        attention = resolve_attention_backend(tc.fast.attention_backend, cuda, dtype)
    except BackendUnavailable as exc:
        parser.error(str(exc))
    try:
        chunks = build_model(
            cfg, mcore_config, groups, special_ids=special,
            first_stage_layers=lay.first_stage_layers, recompute=recompute,
            init_seed=optim.seed, transformer_impl=impl, attention_backend=attention,
            moe_path=tc.fast.moe_path, vision_parallel=vision_parallel,
        )  # fmt: skip
    except ValueError as exc:  # --moe-path split where it does not apply
        if "moe_path" not in str(exc):
            raise
        parser.error(f"--moe-path: {exc}")
    frozen = apply_freezing(chunks, recipe)
    chunks = place_chunks(chunks, mcore_config, device)
    rank0 = torch.distributed.get_rank() == 0
    if rank0 and vocab_note:
        print(vocab_note, flush=True)
    if rank0:
        print(json.dumps({
            "config": cfg.name, "stage": recipe.name, "world": torch.distributed.get_world_size(),
            "layout": {**layout, "dp": dp}, "trainable_params_rank0": frozen["trainable"],
            "frozen_params_rank0": frozen["frozen"], "data": data.data,
            "global_batch": data.global_batch, "seq_length": data.seq_length,
            "device": str(device), "precision": "bf16" if bf16 else "fp32",
            "transformer_impl": impl, "attention_backend": attention,
            "moe_path": moe_path_of(chunks), "vision_parallel": vision_parallel,
            "optimizer": "distributed" if distributed_optimizer else "plain",
            "overlap": dataclasses.asdict(overlap),
            # image settings the corpus was indexed with, where they differ from --config's
            **({"image_from_corpus": image_changes} if image_changes else {}),
            **({"prompt_from_corpus": prompt_changes} if prompt_changes else {}),
        }))  # fmt: skip
    if log.dry_run:
        return 0
    init_weights(ck, chunks, rank0)
    if overlap.tp_comm:
        initialize_tp_comm_overlap(mcore_config, data.seq_length)
    chunks = wrap_ddp(chunks, mcore_config, distributed_optimizer, overlap)
    optimizer = build_optimizer(chunks, recipe, lr=optim.lr, min_lr=optim.min_lr,
                                clip_grad=optim.clip_grad, bf16=bf16,
                                distributed=distributed_optimizer)  # fmt: skip
    scheduler = build_scheduler(optimizer, recipe, optim.steps, lr=optim.lr,
                                warmup_steps=optim.warmup, min_lr=optim.min_lr)  # fmt: skip
    loader = build_data_loader(
        datasets, seq_length=data.seq_length, global_batch=data.global_batch,
        weights=data.data_weights, max_patches=data.max_patches, seed=optim.seed,
        dp_rank=dp_rank, dp_size=dp, loss_weighting=data.loss_weighting,
        num_workers=data.num_workers,
        # only the first pipeline stage runs the vision encoder; the others skip decoding
        pixels=groups.is_first_stage(),
        vision_window_size=cfg.vision.window_size,
        **data_costs(data, cfg),
    )  # fmt: skip
    peak = mfu_peak_flops(log.peak_tflops)
    flops_of = functools.partial(batch_flops, cfg) if peak else None
    from megatron_navil.config.tokens import IMAGE_BLOCK_TOKENS, SPECIAL_TOKENS

    block = [special[SPECIAL_TOKENS.index(t)] for t in IMAGE_BLOCK_TOKENS]  # image tokens/s
    visual_ids = torch.tensor(sorted(block))
    source = LoaderSource(loader, data.global_batch // dp, device, flops_of, visual_ids)
    eval_sets = eval_sets_of(tc, eval_datasets, cfg, groups, device)
    loop = LoopConfig(
        steps=optim.steps, exit_after=optim.exit_after, seq_length=data.seq_length,
        save_dir=ck.save, save_interval=ck.save_interval, keep_last=ck.keep_last,
        load_dir=ck.load, log_dir=log.log_dir, nan_policy=optim.nan_policy,
        progress_bar=not log.no_progress and rank0,
        extra_state={"config": cfg.name, "stage": recipe.name}, model_config=cfg,
        flops_per_step=step_model_flops if peak else None, peak_flops=peak,
        eval_sets=eval_sets, eval_interval=tc.eval.eval_interval, eval_iters=tc.eval.eval_iters,
        async_save=ck.async_save, manual_gc_interval=tc.runtime.manual_gc_interval,
        profile_steps=parse_profile_steps(tc.runtime.profile_steps), nvtx=tc.runtime.nvtx,
    )  # fmt: skip
    try:
        results = train(chunks, mcore_config, groups, optimizer, scheduler, source, loop)
    except CheckpointLayoutError as exc:
        parser.error(str(exc))
    if rank0 and results:
        first, last = results[0], results[-1]
        print(
            f"done: {len(results)} steps this run (of {optim.steps}), loss {first.loss:.4f} -> "
            f"{last.loss:.4f}"
        )
    return 0


if __name__ == "__main__":
    if "MASTER_PORT" not in os.environ and "RANK" not in os.environ:
        from megatron_navil.parallel.spawn import free_port

        os.environ["MASTER_PORT"] = str(free_port())  # one process without torchrun
    sys.exit(main())
