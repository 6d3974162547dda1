"""``parallel.initialize()`` returns this rank's groups (``ParallelGroups``): the same groups,
ranks and sizes megatron-core's parallel state holds, in every layout; ``vision_groups`` gives
the vision tower the LLM's TP group, or a group of one rank with TP as the replica group."""

from __future__ import annotations

import dataclasses
import warnings

import pytest

from megatron_navil.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed

LAYOUTS = [
    {},
    dict(tp=2),
    dict(pp=2, vpp=2),
    dict(tp=2, pp=2),
    dict(tp=2, ep=2, etp=1),
    dict(cp=2),
    dict(tp=2, cp=2),
]


def _check(layouts: list[dict]) -> list[str]:
    from megatron.core import parallel_state as ps

    from megatron_navil.parallel import ParallelLayout, current_groups, initialize, vision_groups

    warnings.filterwarnings("ignore")
    problems = []
    for layout in layouts:
        groups = initialize(**layout)
        want = dict(
            tp=ps.get_tensor_model_parallel_group(),
            pp=ps.get_pipeline_model_parallel_group(),
            dp=ps.get_data_parallel_group(),
            ep=ps.get_expert_model_parallel_group(),
            etp=ps.get_expert_tensor_parallel_group(),
            pp_rank=ps.get_pipeline_model_parallel_rank(),
            pp_size=ps.get_pipeline_model_parallel_world_size(),
            vpp_size=ps.get_virtual_pipeline_model_parallel_world_size() or 1,
            dp_rank=ps.get_data_parallel_rank(),
            dp_size=ps.get_data_parallel_world_size(),
            cp=ps.get_context_parallel_group(),
            cp_rank=ps.get_context_parallel_rank(),
            cp_size=ps.get_context_parallel_world_size(),
            dp_cp=ps.get_data_parallel_group(with_context_parallel=True),
            is_first_stage=ps.is_pipeline_first_stage(ignore_virtual=True),
            is_last_stage=ps.is_pipeline_last_stage(ignore_virtual=True),
            layout=ParallelLayout(**layout),
        )
        got = {k: getattr(groups, k) for k in want}
        got["is_first_stage"] = groups.is_first_stage()
        got["is_last_stage"] = groups.is_last_stage()
        for key in want:
            if got[key] is not want[key] and got[key] != want[key]:
                problems.append(f"{layout}: {key} {got[key]} != {want[key]}")
        if dataclasses.replace(current_groups(), layout=groups.layout) != groups:
            problems.append(f"{layout}: current_groups() differs from initialize()'s")
        if vision_groups(groups, True) != (groups.tp, None):
            problems.append(f"{layout}: a splitting vision tower does not get the TP group")
        mine, replicas = vision_groups(groups, False)
        if mine.size() != 1 or replicas is not groups.tp:
            problems.append(f"{layout}: a replicated tower gets {mine.size()} ranks, {replicas}")
    return problems


def test_initialize_returns_the_parallel_state_groups():
    for problems in run_distributed(_check, 4, LAYOUTS):
        assert problems == []
