"""The planner's context-parallel terms (``planning.context_parallel``) for navil-9b at S2 on
H100s (selective LLM recompute, full vision recompute: the paper layouts' modes)."""

from __future__ import annotations

import pytest

from megatron_navil.config.registry import get_config
from megatron_navil.planning.context_parallel import (
    gathered_kv_bytes,
    longest_sequence,
    peak_bytes,
)
from megatron_navil.planning.layout import Layout, default_patches
from megatron_navil.planning.memory import peak_rank, plan_memory

CFG = get_config("navil-9b")
FITS = 79.6 - 6  # an H100's usable GiB less the launcher's reserve


def _layout(tp: int, pp: int, dp: int, seq: int = 16384) -> Layout:
    return Layout(
        tp=tp, pp=pp, dp=dp, seq_length=seq, patches=default_patches("s2", seq),
        recompute="selective", vision_recompute="full", stage="s2",
    )  # fmt: skip


def test_cp1_is_the_planner_and_cp_adds_the_gathered_kv():
    lay = _layout(4, 1, 16)
    assert peak_bytes(CFG, lay, 1) == peak_rank(plan_memory(CFG, lay)).total
    # other ranks' K and V of one layer: (cp-1)/cp * S * 2 * kv_heads/tp * head_dim * 2 bytes
    assert gathered_kv_bytes(CFG, lay, 2, 1) == 0.5 * 16384 * 2 * (8 // 4) * 128 * 2
    assert gathered_kv_bytes(CFG, lay, 1, 36) == 0


def test_cp_lengthens_the_sequence_each_layout_fits():
    """The paper's navil-9b layout (TP4 PP1) fits 16,384 tokens (its 64.6 GiB); CP multiplies
    that (CP ranks replace DP ranks on the same 64 GPUs)."""
    lengths = {cp: longest_sequence(CFG, _layout(4, 1, 16 // cp), cp, FITS) for cp in (1, 2, 4)}
    assert lengths[1] == 16384
    assert lengths[1] < lengths[2] < lengths[4]
    assert lengths[4] >= 4 * lengths[1]


def test_sequence_must_split():
    with pytest.raises(ValueError, match="2\\*cp=4"):
        peak_bytes(CFG, _layout(4, 1, 8, seq=16386), 2)
