"""Process groups (nccl on GPU, gloo on CPU) and the CPU compatibility shim for megatron-core."""

from megatron_navil.parallel.groups import ParallelGroups, current_groups, vision_groups
from megatron_navil.parallel.state import ParallelLayout, destroy, initialize, launch_env

__all__ = [
    "ParallelGroups",
    "ParallelLayout",
    "current_groups",
    "destroy",
    "initialize",
    "launch_env",
    "vision_groups",
]
