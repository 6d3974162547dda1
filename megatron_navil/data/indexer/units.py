"""Work units: indexing one unit into its shard parts, resumably, and running units over
worker processes.

A dataset's records are cut into units of ``samples_per_shard`` records (a tar is
never split across units); unit ``u`` is processed by machine ``u % num_shards``. A unit writes
its shard parts to temporary names, renames them, then writes ``units/NNNNNN.json`` (its
marker): re-running skips units whose marker and files are present and redoes the others, so a
killed run resumes without duplicates and ends byte-identical to an uninterrupted one. Outputs
depend only on the inputs and the settings in ``plan.json``, never on the worker count or
timing.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from megatron_navil.data.indexer.plan import canonical_json, plan_digest, write_atomic
from megatron_navil.data.indexer.records import iter_unit
from megatron_navil.data.indexer.samples import SampleBuilder
from megatron_navil.data.indexer.settings import MAX_EXAMPLES, SKIP_REASONS, IndexFatal, Skip
from megatron_navil.data.shards.writer import ShardWriter
from megatron_navil.data.tokenizer import TextTokenizer


def unit_name(u: int) -> str:
    return f"{u:06d}"


def unit_marker(out: Path, u: int) -> Path:
    return out / "units" / f"{unit_name(u)}.json"


def unit_done(out: Path, u: int) -> bool:
    """The unit's marker parses and its shard files exist with the recorded sizes."""
    try:
        info = json.loads(unit_marker(out, u).read_text())
        for s in info["shards"]:
            if (out / s["bin"]).stat().st_size != s["bin_size"]:
                return False
            if (out / s["idx"]).stat().st_size != s["idx_size"]:
                return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return True


def clean_unit(out: Path, u: int) -> None:
    """Remove a unit's leftovers (temporary files and parts of an unfinished run)."""
    for p in (out / "shards").glob(f"{unit_name(u)}-*"):
        p.unlink()
    for p in (out / "units").glob(f"{unit_name(u)}.json*"):
        p.unlink()


class Progress:
    """Counters a unit reports to (shared memory values across worker processes)."""

    def __init__(self, samples: Any = None, nbytes: Any = None):
        self.samples, self.nbytes = samples, nbytes
        self._s = self._b = 0

    def add(self, samples: int, nbytes: int, flush: bool = False) -> None:
        self._s += samples
        self._b += nbytes
        if self.samples is not None and (flush or self._s >= 64):
            with self.samples.get_lock():
                self.samples.value += self._s
            with self.nbytes.get_lock():
                self.nbytes.value += self._b
            self._s = self._b = 0


def process_unit(
    out: Path, plan: dict, u: int, builder: SampleBuilder, strict: bool, progress: Progress
) -> dict:
    """Index unit ``u`` into its shards; returns (and writes) its marker dict."""
    clean_unit(out, u)
    unit = plan["units"][u]
    d = unit[0]
    # a plan written before first_record existed: records counted per file, as then
    first_record = plan["datasets"][d]["files"][unit[1]].get("first_record", 0)
    settings = plan["settings"]
    limit = int(settings["shard_size_mb"] * (1 << 20))
    merge = settings["image"]["merge"]
    placeholder = builder.tok.special_ids["<img>"]
    shards: list[dict] = []
    skipped: dict[str, dict] = {}
    counts = {"records": 0, "written": 0, "bytes_in": 0}
    writer: ShardWriter | None = None

    def close() -> None:
        nonlocal writer
        if writer is None:
            return
        info = writer.close()
        name = f"{unit_name(u)}-{len(shards):03d}"
        for ext in ("bin", "idx"):
            os.replace(out / "shards" / f"{name}.{ext}.tmp", out / "shards" / f"{name}.{ext}")
        shards.append(
            {"name": name, "bin": f"shards/{name}.bin", "idx": f"shards/{name}.idx", **info}
        )
        writer = None

    try:
        for record, loc, obj, size, tar_images in iter_unit(plan, unit):
            counts["records"] += 1
            counts["bytes_in"] += size
            try:
                if isinstance(obj, Skip):
                    raise obj
                root = plan["datasets"][d]["image_root"]
                built = builder.build(obj, root, tar_images)
            except Skip as skip:
                if strict:
                    raise IndexFatal(f"{loc}: {skip.reason}: {skip.detail}") from None
                entry = skipped.setdefault(skip.reason, {"count": 0, "examples": []})
                entry["count"] += 1
                if len(entry["examples"]) < MAX_EXAMPLES:
                    entry["examples"].append(f"{loc}: {skip.detail}")
                progress.add(1, size)
                continue
            counts["bytes_in"] += built.bytes_in
            need = ShardWriter.sample_bytes(built.ids, built.images)
            if writer is not None and writer.bin_size + need > limit:
                close()
            if writer is None:
                name = f"{unit_name(u)}-{len(shards):03d}"
                writer = ShardWriter(
                    out / "shards" / f"{name}.bin.tmp",
                    out / "shards" / f"{name}.idx.tmp",
                    placeholder,
                    merge,
                )
            writer.add(built.ids, built.mask, built.images, d, record + first_record)
            counts["written"] += 1
            progress.add(1, size + built.bytes_in)
        close()
    except BaseException:
        if writer is not None:
            writer.abort()
        clean_unit(out, u)
        raise
    progress.add(0, 0, flush=True)
    marker = {
        "unit": u,
        "plan_sha256": plan_digest(plan),
        "dataset": d,
        **counts,
        "skipped": {k: skipped[k] for k in SKIP_REASONS if k in skipped},
        "shards": shards,
    }
    write_atomic(unit_marker(out, u), canonical_json(marker))
    return marker


_WORKER: dict[str, Any] = {}


def _init_worker(out: str, plan: dict, tok_path: str, strict: bool, samples, nbytes) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tok = TextTokenizer(tok_path)
    _WORKER.update(
        out=Path(out),
        plan=plan,
        builder=SampleBuilder(plan, tok),
        strict=strict,
        progress=Progress(samples, nbytes),
    )


def _run_unit(u: int) -> dict:
    w = _WORKER
    delay = float(os.environ.get("MEGATRON_NAVIL_INDEX_UNIT_DELAY", "0") or 0)
    marker = process_unit(w["out"], w["plan"], u, w["builder"], w["strict"], w["progress"])
    if delay:  # test hook: lets a test kill the indexer between units
        time.sleep(delay)
    return marker


def run_units(
    out: Path,
    plan: dict,
    tok_path: str,
    units: list[int],
    workers: int,
    strict: bool,
    on_progress: Callable[[int, int], None],
) -> None:
    """Process ``units`` with ``workers`` processes (1: in this process)."""
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    samples, nbytes = ctx.Value("q", 0), ctx.Value("q", 0)
    last = [0, 0]

    def poll() -> None:
        s, b = samples.value, nbytes.value
        on_progress(s - last[0], b - last[1])
        last[:] = [s, b]

    if workers <= 1 or len(units) <= 1:
        _init_worker(str(out), plan, tok_path, strict, samples, nbytes)
        for u in units:
            _run_unit(u)
            poll()
        return
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    with ProcessPoolExecutor(
        max_workers=workers,
        mp_context=ctx,
        initializer=_init_worker,
        initargs=(str(out), plan, tok_path, strict, samples, nbytes),
    ) as pool:
        pending = {pool.submit(_run_unit, u) for u in units}
        try:
            while pending:
                done, pending = wait(pending, timeout=0.25, return_when=FIRST_COMPLETED)
                for f in done:
                    f.result()  # re-raises a worker's error (or BrokenProcessPool)
                poll()
        except BaseException:
            for f in pending:
                f.cancel()
            raise
    poll()
