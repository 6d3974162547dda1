"""Test-suite wide: every test of the distributed/ and e2e/ tiers is marked `slow` (they spawn
processes; `scripts/test.sh --fast` leaves them out, docs/testing.md), and tests marked `gpu`
are skipped, with the reason, where CUDA is absent."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SLOW_TIERS = tuple(Path(__file__).parent / tier for tier in ("distributed", "e2e"))


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(item.path.is_relative_to(tier) for tier in SLOW_TIERS):
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
