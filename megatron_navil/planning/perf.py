"""Step-time model: seconds per training step of a transformer (dense, MoE, or NaViL's vision
encoder + modality-expert LLM) in a parallel layout on a :class:`~.hardware.Hardware`, with the
time split by where it goes (:class:`Breakdown`).

Per micro-batch and pipeline rank, for every layer the rank holds:

* GEMMs: FLOPs (forward + 2x backward) over ``peak x efficiency(precision) x n / (n + n_half)``
  with ``n`` the GEMM's smallest dimension on one GPU (TP / expert-TP shards, tokens per
  expert);
* attention core: ``4 h d sum(s^2)`` forward FLOPs per layer (causal: half; sliding windows:
  ``s w``), x3 for forward + backward, at the flash-attention rate, from the per-sample /
  per-image segment lengths;
* element-wise ops: bytes moved (norms, residual adds, RoPE, SwiGLU/GELU, casts; backward 2x
  the forward; ``Calibration.elementwise_passes``) over the achieved memory bandwidth;
* TP with sequence parallelism: all-gathers / reduce-scatters of the ``tokens x hidden``
  activations (4 forward, 6 backward per layer, the backward re-gathers for the weight
  gradients), the part not hidden (``tp_overlap``) over the intra-node link;
* EP all-to-all: dispatch + combine, forward and backward, of ``tokens x topk x hidden``; the
  rank with the most routed tokens sets the pace of the FFN (NaViL's hard modality routing);
  an MoE overhead per routed token (fitted);
* recompute: selective re-runs the element-wise ops' forward, full the whole layer's forward;
* per-operator host overhead (CPU runs).

Per step: the slowest pipeline rank's micro-batch time ``T`` x ``m`` micro-batches, the bubble
``(p - 1) / v x T``, point-to-point sends, the data-parallel reduce-scatter / all-gather (FSDP:
per micro-batch) minus what ``dp_overlap`` of a micro-batch hides, the optimizer (bytes of the
rank's optimizer shard over memory bandwidth) and the straggler term (``planning.straggler``:
the expected slowest data-parallel replica over the mean, from the image-size distribution).

Model FLOPs (what MFU and "model TFLOP/s" count) are the forward + backward matmul and
attention FLOPs without recompute; :func:`Breakdown.model_flops` carries them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

from megatron_navil.planning.hardware import Hardware

# Operators a training step dispatches (counted with a TorchDispatchMode over
# ``training.step.train_step`` of the tiny model with doubled layers / blocks / micro-batches:
# ``python benchmarks/bench_perf_model_cpu.py --count-ops``, 2026-12-06): per LLM layer and
# vision block per micro-batch (forward + backward), per micro-batch (embedding, loss, the
# schedule), per step (gradient buffers, clipping, the distributed optimizer; its per-tensor
# work grows with the layers: 288 per LLM layer; the count's -27 per vision block comes from
# the test batch's first micro-batch having no image and is folded into the fixed 188).
# Only the CPU preset charges them (``Calibration.op_overhead_s``).
OPS_PER_LLM_LAYER = 492
OPS_PER_VISION_BLOCK = 391
OPS_PER_MICRO_BATCH = 272
OPS_PER_STEP = 188
OPS_PER_STEP_PER_LLM_LAYER = 288
OPS_PER_STEP_PER_VISION_BLOCK = 0


@dataclass(frozen=True)
class Tower:
    """A stack of transformer layers as the time model needs it."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    ffn: int
    experts: int = 1  # routed FFN experts per layer (1: dense)
    topk: int = 1  # experts per token
    gated: bool = True  # SwiGLU (3 matrices) vs a GELU MLP (2)
    causal: bool = True
    window: int | None = None  # sliding-window attention span of the windowed layers
    window_layers: float = 0.0  # fraction of the layers with the window
    vocab: int = 0  # LM head (on the last stage); 0: none
    ops_per_layer: int = OPS_PER_LLM_LAYER

    def attention_params(self) -> int:
        """q, k, v, o matmul parameters of one layer."""
        return 2 * (self.heads + self.kv_heads) * self.head_dim * self.hidden

    def ffn_params_per_token(self, gated: bool | None = None) -> int:
        """Matmul parameters of the ``topk`` experts one token uses."""
        mats = 3 if (self.gated if gated is None else gated) else 2
        return self.topk * mats * self.hidden * self.ffn

    def pairs(self, segments: Sequence[int], windows: bool = True) -> float:
        """Query-key pairs attended per layer, averaged over the layers (causal: half;
        windowed layers ``s x w``)."""
        full = sum(s * s for s in segments) / (2 if self.causal else 1)
        if not windows or not self.window or not self.window_layers:
            return full
        windowed = sum(s * min(s, self.window) for s in segments)
        return (1 - self.window_layers) * full + self.window_layers * windowed

    def model_flops(
        self, tokens: int, segments: Sequence[int], gated: bool | None = None, windows=True
    ) -> float:
        """Forward + backward model FLOPs of the whole tower on one micro-batch (no recompute):
        ``6 N t`` + ``12 h d pairs`` per layer + the LM head."""
        per_layer = 6 * (self.attention_params() + self.ffn_params_per_token(gated)) * tokens
        per_layer += 12 * self.heads * self.head_dim * self.pairs(segments, windows)
        return self.layers * per_layer + 6 * self.vocab * self.hidden * tokens


@dataclass(frozen=True)
class Parallel:
    """The layout as the time model needs it (one micro-batch = ``tokens`` of one rank)."""

    tp: int = 1
    pp: int = 1
    vpp: int = 1
    ep: int = 1
    etp: int = 1
    dp: int = 1
    micro_batches: int = 1  # per data-parallel replica per step
    precision: str = "bf16"  # GEMM precision: bf16 | fp8 | fp32
    recompute: str = "none"  # none | selective | full
    fsdp: bool = False  # parameters sharded over DP, gathered per micro-batch
    grad_bytes: int = 4  # reduce-scatter in fp32 (megatron-core's default with bf16 params)
    param_bytes: int = 2

    @property
    def dp_within_node_span(self) -> int:
        """GPUs a data-parallel group spans in rank order (TP innermost, then DP)."""
        return self.tp * self.dp


@dataclass
class Breakdown:
    """Seconds per step on the critical path, by where they go (sum = :attr:`step_s`)."""

    vision: float = 0.0  # vision encoder + connector compute
    llm_gemm: float = 0.0
    llm_attention: float = 0.0
    elementwise: float = 0.0  # LLM norms, activations, residuals, loss
    moe: float = 0.0  # routing overhead, expert load imbalance
    recompute: float = 0.0
    tp_comm: float = 0.0
    ep_comm: float = 0.0
    op_overhead: float = 0.0  # host-side per-operator cost (CPU)
    pp_comm: float = 0.0
    bubble: float = 0.0
    dp_comm: float = 0.0  # exposed
    optimizer: float = 0.0
    straggler: float = 0.0  # slowest data-parallel replica over the mean
    model_flops: float = field(default=0.0, repr=False)  # per step, all GPUs
    gpus: int = field(default=1, repr=False)
    tokens: int = field(default=0, repr=False)  # LLM tokens per step, all GPUs

    PARTS = (
        "vision", "llm_gemm", "llm_attention", "elementwise", "moe", "recompute", "tp_comm",
        "ep_comm", "op_overhead", "pp_comm", "bubble", "dp_comm", "optimizer", "straggler",
    )  # fmt: skip

    @property
    def step_s(self) -> float:
        return sum(getattr(self, k) for k in self.PARTS)

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.tokens / self.step_s / self.gpus

    @property
    def model_tflops_per_gpu(self) -> float:
        return self.model_flops / self.step_s / self.gpus / 1e12

    def mfu(self, peak_flops: float) -> float:
        return self.model_flops / self.step_s / self.gpus / peak_flops

    def scaled(self, k: float) -> Breakdown:
        out = Breakdown(**asdict(self))
        for name in self.PARTS:
            setattr(out, name, getattr(self, name) * k)
        return out

    def add(self, other: Breakdown) -> Breakdown:
        out = Breakdown(**asdict(self))
        for name in self.PARTS:
            setattr(out, name, getattr(self, name) + getattr(other, name))
        return out

    def largest(self, n: int = 3) -> list[tuple[str, float]]:
        """The ``n`` largest parts with their share of the step."""
        total = self.step_s
        parts = sorted(((k, getattr(self, k)) for k in self.PARTS), key=lambda x: -x[1])
        return [(k, v / total) for k, v in parts[:n] if v > 0]

    def as_dict(self) -> dict[str, float]:
        d = {k: getattr(self, k) for k in self.PARTS}
        d.update(
            step_s=self.step_s,
            tokens_per_s_per_gpu=self.tokens_per_s_per_gpu,
            model_tflops_per_gpu=self.model_tflops_per_gpu,
        )
        return d

    def line(self, n: int = 4) -> str:
        """``llm_gemm 41%, vision 22%, ...``: what limits the step."""
        return ", ".join(f"{k} {v:.0%}" for k, v in self.largest(n))


def gemm_rate(hw: Hardware, precision: str, n: float) -> float:
    """Achieved FLOP/s of a GEMM whose smallest dimension on one device is ``n``."""
    cal = hw.calibration
    eff = cal.gemm_efficiency.get(precision, cal.gemm_efficiency["bf16"])
    return hw.peak(precision) * eff * n / (n + cal.gemm_half_dim)


def attention_rate(hw: Hardware, head_dim: int, precision: str) -> float:
    """Flash attention's achieved rate (bf16 on GPUs; the fp32 path on CPU):
    ``attention_efficiency`` is at head dim 128, other head dims scale like a GEMM of that
    inner dimension."""
    p = "fp32" if precision == "fp32" else "bf16"
    cal = hw.calibration

    def shape(n: float) -> float:
        return n / (n + cal.gemm_half_dim)

    return hw.peak(p) * cal.attention_efficiency * shape(head_dim) / shape(128)


def memory_rate(hw: Hardware) -> float:
    return hw.hbm_bytes_per_s * hw.calibration.memory_efficiency


def collective_s(hw: Hardware, nbytes: float, group: int, intra: bool, alltoall=False) -> float:
    """One ring all-gather / reduce-scatter (or all-to-all) of ``nbytes`` (the full tensor) in
    a group of ``group``: each rank sends ``(g - 1) / g`` of it."""
    if group <= 1:
        return 0.0
    cal = hw.calibration
    bw = hw.intra_node_bytes_per_s if intra else hw.inter_node_bytes_per_s
    eff = cal.alltoall_efficiency if alltoall else cal.link_efficiency
    steps = 1 if alltoall else group - 1
    return nbytes * (group - 1) / group / (bw * eff) + steps * cal.collective_latency_s


def element_bytes(precision: str) -> int:
    return 4 if precision == "fp32" else 2


def layer_time(
    tower: Tower,
    tokens: int,
    segments: Sequence[int],
    par: Parallel,
    hw: Hardware,
    *,
    tp: int | None = None,
    expert_load: float = 1.0,
    part: str = "llm",
    wgrad: float = 1.0,
    recompute: str | None = None,
    pairs: float | None = None,
) -> Breakdown:
    """One layer, one micro-batch, forward + backward on one GPU. ``tp``: this tower's TP
    (default ``par.tp``; a replicated vision tower has 1); ``expert_load``: tokens through the
    busiest rank's experts over the balanced share (NaViL's hard routing); ``wgrad``: share of
    the GEMM FLOPs whose weight gradients are computed (frozen weights skip a third);
    ``pairs``: attention pairs instead of ``tower.pairs(segments)`` (an expected value)."""
    t = par.tp if tp is None else tp
    b = element_bytes(par.precision)
    cal = hw.calibration
    out = Breakdown()
    # GEMMs: q/k/v/o on all tokens (sequence-parallel input gathered), heads split over TP.
    attn_n = min(tokens, tower.hidden, (tower.heads + 2 * tower.kv_heads) * tower.head_dim / t)
    attn_flops = 6 * tower.attention_params() / t * tokens
    gemm = attn_flops / gemm_rate(hw, par.precision, attn_n)
    etp = par.etp if tower.experts > 1 else t
    ep = par.ep if tower.experts > 1 else 1
    per_expert = tokens * tower.topk * ep / max(tower.experts, 1) if tower.experts > 1 else tokens
    ffn_n = min(per_expert, tower.hidden, tower.ffn / etp)
    ffn_flops = 6 * tower.ffn_params_per_token() / etp * tokens * expert_load
    gemm += ffn_flops / gemm_rate(hw, par.precision, ffn_n)
    gemm *= (4 + 2 * wgrad) / 6
    pairs = tower.pairs(segments) if pairs is None else pairs
    attn = 12 * tower.heads * tower.head_dim / t * pairs
    attn_s = attn / attention_rate(hw, tower.head_dim, par.precision)
    if tower.causal and not cal.attention_skips_masked:
        attn_s *= 2  # the masked half is computed too
    hidden_passes, ffn_passes = cal.elementwise_passes[part]
    ffn_width = tower.ffn * tower.topk * expert_load * t / etp
    fwd_bytes = b * tokens / t * (hidden_passes * tower.hidden + ffn_passes * ffn_width)
    mem = 3 * fwd_bytes / memory_rate(hw)
    # TP / SP: 4 collectives forward, 6 backward, of tokens x hidden (or as counted).
    act = tokens * tower.hidden * b
    n_tp = cal.tp_collectives[part] if cal.tp_collectives else 10
    tp_s = n_tp * collective_s(hw, act, t, t <= hw.gpus_per_node) * (1 - cal.tp_overlap)
    ep_s = moe_s = 0.0
    if ep > 1:
        intra = ep * t <= hw.gpus_per_node
        routed = tokens / t * tower.topk * tower.hidden * b
        ep_s = 4 * collective_s(hw, routed, ep, intra, alltoall=True) * expert_load
        extra = (cal.ep_collectives or 4) - 4
        ep_s += max(0.0, extra) * collective_s(hw, 0.0, ep, intra)
    if tower.experts > 1:
        moe_s = cal.moe_seconds_per_routed_token * tokens / t * tower.topk
        moe_s *= expert_load
    ops = tower.ops_per_layer * cal.op_overhead_s
    # Recompute: selective = the element-wise forward again; full = the whole forward.
    rc = 0.0
    recompute = recompute or par.recompute
    if recompute == "selective":
        rc = fwd_bytes / 2 / memory_rate(hw)
    elif recompute == "full":
        # the forward's share: a third of the GEMMs / element-wise ops / operators, 0.3 of
        # flash attention (its backward does 2.5x the forward), 4 of the 10 TP collectives
        rc = (gemm + mem + ops) / 3 + attn_s * 0.3 + tp_s * 0.4 + ep_s / 2
    if part == "vision":
        out.vision = gemm + attn_s + mem
    else:
        imbalance = ffn_flops * (1 - 1 / expert_load) / gemm_rate(hw, par.precision, ffn_n)
        imbalance *= (4 + 2 * wgrad) / 6
        out.llm_gemm = gemm - imbalance
        out.moe = moe_s + imbalance
        out.llm_attention = attn_s
        out.elementwise = mem
    out.recompute, out.tp_comm, out.ep_comm, out.op_overhead = rc, tp_s, ep_s, ops
    return out


def head_time(
    vocab: int, hidden: int, tokens: int, par: Parallel, hw: Hardware, tp: int | None = None
) -> Breakdown:
    """LM head + cross-entropy on the last stage (vocabulary split over TP)."""
    t = par.tp if tp is None else tp
    flops = 6 * vocab * hidden * tokens / t
    gemm = flops / gemm_rate(hw, par.precision, min(tokens, hidden, vocab / t))
    mem = tokens * vocab / t * 4 * 4 / memory_rate(hw)  # fp32 softmax: ~4 passes
    return Breakdown(llm_gemm=gemm, elementwise=mem)


@dataclass(frozen=True)
class LayerGroup:
    """``layers`` alike layers of one tower a pipeline rank runs per micro-batch."""

    tower: Tower
    layers: int
    tokens: int  # tokens (LLM) or patches (vision) of the micro-batch
    segments: tuple[int, ...]  # attention segments: samples (LLM) or images x scales (vision)
    tp: int  # this tower's TP (a replicated vision tower: 1)
    expert_load: float = 1.0
    part: str = "llm"  # llm | vision (the breakdown's column)
    wgrad: float = 1.0  # share of the GEMM FLOPs whose weights are trained (frozen: no wgrad)
    recompute: str | None = None  # None: Parallel.recompute
    pairs: float | None = None  # attention pairs per layer (None: from the segments)
    # share of the micro-batches the tower runs on (the vision tower skips text-only ones):
    # ``tokens`` and ``pairs`` are means over all micro-batches; an active one carries
    # ``1 / active`` of them, and only active ones pay the operators and collectives
    active: float = 1.0


@dataclass(frozen=True)
class RankWork:
    """What one pipeline rank runs per micro-batch (all its chunks), and its parameters for
    the data-parallel and optimizer terms."""

    groups: tuple[LayerGroup, ...]
    head: tuple[int, int, int] | None  # (vocab, hidden, tokens) on the last stage
    dense_params: float  # trainable, on this GPU
    expert_params: float
    total_params: float  # held (for FSDP's gathers)
    boundary_bytes: float  # activation sent to the next stage per micro-batch per chunk
    chunks: int = 1
    extra_gemms: tuple[tuple[float, float, str], ...] = ()  # (FLOPs, smallest dim, part)
    first_stage: bool = True
    last_stage: bool = True


def rank_time(work: RankWork, par: Parallel, hw: Hardware) -> Breakdown:
    """Per micro-batch time of one pipeline rank (all its chunks)."""
    out = Breakdown(op_overhead=OPS_PER_MICRO_BATCH * hw.calibration.op_overhead_s)
    # the embedding's and the loss's: on the first and the last stage, half each
    ends = (work.first_stage + work.last_stage) / 2
    out.tp_comm = _small_collectives_s(hw, par.tp, "micro_batch") * ends
    for g in work.groups:
        if g.layers and g.active > 0:
            pairs = None if g.pairs is None else g.pairs / g.active
            lt = layer_time(
                g.tower, round(g.tokens / g.active), g.segments, par, hw, tp=g.tp,
                expert_load=g.expert_load, part=g.part, wgrad=g.wgrad, recompute=g.recompute,
                pairs=pairs,
            )  # fmt: skip
            out = out.add(lt.scaled(g.layers * g.active))
    for flops, n, part in work.extra_gemms:
        name = "vision" if part == "vision" else "llm_gemm"
        setattr(out, name, getattr(out, name) + flops / gemm_rate(hw, par.precision, n))
    if work.head:
        out = out.add(head_time(*work.head, par, hw))
    return out


def _small_collectives_s(hw: Hardware, tp: int, where: str) -> float:
    """The counted TP collectives outside the layers (``Calibration.tp_collectives``:
    "micro_batch" or "step"): scalars and norms, their latency only."""
    counts = hw.calibration.tp_collectives
    if not counts or tp <= 1:
        return 0.0
    return counts.get(where, 0.0) * collective_s(hw, 0.0, tp, tp <= hw.gpus_per_node)


def _share_cores(hw: Hardware, processes: int) -> float:
    """CPU preset: ranks beyond the cores time-share them (their compute slows by this)."""
    if not hw.processes_share_cores:
        return 1.0
    return max(1.0, processes / hw.processes_share_cores)


def step_time(
    ranks: Sequence[RankWork],
    par: Parallel,
    hw: Hardware,
    *,
    model_flops: float,
    tokens: int,
    straggler_s: float = 0.0,
) -> Breakdown:
    """One optimizer step: the slowest pipeline rank's micro-batches, the bubble, p2p, the
    exposed data-parallel communication, the optimizer, and ``straggler_s`` (the expected
    slowest data-parallel replica's extra time, ``planning.straggler``)."""
    cal = hw.calibration
    gpus = par.tp * par.pp * par.dp
    share = _share_cores(hw, gpus)
    # Time-shared cores (CPU preset) slow all a rank does per micro-batch, its TP / EP
    # collectives too: gloo runs on the cores, and a partner waiting for one arrives late
    # (measured: a TP collective takes 2-3x as long with 4 ranks on 2 cores as with 2). The
    # step's data-parallel sync is left unscaled (small in every measured layout).
    per_rank = [rank_time(w, par, hw).scaled(share) for w in ranks]
    slowest = max(range(len(ranks)), key=lambda i: per_rank[i].step_s)
    t_mb = per_rank[slowest].step_s
    m = par.micro_batches
    out = per_rank[slowest].scaled(m)
    if par.pp > 1:
        # in the bubble one stage's ranks run while the others wait: they share less
        bubble_share = _share_cores(hw, gpus // par.pp) / share
        out.bubble = (par.pp - 1) / par.vpp * t_mb * bubble_share
        w = ranks[slowest]
        p2p = (
            2
            * w.chunks
            * (
                w.boundary_bytes / (hw.inter_node_bytes_per_s * cal.link_efficiency)
                + cal.collective_latency_s
            )
        )
        # megatron-core overlaps the interleaved schedule's sends with compute
        out.pp_comm = m * p2p * (0.0 if par.vpp > 1 and cal.op_overhead_s == 0 else 1.0)
    # Data parallel: dense grads over DP, expert grads over the expert-DP group.
    intra = par.dp_within_node_span <= hw.gpus_per_node
    edp = max(1, par.tp * par.dp // (par.ep * par.etp))
    dp_s = opt_s = 0.0
    for w in ranks:
        dense_bytes = w.dense_params * (par.grad_bytes + par.param_bytes)
        expert_bytes = w.expert_params * (par.grad_bytes + par.param_bytes)
        comm = collective_s(hw, dense_bytes, par.dp, intra)
        comm += collective_s(hw, expert_bytes, edp, intra)
        window = t_mb
        if par.fsdp:  # gather (forward, backward) + reduce-scatter every micro-batch
            per_mb = collective_s(hw, w.total_params * par.param_bytes, par.dp, intra) * 2
            per_mb += collective_s(hw, w.dense_params * par.grad_bytes, par.dp, intra)
            comm = m * max(0.0, per_mb - cal.dp_overlap * t_mb)
            window = 0.0
        dp_s = max(dp_s, max(0.0, comm - cal.dp_overlap * window))
        shard = w.dense_params / par.dp + w.expert_params / edp
        ops = OPS_PER_STEP + sum(
            g.layers
            * (OPS_PER_STEP_PER_VISION_BLOCK if g.part == "vision" else OPS_PER_STEP_PER_LLM_LAYER)
            for g in w.groups
        )
        ops_s = ops * cal.op_overhead_s
        opt_bytes = shard * cal.optimizer_bytes_per_param
        opt_s = max(opt_s, (opt_bytes / memory_rate(hw) + ops_s) * share)
    out.dp_comm = dp_s
    out.optimizer = opt_s + cal.optimizer_fixed_s
    out.tp_comm += _small_collectives_s(hw, par.tp, "step")
    out.straggler = straggler_s * share
    out.model_flops, out.gpus, out.tokens = model_flops, gpus, tokens
    return out
