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
from dataclasses import dataclass
from typing import Any

import torch

from megatron_navil.cli import OneLineParser
from megatron_navil.config.vocab import DEFAULT_DIVISIBLE_BY, needed_vocab, padded_vocab_size
from megatron_navil.training.flops import batch_flops, detect_peak_flops, step_model_flops
from megatron_navil.training.optim import CHOICES


def build_parser() -> argparse.ArgumentParser:
    # errors are one line (no usage block): several ranks print them into one torchrun log
    p = OneLineParser(
        prog="python -m megatron_navil.train",
        description="Train NaViL with megatron-core parallelism (run it under torchrun; one "
        "process without).",
    )
    g = p.add_argument_group("model and layout")
    g.add_argument(
        "--config",
        default=None,
        metavar="NAME|PATH",
        help="model config: a registered name (tiny, navil-2b, navil-9b), a navil_config.json, "
        "or a checkpoint carrying one (every checkpoint saved by training or by "
        "tools/convert_from_hf.py does); default: the config of the --load checkpoint, else "
        "of --init, else tiny",
    )
    g.add_argument(
        "--make-vocab-size-divisible-by",
        type=int,
        default=DEFAULT_DIVISIBLE_BY,
        metavar="N",
        help="when the corpus tokenizer (its ids and its 12 NaViL ids) does not fit the "
        "config's vocabulary, the model's vocabulary becomes the tokenizer's size padded up "
        "to a multiple of N x --tp (Megatron-LM's rule; default 128); a vocabulary that fits "
        "is kept, and a --load/--init checkpoint's vocabulary is never changed",
    )
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel size")
    g.add_argument("--pp", type=int, default=1, help="pipeline-parallel size")
    g.add_argument("--vpp", type=int, default=None, help="virtual stages per pipeline rank")
    g.add_argument("--ep", type=int, default=1, help="expert-parallel size (modality experts)")
    g.add_argument("--etp", type=int, default=None, help="expert tensor-parallel size (=tp)")
    g.add_argument(
        "--recompute-llm",
        choices=("none", "selective", "full"),
        default="none",
        help="activation recompute of the LLM decoder layers",
    )
    g.add_argument(
        "--recompute-vision",
        choices=("none", "selective", "full"),
        default="none",
        help="activation recompute of the vision encoder blocks",
    )
    g.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="bf16: bf16 weights and activations, fp32 master weights and gradient "
        "reduction; auto: bf16 on GPU, fp32 on CPU",
    )
    g.add_argument(
        "--first-stage-layers",
        type=int,
        default=None,
        help="LLM layers on pipeline stage 0 (it also holds the vision encoder)",
    )
    g = p.add_argument_group("data")
    g.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="indexed corpus directories (tools/index_corpus.py output)",
    )
    g.add_argument(
        "--data-weights",
        nargs="+",
        type=float,
        default=None,
        help="blending weight per --data corpus (default: by size)",
    )
    g.add_argument("--seq-length", type=int, default=1024, help="packed sequence length")
    g.add_argument(
        "--max-patches",
        type=int,
        default=None,
        help="vision patches per packed sequence (default: no limit)",
    )
    g.add_argument(
        "--global-batch",
        type=int,
        default=8,
        help="packed sequences per optimizer step, over all data-parallel ranks",
    )
    g.add_argument(
        "--loss-weighting",
        choices=("token", "sample", "square"),
        default="token",
        help="per-token weights: 1, 1/n or 1/sqrt(n) for a sample of n loss tokens",
    )
    g.add_argument("--num-workers", type=int, default=0, help="data-loader worker processes")
    g = p.add_argument_group("held-out evaluation")
    g.add_argument(
        "--eval-data", nargs="+", default=None, metavar="DIR",
        help="held-out indexed corpora (same tokenizer as --data): their loss, each and "
        "pooled, under the training's packing and loss weighting, logged to TensorBoard "
        "(eval/loss), progress.txt and the progress bar",
    )  # fmt: skip
    g.add_argument(
        "--eval-interval", type=int, default=0, metavar="N",
        help="evaluate every N steps and after the last step (default 0: after the last "
        "step only); the steps are the same in a resumed run",
    )  # fmt: skip
    g.add_argument(
        "--eval-iters", type=int, default=10, metavar="N",
        help="global batches (--global-batch packed sequences each) of every held-out corpus "
        "per evaluation; always its first N, so every evaluation sees the same data",
    )  # fmt: skip
    g = p.add_argument_group("optimisation")
    g.add_argument("--stage", default="s2", help="training stage recipe: s1.1, s1.2 or s2")
    g.add_argument("--steps", type=int, required=True, help="total optimizer steps")
    g.add_argument("--exit-after", type=int, default=None,
                   help="stop after this many steps of this run (saving a checkpoint); a "
                   "later run with --load continues the same schedule")  # fmt: skip
    g.add_argument("--lr", type=float, default=None, help="peak LR (default: the stage's)")
    g.add_argument("--min-lr", type=float, default=0.0, help="cosine floor")
    g.add_argument("--warmup", type=int, default=None, help="warm-up steps (default: stage's)")
    g.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip (0: off)")
    g.add_argument(
        "--nan-policy", choices=("stop", "skip"), default="stop", help="what a non-finite loss does"
    )
    g.add_argument("--seed", type=int, default=1234, help="model init and data order seed")
    g = p.add_argument_group("checkpoints and logs")
    g.add_argument("--save", default=None, help="checkpoint directory")
    g.add_argument("--save-interval", type=int, default=0, help="save every N steps")
    g.add_argument("--keep-last", type=int, default=2, help="complete checkpoints to keep")
    g.add_argument(
        "--load", default=None,
        help="resume from the newest complete checkpoint here (any layout). Our own files in a "
        "checkpoint load without pickle, but torch.distributed.checkpoint reads its .metadata "
        "file with pickle: load only checkpoints you trust (as with Megatron-LM)",
    )  # fmt: skip
    g.add_argument(
        "--init", default=None,
        help="start from the model weights of the newest complete checkpoint here (any "
        "layout; e.g. the previous stage's --save): optimizer, LR schedule, data position and "
        "iteration start afresh; ignored when --load finds a checkpoint to resume; only "
        "checkpoints you trust (see --load)",
    )  # fmt: skip
    g.add_argument("--log-dir", default=None, help="TensorBoard, progress.txt, loss_curve.png")
    g.add_argument(
        "--peak-tflops", type=float, default=None,
        help="peak TFLOP/s per GPU for the MFU log (default: the detected GPU's dense bf16 "
        "peak, 989 for H100/H200, 312 for A100; none on CPU, so no MFU unless given)",
    )  # fmt: skip
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g.add_argument(
        "--dry-run", action="store_true", help="print the resolved setup (layout, counts) and exit"
    )
    g = p.add_argument_group("optimizer and communication overlap")
    g.add_argument(
        "--use-distributed-optimizer", choices=CHOICES, default="auto",
        help="megatron-core's distributed optimizer (Adam state and fp32 master weights "
        "sharded over data-parallel ranks) or the plain one; auto: on when DP > 1 or "
        "expert-DP > 1, off otherwise (DP = 1: the same Adam, to rounding, without the flat-buffer "
        "copies). Checkpoints of either resume with the other",
    )  # fmt: skip
    g.add_argument(
        "--overlap-grad-reduce", choices=CHOICES, default="auto",
        help="overlap the DP gradient reduction with the backward (megatron-core DDP buckets); "
        "auto: on with CUDA, off on CPU (gloo runs it on the compute cores)",
    )  # fmt: skip
    g.add_argument(
        "--overlap-param-gather", choices=CHOICES, default="auto",
        help="overlap the distributed optimizer's parameter all-gather with the next forward "
        "(needs the distributed optimizer and --overlap-grad-reduce); auto: on with CUDA when "
        "both are on, off on CPU",
    )  # fmt: skip
    g.add_argument(
        "--overlap-p2p-comm", choices=CHOICES, default="auto",
        help="overlap pipeline send/recv with compute in the interleaved schedule (--vpp > 1; "
        "no effect otherwise); auto: on with CUDA, off on CPU",
    )  # fmt: skip
    g.add_argument(
        "--tp-comm-overlap", action="store_true",
        help="TransformerEngine's TP communication/GEMM overlap (userbuffers; needs "
        "TransformerEngine, TP > 1 and its layers: an error without TransformerEngine)",
    )  # fmt: skip
    g.add_argument(
        "--ddp-bucket-size", type=int, default=None,
        help="parameters per DDP gradient bucket with --overlap-grad-reduce (default: "
        "megatron-core's, max(4e7, 1e6 x DP))",
    )  # fmt: skip
    return p  # fmt: skip


@dataclass
class LoaderSource:
    """``training.loop.BatchSource`` over the packed-sequence loader: a step is this rank's
    ``global_batch / dp`` sequences, in the sampler's order."""

    loader: Any
    per_rank: int
    device: torch.device | None = None  # where the batches go (None: stay on the CPU)
    _it: Any = None
    flops_of: Any = None  # PackedBatch -> model FLOPs (``training.flops.batch_flops``), for MFU

    def next_step(self) -> list[dict[str, Any]]:
        if self._it is None:
            self._it = iter(self.loader)
        out = []
        for _ in range(self.per_rank):
            batch = next(self._it)
            # Counts from the host copy (no device sync), then the tensors to the device.
            real_tokens = int(batch.cu_seqlens[batch.num_samples])
            patches = int(batch.vision_cu_seqlens[-1])  # also where pixels were not loaded
            flops = self.flops_of(batch) if self.flops_of is not None else None
            if self.device is not None and self.device.type != "cpu":
                batch = batch.to(self.device, non_blocking=True)
            kwargs = batch.as_model_kwargs()
            kwargs["loss_weights"] = batch.loss_weights
            kwargs["num_real_tokens"] = real_tokens
            kwargs["num_patches"] = patches
            if flops is not None:
                kwargs["model_flops"] = flops
            out.append(kwargs)
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)
        self._it = None


def place_chunks(chunks: list[Any], mcore_config: Any, device: torch.device) -> list[Any]:
    """Move each model chunk to ``device`` and, when ``mcore_config.bf16``, wrap it in
    megatron-core's Float16Module (bf16 weights; the optimizer keeps fp32 master copies),
    in Megatron-LM's order: device, then precision, then DDP."""
    from megatron.core.transformer.module import Float16Module

    placed = [chunk.to(device) for chunk in chunks]
    if mcore_config.bf16:
        placed = [Float16Module(mcore_config, chunk) for chunk in placed]
    return placed


def mfu_peak_flops(args: argparse.Namespace) -> float | None:
    """Peak FLOP/s per GPU for MFU: ``--peak-tflops``, else the detected GPU's, else None
    (CPU: MFU against a GPU peak would mean nothing, so it is not logged)."""
    if args.peak_tflops is not None:
        return args.peak_tflops * 1e12
    return detect_peak_flops()


def init_weights(args: argparse.Namespace, chunks: list[Any], rank0: bool) -> None:
    """``--init``: load the model weights (only) of the newest complete checkpoint in
    ``args.init`` into ``chunks``, unless ``--load`` has a checkpoint to resume (a restarted
    stage continues from its own checkpoint, not from the previous stage's)."""
    from megatron_navil.checkpoint.directory import latest
    from megatron_navil.checkpoint.store import load_weights

    if not args.init or (args.load and latest(args.load) is not None):
        return
    path = latest(args.init)  # main() checked there is one
    load_weights(path, chunks)
    if rank0:
        print(f"initialised the model from {path}", flush=True)


def open_eval_data(
    args: argparse.Namespace, train: Any, parser: argparse.ArgumentParser
) -> list[Any]:
    """The ``--eval-data`` corpora, opened and checked against the first ``--data`` corpus
    ``train``: the same tokenizer and image settings (``data.assemble.check_compatible``) and
    a sample at least; errors are one line."""
    from megatron_navil.data import ShardDataset
    from megatron_navil.data.assemble import check_compatible

    out = []
    for path in args.eval_data or []:
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
    args: argparse.Namespace, datasets: list[Any], cfg: Any, groups: Any, device: Any
) -> list[Any]:
    """One ``training.evaluate.EvalSet`` per held-out corpus: its own packed-sequence loader
    (the training's sequence length, patch budget, global batch and loss weighting; seed
    fixed), this rank's data-parallel share (``groups``: ``parallel.ParallelGroups``)."""
    from megatron_navil.data.loader import build_data_loader
    from megatron_navil.training.evaluate import EvalSet, set_names

    sets, dp, dp_rank = [], groups.dp_size, groups.dp_rank
    for name, d in zip(set_names([str(d.root) for d in datasets]), datasets, strict=True):
        loader = build_data_loader(
            [d], seq_length=args.seq_length, global_batch=args.global_batch,
            max_patches=args.max_patches, seed=args.seed, dp_rank=dp_rank, dp_size=dp,
            loss_weighting=args.loss_weighting,
            pixels=groups.is_first_stage(), vision_window_size=cfg.vision.window_size,
        )  # fmt: skip
        sets.append(EvalSet(name, LoaderSource(loader, args.global_batch // dp, device)))
    return sets


def corpus_image_config(cfg: Any, images: list[dict[str, Any]]) -> tuple[Any, dict[str, Any]]:
    """``cfg`` with the image preprocessing of the corpora it trains on (``images``: each
    manifest's ``image`` section), and the fields that changed. The checkpoint's config then
    says how the training images were prepared (e.g. corpora indexed with
    ``--no-multi-scale``), so captioning and the HF export prepare images the same way; a
    field on which a blend's corpora disagree keeps ``cfg``'s value. The patch size and merge
    are the model's: a corpus with others is a ValueError."""
    from megatron_navil.config.model import ImageConfig
    from megatron_navil.data.indexer.settings import ImageSettings

    for image in images:
        for key, want in (("patch", cfg.vision.patch), ("merge", cfg.connector.merge)):
            if key in image and int(image[key]) != want:
                raise ValueError(
                    f"the corpus was indexed with {key} {image[key]}, the model's {key} is "
                    f"{want} (re-index with --config {cfg.name})"
                )
    # what the indexer records (ImageSettings) that is also the config's image preprocessing
    recorded = [f.name for f in dataclasses.fields(ImageSettings)]
    changes = {}
    for name in (n for n in recorded if n in ImageConfig.__dataclass_fields__):
        values = {image.get(name) for image in images}
        if len(values) == 1 and None not in values:
            value = type(getattr(cfg.image, name))(values.pop())
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


def _model_config(args: argparse.Namespace) -> Any:
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
        for flag, path in (("--load", args.load), ("--init", args.init))
        if path and (found := checkpoint_config_file(path)) is not None
    ]
    if args.config is None:
        return resolve_config(carried[0][1] if carried else "tiny")
    cfg = resolve_config(args.config)
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
                f"--config {args.config} differs from the {flag} checkpoint's model "
                f"({found}): {diff[0]}"
            )
    return cfg


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from megatron_navil.training.recipes import get_stage

    try:
        cfg = _model_config(args)
        recipe = get_stage(args.stage)
    except ValueError as exc:
        parser.error(str(exc))
    for name in ("tp", "pp", "ep", "steps", "global_batch", "seq_length",
                 "make_vocab_size_divisible_by", "eval_iters"):  # fmt: skip
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.eval_interval < 0:
        parser.error(f"--eval-interval must be >= 0, got {args.eval_interval}")
    warmup = recipe.warmup_steps if args.warmup is None else args.warmup
    if not 0 <= warmup <= args.steps:
        default = " (the stage's default)" if args.warmup is None else ""
        parser.error(f"--warmup {warmup}{default} must be in [0, --steps {args.steps}]")
    if args.init:
        from megatron_navil.checkpoint.directory import latest

        if latest(args.init) is None:
            parser.error(f"--init {args.init}: no complete checkpoint (iter_NNNNNNN) there")
    if args.peak_tflops is not None and args.peak_tflops <= 0:
        parser.error(f"--peak-tflops must be > 0, got {args.peak_tflops}")
    # Library notices that are not the user's to act on, printed by every rank (each step for
    # some): megatron-core's apex/TE fallbacks and torch's deprecations inside megatron-core.
    warnings.filterwarnings("ignore", module="megatron")
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine).*")
    return run(args, cfg, recipe, parser)


def run(args: argparse.Namespace, cfg: Any, recipe: Any, parser: argparse.ArgumentParser) -> int:
    from megatron_navil.checkpoint.directory import latest
    from megatron_navil.checkpoint.errors import CheckpointLayoutError
    from megatron_navil.checkpoint.model import model_special_ids
    from megatron_navil.data import ShardDataset
    from megatron_navil.data.loader import build_data_loader
    from megatron_navil.models.build import build_model, transformer_config
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
    from megatron_navil.training.recipes import apply_freezing

    try:
        datasets = [ShardDataset(d, verify="size") for d in args.data]
    except (OSError, ValueError) as exc:
        parser.error(f"--data: {exc}")
    for path, d in zip(args.data, datasets, strict=True):
        if len(d) == 0:  # the blend needs a sample of every corpus
            skipped = d.manifest.get("counts", {}).get("skipped", 0)
            parser.error(f"--data {path}: the corpus holds no sample ({skipped:,} records were "
                         "skipped at indexing; see its manifest.json 'skipped')")  # fmt: skip
    try:
        special = model_special_ids(datasets[0].manifest["tokenizer"]["special_ids"])
    except ValueError as exc:
        parser.error(f"--data {args.data[0]}: {exc}")
    eval_datasets = open_eval_data(args, datasets[0], parser)
    try:
        cfg, image_changes = corpus_image_config(cfg, [d.manifest["image"] for d in datasets])
        cfg, prompt_changes = corpus_prompt_config(cfg, [d.manifest["settings"] for d in datasets])
    except ValueError as exc:
        parser.error(f"--data: {exc}")

    resumed = args.load and latest(args.load) is not None
    weights = str(latest(args.load)) if resumed else (str(latest(args.init)) if args.init else None)
    try:
        cfg, vocab_note = corpus_vocab_config(
            cfg, [d.manifest for d in datasets], args.make_vocab_size_divisible_by, args.tp,
            weights,
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))

    layout = dict(tp=args.tp, pp=args.pp, vpp=args.vpp, ep=args.ep, etp=args.etp)
    try:
        groups = initialize(**layout, seed=args.seed)
    except ValueError as exc:  # a layout that does not fit the world size
        parser.error(str(exc))
    cuda = torch.cuda.is_available()
    dp, dp_rank = groups.dp_size, groups.dp_rank
    if args.global_batch % dp:
        parser.error(f"--global-batch {args.global_batch} is not a multiple of DP={dp}")
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    bf16 = args.precision == "bf16" or (args.precision == "auto" and cuda)
    dtype = torch.bfloat16 if bf16 else torch.float32
    try:
        distributed_optimizer = use_distributed_optimizer(args.use_distributed_optimizer, groups)
        overlap = resolve_overlap(
            grad_reduce=args.overlap_grad_reduce, param_gather=args.overlap_param_gather,
            p2p=args.overlap_p2p_comm, tp_comm=args.tp_comm_overlap,
            bucket_size=args.ddp_bucket_size, distributed_optimizer=distributed_optimizer,
            vpp=args.vpp, cuda=cuda, te_available=te_importable(),
        )  # fmt: skip
    except ValueError as exc:
        parser.error(str(exc))
    mcore_config = transformer_config(
        cfg, **layout, dtype=dtype, overlap_p2p_comm=overlap.p2p, tp_comm_overlap=overlap.tp_comm
    )
    from megatron_navil.config.model import Recompute

    recompute = Recompute(llm=args.recompute_llm, vision=args.recompute_vision)
    chunks = build_model(
        cfg, mcore_config, groups, special_ids=special, first_stage_layers=args.first_stage_layers,
        recompute=recompute, init_seed=args.seed,
    )  # fmt: skip
    frozen = apply_freezing(chunks, recipe)
    chunks = place_chunks(chunks, mcore_config, device)
    rank0 = torch.distributed.get_rank() == 0
    if rank0 and vocab_note:
        print(vocab_note, flush=True)
    if rank0:
        print(json.dumps({
            "config": cfg.name, "stage": recipe.name, "world": torch.distributed.get_world_size(),
            "layout": {**layout, "dp": dp}, "trainable_params_rank0": frozen["trainable"],
            "frozen_params_rank0": frozen["frozen"], "data": args.data,
            "global_batch": args.global_batch, "seq_length": args.seq_length,
            "device": str(device), "precision": "bf16" if bf16 else "fp32",
            "optimizer": "distributed" if distributed_optimizer else "plain",
            "overlap": dataclasses.asdict(overlap),
            # image settings the corpus was indexed with, where they differ from --config's
            **({"image_from_corpus": image_changes} if image_changes else {}),
            **({"prompt_from_corpus": prompt_changes} if prompt_changes else {}),
        }))  # fmt: skip
    if args.dry_run:
        return 0
    init_weights(args, chunks, rank0)
    if overlap.tp_comm:
        initialize_tp_comm_overlap(mcore_config, args.seq_length)
    chunks = wrap_ddp(chunks, mcore_config, distributed_optimizer, overlap)
    optimizer = build_optimizer(chunks, recipe, lr=args.lr, min_lr=args.min_lr,
                                clip_grad=args.clip_grad, bf16=bf16,
                                distributed=distributed_optimizer)  # fmt: skip
    scheduler = build_scheduler(optimizer, recipe, args.steps, lr=args.lr,
                                warmup_steps=args.warmup, min_lr=args.min_lr)  # fmt: skip
    loader = build_data_loader(
        datasets, seq_length=args.seq_length, global_batch=args.global_batch,
        weights=args.data_weights, max_patches=args.max_patches, seed=args.seed,
        dp_rank=dp_rank, dp_size=dp, loss_weighting=args.loss_weighting,
        num_workers=args.num_workers,
        # only the first pipeline stage runs the vision encoder; the others skip decoding
        pixels=groups.is_first_stage(),
        vision_window_size=cfg.vision.window_size,
    )  # fmt: skip
    peak = mfu_peak_flops(args)
    source = LoaderSource(loader, args.global_batch // dp, device)
    eval_sets = eval_sets_of(args, eval_datasets, cfg, groups, device)
    source.flops_of = functools.partial(batch_flops, cfg) if peak else None
    loop = LoopConfig(
        steps=args.steps, exit_after=args.exit_after, seq_length=args.seq_length,
        save_dir=args.save,
        save_interval=args.save_interval, keep_last=args.keep_last, load_dir=args.load,
        log_dir=args.log_dir, nan_policy=args.nan_policy,
        progress_bar=not args.no_progress and rank0,
        extra_state={"config": cfg.name, "stage": recipe.name}, model_config=cfg,
        flops_per_step=step_model_flops if peak else None, peak_flops=peak,
        eval_sets=eval_sets, eval_interval=args.eval_interval, eval_iters=args.eval_iters,
    )  # fmt: skip
    try:
        results = train(chunks, mcore_config, groups, optimizer, scheduler, source, loop)
    except CheckpointLayoutError as exc:
        parser.error(str(exc))
    if rank0 and results:
        first, last = results[0], results[-1]
        print(
            f"done: {len(results)} steps this run (of {args.steps}), loss {first.loss:.4f} -> "
            f"{last.loss:.4f}"
        )
    return 0


if __name__ == "__main__":
    if "MASTER_PORT" not in os.environ and "RANK" not in os.environ:
        from megatron_navil.parallel.spawn import free_port

        os.environ["MASTER_PORT"] = str(free_port())  # one process without torchrun
    sys.exit(main())
