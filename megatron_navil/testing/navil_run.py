"""The NaViL model in any TP/PP/VPP/EP/DP layout on synthetic packed batches, holding the same
weights in every layout, trained through megatron-core's schedules, DDP and optimizer.

Batches are built from the real ops (patch grids -> positions, vision cu_seqlens, the image
token block of ``image_token_layout``), with random patch values and random text ids, so the
model sees what the data pipeline will give it. Used by the model's distributed tests and its
benchmark; weights are set by global name with ``tiny_gpt.set_global_params``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from megatron_navil.config.model import NaViLConfig, Recompute
from megatron_navil.config.tokens import IGNORE_INDEX, SPECIAL_TOKENS
from megatron_navil.testing import tiny_gpt as T
from megatron_navil.training.microbatch import MicroBatch

Grid = tuple[int, int]


@dataclass(frozen=True)
class Sample:
    """One sample: ``text_before`` ids, then an image block per entry of ``images`` (each a
    list of patch grids, one per scale, smallest first), then ``text_after`` ids."""

    text_before: int
    images: tuple[tuple[Grid, ...], ...] = ()
    text_after: int = 0


# Micro-batch recipes: several samples with images of different sizes and two scales; text
# only; nearly all image tokens.
MIXED = (
    Sample(5, (((2, 4), (4, 6)),), 7),
    Sample(3, (((2, 2),), ((4, 2), (6, 4))), 4),
    Sample(9),
)
TEXT_ONLY = (Sample(20), Sample(11), Sample(30))
IMAGE_HEAVY = (Sample(1, (((4, 4), (6, 8)),), 1),)


@dataclass
class BatchSpec:
    """A global batch: micro-batches (each one packed sequence of ``seq_length`` tokens)."""

    # Under DP=2 both replicas start with a text-only micro-batch, so with EP=2 the rank of
    # the visual expert receives no tokens at all in that step (forward and backward).
    micro_batches: Sequence[Sequence[Sample]] = (TEXT_ONLY, MIXED, TEXT_ONLY, IMAGE_HEAVY)
    seq_length: int = 128
    special_ids: tuple[int, ...] = field(default_factory=lambda: tuple(range(500, 512)))


def windowed_tiny() -> NaViLConfig:
    """The tiny config with windows of 2x2 merge units and block 0 attending within them
    (block 1 global): the batches' images (up to 4 units wide) then really are permuted and
    windowed, which the default window of 4 units would leave in raster order."""
    import dataclasses

    from megatron_navil.config.registry import get_config

    cfg = get_config("tiny")
    vision = dataclasses.replace(cfg.vision, window_size=4, fullatt_block_indexes=(1,))
    return cfg.replace(vision=vision).validate()


def special_ids_for(cfg: NaViLConfig) -> tuple[int, ...]:
    """12 ids at the top of the tiny vocabulary (inside it, like Qwen3's)."""
    top = cfg.language.vocab
    return tuple(range(top - len(SPECIAL_TOKENS), top))


def pack(
    samples: Sequence[Sample], spec: BatchSpec, cfg: NaViLConfig, gen: torch.Generator
) -> dict[str, torch.Tensor]:
    """One packed micro-batch: the model's keyword arguments. A padding sample fills the
    sequence to ``seq_length`` (its own segment, no loss)."""
    from megatron_navil.ops import image_token_layout, vision_kwargs

    merge, patch = cfg.connector.merge, cfg.vision.patch
    special = torch.tensor(spec.special_ids)
    text_hi = min(spec.special_ids)
    ids, labels, positions, lengths, grids = [], [], [], [], []
    for sample in samples:
        parts = [torch.randint(0, text_hi, (sample.text_before,), generator=gen)]
        is_text = [torch.ones(sample.text_before, dtype=torch.bool)]
        for scales in sample.images:
            kinds = image_token_layout([(h // merge, w // merge) for h, w in scales])
            parts.append(special[kinds])
            is_text.append(torch.zeros(kinds.numel(), dtype=torch.bool))
            grids.extend(scales)
        parts.append(torch.randint(0, text_hi, (sample.text_after,), generator=gen))
        is_text.append(torch.ones(sample.text_after, dtype=torch.bool))
        sample_ids, text = torch.cat(parts), torch.cat(is_text)
        target = torch.full_like(sample_ids, IGNORE_INDEX)
        # Next-token loss where the next token is text (never across samples).
        target[:-1] = torch.where(text[1:], sample_ids[1:], IGNORE_INDEX)
        ids.append(sample_ids)
        labels.append(target)
        positions.append(torch.arange(sample_ids.numel()))
        lengths.append(sample_ids.numel())
    used = sum(lengths)
    if used > spec.seq_length:
        raise ValueError(f"samples need {used} tokens > seq_length {spec.seq_length}")
    if used < spec.seq_length:
        pad = spec.seq_length - used
        ids.append(torch.zeros(pad, dtype=torch.long))
        labels.append(torch.full((pad,), IGNORE_INDEX))
        positions.append(torch.arange(pad))
        lengths.append(pad)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    batch = dict(
        input_ids=torch.cat(ids),
        position_ids=torch.cat(positions),
        cu_seqlens=cu,
        labels=torch.cat(labels),
    )
    if grids:
        n = sum(h * w for h, w in grids)
        batch["patches"] = torch.randn(n, cfg.vision.channels * patch * patch, generator=gen)
        batch.update(vision_kwargs(grids, merge, cfg.vision.window_units(merge)))
    return batch


def make_batches(cfg: NaViLConfig, spec: BatchSpec, seed: int) -> list[dict[str, torch.Tensor]]:
    """All micro-batches of the global batch, a function of ``seed`` only."""
    gen = torch.Generator().manual_seed(seed)
    return [pack(samples, spec, cfg, gen) for samples in spec.micro_batches]


def forward_step(data_iterator: Iterator, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
    """megatron-core forward_step_func: mean next-token loss over the micro-batch's text
    targets (0 when it has none)."""
    batch = next(data_iterator)
    out = model(**batch)
    count = (batch["labels"] != IGNORE_INDEX).sum().clamp(min=1)

    def loss_func(per_token: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss = per_token.sum() / count
        return loss, {"loss": loss.detach().clone()}  # the schedule scales `loss` in place

    return out, loss_func


def train(
    chunks: list[Any],
    cfg: NaViLConfig,
    spec: BatchSpec,
    *,
    batch_seed: int,
    optimizer: Any = None,
    full_batch: bool = False,
) -> float:
    """Forward/backward over the global batch (and one optimizer step when given); the mean
    micro-batch loss on every rank. ``full_batch``: every rank runs all micro-batches (the
    single-layout reference inside a larger group)."""
    from megatron.core import parallel_state as ps

    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    batches = make_batches(cfg, spec, batch_seed)
    if not full_batch:
        if len(batches) % dp:
            raise ValueError(f"{len(batches)} micro-batches do not split over DP={dp}")
        per = len(batches) // dp
        batches = batches[dp_rank * per : (dp_rank + 1) * per]
    return T.run_schedule(
        chunks, batches, forward_step, seq_length=spec.seq_length, optimizer=optimizer,
        full_batch=full_batch,
    )  # fmt: skip


@dataclass
class Run:
    """NaViL set up in one layout: DDP-wrapped chunks, config and optional optimizer."""

    cfg: NaViLConfig
    spec: BatchSpec
    chunks: list[Any]
    config: Any
    groups: Any
    optimizer: Any = None

    def step(self, batch_seed: int, *, full_batch: bool = False, update: bool = True) -> float:
        return train(
            self.chunks,
            self.cfg,
            self.spec,
            batch_seed=batch_seed,
            optimizer=self.optimizer if update else None,
            full_batch=full_batch,
        )

    def shards(self, what: str = "param") -> T.Shards:
        return T.local_shards(self.chunks, what)


def setup_run(
    cfg: NaViLConfig,
    layout: dict[str, int] | None = None,
    *,
    spec: BatchSpec | None = None,
    seed: int = 7,
    first_stage_layers: int | None = None,
    optimizer: str | None = None,
    distributed_optimizer: bool = False,
    lr: float = 1e-2,
    stage: str | None = None,
    recompute: Recompute | None = None,
    moe_path: str = "auto",
    overlap: Any = None,
) -> Run:
    """(Re)initialise the parallel state for ``layout`` and build the seeded model in it;
    ``stage`` (``s1.1`` ...) freezes what that training stage does not train; ``recompute``:
    activation recompute of the LLM layers / vision blocks (None: none); ``moe_path``: how
    the FFN reaches its experts (``build_model``); ``layout["vision_parallel"]``: ``tp`` or
    ``dp`` (``build_model``); ``overlap``: the communication overlap
    (``training.optim.Overlap``; None: none)."""
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize

    layout = dict(layout or {})
    vision_parallel = layout.pop("vision_parallel", "tp")
    groups = initialize(**layout)
    layout.pop("seed", None)
    config = transformer_config(cfg, **layout, overlap_p2p_comm=bool(overlap and overlap.p2p))
    spec = spec or BatchSpec(special_ids=special_ids_for(cfg))
    chunks = build_model(
        cfg, config, groups, special_ids=spec.special_ids, first_stage_layers=first_stage_layers,
        recompute=recompute, moe_path=moe_path, vision_parallel=vision_parallel,
    )  # fmt: skip
    T.set_global_params(chunks, seed)
    if stage is not None:
        from megatron_navil.training.recipes import apply_freezing, get_stage

        apply_freezing(chunks, get_stage(stage))
    chunks = T.wrap_ddp(chunks, config, distributed_optimizer, overlap)
    opt = T.build_optimizer(chunks, optimizer, distributed_optimizer, lr) if optimizer else None
    return Run(cfg, spec, chunks, config, groups, opt)


def saved_activation_bytes(
    model: torch.nn.Module, batch: dict[str, torch.Tensor]
) -> dict[str, int]:
    """Bytes autograd keeps for the backward after one forward of ``model`` (an unwrapped
    single-stage NaViLModel) on ``batch``, by part: ``llm`` (decoder layers), ``vision``
    (vision blocks), ``shared`` (storages saved by more than one layer: the per-micro-batch
    RoPE tables, permutation, masks, ``cu_seqlens``), ``other`` (embeddings, connector, final
    norm, LM head, loss).

    Every tensor saved for the backward (``torch.autograd.graph.saved_tensors_hooks``, which
    also sees ``ctx.save_for_backward`` of megatron-core's checkpoints) is counted once per
    storage, after the forward: an output a ``CheckpointWithoutOutput`` released counts 0.
    Parameters do not count. A saved tensor belongs to the layer whose forward began last
    (a full-recompute checkpoint saves its layer's input right after the layer ran). The graph
    is dropped without a backward."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    current: list[tuple[str, int]] = [("other", 0)]
    hooks = []

    def enter(part: str, index: int) -> Any:
        return lambda *_: current.__setitem__(0, (part, index))

    owners: list[tuple[str, torch.nn.Module]] = [
        ("other", model.vision_model.embeddings),
        ("other", model.mlp1),
        ("other", model.embedding),
        ("other", model.final_layernorm),
        ("other", model.output_layer),
    ]
    owners += [("vision", block) for block in model.vision_model.encoder["layers"]]
    owners += [("llm", layer) for layer in model.layers.children()]
    for index, (part, module) in enumerate(owners):
        hooks.append(module.register_forward_pre_hook(enter(part, index)))
    saved: list[tuple[tuple[str, int], torch.Tensor]] = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append((current[0], tensor))
        return tensor

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            model(**batch)  # the graph (and what it saved) goes when this returns
    finally:
        for hook in hooks:
            hook.remove()
    storages: dict[int, tuple[set[tuple[str, int]], int]] = {}  # data_ptr: (owners, bytes)
    for owner, tensor in saved:
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in params:
            continue
        entry = storages.setdefault(storage.data_ptr(), (set(), storage.nbytes()))
        entry[0].add(owner)
    totals = dict.fromkeys(("llm", "vision", "shared", "other"), 0)
    for owners_of, nbytes in storages.values():
        totals["shared" if len(owners_of) > 1 else next(iter(owners_of))[0]] += nbytes
    saved.clear()
    return totals


class SyntheticSource:
    """A ``training.loop.BatchSource`` of synthetic packed batches: step ``k`` uses the global
    batch of seed ``seed + k`` (or always ``seed`` with ``repeat``, which a model can learn),
    and this rank takes its data-parallel share. State: the number of steps consumed."""

    def __init__(self, cfg: NaViLConfig, spec: BatchSpec, seed: int = 0, repeat: bool = True):
        self.cfg, self.spec, self.seed, self.repeat = cfg, spec, seed, repeat
        self.consumed = 0

    def next_step(self) -> list[MicroBatch]:
        from megatron.core import parallel_state as ps

        seed = self.seed if self.repeat else self.seed + self.consumed
        batches = make_batches(self.cfg, self.spec, seed)
        dp, rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
        per = len(batches) // dp
        self.consumed += 1
        return [MicroBatch.of(b) for b in batches[rank * per : (rank + 1) * per]]

    def state_dict(self) -> dict[str, int]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.consumed = int(state["consumed"])
