"""The indexer's inputs, as :class:`DatasetSpec` (one per dataset).

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
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from megatron_navil.data.indexer.settings import IndexFatal


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    kind: str  # jsonl | csv | wds
    files: tuple[str, ...]
    image_root: str
    repeat_time: float = 1.0


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
