"""varlen_attention against an explicit masked softmax, segment isolation, and bad inputs."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from megatron_navil.models.attention import varlen_attention


def _reference(q, k, v, bounds, causal):
    """Explicit softmax(q k^T / sqrt(d) + mask) v in float64 with a block-diagonal mask."""
    t, heads, d = q.shape
    group = heads // k.shape[1]
    k, v = (x.double().repeat_interleave(group, dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) / math.sqrt(d)
    seg = torch.zeros(t, dtype=torch.long)
    for i, (s, e) in enumerate(itertools.pairwise(bounds)):
        seg[s:e] = i
    allowed = seg[:, None] == seg[None, :]
    if causal:
        allowed &= torch.ones(t, t, dtype=torch.bool).tril()
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_matches_masked_reference(causal, kv_heads):
    torch.manual_seed(0)
    bounds = [0, 1, 1, 7, 20, 33]  # includes a 1-token and an empty segment
    q = torch.randn(33, 4, 8)
    k, v = torch.randn(33, kv_heads, 8), torch.randn(33, kv_heads, 8)
    out = varlen_attention(q, k, v, torch.tensor(bounds, dtype=torch.int32), causal)
    # float32 against float64: a few ulp of the outputs' scale (|out| <~ 3).
    torch.testing.assert_close(out.double(), _reference(q, k, v, bounds, causal), rtol=0, atol=1e-5)


@pytest.mark.parametrize("causal", [True, False])
def test_padded_buckets_match_reference_with_gradients(causal):
    # Lengths that share length buckets but differ (6 and 7; 23 and 30), so segments are padded
    # inside a bucket, plus buckets of one: outputs and all three gradients against float64.
    torch.manual_seed(2)
    bounds = [0, *itertools.accumulate([6, 23, 7, 1, 30, 3, 7])]
    t = bounds[-1]
    q, k, v = (torch.randn(t, h, 8, requires_grad=True) for h in (4, 2, 2))
    out = varlen_attention(q, k, v, torch.tensor(bounds, dtype=torch.int32), causal)
    probe = torch.randn(out.shape, dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * probe).sum(), (q, k, v))
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = _reference(q64, k64, v64, bounds, causal)
    want = torch.autograd.grad((ref * probe).sum(), (q64, k64, v64))
    # float32 against float64, |values| <~ 10: a few ulp.
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)
    for got, exp in zip(grads, want, strict=True):
        torch.testing.assert_close(got.double(), exp, rtol=0, atol=5e-5)


def test_segments_are_isolated_bitwise():
    torch.manual_seed(1)
    cu = torch.tensor([0, 5, 12, 20], dtype=torch.int32)
    q, k, v = (torch.randn(20, 2, 4) for _ in range(3))
    base = varlen_attention(q, k, v, cu, causal=False)
    for x in (q, k, v):
        x[5:12] += torch.randn(7, 2, 4)
    changed = varlen_attention(q, k, v, cu, causal=False)
    assert torch.equal(base[:5], changed[:5]) and torch.equal(base[12:], changed[12:])
    assert not torch.equal(base[5:12], changed[5:12])


def test_gradients_flow_to_all_inputs():
    q, k, v = (torch.randn(9, 2, 4, requires_grad=True) for _ in range(3))
    varlen_attention(q, k, v, torch.tensor([0, 4, 9]), causal=True).square().sum().backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in (q, k, v))


@pytest.mark.parametrize(
    ("cu", "match"),
    [
        ([1, 9], "rise from 0"),
        ([0, 5], "rise from 0 to the packed length 9"),
        ([0, 6, 4, 9], "rise from 0"),
    ],
)
def test_bad_cu_seqlens(cu, match):
    q = torch.randn(9, 2, 4)
    with pytest.raises(ValueError, match=match):
        varlen_attention(q, q, q, torch.tensor(cu), causal=True)


def test_bad_shapes():
    q = torch.randn(9, 3, 4)
    with pytest.raises(ValueError, match="not a multiple"):
        varlen_attention(q, torch.randn(9, 2, 4), torch.randn(9, 2, 4), torch.tensor([0, 9]), True)
    with pytest.raises(ValueError, match="same t, d"):
        varlen_attention(q, torch.randn(8, 3, 4), torch.randn(8, 3, 4), torch.tensor([0, 9]), True)
    with pytest.raises(ValueError, match="integer"):
        varlen_attention(q, q, q, torch.tensor([0.0, 9.0]), True)
