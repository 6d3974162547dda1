"""Packed (varlen) attention on CPU: ours vs one call per segment vs one block-diagonal mask.

Forward + backward of ``megatron_navil.models.attention.varlen_attention`` (segments gathered
into padded batches, one per length bucket) against the two plain-PyTorch ways to attend inside
segments of a packed sequence:
  per segment   one ``scaled_dot_product_attention`` per segment (this module's earlier CPU
                path)
  block mask    one call over the whole sequence with a ``t x t`` block-diagonal boolean mask

Segment layouts are those of the tiny pretraining run (``examples/pretrain_navil_tiny.sh``, one
1024-token micro-batch as its loader packs it): the LLM's 12 samples of 85 tokens + a 4-token
padding segment (causal; 4 heads, 2 kv heads, head dim 16), and the vision encoder's 12 images
at 4 scales of 16, 16, 36 and 64 patches (bidirectional; 2 heads of 16). ``--scale K``
multiplies both head counts by K. All three give the same outputs (checked, fp32,
within 1e-5). Median of ``--repeats`` runs, alternating; prints a table, writes JSON
(default benchmarks/results/varlen_attention.json).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_modality_experts import _median_ms

from megatron_navil.models.attention import varlen_attention

LAYOUTS = {
    # name: (segment lengths, heads, kv heads, head dim, causal)
    "llm": ([85] * 12 + [4], 4, 2, 16, True),
    "vision": ([16, 16, 36, 64] * 12, 2, 2, 16, False),
}


def per_segment(q, k, v, bounds, causal):
    """One SDPA call per segment, written into a preallocated output."""
    out = q.new_empty(q.shape)
    for start, end in itertools.pairwise(bounds):
        qs, ks, vs = (x[start:end].transpose(0, 1).unsqueeze(0) for x in (q, k, v))
        o = F.scaled_dot_product_attention(
            qs, ks, vs, is_causal=causal, enable_gqa=k.shape[1] != q.shape[1]
        )
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


def block_mask(q, k, v, bounds, causal):
    """One SDPA call over all ``t`` tokens with a block-diagonal (and causal) mask."""
    t = q.shape[0]
    seg = torch.repeat_interleave(torch.arange(len(bounds) - 1), torch.tensor(bounds).diff())
    mask = seg[:, None] == seg[None, :]
    if causal:
        mask &= torch.ones(t, t, dtype=torch.bool).tril()
    o = F.scaled_dot_product_attention(
        *(x.transpose(0, 1).unsqueeze(0) for x in (q, k, v)),
        attn_mask=mask,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return o.squeeze(0).transpose(0, 1)


def ours(q, k, v, bounds, causal):
    return varlen_attention(q, k, v, torch.tensor(bounds, dtype=torch.int32), causal)


def bench(name: str, scale: int, warmup: int, repeats: int) -> dict[str, float]:
    lens, heads, kv_heads, head_dim, causal = LAYOUTS[name]
    heads, kv_heads = heads * scale, kv_heads * scale
    bounds = [0, *itertools.accumulate(lens)]
    gen = torch.Generator().manual_seed(0)
    q, k, v = (
        torch.randn(bounds[-1], h, head_dim, generator=gen, requires_grad=True)
        for h in (heads, kv_heads, kv_heads)
    )
    fns = {"ours": ours, "per_segment": per_segment, "block_mask": block_mask}
    with torch.no_grad():
        want = per_segment(q, k, v, bounds, causal)
        for fn in fns.values():
            torch.testing.assert_close(fn(q, k, v, bounds, causal), want, rtol=0, atol=1e-5)

    def step(fn):
        return lambda: fn(q, k, v, bounds, causal).square().sum().backward()

    times = _median_ms([step(fn) for fn in fns.values()], warmup, repeats)
    row = {f"{n}_ms": t for n, t in zip(fns, times, strict=True)}
    row["per_segment_over_ours"] = row["per_segment_ms"] / row["ours_ms"]
    row["block_mask_over_ours"] = row["block_mask_ms"] / row["ours_ms"]
    row["segments"] = len(lens)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=int, default=1, help="head-count multiplier (1)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs (3)")
    parser.add_argument("--repeats", type=int, default=30, help="timed runs, median (30)")
    parser.add_argument("--json", type=Path,
                        default=Path(__file__).parent / "results" / "varlen_attention.json",
                        help="where to write the results")  # fmt: skip
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = {
        "config": {k: v for k, v in vars(args).items() if k != "json"},
        "threads": torch.get_num_threads(),
    }
    print(f"{'layout':8} {'segs':>5} {'ours ms':>9} {'per-seg ms':>11} {'mask ms':>9} "
          f"{'per-seg/ours':>13} {'mask/ours':>10}")  # fmt: skip
    for name in LAYOUTS:
        row = bench(name, args.scale, args.warmup, args.repeats)
        results[name] = row
        print(f"{name:8} {row['segments']:5d} {row['ours_ms']:9.2f} {row['per_segment_ms']:11.2f} "
              f"{row['block_mask_ms']:9.2f} {row['per_segment_over_ours']:13.2f} "
              f"{row['block_mask_over_ours']:10.2f}")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
