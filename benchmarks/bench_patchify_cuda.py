"""The CUDA patchify kernel vs torch eager on the GPU vs transformers' torchvision Qwen2-VL
processor on the GPU, and the memory-bandwidth floor. Needs a CUDA GPU and the built
``megatron_navil._C_cuda``.

One run, the same seeded images for every candidate (``bench_patchify.make_images``: 200
images from 64x64 to 2048x1536, smooth gradients + noise), cropped to multiples of 32 per side
so that every candidate does the same job (the Qwen2-VL processor resamples sides that are not
multiples of 32 where NaViL zero-pads). Output: bf16 patches ``[n, 768]`` in merge-unit order,
mean = std = 0.5.

Candidates:
  kernel       ``_C_cuda.patchify_packed`` on a uint8 buffer already on the GPU (the kernel
               alone, allocation of the output included)
  eager        the same job in torch eager ops on the GPU from the same buffer (per image:
               float, normalise, reshape/permute to merge-unit order; then one cat)
  e2e          ``ops.patchify_batch_cuda`` from host numpy images: pack into pinned memory,
               copy uint8 to the GPU (4x fewer bytes than float), kernel
  hf           transformers' torchvision Qwen2VLImageProcessor(Fast) with ``device="cuda"``
               from host uint8 CHW tensors, as NaViL (patch 16, merge 2, temporal patch 1,
               mean = std = 0.5, bounds wide enough not to resize); compare to ``e2e``
  floor        (uint8 bytes read + bf16 bytes written) / device copy bandwidth, the bandwidth
               being 2 x size / time of a device-to-device copy of 1 GiB
Times: median of --repeats, CUDA-synchronised wall time, after a warm-up.
Writes JSON (default benchmarks/results/patchify_cuda.json) and prints ratios.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_patchify import make_images

from megatron_navil.ops import patchify_batch, patchify_batch_cuda


def median_time(fn: Callable[[], object], repeats: int) -> float:
    """Median synchronised wall time (s) of ``fn`` after one warm-up call."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def eager_patchify(buf: torch.Tensor, shapes: list[tuple[int, int]], patch: int = 16,
                   merge: int = 2) -> torch.Tensor:  # fmt: skip
    """Torch eager ops on the GPU: the peer a user would write without a kernel."""
    out, offset = [], 0
    for h, w in shapes:
        img = buf[offset : offset + h * w * 3].view(h, w, 3)
        offset += h * w * 3
        x = (img.permute(2, 0, 1).float() / 255.0 - 0.5) / 0.5  # [3, H, W]
        gh, gw = h // patch, w // patch
        x = x.view(3, gh // merge, merge, patch, gw // merge, merge, patch)
        x = x.permute(1, 4, 2, 5, 0, 3, 6)  # merge rows, merge cols, mr, mc, C, p, p
        out.append(x.reshape(gh * gw, 3 * patch * patch).to(torch.bfloat16))
    return torch.cat(out)


def hf_gpu_processor() -> object:
    import transformers

    cls = getattr(transformers, "Qwen2VLImageProcessorFast", None)
    if cls is None:
        cls = transformers.Qwen2VLImageProcessor
    return cls(
        patch_size=16,
        merge_size=2,
        temporal_patch_size=1,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        min_pixels=32 * 32,
        max_pixels=2048 * 2048,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--json", default="benchmarks/results/patchify_cuda.json")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_patchify_cuda: needs a CUDA GPU", file=sys.stderr)
        return 2
    import importlib

    ops = importlib.import_module("megatron_navil._C_cuda")
    images = [im[: im.shape[0] // 32 * 32, : im.shape[1] // 32 * 32].copy()
              for im in make_images(args.images, args.seed)]  # fmt: skip
    shapes = [(im.shape[0], im.shape[1]) for im in images]
    in_bytes = sum(im.nbytes for im in images)
    host = torch.from_numpy(np.concatenate([im.reshape(-1) for im in images]))
    buf = host.cuda()
    shapes_t = torch.tensor(shapes, dtype=torch.int64)
    half = [0.5] * 3

    def kernel() -> torch.Tensor:
        return ops.patchify_packed(buf, shapes_t, 16, 2, half, half, torch.bfloat16)[0]

    got = kernel()
    want = patchify_batch(images, dtype=torch.bfloat16)[0]
    eager = eager_patchify(buf, shapes)
    out_bytes = got.numel() * got.element_size()
    result: dict[str, object] = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "images": len(images),
        "patches": int(got.shape[0]),
        "input_MB": in_bytes / 1e6,
        "output_MB": out_bytes / 1e6,
        "kernel_equals_cpu_op": bool(torch.equal(got.cpu(), want)),
        "eager_max_abs_diff_vs_kernel": float((eager.float() - got.float()).abs().max()),
    }
    times = {
        "kernel": median_time(kernel, args.repeats),
        "eager": median_time(lambda: eager_patchify(buf, shapes), args.repeats),
        "e2e": median_time(lambda: patchify_batch_cuda(images), args.repeats),
    }
    try:
        proc = hf_gpu_processor()
        chw = [torch.from_numpy(im).permute(2, 0, 1).contiguous() for im in images]

        def hf() -> object:
            return proc(images=chw, device="cuda", return_tensors="pt")["pixel_values"]

        pv = hf()
        result["hf_class"] = type(proc).__name__
        result["hf_pixel_values_shape"] = list(pv.shape)
        ours32 = patchify_batch_cuda(images, dtype=torch.float32)[0]
        if pv.shape == ours32.shape:
            result["hf_max_abs_diff_fp32"] = float((pv.float().cuda() - ours32).abs().max())
        times["hf"] = median_time(hf, max(3, args.repeats // 4))
    except Exception as exc:  # report, do not hide: the peer could not run here
        result["hf_error"] = f"{type(exc).__name__}: {exc}"[:500]
    big = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(big)
    copy_s = median_time(lambda: dst.copy_(big), 10)
    bandwidth = 2 * big.numel() / copy_s
    times["floor"] = (in_bytes + out_bytes) / bandwidth
    result["copy_bandwidth_GBps"] = bandwidth / 1e9
    result["times_ms"] = {k: v * 1e3 for k, v in times.items()}
    result["kernel_GBps"] = (in_bytes + out_bytes) / times["kernel"] / 1e9
    ratios = {
        "eager_over_kernel": times["eager"] / times["kernel"],
        "kernel_over_floor": times["kernel"] / times["floor"],
    }
    if "hf" in times:
        ratios["hf_over_e2e"] = times["hf"] / times["e2e"]
    result["ratios"] = ratios
    print(json.dumps(result, indent=1))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
