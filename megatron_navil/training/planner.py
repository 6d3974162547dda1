"""Memory and FLOPs of a NaViL model in a parallel layout, from the sizes alone (no torch
model is built; importable without torch.distributed). ``tools/plan_layout.py`` is its CLI.

Parameters per rank follow the builder exactly: the LLM layers of each (virtual) pipeline stage
come from ``models.build.stage_layer_ranges`` (stage 0 may get ``first_stage_layers``), stage 0
also holds the vision encoder, connector, embedding and the 12-row special-token table, the last
stage the final norm and LM head; the vision tower splits over TP only where its heads and MLP
divide (``models.vision.tp_size_for``, else it is replicated); attention q/k/v/o split over TP,
the FFN experts over EP (whole experts) and expert-TP (``ffn``). tests/unit/test_planner.py
checks these counts against modules built on the meta device.

Memory per GPU (bytes; ``P`` parameters of the rank, ``P_t`` its trainable ones, ``d`` the
distributed optimizer's shard count: the data-parallel size for dense parameters, the
expert-data-parallel size ``tp * dp / (ep * etp)`` for expert parameters):

  weights     bf16: 2 P                fp32: 4 P
  grads       4 P_t   (megatron-core DDP with grad_reduce_in_fp32: fp32 main-grad buffers)
  optimizer   bf16: (4 + 8) P_t / d    (fp32 master copy + Adam m, v, sharded over DP)
              fp32: 8 P_t / d          (the fp32 parameters are the master weights)
  activations (what autograd keeps per micro-batch) x (micro-batches in flight) + transients

Activations, per token per LLM layer (Korthikanti et al. 2022 style, but term by term from what
*this* code saves; ``b`` = 2 (bf16) or 4 (fp32) bytes, ``T`` = TP, sequence parallel on with
TP > 1, flash / varlen attention so no ``s^2`` term; ``h``/``g`` query/KV heads, ``d`` head
dim, ``F`` FFN, ``r`` tokens through this rank's experts per token of the micro-batch):

  attention  2bH/T (input norm: input + normalised, torch RMSNorm)
             + bH (q/k/v input, after the sequence-parallel all-gather: *not* divided by T,
               the per-modality projections are F.linear on the gathered, sorted tokens)
             + [qk_norm] 8 (h + g) d / T (Qwen3 per-head norms keep fp32 copies)
             + b (h + 2g) d / T + 4h/T (q, k, v and log-sum-exp kept by flash attention)
             + 2 b h d / T (attention output, and its modality-sorted copy, the o input)
  FFN        2bH/T (post-attention norm) + r (bH + 5 b F / etp) (expert input, SwiGLU input
             2F, silu(x1), product, probability-scaled product; each token goes through
             exactly one expert of its modality, ``topk`` with more experts per modality)

with ``r = 1`` for EP = 1 (after the expert-TP all-gather every rank sees the TP group's
tokens) and, with EP > 1, ``r = ep x`` the largest share of tokens routed to one EP rank's
experts (hard modality routing: the rank holding the text expert gets the text tokens of all
ep micro-batches; the worst case uses the larger modality fraction).

Vision encoder, per patch per block (replicated over TP unless its heads split, ``v`` = its TP,
``W`` width, ``M`` MLP): two RMSNorms (4 + b) W each (fp32 copy + normalised), q/k-norm
(4 + b) 2W / v, the qkv and fc1 inputs b W each, q, k, v, out 4 b W / v, the two layer-scale
products keep their other operand b W each, fc1 output and GELU output 2 b M / v; plus the
patch embedding's input ``b C p^2`` per patch, and the connector ``2 b W + 2 b H / (4 v)`` per
patch. LM head (last stage): final norm 2bH/T, head input bH/T, fp32 softmax 4V/T per token
kept for the backward, and a transient bf16 copy of the logits bV/T (bf16 only).

Recompute (``config.Recompute``: ``Layout.recompute`` is its ``llm``, ``vision_recompute`` its
``vision``; :meth:`Layout.recompute_config`): ``none`` as above; ``selective`` recomputes the
cheap element-wise ops (norms, SwiGLU/GELU, the qk-norm copies) from their inputs, keeping the
linear inputs and flash attention's tensors (with flash attention there is no ``s^2`` core to
drop, which was the paper's selective target); in the vision blocks the norm outputs *are* the
qkv / fc1 inputs, released with them (in the LLM the linears keep a modality-sorted copy);
``full`` keeps only each layer's input (b H / T per token, b W per patch per vision block) and
recomputes one layer at a time in the backward. Transient: the backward's workspace of one
layer (its activations' gradients, about the size of its activations; twice that for a fully
recomputed layer) and on the last stage the bf16 logits. ``models/recompute.py`` implements
both; tests/unit/test_recompute.py counts the bytes autograd keeps on the tiny model (fp32,
CPU) against :func:`llm_layer_bytes` / :func:`vision_layer_bytes`.

Micro-batches in flight: megatron-core's 1F1B keeps ``min(pp - rank, m)`` on pipeline rank
``rank`` (``pp`` on stage 0, which also holds the vision tower); the interleaved schedule (VPP
``v``) keeps up to ``2 (pp - rank - 1) + (v - 1) pp + 1`` chunk forwards, which :func:`in_flight`
simulates exactly with per-chunk weights (stage 0's chunk is heavier).

FLOPs (model FLOPs, no recompute; 3 x forward, matmuls only): LLM ``6 N_act t`` with ``N_act``
the matmul parameters one token uses (its modality's q/k/v/o, ``topk`` experts, the LM head),
plus causal attention ``6 L h d s^2`` per sample of length ``s`` (flash skips the masked half);
vision ``6 N_vis p`` plus bidirectional attention ``12 depth W s^2`` per image segment (each
image and scale is its own segment); connector ``6 (4WH + H^2)`` per merged token.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace

from megatron_navil.config.model import RECOMPUTE_MODES, NaViLConfig, Recompute
from megatron_navil.config.tokens import SPECIAL_TOKENS

GiB = 1024**3
RECOMPUTE = RECOMPUTE_MODES
DTYPES = ("bf16", "fp32")
# Parameter groups of training/recipes.py (which stage trains what).
GROUPS = ("vision", "connector", "special_tokens", "visual_experts", "text_attention", "rest")
STAGE_TRAINS = {
    "s1.1": ("vision", "connector", "special_tokens", "visual_experts"),
    "s1.2": ("vision", "connector", "special_tokens", "visual_experts", "text_attention"),
    "s2": GROUPS,
}
STAGE_MAX_PATCHES = {"s1.1": 4096, "s1.2": 12188, "s2": 24576}


def _vision_tp(cfg: NaViLConfig, tp: int) -> int:
    # Same rule as models.vision.tp_size_for (kept torch-free here; tested equal).
    v = cfg.vision
    return tp if v.heads % tp == 0 and v.mlp % tp == 0 else 1


@dataclass(frozen=True)
class Layout:
    """A parallel layout and what one micro-batch holds."""

    tp: int = 1  # tensor parallel (sequence parallel on when > 1)
    pp: int = 1  # pipeline stages
    vpp: int = 1  # virtual stages (model chunks) per pipeline rank; > 1: interleaved 1F1B
    ep: int = 1  # expert parallel
    etp: int | None = None  # expert tensor parallel (None: = tp)
    dp: int = 1  # data parallel
    first_stage_layers: int | None = None  # LLM layers of stage 0 (None: even split)
    seq_length: int = 16384  # tokens of one packed sequence = one micro-batch
    patches: int = 16384  # vision patches of one micro-batch (the packer's patch budget)
    max_image_patches: int = 24576  # largest image (base scale), for the attention FLOPs
    recompute: str = "none"  # LLM layers: none | selective | full
    vision_recompute: str | None = None  # vision blocks (None: as ``recompute``)
    dtype: str = "bf16"  # bf16 (fp32 master + grads) | fp32 (CPU runs: plain fp32 Adam)
    stage: str = "s2"  # training stage: frozen parameters get no grads / optimizer state
    micro_batches: int | None = None  # per DP replica per step (None: 16)

    @property
    def vision_rc(self) -> str:
        return self.vision_recompute or self.recompute

    def recompute_config(self) -> Recompute:
        """The model's ``Recompute`` for this layout (``build_model(recompute=...)``)."""
        return Recompute(llm=self.recompute, vision=self.vision_rc).validate()

    @property
    def expert_tp(self) -> int:
        return self.etp or self.tp

    @property
    def gpus(self) -> int:
        return self.tp * self.pp * self.dp

    @property
    def expert_dp(self) -> int:
        return self.tp * self.dp // (self.ep * self.expert_tp)

    @property
    def stages(self) -> int:
        return self.pp * self.vpp

    def name(self) -> str:
        parts = [f"TP{self.tp}", f"PP{self.pp}"]
        if self.vpp > 1:
            parts.append(f"VPP{self.vpp}")
        if self.ep > 1:
            parts.append(f"EP{self.ep}")
        if self.etp is not None and self.etp != self.tp:
            parts.append(f"ETP{self.etp}")
        parts.append(f"DP{self.dp}")
        if self.first_stage_layers is not None:
            parts.append(f"first{self.first_stage_layers}")
        return " ".join(parts)

    def validate(self, cfg: NaViLConfig) -> Layout:
        """ValueError (one line, naming the flag) when the layout cannot build ``cfg``."""
        lm, e = cfg.language, cfg.experts
        for name in ("tp", "pp", "vpp", "ep", "dp", "seq_length"):
            if getattr(self, name) < 1:
                raise ValueError(
                    f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}"
                )
        if self.patches < 0:
            raise ValueError(f"--patches must be >= 0, got {self.patches}")
        if self.recompute not in RECOMPUTE:
            raise ValueError(f"--recompute must be one of {RECOMPUTE}, got {self.recompute!r}")
        if self.vision_rc not in RECOMPUTE:
            raise ValueError(
                f"--recompute-vision must be one of {RECOMPUTE}, got {self.vision_recompute!r}"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.stage not in STAGE_TRAINS:
            raise ValueError(f"--stage must be one of {tuple(STAGE_TRAINS)}, got {self.stage!r}")
        if self.vpp > 1 and self.pp < 2:
            raise ValueError(f"--vpp {self.vpp} needs --pp >= 2 (got --pp {self.pp})")
        for name, count in (("heads", lm.heads), ("kv_heads", lm.kv_heads)):
            if count % self.tp:
                raise ValueError(f"--tp {self.tp} does not divide the LLM's {count} {name}")
        if lm.vocab % self.tp:
            raise ValueError(f"--tp {self.tp} does not divide the vocabulary of {lm.vocab}")
        if self.tp > 1 and self.seq_length % self.tp:
            raise ValueError(
                f"--seq-length {self.seq_length} is not a multiple of --tp {self.tp} "
                "(sequence parallelism)"
            )
        if _vision_tp(cfg, self.tp) > 1 and lm.hidden % self.tp:
            raise ValueError(f"--tp {self.tp} does not divide the LLM hidden size {lm.hidden}")
        experts = 2 * e.per_modality
        if experts % self.ep:
            raise ValueError(f"--ep {self.ep} does not divide the {experts} experts")
        if lm.ffn % self.expert_tp:
            raise ValueError(f"--etp {self.expert_tp} does not divide the FFN size {lm.ffn}")
        if (self.tp * self.dp) % (self.ep * self.expert_tp):
            raise ValueError(
                f"ep*etp={self.ep * self.expert_tp} must divide tp*dp={self.tp * self.dp} "
                "(megatron-core's expert groups)"
            )
        from megatron_navil.models.build import stage_layer_ranges

        try:
            ranges = stage_layer_ranges(lm.layers, self.stages, self.first_stage_layers)
        except ValueError as exc:
            flag = "--pp * --vpp" if self.vpp > 1 else "--pp"
            raise ValueError(f"{flag}: {exc} (--first-stage-layers)") from None
        if self.stages > 1 and any(len(r) == 0 for r in ranges[1:]):
            raise ValueError(
                f"{self.stages} pipeline stages leave a stage after the first without LLM layers"
            )
        if self.micro_batches is not None and self.micro_batches < 1:
            raise ValueError(f"--micro-batches must be >= 1, got {self.micro_batches}")
        return self


# ---------------------------------------------------------------------------------------------
# Parameters


@dataclass
class Params:
    """Parameter elements held by one rank, by recipe group, dense vs expert (the distributed
    optimizer shards these two over different data-parallel groups)."""

    dense: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))
    expert: dict[str, int] = field(default_factory=lambda: dict.fromkeys(GROUPS, 0))

    @property
    def total(self) -> int:
        return sum(self.dense.values()) + sum(self.expert.values())

    def add(self, other: Params) -> Params:
        out = Params()
        for g in GROUPS:
            out.dense[g] = self.dense[g] + other.dense[g]
            out.expert[g] = self.expert[g] + other.expert[g]
        return out

    def trainable(self, stage: str) -> tuple[int, int]:
        """(dense, expert) elements the stage trains."""
        trains = STAGE_TRAINS[stage]
        return (
            sum(n for g, n in self.dense.items() if g in trains),
            sum(n for g, n in self.expert.items() if g in trains),
        )


def vision_params(cfg: NaViLConfig, vision_tp: int = 1) -> int:
    """This rank's vision-encoder parameters with the tower split over ``vision_tp``."""
    v, t = cfg.vision, vision_tp
    w = v.width
    layer = (
        3 * w * w // t  # qkv (no bias)
        + 2 * w // t  # q_norm, k_norm: this rank's heads' slice of the full width
        + w * w // t + w  # proj, bias replicated
        + w * v.mlp // t + v.mlp // t  # fc1 with bias
        + v.mlp * w // t + w  # fc2, bias replicated
        + 4 * w  # norm1, norm2, ls1, ls2
    )  # fmt: skip
    return v.depth * layer + v.channels * v.patch**2 * w + w


def connector_params(cfg: NaViLConfig, vision_tp: int = 1) -> int:
    m, h, t = cfg.merged_width, cfg.language.hidden, vision_tp
    return 2 * m + m * h // t + h // t + h * h // t + h


def layer_params(cfg: NaViLConfig, layout: Layout, ep_rank: int = 0) -> Params:
    """One LLM decoder layer's parameters on a rank at EP rank ``ep_rank``."""
    lm, e, t = cfg.language, cfg.experts, layout.tp
    out = Params()
    hd = lm.head_dim
    attention = (lm.heads + 2 * lm.kv_heads) * hd * lm.hidden // t + lm.heads * hd * lm.hidden // t
    attention += 2 * hd if lm.qk_norm else 0  # q/k per-head norms, replicated
    out.dense["text_attention"] += attention
    out.dense["visual_experts"] += attention
    out.dense["rest"] += 2 * lm.hidden  # input / post-attention norms
    if e.per_modality > 1:
        out.dense["rest"] += 2 * e.per_modality * lm.hidden  # the learned gate
    experts = 2 * e.per_modality
    local = experts // layout.ep
    expert = 3 * lm.hidden * lm.ffn // layout.expert_tp  # SwiGLU fc1 (2F) + fc2
    for g in range(ep_rank * local, (ep_rank + 1) * local):
        group = "visual_experts" if g >= e.per_modality else "rest"
        out.expert[group] += expert
    return out


def stage_params(cfg: NaViLConfig, layout: Layout, stage: int, ep_rank: int = 0) -> Params:
    """Parameters of virtual pipeline stage ``stage`` on one of its ranks (TP/EP shard)."""
    from megatron_navil.models.build import stage_layer_ranges

    lm = cfg.language
    ranges = stage_layer_ranges(lm.layers, layout.stages, layout.first_stage_layers)
    out = Params()
    layer = layer_params(cfg, layout, ep_rank)
    for _ in ranges[stage]:
        out = out.add(layer)
    if stage == 0:
        vt = _vision_tp(cfg, layout.tp)
        out.dense["vision"] += vision_params(cfg, vt)
        out.dense["connector"] += connector_params(cfg, vt)
        out.dense["rest"] += lm.vocab * lm.hidden // layout.tp  # VocabParallelEmbedding
        out.dense["special_tokens"] += len(SPECIAL_TOKENS) * lm.hidden
    if stage == layout.stages - 1:
        out.dense["rest"] += lm.hidden + lm.vocab * lm.hidden // layout.tp  # norm + LM head
    return out


def rank_params(cfg: NaViLConfig, layout: Layout, pp_rank: int, ep_rank: int = 0) -> Params:
    """All chunks of pipeline rank ``pp_rank`` (virtual stages ``c * pp + pp_rank``)."""
    out = Params()
    for chunk in range(layout.vpp):
        out = out.add(stage_params(cfg, layout, chunk * layout.pp + pp_rank, ep_rank))
    return out


# ---------------------------------------------------------------------------------------------
# Activations


def _bytes(layout: Layout) -> int:
    return 2 if layout.dtype == "bf16" else 4


def visual_fraction(cfg: NaViLConfig, layout: Layout) -> float:
    """Share of the micro-batch's LLM tokens that are image tokens (visual experts)."""
    tokens = layout.patches / cfg.connector.merge**2
    return min(1.0, tokens / layout.seq_length)


def routed_factor(cfg: NaViLConfig, layout: Layout) -> float:
    """``r``: tokens through the most loaded rank's experts per token of its micro-batch."""
    e = cfg.experts
    fv = visual_fraction(cfg, layout)
    share = {False: 1.0 - fv, True: fv}  # text, visual
    local = 2 * e.per_modality // layout.ep
    worst = 0.0
    for rank in range(layout.ep):
        load = 0.0
        for g in range(rank * local, (rank + 1) * local):
            # Uniform load inside a modality's group of per_modality experts, topk each.
            load += share[g >= e.per_modality] * e.topk / e.per_modality
        worst = max(worst, load)
    return layout.ep * worst if layout.ep > 1 else float(e.topk)


def llm_layer_bytes(cfg: NaViLConfig, layout: Layout, recompute: str | None = None) -> float:
    """Activation bytes per token of one LLM layer kept for the backward."""
    recompute = recompute or layout.recompute
    lm, b, t = cfg.language, _bytes(layout), layout.tp
    h_, g_, d, hidden = lm.heads, lm.kv_heads, lm.head_dim, lm.hidden
    if recompute == "full":
        return b * hidden / t
    selective = recompute == "selective"
    r = routed_factor(cfg, layout)
    norm = (1 if selective else 2) * b * hidden / t
    attn = norm + b * hidden
    if lm.qk_norm:
        attn += (4 if selective else 8) * (h_ + g_) * d / t
    attn += b * (h_ + 2 * g_) * d / t + 4 * h_ / t + 2 * b * h_ * d / t
    ffn_inner = (2 if selective else 5) * b * lm.ffn / layout.expert_tp
    ffn = norm + r * (b * hidden + ffn_inner)
    return attn + ffn


def vision_layer_bytes(cfg: NaViLConfig, layout: Layout, recompute: str | None = None) -> float:
    """Activation bytes per patch of one vision block."""
    recompute = recompute or layout.vision_rc
    v, b = cfg.vision, _bytes(layout)
    vt = _vision_tp(cfg, layout.tp)
    w = v.width
    if recompute == "full":
        return b * w
    norm = b * w if recompute == "selective" else (4 + b) * w
    out = 2 * norm  # norm1, norm2
    if recompute != "selective":
        out += 2 * b * w  # qkv and fc1 inputs (= the norm outputs, released under selective)
    out += 2 * (b * w if recompute == "selective" else (4 + b) * w) / vt  # q/k norms
    out += 4 * b * w / vt + 4 * v.heads / vt  # q, k, v, out (+ lse)
    out += 2 * b * w  # layer-scale products keep the branch outputs
    out += (1 if recompute == "selective" else 2) * b * v.mlp / vt  # fc1 out, GELU out
    return out


@dataclass(frozen=True)
class StageActivations:
    """Bytes one micro-batch leaves on a virtual stage until its backward, by part."""

    llm_layers: float
    vision: float
    connector: float
    head: float

    @property
    def total(self) -> float:
        return self.llm_layers + self.vision + self.connector + self.head


def stage_activations(cfg: NaViLConfig, layout: Layout, stage: int) -> StageActivations:
    from megatron_navil.models.build import stage_layer_ranges

    lm, v, b = cfg.language, cfg.vision, _bytes(layout)
    tokens, patches = layout.seq_length, layout.patches
    layers = len(stage_layer_ranges(lm.layers, layout.stages, layout.first_stage_layers)[stage])
    llm = layers * tokens * llm_layer_bytes(cfg, layout)
    vision = connector = head = 0.0
    if stage == 0 and patches:
        vt = _vision_tp(cfg, layout.tp)
        vision = patches * (v.depth * vision_layer_bytes(cfg, layout) + b * v.channels * v.patch**2)
        connector = patches * (2 * b * v.width + 2 * b * lm.hidden / (cfg.connector.merge**2 * vt))
    if stage == layout.stages - 1:
        head = tokens * (3 * b * lm.hidden / layout.tp + 4 * lm.vocab / layout.tp)
    return StageActivations(llm, vision, connector, head)


def transient_bytes(cfg: NaViLConfig, layout: Layout, pp_rank: int) -> float:
    """Short-lived peaks on top of the kept activations: the backward's workspace (the
    gradients of one layer's activations, about their size: the largest layer of the rank,
    LLM or vision block, at no recompute), plus that layer's recomputed activations when
    it is fully recomputed, plus the bf16 logits next to their fp32 softmax on the last
    stage."""
    lm = cfg.language
    out = 0.0
    if pp_rank == layout.pp - 1 and layout.dtype == "bf16":
        out += layout.seq_length * 2 * lm.vocab / layout.tp
    llm = layout.seq_length * llm_layer_bytes(cfg, layout, "none")
    vis = layout.patches * vision_layer_bytes(cfg, layout, "none") if pp_rank == 0 else 0.0
    llm *= 2 if layout.recompute == "full" else 1
    vis *= 2 if layout.vision_rc == "full" else 1
    return out + max(llm, vis)


def schedule_order(pp: int, vpp: int, m: int, rank: int) -> list[tuple[str, int, int]]:
    """megatron-core's (interleaved) 1F1B order on pipeline ``rank``: ``(op, chunk, micro)``
    with op ``F``/``B``; ``vpp == 1`` is plain 1F1B."""
    total = m * vpp
    if vpp == 1:
        warmup = min(pp - rank - 1, m)
    else:
        warmup = min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (pp * vpp)) // pp if vpp > 1 else 0
        return c if forward else vpp - 1 - c

    def micro_of(k: int) -> int:
        return (k // (pp * vpp)) * pp + k % pp if vpp > 1 else k

    order = [("F", chunk_of(k, True), micro_of(k)) for k in range(warmup)]
    for i in range(total - warmup):
        k = warmup + i
        order.append(("F", chunk_of(k, True), micro_of(k)))
        order.append(("B", chunk_of(i, False), micro_of(i)))
    for i in range(total - warmup, total):
        order.append(("B", chunk_of(i, False), micro_of(i)))
    return order


def in_flight(pp: int, vpp: int, m: int, rank: int, weights: Sequence[float]) -> float:
    """Peak of the summed ``weights[chunk]`` of forwards whose backward has not run yet."""
    live = peak = 0.0
    for op, chunk, _ in schedule_order(pp, vpp, m, rank):
        live += weights[chunk] if op == "F" else -weights[chunk]
        peak = max(peak, live)
    return peak


def micro_batches(layout: Layout) -> int:
    """Micro-batches per DP replica per step (default 16)."""
    return 16 if layout.micro_batches is None else layout.micro_batches


# ---------------------------------------------------------------------------------------------
# Per-rank memory


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
    wb = _bytes(layout)
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


# ---------------------------------------------------------------------------------------------
# FLOPs


def llm_matmul_params(cfg: NaViLConfig) -> int:
    """Matmul parameters one LLM token uses (its modality's q/k/v/o, ``topk`` SwiGLU experts,
    the LM head); embeddings are a lookup, norms and the gate are negligible."""
    lm, e = cfg.language, cfg.experts
    hd = lm.head_dim
    attention = (lm.heads + 2 * lm.kv_heads) * hd * lm.hidden + lm.heads * hd * lm.hidden
    ffn = e.topk * 3 * lm.hidden * lm.ffn
    return lm.layers * (attention + ffn) + lm.vocab * lm.hidden


def vision_matmul_params(cfg: NaViLConfig) -> int:
    v = cfg.vision
    w = v.width
    return v.depth * (4 * w * w + 2 * w * v.mlp) + v.channels * v.patch**2 * w


def llm_flops(cfg: NaViLConfig, sample_lengths: Sequence[int]) -> float:
    """Model FLOPs (forward + backward) of one packed sequence of these samples (the real,
    non-padding ones for MFU)."""
    lm = cfg.language
    tokens = sum(sample_lengths)
    attention = sum(6 * lm.layers * lm.heads * lm.head_dim * s * s for s in sample_lengths)
    return 6 * llm_matmul_params(cfg) * tokens + attention


def vision_flops(cfg: NaViLConfig, segment_patches: Sequence[int]) -> float:
    """Model FLOPs of the vision encoder and connector for these image segments (one per
    image and scale, in patches)."""
    v, lm = cfg.vision, cfg.language
    patches = sum(segment_patches)
    attention = sum(12 * v.depth * v.width * s * s for s in segment_patches)
    connector = 6 * (cfg.merged_width * lm.hidden + lm.hidden**2) * patches / cfg.connector.merge**2
    return 6 * vision_matmul_params(cfg) * patches + attention + connector


def vmp_segments(patches: int, max_image_patches: int, min_patches: int = 256) -> list[int]:
    """Image segments filling a patch budget: largest images first, each with its multi-scale
    copies (area halving until below ``min_patches``), the largest attention cost a budget
    can carry; an estimate for planning (training counts its real segments)."""
    out: list[int] = []
    left = patches
    while left > 0:
        scale = min(max_image_patches, left)
        while scale >= min(min_patches, max_image_patches) and left > 0:
            take = min(scale, left)
            out.append(take)
            left -= take
            scale //= 2
        if scale < 1:
            break
    return out


@dataclass(frozen=True)
class Flops:
    """Model FLOPs per sequence and per step."""

    llm_per_sequence: float
    vision_per_sequence: float
    per_step: float
    sequences_per_step: int

    @property
    def per_sequence(self) -> float:
        return self.llm_per_sequence + self.vision_per_sequence


def plan_flops(cfg: NaViLConfig, layout: Layout, sample_length: int | None = None) -> Flops:
    """FLOPs of micro-batches of one ``sample_length`` sample (default: the whole sequence)
    and ``layout.patches`` patches in :func:`vmp_segments`."""
    s = sample_length or layout.seq_length
    samples = [s] * (layout.seq_length // s)
    llm = llm_flops(cfg, samples)
    vis = vision_flops(cfg, vmp_segments(layout.patches, layout.max_image_patches))
    seqs = micro_batches(layout) * layout.dp
    return Flops(llm, vis, (llm + vis) * seqs, seqs)


# ---------------------------------------------------------------------------------------------
# Search


def balanced_first_stage_layers(cfg: NaViLConfig, layout: Layout) -> int:
    """LLM layers for stage 0 so that its FLOPs (vision tower + connector + layers) match an
    even share of the total per virtual stage (never negative)."""
    lm = cfg.language
    seq = layout.seq_length
    per_layer = llm_flops(replace_layers(cfg, 1), [seq]) - 6 * lm.vocab * lm.hidden * seq
    vis = vision_flops(cfg, vmp_segments(layout.patches, layout.max_image_patches))
    total = lm.layers * per_layer + vis
    share = total / layout.stages
    return max(0, min(lm.layers, round((share - vis) / per_layer)))


def replace_layers(cfg: NaViLConfig, layers: int) -> NaViLConfig:
    return cfg.replace(language=replace(cfg.language, layers=layers))


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(
    cfg: NaViLConfig,
    base: Layout,
    gpus: int,
    gpus_per_node: int = 8,
    recompute: Sequence[str] = RECOMPUTE,
) -> list[Layout]:
    """Valid layouts for ``gpus`` GPUs: TP within a node, PP dividing the layers (or with the
    FLOP-balanced ``first_stage_layers``), VPP 1/2, EP dividing the experts, each of the
    ``recompute`` modes for the LLM layers and for the vision blocks."""
    out: list[Layout] = []
    lm = cfg.language
    for tp in [d for d in _divisors(gpus) if d <= gpus_per_node]:
        for pp in _divisors(gpus // tp):
            if pp > lm.layers:
                continue
            dp = gpus // (tp * pp)
            for vpp in (1, 2) if pp > 1 else (1,):
                for ep in _divisors(2 * cfg.experts.per_modality):
                    firsts: list[int | None] = [None]
                    if pp > 1:
                        trial = replace(base, tp=tp, pp=pp, vpp=vpp, ep=ep, dp=dp)
                        firsts.append(balanced_first_stage_layers(cfg, trial))
                    for first in dict.fromkeys(firsts):
                        for rc in recompute:
                            for vrc in recompute:
                                layout = replace(
                                    base, tp=tp, pp=pp, vpp=vpp, ep=ep, dp=dp, etp=None,
                                    first_stage_layers=first, recompute=rc,
                                    vision_recompute=vrc,
                                )  # fmt: skip
                                try:
                                    layout.validate(cfg)
                                except ValueError:
                                    continue
                                out.append(layout)
    return out


TP_COST = 0.08  # step-time cost of each doubling of TP (SP all-gather / reduce-scatter)
SELECTIVE_COST = 0.05  # recomputed norms / activations: a few % of the forward FLOPs


def relative_step_time(cfg: NaViLConfig, layout: Layout) -> float:
    """A stated, coarse cost model to rank layouts (1.0 = perfect scaling of the model FLOPs
    over the GPUs): ``(1 + recompute) x (1 + 0.08 log2 tp) x (1 + (pp - 1) / (vpp m))
    x expert imbalance``. Recompute: a full recompute re-runs its part's forward (a third of
    its model FLOPs), selective about 5% of it; the pipeline bubble with ``m`` micro-batches
    per replica; EP > 1: the FFN (about its FLOP share) runs at the most loaded rank's pace
    ``r`` (hard modality routing)."""
    flops = plan_flops(cfg, layout)
    llm, vis = flops.llm_per_sequence, flops.vision_per_sequence
    extra = {"none": 0.0, "selective": SELECTIVE_COST / 3, "full": 1.0 / 3}
    recompute = (llm * extra[layout.recompute] + vis * extra[layout.vision_rc]) / (llm + vis)
    tp_cost = 1 + TP_COST * math.log2(layout.tp)
    bubble = 1 + (layout.pp - 1) / (layout.vpp * micro_batches(layout))
    lm = cfg.language
    ffn_share = (
        3 * lm.ffn / (3 * lm.ffn + 2 * lm.heads * lm.head_dim + 2 * lm.kv_heads * lm.head_dim)
    )
    ffn_share *= llm / (llm + vis)
    imbalance = 1 + ffn_share * (routed_factor(cfg, layout) / cfg.experts.topk - 1)
    imbalance = max(imbalance, 1.0)
    return (1 + recompute) * tp_cost * bubble * imbalance


@dataclass(frozen=True)
class SearchRow:
    layout: Layout
    peak: RankMemory
    fits: bool
    step_time: float  # relative_step_time


def search(
    cfg: NaViLConfig,
    base: Layout,
    gpus: int,
    gpu_mem_gib: float,
    reserve_gib: float,
    gpus_per_node: int = 8,
    recompute: Sequence[str] = RECOMPUTE,
) -> list[SearchRow]:
    """Every candidate with its most loaded rank, sorted: fitting layouts first, by
    :func:`relative_step_time`, then fewer model-parallel ranks (TP x PP), then less memory
    (the first row is the recommendation when it fits)."""
    rows = []
    for layout in candidates(cfg, base, gpus, gpus_per_node, recompute):
        peak = peak_rank(plan_memory(cfg, layout))
        fits = peak.total / GiB + reserve_gib <= gpu_mem_gib
        rows.append(SearchRow(layout, peak, fits, relative_step_time(cfg, layout)))
    rows.sort(
        key=lambda r: (
            not r.fits, round(r.step_time, 4), r.layout.tp * r.layout.pp, r.peak.total
        )
    )  # fmt: skip
    return rows


def default_patches(stage: str, seq_length: int, merge: int = 2) -> int:
    """The stage's largest image with its multi-scale copies (about twice its base patches),
    capped at a sequence made only of image tokens."""
    return min(2 * STAGE_MAX_PATCHES[stage], merge * merge * seq_length)


__all__ = [
    "Flops",
    "Layout",
    "Params",
    "RankMemory",
    "in_flight",
    "llm_flops",
    "plan_flops",
    "plan_memory",
    "rank_params",
    "search",
    "stage_params",
    "vision_flops",
]
