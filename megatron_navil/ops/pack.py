"""Sequence pack planner: which samples go into which packed sequence.

Layouts (``n`` samples, ``m`` placed, ``S`` sequences; all arrays int64, read-only):
  llm_tokens       [n] each sample's LLM tokens: text + its image blocks
                   (``image_token_layout``), at least 1
  patches          [n] each sample's vision-encoder patches over all its images and scales,
                   0 for text-only samples
  seq_offsets      [S + 1] CSR offsets into ``sample_ids``: ``0, ..., m``
  sample_ids       [m] sequence ``j`` holds ``sample_ids[seq_offsets[j]:seq_offsets[j + 1]]``,
                   ascending original index inside a sequence
  tokens_per_seq   [S] LLM tokens of each sequence (<= ``seq_length``)
  patches_per_seq  [S] patches of each sequence (<= ``max_patches``)
  skipped          [k] ascending indices of samples larger than a whole sequence
                   (``oversize="skip"`` only)

Why: the data pipeline packs several samples into each training sequence of ``seq_length``
LLM tokens, and the vision encoder's memory bounds the patches per sequence too. The plan is
made from the metadata alone (token and patch counts from the index), before any image is
decoded, and must be the same on every data-parallel rank and every machine.

Policy: first-fit decreasing (FFD) over two budgets. Samples are taken by ``llm_tokens``
descending, then ``patches`` descending, then index ascending (a strict total order: ties are
deterministic); each goes into the lowest-numbered sequence with room for both its tokens and
its patches, or opens a new one. Sequences are numbered in the order they are opened (by their
first sample in that order). FFD uses at most 11/9 OPT + 6/9 bins in one dimension and, with
the many small samples of real corpora, comes within a fraction of a percent of the
``ceil(sum(tokens) / seq_length)`` lower bound (tests/unit/test_ops_pack.py and
benchmarks/bench_pack.py report it). Measured on 20k samples of
``megatron_navil.testing.pack_data`` (seq_length 16384): with 65536 patches FFD reaches the
lower bound (2437 sequences, 0.02% padding; first fit in input order 0.11%, next fit 13.5%);
with a tight 16384-patch budget FFD needs 3955 sequences. Under the earlier image rule (other
scale counts) best-fit decreasing did no better: both at the lower bound (2372), and 3940
sequences to FFD's 3938 with 16384 patches. So first fit, which is also simpler, is the
policy. Integer arithmetic only, no hashing, one thread: deterministic everywhere.

``plan_packing`` runs the compiled ``megatron_navil._C`` (csrc/pack.cpp: a max tree over the
sequences' remaining room, O(n log n) in practice, for millions of samples) when built and the
pure-Python ``plan_packing_reference`` (a linear scan over the open sequences per sample)
otherwise; the plans are identical. Inputs are validated here, before either path runs, so both
raise the same ValueError messages.
"""

from __future__ import annotations

import hashlib
import itertools
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_navil.ops.grid import _C

INT64_MAX = 2**63 - 1
OVERSIZE_POLICIES = ("error", "skip")
CountsLike = Sequence[int] | np.ndarray | torch.Tensor

_OP = "plan_packing"


def _native():
    """The compiled module when it is built and has this op (a stale build may not)."""
    return _C if _C is not None and hasattr(_C, "plan_packing") else None


def _frozen(array: np.ndarray) -> np.ndarray:
    view = np.ascontiguousarray(array, dtype=np.int64).view()  # the caller's array stays writable
    view.setflags(write=False)
    return view


@dataclass(frozen=True, eq=False)
class PackPlan:
    """A pack plan in CSR form (see the module doc for the layouts).

    Compare plans with :meth:`equals` (or :meth:`digest` across processes); ``==`` is identity
    because the fields are arrays.
    """

    seq_offsets: np.ndarray
    """int64 [S + 1]: CSR offsets of each sequence's samples in ``sample_ids``."""
    sample_ids: np.ndarray
    """int64 [m]: placed sample indices, grouped by sequence, ascending inside a sequence."""
    tokens_per_seq: np.ndarray
    """int64 [S]: LLM tokens of each sequence."""
    patches_per_seq: np.ndarray
    """int64 [S]: vision-encoder patches of each sequence."""
    skipped: np.ndarray
    """int64 [k]: ascending indices of samples left out as larger than a whole sequence."""
    seq_length: int
    """LLM-token budget of every sequence."""
    max_patches: int | None
    """Patch budget of every sequence (None: no limit)."""
    max_cost: int | None = None
    """Cost budget of every sequence (None: none)."""

    def __post_init__(self) -> None:
        for name in ("seq_offsets", "sample_ids", "tokens_per_seq", "patches_per_seq", "skipped"):
            object.__setattr__(self, name, _frozen(getattr(self, name)))

    @property
    def num_seqs(self) -> int:
        """Number of packed sequences ``S``."""
        return len(self.seq_offsets) - 1

    @property
    def padding_fraction(self) -> float:
        """``1 - placed tokens / (num_seqs * seq_length)``: the share of padding tokens (0.0
        for an empty plan). Exact integer sums, one rounding in the division."""
        if self.num_seqs == 0:
            return 0.0
        placed = int(np.sum(self.tokens_per_seq, dtype=object))  # Python ints: cannot overflow
        return 1.0 - placed / (self.num_seqs * self.seq_length)

    def sequence(self, j: int) -> np.ndarray:
        """Sample indices of sequence ``j`` (ascending), a view into ``sample_ids``."""
        j = operator.index(j)
        if not 0 <= j < self.num_seqs:
            raise IndexError(f"PackPlan.sequence: {j} out of range for {self.num_seqs} sequences")
        return self.sample_ids[self.seq_offsets[j] : self.seq_offsets[j + 1]]

    def sequences(self) -> Iterator[np.ndarray]:
        """Each sequence's sample indices, in sequence order."""
        offsets = self.seq_offsets.tolist()
        for start, stop in itertools.pairwise(offsets):
            yield self.sample_ids[start:stop]

    def __iter__(self) -> Iterator[np.ndarray]:
        return self.sequences()

    def __len__(self) -> int:
        return self.num_seqs

    def equals(self, other: PackPlan) -> bool:
        """Whether ``other`` is the same plan (same budgets and the same arrays)."""
        return (
            self.seq_length == other.seq_length
            and self.max_patches == other.max_patches
            and self.max_cost == other.max_cost
            and all(
                np.array_equal(getattr(self, name), getattr(other, name)) for name in _ARRAY_FIELDS
            )
        )

    def digest(self) -> str:
        """sha256 hex digest of the budgets and arrays (little-endian int64): equal for equal
        plans on any machine or process, e.g. to check all data-parallel ranks agree."""
        h = hashlib.sha256()
        h.update(f"{self.seq_length},{self.max_patches}".encode())
        if self.max_cost is not None:  # (plans without one keep their earlier digests)
            h.update(f",cost={self.max_cost}".encode())
        for name in _ARRAY_FIELDS:
            array = getattr(self, name)
            h.update(f";{name}:{len(array)};".encode())
            h.update(array.astype("<i8").tobytes())
        return h.hexdigest()


_ARRAY_FIELDS = ("seq_offsets", "sample_ids", "tokens_per_seq", "patches_per_seq", "skipped")


# ----------------------------------------------------------------------------- validation


def _counts(name: str, values: CountsLike) -> np.ndarray:
    """``values`` as a 1-D int64 numpy array; ValueError for anything else."""
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.is_floating_point() or values.is_complex():
            raise ValueError(f"{_OP}: {name} must be integers, got dtype {values.dtype}")
        array = values.detach().cpu().numpy()
    else:
        array = np.asarray(values)
        if array.size == 0 and not isinstance(values, np.ndarray):
            array = array.astype(np.int64)  # [] is float64 to numpy
    if array.ndim != 1:
        raise ValueError(f"{_OP}: {name} must be 1-D, got shape {tuple(array.shape)}")
    if array.dtype == np.bool_ or array.dtype.kind not in "iu":
        raise ValueError(
            f"{_OP}: {name} must be integers that fit in int64, got dtype {array.dtype}"
        )
    if array.dtype.kind == "u" and array.size and int(array.max()) > INT64_MAX:
        raise ValueError(f"{_OP}: {name} must fit in int64, got {int(array.max())}")
    return np.ascontiguousarray(array, dtype=np.int64)


def _budget(name: str, value: object, allow_none: bool) -> int | None:
    if value is None and allow_none:
        return None
    what = "a positive integer or None" if allow_none else "a positive integer"
    as_int = None if isinstance(value, bool) else _index(value)
    if as_int is None or not 1 <= as_int <= INT64_MAX:
        shown = value if as_int is None else as_int
        raise ValueError(f"{_OP}: {name} must be {what}, got {shown!r}")
    return as_int


def _index(value: object) -> int | None:
    try:
        return operator.index(value)
    except TypeError:
        return None


def _validate(
    llm_tokens: CountsLike,
    patches: CountsLike,
    seq_length: int,
    max_patches: int | None,
    oversize: str,
) -> tuple[np.ndarray, np.ndarray, int, int | None, bool]:
    """Checks shared by both paths, in csrc/pack.cpp's order, with its messages."""
    tokens = _counts("llm_tokens", llm_tokens)
    patch_counts = _counts("patches", patches)
    if len(tokens) != len(patch_counts):
        raise ValueError(
            f"{_OP}: llm_tokens and patches must have the same length, "
            f"got {len(tokens)} and {len(patch_counts)}"
        )
    if not isinstance(oversize, str) or oversize not in OVERSIZE_POLICIES:
        raise ValueError(f"{_OP}: oversize must be 'error' or 'skip', got {oversize!r}")
    seq_length = _budget("seq_length", seq_length, allow_none=False)
    max_patches = _budget("max_patches", max_patches, allow_none=True)
    bad = np.flatnonzero(tokens < 1)
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{_OP}: llm_tokens[{i}] = {tokens[i]}: every sample needs at least 1 LLM token"
        )
    bad = np.flatnonzero(patch_counts < 0)
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{_OP}: patches[{i}] = {patch_counts[i]} is negative")
    skip = oversize == "skip"
    if not skip:
        limit = INT64_MAX if max_patches is None else max_patches
        bad = np.flatnonzero((tokens > seq_length) | (patch_counts > limit))
        if bad.size:
            i = int(bad[0])
            raise ValueError(
                f"{_OP}: sample {i} does not fit in one sequence (llm_tokens={tokens[i]}, "
                f"patches={patch_counts[i]}; seq_length={seq_length}, "
                f"max_patches={max_patches}); pass oversize='skip' to leave such samples out"
            )
    return tokens, patch_counts, seq_length, max_patches, skip


# ----------------------------------------------------------------------------- reference


def _plan_reference(
    tokens: np.ndarray,
    patches: np.ndarray,
    seq_length: int,
    max_patches: int | None,
    costs: np.ndarray | None = None,
    max_cost: int | None = None,
) -> PackPlan:
    limit = INT64_MAX if max_patches is None else max_patches
    fits_empty = (tokens <= seq_length) & (patches <= limit)
    skipped = np.flatnonzero(~fits_empty)
    placed = np.flatnonzero(fits_empty)
    # lexsort: last key is primary. Tokens desc, patches desc, index asc (a total order).
    order = placed[np.lexsort((placed, -patches[placed], -tokens[placed]))]
    m = len(order)
    # Bin b's remaining room; slot `opened` is the next, still empty bin, so a scan over
    # [0, opened] always finds a fit (every placed sample fits an empty bin).
    room_tokens = np.full(m + 1, seq_length, dtype=np.int64)
    room_patches = np.full(m + 1, limit, dtype=np.int64)
    room_cost = np.full(m + 1, INT64_MAX if max_cost is None else max_cost, dtype=np.int64)
    cost_of = np.zeros(len(tokens), np.int64) if costs is None else costs
    bin_of = np.full(len(tokens), -1, dtype=np.int64)
    opened = 0
    for i in order.tolist():
        t, p, c = int(tokens[i]), int(patches[i]), int(cost_of[i])
        ok = (room_tokens[: opened + 1] >= t) & (room_patches[: opened + 1] >= p)
        ok &= room_cost[: opened + 1] >= c
        b = int(np.argmax(ok))  # the first True
        room_tokens[b] -= t
        room_patches[b] -= p
        room_cost[b] -= c
        bin_of[i] = b
        opened = max(opened, b + 1)
    ids = [[] for _ in range(opened)]
    for i in placed.tolist():  # ascending: each sequence's samples stay ascending
        ids[int(bin_of[i])].append(i)
    counts = np.array([len(s) for s in ids], dtype=np.int64)
    flat = np.array([i for s in ids for i in s], dtype=np.int64)
    return PackPlan(
        seq_offsets=np.concatenate([[0], np.cumsum(counts)]),
        sample_ids=flat,
        tokens_per_seq=np.array([int(tokens[s].sum()) for s in ids], dtype=np.int64),
        patches_per_seq=np.array([int(patches[s].sum()) for s in ids], dtype=np.int64),
        skipped=skipped,
        seq_length=seq_length,
        max_patches=max_patches,
        max_cost=max_cost,
    )


def plan_packing_reference(
    llm_tokens: CountsLike,
    patches: CountsLike,
    seq_length: int,
    max_patches: int | None = None,
    oversize: str = "error",
    costs: CountsLike | None = None,
    max_cost: int | None = None,
) -> PackPlan:
    """Pure-Python/numpy reference of :func:`plan_packing`: the same policy with a linear scan
    over the open sequences per sample (O(n * S); fine for tests with thousands of samples)."""
    tokens, patch_counts, seq_length, max_patches, _ = _validate(
        llm_tokens, patches, seq_length, max_patches, oversize
    )
    cost, max_cost = _cost_budget(costs, max_cost, len(tokens))
    return _plan_reference(tokens, patch_counts, seq_length, max_patches, cost, max_cost)


def _cost_budget(
    costs: CountsLike | None, max_cost: int | None, n: int
) -> tuple[np.ndarray | None, int | None]:
    """The third budget: ``costs`` clamped to ``max_cost`` (a sample costlier than a whole
    sequence then fills one alone: it is never skipped for its cost), or ``(None, None)``."""
    if costs is None and max_cost is None:
        return None, None
    if costs is None or max_cost is None:
        raise ValueError(f"{_OP}: costs and max_cost go together (got only one of them)")
    array = _counts("costs", costs)
    if len(array) != n:
        raise ValueError(f"{_OP}: costs must have one entry per sample, got {len(array)} for {n}")
    max_cost = _budget("max_cost", max_cost, allow_none=False)
    bad = np.flatnonzero(array < 0)
    if bad.size:
        raise ValueError(f"{_OP}: costs[{int(bad[0])}] = {array[int(bad[0])]} is negative")
    return np.minimum(array, max_cost), max_cost


# ----------------------------------------------------------------------------- public op


def plan_packing(
    llm_tokens: CountsLike,
    patches: CountsLike,
    seq_length: int,
    max_patches: int | None = None,
    oversize: str = "error",
    costs: CountsLike | None = None,
    max_cost: int | None = None,
) -> PackPlan:
    """Assign samples to packed sequences by first-fit decreasing over two budgets (three with
    a cost budget).

    Every sequence gets at most ``seq_length`` LLM tokens and at most ``max_patches``
    vision-encoder patches (``None``: no patch limit). ``llm_tokens`` and ``patches`` are
    per-sample counts (lists, numpy arrays or torch tensors of integers, same length). The
    plan is deterministic: the same counts and budgets give the same plan on every machine and
    in every process. Example: ``plan_packing([5, 3, 4, 2], [0, 0, 0, 0], 8)`` has sequences
    ``[0, 1]`` and ``[2, 3]`` (padding fraction 0.125).

    Samples larger than a whole sequence (``llm_tokens > seq_length`` or
    ``patches > max_patches``) raise with ``oversize="error"`` (the default) and are left out
    and listed in ``PackPlan.skipped`` with ``oversize="skip"``.

    ``costs`` (per-sample non-negative integers, e.g. the compute a sample costs) and
    ``max_cost`` add a third budget: a sequence's samples cost at most ``max_cost`` together.
    A sample costing more than ``max_cost`` counts as ``max_cost`` (it fills a sequence alone,
    it is not skipped). The order samples are taken in does not change.

    Raises:
        ValueError: counts not 1-D integer arrays fitting int64, or of different lengths; a
            sample with fewer than 1 token or negative patches; ``seq_length`` /
            ``max_patches`` not a positive integer (``max_patches`` may be None); ``oversize``
            not "error" / "skip"; with "error", the first sample larger than a sequence.
    """
    tokens, patch_counts, seq_length, max_patches, skip = _validate(
        llm_tokens, patches, seq_length, max_patches, oversize
    )
    cost, max_cost = _cost_budget(costs, max_cost, len(tokens))
    native = _native()
    if native is None:
        return _plan_reference(tokens, patch_counts, seq_length, max_patches, cost, max_cost)
    extra = {} if cost is None else {"costs": torch.from_numpy(cost), "max_cost": max_cost}
    offsets, ids, tok, pat, skipped = native.plan_packing(
        torch.from_numpy(tokens),
        torch.from_numpy(patch_counts),
        seq_length,
        max_patches,
        "skip" if skip else "error",
        **extra,
    )
    return PackPlan(
        seq_offsets=offsets.numpy(),
        sample_ids=ids.numpy(),
        tokens_per_seq=tok.numpy(),
        patches_per_seq=pat.numpy(),
        skipped=skipped.numpy(),
        seq_length=seq_length,
        max_patches=max_patches,
        max_cost=max_cost,
    )
