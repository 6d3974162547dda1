"""Process groups: torch.distributed from the launcher's environment, megatron-core's
model-parallel state (TP, PP, virtual PP, EP, expert-TP, CP, DP) and seeded RNG, in one call that
returns this rank's groups (:mod:`.groups`).

Launchers: torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or SLURM
(SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID; MASTER_ADDR/MASTER_PORT exported by the job script).
nccl when CUDA is available, gloo otherwise; on CPU the shim in :mod:`.cpu_shim` is applied.
"""

from __future__ import annotations

import atexit
import dataclasses
import datetime
import os
import random
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from megatron_navil.parallel import cpu_shim

if TYPE_CHECKING:
    from megatron_navil.parallel.groups import ParallelGroups


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, read from the launcher's environment."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def launch_env(environ: Mapping[str, str] | None = None) -> LaunchEnv:
    """Read rank/world size from torchrun's variables, else SLURM's, else a single process.

    Raises ValueError naming the variable when one is present but malformed, and when SLURM
    runs several tasks but MASTER_ADDR is not exported (every rank must agree on it).
    """
    env = os.environ if environ is None else environ

    def _int(name: str) -> int:
        try:
            return int(env[name])
        except ValueError:
            raise ValueError(
                f"environment variable {name}={env[name]!r} is not an integer"
            ) from None

    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world, local = (
            _int("RANK"),
            _int("WORLD_SIZE"),
            _int("LOCAL_RANK") if "LOCAL_RANK" in env else 0,
        )
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = _int("SLURM_PROCID"), _int("SLURM_NTASKS")
        local = _int("SLURM_LOCALID") if "SLURM_LOCALID" in env else 0
        if world > 1 and "MASTER_ADDR" not in env:
            raise ValueError(
                "SLURM launch with several tasks needs MASTER_ADDR (e.g. the first host of "
                "`scontrol show hostnames $SLURM_JOB_NODELIST`) exported by the job script"
            )
    else:
        rank, world, local = 0, 1, 0
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    port = _int("MASTER_PORT") if "MASTER_PORT" in env else 29500
    return LaunchEnv(rank, world, local, env.get("MASTER_ADDR", "127.0.0.1"), port)


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of every parallel dimension; data parallelism is what the world leaves over."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    vpp: int | None = None
    etp: int | None = None  # expert tensor parallel; None = same as tp
    cp: int = 1  # context parallel: each packed sequence split over this many ranks

    def dp(self, world_size: int) -> int:
        """Data-parallel size for ``world_size`` ranks (without CP: the ranks that see
        different micro-batches); ValueError when it does not divide."""
        for name, value in (("tp", self.tp), ("pp", self.pp), ("ep", self.ep), ("cp", self.cp)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if self.vpp is not None and (self.vpp < 1 or (self.pp < 2 and self.vpp > 1)):
            raise ValueError(f"vpp={self.vpp} needs pp >= 2 (got pp={self.pp})")
        model = self.tp * self.pp * self.cp
        if world_size % model:
            what = "tp*pp*cp" if self.cp > 1 else "tp*pp"
            raise ValueError(f"world size {world_size} is not divisible by {what}={model}")
        dp = world_size // model
        etp = self.etp or self.tp
        if world_size % (etp * self.ep * self.pp):
            raise ValueError(
                f"world size {world_size} is not divisible by etp*ep*pp={etp * self.ep * self.pp}"
            )
        return dp


def initialize(
    tp: int = 1,
    pp: int = 1,
    ep: int = 1,
    vpp: int | None = None,
    etp: int | None = None,
    cp: int = 1,
    *,
    seed: int = 1234,
    backend: str | None = None,
    timeout_minutes: int = 10,
    shim_disable: Iterable[str] = (),
) -> ParallelGroups:
    """Initialise torch.distributed (if not yet) and megatron-core's parallel state; returns
    this rank's :class:`~megatron_navil.parallel.groups.ParallelGroups` (what the model and
    the training step take). ``cp``: context parallelism (megatron-core's context-parallel
    groups, so its DDP and distributed optimizer reduce over DP x CP; the split of each
    sequence is ours: ``models.context_parallel``).

    Re-callable: an existing model-parallel state is destroyed first, so one process group can
    try several layouts in a row (the distributed tests do). Seeds Python, numpy, torch and
    megatron's model-parallel RNG tracker (TP ranks differ where megatron wants them to).
    """
    from megatron.core import parallel_state, tensor_parallel

    cuda = torch.cuda.is_available()
    cpu_shim.apply(disable=shim_disable, cuda=cuda)
    layout = ParallelLayout(tp, pp, ep, vpp, etp, cp)

    if not torch.distributed.is_initialized():
        env = launch_env()
        os.environ.setdefault("MASTER_ADDR", env.master_addr)
        os.environ.setdefault("MASTER_PORT", str(env.master_port))
        if cuda:
            torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
        torch.distributed.init_process_group(
            backend=backend or ("nccl" if cuda else "gloo"),
            rank=env.rank,
            world_size=env.world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
        )
        # A process that exits with its groups alive lets gloo's worker threads outlive the
        # interpreter: a rank can abort at exit ("terminate called without an active
        # exception", pytorch/pytorch#190489) after a run that succeeded. Tear down while
        # Python is still whole; a no-op where the caller already did.
        atexit.unregister(destroy)  # once, however often groups are created and torn down
        atexit.register(destroy)
    layout.dp(torch.distributed.get_world_size())  # validate before megatron asserts

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        virtual_pipeline_model_parallel_size=vpp,
        expert_model_parallel_size=ep,
        expert_tensor_parallel_size=etp,
        context_parallel_size=cp,
        distributed_timeout_minutes=timeout_minutes,
    )
    seed_everything(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    from megatron_navil.parallel.groups import current_groups

    return dataclasses.replace(current_groups(), layout=layout)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's default generators (all ranks alike)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def destroy() -> None:
    """Tear down megatron's parallel state and the default process group (for tests)."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
