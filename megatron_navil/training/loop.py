"""The training loop: steps, logging (TensorBoard, tqdm, one ``progress.txt`` line per step,
a loss-curve PNG at the end), periodic atomic checkpoints and resume.

Data comes from a :class:`BatchSource` (the data pipeline's loader, or synthetic batches in
tests): this rank's micro-batches for the next global step, and a small ``state_dict`` saved
in every checkpoint so a resume continues with exactly the next batch.

SIGTERM and SIGUSR1 (what SLURM, Kubernetes and ``kill`` send before a preemption or the
time limit) stop the run at the end of the current step with a checkpoint (when ``save_dir``
is set); the process then returns normally (exit status 0) and ``--load`` resumes it.
"""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from megatron_navil.checkpoint import directory, store
from megatron_navil.checkpoint.async_save import AsyncSaves
from megatron_navil.parallel.groups import ParallelGroups
from megatron_navil.training.accounting import StepClock, dp_spread
from megatron_navil.training.evaluate import evaluate
from megatron_navil.training.manual_gc import ManualGC
from megatron_navil.training.microbatch import MicroBatch
from megatron_navil.training.optim import sync_params
from megatron_navil.training.profiling import StepProfiler
from megatron_navil.training.step import StepResult, collective_device, train_step


class BatchSource(Protocol):
    """Where a rank's micro-batches come from."""

    def next_step(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next global step."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position in the data stream."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved position."""
        ...


@dataclass
class LoopConfig:
    """How long to train, where to save and log."""

    steps: int  # total optimizer steps (a resumed run continues up to this number)
    seq_length: int  # packed sequence length (pipeline p2p shapes)
    exit_after: int | None = None  # stop (with a checkpoint) after this many steps of this run
    save_dir: str | None = None  # checkpoints (iter_NNNNNNN/); None: never save
    save_interval: int = 0  # save every N steps (0: only at the end)
    keep_last: int | None = 2  # complete checkpoints kept
    load_dir: str | None = None  # resume from the newest complete checkpoint here, if any
    log_dir: str | None = None  # TensorBoard events, progress.txt, loss_curve.png
    nan_policy: str = "stop"  # non-finite loss: "stop" or "skip"
    progress_bar: bool = True
    flops_per_step: Callable[[StepResult], float] | None = None  # model FLOPs of a step
    peak_flops: float | None = None  # per-device peak FLOP/s for MFU
    extra_state: dict[str, Any] = field(default_factory=dict)  # saved with train_state
    model_config: Any = None  # saved as navil_config.json (config.io) in every checkpoint
    eval_sets: list[Any] = field(default_factory=list)  # training.evaluate.EvalSet, held out
    eval_interval: int = 0  # evaluate every N steps (0: only after the last step)
    eval_iters: int = 1  # global batches of each held-out set per evaluation
    async_save: bool = False  # write checkpoints in the background (checkpoint.async_save)
    manual_gc_interval: int = 0  # Python GC only every N steps (training.manual_gc); 0: auto
    profile_steps: tuple[int, int] | None = None  # profile steps A..B (training.profiling)
    nvtx: bool = False  # NVTX ranges for Nsight instead of a torch.profiler trace

    def eval_due(self, step: int) -> bool:
        """Whether ``step`` ends with a held-out evaluation: every ``eval_interval`` steps and
        after the run's last step (``steps``), whatever the run's start, so a resumed run
        evaluates at the same steps as an uninterrupted one."""
        if not self.eval_sets:
            return False
        return step == self.steps or bool(self.eval_interval and step % self.eval_interval == 0)


class StopSignal:
    """SIGTERM / SIGUSR1 -> stop after the current step, every rank at the same step.

    The handler only records the signal, so a step or a checkpoint write in progress is never
    interrupted. Ranks receive a signal at slightly different moments, so :meth:`agreed` takes
    the maximum of every rank's flag after each step (one scalar all-reduce): all ranks stop
    after the same step and the collective checkpoint save that follows cannot deadlock.
    Data-loader workers forked after :meth:`install` inherit the handler and keep running.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        """Install the handlers (main thread only: Python allows no other)."""
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        """Put back the handlers that were there before :meth:`install`."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum

    def agreed(self) -> int | None:
        """The signal number if any rank has received one, else None (collective)."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        flag = torch.tensor([self.received or 0], dtype=torch.int64, device=device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return int(flag.item()) or None


class _Logger:
    """Rank 0's outputs: TensorBoard scalars, progress.txt, tqdm."""

    def __init__(self, cfg: LoopConfig, start: int) -> None:
        self.cfg = cfg
        self.writer = None
        self.progress_file = None
        self.bar = None
        self.history: list[tuple[int, float]] = []
        self.eval_loss: float | None = None  # the latest, for the progress bar
        self.last: tuple[float, float] | None = None  # the latest (loss, lr), for the bar
        if torch.distributed.get_rank() != 0:
            return
        if cfg.log_dir:
            from torch.utils.tensorboard import SummaryWriter

            Path(cfg.log_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(cfg.log_dir)
            self.progress_file = open(Path(cfg.log_dir) / "progress.txt", "a")
        if cfg.progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=cfg.steps, initial=start, unit="step", dynamic_ncols=True)

    def log(
        self,
        step: int,
        result: StepResult,
        seconds: float,
        world: int,
        times: dict[str, float] | None = None,
    ) -> None:
        """One step's line. ``times``: this rank's ``compute``/``vision``/``llm`` seconds
        (``training.accounting``) and ``dp_spread`` (None on a profiled step)."""
        if torch.distributed.get_rank() != 0:
            return
        self.history.append((step, result.loss))
        scalars = {
            "loss": result.loss,
            "lr": result.lr,
            "tokens_per_s": result.tokens / seconds,
            "text_tokens_per_s": (result.tokens - result.image_tokens) / seconds,
            "image_tokens_per_s": result.image_tokens / seconds,
            "images_patches_per_s": result.patches / seconds,
            "step_seconds": seconds,
        }
        for name, value in (times or {}).items():
            scalars[name if name == "dp_spread" else f"{name}_seconds"] = value
        if result.grad_norm is not None:
            scalars["grad_norm"] = result.grad_norm
        if self.cfg.flops_per_step is not None and self.cfg.peak_flops:
            flops = self.cfg.flops_per_step(result)
            scalars["model_flops"] = flops
            scalars["mfu"] = flops / seconds / (world * self.cfg.peak_flops)
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(f"train/{name}", value, step)
        if self.progress_file is not None:
            line = {"step": step, "skipped": result.skipped, **scalars}
            self.progress_file.write(json.dumps(line, sort_keys=True) + "\n")
            self.progress_file.flush()
        if self.bar is not None:
            self.bar.update(1)
            self.last = (result.loss, result.lr)
            self.bar.set_postfix(self._postfix(*self.last))

    def _postfix(self, loss: float, lr: float) -> dict[str, str]:
        out = {"loss": f"{loss:.4f}", "lr": f"{lr:.2e}"}
        if self.eval_loss is not None:
            out["eval"] = f"{self.eval_loss:.4f}"
        return out

    def log_eval(self, step: int, result: Any) -> None:
        """A held-out evaluation (``training.evaluate.EvalResult``): TensorBoard ``eval/loss``
        and ``eval/<set>/loss``, a ``progress.txt`` line of its own, the bar's ``eval``."""
        if torch.distributed.get_rank() != 0:
            return
        self.eval_loss = result.loss
        if self.writer is not None:
            self.writer.add_scalar("eval/loss", result.loss, step)
            if len(result.losses) > 1:
                for name, value in result.losses.items():
                    self.writer.add_scalar(f"eval/{name}/loss", value, step)
        if self.progress_file is not None:
            line = {"step": step, **result.log_entry()}
            self.progress_file.write(json.dumps(line, sort_keys=True) + "\n")
            self.progress_file.flush()
        per = ", ".join(f"{k} {v:.4f}" for k, v in result.losses.items())
        line = f"step {step}: held-out loss {result.loss:.4f} ({per})"
        if self.bar is not None:
            self.bar.write(line)
            if self.last is not None:
                self.bar.set_postfix(self._postfix(*self.last))
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
        if self.progress_file is not None:
            self.progress_file.close()
        if self.cfg.log_dir and self.history and torch.distributed.get_rank() == 0:
            log_dir = Path(self.cfg.log_dir)
            whole = loss_history(log_dir / "progress.txt") or self.history
            held_out = loss_history(log_dir / "progress.txt", key="eval_loss")
            plot_loss(whole, log_dir / "loss_curve.png", held_out)


def loss_history(progress: Path, key: str = "loss") -> list[tuple[int, float]]:
    """``(step, loss)`` of the whole run from ``progress.txt`` (appended to by every run of a
    save directory, so a resumed run's curve includes the steps before the resume): for a step
    logged twice (a run that went past its last checkpoint, then the resume that redid it), the
    later line wins. ``key="eval_loss"``: the held-out evaluations instead (lines of their
    own). Empty when the file is missing; unreadable lines and other lines are skipped."""
    if not progress.is_file():
        return []
    by_step: dict[int, float] = {}
    for line in progress.read_text().splitlines():
        try:
            entry = json.loads(line)
            by_step[int(entry["step"])] = float(entry[key])
        except (ValueError, KeyError, TypeError):
            continue
    return sorted(by_step.items())


def plot_loss(
    history: list[tuple[int, float]], path: Path, held_out: list[tuple[int, float]] | None = None
) -> None:
    """The loss curve as a PNG (matplotlib, no display needed), with the held-out
    evaluations as points when there are any."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, losses = zip(*history, strict=True)
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, label="train")
    if held_out:
        ax.plot(*zip(*held_out, strict=True), "o-", label="held-out", markersize=4)
        ax.legend()
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def train(
    chunks: list[Any],
    mcore_config: Any,
    groups: ParallelGroups,
    optimizer: Any,
    scheduler: Any,
    source: BatchSource,
    cfg: LoopConfig,
) -> list[StepResult]:
    """Run (or resume) training up to ``cfg.steps``; returns this run's step results."""
    start = 0
    if cfg.load_dir and (path := directory.latest(cfg.load_dir)) is not None:
        state = store.load(path, chunks, optimizer)
        start = int(state["iteration"])
        if scheduler is not None and "scheduler" in state:
            scheduler.load_state_dict(state["scheduler"])
        if "data" in state:
            source.load_state_dict(state["data"])
    logger = _Logger(cfg, start)
    results: list[StepResult] = []
    world = torch.distributed.get_world_size()

    def save(iteration: int) -> None:
        if cfg.save_dir is None:
            return
        train_state = {
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "data": source.state_dict(),
            "results_tail": [asdict(r) for r in results[-1:]],
            **cfg.extra_state,
        }
        sync_params(chunks)  # overlapped param gather: the weights the optimizer made
        store.save(
            cfg.save_dir, iteration, chunks, optimizer, train_state, cfg.keep_last,
            model_config=cfg.model_config, async_saves=saves,
        )  # fmt: skip

    saves = AsyncSaves() if cfg.async_save and cfg.save_dir is not None else None
    profile_dir = Path(cfg.log_dir) / "profile" if cfg.log_dir else None
    profiler = StepProfiler(chunks, optimizer, cfg.profile_steps, profile_dir, cfg.nvtx)
    manual_gc = ManualGC(cfg.manual_gc_interval)
    clock = StepClock(chunks, mcore_config)
    stop = StopSignal()
    stop.install()
    finished = False
    try:
        last = cfg.steps if cfg.exit_after is None else min(cfg.steps, start + cfg.exit_after)
        with manual_gc:
            for step in range(start + 1, last + 1):
                with profiler.step(step):
                    began = time.perf_counter()
                    with profiler.range("data"):
                        micro = source.next_step()
                    clock.begin()
                    result = train_step(
                        chunks, mcore_config, groups, optimizer, scheduler, micro,
                        cfg.seq_length, cfg.nan_policy, step,
                    )  # fmt: skip
                    results.append(result)
                    seconds = time.perf_counter() - began
                    times = None
                    if not profiler.active:  # the profiler has the timers during its window
                        times = clock.end()
                        spread = dp_spread(times["compute"], groups.dp, collective_device())
                        times["dp_spread"] = spread
                    logger.log(step, result, seconds, world, times)
                    if saves is not None:
                        with profiler.range("checkpoint"):
                            saves.finalize(blocking=False)  # complete a finished save
                    if cfg.eval_due(step):
                        manual_gc.collect()
                        with profiler.range("evaluate"):
                            logger.log_eval(step, evaluate(
                                chunks, mcore_config, groups, cfg.eval_sets, cfg.eval_iters,
                                cfg.seq_length,
                            ))  # fmt: skip
                    if (signum := stop.agreed()) is not None and step != last:
                        last = step  # the save below writes this step's checkpoint
                        if torch.distributed.get_rank() == 0:
                            saved = f"checkpoint in {cfg.save_dir}" if cfg.save_dir else "no --save"
                            print(f"{signal.Signals(signum).name}: stopping after step {step} "
                                  f"({saved})", flush=True)  # fmt: skip
                        break
                    if cfg.save_interval and step % cfg.save_interval == 0 and step != last:
                        manual_gc.collect()
                        with profiler.range("checkpoint"):
                            save(step)
                    manual_gc.after_step(step)
            profiler.stop()  # a window past the run's last step: what was profiled
            if last > start:
                manual_gc.collect()
                save(last)
            if saves is not None:
                saves.wait()  # the end, --exit-after or a signal: every checkpoint complete
        finished = True
    finally:
        if saves is not None and not finished:
            saves.close(abort=True)  # an error, maybe on this rank only: no collective
        if not finished:
            profiler.stop()
        stop.restore()
        clock.remove()
        logger.close()
    return results
