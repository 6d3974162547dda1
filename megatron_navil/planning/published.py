"""The published Megatron-Bridge pre-training runs of ../shared/PERF_REFERENCE.md as step-time
model inputs, and the model's prediction for each (``benchmarks/perf_model_validation.py``
writes the table; tests/unit/test_perf_model.py checks every row within +-25%).

Model FLOPs use *their* definition, which the published tokens/s and TFLOP/s imply (ratio
checked to 1% in the test): ``6 N_matmul t + 6 L h d s^2`` per sequence (causal attention
counted at half, no recompute), with two conventions of their GPT-OSS formula: its experts
counted as 2-matrix MLPs and every layer's attention as full (its sliding windows ignored).
The time model itself uses the real work (SwiGLU experts, 128-token windows).

Their GPT-OSS row says GA 2, which does not match GBS 512 / (MBS 4 x DP 16) = 8 micro-batches
at PP 4 on 64 GPUs; the model uses 8 (the other rows' GA equal GBS / (MBS x DP)).
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_navil.planning.hardware import Hardware, get_gpu
from megatron_navil.planning.perf import (
    Breakdown,
    LayerGroup,
    Parallel,
    RankWork,
    Tower,
    step_time,
)


@dataclass(frozen=True)
class PublishedRun:
    """One row of PERF_REFERENCE.md."""

    name: str
    tower: Tower
    gpus: int
    precision: str
    global_batch: int
    micro_batch: int
    seq: int
    fsdp: bool
    tp: int
    pp: int
    vpp: int
    ep: int
    tokens_per_s_per_gpu: float  # published
    model_tflops_per_gpu: float  # published
    their_gated: bool = True  # their FLOP formula's expert MLP matrices: 3 (True) or 2

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.pp)

    @property
    def micro_batches(self) -> int:
        return self.global_batch // (self.micro_batch * self.dp)

    def parallel(self) -> Parallel:
        return Parallel(
            tp=self.tp, pp=self.pp, vpp=self.vpp, ep=self.ep, etp=1, dp=self.dp,
            micro_batches=self.micro_batches, precision=self.precision, fsdp=self.fsdp,
        )  # fmt: skip

    def segments(self) -> tuple[int, ...]:
        return (self.seq,) * self.micro_batch

    def their_flops_per_token(self) -> float:
        """Their model FLOPs per token (forward + backward)."""
        tokens = self.seq * self.micro_batch
        flops = self.tower.model_flops(tokens, self.segments(), self.their_gated, windows=False)
        return flops / tokens

    def rank_work(self) -> list[RankWork]:
        """Per pipeline rank: its layers (even split over PP x VPP), the LM head on the last."""
        t = self.tower
        stages = self.pp * self.vpp
        per_stage = t.layers // stages
        tokens = self.seq * self.micro_batch
        experts_local = t.experts // self.ep if t.experts > 1 else 1
        mats = 3 if t.gated else 2
        layer_dense = t.attention_params() / self.tp + 2 * t.hidden
        layer_expert = experts_local * mats * t.hidden * t.ffn / (1 if t.experts > 1 else self.tp)
        if t.experts == 1:
            layer_dense, layer_expert = layer_dense + layer_expert, 0.0
        out = []
        for rank in range(self.pp):
            layers = per_stage * self.vpp
            last = rank == self.pp - 1
            head = t.vocab * t.hidden / self.tp
            dense = layers * layer_dense + head * ((rank == 0) + last)
            out.append(
                RankWork(
                    groups=(LayerGroup(t, layers, tokens, self.segments(), self.tp),),
                    head=(t.vocab, t.hidden, tokens) if last else None,
                    dense_params=dense,
                    expert_params=layers * layer_expert,
                    total_params=dense + layers * layer_expert,
                    boundary_bytes=tokens * t.hidden * 2 / self.tp,
                    chunks=self.vpp,
                )
            )
        return out

    def predict(self, hw: Hardware | None = None) -> Breakdown:
        hw = hw or get_gpu("h100")
        tokens = self.seq * self.micro_batch * self.micro_batches * self.dp
        return step_time(
            self.rank_work(), self.parallel(), hw,
            model_flops=self.their_flops_per_token() * tokens, tokens=tokens,
        )  # fmt: skip


LLAMA3_8B = Tower(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, ffn=14336,
                  vocab=128256)  # fmt: skip
LLAMA3_70B = Tower(layers=80, hidden=8192, heads=64, kv_heads=8, head_dim=128, ffn=28672,
                   vocab=128256)  # fmt: skip
GPT_OSS_120B = Tower(layers=36, hidden=2880, heads=64, kv_heads=8, head_dim=64, ffn=2880,
                     experts=128, topk=4, window=128, window_layers=0.5,
                     vocab=201088)  # fmt: skip
QWEN3_30B_A3B = Tower(layers=48, hidden=2048, heads=32, kv_heads=4, head_dim=128, ffn=768,
                      experts=128, topk=8, vocab=151936)  # fmt: skip

RUNS: tuple[PublishedRun, ...] = (
    # name, tower, GPUs, precision, GBS, MBS, seq, FSDP, TP, PP, VPP, EP, published tok/s, TF/s
    PublishedRun("Llama-3 8B", LLAMA3_8B, 8, "fp8", 128, 1, 8192, True, 1, 1, 1, 1, 14451, 744),
    PublishedRun(
        "Llama-3 8B (25.09)", LLAMA3_8B, 8, "fp8", 128, 1, 8192, True, 1, 1, 1, 1, 14079, 725
    ),
    PublishedRun("Llama-3 70B", LLAMA3_70B, 64, "fp8", 128, 1, 8192, False, 4, 8, 5, 1, 1602, 719),
    PublishedRun(
        "GPT-OSS 120B (MoE)",
        GPT_OSS_120B,
        64,
        "bf16",
        512,
        4,
        4096,
        False,
        1,
        4,
        1,
        8,
        5630,
        153,
        their_gated=False,
    ),
    PublishedRun(
        "Qwen3-30B-A3B (MoE)",
        QWEN3_30B_A3B,
        16,
        "fp8",
        512,
        2,
        4096,
        False,
        1,
        2,
        24,
        8,
        5275,
        121,
    ),
)
FITTED_ON = {
    "gemm_efficiency['fp8']": "Llama-3 8B",
    "moe_seconds_per_routed_token": "GPT-OSS 120B (MoE)",
}
"""The calibration constants fitted on published rows (the others are assumed: hardware.py)."""


def validation_rows(hw: Hardware | None = None) -> list[dict]:
    """Predicted vs published for every row: tokens/s/GPU, model TFLOP/s/GPU, error, what
    limits the step."""
    out = []
    for run in RUNS:
        p = run.predict(hw)
        pred_tps = p.tokens_per_s_per_gpu
        out.append(
            {
                "model": run.name,
                "gpus": run.gpus,
                "precision": run.precision,
                "layout": f"TP{run.tp} PP{run.pp} VPP{run.vpp} EP{run.ep} DP{run.dp}"
                + (" FSDP" if run.fsdp else ""),
                "micro_batches": run.micro_batches,
                "published_tokens_per_s_per_gpu": run.tokens_per_s_per_gpu,
                "predicted_tokens_per_s_per_gpu": pred_tps,
                "published_tflops_per_gpu": run.model_tflops_per_gpu,
                "predicted_tflops_per_gpu": p.model_tflops_per_gpu,
                "error": pred_tps / run.tokens_per_s_per_gpu - 1,
                "their_flops_per_token": run.their_flops_per_token(),
                "published_flops_per_token": run.model_tflops_per_gpu
                * 1e12
                / run.tokens_per_s_per_gpu,
                "step_s": p.step_s,
                "limits": p.line(4),
                "breakdown": p.as_dict(),
            }
        )
    return out
