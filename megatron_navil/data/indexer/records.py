"""Records out of the input files: JSONL lines, CSV rows, WebDataset tar samples; the unit
boundaries of each file; and :func:`iter_unit`, which yields one work unit's records as
``(record index, location, parsed object or Skip, input bytes, tar images)``.

A record that cannot even be parsed (a blank or malformed line, a bad CSV row, a tar sample
without text) comes out as a :class:`~megatron_navil.data.indexer.settings.Skip` in place of its
object, so the unit counts it with the same reasons as the sample builder's skips.
"""

from __future__ import annotations

import csv
import json
import tarfile
from collections.abc import Iterator
from typing import Any

from megatron_navil.data.indexer.settings import IndexFatal, Skip

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")


def jsonl_units(path: str, per_unit: int) -> list[tuple[int, int, int]]:
    """``(start byte, first record, records)`` per unit of a JSONL file (records = lines)."""
    units, start, first, count, pos = [], 0, 0, 0, 0
    with open(path, "rb") as f:
        for line in f:
            if count == per_unit:
                units.append((start, first, count))
                start, first, count = pos, first + count, 0
            count += 1
            pos += len(line)
    if count:
        units.append((start, first, count))
    return units


def csv_rows(path: str) -> Iterator[tuple[int, dict | None, str]]:
    """``(line, row or None, detail)`` per CSV data row (None: a malformed row)."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f)
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield line, None, str(exc)
                return
            yield line, row, ""


class TarLayoutError(ValueError):
    """A tar that is not a WebDataset shard: a sample's members are not adjacent, or a sample
    has one extension twice. Grouping by adjacent key (what WebDataset readers do) would turn
    such a tar's captions into text-only documents, so the whole tar is refused."""


def tar_groups(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """``(key, {ext: bytes})`` per sample of a WebDataset tar, in member order.

    Raises:
        TarLayoutError: a key seen again after another key's members (``tar cf x.tar *.jpg
            *.txt`` writes all images first), or an extension twice in one sample.
    """
    with tarfile.open(path, "r:*") as tf:
        key, group = None, {}
        closed: set[str] = set()
        for m in tf:
            if not m.isfile():
                continue
            base = m.name.rsplit("/", 1)[-1]
            prefix = m.name[: len(m.name) - len(base)]
            if "." not in base:
                continue
            k, ext = base.split(".", 1)
            k, ext = prefix + k, ext.lower()
            if key is not None and k != key:
                yield key, group
                closed.add(key)
                group = {}
            if k in closed:
                raise TarLayoutError(
                    f"tar {path}: the members of sample {k!r} are not adjacent ({m.name} comes "
                    "after other samples' members, as `tar cf x.tar *.jpg *.txt` writes them); "
                    "a WebDataset tar keeps each sample's files together: re-create it sorted "
                    "by name (`tar --sort=name -cf ...`)"
                )
            if ext in group:
                raise TarLayoutError(f"tar {path}: sample {k!r} has two .{ext} members")
            key = k
            f = tf.extractfile(m)
            group[ext] = f.read() if f is not None else b""
        if key is not None:
            yield key, group


def count_tar_groups(path: str) -> int:
    try:
        return sum(1 for _ in tar_groups(path))
    except TarLayoutError as exc:
        raise IndexFatal(str(exc)) from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise IndexFatal(f"tar {path}: unreadable ({exc})") from None


def _json_error(exc: ValueError, data: bytes, one_line: bool) -> str:
    """A JSON error without a second location: a JSONL line is located by ``file:line``
    already, so only its column is given (json's own "line 2 column 1" counts the line's
    newline as a line); a tar member's ``.json`` may span lines, so its line is kept."""
    if not isinstance(exc, json.JSONDecodeError):
        return f"not UTF-8 ({str(exc)[:100]})"
    if one_line:
        where = (
            "at the end of the line"
            if exc.pos >= len(exc.doc.rstrip())
            else f"at column {exc.pos + 1}"
        )
    else:
        where = f"at line {exc.lineno} column {exc.colno} of the .json"
    return f"{exc.msg} {where}"


def iter_unit(plan: dict, unit: list[int]) -> Iterator[tuple[int, str, Any, int, list | None]]:
    d, fi, start, first, count = unit
    ds = plan["datasets"][d]
    path = ds["files"][fi]["path"]
    kind = ds["kind"]
    if kind == "jsonl":
        with open(path, "rb") as f:
            f.seek(start)
            for k in range(count):
                line = f.readline()
                loc = f"{path}:{first + k + 1}"
                if not line.strip():
                    yield first + k, loc, Skip("empty_line", "blank line"), len(line), None
                    continue
                try:
                    obj = json.loads(line)
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    skip = Skip("malformed_json", _json_error(exc, line, one_line=True))
                    yield first + k, loc, skip, len(line), None
                    continue
                yield first + k, loc, obj, len(line), None
    elif kind == "csv":
        for r, (line, row, detail) in enumerate(csv_rows(path)):
            if r < first:
                continue
            if r >= first + count:
                break
            loc = f"{path}:{line}"
            if row is None:
                yield r, loc, Skip("malformed_json", f"CSV: {detail}"), 0, None
                continue
            if None in row or any(v is None for v in row.values()):
                yield r, loc, Skip("bad_record", "CSV row with a wrong number of fields"), 0, None
                continue
            cap = row.get("caption", row.get("text"))
            obj = {"image": row.get("image"), "caption": cap}
            yield r, loc, obj, sum(len(v) for v in row.values()), None
    else:
        for r, (key, group) in enumerate(tar_groups(path)):
            if r < first:
                continue
            if r >= first + count:
                break
            loc = f"{path}:{key}"
            imgs = [group[e[1:]] for e in IMAGE_EXTS if e[1:] in group]
            size = sum(len(v) for v in group.values())
            if len(imgs) > 1:
                yield r, loc, Skip("bad_record", "more than one image in a tar sample"), size, None
            elif "json" in group:
                try:
                    obj = json.loads(group["json"])
                except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                    skip = Skip("malformed_json", _json_error(exc, group["json"], one_line=False))
                    yield r, loc, skip, size, None
                    continue
                if isinstance(obj, dict) and "text" not in obj and "txt" in group and imgs:
                    obj["caption"] = group["txt"].decode("utf-8", "replace")
                yield r, loc, obj, size - sum(map(len, imgs)), imgs
            elif "txt" in group:
                text = group["txt"].decode("utf-8", "replace")
                obj = {"caption": text} if imgs else {"text": text}
                yield r, loc, obj, len(group["txt"]), imgs if imgs else None
            else:
                yield r, loc, Skip("bad_record", "tar sample without .txt or .json"), size, None
