"""Blending several datasets by weight into one deterministic, epoch-aware sample order.

Layouts: a *draw* is ``(dataset, sample)``: ``dataset`` indexes the blend's datasets,
``sample`` is a sample index inside that dataset (``ShardDataset`` global index). Arrays are
int64.

Algorithm (all integer arithmetic; a function of ``seed`` and the dataset sizes only):

1. Per blended epoch, ``N = samples_per_epoch`` draws (default: the sum of the dataset sizes).
   Dataset ``i`` gets ``c_i`` of them, the largest-remainder apportionment of ``N`` by the
   normalised weights (ties to the lower index): ``sum(c_i) == N`` and ``|c_i - w_i N| < 1``.
   Without weights, ``c_i = len(dataset i)``: every sample exactly once per epoch.
2. Dataset ``i``'s draws form an endless stream over its *own* epochs: its ``J``-th draw
   overall is ``perm_i(J // len_i)[J % len_i]``, where ``perm_i(k)`` is a seeded permutation
   (numpy PCG64 seeded with ``(seed, i, k)``). Blended epoch ``e`` takes draws
   ``[e * c_i, (e + 1) * c_i)`` of that stream, so an up-weighted small dataset cycles through
   fresh permutations and a down-weighted large one continues where the last epoch stopped.
3. Exact proportional interleave by windows: the epoch's positions ``[0, N)`` are cut into
   windows of ``W`` positions; window ``w`` (positions ``[p0, p1)``) holds dataset ``i``'s
   epoch-local draws ``[floor(c_i p0 / N), floor(c_i p1 / N))``. So every window holds each
   dataset in proportion to its weight, to within one sample (window sizes may differ from
   ``W`` by fewer than the number of datasets), and the windows of an epoch tile all draws.
4. Inside a window the draws are shuffled (PCG64 seeded with ``(seed, epoch, w)``): the
   epoch's sample order is a stratified seeded shuffle (for one dataset, a plain permutation
   cut into windows).

Everything is computed per window on demand: memory is one permutation per dataset (cached,
the two most recent dataset epochs) plus one window. numpy's ``Generator.permutation`` /
``shuffle`` streams have been stable across numpy releases; the state is checked against a
fingerprint on resume (see :mod:`megatron_navil.data.sampler`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

_PERM_TAG = 0x9E3779B1  # distinguishes the RNG streams of permutations and window shuffles
_WINDOW_TAG = 0x7F4A7C15


def apportion(total: int, weights: Sequence[float]) -> list[int]:
    """Largest-remainder split of ``total`` by ``weights`` (ties: lower index first).

    Example: ``apportion(10, [1, 1, 1]) == [4, 3, 3]``.

    Raises:
        ValueError: a weight negative or not finite, all weights zero, ``total < 0``.
    """
    w = [float(x) for x in weights]
    if not w or any(not np.isfinite(x) or x < 0 for x in w) or sum(w) <= 0:
        raise ValueError(f"blend weights must be finite, >= 0 and not all 0, got {weights!r}")
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    s = sum(w)
    exact = [total * x / s for x in w]
    counts = [int(np.floor(x)) for x in exact]
    rest = total - sum(counts)
    order = sorted(range(len(w)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[:rest]:
        counts[i] += 1
    return counts


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([int(k) for k in key])))


class Blend:
    """A blended, epoch-aware sample order over datasets of the given sizes (module doc).

    Args:
        sizes: number of samples of each dataset (each >= 1).
        weights: relative weight of each dataset (None: proportional to ``sizes`` with
            ``c_i = sizes[i]`` exactly).
        seed: the order's seed.
        samples_per_epoch: draws per blended epoch ``N`` (default ``sum(sizes)``).
    """

    def __init__(
        self,
        sizes: Sequence[int],
        weights: Sequence[float] | None = None,
        seed: int = 0,
        samples_per_epoch: int | None = None,
    ):
        self.sizes = [int(n) for n in sizes]
        if not self.sizes or any(n < 1 for n in self.sizes):
            raise ValueError(f"Blend: every dataset needs at least 1 sample, got {self.sizes}")
        if weights is not None and len(weights) != len(self.sizes):
            raise ValueError(
                f"Blend: {len(weights)} weights for {len(self.sizes)} datasets: {weights!r}"
            )
        self.seed = int(seed)
        if self.seed < 0:
            raise ValueError(f"Blend: seed must be >= 0, got {seed}")
        n = sum(self.sizes) if samples_per_epoch is None else int(samples_per_epoch)
        if n < 1:
            raise ValueError(f"Blend: samples_per_epoch must be >= 1, got {samples_per_epoch}")
        self.samples_per_epoch = n
        if weights is None:
            if samples_per_epoch is not None and n != sum(self.sizes):
                self.counts = apportion(n, self.sizes)
            else:
                self.counts = list(self.sizes)
            self.weights = [c / n for c in self.counts]
        else:
            self.counts = apportion(n, weights)
            total = sum(float(x) for x in weights)
            self.weights = [float(x) / total for x in weights]
        self._perms: dict[tuple[int, int], np.ndarray] = {}

    @property
    def num_datasets(self) -> int:
        return len(self.sizes)

    def num_windows(self, window: int) -> int:
        """Windows of ``window`` positions per epoch."""
        return -(-self.samples_per_epoch // int(window))

    def fingerprint(self) -> str:
        """sha256 of everything the order depends on (sizes, counts, seed)."""
        text = f"blend:v1;sizes={self.sizes};counts={self.counts};seed={self.seed}"
        return hashlib.sha256(text.encode()).hexdigest()

    def permutation(self, dataset: int, dataset_epoch: int) -> np.ndarray:
        """Dataset ``dataset``'s sample order in its own epoch ``dataset_epoch`` (int64)."""
        key = (int(dataset), int(dataset_epoch))
        perm = self._perms.get(key)
        if perm is None:
            perm = _rng(self.seed, key[0], key[1], _PERM_TAG).permutation(self.sizes[key[0]])
            perm = perm.astype(np.int64)
            perm.setflags(write=False)
            # keep the two most recent dataset epochs of each dataset
            stale = [k for k in self._perms if k[0] == key[0] and k[1] < key[1] - 1]
            for k in stale:
                del self._perms[k]
            self._perms[key] = perm
        return perm

    def draws(self, dataset: int, start: int, stop: int) -> np.ndarray:
        """Samples of dataset ``dataset``'s draws ``[start, stop)`` overall (int64)."""
        size = self.sizes[dataset]
        out = np.empty(max(0, stop - start), np.int64)
        pos = start
        while pos < stop:
            k, r = divmod(pos, size)
            take = min(stop - pos, size - r)
            out[pos - start : pos - start + take] = self.permutation(dataset, k)[r : r + take]
            pos += take
        return out

    def window(self, epoch: int, w: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        """``(dataset_ids, sample_ids)`` of window ``w`` of blended epoch ``epoch``, shuffled.

        Raises:
            IndexError: ``w`` outside ``[0, num_windows(window))``.
        """
        window = int(window)
        if window < 1:
            raise ValueError(f"Blend.window: window must be >= 1, got {window}")
        if not 0 <= w < self.num_windows(window) or epoch < 0:
            raise IndexError(f"Blend.window: window {w} of epoch {epoch} out of range")
        n = self.samples_per_epoch
        p0, p1 = w * window, min(n, (w + 1) * window)
        ds_parts, sample_parts = [], []
        for i, c in enumerate(self.counts):
            lo, hi = c * p0 // n, c * p1 // n
            if hi > lo:
                base = epoch * c
                sample_parts.append(self.draws(i, base + lo, base + hi))
                ds_parts.append(np.full(hi - lo, i, np.int64))
        if not ds_parts:
            return np.zeros(0, np.int64), np.zeros(0, np.int64)
        ds, samples = np.concatenate(ds_parts), np.concatenate(sample_parts)
        order = _rng(self.seed, epoch, w, _WINDOW_TAG).permutation(len(ds))
        return ds[order], samples[order]
