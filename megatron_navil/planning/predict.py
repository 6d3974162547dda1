"""The step-time model (``planning.perf``) applied to a NaViL config in a planner
:class:`~megatron_navil.planning.layout.Layout`: its vision tower on pipeline stage 0 (split
over TP only where its heads divide, else every TP rank runs all of it), the connector, the
LLM layers of each (virtual) stage with the two modality experts (hard routing: with EP the
rank of the larger modality's expert sets the FFN's pace), frozen parameters skipping their
weight gradients (S1.x), and the straggler term from the image-size distribution
(``planning.straggler``). ``tools/plan_layout.py`` ranks layouts with it and ``launch.py
--dry-run`` prints it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from megatron_navil.config.model import NaViLConfig
from megatron_navil.planning.activations import routed_factor, visual_fraction
from megatron_navil.planning.flops import plan_flops, vision_matmul_params, vmp_segments
from megatron_navil.planning.hardware import Hardware
from megatron_navil.planning.layout import STAGE_MAX_PATCHES, Layout, micro_batches, vision_tp
from megatron_navil.planning.params import rank_params
from megatron_navil.planning.perf import (
    OPS_PER_VISION_BLOCK,
    Breakdown,
    LayerGroup,
    Parallel,
    RankWork,
    Tower,
    layer_time,
    step_time,
)
from megatron_navil.planning.straggler import Straggler, moments, straggler


def llm_tower(cfg: NaViLConfig, layout: Layout) -> Tower:
    """The LLM: with EP the 2 x per_modality experts are routed (all-to-all), without it each
    rank runs its token's ``topk`` experts like a dense FFN."""
    lm, e = cfg.language, cfg.experts
    return Tower(
        layers=lm.layers, hidden=lm.hidden, heads=lm.heads, kv_heads=lm.kv_heads,
        head_dim=lm.head_dim, ffn=lm.ffn, experts=2 * e.per_modality if layout.ep > 1 else 1,
        topk=e.topk, vocab=lm.vocab,
    )  # fmt: skip


def vision_tower(cfg: NaViLConfig) -> Tower:
    v = cfg.vision
    return Tower(
        layers=v.depth, hidden=v.width, heads=v.heads, kv_heads=v.heads, head_dim=v.head_dim,
        ffn=v.mlp, gated=False, causal=False, ops_per_layer=OPS_PER_VISION_BLOCK,
    )  # fmt: skip


def parallel(layout: Layout) -> Parallel:
    fp32 = layout.dtype == "fp32"
    return Parallel(
        tp=layout.tp, pp=layout.pp, vpp=layout.vpp, ep=layout.ep, etp=layout.expert_tp,
        dp=layout.dp, micro_batches=micro_batches(layout), precision="fp32" if fp32 else "bf16",
        recompute=layout.recompute, param_bytes=4 if fp32 else 2,
    )  # fmt: skip


def sample_segments(seq_length: int, sample_length: int | None) -> tuple[int, ...]:
    """The packed sequence's samples (attention segments)."""
    s = sample_length or seq_length
    out = [s] * (seq_length // s)
    if seq_length % s:
        out.append(seq_length % s)
    return tuple(out)


def llm_wgrad(cfg: NaViLConfig, layout: Layout) -> float:
    """Share of the LLM layers' GEMM FLOPs with trained weights: S1.1 trains the visual
    experts (attention and FFN) only, S1.2 also the text attention, S2 everything."""
    if layout.stage == "s2":
        return 1.0
    t = llm_tower(cfg, layout)
    fv = visual_fraction(cfg, layout)
    attn, ffn = t.attention_params(), t.ffn_params_per_token()
    if layout.stage == "s1.2":
        return (attn + fv * ffn) / (attn + ffn)
    return fv


def vision_extra(cfg: NaViLConfig, patches: int, vt: int) -> tuple[tuple[float, float, str], ...]:
    """Patch embedding and connector GEMMs (forward + backward FLOPs, smallest dimension)."""
    v, lm, merge = cfg.vision, cfg.language, cfg.connector.merge
    embed = 6 * v.channels * v.patch**2 * v.width * patches
    merged = patches / merge**2
    connector = 6 * (cfg.merged_width * lm.hidden + lm.hidden**2) * merged / vt
    return (
        (embed, min(patches, v.channels * v.patch**2, v.width), "vision"),
        (connector, min(merged, lm.hidden / vt), "vision"),
    )


def rank_work(
    cfg: NaViLConfig,
    layout: Layout,
    sample_length: int | None = None,
    segments: Sequence[int] | None = None,
    images: tuple[float, float] | None = None,
    image_share: float = 1.0,
) -> list[RankWork]:
    """Per pipeline rank: its LLM layers, the vision tower and connector on rank 0, the LM
    head on the last; trainable parameters of the EP rank with the visual experts. The
    vision work: ``images`` = (expected patches, expected attention pairs) of a micro-batch,
    else these image ``segments``, else ``flops.vmp_segments`` of the whole patch budget
    (its largest images: an upper bound)."""
    from megatron_navil.models.build import stage_layer_ranges

    lm = cfg.language
    llm, vis = llm_tower(cfg, layout), vision_tower(cfg)
    vt = vision_tp(cfg, layout.tp)
    ranges = stage_layer_ranges(lm.layers, layout.stages, layout.first_stage_layers)
    seq = layout.seq_length
    samples = sample_segments(seq, sample_length)
    if segments is None:
        segments = vmp_segments(layout.patches, layout.max_image_patches)
    load = routed_factor(cfg, layout) / cfg.experts.topk if layout.ep > 1 else 1.0
    b = 4 if layout.dtype == "fp32" else 2
    out = []
    for r in range(layout.pp):
        layers = sum(len(ranges[c * layout.pp + r]) for c in range(layout.vpp))
        groups = [LayerGroup(llm, layers, seq, samples, layout.tp, load, "llm",
                             llm_wgrad(cfg, layout))]  # fmt: skip
        extra: tuple = ()
        if r == 0 and layout.patches:
            patches, pairs = (layout.patches, None) if images is None else images
            groups.append(LayerGroup(vis, vis.layers, round(patches), tuple(segments), vt,
                                     part="vision", recompute=layout.vision_rc,
                                     pairs=pairs, active=image_share))  # fmt: skip
            extra = vision_extra(cfg, round(patches), vt)
        p = rank_params(cfg, layout, r, layout.ep - 1)
        dense, expert = p.trainable(layout.stage)
        out.append(
            RankWork(
                groups=tuple(groups),
                head=(lm.vocab, lm.hidden, seq) if r == layout.pp - 1 else None,
                dense_params=dense, expert_params=expert, total_params=p.total,
                boundary_bytes=seq * lm.hidden * b / layout.tp, chunks=layout.vpp,
                extra_gemms=extra, first_stage=r == 0, last_stage=r == layout.pp - 1,
            )
        )  # fmt: skip
    return out


@dataclass(frozen=True)
class Prediction:
    """A step's predicted time, by part, with the figures the planner prints."""

    breakdown: Breakdown
    straggler: Straggler
    peak_flops: float  # the MFU's denominator (bf16 dense peak; fp32 on CPU)

    @property
    def step_s(self) -> float:
        return self.breakdown.step_s

    @property
    def tokens_per_s_per_gpu(self) -> float:
        return self.breakdown.tokens_per_s_per_gpu

    @property
    def mfu(self) -> float:
        """Model FLOPs (vision + connector + LLM, no recompute) per second over the peak."""
        return self.breakdown.mfu(self.peak_flops)


def expected_vision_flops(cfg: NaViLConfig, patches: float, pairs: float) -> float:
    """``flops.vision_flops`` of a micro-batch with these patches and attention pairs
    (``sum(s^2)`` over its image segments)."""
    v, lm = cfg.vision, cfg.language
    connector = 6 * (cfg.merged_width * lm.hidden + lm.hidden**2) * patches / cfg.connector.merge**2
    return 6 * vision_matmul_params(cfg) * patches + 12 * v.depth * v.width * pairs + connector


def vision_costs(cfg: NaViLConfig, layout: Layout, hw: Hardware) -> tuple[float, float]:
    """Seconds of the vision tower per patch and per attention pair (for the straggler
    term), at the patch budget."""
    vis, par, vt = vision_tower(cfg), parallel(layout), vision_tp(cfg, layout.tp)
    n = max(1, layout.patches)

    def cost(segments: Sequence[int]) -> float:
        t = layer_time(vis, n, segments, par, hw, tp=vt, part="vision",
                       recompute=layout.vision_rc)  # fmt: skip
        return vis.layers * (t.vision + t.recompute + t.tp_comm)

    base = cost(())
    return base / n, (cost((n,)) - base) / (n * n)


def predict(
    cfg: NaViLConfig,
    layout: Layout,
    hw: Hardware,
    sample_length: int | None = None,
    image_distribution: bool = True,
    segments: Sequence[int] | None = None,
    images: tuple[float, float] | None = None,
    image_share: float = 1.0,
) -> Prediction:
    """Predicted step of ``layout`` (validated) on ``hw``; ``sample_length``: tokens per
    packed sample for the LLM attention (default: whole sequences, as ``plan_flops``).
    ``image_distribution``: the vision work is the expected micro-batch of
    ``planning.straggler``'s image sizes packed to the patch budget, plus the straggler term;
    off (or with explicit image ``segments``): these segments (default ``vmp_segments``), no
    straggler; ``images``: (patches, attention pairs) of the mean micro-batch, given (measured
    batches); ``image_share``: the share of micro-batches with images (the vision tower's
    operators and collectives run on those only). The MFU counts the same vision work
    (``flops``' formulas)."""
    layout.validate(cfg)
    flops = plan_flops(cfg, layout, sample_length)
    m = micro_batches(layout)
    strag = Straggler(0.0, 0.0, 1.0)
    if image_distribution and layout.patches and segments is None and images is None:
        cap = min(STAGE_MAX_PATCHES[layout.stage], cfg.image.max_patches)
        a, b = vision_costs(cfg, layout, hw)
        strag = straggler(a, b, layout.patches, cfg.image.min_patches, cap, layout.dp, m)
        images = moments(layout.patches, cfg.image.min_patches, cap)[:2]
    extra = (strag.ratio - 1.0) * m * strag.mean
    per_sequence = flops.per_sequence
    if images is not None:  # the expected micro-batch's vision FLOPs, as the time uses
        per_sequence = flops.llm_per_sequence + expected_vision_flops(cfg, *images)
    bd = step_time(
        rank_work(cfg, layout, sample_length, segments, images, image_share), parallel(layout),
        hw,
        model_flops=per_sequence * m * layout.dp, tokens=layout.seq_length * m * layout.dp,
        straggler_s=extra,
    )  # fmt: skip
    peak = hw.peak("fp32" if layout.dtype == "fp32" else "bf16")
    return Prediction(bd, strag, peak)
