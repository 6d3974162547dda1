"""The work plan (``plan.json``): the datasets, their files and the work units they are cut
into, with the settings; written once per output directory and checked on every later run.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from megatron_navil.data.indexer.inputs import DatasetSpec
from megatron_navil.data.indexer.records import count_tar_groups, csv_rows, jsonl_units
from megatron_navil.data.indexer.settings import IndexFatal, Settings
from megatron_navil.data.shards.format import SCHEMA_VERSION
from megatron_navil.data.tokenizer import TextTokenizer


def make_plan(specs: list[DatasetSpec], settings: Settings, tok: TextTokenizer) -> dict[str, Any]:
    """The work plan: datasets, units ``[dataset, file, start_byte, first_record, count]``."""
    units: list[list[int]] = []
    datasets = []
    per = settings.samples_per_shard
    for d, spec in enumerate(specs):
        files: list[dict[str, Any]] = []
        records = 0
        for fi, path in enumerate(spec.files):
            try:
                size = os.path.getsize(path)
            except OSError as exc:
                raise IndexFatal(f"{path}: {exc.strerror}") from None
            # first_record: records of the dataset's earlier files, so a sample's record
            # number is unique in its dataset (a directory of tars: one file after another)
            files.append({"path": path, "size": size, "first_record": records})
            if spec.kind == "jsonl":
                for start, first, count in jsonl_units(path, per):
                    units.append([d, fi, start, first, count])
                    records = max(records, files[-1]["first_record"] + first + count)
            elif spec.kind == "csv":
                n = sum(1 for _ in csv_rows(path))
                for first in range(0, n, per):
                    units.append([d, fi, 0, first, min(per, n - first)])
                records += n
            else:
                n = count_tar_groups(path)
                for first in range(0, n, per):
                    units.append([d, fi, 0, first, min(per, n - first)])
                records += n
        datasets.append({**asdict(spec), "files": files})
    plan = {
        "format": "megatron_navil.plan",
        "schema_version": SCHEMA_VERSION,
        "settings": settings.to_plan(),
        "tokenizer": tok.describe(),
        "datasets": datasets,
        "units": units,
    }
    return plan


def canonical_json(obj: Any) -> bytes:
    """``obj`` as the indexer writes its JSON files (sorted keys, so equal plans are equal
    bytes and :func:`plan_digest` identifies a plan)."""
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def plan_digest(plan: dict) -> str:
    """sha256 of the plan's canonical bytes; every unit marker and the manifest record it."""
    return hashlib.sha256(canonical_json(plan)).hexdigest()


def prepare_output(out: Path, plan: dict) -> None:
    """Create the layout and write plan.json, or check it matches an existing one."""
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "units").mkdir(parents=True, exist_ok=True)
    path = out / "plan.json"
    data = canonical_json(plan)
    if path.exists():
        if path.read_bytes() != data:
            raise IndexFatal(
                f"{out} holds an index of other inputs or settings (plan.json differs); "
                "use a new --output or delete it"
            )
    else:
        write_atomic(path, data)
