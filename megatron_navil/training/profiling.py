"""Profiling training steps (``--profile-steps A:B``, ``--nvtx``): a torch.profiler trace of
steps A..B, or NVTX ranges for Nsight Systems, with named ranges for the phases of a step.

The ranges, all ``torch.profiler.record_function`` (which ``emit_nvtx`` turns into NVTX):

- ``step N`` around each step of the loop, and inside it ``data`` (this rank's micro-batches),
  ``evaluate`` and ``checkpoint`` (the loop, ``training.loop``), ``optimizer`` (the update,
  ``training.step``);
- megatron-core's own phase names, which its pipeline schedules and optimizer report through
  ``config.timers`` (set to :class:`RangeTimers` while profiling): ``forward-backward``
  (the schedule), ``forward-compute`` / ``backward-compute`` (each micro-batch's forward
  through vision and LLM, and its backward), the pipeline's ``forward-send``,
  ``backward-recv``, ..., the optimizer's ``optimizer-inner-step``, ...;
- ``vision``: the vision encoder's forward (module hooks on every ``vision_model``; its
  backward is inside ``backward-compute``).

No range touches the model's maths: they wrap calls, and are installed only while profiling.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

_SPEC = re.compile(r"\s*(\d+)\s*:\s*(\d+)\s*")


def parse_profile_steps(spec: str | None) -> tuple[int, int] | None:
    """``"A:B"`` -> ``(A, B)``, the first and last profiled step (1-based, inclusive); None for
    None. ValueError (one line) for anything but two step numbers with 1 <= A <= B."""
    if spec is None:
        return None
    match = _SPEC.fullmatch(spec)
    if match is None:
        raise ValueError(f"--profile-steps {spec!r}: expected A:B, two step numbers (e.g. 5:7)")
    first, last = int(match.group(1)), int(match.group(2))
    if first < 1:
        raise ValueError(f"--profile-steps {spec}: steps count from 1")
    if last < first:
        raise ValueError(f"--profile-steps {spec}: the last step {last} is before the first")
    return first, last


def check_profile_args(spec: str | None, nvtx: bool, log_dir: str | None, cuda: bool) -> None:
    """The profiling options of ``train`` checked before any process group: a valid
    ``--profile-steps``, a ``--log-dir`` for its trace, ``--nvtx`` only with a GPU.
    ValueError (one line) otherwise."""
    steps = parse_profile_steps(spec)
    if nvtx and not cuda:
        raise ValueError(
            "--nvtx needs a GPU (NVTX ranges are for Nsight Systems); on CPU use "
            "--profile-steps for a torch.profiler trace"
        )
    if steps is not None and not nvtx and not log_dir:
        raise ValueError("--profile-steps writes its trace under --log-dir: give --log-dir")


class _Range:
    """One named range opened and closed by separate calls (a megatron-core timer's
    ``start``/``stop``, a module's pre- and post-forward hooks)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._open: list[Any] = []

    def start(self, barrier: bool = False) -> None:
        rf = torch.profiler.record_function(self.name)
        rf.__enter__()
        self._open.append(rf)

    def stop(self, barrier: bool = False) -> None:
        if self._open:
            self._open.pop().__exit__(None, None, None)


class RangeTimers:
    """megatron-core's ``config.timers`` interface (``timers(name, log_level).start()`` /
    ``.stop()``, as ``megatron.core.timers.Timers``) turning each timer into a profiler range
    of that name; nothing is timed."""

    def __init__(self) -> None:
        self._ranges: dict[str, _Range] = {}

    def __call__(self, name: str, log_level: int | None = None) -> _Range:
        return self._ranges.setdefault(name, _Range(name))


class StepProfiler:
    """Profiles the steps ``steps = (A, B)`` of a run (the first of them this run reaches,
    when it resumes inside the window, to B): a torch.profiler trace exported to
    ``out_dir/rank<R>.steps<A>-<B>.pt.trace.json`` (Chrome trace format, which TensorBoard's
    profiler plugin reads), or with ``nvtx`` NVTX ranges between ``cudaProfilerStart`` and
    ``cudaProfilerStop`` (``steps`` None: the whole run). Inactive (every method a no-op)
    when neither is asked for."""

    def __init__(
        self,
        chunks: list[Any],
        optimizer: Any,
        steps: tuple[int, int] | None,
        out_dir: str | Path | None,
        nvtx: bool = False,
    ) -> None:
        self.chunks, self.optimizer, self.out_dir, self.nvtx = chunks, optimizer, out_dir, nvtx
        if steps is None and nvtx:
            steps = (1, 2**62)
        self.steps = steps
        self.trace: Path | None = None  # the trace file once written
        self._session: Any = None
        self._undo: list[Any] = []

    @property
    def active(self) -> bool:
        """Whether the current step is profiled."""
        return self._session is not None

    def range(self, name: str) -> contextlib.AbstractContextManager:
        """A named range while profiling, else nothing."""
        return torch.profiler.record_function(name) if self.active else contextlib.nullcontext()

    @contextlib.contextmanager
    def step(self, step: int) -> Iterator[None]:
        """Around the loop's step ``step``: starts profiling at the window's first step,
        ranges it ``step N``, stops after the window's last."""
        if self.steps is not None and not self.active and self.steps[0] <= step <= self.steps[1]:
            self._start(step)
        with self.range(f"step {step}"):
            yield
        self._last = step
        if self.active and step >= self.steps[1]:
            self.stop()

    def _start(self, step: int) -> None:
        from megatron.core.utils import get_model_config

        config = get_model_config(self.chunks[0])
        optimizers = getattr(self.optimizer, "chained_optimizers", [self.optimizer])
        configs = [config] + [o.config for o in optimizers if getattr(o, "config", None)]
        timers = RangeTimers()
        for c in configs:
            self._undo.append(lambda c=c, old=c.timers: setattr(c, "timers", old))
            c.timers = timers
        vision = _Range("vision")
        for chunk in self.chunks:
            for name, module in chunk.named_modules():
                if name.split(".")[-1] == "vision_model":
                    pre = module.register_forward_pre_hook(lambda m, a: vision.start())
                    post = module.register_forward_hook(lambda m, a, o: vision.stop())
                    self._undo += [pre.remove, post.remove]
        if self.nvtx:
            torch.cuda.profiler.start()
            self._session = torch.autograd.profiler.emit_nvtx()
        else:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._session = torch.profiler.profile(activities=activities)
        self._session.__enter__()
        self._first = self._last = step

    def stop(self) -> None:
        """End profiling (after the window, or when the run ends inside it) and write the
        trace: the steps profiled so far."""
        if not self.active:
            return
        session, self._session = self._session, None
        session.__exit__(None, None, None)
        if self.nvtx:
            torch.cuda.profiler.stop()
        else:
            out = Path(self.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
            self.trace = out / f"rank{rank}.steps{self._first}-{self._last}.pt.trace.json"
            session.export_chrome_trace(str(self.trace))
        while self._undo:
            self._undo.pop()()
