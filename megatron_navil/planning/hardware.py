"""Machines for the step-time model (``planning.perf``): published peaks and link bandwidths of
the GPUs the paper-scale runs use, and the calibration constants that turn peaks into achieved
rates, each named with where its value comes from.

A constant is either *published* (a vendor data sheet), *assumed* (a public measurement of the
kind, not fitted here) or *fitted* (chosen so that the model matches named rows of
../shared/PERF_REFERENCE.md; ``benchmarks/perf_model_validation.py`` checks every row). The CPU
preset's rates come from a short microbenchmark (``benchmarks/bench_perf_model_cpu.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

TB = 1e12
GB = 1e9


@dataclass(frozen=True)
class Calibration:
    """Achieved fractions of the peaks, and the fixed costs a peak does not show."""

    # Large-GEMM fraction of the dense peak, by precision. bf16 (and fp32 = TF32): assumed
    # 0.70 (cuBLAS on H100 SXM reaches 650-750 TFLOP/s of 989 on large bf16 GEMMs in public
    # GEMM sweeps); fp8: fitted, 0.52 on the Llama-3 8B row (TE's per-tensor "current scaling"
    # quantises every GEMM input and its transpose, which a large-GEMM rate leaves out; the
    # fit folds that in). The Llama-3 70B row is the check.
    gemm_efficiency: dict[str, float] = field(
        default_factory=lambda: {"bf16": 0.70, "fp8": 0.52, "fp32": 0.70}
    )
    # GEMM dimension (smallest of M, N, K on one GPU) at which the rate halves: assumed 128
    # (one Hopper GEMM tile; a 768-wide expert runs at 768 / (768 + 128) = 86% of the large
    # rate). Rate = efficiency x peak x n / (n + half_dim).
    gemm_half_dim: float = 128.0
    # Flash attention forward + backward, fraction of the bf16 peak (attention stays bf16 in
    # the fp8 recipes): assumed 0.45 (FlashAttention-3 / cuDNN reach 60-75% forward and
    # 40-50% backward at head dim 128; the backward does 2.5x the forward's work).
    attention_efficiency: float = 0.45
    # Flash attention skips the key blocks a causal mask hides (FlashAttention, cuDNN): a
    # causal segment costs half the pairs. torch's CPU flash kernel was measured to run a
    # causal segment in the time of a full one (benchmarks/bench_perf_model_cpu.py).
    attention_skips_masked: bool = True
    # Fraction of the HBM bandwidth element-wise kernels reach: assumed 0.8 (STREAM-like).
    memory_efficiency: float = 0.8
    # Element-wise bytes per token per layer, forward, in units of (element bytes x width), by
    # tower: (hidden-width passes, FFN-width passes); the backward moves twice the forward's.
    # GPUs (TE's fused kernels): two RMSNorms (read + write: 4), two residual adds (read 2 +
    # write 1: 6), RoPE on q and k (about 2 for GQA), the attention output's layout copies
    # (2): 14 hidden-widths; SwiGLU reads 2F and writes F, plus the probability-scaled
    # product: 4 FFN-widths. Counted from the layer's ops, not fitted. The CPU preset's are
    # counted from the unfused torch operators a training step dispatches.
    elementwise_passes: dict[str, tuple[float, float]] = field(
        default_factory=lambda: {"llm": (14.0, 4.0), "vision": (14.0, 4.0)}
    )
    # Optimizer bytes per parameter of the rank's shard: Adam with fp32 master weights reads
    # and writes master, m, v (24 bytes), reads the fp32 gradient (4), writes the bf16 weight
    # (2): 30 on GPUs (fused multi-tensor kernels); the CPU preset's are counted.
    optimizer_bytes_per_param: float = 30.0
    # NCCL ring collectives' bus bandwidth over the link's per-direction peak: assumed 0.8
    # (nccl-tests on DGX-H100: ~360 GB/s of 450 intra-node; ~40-45 GB/s of 50 per NIC).
    link_efficiency: float = 0.8
    # All-to-all's (MoE token dispatch) fraction of the link: assumed 0.5 (nccl-tests'
    # alltoall reaches about half the ring bandwidth at these message sizes).
    alltoall_efficiency: float = 0.5
    # Fraction of one micro-batch's compute that can hide the data-parallel gradient
    # reduce-scatter / parameter all-gather (megatron-core's overlap_grad_reduce /
    # overlap_param_gather): assumed 0.8.
    dp_overlap: float = 0.8
    # Tensor-parallel collectives a rank issues per LLM layer and vision block per micro-batch
    # ("llm", "vision"), per micro-batch outside the layers ("micro_batch": embedding, loss)
    # and per step ("step": gradient norm, layer-norm gradients); None: sequence parallelism's
    # 4 forward + 6 backward per layer (TE re-gathers the input for the weight gradient) and
    # nothing else. The CPU preset's are counted on the megatron-core path it runs.
    tp_collectives: dict[str, float] | None = None
    # Expert-parallel collectives per LLM layer per micro-batch: None: the 4 token all-to-alls
    # (dispatch and combine, forward and backward); counted, the ones beyond those 4 (token
    # counts, routing maps) are charged their latency.
    ep_collectives: float | None = None
    # Fraction of the TP/SP collectives hidden behind GEMMs: assumed 0.5 (Megatron-Bridge turns
    # on TE's userbuffer TP-communication overlap for TP > 1 recipes).
    tp_overlap: float = 0.5
    # MoE layer cost the FLOPs do not show (router, token permute / unpermute, the dropless
    # host sync, grouped-GEMM set-up, per-expert quantisation), as seconds per routed token
    # (token x topk) per layer, forward + backward: fitted on the GPT-OSS 120B row (Qwen3
    # 30B-A3B is the check).
    moe_seconds_per_routed_token: float = 0.24e-6
    # Host-side cost of one launched operator when the device does not hide it (CPU runs: the
    # Python / dispatcher time per op); on GPUs kernels are queued asynchronously: 0.
    op_overhead_s: float = 0.0
    # Latency of one collective / point-to-point message: assumed 10 us (NCCL ring latency
    # on NVLink / IB); the CPU preset measures gloo's.
    collective_latency_s: float = 10e-6
    # Fixed cost per optimizer step (launching the distributed optimizer's kernels, the
    # gradient-norm reduction): assumed 20 ms on GPUs.
    optimizer_fixed_s: float = 0.02


@dataclass(frozen=True)
class Hardware:
    """One accelerator as the model sees it (per GPU, dense peaks, per-direction links)."""

    name: str
    peak_flops: dict[str, float]  # dense FLOP/s by precision (bf16, fp8, fp32 GEMM)
    hbm_bytes_per_s: float  # device memory bandwidth
    intra_node_bytes_per_s: float  # NVLink, per direction per GPU
    inter_node_bytes_per_s: float  # the GPU's share of the node's network, per direction
    gpus_per_node: int
    memory_gib: float  # usable device memory (what tools/plan_layout.py --gpu-mem takes)
    source: str
    calibration: Calibration = field(default_factory=Calibration)
    processes_share_cores: int = 0  # CPU preset: cores the ranks share (0: one device each)

    def peak(self, precision: str) -> float:
        """Dense peak of ``precision``; a precision the device lacks runs at bf16's."""
        return self.peak_flops.get(precision, self.peak_flops["bf16"])


IB_NDR_PER_GPU = 400e9 / 8  # one 400 Gb/s ConnectX-7 NIC per GPU (DGX H100/H200/B200)

GPUS: dict[str, Hardware] = {
    "h100": Hardware(
        name="H100 SXM 80GB",
        peak_flops={"bf16": 989 * TB, "fp8": 1979 * TB, "fp32": 494 * TB},  # fp32: TF32
        hbm_bytes_per_s=3.35 * TB,
        intra_node_bytes_per_s=450 * GB,
        inter_node_bytes_per_s=IB_NDR_PER_GPU,
        gpus_per_node=8,
        memory_gib=79.6,
        source="NVIDIA H100 data sheet (SXM, dense); DGX H100: NVLink 4 900 GB/s "
        "bidirectional, 8x 400 Gb/s InfiniBand",
    ),
    "h200": Hardware(
        name="H200 SXM 141GB",
        peak_flops={"bf16": 989 * TB, "fp8": 1979 * TB, "fp32": 494 * TB},
        hbm_bytes_per_s=4.8 * TB,
        intra_node_bytes_per_s=450 * GB,
        inter_node_bytes_per_s=IB_NDR_PER_GPU,
        gpus_per_node=8,
        memory_gib=131.0,
        source="NVIDIA H200 data sheet: H100's compute, 141 GB HBM3e at 4.8 TB/s",
    ),
    "a100": Hardware(
        name="A100 SXM 80GB",
        peak_flops={"bf16": 312 * TB, "fp32": 156 * TB},  # no fp8: fp8 runs at bf16's rate
        hbm_bytes_per_s=2.039 * TB,
        intra_node_bytes_per_s=300 * GB,
        inter_node_bytes_per_s=200e9 / 8,
        gpus_per_node=8,
        memory_gib=79.2,
        source="NVIDIA A100 data sheet (SXM4 80GB); DGX A100: NVLink 3 600 GB/s "
        "bidirectional, 8x 200 Gb/s HDR InfiniBand",
    ),
    "b200": Hardware(
        name="B200 180GB",
        peak_flops={"bf16": 2250 * TB, "fp8": 4500 * TB, "fp32": 1100 * TB},
        hbm_bytes_per_s=8.0 * TB,
        intra_node_bytes_per_s=900 * GB,
        inter_node_bytes_per_s=IB_NDR_PER_GPU,
        gpus_per_node=8,
        memory_gib=178.0,
        source="NVIDIA DGX B200 data sheet (dense = half the sparse figures); NVLink 5 "
        "1.8 TB/s bidirectional, 8x 400 Gb/s ConnectX-7",
    ),
}


def get_gpu(name: str) -> Hardware:
    """The preset ``name`` (h100, h200, a100, b200); ValueError naming the known ones."""
    key = name.lower()
    if key not in GPUS:
        raise ValueError(f"unknown GPU {name!r}; known: {', '.join(GPUS)}")
    return GPUS[key]


def cpu_preset(
    gemm_flops: float,
    gemm_half_dim: float,
    memory_bytes_per_s: float,
    link_bytes_per_s: float,
    latency_s: float,
    op_overhead_s: float,
    cores: int,
    attention_efficiency: float | None = None,
    elementwise_passes: dict[str, tuple[float, float]] | None = None,
    optimizer_bytes_per_param: float | None = None,
    tp_collectives: dict[str, float] | None = None,
    ep_collectives: float | None = None,
) -> Hardware:
    """A CPU host as a 'device' of one core per process (fp32, gloo): the rates measured by
    ``benchmarks/bench_perf_model_cpu.py`` (one thread's GEMM rate and half-rate dimension on
    a linear layer's forward + backward, memory bandwidth, gloo's bandwidth and latency, the
    per-operator host overhead, the attention rate as a fraction of the GEMM peak at head dim
    128, the element-wise and optimizer bytes the unfused torch path moves); ``cores``: ranks
    beyond it share the cores (their rates divide). Left out, the attention runs at the GEMM
    rate and the bytes are the GPU presets'."""
    base = Calibration()
    cal = Calibration(
        gemm_efficiency={"fp32": 1.0, "bf16": 1.0},
        gemm_half_dim=gemm_half_dim,
        attention_efficiency=(
            128 / (128 + gemm_half_dim) if attention_efficiency is None else attention_efficiency
        ),
        attention_skips_masked=False,
        memory_efficiency=1.0,
        elementwise_passes=elementwise_passes or base.elementwise_passes,
        optimizer_bytes_per_param=optimizer_bytes_per_param or base.optimizer_bytes_per_param,
        tp_collectives=tp_collectives,
        ep_collectives=ep_collectives,
        link_efficiency=1.0,
        alltoall_efficiency=1.0,
        dp_overlap=0.0,  # gloo collectives block the (single) compute thread
        tp_overlap=0.0,
        moe_seconds_per_routed_token=0.0,
        op_overhead_s=op_overhead_s,
        collective_latency_s=latency_s,
        optimizer_fixed_s=0.0,
    )
    return Hardware(
        name="CPU core (measured)",
        peak_flops={"fp32": gemm_flops, "bf16": gemm_flops},
        hbm_bytes_per_s=memory_bytes_per_s,
        intra_node_bytes_per_s=link_bytes_per_s,
        inter_node_bytes_per_s=link_bytes_per_s,
        gpus_per_node=1 << 20,
        memory_gib=0.0,
        source="benchmarks/bench_perf_model_cpu.py microbenchmark",
        calibration=cal,
        processes_share_cores=cores,
    )


def with_calibration(hw: Hardware, **changes: object) -> Hardware:
    """``hw`` with some calibration constants replaced (for sensitivity checks and tests)."""
    return replace(hw, calibration=replace(hw.calibration, **changes))
