"""``TrainConfig``: every option of ``python -m megatron_navil.train``, typed and grouped.

The trainer's command line is generated from these dataclasses (``cli.add_options``): a field
is a flag (``--field-name``), its type, default, help text and bounds are the field's, and a
group of fields is an argument group of ``--help``. ``launch.py`` writes a stage's command line
from a ``TrainConfig`` too (:meth:`TrainConfig.to_argv`), so the two cannot drift apart.

Field metadata (see :func:`option`): ``help``; ``min`` (an inclusive lower bound, checked by the
parser with the flag's name in the message); ``positive`` (a float that must be > 0);
``choices``; ``metavar``; ``required`` (the CLI insists; the dataclass default stands for
"not given" so that a partial config, e.g. the launcher's, can exist).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from megatron_navil.config.vocab import DEFAULT_DIVISIBLE_BY

RECOMPUTE_MODES = ("none", "selective", "full")


def option(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field that is also a command-line option (module doc: the metadata)."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


@dataclass
class LayoutOptions:
    """The model and how it is laid out over the processes."""

    config: str | None = option(
        None,
        "model config: a registered name (tiny, navil-2b, navil-9b), a navil_config.json, or "
        "a checkpoint carrying one (every checkpoint saved by training or by "
        "tools/convert_from_hf.py does); default: the config of the --load checkpoint, else "
        "of --init, else tiny",
        metavar="NAME|PATH",
    )
    make_vocab_size_divisible_by: int = option(
        DEFAULT_DIVISIBLE_BY,
        "when the corpus tokenizer (its ids and its 12 NaViL ids) does not fit the config's "
        "vocabulary, the model's vocabulary becomes the tokenizer's size padded up to a "
        "multiple of N x --tp (Megatron-LM's rule; default 128); a vocabulary that fits is "
        "kept, and a --load/--init checkpoint's vocabulary is never changed",
        metavar="N",
        min=1,
    )
    tp: int = option(1, "tensor-parallel size", min=1)
    pp: int = option(1, "pipeline-parallel size", min=1)
    vpp: int | None = option(None, "virtual stages per pipeline rank", min=1)
    ep: int = option(1, "expert-parallel size (modality experts)", min=1)
    etp: int | None = option(None, "expert tensor-parallel size (=tp)", min=1)
    cp: int = option(
        1,
        "context-parallel size: each packed sequence split into 2*cp chunks over cp ranks "
        "(rank r holds chunks r and 2cp-1-r), keys and values all-gathered, the vision tower "
        "data-parallel over them; --seq-length must be a multiple of 2*cp",
        min=1,
    )
    recompute_llm: str = option(
        "none", "activation recompute of the LLM decoder layers", choices=RECOMPUTE_MODES
    )
    recompute_vision: str = option(
        "none", "activation recompute of the vision encoder blocks", choices=RECOMPUTE_MODES
    )
    precision: str = option(
        "auto",
        "bf16: bf16 weights and activations, fp32 master weights and gradient reduction; "
        "auto: bf16 on GPU, fp32 on CPU",
        choices=("auto", "fp32", "bf16"),
    )
    first_stage_layers: int | None = option(
        None, "LLM layers on pipeline stage 0 (it also holds the vision encoder)", min=1
    )
    vision_parallel: str = option(
        "auto",
        "the vision tower over the TP ranks of pipeline stage 0: tp = its heads split over TP "
        "where they divide it (else the whole tower runs on every TP rank, TP-fold the same "
        "work); dp = the whole tower on every TP rank, each encoding a cost-balanced share of "
        "the micro-batch's images (features gathered back, gradients summed over TP); auto: dp "
        "when the vision heads do not divide --tp (measured: docs/performance.md), else tp. "
        "Checkpoints load across the two",
        choices=("auto", "tp", "dp"),
    )

    def as_layout(self) -> dict[str, int | None]:
        """The ``parallel.initialize`` / ``transformer_config`` keyword arguments."""
        return dict(tp=self.tp, pp=self.pp, vpp=self.vpp, ep=self.ep, etp=self.etp, cp=self.cp)


@dataclass
class DataOptions:
    """What the run trains on and how it is packed."""

    data: list[str] = option(
        [], "indexed corpus directories (tools/index_corpus.py output)", required=True
    )
    data_weights: list[float] | None = option(
        None, "blending weight per --data corpus (default: by size)"
    )
    seq_length: int = option(1024, "packed sequence length", min=1)
    max_patches: int | None = option(
        None, "vision patches per packed sequence (default: no limit)", min=1
    )
    global_batch: int = option(
        8, "packed sequences per optimizer step, over all data-parallel ranks", min=1
    )
    loss_weighting: str = option(
        "token",
        "per-token weights: 1, 1/n or 1/sqrt(n) for a sample of n loss tokens",
        choices=("token", "sample", "square"),
    )
    num_workers: int = option(0, "data-loader worker processes", min=0)
    balance_data: str = option(
        "auto",
        "deal each global batch's packed sequences to the data-parallel ranks by their cost "
        "(model FLOPs from the index: LLM tokens and squared sample lengths, patches and "
        "squared patches per image scale), costliest first to the least loaded rank, so no "
        "rank waits for one that drew the heavy images; auto: on when DP > 1 (at DP 1 it "
        "changes nothing); the split is the same after a resume, also at another DP size",
        choices=("auto", "on", "off"),
    )
    max_sequence_cost: float | None = option(
        None,
        "cost budget of a packed sequence, as a multiple of the cost of one --seq-length "
        "text-only sample (the pack planner's third budget besides tokens and patches): "
        "sequences that would cost more, e.g. with several large images whose attention is "
        "quadratic in their patches, are split, so sequences cost about the same; default: no "
        "budget",
        positive=True,
        metavar="X",
    )


@dataclass
class EvalOptions:
    """Held-out evaluation during training."""

    eval_data: list[str] | None = option(
        None,
        "held-out indexed corpora (same tokenizer as --data): their loss, each and pooled, "
        "under the training's packing and loss weighting, logged to TensorBoard (eval/loss), "
        "progress.txt and the progress bar",
        metavar="DIR",
    )
    eval_interval: int = option(
        0,
        "evaluate every N steps and after the last step (default 0: after the last step "
        "only); the steps are the same in a resumed run",
        metavar="N",
        min=0,
    )
    eval_iters: int = option(
        10,
        "global batches (--global-batch packed sequences each) of every held-out corpus per "
        "evaluation; always its first N, so every evaluation sees the same data",
        metavar="N",
        min=1,
    )


@dataclass
class OptimOptions:
    """The stage recipe, schedule and optimizer."""

    stage: str = option("s2", "training stage recipe: s1.1, s1.2 or s2")
    steps: int = option(0, "total optimizer steps", min=1, required=True)
    exit_after: int | None = option(
        None,
        "stop after this many steps of this run (saving a checkpoint); a later run with "
        "--load continues the same schedule",
        min=1,
    )
    lr: float | None = option(None, "peak LR (default: the stage's)", positive=True)
    min_lr: float = option(0.0, "cosine floor", min=0)
    warmup: int | None = option(None, "warm-up steps (default: the stage's)", min=0)
    clip_grad: float = option(1.0, "gradient-norm clip (0: off)", min=0)
    nan_policy: str = option("stop", "what a non-finite loss does", choices=("stop", "skip"))
    seed: int = option(1234, "model init and data order seed")


@dataclass
class CheckpointOptions:
    """Where checkpoints go and come from."""

    save: str | None = option(None, "checkpoint directory")
    save_interval: int = option(0, "save every N steps", min=0)
    keep_last: int = option(2, "complete checkpoints to keep", min=1)
    load: str | None = option(
        None,
        "resume from the newest complete checkpoint here (any layout). Our own files in a "
        "checkpoint load without pickle, but torch.distributed.checkpoint reads its .metadata "
        "file with pickle: load only checkpoints you trust (as with Megatron-LM)",
    )
    init: str | None = option(
        None,
        "start from the model weights of the newest complete checkpoint here (any layout; "
        "e.g. the previous stage's --save): optimizer, LR schedule, data position and "
        "iteration start afresh; ignored when --load finds a checkpoint to resume; only "
        "checkpoints you trust (see --load)",
    )
    async_save: bool = option(
        False,
        "write checkpoints in the background (megatron-core's asynchronous dist-checkpoint "
        "save in a forked process): training goes on while a save is written; it becomes "
        "complete (iter_N, the marker) only once every rank's write is done, and the run waits "
        "for it before exiting (end, --exit-after, SIGTERM)",
    )


@dataclass
class LogOptions:
    """Logs and what the run reports."""

    log_dir: str | None = option(None, "TensorBoard, progress.txt, loss_curve.png")
    peak_tflops: float | None = option(
        None,
        "peak TFLOP/s per GPU for the MFU log (default: the detected GPU's dense bf16 peak, "
        "989 for H100/H200, 312 for A100; none on CPU, so no MFU unless given)",
        positive=True,
    )
    no_progress: bool = option(False, "no progress bar")
    dry_run: bool = option(False, "print the resolved setup (layout, counts) and exit")


@dataclass
class RuntimeOptions:
    """Profiling and garbage collection."""

    profile_steps: str | None = option(
        None,
        "torch.profiler trace of steps A to B (1-based, inclusive), one Chrome / TensorBoard "
        "trace per rank in <--log-dir>/profile/, with named ranges (data, vision, "
        "forward-compute, backward-compute, optimizer, checkpoint, evaluate, ...)",
        metavar="A:B",
    )
    nvtx: bool = option(
        False,
        "emit the named ranges and every op as NVTX ranges for Nsight Systems "
        "(torch.autograd.profiler.emit_nvtx) over --profile-steps, with "
        "cudaProfilerStart/Stop around them (nsys --capture-range=cudaProfilerApi), or over "
        "the whole run; replaces the torch.profiler trace; needs a GPU (an error on CPU)",
    )
    manual_gc_interval: int = option(
        0,
        "Python's automatic garbage collection off during training, gc.collect() every N "
        "steps and before evaluations and checkpoint saves, so every rank pauses at the same "
        "step (Megatron-LM's --manual-gc); 0 (default): automatic GC",
        metavar="N",
        min=0,
    )


@dataclass
class FastPathOptions:
    """The fast path: layer implementation, attention backend, the FFN experts' path, the
    optimizer and communication overlap."""

    transformer_impl: str = option(
        "auto",
        "layer implementation: te = TransformerEngine (LLM norms, grouped-GEMM experts, vision "
        "linears), local = megatron-core's torch modules, auto = te where it imports on a GPU "
        "(the start line says what was picked)",
        choices=("auto", "local", "te"),
    )
    attention_backend: str = option(
        "auto",
        "varlen attention of the LLM and vision tower: flash = flash-attn, torch = "
        "torch.nn.attention.varlen (CUDA), sdpa = bucketed scaled_dot_product_attention (any "
        "device); auto = the first of these that runs here in the model's dtype",
        choices=("auto", "flash", "torch", "sdpa"),
    )
    use_distributed_optimizer: str = option(
        "auto",
        "megatron-core's distributed optimizer (Adam state and fp32 master weights sharded "
        "over data-parallel ranks) or the plain one; auto: on when DP > 1 or expert-DP > 1, "
        "off otherwise (DP = 1: the same Adam, to rounding, without the flat-buffer copies). "
        "Checkpoints of either resume with the other",
        choices=("auto", "on", "off"),
    )
    overlap_grad_reduce: str = option(
        "auto",
        "overlap the DP gradient reduction with the backward (megatron-core DDP buckets); "
        "auto: on with CUDA, off on CPU (gloo runs it on the compute cores)",
        choices=("auto", "on", "off"),
    )
    overlap_param_gather: str = option(
        "auto",
        "overlap the distributed optimizer's parameter all-gather with the next forward "
        "(needs the distributed optimizer and --overlap-grad-reduce); auto: on with CUDA when "
        "both are on, off on CPU",
        choices=("auto", "on", "off"),
    )
    overlap_p2p_comm: str = option(
        "auto",
        "overlap pipeline send/recv with compute in the interleaved schedule (--vpp > 1; no "
        "effect otherwise); auto: on with CUDA, off on CPU",
        choices=("auto", "on", "off"),
    )
    tp_comm_overlap: bool = option(
        False,
        "TransformerEngine's TP communication/GEMM overlap (userbuffers; needs "
        "TransformerEngine, TP > 1 and its layers: an error without TransformerEngine)",
    )
    ddp_bucket_size: int | None = option(
        None,
        "parameters per DDP gradient bucket with --overlap-grad-reduce (default: "
        "megatron-core's, max(4e7, 1e6 x DP))",
        min=1,
    )
    moe_path: str = option(
        "auto",
        "how the LLM's FFN reaches its text/visual experts: 'split' sorts the tokens by "
        "modality and runs each expert on its block (the attention experts' gather/scatter, one "
        "grouped GEMM per projection where the backend has one), 'dispatcher' uses "
        "megatron-core's MoE token dispatcher; 'auto' (default) takes split at --ep 1 with one "
        "expert per modality and --etp equal to --tp, else the dispatcher. Same parameters and "
        "checkpoints either way",
        choices=("auto", "dispatcher", "split"),
    )


def _title(text: str) -> dict[str, str]:
    return {"title": text}


@dataclass
class TrainConfig:
    """Every option of a training run, by group (each group is a section of ``--help``)."""

    layout: LayoutOptions = field(
        default_factory=LayoutOptions, metadata=_title("model and layout")
    )
    data: DataOptions = field(default_factory=DataOptions, metadata=_title("data"))
    eval: EvalOptions = field(default_factory=EvalOptions, metadata=_title("held-out evaluation"))
    optim: OptimOptions = field(default_factory=OptimOptions, metadata=_title("optimisation"))
    checkpoint: CheckpointOptions = field(
        default_factory=CheckpointOptions, metadata=_title("checkpoints")
    )
    fast: FastPathOptions = field(
        default_factory=FastPathOptions, metadata=_title("fast path (kernels, optimizer, overlap)")
    )
    log: LogOptions = field(default_factory=LogOptions, metadata=_title("logs"))
    runtime: RuntimeOptions = field(
        default_factory=RuntimeOptions, metadata=_title("profiling and garbage collection")
    )

    def to_argv(self, always: Collection[str] = ()) -> list[str]:
        """The command line that parses back into this config: every field that differs
        from its default or is named in ``always`` (and is not None), in declaration order
        (``launch.py`` execs it, naming what it decided so the command says it)."""
        argv: list[str] = []
        for group, _, f in option_fields(type(self)):
            value = getattr(getattr(self, group), f.name)
            default = getattr(getattr(type(self)(), group), f.name)
            if value is None or (value == default and f.name not in always):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv += [flag] if value else []
            elif isinstance(value, list):
                argv += [flag, *map(str, value)]
            else:
                argv += [flag, str(value)]
        return argv


def option_fields(cls: type = TrainConfig) -> list[tuple[str, str, dataclasses.Field]]:
    """``(group attribute, group title, field)`` of every option of ``cls``, in order."""
    out = []
    for group in dataclasses.fields(cls):
        for f in dataclasses.fields(group.default_factory):  # type: ignore[misc]
            out.append((group.name, group.metadata["title"], f))
    return out


def option_type(cls: type, f: dataclasses.Field) -> tuple[type, bool, bool]:
    """``(element type, is a list, may be None)`` of option ``f`` of dataclass ``cls``."""
    hint = typing.get_type_hints(cls)[f.name]
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    if typing.get_origin(hint) is list:
        return typing.get_args(hint)[0], True, optional
    return hint, False, optional
