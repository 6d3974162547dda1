"""Where a step's time goes, per rank: compute (megatron-core's ``forward-compute`` and
``backward-compute``, the schedules' own timer names, which exclude waiting for the pipeline
and for data-parallel reductions) and, inside it, the vision tower's forward and backward.

``StepClock`` installs a small timers object as ``mcore_config.timers`` (megatron-core's
schedules call ``config.timers(name).start()/.stop()`` around each micro-batch's forward and
backward) and hooks on every chunk's ``vision_model``: its forward (pre/post hooks) and its
backward, from the gradient reaching its output to the patch embedding's weight gradient being
accumulated (the last thing the vision backward computes). On a GPU the spans are CUDA events,
summed after the step (one synchronisation per step); on the CPU, ``perf_counter``. The loop
logs each rank's compute seconds as the spread over data-parallel ranks (slowest / mean: who
waits for whom) and rank 0's vision and LLM shares.
"""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

import torch

COMPUTE = ("forward-compute", "backward-compute")


class _Span:
    """A ``start``/``stop`` pair that accumulates into its clock under ``name``."""

    def __init__(self, clock: StepClock, name: str) -> None:
        self.clock, self.name = clock, name

    def start(self, barrier: bool = False) -> None:
        self.clock.open(self.name)

    def stop(self, barrier: bool = False) -> None:
        self.clock.close(self.name)


class StepClock:
    """Per-rank compute and vision time of each step (module doc)."""

    def __init__(self, chunks: list[Any], mcore_config: Any) -> None:
        self.cuda = torch.cuda.is_available()
        self.config = mcore_config
        self._old_timers = getattr(mcore_config, "timers", None)
        self._open: dict[str, Any] = {}
        self._spans: dict[str, list[Any]] = defaultdict(list)
        self._hooks: list[Any] = []
        mcore_config.timers = self
        for chunk in chunks:
            vision = _find(chunk, "vision_model")
            if vision is None:
                continue
            self._hooks.append(vision.register_forward_pre_hook(lambda *_: self.open("vfwd")))
            self._hooks.append(vision.register_forward_hook(self._after_vision_forward))
            first = _first_trainable(vision)
            if first is not None:
                hook = first.register_post_accumulate_grad_hook(lambda _: self.close("vbwd"))
                self._hooks.append(hook)

    def __call__(self, name: str, log_level: int | None = None) -> _Span:
        """megatron-core's ``Timers`` interface (``timers(name, log_level).start()``)."""
        return _Span(self, name)

    def _after_vision_forward(self, module: Any, args: Any, output: Any) -> None:
        self.close("vfwd")
        out = output[0] if isinstance(output, tuple) else output
        if isinstance(out, torch.Tensor) and out.requires_grad:
            out.register_hook(lambda grad: (self.open("vbwd"), grad)[1])

    def _now(self) -> Any:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            return event
        return time.perf_counter()

    def open(self, name: str) -> None:
        self._open[name] = self._now()

    def close(self, name: str) -> None:
        start = self._open.pop(name, None)
        if start is not None:
            self._spans[name].append((start, self._now()))

    def begin(self) -> None:
        """Forget what the previous step left (also spans a profiled step left open)."""
        self._open.clear()
        self._spans.clear()

    def end(self) -> dict[str, float]:
        """This rank's seconds of the step: ``compute`` (forward + backward compute),
        ``vision`` (its forward and backward), ``llm`` (the rest of the compute: LLM layers,
        embedding, connector, loss)."""
        if self.cuda:
            torch.cuda.synchronize()
        total = {name: sum(_seconds(a, b) for a, b in spans) for name, spans in self._spans.items()}
        compute = sum(total.get(name, 0.0) for name in COMPUTE)
        vision = total.get("vfwd", 0.0) + total.get("vbwd", 0.0)
        return {"compute": compute, "vision": vision, "llm": max(0.0, compute - vision)}

    def remove(self) -> None:
        """Uninstall the timers and hooks."""
        self.config.timers = self._old_timers
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def _seconds(a: Any, b: Any) -> float:
    if isinstance(a, float):
        return b - a
    return a.elapsed_time(b) / 1e3


def _find(module: torch.nn.Module, name: str) -> torch.nn.Module | None:
    for child_name, child in module.named_modules():
        if child_name.split(".")[-1] == name:
            return child
    return None


def _first_trainable(module: torch.nn.Module) -> torch.nn.Parameter | None:
    """The parameter whose gradient the module's backward computes last: the first one (the
    patch embedding), when it trains."""
    for param in module.parameters():
        return param if param.requires_grad else None
    return None


def dp_spread(seconds: float, group: Any, device: torch.device) -> float:
    """Slowest / mean of ``seconds`` over the ``group`` (collective over it); 1.0 for one."""
    size = torch.distributed.get_world_size(group)
    if size == 1:
        return 1.0
    mine = torch.tensor([seconds], dtype=torch.float64, device=device)
    every = [torch.zeros_like(mine) for _ in range(size)]
    torch.distributed.all_gather(every, mine, group=group)
    values = torch.cat(every)
    mean = float(values.mean())
    return float(values.max()) / mean if mean > 0 else 1.0
