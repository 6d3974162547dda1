"""Python garbage collection at chosen steps only (``--manual-gc-interval N``), as
Megatron-LM's ``--manual-gc``: the automatic collector off during training, ``gc.collect()``
every N steps and before evaluations and checkpoint saves.

Why: the automatic collector runs whenever allocation counts cross its thresholds, at a
different moment on every rank; a rank paused in a collection holds up every collective of the
others, so at scale the step time becomes the slowest rank's GC. Collecting at the same step
everywhere makes the pause collective and predictable. Reference cycles then live up to N
steps longer (memory), which is why the interval is a setting.
"""

from __future__ import annotations

import gc
from types import TracebackType


class ManualGC:
    """A context for the training loop: ``interval`` 0 does nothing (automatic GC);
    otherwise automatic GC is off inside it (and put back as it was on exit), with a
    collection on entry, after every ``interval``-th step (:meth:`after_step`) and wherever
    the loop calls :meth:`collect` (before evaluations and saves)."""

    def __init__(self, interval: int) -> None:
        if interval < 0:
            raise ValueError(f"manual GC interval must be >= 0, got {interval}")
        self.interval = interval
        self._was_enabled = gc.isenabled()

    def __enter__(self) -> ManualGC:
        if self.interval:
            self._was_enabled = gc.isenabled()
            gc.disable()
            gc.collect()
        return self

    def after_step(self, step: int) -> None:
        """Collect when ``step`` is a multiple of the interval."""
        if self.interval and step % self.interval == 0:
            gc.collect()

    def collect(self) -> None:
        """Collect now (manual GC only)."""
        if self.interval:
            gc.collect()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.interval and self._was_enabled:
            gc.enable()
