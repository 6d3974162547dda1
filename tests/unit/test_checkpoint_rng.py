"""checkpoint/store.py: the RNG state we write is plain tensors and numbers, loaded with
``weights_only=True``; a file carrying a pickled object (a planted payload) is refused without
running it."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from megatron_navil.checkpoint.errors import CheckpointError
from megatron_navil.checkpoint.store import _load_rng, _rng_state, _set_rng_state


def _draws() -> tuple:
    return (torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)],
            random.gauss(0, 1), np.random.randn())  # fmt: skip


def test_rng_state_round_trips_without_pickle(tmp_path):
    torch.manual_seed(5), np.random.seed(6), random.seed(7)
    random.gauss(0, 1)  # leaves a cached gauss value in Python's state
    np.random.randn()  # and in numpy's
    path = tmp_path / "rank_00000.pt"
    torch.save(_rng_state(), path)
    want = _draws()
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    _set_rng_state(_load_rng(path))  # weights_only=True inside
    assert _draws() == want


class _Payload:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # what a malicious checkpoint would carry
        return (open, (self.marker, "w"))


def test_a_pickled_object_in_our_files_is_refused_unrun(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "rank_00000.pt"
    torch.save({"torch": torch.get_rng_state(), "payload": _Payload(str(marker))}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle it"):
        _load_rng(path)
    assert not marker.exists()
