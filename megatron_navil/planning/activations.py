"""Activation bytes a micro-batch leaves on each pipeline stage until its backward, and the
short-lived peaks on top of them, from the sizes alone.

Per token per LLM layer (Korthikanti et al. 2022 style, but term by term from what *this* code
saves; ``b`` = 2 (bf16) or 4 (fp32) bytes, ``T`` = TP, sequence parallel on with TP > 1,
flash / varlen attention so no ``s^2`` term; ``h``/``g`` query/KV heads, ``d`` head dim, ``F``
FFN, ``r`` tokens through this rank's experts per token of the micro-batch):

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
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_navil.config.model import NaViLConfig
from megatron_navil.planning.layout import Layout, vision_tp


def element_bytes(layout: Layout) -> int:
    """Bytes of one activation element: 2 (bf16) or 4 (fp32)."""
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
    lm, b, t = cfg.language, element_bytes(layout), layout.tp
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
    v, b = cfg.vision, element_bytes(layout)
    vt = vision_tp(cfg, layout.tp)
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

    lm, v, b = cfg.language, cfg.vision, element_bytes(layout)
    tokens, patches = layout.seq_length, layout.patches
    layers = len(stage_layer_ranges(lm.layers, layout.stages, layout.first_stage_layers)[stage])
    llm = layers * tokens * llm_layer_bytes(cfg, layout)
    vision = connector = head = 0.0
    if stage == 0 and patches:
        vt = vision_tp(cfg, layout.tp)
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
