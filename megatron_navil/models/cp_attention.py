"""Attention of a context-parallel rank's tokens (``parallel.context``): its queries against the
whole sequence's keys and values, all-gathered over the CP group (the Llama 3 approach, which
handles the per-sample document mask exactly).

A query at global position ``i`` of sample ``s`` sees the keys ``j <= i`` of sample ``s``
(``cu_seqlens`` of the whole sequence). Each of the rank's two chunks is attended separately:
its keys start at the first key its first query can see (its sample's start), so a late chunk
reads only what it needs and an early one little.

Backends: ``sdpa`` (any device, the CPU path): one SDPA per local chunk with an explicit
boolean mask (same sample and causal); ``flash``: flash-attn's varlen kernel with separate query
and key ``cu_seqlens``, one segment per (chunk, sample) piece whose keys run from the sample's
start to the piece's last query (flash-attn aligns a causal mask bottom-right when there are
more keys than queries, which is exactly this); ``torch`` takes the SDPA path. q/k/v
projections and their modality experts stay local (they are per token).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from megatron_navil.parallel.context import gather_sequence, local_chunks


@dataclass
class ContextParallel:
    """What the layers of one micro-batch need for CP attention: the CP ``group``, the whole
    sequence's ``cu_seqlens`` (list ``bounds``) and its length ``t``."""

    group: Any
    bounds: list[int]
    t: int

    @classmethod
    def of(cls, group: Any, cu_seqlens: torch.Tensor, t: int) -> ContextParallel:
        from megatron_navil.models.attention import check_cu_seqlens

        return cls(group, check_cu_seqlens(cu_seqlens, t, "context-parallel attention"), t)

    def pieces(self) -> list[tuple[int, int, int, int]]:
        """Per (local chunk, sample) piece, in local order: ``(local_start, q_start, q_end,
        k_start)``: its first local row, its global query rows ``[q_start, q_end)`` and the
        first global key row it sees (its sample's start)."""
        out, offset = [], 0
        for start, end in local_chunks(self.t, self.group.size(), self.group.rank()):
            for a, b in itertools.pairwise(self.bounds):
                lo, hi = max(a, start), min(b, end)
                if lo < hi:
                    out.append((offset + lo - start, lo, hi, a))
            offset += end - start
        return out

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa"
    ) -> torch.Tensor:
        """``q`` ``[t / cp, heads, d]``, ``k`` / ``v`` ``[t / cp, kv_heads, d]`` (this rank's
        rows, local order) -> ``[t / cp, heads, d]``. Collective over the CP group."""
        kv = gather_sequence(torch.stack([k, v], dim=1), self.group)  # [t, 2, kv_heads, d]
        k_full, v_full = kv[:, 0], kv[:, 1]
        if backend == "flash":
            return self._flash(q, k_full, v_full)
        return self._sdpa(q, k_full, v_full)

    def _sdpa(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        bounds = torch.tensor(self.bounds, device=q.device)
        outs, offset = [], 0
        for start, end in local_chunks(self.t, self.group.size(), self.group.rank()):
            n = end - start
            first = int(bounds[torch.searchsorted(bounds, start, right=True) - 1])
            q_pos = torch.arange(start, end, device=q.device)
            k_pos = torch.arange(first, end, device=q.device)
            q_seg = torch.searchsorted(bounds, q_pos, right=True)
            k_seg = torch.searchsorted(bounds, k_pos, right=True)
            mask = (q_seg[:, None] == k_seg[None, :]) & (k_pos[None, :] <= q_pos[:, None])
            o = F.scaled_dot_product_attention(
                q[offset : offset + n].transpose(0, 1).unsqueeze(0),
                k[first:end].transpose(0, 1).unsqueeze(0),
                v[first:end].transpose(0, 1).unsqueeze(0),
                attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1],
            )  # fmt: skip
            outs.append(o.squeeze(0).transpose(0, 1))
            offset += n
        return torch.cat(outs)

    def _flash(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from flash_attn import flash_attn_varlen_func  # type: ignore[import-not-found]

        from megatron_navil.models.attention import _check_fused

        _check_fused("flash", q)
        pieces = self.pieces()
        q_len = [hi - lo for _, lo, hi, _ in pieces]
        k_len = [hi - a for _, _, hi, a in pieces]
        rows = torch.cat([torch.arange(a, hi, device=q.device) for _, _, hi, a in pieces])

        def cu(lengths: list[int]) -> torch.Tensor:
            return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32).to(q.device)

        # pieces are in local order and tile the local rows, so q needs no reordering
        return flash_attn_varlen_func(
            q, k.index_select(0, rows), v.index_select(0, rows), cu(q_len), cu(k_len),
            max(q_len), max(k_len), causal=True,
        )  # fmt: skip
