"""The context-parallel split (``parallel.context``): which rows each CP rank holds, and the
one-line refusal when a packed length does not split."""

from __future__ import annotations

import re

import pytest
import torch

from megatron_navil.parallel.context import local_chunks, local_token_index, split_problem


@pytest.mark.parametrize("cp", [1, 2, 3, 4])
def test_ranks_tile_the_sequence_with_balanced_chunks(cp):
    t = 48
    rows = [local_token_index(t, cp, r) for r in range(cp)]
    assert sorted(torch.cat(rows).tolist()) == list(range(t))  # every token exactly once
    chunk = t // (2 * cp)
    for r, index in enumerate(rows):
        if cp > 1:  # chunks r and 2cp-1-r: causal work balanced (first + last chunk)
            expected = [*range(r * chunk, (r + 1) * chunk)]
            expected += range((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk)
            assert index.tolist() == expected
            assert local_chunks(t, cp, r) == [
                (r * chunk, (r + 1) * chunk),
                ((2 * cp - 1 - r) * chunk, (2 * cp - r) * chunk),
            ]


def test_cp2_rank0_holds_first_and_last_quarter():
    assert local_token_index(8, 2, 0).tolist() == [0, 1, 6, 7]
    assert local_token_index(8, 2, 1).tolist() == [2, 3, 4, 5]


@pytest.mark.parametrize(
    ("t", "cp", "tp", "match"),
    [
        (130, 2, 1, "does not split into 2\\*cp=4 equal chunks"),
        (96, 4, 1, None),
        (100, 3, 1, "2\\*cp=6"),
        (24, 2, 8, "not a multiple of TP=8"),
        (10, 1, 4, "not a multiple of TP=4"),
    ],
)
def test_split_problem(t, cp, tp, match):
    problem = split_problem(t, cp, tp)
    if match is None:
        assert problem is None
    else:
        assert problem is not None and "\n" not in problem
        assert re.search(match, problem)
        if tp == 1:  # the split itself refuses with the same line
            with pytest.raises(ValueError, match=match):
                local_token_index(t, cp, 0)
