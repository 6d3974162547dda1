"""The corpus indexer behind ``tools/index_corpus.py``: plan, index work units, finalize.

Inputs (one *dataset* per ``--input``, or several from a meta JSON), by record kind:

* JSONL (``.jsonl``), one record a line, its kind from its keys:
  - conversation: ``{"image": path | [paths] (optional), "conversations": [{"from": "human" |
    "gpt" | "system", "value": ...}, ...]}`` (InternVL/LLaVA; ``user``/``assistant`` too).
    ``<image>`` marks where each image goes; with no ``<image>`` and exactly one image, one
    ``<image>\\n`` is prepended to the first user turn (InternVL does the same); any other
    mismatch between placeholders and images is a skip (``placeholder_mismatch``);
  - caption pair: ``{"image": path, "caption" | "text": str}``;
  - interleaved document: ``{"texts": [str | null, ...], "images": [path | null, ...]}``
    (OBELICS style: equal-length lists, exactly one of the two non-null at each position);
  - text-only document: ``{"text": str}`` (no ``image``).
* CSV (``.csv``) of caption pairs with a header naming ``image`` and ``caption`` or ``text``.
* WebDataset tars (a ``.tar`` or a directory of them): members grouped by key (the basename up
  to its first dot); ``key.jpg|jpeg|png|webp`` + ``key.txt`` (a caption) or ``key.json``
  (any JSONL record kind above, its ``image`` field ignored: the tar's image is the image).
* meta JSON (``.json``): InternVL's ``{"name": {"root": dir, "annotation": jsonl,
  "repeat_time": r}, ...}``; each entry a dataset, images relative to ``root``. Relative
  ``root``/``annotation`` paths are taken from the meta file's directory when they exist there,
  else from the working directory. ``repeat_time`` is recorded in the manifest (the data
  pipeline's blending weight); samples are stored once.
Image paths are relative to ``--image-root`` (default: the annotation file's directory).

Work units: a dataset's records are cut into units of ``samples_per_shard`` records (a tar is
never split across units); unit ``u`` is processed by machine ``u % num_shards``. A unit writes
its shard parts to temporary names, renames them, then writes ``units/NNNNNN.json`` (its
marker): re-running skips units whose marker and files are present and redoes the others, so a
killed run resumes without duplicates and ends byte-identical to an uninterrupted one. Outputs
depend only on the inputs and the settings in ``plan.json``, never on the worker count or
timing.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from megatron_navil.config.model import DEFAULT_SYSTEM_MESSAGE
from megatron_navil.data.images import ImageRejected, prepare_image
from megatron_navil.data.shards import (
    IMAGE_RULE,
    MANIFEST_NAME,
    SCHEMA_VERSION,
    ImageEntry,
    ShardWriter,
    image_cost,
)
from megatron_navil.data.templates import IMAGE_MARK, ROLES, Renderer, SampleRejected
from megatron_navil.data.tokenizer import TextTokenizer
from megatron_navil.ops import merged_grid, scales_for_image, smart_resize

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp")
MAX_EXAMPLES = 5
SKIP_REASONS = (
    "empty_line",
    "malformed_json",
    "bad_record",
    "missing_image",
    "corrupt_image",
    "zero_size_image",
    "bad_aspect",
    "placeholder_mismatch",
    "reserved_token_in_text",
    "no_target",
    "too_long",
)
"""Every reason a record can be skipped for (the report lists them in this order)."""


class IndexFatal(ValueError):
    """A fatal indexing error (bad arguments, ``--strict`` skip, inconsistent output dir)."""


@dataclass(frozen=True)
class ImageSettings:
    patch: int = 16
    merge: int = 2
    min_patches: int = 256
    max_patches: int = 24576
    max_aspect: float = 200.0
    multi_scale: bool = True
    scale_ratio: float = 0.7071  # the released configs' scale_downsample_ratio
    config: str = "custom"
    # the geometry the stored scales follow: data.shards.IMAGE_RULE, the released NaViL code's
    # resize and multi-scale chain (ShardDataset refuses a manifest without it or with another)
    rule: str = IMAGE_RULE


@dataclass(frozen=True)
class Settings:
    """Everything that determines the output bytes (saved in plan.json)."""

    template: str = "internlm2-chat"
    system: str = DEFAULT_SYSTEM_MESSAGE  # system turn of conversations without one ("": none)
    caption_format: str = "raw"  # raw | chat
    caption_prompt: str = "Describe the image."
    max_tokens: int = 16384
    samples_per_shard: int = 20000
    shard_size_mb: float = 1024.0
    image: ImageSettings = field(default_factory=ImageSettings)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str  # jsonl | csv | wds
    files: tuple[str, ...]
    image_root: str
    repeat_time: float = 1.0


# --------------------------------------------------------------------------------------------
# Planning


def _resolve(p: str, base: Path) -> Path:
    path = Path(p).expanduser()
    if path.is_absolute():
        return path
    return (base / path) if (base / path).exists() else path.resolve()


def datasets_from_inputs(inputs: list[str], image_root: str | None) -> list[DatasetSpec]:
    """One dataset per input (a meta JSON gives several); IndexFatal on bad paths."""
    specs: list[DatasetSpec] = []
    for raw in inputs:
        path = Path(raw).expanduser().resolve()
        if not path.exists():
            raise IndexFatal(f"input {raw}: no such file or directory")
        if path.is_dir():
            tars = sorted(str(p) for p in path.glob("*.tar"))
            if not tars:
                raise IndexFatal(f"input {raw}: a directory must hold WebDataset .tar files")
            specs.append(DatasetSpec(path.name, "wds", tuple(tars), str(path)))
        elif path.suffix == ".tar":
            specs.append(DatasetSpec(path.stem, "wds", (str(path),), str(path.parent)))
        elif path.suffix in (".jsonl", ".csv"):
            root = str(Path(image_root).resolve()) if image_root else str(path.parent)
            specs.append(DatasetSpec(path.stem, path.suffix[1:], (str(path),), root))
        elif path.suffix == ".json":
            specs.extend(_meta_datasets(path))
        else:
            raise IndexFatal(
                f"input {raw}: unknown kind (expected .jsonl, .csv, .json meta, .tar or a dir)"
            )
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise IndexFatal(f"dataset names are not unique: {names}")
    return specs


def _meta_datasets(path: Path) -> list[DatasetSpec]:
    try:
        meta = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IndexFatal(f"meta {path}: unreadable JSON ({exc})") from None
    if not isinstance(meta, dict) or not meta:
        raise IndexFatal(f"meta {path}: expected an object of datasets")
    specs = []
    for name, entry in meta.items():
        if not isinstance(entry, dict) or "annotation" not in entry:
            raise IndexFatal(f"meta {path}: dataset {name!r} needs 'annotation'")
        ann = _resolve(str(entry["annotation"]), path.parent)
        if not ann.is_file():
            raise IndexFatal(f"meta {path}: dataset {name!r}: annotation {ann} not found")
        root = _resolve(str(entry.get("root", ".")), path.parent)
        try:
            repeat = float(entry.get("repeat_time", 1.0))
        except (TypeError, ValueError):
            raise IndexFatal(f"meta {path}: dataset {name!r}: bad repeat_time") from None
        if not repeat > 0:
            raise IndexFatal(f"meta {path}: dataset {name!r}: repeat_time must be > 0")
        kind = "csv" if ann.suffix == ".csv" else "jsonl"
        specs.append(DatasetSpec(str(name), kind, (str(ann),), str(root), repeat))
    return specs


def _jsonl_units(path: str, per_unit: int) -> list[tuple[int, int, int]]:
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


def _csv_rows(path: str) -> Iterator[tuple[int, dict | None, str]]:
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


def _tar_groups(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
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


def _count_tar_groups(path: str) -> int:
    try:
        return sum(1 for _ in _tar_groups(path))
    except TarLayoutError as exc:
        raise IndexFatal(str(exc)) from None
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise IndexFatal(f"tar {path}: unreadable ({exc})") from None


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
                for start, first, count in _jsonl_units(path, per):
                    units.append([d, fi, start, first, count])
                    records = max(records, files[-1]["first_record"] + first + count)
            elif spec.kind == "csv":
                n = sum(1 for _ in _csv_rows(path))
                for first in range(0, n, per):
                    units.append([d, fi, 0, first, min(per, n - first)])
                records += n
            else:
                n = _count_tar_groups(path)
                for first in range(0, n, per):
                    units.append([d, fi, 0, first, min(per, n - first)])
                records += n
        datasets.append({**asdict(spec), "files": files})
    plan = {
        "format": "megatron_navil.plan",
        "schema_version": SCHEMA_VERSION,
        "settings": asdict(settings),
        "tokenizer": tok.describe(),
        "datasets": datasets,
        "units": units,
    }
    return plan


def _canonical(obj: Any) -> bytes:
    return (json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False) + "\n").encode()


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Records -> samples


class Skip(Exception):
    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Built:
    ids: list[int]
    mask: list[bool]
    images: list[ImageEntry]
    bytes_in: int


class SampleBuilder:
    """Turns one record into a sample or raises :class:`Skip`.

    ``require_target`` (the indexer's default): a record whose trained-on text is empty or
    whitespace (every assistant answer, the caption, the document's text) is a ``no_target``
    skip. Inference prompts (``inference.inputs.image_inputs``) end with an empty assistant
    answer on purpose and pass ``False``.
    """

    def __init__(self, plan: dict[str, Any], tok: TextTokenizer, require_target: bool = True):
        self.require_target = require_target
        s = plan["settings"]
        self.settings = s
        self.img = s["image"]
        self.renderer = Renderer(tok, s["template"], s["system"])
        self.tok = tok

    @lru_cache(maxsize=4096)  # noqa: B019 (one builder per process, bounded)
    def _geometry(self, h: int, w: int) -> tuple[tuple, tuple]:
        g = self.img
        args = (g["patch"], g["merge"], g["min_patches"], g["max_patches"], g["max_aspect"])
        size = f"{w} x {h} (W x H)"
        long, short = max(h, w), min(h, w)
        if float(long) > float(g["max_aspect"]) * float(short):  # the ops' own test, exactly
            raise Skip(
                "bad_aspect", f"{size}: aspect ratio {long / short:.1f} > {g['max_aspect']:g}"
            )
        try:
            if g["multi_scale"]:
                scales = scales_for_image(h, w, *args, g["scale_ratio"])
            else:
                scales = [smart_resize(h, w, *args)]
        except ValueError as exc:  # e.g. a thin image whose upsampling passes the side limit
            msg = re.sub(r"\b(smart_resize|scales_for_image): ", "", str(exc))
            msg = re.sub(r"(?:image )?\d+x\d+ ?", "", msg).strip()
            raise Skip("bad_aspect", f"{size}: {msg}") from None
        grids = tuple(tuple(merged_grid(a, b, g["patch"], g["merge"])) for a, b in scales)
        return tuple(tuple(x) for x in scales), grids

    def image(self, raw: bytes, name: str = "") -> ImageEntry:
        """``name`` (the image's path in its record) prefixes a skip's detail."""
        where = f"{name}: " if name else ""
        try:
            p = prepare_image(raw)
        except ImageRejected as exc:
            raise Skip(exc.reason, where + str(exc).split(": ", 1)[1]) from None
        try:
            scales, grids = self._geometry(p.height, p.width)
        except Skip as skip:
            raise Skip(skip.reason, where + skip.detail) from None
        return ImageEntry(p.data, p.format, (p.height, p.width), scales, grids, p.converted)

    def _load(self, ref: Any, root: str, tar_images: list[bytes] | None) -> bytes:
        if tar_images is not None:
            return tar_images.pop(0)
        if not isinstance(ref, str) or not ref:
            raise Skip("bad_record", f"image path must be a non-empty string, got {ref!r:.60}")
        path = Path(root) / ref
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise Skip("missing_image", f"{ref} not found under {root}") from None
        except OSError as exc:
            raise Skip("missing_image", f"{ref}: {exc.strerror}") from None

    def build(self, obj: Any, root: str, tar_images: list[bytes] | None = None) -> Built:
        if not isinstance(obj, dict):
            raise Skip("bad_record", f"expected a JSON object, got {type(obj).__name__}")
        r = self.renderer
        refs: list[Any]
        targets: list[str]  # the texts the loss is on
        try:
            if "conversations" in obj:
                refs = self._image_refs(obj, tar_images)
                turns = self._turns(obj["conversations"])
                marks = sum(t.count(IMAGE_MARK) for _, t in turns)
                if marks == 0 and len(refs) == 1:
                    k = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
                    if k is None:
                        raise Skip("bad_record", "no user turn to put the image in")
                    turns[k] = ("user", f"{IMAGE_MARK}\n{turns[k][1]}")
                rendered = r.conversation(turns)
                targets = [t for role, t in turns if role == "assistant"]
            elif "texts" in obj or "images" in obj:
                texts, images = obj.get("texts"), obj.get("images")
                if not isinstance(texts, list) or not isinstance(images, list):
                    raise Skip("bad_record", "interleaved 'texts' and 'images' must be lists")
                if len(texts) != len(images):
                    raise Skip("placeholder_mismatch", "'texts' and 'images' differ in length")
                parts, refs = [], []
                for t, im in zip(texts, images, strict=True):
                    if (t is None) == (im is None):
                        raise Skip("bad_record", "each position needs exactly one of text/image")
                    if t is not None:
                        if not isinstance(t, str):
                            raise Skip("bad_record", "interleaved text must be a string")
                        parts.append(("text", t))
                    else:
                        parts.append(("image", None))
                        refs.append(im)
                if tar_images is not None:
                    refs = list(tar_images)
                rendered = r.document(parts)
                targets = [t for kind, t in parts if kind == "text"]
            elif "caption" in obj or ("text" in obj and ("image" in obj or tar_images)):
                cap = obj.get("caption", obj.get("text"))
                if not isinstance(cap, str):
                    raise Skip("bad_record", "caption must be a string")
                refs = self._image_refs(obj, tar_images)
                if len(refs) != 1:
                    raise Skip(
                        "placeholder_mismatch", f"a caption pair needs 1 image, has {len(refs)}"
                    )
                rendered = r.caption(
                    cap, self.settings["caption_format"], self.settings["caption_prompt"]
                )
                targets = [cap]
            elif "text" in obj:
                if not isinstance(obj["text"], str):
                    raise Skip("bad_record", "text must be a string")
                rendered = r.document([("text", obj["text"])])
                refs, targets = [], [obj["text"]]
            else:
                raise Skip("bad_record", "no 'conversations', 'caption', 'text' or 'texts' key")
        except SampleRejected as exc:
            raise Skip(exc.reason, str(exc).split(": ", 1)[1]) from None
        if rendered.placeholders != len(refs):
            raise Skip(
                "placeholder_mismatch",
                f"{rendered.placeholders} <image> placeholders for {len(refs)} images",
            )
        if not any(rendered.mask):
            raise Skip("no_target", "no token to train on (no assistant turn or empty text)")
        if self.require_target and not any(t.strip() for t in targets):
            what = {"conversations": "every assistant answer is", "caption": "the caption is"}
            key = next((k for k in what if k in obj), "")
            raise Skip("no_target", f"{what.get(key, 'the text is')} empty")
        # cheap length check first (text alone), then images
        max_tokens = self.settings["max_tokens"]
        text_len = len(rendered.ids) - len(refs)
        if text_len > max_tokens:
            raise Skip("too_long", f"{text_len} text tokens > --max-tokens {max_tokens}")
        images, bytes_in, total = [], 0, text_len
        pending = list(tar_images) if tar_images is not None else None
        for ref in refs:
            raw = self._load(ref, root, pending)
            bytes_in += len(raw)
            entry = self.image(raw, ref if isinstance(ref, str) else "")
            total += image_cost(entry.grids, self.img["merge"])[0]
            images.append(entry)
        if total > max_tokens:
            raise Skip("too_long", f"{total} LLM tokens > --max-tokens {max_tokens}")
        return Built(rendered.ids, rendered.mask, images, bytes_in)

    @staticmethod
    def _image_refs(obj: dict, tar_images: list[bytes] | None) -> list[Any]:
        if tar_images is not None:
            return list(tar_images)
        ref = obj.get("image")
        if ref is None:
            return []
        return list(ref) if isinstance(ref, list) else [ref]

    @staticmethod
    def _turns(conv: Any) -> list[tuple[str, str]]:
        if not isinstance(conv, list) or not conv:
            raise Skip("bad_record", "'conversations' must be a non-empty list")
        turns = []
        for t in conv:
            if not isinstance(t, dict):
                raise Skip("bad_record", "a turn must be an object")
            role = t.get("from", t.get("role"))
            value = t.get("value", t.get("content"))
            if role not in ROLES or not isinstance(value, str):
                raise Skip(
                    "bad_record", f"bad turn (from={role!r:.30}, value type {type(value).__name__})"
                )
            turns.append((ROLES[role], value))
        return turns


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


# --------------------------------------------------------------------------------------------
# Record iteration per unit: (record index, location, parsed object or Skip, root, tar images)


def _iter_unit(plan: dict, unit: list[int]) -> Iterator[tuple[int, str, Any, int, list | None]]:
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
        for r, (line, row, detail) in enumerate(_csv_rows(path)):
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
        for r, (key, group) in enumerate(_tar_groups(path)):
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


# --------------------------------------------------------------------------------------------
# Units


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
        for record, loc, obj, size, tar_images in _iter_unit(plan, unit):
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
    write_atomic(unit_marker(out, u), _canonical(marker))
    return marker


def plan_digest(plan: dict) -> str:
    return hashlib.sha256(_canonical(plan)).hexdigest()


# --------------------------------------------------------------------------------------------
# Worker processes

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


# --------------------------------------------------------------------------------------------
# Finalize


def finalize(out: Path) -> dict:
    """Check every unit of the plan is done and write ``manifest.json``; returns it."""
    try:
        plan = json.loads((out / "plan.json").read_text())
    except (OSError, ValueError) as exc:
        raise IndexFatal(f"{out}: no readable plan.json ({exc})") from None
    digest = plan_digest(plan)
    missing = [u for u in range(len(plan["units"])) if not unit_done(out, u)]
    if missing:
        head = ", ".join(map(str, missing[:10]))
        raise IndexFatal(
            f"{out}: {len(missing)} of {len(plan['units'])} units not done (first: {head}); "
            "run `build` for every --shard-index first"
        )
    shards, datasets = [], []
    totals = {k: 0 for k in ("records", "written", "bytes_in")}
    skipped: dict[str, dict] = {}
    agg = {"num_images": 0, "tokens": 0, "llm_tokens": 0, "patches": 0, "bin_bytes": 0}
    ds_counts = [0] * len(plan["datasets"])
    for u in range(len(plan["units"])):
        info = json.loads(unit_marker(out, u).read_text())
        if info.get("plan_sha256") != digest:
            raise IndexFatal(f"{unit_marker(out, u)}: written for a different plan")
        for k in totals:
            totals[k] += info[k]
        ds_counts[info["dataset"]] += info["written"]
        for reason, e in info["skipped"].items():
            acc = skipped.setdefault(reason, {"count": 0, "examples": []})
            acc["count"] += e["count"]
            acc["examples"] = (acc["examples"] + e["examples"])[:MAX_EXAMPLES]
        for s in info["shards"]:
            shards.append(s)
            for k in ("num_images", "tokens", "llm_tokens", "patches"):
                agg[k] += s[k]
            agg["bin_bytes"] += s["bin_size"]
    if totals["written"] == 0:
        raise IndexFatal(
            f"no sample indexed: {totals['records']:,} records skipped ({_skip_summary(skipped)})"
            "; no manifest written"
        )
    first = 0
    for d, spec in enumerate(plan["datasets"]):
        datasets.append(
            {
                "name": spec["name"],
                "kind": spec["kind"],
                "files": spec["files"],
                "repeat_time": spec["repeat_time"],
                "first_sample": first,
                "num_samples": ds_counts[d],
            }
        )
        first += ds_counts[d]
    s = plan["settings"]
    tok = plan["tokenizer"]
    manifest = {
        "format": "megatron_navil.shards",
        "schema_version": SCHEMA_VERSION,
        "plan_sha256": digest,
        "placeholder_token": "<img>",
        "placeholder_id": tok["special_ids"]["<img>"],
        "token_dtype": "uint32",
        "template": s["template"],
        "settings": s,
        "image": s["image"],
        # the copy's own fingerprint too: caption.py and blends accept either file
        "tokenizer": {**tok, "copy_fingerprint": _copy_fingerprint(out, tok)},
        "tokenizer_copy": tokenizer_copy_name(tok),
        "counts": {
            "records": totals["records"],
            "samples": totals["written"],
            "skipped": totals["records"] - totals["written"],
            "input_bytes": totals["bytes_in"],
            "shards": len(shards),
            **agg,
        },
        "skipped": {k: skipped[k] for k in SKIP_REASONS if k in skipped},
        "datasets": datasets,
        "shards": [
            {
                k: sh[k]
                for k in (
                    "name",
                    "bin",
                    "idx",
                    "bin_size",
                    "idx_size",
                    "bin_sha256",
                    "idx_sha256",
                    "num_samples",
                    "num_images",
                    "tokens",
                    "llm_tokens",
                    "patches",
                )
            }
            for sh in shards
        ],
    }
    write_atomic(out / MANIFEST_NAME, _canonical(manifest))
    return manifest


def _skip_summary(skipped: dict[str, dict]) -> str:
    """``reason count, ...; e.g. location: detail`` of a skip table (one line; the example is
    the first of the first reason in table order)."""
    if not skipped:
        return "the inputs hold no record"
    counts = ", ".join(f"{k} {skipped[k]['count']:,}" for k in SKIP_REASONS if k in skipped)
    first = next(skipped[k]["examples"][0] for k in SKIP_REASONS if k in skipped)
    return f"{counts}; e.g. {first}"


def check_strict(out: Path, units: list[int]) -> None:
    """``--strict`` over finished units (a re-run, or other machines' units before finalize):
    each must have indexed every record, as a ``--strict`` build would have; IndexFatal names
    the first that skipped any (it was built without ``--strict``)."""
    for u in units:
        if not unit_done(out, u):
            continue
        info = json.loads(unit_marker(out, u).read_text())
        if info["skipped"]:
            n = sum(e["count"] for e in info["skipped"].values())
            raise IndexFatal(
                f"--strict: {unit_marker(out, u)} was built without --strict and skipped {n:,} "
                f"of {info['records']:,} records ({_skip_summary(info['skipped'])}); "
                "re-index into a new --output"
            )


def _copy_fingerprint(out: Path, tok: dict) -> str | None:
    copy = out / tokenizer_copy_name(tok)
    return TextTokenizer(copy).fingerprint if copy.is_file() else None


def tokenizer_copy_name(tok: dict) -> str:
    return "tokenizer.model" if tok["kind"] == "sentencepiece" else "tokenizer.json"


def save_tokenizer_copy(out: Path, tok: TextTokenizer) -> None:
    """The tokenizer as used (HF: with the added special tokens; sentencepiece: the file)."""
    dest = out / tokenizer_copy_name(tok.describe())
    if tok.kind == "hf":
        data = tok._hf.to_str(pretty=True).encode()
    else:
        data = tok.path.read_bytes()
    if not dest.exists() or dest.read_bytes() != data:
        write_atomic(dest, data)


def prepare_output(out: Path, plan: dict) -> None:
    """Create the layout and write plan.json, or check it matches an existing one."""
    (out / "shards").mkdir(parents=True, exist_ok=True)
    (out / "units").mkdir(parents=True, exist_ok=True)
    path = out / "plan.json"
    data = _canonical(plan)
    if path.exists():
        if path.read_bytes() != data:
            raise IndexFatal(
                f"{out} holds an index of other inputs or settings (plan.json differs); "
                "use a new --output or delete it"
            )
    else:
        write_atomic(path, data)
