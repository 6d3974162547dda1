"""Modality experts, side by side: the FFN's two paths (gather/scatter vs megatron-core's
token dispatcher) and both against the released code's compute-all-then-mask.

All run the same decoder layer weights (one rank, fp32, CPU), forward + backward:
  split       megatron_navil.models.language.ModalityDecoderLayer with ``moe_path='split'``
              (the default at EP=1): every projection, attention's and FFN's, runs only on its
              modality's tokens, gathered text-first by one sort (two matmuls on CPU, one
              grouped GEMM on CUDA bf16)
  dispatcher  the same layer with ``moe_path='dispatcher'``: the FFN experts through
              megatron-core's MoE layer, modality router and all-to-all token dispatcher
              (permutation, routing map, unpermutation; what EP > 1 needs)
  mask        megatron_navil.testing.masked_reference: both experts on all tokens, then
              torch.where (NaViL's released inference code does this)
Timed parts: the whole layer; the expert parts alone (attention projections + FFN, the shared
attention core and norms excluded); the FFN (MoE layer) alone; at a visual-token fraction of
0.5 (default), in contiguous runs like real image blocks. Also the tiny model's full training
step (vision encoder, LLM, loss, backward, Adam) on one packed micro-batch, on both FFN paths.

Prints a table, writes JSON (default benchmarks/results/modality_experts.json). Median of
``--repeats`` after ``--warmup`` runs; the runs of a row alternate between its columns.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch


def _median_ms(fns: list[Any], warmup: int, repeats: int) -> list[float]:
    """Median wall time (ms) of each function; runs alternate between them, so a change in
    machine load (2 shared cores) hits all of them alike."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for fn, bucket in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            bucket.append(time.perf_counter() - start)
    return [statistics.median(b) * 1e3 for b in times]


def _visual_mask(t: int, fraction: float, gen: torch.Generator) -> torch.Tensor:
    """Contiguous visual runs (image blocks of 64..256 tokens) until ``fraction`` is reached."""
    mask = torch.zeros(t, dtype=torch.bool)
    target = round(fraction * t)
    while int(mask.sum()) < target:
        size = int(torch.randint(64, 257, (1,), generator=gen))
        start = int(torch.randint(0, t, (1,), generator=gen))
        mask[start : start + min(size, target - int(mask.sum()))] = True
    return mask


def bench_layer(args: argparse.Namespace) -> dict[str, float]:
    from megatron_navil.config.model import LanguageConfig
    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import transformer_config
    from megatron_navil.models.language import LayerInputs, ModalityDecoderLayer, rope_tables
    from megatron_navil.models.modality import ModalitySplit
    from megatron_navil.parallel import current_groups
    from megatron_navil.testing import masked_reference as M

    lm = LanguageConfig(
        variant="qwen3", hidden=args.hidden, layers=1, heads=args.heads, kv_heads=args.kv_heads,
        head_dim=args.hidden // args.heads, ffn=args.ffn, vocab=1024, qk_norm=True,
    )  # fmt: skip
    cfg = get_config("tiny").replace(language=lm).validate()
    layer = ModalityDecoderLayer(transformer_config(cfg), lm, 1, current_groups().tp)
    gen = torch.Generator().manual_seed(0)
    t = args.tokens
    visual = _visual_mask(t, args.visual_fraction, gen)
    lengths = [t // 4] * 4
    pos = torch.cat([torch.arange(n) for n in lengths])
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cos, sin = rope_tables(pos, lm.head_dim, lm.rope_theta)
    inputs = LayerInputs(ModalitySplit.from_mask(visual), visual.view(-1, 1), cos, sin, cu)
    mask = None  # the masked layer uses the same varlen attention core as ours
    x = torch.randn(t, lm.hidden, generator=gen, requires_grad=True)
    grad = torch.randn(t, lm.hidden, generator=gen)

    def layer_on(path: str) -> Any:
        def run() -> None:
            layer.mlp.moe_path = path
            layer(x.view(t, 1, lm.hidden), inputs).view(t, lm.hidden).backward(grad)

        return run

    def masked() -> None:
        M.masked_layer_forward(layer, x, visual, pos, cu, mask, varlen=True).backward(grad)

    # Expert parts alone: per-modality q/k/v/o projections + FFN experts.
    attn = layer.self_attention
    ctx = torch.randn(t, lm.heads * lm.head_dim, generator=gen, requires_grad=True)
    split = inputs.split

    def ffn_on(path: str) -> Any:
        def run() -> torch.Tensor:
            layer.mlp.moe_path = path
            ffn, _ = layer.mlp(x.view(t, 1, lm.hidden), visual.view(-1, 1), split)
            return ffn.view(t, -1)

        return run

    def experts_on(path: str) -> Any:
        def run() -> None:
            xs = split.sort(x)
            qkv = split.linear(xs, attn.linear_qkv.text.weight, attn.linear_qkv.visual.weight)
            o = split.linear(split.sort(ctx), attn.linear_proj.text.weight,
                             attn.linear_proj.visual.weight)  # fmt: skip
            ffn = ffn_on(path)()
            (qkv.sum() + split.unsort(o).mul(grad).sum() + ffn.mul(grad).sum()).backward()

        return run

    def masked_experts() -> None:
        pick = M._pick
        qkv = pick(visual, torch.nn.functional.linear(x, attn.linear_qkv.visual.weight),
                   torch.nn.functional.linear(x, attn.linear_qkv.text.weight))  # fmt: skip
        o = pick(visual, torch.nn.functional.linear(ctx, attn.linear_proj.visual.weight),
                 torch.nn.functional.linear(ctx, attn.linear_proj.text.weight))  # fmt: skip
        ffn = masked_ffn()
        (qkv.sum() + o.mul(grad).sum() + ffn.mul(grad).sum()).backward()

    def masked_ffn() -> torch.Tensor:
        experts = layer.mlp.experts.local_experts

        def swiglu(e: Any) -> torch.Tensor:
            g, u = torch.nn.functional.linear(x, e.linear_fc1.weight).chunk(2, dim=-1)
            return torch.nn.functional.linear(torch.nn.functional.silu(g) * u, e.linear_fc2.weight)

        return M._pick(visual, swiglu(experts[1]), swiglu(experts[0]))

    def backward(fn: Any) -> Any:
        return lambda: fn().mul(grad).sum().backward()

    rows = {
        "layer": (layer_on("split"), layer_on("dispatcher"), masked),
        "experts": (experts_on("split"), experts_on("dispatcher"), masked_experts),
        "ffn": (backward(ffn_on("split")), backward(ffn_on("dispatcher")), backward(masked_ffn)),
    }
    out = {}
    for name, fns in rows.items():
        ms_split, ms_dispatcher, ms_mask = _median_ms(list(fns), args.warmup, args.repeats)
        out[f"{name}_split_ms"] = ms_split
        out[f"{name}_dispatcher_ms"] = ms_dispatcher
        out[f"{name}_mask_ms"] = ms_mask
        out[f"{name}_dispatcher_over_split"] = ms_dispatcher / ms_split
        out[f"{name}_mask_over_split"] = ms_mask / ms_split
    layer.mlp.moe_path = "split"
    out["visual_fraction"] = float(visual.float().mean())
    return out


def bench_tiny_step(args: argparse.Namespace) -> dict[str, float]:
    from megatron_navil.config.registry import get_config
    from megatron_navil.testing import navil_run as N

    cfg = get_config("tiny")
    spec = N.BatchSpec(micro_batches=(N.MIXED,), special_ids=N.special_ids_for(cfg))
    runs = [
        N.setup_run(cfg, spec=spec, optimizer="adam", lr=1e-4, moe_path=path)
        for path in ("split", "dispatcher")
    ]
    ms_split, ms_dispatcher = _median_ms(
        [lambda run=run: run.step(batch_seed=0) for run in runs], args.warmup, args.repeats
    )
    return {
        "tiny_train_step_split_ms": ms_split,
        "tiny_train_step_dispatcher_ms": ms_dispatcher,
        "tiny_train_step_dispatcher_over_split": ms_dispatcher / ms_split,
        "tiny_tokens": spec.seq_length,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=2048, help="packed tokens (default 2048)")
    parser.add_argument("--hidden", type=int, default=512, help="LLM hidden size (512)")
    parser.add_argument("--heads", type=int, default=8, help="query heads (8)")
    parser.add_argument("--kv-heads", type=int, default=4, help="key/value heads (4)")
    parser.add_argument("--ffn", type=int, default=2048, help="SwiGLU inner size (2048)")
    parser.add_argument("--visual-fraction", type=float, default=0.5,
                        help="fraction of visual tokens (0.5)")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=2, help="untimed runs (2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed runs, median (7)")
    parser.add_argument("--json", type=Path,
                        default=Path(__file__).parent / "results" / "modality_experts.json",
                        help="where to write the numbers")  # fmt: skip
    args = parser.parse_args(argv)
    if not 0 < args.visual_fraction < 1:
        parser.error("--visual-fraction must be in (0, 1)")

    warnings.filterwarnings("ignore")
    from megatron_navil.parallel import initialize
    from megatron_navil.parallel.spawn import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    initialize(seed=0)
    results = {
        "torch_threads": torch.get_num_threads(),
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        **bench_layer(args),
        **bench_tiny_step(args),
    }
    rows = [
        ("decoder layer, fwd+bwd", "layer"),
        ("expert parts only (q/k/v/o + FFN)", "experts"),
        ("FFN (MoE layer) only", "ffn"),
    ]
    print(f"{'':36s} {'split':>10s} {'dispatcher':>17s} {'mask (released)':>17s}")
    for label, key in rows:
        r = {k[len(key) + 1 :]: v for k, v in results.items() if k.startswith(key + "_")}
        print(
            f"{label:36s} {r['split_ms']:7.1f} ms {r['dispatcher_ms']:7.1f} ms "
            f"{r['dispatcher_over_split']:5.2f}x {r['mask_ms']:7.1f} ms "
            f"{r['mask_over_split']:5.2f}x"
        )
    print(f"tiny NaViL training step (1 micro-batch of {results['tiny_tokens']} tokens, Adam): "
          f"split {results['tiny_train_step_split_ms']:.1f} ms, dispatcher "
          f"{results['tiny_train_step_dispatcher_ms']:.1f} ms "
          f"({results['tiny_train_step_dispatcher_over_split']:.2f}x)")  # fmt: skip
    print(f"visual fraction {results['visual_fraction']:.3f}, torch threads "
          f"{results['torch_threads']}; ratios: time over the split path's")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
