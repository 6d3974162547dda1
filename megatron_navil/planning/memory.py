"""Memory per GPU of a NaViL model in a parallel layout: weights, gradients, optimizer state,
kept activations of the micro-batches in flight and transient peaks, per pipeline rank.

Bytes, with ``P`` the parameters of the rank (``planning.params``), ``P_t`` its trainable ones,
``d`` the distributed optimizer's shard count: the data-parallel size for dense parameters, the
expert-data-parallel size ``tp * dp / (ep * etp)`` for expert parameters:

  weights     bf16: 2 P                fp32: 4 P
  grads       4 P_t   (megatron-core DDP with grad_reduce_in_fp32: fp32 main-grad buffers)
  optimizer   bf16: (4 + 8) P_t / d    (fp32 master copy + Adam m, v, sharded over DP)
              fp32: 8 P_t / d          (the fp32 parameters are the master weights)
  activations (what autograd keeps per micro-batch, ``planning.activations``) x (micro-batches
              in flight, ``planning.schedule``) + transients
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass

from megatron_navil.config.model import NaViLConfig
from megatron_navil.planning.activations import (
    element_bytes,
    stage_activations,
    transient_bytes,
)
from megatron_navil.planning.layout import GiB, Layout, micro_batches
from megatron_navil.planning.params import rank_params
from megatron_navil.planning.schedule import in_flight

SCOPE = (
    "scope: device memory of the model's tensors (weights, gradients, optimizer state, the "
    "schedule's kept activations, the largest transient); not counted: the CUDA context and "
    "NCCL buffers (what the reserve is for) and, in CPU runs, the framework's host-side "
    "buffers (issue 23 measured 1.5-2.5 GiB more per process in bf16 at short sequences; "
    "fp32 within 5-10%)"
)
"""What the memory numbers cover, printed under every table (tools/plan_layout.py, the launch
dry run)."""


@dataclass(frozen=True)
class RankMemory:
    """Bytes on one GPU of pipeline rank ``pp_rank`` (the TP/EP ranks of a stage are alike;
    EP: the rank holding the visual experts)."""

    pp_rank: int
    params: int
    trainable: int
    weights: float
    grads: float
    optimizer: float
    activations: float  # kept activations of the micro-batches in flight
    transient: float
    in_flight: float  # micro-batches' worth (1F1B) / chunk forwards (interleaved) at the peak

    @property
    def total(self) -> float:
        return self.weights + self.grads + self.optimizer + self.activations + self.transient

    def as_gib(self) -> dict[str, float]:
        d = asdict(self)
        for k in ("weights", "grads", "optimizer", "activations", "transient"):
            d[k] = d[k] / GiB
        d["total"] = self.total / GiB
        return d


def rank_memory(cfg: NaViLConfig, layout: Layout, pp_rank: int) -> RankMemory:
    ep_rank = layout.ep - 1  # holds the visual experts: the most trainable in S1.x
    p = rank_params(cfg, layout, pp_rank, ep_rank)
    dense_t, expert_t = p.trainable(layout.stage)
    wb = element_bytes(layout)
    master = 4 if layout.dtype == "bf16" else 0
    optimizer = (master + 8) * (dense_t / layout.dp + expert_t / layout.expert_dp)
    chunks = [
        stage_activations(cfg, layout, c * layout.pp + pp_rank).total for c in range(layout.vpp)
    ]
    m = micro_batches(layout)
    acts = in_flight(layout.pp, layout.vpp, m, pp_rank, chunks)
    count = in_flight(layout.pp, layout.vpp, m, pp_rank, [1.0] * layout.vpp)
    return RankMemory(
        pp_rank=pp_rank,
        params=p.total,
        trainable=dense_t + expert_t,
        weights=wb * p.total,
        grads=4 * (dense_t + expert_t),
        optimizer=optimizer,
        activations=acts,
        transient=transient_bytes(cfg, layout, pp_rank),
        in_flight=count,
    )


def plan_memory(cfg: NaViLConfig, layout: Layout) -> list[RankMemory]:
    """Memory of every pipeline rank (validated layout)."""
    layout.validate(cfg)
    return [rank_memory(cfg, layout, r) for r in range(layout.pp)]


def peak_rank(ranks: Iterable[RankMemory]) -> RankMemory:
    return max(ranks, key=lambda r: r.total)
