"""The step-time model against measured training steps on this CPU machine (issue 19, item 3).

1. Calibrate a CPU preset (``planning.hardware.cpu_preset``) with microbenchmarks, one thread
   per process as the ranks run: fp32 GEMM rate of a linear layer's forward + backward
   against its smallest dimension (fit of ``rate = peak x n / (n + n_half)``), the CPU flash
   attention kernel's rate (forward + backward, head dim 64, 256 tokens; causal takes as
   long as full: the kernel computes the masked half), memory bandwidth (a large add), and
   gloo between two processes: bandwidth from all-reduces of 4 KiB..16 MiB, latency: the mean
   wall time of megatron-core's collectives inside the tiny model's TP2 step (the mean: ranks
   arrive unsynchronised and the tail counts; the same collectives issued between bursts of
   small operators in a microbenchmark take 5-25% less, recorded beside it). One constant is
   fitted: the host time per dispatched operator, on the tiny model's 1-process step (the
   dispatcher alone, timed on a chain of small autograd ops, is recorded beside it).
2. Count what a training step dispatches (TorchDispatchMode over ``training.step.train_step``
   of the tiny model with more layers / blocks / micro-batches): the operators per LLM
   layer, vision block, micro-batch and step (``--count-ops``: ``planning.perf.OPS_*``) and,
   each run, the bytes the element-wise operators move, per token and width of a layer and
   per parameter of the optimizer step (``count_bytes``: the CPU preset's
   ``elementwise_passes`` and ``optimizer_bytes_per_param``; GPU presets assume TE's fused
   kernels), and the collectives a rank issues at TP2 and at EP2 (``tp_collectives``,
   ``ep_collectives``).
3. Predict, then measure, the step time of the ``tiny`` config (its test batches: 4 packed
   micro-batches of 128 tokens) and of ``small`` (a ~60M NaViL: vision 4 x 256, LLM 8 x 512
   with a text and a visual expert each, vocab 8192; 4 micro-batches of 512 tokens) in six
   layouts: 1 process, TP2, PP2, DP2, TP2xPP2, TP2xEP2 (fp32, gloo, megatron-core DDP with
   the distributed optimizer, ``train_step``; warm-up steps, then the median of the timed
   steps). 4 ranks share the 2 cores (the model slows their compute 2x).

Only meaningful on a quiet machine (``uptime``'s 1-minute load under ~1.5): the JSON records
the load before and after. Writes benchmarks/results/perf_model_cpu.json.
Example: ``python benchmarks/bench_perf_model_cpu.py --steps 3``
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LAYOUTS: dict[str, tuple[dict[str, int], int]] = {
    "1 process": ({}, 1),
    "TP2": (dict(tp=2), 2),
    "PP2": (dict(pp=2), 2),
    "DP2": ({}, 2),
    "TP2xPP2": (dict(tp=2, pp=2), 4),
    "TP2xEP2": (dict(tp=2, ep=2), 4),
}
CORES = 2


# ---- the two models and their batches ---------------------------------------------------------


def model_config(
    name: str, layers: int | None = None, depth: int | None = None, ffn_factor: int = 1
):
    from megatron_navil.config.model import LanguageConfig, VisionConfig
    from megatron_navil.config.registry import get_config

    cfg = get_config("tiny")
    if name == "small":
        cfg = dataclasses.replace(
            cfg,
            name="small",
            vision=VisionConfig(depth=4, width=256, mlp=1024, heads=4),
            language=LanguageConfig(
                variant="qwen3",
                hidden=512,
                layers=8,
                heads=8,
                kv_heads=4,
                head_dim=64,
                ffn=1408,
                vocab=8192,
                qk_norm=True,
            ),
        ).validate()
    if layers or depth or ffn_factor != 1:
        lm, v = cfg.language, cfg.vision
        cfg = cfg.replace(
            language=dataclasses.replace(lm, layers=layers or lm.layers, ffn=lm.ffn * ffn_factor),
            vision=dataclasses.replace(v, depth=depth or v.depth, mlp=v.mlp * ffn_factor),
        ).validate()
    return cfg


def batch_spec(name: str, cfg: Any, micro_batches: int = 4):
    from megatron_navil.testing import navil_run as N

    ids = N.special_ids_for(cfg)
    if name == "tiny":
        spec = N.BatchSpec(special_ids=ids)
    else:
        s = N.Sample
        text = (s(200), s(150), s(140))
        mixed = (s(40, (((12, 12), (16, 16)),), 40), s(60, (((16, 24),),), 30), s(80))
        heavy = (s(10, (((16, 16), (24, 24)),), 10), s(8, (((20, 20),),), 8))
        spec = N.BatchSpec(micro_batches=(text, mixed, text, heavy), seq_length=512,
                           special_ids=ids)  # fmt: skip
    return dataclasses.replace(spec, micro_batches=tuple(spec.micro_batches)[:micro_batches])


def batch_shape(name: str) -> dict[str, float]:
    """Per micro-batch means of what the model needs: vision patches, attention pairs
    (sum of segment^2), LLM sample lengths."""
    from megatron_navil.testing import navil_run as N

    cfg = model_config(name)
    spec = batch_spec(name, cfg)
    patches = pairs = 0.0
    lengths = []
    for b in N.make_batches(cfg, spec, 0):
        if "patches" in b:
            patches += b["patches"].shape[0]
        cu = b["cu_seqlens"].tolist()
        lengths += [e - s for s, e in itertools.pairwise(cu)]
    for mb in spec.micro_batches:
        for sample in mb:
            for scales in sample.images:
                pairs += sum((h * w) ** 2 for h, w in scales)
    n = len(spec.micro_batches)
    return {
        "patches": patches / n,
        "pairs": pairs / n,
        "sample_length": statistics.fmean(lengths),
        "seq_length": spec.seq_length,
        "micro_batches": n,
        "image_share": sum(any(x.images for x in mb) for mb in spec.micro_batches) / n,
    }


# ---- ranks -----------------------------------------------------------------------------------


def _setup(name: str, layout: dict, cfg=None, micro_batches: int = 4, spec=None):
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize
    from megatron_navil.testing import navil_run as N
    from megatron_navil.testing import tiny_gpt as T
    from megatron_navil.training.microbatch import MicroBatch
    from megatron_navil.training.optim import build_optimizer, wrap_ddp
    from megatron_navil.training.recipes import get_stage

    warnings.filterwarnings("ignore")
    cfg = cfg or model_config(name)
    groups = initialize(**layout)
    config = transformer_config(cfg, **layout)
    spec = spec or batch_spec(name, cfg, micro_batches)
    chunks = build_model(cfg, config, groups, special_ids=spec.special_ids)
    T.set_global_params(chunks, 7)
    chunks = wrap_ddp(chunks, config, distributed_optimizer=True)
    opt = build_optimizer(chunks, get_stage("s2"), lr=1e-4, clip_grad=1.0)
    batches = [MicroBatch.of(b) for b in N.make_batches(cfg, spec, 0)]
    dp, rank = groups.dp.size(), groups.dp.rank()
    per = len(batches) // dp
    mine = batches[rank * per : (rank + 1) * per]
    return chunks, config, groups, opt, mine, spec.seq_length


def _time_layout(name: str, layout: dict, warmup: int, steps: int) -> list[float]:
    import torch.distributed as dist

    from megatron_navil.training.step import train_step

    chunks, config, groups, opt, mine, seq = _setup(name, layout)
    times = []
    for i in range(warmup + steps):
        dist.barrier()
        t0 = time.perf_counter()
        train_step(chunks, config, groups, opt, None, mine, seq, step=i)
        dist.barrier()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return times


def _count_in_step(cases: list[tuple[Any, Any]], layout: dict | None, what: str) -> list[dict]:
    """One count per (config, batch spec) in ``cases``, over one train_step after a warm-up
    step, in ``layout`` (default: one process): ``what`` = "ops" (operators dispatched),
    "collectives" (c10d operators only) or "bytes" (``_moved_bytes``); with the model's
    trainable parameters and the first micro-batch's tokens and patches."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_navil.training.step import train_step

    def weight(func, args, out) -> int:
        if what == "bytes":
            return _moved_bytes(func, args, out)
        return int(what == "ops" or func.namespace == "c10d")

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            Count.n += weight(func, args, out)
            return out

    rows = []
    for cfg, spec in cases:
        chunks, config, groups, opt, mine, seq = _setup("tiny", layout or {}, cfg, spec=spec)
        train_step(chunks, config, groups, opt, None, mine, seq)
        Count.n = 0
        with Count():
            train_step(chunks, config, groups, opt, None, mine, seq, step=1)
        params = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
        patches = mine[0].inputs["patches"].shape[0] if "patches" in mine[0].inputs else 0
        rows.append({"count": Count.n, "params": params, "tokens": seq, "patches": patches})
        parallel_state.destroy_model_parallel()
        dist.barrier()
    return rows


GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm")


def _moved_bytes(func, args, out) -> int:
    """Bytes an element-wise / data-movement operator reads and writes (inputs + outputs);
    0 for GEMMs and attention (their own terms), collectives (the communication terms),
    views and allocations (they move nothing)."""
    import torch

    name = func.overloadpacket.__name__
    if name in GEMM_OPS or "attention" in name or func.namespace == "c10d":
        return 0
    if name.startswith("empty") or name in ("_local_scalar_dense",):
        return 0
    returns = func._schema.returns
    if returns and all(r.alias_info is not None and not r.alias_info.is_write for r in returns):
        return 0  # a view

    def size(x) -> int:
        if isinstance(x, torch.Tensor):
            return x.numel() * x.element_size()
        if isinstance(x, list | tuple):
            return sum(size(y) for y in x)
        return 0

    return size(args) + size(out)


# The two micro-batches the byte counts use: (recipe, sequence length); their LLM tokens and
# vision patches differ, which separates per-token bytes from per-parameter ones.
COUNT_BATCHES = {"mixed": ("MIXED", 128), "heavy": ("IMAGE_HEAVY", 256)}


def count_bytes() -> dict[str, Any]:
    """The CPU path's element-wise bytes, counted on the tiny config (no timing):
    ``Calibration.elementwise_passes`` from the bytes per LLM layer and vision block per
    micro-batch (variants with doubled layers / blocks / micro-batches), at two micro-batches
    (other tokens and patches) and two FFN / MLP widths, least squares of
    ``3 b T (p_h H + p_f F)`` (a forward and a backward of twice its bytes, as
    ``planning.perf.layer_time`` charges; the per-micro-batch gradient accumulation, which
    scales with the parameters, is too small a part at these widths to separate and rides
    along); ``optimizer_bytes_per_param``: the rest of a step (gradient buffers, clipping,
    Adam) per trainable parameter, the slope between the variants with L and 2L layers."""
    import numpy as np

    from megatron_navil.parallel.spawn import run_distributed

    base = model_config("tiny")
    lm, v = base.language, base.vision
    L, D = lm.layers, v.depth
    variants = []
    for kind in COUNT_BATCHES:
        for f in (1, 2):
            variants += [(L, D, 1, f, kind), (L, D, 2, f, kind), (2 * L, D, 1, f, kind),
                         (2 * L, D, 2, f, kind), (L, 2 * D, 1, f, kind),
                         (L, 2 * D, 2, f, kind)]  # fmt: skip
    from megatron_navil.testing import navil_run as N

    cases = []
    for layers, depth, m, factor, kind in variants:
        cfg = model_config("tiny", layers, depth, factor)
        recipe, seq_length = COUNT_BATCHES[kind]
        spec = N.BatchSpec(micro_batches=(getattr(N, recipe),) * m, seq_length=seq_length,
                           special_ids=N.special_ids_for(cfg))  # fmt: skip
        cases.append((cfg, spec))
    rows = run_distributed(_count_in_step, 1, cases, None, "bytes", timeout=1800)[0]
    b = 4  # fp32
    eqs: dict[str, tuple[list, list]] = {"llm": ([], []), "vision": ([], [])}
    for o in range(0, len(rows), 6):
        c = [r["count"] for r in rows[o : o + 6]]
        f, t, p = variants[o][3], rows[o]["tokens"], rows[o]["patches"]
        a, bb, cc = c[1] - c[0], c[3] - c[2], c[5] - c[4]  # a micro-batch at (L,D) (2L,D) (L,2D)
        eqs["llm"][0].append([3 * b * t * lm.hidden, 3 * b * t * lm.ffn * f])
        eqs["llm"][1].append((bb - a) / L)
        eqs["vision"][0].append([3 * b * p * v.width, 3 * b * p * v.mlp * f])
        eqs["vision"][1].append((cc - a) / D)
    passes, residual = {}, 0.0
    for part, (A, y) in eqs.items():
        sol, *_ = np.linalg.lstsq(np.array(A), np.array(y), rcond=None)
        passes[part] = (float(sol[0]), float(sol[1]))
        residual = max(residual, float(max(abs(np.array(A) @ sol / np.array(y) - 1))))
    step = [rows[i]["count"] - (rows[i + 1]["count"] - rows[i]["count"]) for i in (0, 2)]
    per_param = (step[1] - step[0]) / (rows[2]["params"] - rows[0]["params"])
    return {
        "elementwise_passes": passes,
        "optimizer_bytes_per_param": per_param,
        "max_relative_residual": residual,
        "rows": rows,
        "variants": variants,
    }


def _gloo(sizes: list[int], reps: int) -> list[float]:
    import torch
    import torch.distributed as dist

    from megatron_navil.parallel import initialize

    initialize()
    out = []
    for n in sizes:
        x = torch.ones(n // 4)
        dist.all_reduce(x)
        ts = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            ts.append(time.perf_counter() - t0)
        out.append(min(ts))
    return out


def _gloo_in_step(reps: int, elements: int = 8192) -> float:
    """Mean time of a TP-style collective (all-gather / reduce-scatter of ``elements``
    floats, activation-sized) issued after a burst of ~120 small operators, as a layer issues
    them: each wait includes the partner's late arrival. The mean, not the median: the
    distribution has a long tail (median ~0.4-0.5 ms, p90 ~1.5 ms here) and a step pays
    every collective's time, tail included."""
    import torch
    import torch.distributed as dist

    from megatron_navil.parallel import initialize

    initialize()
    w = torch.randn(64, 64)
    x, full = torch.randn(elements // 2), torch.empty(elements)
    ts = []
    for i in range(reps):
        h = torch.randn(16, 64)
        for _ in range(60):
            h = torch.nn.functional.linear(h, w).relu()
        t0 = time.perf_counter()
        if i % 2:
            dist.all_gather_into_tensor(full, x)
        else:
            dist.reduce_scatter_tensor(x, full)
        ts.append(time.perf_counter() - t0)
    return statistics.fmean(ts)


def _gloo_in_tp_step(steps: int) -> float:
    """Mean wall time of a tensor-parallel collective inside the tiny model's TP2 training
    step (megatron-core's all-gathers, reduce-scatters and all-reduces, timed from the call
    to its return; after two warm-up steps)."""
    import torch
    import torch.distributed as dist
    from megatron.core.tensor_parallel import mappings

    from megatron_navil.training.step import train_step

    torch.set_num_threads(1)
    chunks, config, groups, opt, mine, seq = _setup("tiny", dict(tp=2))
    for i in range(2):
        train_step(chunks, config, groups, opt, None, mine, seq, step=i)
    times: list[float] = []

    def timed(fn):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if not kwargs.get("async_op"):
                times.append(time.perf_counter() - t0)
            return out

        return call

    names = ("dist_all_gather_func", "dist_reduce_scatter_func")
    saved = [getattr(mappings, n) for n in names] + [dist.all_reduce]
    for n in names:
        setattr(mappings, n, timed(getattr(mappings, n)))
    dist.all_reduce = timed(dist.all_reduce)
    try:
        for i in range(steps):
            train_step(chunks, config, groups, opt, None, mine, seq, step=2 + i)
    finally:
        for n, fn in zip(names, saved, strict=False):
            setattr(mappings, n, fn)
        dist.all_reduce = saved[-1]
    return statistics.fmean(times)


# ---- microbenchmarks -------------------------------------------------------------------------


def _median_time(fn, reps: int) -> float:
    """Median of ``reps`` runs after one warm-up: the sustained rate a training step sees
    (the fastest run overstated it by 2-19% here, varying with the host's clock)."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares ``y = a + b x``."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum(
        (x - mx) ** 2 for x in xs
    )
    return my - b * mx, b


def calibrate(reps: int = 5) -> dict[str, Any]:
    """The CPU preset's constants, measured in this process (one thread) and two gloo ranks."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    from megatron_navil.parallel.spawn import run_distributed

    torch.set_num_threads(1)
    rows = 512  # a micro-batch's tokens

    def linear_s(n: int) -> float:
        # a linear layer's forward and backward (dgrad and wgrad run on transposed operands,
        # ~15% below a plain matmul of the same size here)
        x, w = torch.randn(rows, n, requires_grad=True), torch.randn(n, n, requires_grad=True)
        g = torch.ones(rows, n)
        return _median_time(
            lambda: torch.autograd.grad(torch.nn.functional.linear(x, w), (x, w), g), reps * 4
        )

    # the host time of the call (autograd, dispatch: the op-overhead term's) off every size
    host = linear_s(1)
    # from 64 up: below it the call's host time is most of the time and the difference noise
    gemm = {n: 6 * rows * n * n / (linear_s(n) - host) for n in (64, 128, 256, 512, 1024)}
    # 1 / rate = 1 / peak + n_half / (peak n): a line in 1 / n
    inv0, slope = _fit_line([1 / n for n in gemm], [1 / r for r in gemm.values()])
    peak, half = 1 / inv0, max(0.0, slope / inv0)
    # attention: torch's CPU flash kernel, forward + backward, 8 heads of 64, 256 tokens
    heads, head_dim, seq = 8, 64, 256
    qkv = [torch.randn(1, heads, seq, head_dim, requires_grad=True) for _ in range(3)]

    def attention(causal: bool) -> float:
        def run():
            o = torch.nn.functional.scaled_dot_product_attention(*qkv, is_causal=causal)
            torch.autograd.grad(o, qkv, torch.ones_like(o))

        return _median_time(run, reps * 2)

    full, causal = attention(False), attention(True)
    attn_rate = 12 * heads * head_dim * seq * seq / full
    big = 1 << 24
    x, y, z = torch.randn(big), torch.randn(big), torch.empty(big)
    mem = 3 * 4 * big / _median_time(lambda: torch.add(x, y, out=z), reps)

    w = torch.randn(16, 16, requires_grad=True)

    def chain():
        h = torch.randn(8, 16)
        for _ in range(50):
            h = torch.nn.functional.linear(h, w).mul(0.5).relu()
        h.sum().backward()

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += 1
            return func(*args, **(kwargs or {}))

    with Count():
        chain()
    dispatch = _median_time(chain, reps * 4) / Count.n
    sizes = [1 << k for k in range(12, 25, 2)]  # 4 KiB .. 16 MiB
    times = run_distributed(_gloo, 2, sizes, reps * 2, timeout=600)[0]
    per_byte = (times[-1] - times[0]) / (sizes[-1] - sizes[0])
    # a collective's time: between bursts of small operators (recorded), inside a TP2 step (used)
    in_step = run_distributed(_gloo_in_step, 2, reps * 80, timeout=600)[0]
    in_tp_step = run_distributed(_gloo_in_tp_step, 2, reps, timeout=600)[0]
    counted = count_bytes()
    tp2, ep2 = count_ops(dict(tp=2)), count_ops(dict(ep=2))
    tp_collectives = {  # (the per-step counts do not grow with the layers: 0 per layer)
        "llm": tp2["llm_layer"], "vision": tp2["vision_block"], "micro_batch": tp2["micro_batch"],
        "step": tp2["step"],
    }  # fmt: skip
    # latency: a collective inside the tiny model's TP2 step (its activations: 128 x 64 fp32)
    # less its bytes; the microbenchmark's figure (in_step) is 5-25% lower and kept beside it
    lat = max(in_tp_step - 128 * 64 * 4 / 2 * per_byte, times[0] / 2)
    shape = (head_dim / (head_dim + half)) / (128 / (128 + half))  # perf.attention_rate's
    return {
        "gemm_flops_by_dim": {str(k): v for k, v in gemm.items()},
        "gemm_peak_flops": peak,
        "gemm_half_dim": half,
        "linear_host_s": host,
        "attention_flops": attn_rate,
        "attention_efficiency": attn_rate / peak / shape,
        "attention_causal_over_full_time": causal / full,
        "memory_bytes_per_s": mem,
        "dispatch_overhead_s": dispatch,
        "chain_ops": Count.n,
        "gloo_all_reduce_s_by_bytes": dict(zip(map(str, sizes), times, strict=True)),
        # a 2-rank ring all-reduce = reduce-scatter + all-gather, each n/2 bytes + a latency
        "gloo_bytes_per_s": 1 / per_byte,
        "gloo_all_reduce_4k_s": times[0],
        "gloo_collective_in_step_s": in_step,
        "gloo_latency_s": lat,
        "gloo_collective_in_tp_step_s": in_tp_step,
        "elementwise_passes": counted["elementwise_passes"],
        "optimizer_bytes_per_param": counted["optimizer_bytes_per_param"],
        "byte_count_residual": counted["max_relative_residual"],
        "tp_collectives": tp_collectives,
        "ep_collectives": ep2["llm_layer"],
    }


def count_ops(layout: dict[str, int] | None = None) -> dict[str, float]:
    """Operators per LLM layer and vision block (per micro-batch and per step), per
    micro-batch and per step (tiny, one process): counts ``c(L, D, m)`` of 6 variants solve
    ``c = S + L s_l + D s_d + m (M + L l + D d)``. With a ``layout`` (``tp``, ``ep``; the
    world its TP x EP, so data-parallel when EP > 1): the collectives one rank issues, counted
    alike over the rank's own micro-batches (``Calibration.tp_collectives``,
    ``ep_collectives``)."""
    from megatron_navil.parallel.spawn import run_distributed

    base = model_config("tiny")
    L, D = base.language.layers, base.vision.depth
    layout = layout or {}
    world = layout.get("tp", 1) * layout.get("ep", 1)
    dp = world // layout.get("tp", 1)
    variants = [(L, D, 1), (L, D, 2), (2 * L, D, 1), (2 * L, D, 2), (L, 2 * D, 1), (L, 2 * D, 2)]
    variants = [(x, y, m * dp) for x, y, m in variants]  # m micro-batches per rank
    from megatron_navil.testing import navil_run as N

    cases = []
    for x, y, m in variants:
        cfg = model_config("tiny", x, y)
        # collectives: micro-batches alike (with images); operators: the test batch's first m
        alike = N.BatchSpec(micro_batches=(N.MIXED,) * m, special_ids=N.special_ids_for(cfg))
        cases.append((cfg, alike if world > 1 else batch_spec("tiny", cfg, m)))
    what = "collectives" if world > 1 else "ops"
    rows = run_distributed(_count_in_step, world, cases, layout, what, timeout=1800)[0]
    c = [r["count"] for r in rows]
    a, b, cc = c[1] - c[0], c[3] - c[2], c[5] - c[4]  # per micro-batch at (L,D), (2L,D), (L,2D)
    llm, vis = (b - a) / L, (cc - a) / D
    step0, step_l, step_d = c[0] - a, c[2] - b, c[4] - cc
    per_step_llm, per_step_vis = (step_l - step0) / L, (step_d - step0) / D
    return {
        "llm_layer": llm,
        "vision_block": vis,
        "micro_batch": a - L * llm - D * vis,
        "step_per_llm_layer": per_step_llm,
        "step_per_vision_block": per_step_vis,
        "step": step0 - L * per_step_llm - D * per_step_vis,
        "counts": c,
        "variants": variants,
    }


def preset(cal: dict[str, Any], op_overhead_s: float):
    from megatron_navil.planning.hardware import cpu_preset

    return cpu_preset(
        gemm_flops=cal["gemm_peak_flops"], gemm_half_dim=cal["gemm_half_dim"],
        memory_bytes_per_s=cal["memory_bytes_per_s"], link_bytes_per_s=cal["gloo_bytes_per_s"],
        latency_s=cal["gloo_latency_s"], op_overhead_s=op_overhead_s, cores=CORES,
        attention_efficiency=cal.get("attention_efficiency"),
        elementwise_passes=cal.get("elementwise_passes"),
        optimizer_bytes_per_param=cal.get("optimizer_bytes_per_param"),
        tp_collectives=cal.get("tp_collectives"), ep_collectives=cal.get("ep_collectives"),
    )  # fmt: skip


def planner_layout(name: str, layout: dict[str, int], world: int):
    from megatron_navil.planning.layout import Layout

    shape = batch_shape(name)
    tp, pp, ep = layout.get("tp", 1), layout.get("pp", 1), layout.get("ep", 1)
    dp = world // (tp * pp)
    return Layout(
        tp=tp, pp=pp, ep=ep, dp=dp, seq_length=shape["seq_length"],
        patches=round(shape["patches"]), max_image_patches=1024, dtype="fp32", stage="s2",
        micro_batches=shape["micro_batches"] // dp,
    ), shape  # fmt: skip


def predict_one(cal: dict[str, Any], op_overhead_s: float, name: str, lname: str):
    from megatron_navil.planning.predict import predict

    layout, world = LAYOUTS[lname]
    lay, shape = planner_layout(name, layout, world)
    return predict(
        model_config(name), lay, preset(cal, op_overhead_s),
        sample_length=round(shape["sample_length"]), image_distribution=False,
        images=(shape["patches"], shape["pairs"]), image_share=shape["image_share"],
    )  # fmt: skip


def fit_op_overhead(cal: dict[str, Any], name: str, lname: str, measured_s: float) -> float:
    """The per-operator host time that makes ``name``/``lname`` predict ``measured_s`` (the
    model is linear in it): the one constant fitted on a measured row."""
    p0 = predict_one(cal, 0.0, name, lname).step_s
    p1 = predict_one(cal, 1e-6, name, lname).step_s
    return max(0.0, (measured_s - p0) / (p1 - p0) * 1e-6)


def markdown(result: dict[str, Any]) -> str:
    """The doc's table of a result JSON: predicted vs measured per model and layout."""
    lines = [
        "| model | layout | predicted s/step | measured s/step | error | largest predicted parts |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        parts = sorted(
            ((k, v) for k, v in r["breakdown"].items() if k not in
             ("step_s", "tokens_per_s_per_gpu", "model_tflops_per_gpu") and v > 0),
            key=lambda kv: -kv[1],
        )[:3]  # fmt: skip
        share = ", ".join(f"{k} {v / r['predicted_s']:.0%}" for k, v in parts)
        meas = f"{r['measured_s']:.3f} | {r['error']:+.1%}" if "measured_s" in r else "- | -"
        lines.append(
            f"| {r['model']} | {r['layout']} | {r['predicted_s']:.3f} | {meas} | {share} |"
        )
    return "\n".join(lines)


def _load() -> float:
    return os.getloadavg()[0]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="tiny,small")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--json", default=str(ROOT / "benchmarks/results/perf_model_cpu.json"))
    p.add_argument(
        "--predict-only", action="store_true",
        help="measure only the fitting row (tiny, 1 process), predict the rest",
    )  # fmt: skip
    p.add_argument(
        "--count-ops", action="store_true",
        help="only count the operators per layer / micro-batch / step (planning.perf.OPS_*)",
    )  # fmt: skip
    p.add_argument("--table", action="store_true", help="print --json's markdown table, only")
    args = p.parse_args(argv)
    if args.table:
        print(markdown(json.loads(Path(args.json).read_text())))
        return 0
    from megatron_navil.parallel.spawn import run_distributed

    if args.count_ops:
        print(json.dumps(count_ops()))
        return 0
    models = args.models.split(",")
    load_before = _load()
    cal = calibrate()
    print(json.dumps({k: v for k, v in cal.items() if not isinstance(v, dict)}, indent=1))

    def measure(name: str, lname: str) -> list[float]:
        layout, world = LAYOUTS[lname]
        return run_distributed(
            _time_layout, world, name, layout, args.warmup, args.steps, timeout=1800
        )[0]

    # The one fitted constant: the host time per operator, on the tiny model in 1 process.
    fit_on = ("tiny", "1 process")
    fit_times = measure(*fit_on)
    op = fit_op_overhead(cal, *fit_on, statistics.median(fit_times))
    print(f"op overhead fitted on {fit_on}: {op * 1e6:.2f} us per operator "
          f"(dispatcher alone: {cal['dispatch_overhead_s'] * 1e6:.2f} us)")  # fmt: skip
    result: dict[str, Any] = {
        "command": "python benchmarks/bench_perf_model_cpu.py " + " ".join(argv or sys.argv[1:]),
        "cores": os.cpu_count(),
        "load_before": load_before,
        "calibration": cal,
        "op_overhead_s": op,
        "fitted_on": list(fit_on),
        "rows": [],
    }
    # Predict every row first (written before measuring), then measure.
    for name in models:
        for lname in LAYOUTS:
            p = predict_one(cal, op, name, lname)
            result["rows"].append(
                {
                    "model": name,
                    "layout": lname,
                    "predicted_s": p.step_s,
                    "breakdown": p.breakdown.as_dict(),
                }
            )
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'model':6s} {'layout':10s} {'predicted s':>11s} {'measured s':>10s} {'error':>7s}")
    for row in result["rows"]:
        if not args.predict_only:
            key = (row["model"], row["layout"])
            times = fit_times if key == fit_on else measure(*key)
            row["times_s"] = times
            row["measured_s"] = statistics.median(times)
            row["error"] = row["predicted_s"] / row["measured_s"] - 1
            row["load"] = _load()
            Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
        meas = f"{row['measured_s']:10.3f} {row['error']:+7.1%}" if "measured_s" in row else ""
        print(f"{row['model']:6s} {row['layout']:10s} {row['predicted_s']:11.3f} {meas}",
              flush=True)  # fmt: skip
    result["load_after"] = _load()
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
