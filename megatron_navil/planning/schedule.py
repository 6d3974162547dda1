"""Micro-batches in flight under megatron-core's pipeline schedules, by replaying their order.

megatron-core's 1F1B keeps ``min(pp - rank, m)`` micro-batches on pipeline rank ``rank``
(``pp`` on stage 0, which also holds the vision tower); the interleaved schedule (VPP ``v``)
keeps up to ``2 (pp - rank - 1) + (v - 1) pp + 1`` chunk forwards, which :func:`in_flight`
simulates exactly with per-chunk weights (stage 0's chunk is heavier).
"""

from __future__ import annotations

from collections.abc import Sequence


def schedule_order(pp: int, vpp: int, m: int, rank: int) -> list[tuple[str, int, int]]:
    """megatron-core's (interleaved) 1F1B order on pipeline ``rank``: ``(op, chunk, micro)``
    with op ``F``/``B``; ``vpp == 1`` is plain 1F1B."""
    total = m * vpp
    if vpp == 1:
        warmup = min(pp - rank - 1, m)
    else:
        warmup = min((pp - rank - 1) * 2 + (vpp - 1) * pp, total)

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (pp * vpp)) // pp if vpp > 1 else 0
        return c if forward else vpp - 1 - c

    def micro_of(k: int) -> int:
        return (k // (pp * vpp)) * pp + k % pp if vpp > 1 else k

    order = [("F", chunk_of(k, True), micro_of(k)) for k in range(warmup)]
    for i in range(total - warmup):
        k = warmup + i
        order.append(("F", chunk_of(k, True), micro_of(k)))
        order.append(("B", chunk_of(i, False), micro_of(i)))
    for i in range(total - warmup, total):
        order.append(("B", chunk_of(i, False), micro_of(i)))
    return order


def in_flight(pp: int, vpp: int, m: int, rank: int, weights: Sequence[float]) -> float:
    """Peak of the summed ``weights[chunk]`` of forwards whose backward has not run yet."""
    live = peak = 0.0
    for op, chunk, _ in schedule_order(pp, vpp, m, rank):
        live += weights[chunk] if op == "F" else -weights[chunk]
        peak = max(peak, live)
    return peak
