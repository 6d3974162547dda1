"""Process groups (nccl on GPU, gloo on CPU) and the CPU compatibility shim for megatron-core."""

from megatron_navil.parallel.state import ParallelLayout, destroy, initialize, launch_env

__all__ = ["ParallelLayout", "destroy", "initialize", "launch_env"]
