"""Straggler term of the step-time model: how much longer the slowest data-parallel replica's
micro-batches take than the mean replica's, from the image-size distribution.

Every replica waits for the slowest one at the gradient reduce-scatter, so a step costs the
*expected maximum* over DP replicas of the replica's summed micro-batch cost. Images are drawn
with log-normal sides (:data:`SIDE_MEDIAN_PX`, :data:`SIDE_SIGMA`, clipped to
:data:`SIDE_RANGE_PX`, height and width independent), resized into the stage's
``[min_patches, max_patches]`` keeping the aspect ratio, given their multi-scale copies (area
halving, down to ``min_patches``; NaViL-2B's settings with multi-scale on) and packed in
order into micro-batches up to the planner's patch budget (``Layout.patches``); a micro-batch
costs ``a x patches + b x sum(s^2)`` (the vision tower's time per patch and per attention
pair in ``planning.perf``).
The replica's sum of ``m`` micro-batches is taken as normal (mean ``m mu``, variance
``m sigma^2``) and its expected maximum over ``dp`` replicas as ``m mu + sqrt(m) sigma
z(dp)`` with Blom's ``z(n) = Phi^-1((n - 0.375) / (n + 0.25))``. The ratio to ``m mu`` is the
straggler factor; cost-balanced packing (a separate issue) would shrink ``sigma``.
"""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

SIDE_MEDIAN_PX = 512.0  # assumed: web / document image sides centre around 400-600 px
SIDE_SIGMA = 0.7  # log-space spread: about 90% of the sides within 160..1600 px
SIDE_RANGE_PX = (64, 2048)
PATCH_PX = 16
SAMPLES = 2000  # micro-batches simulated (fixed seed: the estimate is deterministic)
SEED = 0


def image_segments(
    rng: random.Random, min_patches: int, max_patches: int, multi_scale: bool = True
) -> list[int]:
    """One random image's segments (patches per scale, largest first)."""
    lo, hi = SIDE_RANGE_PX
    h, w = (min(hi, max(lo, rng.lognormvariate(math.log(SIDE_MEDIAN_PX), SIDE_SIGMA)))
            for _ in range(2))  # fmt: skip
    p = (h / PATCH_PX) * (w / PATCH_PX)
    p = min(max(p, min_patches), max_patches)
    out = [max(1, round(p))]
    while multi_scale and out[-1] / 2 >= min_patches:
        out.append(round(out[-1] / 2))
    return out


def micro_batches(
    budget: int, min_patches: int, max_patches: int, n: int = SAMPLES, seed: int = SEED
) -> list[list[int]]:
    """``n`` micro-batches' image segments, images packed in order up to ``budget`` patches
    (an image that does not fit starts the next micro-batch; one larger than the budget is
    cut to it)."""
    rng = random.Random(seed)
    out: list[list[int]] = []
    current: list[int] = []
    while len(out) < n:
        segs = image_segments(rng, min_patches, max_patches)
        need = sum(segs)
        if need > budget:
            segs, need = _cut(segs, budget), budget
        if sum(current) + need > budget:
            out.append(current)
            current = []
        current = current + segs
    return out


def _cut(segs: Sequence[int], budget: int) -> list[int]:
    out, left = [], budget
    for s in segs:
        take = min(s, left)
        if take:
            out.append(take)
        left -= take
    return out


def expected_max_z(n: int) -> float:
    """Blom's approximation of the expected maximum of ``n`` standard normals (0 for 1)."""
    if n <= 1:
        return 0.0
    return statistics.NormalDist().inv_cdf((n - 0.375) / (n + 0.25))


@dataclass(frozen=True)
class Straggler:
    """Per micro-batch cost mean / spread and the expected slowest replica over the mean."""

    mean: float
    std: float
    ratio: float  # E[max over DP replicas] / mean replica

    @property
    def cv(self) -> float:
        return self.std / self.mean if self.mean else 0.0


@lru_cache(maxsize=64)
def moments(budget: int, min_patches: int, max_patches: int) -> tuple[float, ...]:
    """Means, variances and covariance of a micro-batch's patches ``p`` and attention pairs
    ``q = sum(s^2)``: ``(E p, E q, Var p, Var q, Cov(p, q))``."""
    mbs = micro_batches(budget, min_patches, max_patches)
    p = [float(sum(s)) for s in mbs]
    q = [float(sum(x * x for x in s)) for s in mbs]
    mp, mq = statistics.fmean(p), statistics.fmean(q)
    cov = statistics.fmean((a - mp) * (b - mq) for a, b in zip(p, q, strict=True))
    return mp, mq, statistics.pvariance(p), statistics.pvariance(q), cov


def straggler(
    per_patch_s: float,
    per_pair_s: float,
    budget: int,
    min_patches: int,
    max_patches: int,
    dp: int,
    m: int,
) -> Straggler:
    """The straggler factor of ``dp`` replicas of ``m`` micro-batches each, a micro-batch
    costing ``per_patch_s x patches + per_pair_s x sum(s^2)`` (see the module)."""
    if budget <= 0:
        return Straggler(0.0, 0.0, 1.0)
    mp, mq, vp, vq, cov = moments(budget, min_patches, max_patches)
    a, b = per_patch_s, per_pair_s
    mu = a * mp + b * mq
    sigma = math.sqrt(max(0.0, a * a * vp + b * b * vq + 2 * a * b * cov))
    if mu <= 0:
        return Straggler(mu, sigma, 1.0)
    ratio = 1.0 + math.sqrt(m) * sigma * expected_max_z(dp) / (m * mu)
    return Straggler(mu, sigma, ratio)
