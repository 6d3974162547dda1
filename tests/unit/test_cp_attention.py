"""Context-parallel attention (``models.cp_attention``) in one process: a CP rank's queries
against the whole sequence's keys give exactly the rows of full varlen attention (per-sample
causal), for every rank of CP2 and CP4, on samples that cross chunk boundaries; the flash
path's (chunk, sample) pieces tile the local rows. The K/V exchange itself is tested with the
model in tests/distributed/test_context_parallel.py."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from megatron_navil.models.attention import varlen_attention
from megatron_navil.models.cp_attention import ContextParallel
from megatron_navil.parallel.context import local_token_index

# 96 tokens; samples of 7, 40, 1, 30 and an 18-token padding segment cross chunk boundaries
CU = torch.tensor([0, 7, 47, 48, 78, 96], dtype=torch.int32)


class _Group:
    """The two methods ContextParallel asks of a process group."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


def _qkv(t: int, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(t, h, 16, generator=gen) for h in (4, 2, 2))  # GQA 4 / 2
    return (x.to(device=device, dtype=dtype) for x in (q, k, v))


@pytest.mark.parametrize("cp", [2, 4])
def test_local_rows_equal_full_attention(cp):
    t = int(CU[-1])
    q, k, v = _qkv(t)
    want = varlen_attention(q, k, v, CU, causal=True)
    for rank in range(cp):
        index = local_token_index(t, cp, rank)
        ctx = ContextParallel.of(_Group(cp, rank), CU, t)
        got = ctx._sdpa(q[index], k, v)
        # fp32, the same softmax over the same keys in another grouping: rounding only
        torch.testing.assert_close(got, want[index], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("cp", [2, 4])
def test_pieces_tile_the_local_rows_one_sample_each(cp):
    t, bounds = int(CU[-1]), CU.tolist()
    for rank in range(cp):
        pieces = ContextParallel.of(_Group(cp, rank), CU, t).pieces()
        index = local_token_index(t, cp, rank).tolist()
        rows = []
        for local, lo, hi, first in pieces:
            assert index[local : local + hi - lo] == list(range(lo, hi))
            assert first in bounds and max(b for b in bounds if b <= lo) == first
            assert not any(lo < b < hi for b in bounds)  # one sample per piece
            rows += range(local, local + hi - lo)
        assert rows == list(range(t // cp))


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or importlib.util.find_spec("flash_attn") is None,
    reason="needs CUDA and flash-attn",
)
@pytest.mark.parametrize("cp", [2, 4])
def test_flash_pieces_equal_full_attention(cp):
    t = int(CU[-1])
    q, k, v = _qkv(t, torch.bfloat16, "cuda")
    want = varlen_attention(q.float(), k.float(), v.float(), CU, causal=True)
    for rank in range(cp):
        index = local_token_index(t, cp, rank, q.device)
        got = ContextParallel.of(_Group(cp, rank), CU, t)._flash(q[index], k, v)
        # bf16 inputs and kernel: 2**-8 relative rounding
        torch.testing.assert_close(got.float(), want[index], rtol=2e-2, atol=2e-2)
