"""A NaViL-9B-shaped slice on one GPU: MFU, tokens/s and peak memory of forward + backward,
for every transformer implementation and attention backend that runs here.

The slice keeps navil-9b's real widths (vision 1792 wide, 28 heads, MLP 7168; LLM 4096 wide,
32 / 8 heads of 128, FFN 12288 with both modality experts, the full 151,936-token vocabulary
and LM head) with fewer blocks (``--vision-blocks``, default 4) and layers
(``--llm-layers``, default 4), in bf16, on one packed S2 sequence of ``--seq-length`` tokens
(default 16,384) filled with a realistic image mix: samples drawn from
``testing/pack_data.py``'s distribution (text lengths lognormal around 300 tokens, 0-3 images
per sample from a catalogue of camera/screen/web sizes, every image with its multi-scale
copies), packed greedily, the rest one padding segment.

A step is the model's forward (vision tower, connector, LLM, LM head, per-token loss) and
backward; no optimizer (the slice's parameters are ~2.9B, and MFU is about the model's
kernels). MFU = model FLOPs of the real samples (``training.flops.sequence_flops``: the
planner's count, no padding, causal attention counted half) / (median step seconds x the
GPU's dense bf16 peak, ``training.flops.detect_peak_flops`` or ``--peak-tflops``).
``--recompute-llm`` / ``--recompute-vision`` as in train.py (the real S2 recipe uses
``selective`` / ``full``); recomputation is never counted as model FLOPs.

``--tiny``: the tiny config on a 256-token sequence of small images in fp32, for CPU (a unit
test runs it and checks its FLOP count against torch's FlopCounterMode). The script is meant
to run unchanged on an H100/H200 (scripts/gpu_checks.sh step ``bench_gpu_slice``).

Writes JSON (default benchmarks/results/gpu_slice.json, ``--json``) and prints a table.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import itertools
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "gpu_slice.json"


def slice_config(tiny: bool, vision_blocks: int, llm_layers: int) -> Any:
    """navil-9b (or ``tiny``) with ``vision_blocks`` vision blocks and ``llm_layers`` LLM
    layers; everything else (widths, heads, vocabulary, image rules) unchanged."""
    from megatron_navil.config.registry import get_config

    cfg = get_config("tiny" if tiny else "navil-9b")
    full = cfg.vision.fullatt_block_indexes
    vision = dataclasses.replace(
        cfg.vision,
        depth=vision_blocks,
        fullatt_block_indexes=None if full is None else tuple(i for i in full if i < vision_blocks),
    )
    language = dataclasses.replace(cfg.language, layers=llm_layers)
    return cfg.replace(name=f"{cfg.name}-slice", vision=vision, language=language).validate()


def image_grids(cfg: Any, height: int, width: int) -> tuple[tuple[int, int], ...]:
    """Patch grids of an image's multi-scale copies (smallest first), by the config's rules."""
    from megatron_navil.ops import merged_grid, scales_for_image

    im, patch, merge = cfg.image, cfg.vision.patch, cfg.connector.merge
    scales = scales_for_image(
        height, width, patch, merge, min_patches=im.min_patches, max_patches=im.max_patches,
        max_aspect=im.max_aspect, scale_ratio=im.scale_ratio,
    )  # fmt: skip
    if not im.multi_scale:
        scales = scales[-1:]
    return tuple(merged_grid(h, w, patch, merge) for h, w in scales)


def image_tokens(cfg: Any, grids: tuple[tuple[int, int], ...]) -> int:
    """LLM tokens of an image block: ``<img>``, per scale its rows of context tokens and a
    line break each plus a frame break, ``</img>`` (``ops.image_token_layout``)."""
    from megatron_navil.ops import image_token_layout

    merge = cfg.connector.merge
    return int(image_token_layout([(h // merge, w // merge) for h, w in grids]).numel())


def image_mix(cfg: Any, seq_length: int, seed: int, tiny: bool) -> list[Any]:
    """Samples (``testing.navil_run.Sample``) filling ``seq_length`` tokens greedily, drawn
    from ``testing.pack_data``'s distribution (see the module doc); ``tiny``: 64..128 px
    images and short texts, so a few fit in a CPU-sized sequence."""
    from megatron_navil.testing.navil_run import Sample
    from megatron_navil.testing.pack_data import IMAGES_PER_SAMPLE_P, image_catalog

    rng = np.random.default_rng(seed)
    if tiny:
        catalog = [(64, 64), (96, 128), (128, 96), (128, 128), (80, 112)]
    else:
        catalog = image_catalog(64, rng)
    samples, used, misses = [], 0, 0
    while misses < 20:
        n_images = int(rng.choice(len(IMAGES_PER_SAMPLE_P), p=IMAGES_PER_SAMPLE_P))
        text = int(np.clip(rng.lognormal(np.log(12 if tiny else 300), 1.0), 4, 4000))
        images = tuple(
            image_grids(cfg, *catalog[int(rng.integers(len(catalog)))]) for _ in range(n_images)
        )
        need = text + sum(image_tokens(cfg, g) for g in images)
        if used + need > seq_length:
            misses += 1
            continue
        before = text // 3
        samples.append(Sample(before, images, text - before))
        used += need
    return samples


def slice_batch(cfg: Any, seq_length: int, seed: int, tiny: bool) -> tuple[dict, float, dict]:
    """The packed sequence (the model's keyword arguments, on the CPU), its model FLOPs
    (``training.flops.sequence_flops`` over the real samples and image segments) and a
    summary of its contents."""
    from megatron_navil.config.tokens import SPECIAL_TOKENS, VISUAL_TOKENS
    from megatron_navil.testing import navil_run as N
    from megatron_navil.training.flops import sequence_flops

    samples = image_mix(cfg, seq_length, seed, tiny)
    special = N.special_ids_for(cfg)
    spec = N.BatchSpec(micro_batches=(samples,), seq_length=seq_length, special_ids=special)
    batch = N.pack(samples, spec, cfg, torch.Generator().manual_seed(seed))
    cu = batch["cu_seqlens"].tolist()[: len(samples) + 1]
    lengths = [b - a for a, b in itertools.pairwise(cu)]
    vcu = batch["vision_cu_seqlens"].tolist() if "vision_cu_seqlens" in batch else [0]
    segments = [b - a for a, b in itertools.pairwise(vcu) if b > a]
    flops = sequence_flops(cfg, lengths, segments)
    visual_ids = torch.tensor([special[SPECIAL_TOKENS.index(t)] for t in VISUAL_TOKENS])
    visual = torch.isin(batch["input_ids"], visual_ids).sum().item()
    summary = {
        "samples": len(samples),
        "images": sum(len(s.images) for s in samples),
        "image_segments": len(segments),
        "patches": sum(segments),
        "real_tokens": sum(lengths),
        "visual_tokens": int(visual),
        "padding_tokens": seq_length - sum(lengths),
    }
    return batch, flops, summary


def build_slice(
    cfg: Any,
    groups: Any,
    impl: str,
    backend: str,
    dtype: torch.dtype,
    device: torch.device,
    recompute: Any = None,
) -> Any:
    """The slice model (one chunk, all of it on this rank) on ``device``. Built uninitialised
    and filled there (N(0, 0.02) matrices, ones for vectors: norms and layer scales), because
    drawing ~3B numbers on the host would take longer than the benchmark; the values only
    need to be finite and of a trained model's scale."""
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.testing.navil_run import special_ids_for

    mcore = transformer_config(cfg, dtype=dtype, perform_initialization=False)
    (model,) = build_model(
        cfg, mcore, groups, special_ids=special_ids_for(cfg), init_seed=None,
        transformer_impl=impl, attention_backend=backend, recompute=recompute,
    )  # fmt: skip
    model = model.to(device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return model


def set_attention_backend(model: Any, backend: str) -> None:
    """Switch every attention of ``model`` (LLM layers and vision blocks) to ``backend``, so
    one built slice serves all backends (the layers read ``attention_backend`` per call)."""
    for module in model.modules():
        if hasattr(module, "attention_backend"):
            module.attention_backend = backend


def step_fn(model: Any, batch: dict) -> Any:
    """One forward + backward of ``model`` on ``batch`` (mean loss over the text targets)."""
    targets = max(int((batch["labels"] != -100).sum()), 1)

    def step() -> None:
        loss = model(**batch)
        (loss.float().sum() / targets).backward()

    return step


def measure(step: Any, device: torch.device, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` steps after ``warmup`` untimed ones."""
    cuda = device.type == "cuda"
    for _ in range(warmup):
        step()
    times = []
    for _ in range(iters):
        if cuda:
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if cuda:
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return times


def candidates(cuda: bool, dtype: torch.dtype, impls: str, backends: str) -> list[tuple]:
    """(impl, backend) pairs to run: the named ones (comma lists) or, for ``all``, every one
    that can run here; a named one that cannot run is reported with why."""
    from megatron_navil.models.impl import (
        ATTENTION_BACKENDS,
        TRANSFORMER_IMPLS,
        attention_problem,
        te_problem,
    )

    impl_list = TRANSFORMER_IMPLS if impls == "all" else tuple(impls.split(","))
    backend_list = ATTENTION_BACKENDS if backends == "all" else tuple(backends.split(","))
    out = []
    for impl, backend in itertools.product(impl_list, backend_list):
        problem = te_problem(cuda) if impl == "te" else None
        problem = problem or attention_problem(backend, cuda, dtype)
        out.append((impl, backend, problem))
    return out


def _measure_one(
    model: Any, batch: dict, impl: str, backend: str, flops: float, peak: float | None,
    args: argparse.Namespace, device: torch.device,
) -> dict[str, Any]:  # fmt: skip
    """One result row: ``model`` with attention ``backend``, timed; out of memory is a row
    that says so."""
    cuda = device.type == "cuda"
    row: dict[str, Any] = {"transformer_impl": impl, "attention_backend": backend}
    set_attention_backend(model, backend)
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    try:
        times = measure(step_fn(model, batch), device, args.warmup, args.iters)
    except torch.OutOfMemoryError as exc:
        model.zero_grad(set_to_none=True)
        return {**row, "skipped": f"out of memory: {str(exc).splitlines()[0]}"}
    step_s = statistics.median(times)
    return {
        **row,
        "step_ms": round(step_s * 1e3, 2),
        "step_ms_all": [round(t * 1e3, 2) for t in times],
        "tokens_per_s": round(args.seq_length / step_s, 1),
        "model_tflops_per_s": round(flops / step_s / 1e12, 3),
        "mfu": None if peak is None else round(flops / step_s / peak, 4),
        "peak_memory_gib": (
            round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if cuda else None
        ),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    from megatron_navil.config.model import Recompute
    from megatron_navil.parallel import initialize
    from megatron_navil.training.flops import detect_peak_flops

    warnings.filterwarnings("ignore")
    cuda = torch.cuda.is_available()
    groups = initialize(seed=0)
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.float32 if args.tiny and not cuda else torch.bfloat16
    cfg = slice_config(args.tiny, args.vision_blocks, args.llm_layers)
    batch_cpu, flops, summary = slice_batch(cfg, args.seq_length, args.seed, args.tiny)
    batch = {k: v.to(device) for k, v in batch_cpu.items()}
    if "patches" in batch:
        batch["patches"] = batch["patches"].to(dtype)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else detect_peak_flops()
    rows: list[dict[str, Any]] = []
    todo = candidates(cuda, dtype, args.impls, args.backends)
    for impl in dict.fromkeys(i for i, _, _ in todo):
        runnable = [b for i, b, problem in todo if i == impl and problem is None]
        rows.extend(
            {"transformer_impl": i, "attention_backend": b, "skipped": problem}
            for i, b, problem in todo
            if i == impl and problem is not None
        )
        if not runnable:
            continue
        recompute = Recompute(llm=args.recompute_llm, vision=args.recompute_vision)
        model = build_slice(cfg, groups, impl, runnable[0], dtype, device, recompute)
        for backend in runnable:
            rows.append(_measure_one(model, batch, impl, backend, flops, peak, args, device))
        del model
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()
    return {
        "config": cfg.name,
        "tiny": args.tiny,
        "vision": dataclasses.asdict(cfg.vision),
        "language": dataclasses.asdict(cfg.language),
        "seq_length": args.seq_length,
        "dtype": str(dtype).removeprefix("torch."),
        "recompute": {"llm": args.recompute_llm, "vision": args.recompute_vision},
        "batch": summary,
        "model_flops_per_step": flops,
        "peak_flops": peak,
        "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        "torch": torch.__version__,
        "warmup": args.warmup,
        "iters": args.iters,
        "results": rows,
    }


def format_table(report: dict[str, Any]) -> str:
    b = report["batch"]
    lines = [
        f"{report['config']} on {report['device']} ({report['dtype']}): {report['seq_length']} "
        f"tokens ({b['real_tokens']} real, {b['visual_tokens']} visual), {b['samples']} "
        f"samples, {b['images']} images / {b['image_segments']} segments / {b['patches']} "
        f"patches; {report['model_flops_per_step'] / 1e12:.2f} model TFLOP per step",
        f"{'impl':<6} {'attention':<9} {'step ms':>9} {'tokens/s':>10} {'TFLOP/s':>8} "
        f"{'MFU':>6} {'peak GiB':>9}",
    ]
    for r in report["results"]:
        if "skipped" in r:
            lines.append(f"{r['transformer_impl']:<6} {r['attention_backend']:<9} skipped: "
                         f"{r['skipped']}")  # fmt: skip
            continue
        mfu = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        mem = "-" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        lines.append(
            f"{r['transformer_impl']:<6} {r['attention_backend']:<9} {r['step_ms']:>9.1f} "
            f"{r['tokens_per_s']:>10.0f} {r['model_tflops_per_s']:>8.1f} {mfu:>6} {mem:>9}"
        )
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="the tiny config, 256 tokens (CPU)")
    p.add_argument("--vision-blocks", type=int, default=None, help="default 4 (tiny: 2)")
    p.add_argument("--llm-layers", type=int, default=None, help="default 4 (tiny: 2)")
    p.add_argument("--seq-length", type=int, default=None, help="default 16384 (tiny: 256)")
    p.add_argument("--impls", default="all", help="comma list of local,te or all")
    p.add_argument("--backends", default="all", help="comma list of flash,torch,sdpa or all")
    p.add_argument("--recompute-llm", choices=("none", "selective", "full"), default="none")
    p.add_argument("--recompute-vision", choices=("none", "selective", "full"), default="none")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--peak-tflops", type=float, default=None, help="default: detected")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    defaults = (2, 2, 256) if args.tiny else (4, 4, 16384)
    for name, value in zip(("vision_blocks", "llm_layers", "seq_length"), defaults, strict=True):
        if getattr(args, name) is None:
            setattr(args, name, value)
    if "MASTER_PORT" not in os.environ and "RANK" not in os.environ:
        from megatron_navil.parallel.spawn import free_port

        os.environ["MASTER_PORT"] = str(free_port())  # one process without torchrun
    report = run(args)
    print(format_table(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")
    ran = [r for r in report["results"] if "skipped" not in r]
    return 0 if ran else 1


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
