"""A tiny megatron-core GPTModel in any TP/PP/VPP/EP/DP layout, holding the *same* model in
every layout, and a train step through megatron-core's schedules, DDP and optimizer.

Every weight is set from its global parameter name and a seed: the full (global) tensor is
drawn from a generator seeded by ``(seed, key)`` and each rank copies the slice it owns, read
from megatron-core's own ``sharded_state_dict`` metadata (the same map dist-checkpointing uses
to reshard). So layouts can be compared shard by shard against a single-process reference.

Used by the distributed tests and the parallel smoke demo; the NaViL model brings its own.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from megatron_navil.parallel.state import ParallelLayout


@dataclass(frozen=True)
class TinyGPTSpec:
    """Sizes of the tiny model and its batch; fp32 throughout."""

    num_layers: int = 4
    hidden: int = 32
    heads: int = 4
    ffn: int = 64
    vocab: int = 64
    seq: int = 16
    num_experts: int | None = None  # None: dense MLP
    topk: int = 2
    dispatcher: str = "alltoall"  # or "allgather"
    global_batch: int = 8
    micro_batch: int = 1
    learnable: bool = False  # False: random tokens; True: t[i+1] = (5 t[i] + 3) % vocab


def transformer_config(spec: TinyGPTSpec, layout: ParallelLayout, **overrides: Any) -> Any:
    """megatron-core TransformerConfig for ``spec`` under ``layout``, CPU-safe options."""
    from megatron.core.transformer import TransformerConfig

    moe = spec.num_experts is not None
    kwargs: dict[str, Any] = dict(
        num_layers=spec.num_layers,
        hidden_size=spec.hidden,
        num_attention_heads=spec.heads,
        ffn_hidden_size=spec.ffn,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp,
        expert_model_parallel_size=layout.ep,
        expert_tensor_parallel_size=layout.etp or layout.tp,
        sequence_parallel=layout.tp > 1 and moe,  # megatron requires SP for MoE with TP > 1
        use_cpu_initialization=True,
        params_dtype=torch.float32,
        pipeline_dtype=torch.float32,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        add_bias_linear=not moe,  # expert biases hit an autograd in-place error
        gradient_accumulation_fusion=False,
        apply_rope_fusion=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
    )
    if moe:
        kwargs.update(
            num_moe_experts=spec.num_experts,
            moe_router_topk=spec.topk,
            moe_token_dispatcher_type=spec.dispatcher,
            moe_aux_loss_coeff=0.0,
            moe_grouped_gemm=False,
            moe_permute_fusion=False,
        )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def build_model(spec: TinyGPTSpec, config: Any) -> list[torch.nn.Module]:
    """One GPTModel per virtual pipeline stage of this rank (a list of one without VPP)."""
    from megatron.core import parallel_state as ps
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    layer_spec = get_gpt_layer_local_spec(num_experts=spec.num_experts, moe_grouped_gemm=False)
    vpp = ps.get_virtual_pipeline_model_parallel_world_size()
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        chunks.append(
            GPTModel(
                config=config,
                transformer_layer_spec=layer_spec,
                vocab_size=spec.vocab,
                max_sequence_length=spec.seq,
                pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=stage),
                post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=stage),
                position_embedding_type="rope",
                share_embeddings_and_output_weights=False,
                vp_stage=stage,
            )
        )
    return chunks


def _sharded_tensors(chunks: list[torch.nn.Module]) -> Iterator[Any]:
    """Every ShardedTensor of the model (factories built), with its data a view of a param."""
    from megatron_navil.models.init import sharded_parameters

    return sharded_parameters(chunks)


def global_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The full tensor for parameter ``key``: N(0, 0.2^2), a function of (seed, key) only."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    return torch.randn(shape, generator=gen) * 0.2


def set_global_params(chunks: list[torch.nn.Module], seed: int) -> None:
    """Give every rank its slice of the seeded global tensors, in any layout."""
    with torch.no_grad():
        for sh in _sharded_tensors(chunks):
            full = global_tensor(sh.key, tuple(sh.global_shape), seed)
            sh.data.copy_(full[sh.global_slice()].reshape(sh.data.shape))


def _grad_of(param: torch.nn.Parameter) -> torch.Tensor | None:
    grad = getattr(param, "main_grad", None)
    return grad if grad is not None else param.grad


Shards = dict[str, list[tuple[tuple[int, ...], tuple, torch.Tensor]]]


def _owner(params: list[torch.nn.Parameter], view: torch.Tensor, key: str) -> torch.nn.Parameter:
    """The parameter ``view`` (a sharded tensor's data) is a view of. Matched by storage *and*
    element range: with the distributed optimizer all params are views of one param buffer."""
    ptr, start = view.untyped_storage().data_ptr(), view.storage_offset()
    for p in params:
        if (
            p.untyped_storage().data_ptr() == ptr
            and p.storage_offset() <= start < p.storage_offset() + p.numel()
        ):
            return p
    raise KeyError(f"no parameter owns sharded tensor {key}")


def local_shards(chunks: list[torch.nn.Module], what: str = "param") -> Shards:
    """This rank's pieces of every parameter (``what='param'``) or gradient (``'grad'``), as
    ``{key: [(global_shape, global_slice, tensor)]}`` (several pieces under factories)."""
    params = [p for c in chunks for p in c.parameters()]
    out: dict[str, list[tuple[tuple, torch.Tensor]]] = {}
    for sh in _sharded_tensors(chunks):
        if what == "param":
            piece = sh.data
        else:
            owner = _owner(params, sh.data, sh.key)
            grad = _grad_of(owner)
            if grad is None:
                continue
            offset = sh.data.storage_offset() - owner.storage_offset()
            piece = torch.as_strided(
                grad.reshape(owner.shape),
                sh.data.shape,
                sh.data.stride(),
                grad.storage_offset() + offset,
            )
        out.setdefault(sh.key, []).append(
            (tuple(sh.global_shape), sh.global_slice(), piece.detach().clone())
        )
    return out


def full_tensors(shards: Shards) -> dict[str, torch.Tensor]:
    """Assemble the global tensors from a rank that holds all of them (an unsplit layout)."""
    out = {}
    for key, pieces in shards.items():
        full = torch.full(pieces[0][0], float("nan"))
        for _, sl, piece in pieces:
            full[sl] = piece.reshape(full[sl].shape)
        if full.isnan().any():
            raise ValueError(f"{key}: this rank does not hold the whole tensor")
        out[key] = full
    return out


def max_rel_diff(shards: Shards, reference: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Largest |shard - reference slice| / max|reference| over all keys, and its key.
    Raises KeyError when a shard's key is not in the reference."""
    worst, where = 0.0, ""
    for key, pieces in shards.items():
        ref = reference[key]
        scale = float(ref.abs().max()) or 1.0
        for _, sl, piece in pieces:
            diff = float((piece - ref[sl].reshape(piece.shape)).abs().max()) / scale
            if diff > worst or not where:
                worst, where = max(diff, worst), key
    return worst, where


def make_batch(spec: TinyGPTSpec, seed: int) -> dict[str, torch.Tensor]:
    """The global batch, labels = next token. Random tokens, or (``spec.learnable``) sequences
    of the affine recurrence t -> (5t + 3) mod vocab from a random start, which a model can
    learn (the demo shows the loss falling)."""
    gen = torch.Generator().manual_seed(seed)
    if spec.learnable:
        tokens = torch.empty(spec.global_batch, spec.seq + 1, dtype=torch.long)
        tokens[:, 0] = torch.randint(0, spec.vocab, (spec.global_batch,), generator=gen)
        for i in range(spec.seq):
            tokens[:, i + 1] = (5 * tokens[:, i] + 3) % spec.vocab
    else:
        tokens = torch.randint(0, spec.vocab, (spec.global_batch, spec.seq + 1), generator=gen)
    return {"tokens": tokens[:, :-1].contiguous(), "labels": tokens[:, 1:].contiguous()}


def micro_batches(
    batch: dict[str, torch.Tensor], spec: TinyGPTSpec, dp_rank: int, dp_size: int
) -> list[dict[str, torch.Tensor]]:
    """This data-parallel rank's part of the global batch, cut into micro-batches."""
    per_rank = spec.global_batch // dp_size
    lo = dp_rank * per_rank
    return [
        {k: v[i : i + spec.micro_batch] for k, v in batch.items()}
        for i in range(lo, lo + per_rank, spec.micro_batch)
    ]


def forward_step(data_iterator: Iterator, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    """megatron-core forward_step_func: next-token loss averaged over the micro-batch."""
    batch = next(data_iterator)
    tokens = batch["tokens"]
    positions = torch.arange(tokens.shape[1]).expand_as(tokens)
    mask = torch.ones(1, 1, tokens.shape[1], tokens.shape[1], dtype=torch.bool).triu(1)
    out = model(tokens, positions, mask, labels=batch["labels"])

    def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = per_token.float().mean()
        return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place

    return out, lambda output_tensor: loss_func(output_tensor)


def wrap_ddp(
    chunks: list[torch.nn.Module], config: Any, distributed_optimizer: bool, overlap: Any = None
) -> list[Any]:
    """megatron-core DDP around each chunk, wired into the schedule like Megatron-LM does
    (``overlap``: ``training.optim.Overlap``, None: none)."""
    from megatron_navil.training.optim import wrap_ddp as wrap

    return wrap(chunks, config, distributed_optimizer, overlap)


def build_optimizer(chunks: list[Any], kind: str, distributed: bool, lr: float = 1e-2) -> Any:
    """megatron-core optimizer (SGD without momentum, or Adam) over the DDP chunks."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    config = OptimizerConfig(
        optimizer=kind,
        lr=lr,
        weight_decay=0.0,
        sgd_momentum=0.0,
        clip_grad=0.0,
        use_distributed_optimizer=distributed,
        params_dtype=torch.float32,
    )
    return get_megatron_optimizer(config, chunks)


def run_schedule(
    chunks: list[Any],
    mbs: list[Any],
    forward_step_func: Any,
    *,
    seq_length: int,
    micro_batch_size: int = 1,
    optimizer: Any = None,
    full_batch: bool = False,
) -> float:
    """Forward/backward of this rank's micro-batches ``mbs`` through megatron-core's pipeline
    schedule (and one optimizer step when ``optimizer`` is given); the mean micro-batch loss
    (``report["loss"]``), averaged over DP unless ``full_batch``, on every rank."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    for chunk in chunks:
        chunk.zero_grad_buffer()
    if optimizer is not None:
        optimizer.zero_grad()
    iters = [iter(mbs) for _ in chunks] if len(chunks) > 1 else iter(mbs)
    losses = get_forward_backward_func()(
        forward_step_func=forward_step_func,
        data_iterator=iters,
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(mbs),
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=False,
    )
    if optimizer is not None:
        ok, _, _ = optimizer.step()
        assert ok, "optimizer step was skipped"
    # The loss lives on the last pipeline stage; average over DP, then share with all stages.
    loss = torch.zeros(1)
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        loss += torch.stack([m["loss"] for m in losses]).mean()
    torch.distributed.all_reduce(loss, group=ps.get_pipeline_model_parallel_group())
    # context parallelism: each CP rank's loss covers its own chunks of the sequences
    torch.distributed.all_reduce(loss, group=ps.get_context_parallel_group())
    if not full_batch:
        torch.distributed.all_reduce(loss, group=ps.get_data_parallel_group())
        loss /= ps.get_data_parallel_world_size()
    return float(loss)


def train(
    chunks: list[Any],
    spec: TinyGPTSpec,
    config: Any,
    *,
    batch_seed: int,
    optimizer: Any = None,
    full_batch: bool = False,
) -> float:
    """One forward/backward over the global batch through the pipeline schedule (and one
    optimizer step when ``optimizer`` is given). Returns the global mean loss on every rank.

    ``full_batch``: every rank processes the whole batch (the single-process reference run
    inside a larger process group: its data-parallel replicas all see identical data).
    """
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    mbs = micro_batches(
        make_batch(spec, batch_seed), spec, 0 if full_batch else dp_rank, 1 if full_batch else dp
    )
    return run_schedule(
        chunks, mbs, forward_step, seq_length=spec.seq, micro_batch_size=spec.micro_batch,
        optimizer=optimizer, full_batch=full_batch,
    )  # fmt: skip


def _checkpoint_state(chunks: list[Any], optimizer: Any, is_loading: bool) -> dict[str, Any]:
    """The sharded state dict of model chunks + optimizer, as Megatron-LM lays it out."""
    from megatron_navil.checkpoint.store import sharded_state

    return sharded_state(chunks, optimizer, is_loading)


def save_checkpoint(chunks: list[Any], optimizer: Any, directory: str) -> None:
    """megatron-core dist-checkpoint (torch_dist) of the model and optimizer."""
    import os

    from megatron.core import dist_checkpointing

    if torch.distributed.get_rank() == 0:
        os.makedirs(directory, exist_ok=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_checkpoint_state(chunks, optimizer, is_loading=False), directory)


def load_checkpoint(chunks: list[Any], optimizer: Any, directory: str) -> None:
    """Load a checkpoint saved by :func:`save_checkpoint` in any TP/PP/EP/DP layout."""
    from megatron.core import dist_checkpointing

    loaded = dist_checkpointing.load(
        _checkpoint_state(chunks, optimizer, is_loading=True), directory
    )
    for i, chunk in enumerate(chunks):
        chunk.module.load_state_dict(loaded["model" if len(chunks) == 1 else f"model{i}"])
    if optimizer is not None:
        optimizer.load_state_dict(loaded["optimizer"])


@dataclass
class Run:
    """A tiny GPT set up in one layout: DDP-wrapped chunks, config and optional optimizer."""

    spec: TinyGPTSpec
    chunks: list[Any]
    config: Any
    optimizer: Any = None

    def step(self, batch_seed: int, *, full_batch: bool = False, update: bool = True) -> float:
        """Forward/backward (and an optimizer step if there is one and ``update``)."""
        return train(
            self.chunks,
            self.spec,
            self.config,
            batch_seed=batch_seed,
            optimizer=self.optimizer if update else None,
            full_batch=full_batch,
        )

    def shards(self, what: str = "param") -> Shards:
        return local_shards(self.chunks, what)


def setup_run(
    spec: TinyGPTSpec,
    layout: dict[str, int] | None = None,
    *,
    seed: int = 7,
    optimizer: str | None = None,
    distributed_optimizer: bool = False,
    lr: float = 1e-2,
    freeze: Callable[[torch.nn.Module], None] | None = None,
    overlap: Any = None,
) -> Run:
    """(Re)initialise the parallel state for ``layout`` and build the seeded tiny GPT in it;
    ``freeze`` is called on each model chunk before DDP (to set ``requires_grad``);
    ``overlap``: DDP's communication overlap (``training.optim.Overlap``; None: none)."""
    from megatron_navil.parallel import initialize

    parallel = initialize(**(layout or {})).layout
    config = transformer_config(spec, parallel)
    chunks = build_model(spec, config)
    set_global_params(chunks, seed)
    for chunk in chunks if freeze is not None else []:
        freeze(chunk)
    chunks = wrap_ddp(chunks, config, distributed_optimizer, overlap)
    opt = build_optimizer(chunks, optimizer, distributed_optimizer, lr) if optimizer else None
    return Run(spec, chunks, config, opt)
