"""Longest-processing-time (LPT) assignment: items dealt costliest first to the least loaded
bin. The data sampler deals a global batch's sequences to data-parallel ranks with it
(``data.sampler``), the vision tower its image segments to TP or CP ranks
(``models.vision_dp``)."""

from __future__ import annotations

from collections.abc import Sequence


def lpt(costs: Sequence[float], bins: int, capacity: int | None = None) -> list[list[int]]:
    """Indices of ``costs`` for each of ``bins`` bins, each bin's ascending: costliest first
    (lower index on a tie), each to the bin with the smallest total so far (lower bin on a
    tie) among those holding fewer than ``capacity`` items (None: no limit). Deterministic:
    the same split on every rank."""
    totals = [0.0] * bins
    shares: list[list[int]] = [[] for _ in range(bins)]
    for j in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        open_bins = (b for b in range(bins) if capacity is None or len(shares[b]) < capacity)
        b = min(open_bins, key=lambda b: (totals[b], b))
        shares[b].append(j)
        totals[b] += costs[j]
    return [sorted(share) for share in shares]
