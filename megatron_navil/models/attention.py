"""Variable-length (packed) attention: one call for many independent segments.

Layouts: packed ``[t, heads, head_dim]`` (``_thd``) with ``cu_seqlens`` int32 ``[segments + 1]``
(segment ``i`` is rows ``cu_seqlens[i]:cu_seqlens[i + 1]``). Tokens attend only inside their
own segment, so a change in one segment never reaches another (the LLM packs several samples
into one sequence; the vision encoder packs several images and scales).

Backends (``backend``; chosen once by ``models.impl.resolve_attention_backend``): ``flash``,
flash-attn's ``flash_attn_varlen_func`` (imported lazily, never required); ``torch``, torch's
own ``torch.nn.attention.varlen.varlen_attn`` (CUDA only); both need fp16/bf16 on a GPU.
``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` on the segments gathered into
padded batches, one batch per length bucket (every device; the CPU path). Written by hand
because PyTorch has no varlen attention on CPU: a block-diagonal ``t x t`` mask does ``t^2``
work, and one call per segment pays a call and an autograd node per segment (both measured slower by
``benchmarks/bench_varlen_attention.py``, numbers in docs/performance.md). Buckets hold
segments whose lengths are within a factor sqrt(2), so padding at most doubles a bucket's
attention FLOPs. A padded slot is masked (keys) or dropped (queries), so a segment's result
never depends on another segment's values.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
import torch.nn.functional as F


def _check_fused(backend: str, q: torch.Tensor) -> None:
    """The fused kernels run on CUDA in fp16/bf16 only: say so in one line otherwise."""
    if not q.is_cuda or q.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(
            f"varlen_attention: the {backend} backend needs CUDA fp16/bf16 tensors, got "
            f"{q.dtype} on {q.device.type}"
        )


def _flash_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
    causal: bool, softmax_scale: float | None,
) -> torch.Tensor:  # fmt: skip
    """flash-attn's varlen kernel (GQA by head count)."""
    _check_fused("flash", q)
    from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]

    return flash_attn_varlen_func(
        q, k, v, cu, cu, max_len, max_len, softmax_scale=softmax_scale, causal=causal
    )


def _torch_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int,
    causal: bool, softmax_scale: float | None,
) -> torch.Tensor:  # fmt: skip
    """torch's ``varlen_attn`` (causal is ``window_size=(-1, 0)``; GQA needs ``enable_gqa``)."""
    _check_fused("torch", q)
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn(
        q, k, v, cu, cu, max_len, max_len, scale=softmax_scale,
        window_size=(-1, 0) if causal else (-1, -1), enable_gqa=k.shape[1] != q.shape[1],
    )  # fmt: skip


# The fused varlen kernels by backend name: [t, h, d] in, [t, h, d] out.
FUSED_BACKENDS = {"flash": _flash_varlen, "torch": _torch_varlen}


def check_cu_seqlens(cu_seqlens: torch.Tensor, total: int, where: str) -> list[int]:
    """``cu_seqlens`` as a Python list after checking it starts at 0, never decreases and ends
    at ``total`` (the packed length); ValueError naming ``where`` otherwise."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"{where}: cu_seqlens must be 1-D with >= 1 entry, got {cu_seqlens}")
    if cu_seqlens.dtype.is_floating_point:
        raise ValueError(f"{where}: cu_seqlens must be an integer tensor, got {cu_seqlens.dtype}")
    bounds = [int(b) for b in cu_seqlens.tolist()]
    if bounds[0] != 0 or bounds[-1] != total or any(a > b for a, b in itertools.pairwise(bounds)):
        raise ValueError(
            f"{where}: cu_seqlens must rise from 0 to the packed length {total}, got "
            f"{bounds if len(bounds) <= 16 else [*bounds[:8], '...', *bounds[-4:]]}"
        )
    return bounds


def varlen_attention(
    q_thd: torch.Tensor,
    k_thd: torch.Tensor,
    v_thd: torch.Tensor,
    cu_seqlens: torch.Tensor,
    causal: bool,
    softmax_scale: float | None = None,
    backend: str = "sdpa",
) -> torch.Tensor:
    """Softmax attention inside each segment of a packed sequence.

    Args:
        q_thd: ``[t, heads, head_dim]`` queries.
        k_thd, v_thd: ``[t, kv_heads, head_dim]``; ``heads`` must be a multiple of ``kv_heads``
            (grouped-query attention: each group of queries shares one key/value head).
        cu_seqlens: integer ``[segments + 1]``, 0 first, ``t`` last.
        causal: each token sees only itself and earlier tokens of its segment (LLM); False is
            bidirectional within the segment (vision encoder).
        softmax_scale: defaults to ``head_dim ** -0.5``.
        backend: ``sdpa`` (bucketed SDPA, any device), ``flash`` or ``torch`` (fused varlen
            kernels: CUDA tensors in fp16/bf16, else ValueError naming what is missing).

    Returns:
        ``[t, heads, head_dim]`` in the dtype of ``q_thd``.
    """
    t, heads, head_dim = q_thd.shape
    if k_thd.shape[0] != t or v_thd.shape != k_thd.shape or k_thd.shape[2] != head_dim:
        raise ValueError(
            f"varlen_attention: q {tuple(q_thd.shape)}, k {tuple(k_thd.shape)} and v "
            f"{tuple(v_thd.shape)} must be [t, heads, d] / [t, kv_heads, d] with the same t, d"
        )
    kv_heads = k_thd.shape[1]
    if heads % kv_heads:
        raise ValueError(f"varlen_attention: {heads} heads not a multiple of {kv_heads} kv heads")
    if backend != "sdpa":
        fused = FUSED_BACKENDS.get(backend)
        if fused is None:
            raise ValueError(f"varlen_attention: unknown backend {backend!r}")
        cu = cu_seqlens.to(device=q_thd.device, dtype=torch.int32)
        max_len = int((cu[1:] - cu[:-1]).max()) if cu.numel() > 1 else 0
        return fused(q_thd, k_thd, v_thd, cu, max_len, causal, softmax_scale)
    bounds = check_cu_seqlens(cu_seqlens, t, "varlen_attention")
    if t == 0:
        return q_thd.new_empty(q_thd.shape)
    buckets, take = _bucket_plan(tuple(bounds), q_thd.device)
    outs = []
    for gather, key_valid in buckets:
        n, length = gather.shape
        # [n * length] rows -> [n, length, h, d] -> [n, h, length, d]
        q, k, v = (
            x.index_select(0, gather.reshape(-1)).unflatten(0, (n, length)).transpose(1, 2)
            for x in (q_thd, k_thd, v_thd)
        )
        # Causal: right padding sits after every real key, so is_causal alone keeps real
        # queries off it; bidirectional: the key mask does.
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=None if causal else key_valid, is_causal=causal,
            scale=softmax_scale, enable_gqa=kv_heads != heads,
        )  # fmt: skip
        outs.append(o.transpose(1, 2).reshape(n * length, heads, head_dim))
    return (torch.cat(outs) if len(outs) > 1 else outs[0]).index_select(0, take)


@functools.lru_cache(maxsize=64)
def _bucket_plan(
    bounds: tuple[int, ...], device: torch.device
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]:
    """How ``varlen_attention`` batches the segments delimited by ``bounds``: per bucket, the
    packed row of each ``[segment, slot]`` (``gather``; padding slots read row 0, masked or
    dropped) and which slots hold keys (``[n, 1, 1, length]``), and ``take``: for each packed
    row, its place in the concatenated bucket outputs. Cached: every layer of a forward (and
    its backward) sees the same ``cu_seqlens``."""
    by_bucket: dict[int, list[tuple[int, int]]] = {}
    for start, end in itertools.pairwise(bounds):
        if end > start:  # lengths within a factor sqrt(2) share a bucket
            by_bucket.setdefault(int(2 * math.log2(end - start)), []).append((start, end))
    buckets, take, offset = [], torch.empty(bounds[-1], dtype=torch.long), 0
    for segments in by_bucket.values():
        length = max(end - start for start, end in segments)
        slots = torch.arange(length)
        starts = torch.tensor([start for start, _ in segments])
        lens = torch.tensor([end - start for start, end in segments])
        key_valid = slots[None, :] < lens[:, None]  # [n, length]
        gather = torch.where(key_valid, starts[:, None] + slots[None, :], 0)
        take[gather[key_valid]] = offset + key_valid.reshape(-1).nonzero().squeeze(1)
        offset += gather.numel()
        buckets.append((gather.to(device), key_valid[:, None, None, :].to(device)))
    return buckets, take.to(device)
