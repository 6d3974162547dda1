"""training/optim.py's rules for a run's optimizer and communication overlap
(``--use-distributed-optimizer``, ``--overlap-*``, ``--tp-comm-overlap``, ``--ddp-bucket-size``):
what ``auto`` picks where, and the combinations that are one-line errors. The wiring itself
(DDP config, hooks, equal loss curves) is tests/distributed/test_overlap.py; the optimizer
checkpoints across kinds tests/distributed/test_optimizer_formats.py."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from megatron_navil.parallel.state import ParallelLayout
from megatron_navil.training.optim import (
    Overlap,
    expert_dp_size,
    resolve_overlap,
    use_distributed_optimizer,
)


def _groups(dp: int, **layout: int) -> SimpleNamespace:
    return SimpleNamespace(layout=ParallelLayout(**layout), dp_size=dp)


@pytest.mark.parametrize(
    ("dp", "layout", "expert_dp", "distributed"),
    [
        (1, dict(), 1, False),  # one process: the plain optimizer
        (1, dict(tp=2, pp=2), 1, False),
        (2, dict(), 2, True),
        (4, dict(ep=2), 2, True),  # DP 4, expert-DP 2
        (1, dict(tp=2, ep=2, etp=1), 1, False),  # EP carved from TP: expert-DP 1
        (1, dict(tp=4, ep=2, etp=1), 2, True),  # DP 1 but the experts have 2 replicas
        (2, dict(tp=2, ep=4, etp=1), 1, True),  # expert-DP 1 but DP 2
    ],
)
def test_auto_optimizer_is_distributed_when_any_replica_exists(dp, layout, expert_dp, distributed):
    groups = _groups(dp, **layout)
    assert expert_dp_size(groups) == expert_dp
    assert use_distributed_optimizer("auto", groups) is distributed
    assert use_distributed_optimizer("on", groups) is True
    assert use_distributed_optimizer("off", groups) is False
    with pytest.raises(ValueError, match="one of"):
        use_distributed_optimizer("yes", groups)


def _resolve(**kw) -> Overlap:
    base = dict(distributed_optimizer=True, vpp=None, cuda=False, te_available=False)
    return resolve_overlap(**{**base, **kw})


def test_auto_overlap_is_on_with_cuda_and_off_on_cpu():
    assert _resolve() == Overlap()
    assert _resolve(cuda=True, vpp=2) == Overlap(grad_reduce=True, param_gather=True, p2p=True)
    # each switch forced on on CPU
    assert _resolve(grad_reduce="on") == Overlap(grad_reduce=True)
    assert _resolve(grad_reduce="on", param_gather="on").param_gather
    assert _resolve(p2p="on", vpp=2).p2p
    # and off on CUDA
    assert _resolve(cuda=True, grad_reduce="off") == Overlap()  # param gather needs it
    assert not _resolve(cuda=True, vpp=2, p2p="off").p2p
    assert _resolve(grad_reduce="on", bucket_size=1000).bucket_size == 1000


def test_overlap_follows_what_it_needs():
    # param gather: only with the distributed optimizer (auto follows it)
    assert not _resolve(cuda=True, distributed_optimizer=False).param_gather
    assert _resolve(cuda=True, distributed_optimizer=False).grad_reduce
    # p2p overlap: only the interleaved schedule has it
    assert not _resolve(cuda=True, vpp=None).p2p
    assert not _resolve(p2p="on", vpp=1).p2p


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(tp_comm=True), "--tp-comm-overlap needs TransformerEngine"),
        (dict(param_gather="on", distributed_optimizer=False), "needs the distributed optimizer"),
        (dict(param_gather="on"), "needs --overlap-grad-reduce"),
        (dict(grad_reduce="maybe"), "must be one of"),
        (dict(grad_reduce="on", bucket_size=0), "--ddp-bucket-size must be >= 1"),
    ],
)
def test_impossible_overlap_is_an_error(kw, message):
    with pytest.raises(ValueError, match=message):
        _resolve(**kw)


def test_tp_comm_overlap_passes_through_with_transformer_engine():
    assert _resolve(tp_comm=True, te_available=True).tp_comm
