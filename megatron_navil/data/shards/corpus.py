"""An indexed corpus as one sample sequence: its ``manifest.json`` and :class:`ShardDataset`.

Reader API (for the data pipeline; all of it works in data-loader worker processes: a reader
pickles without its memory maps and reopens them lazily in the worker, no re-verification)::

    ds = ShardDataset("OUT")                  # or the manifest path; verify="checksum" (default)
    len(ds)                                   # samples in the corpus
    ds.llm_tokens, ds.patches                 # np.int64 [n], read-only: for ops.plan_packing
    ds.num_images, ds.dataset_ids             # np.int64 [n] each
    ds.sample(i) -> Sample                    # tokens, loss mask, images (bytes, sizes, grids)
    ds.special_ids                            # {"<img>": id, ...} 12 special + template tokens
    ds.placeholder_id                         # id of "<img>"
    ds.manifest                               # the parsed manifest dict
    ds.shard_of(i) -> (shard, local index)    # where sample i lives
    ShardReader(bin, idx)                     # one shard (same sample()/arrays, local indices)

``verify``: ``"checksum"`` hashes every shard file (sha256) against the manifest when the
dataset is opened (reads the whole corpus once); ``"size"`` checks only file sizes and the
structure of each ``.idx`` (always done, lazily, when a shard is first opened in a process);
``"none"`` skips the size check too. Corruption found raises :class:`ShardError` (one line).
"""

from __future__ import annotations

import hashlib
import json
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from megatron_navil.data.shards.format import SCHEMA_VERSION, ShardError
from megatron_navil.data.shards.reader import ShardReader, read_header
from megatron_navil.data.shards.samples import Sample
from megatron_navil.data.tokenizer import SENTENCEPIECE_RULE

IMAGE_RULE = "navil-release"
"""The image geometry a corpus's stored scale sizes follow, recorded as the manifest's
``image["rule"]`` (written by the indexer: ``data.indexer.settings.Settings.to_plan``).
``"navil-release"`` names the released NaViL code's rules (../shared/NAVIL.md, "The released
code's exact behaviour", 2 and 3): ``ops.smart_resize`` = Qwen2-VL's smart_resize with factor 1
on raw pixels, and ``ops.scales_for_image`` = the demo's multi-scale chain with its float32
budget. Manifests without it were indexed with the earlier rule (no resize while the padded
patch count is in bounds, a sqrt(2)/2 area-halving chain) and are refused. A change to either
op that alters a stored size needs a new name here."""
MANIFEST_NAME = "manifest.json"


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def load_manifest(path: str | os.PathLike) -> tuple[dict, Path]:
    """``(manifest, corpus root)`` from a corpus directory or a manifest path."""
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST_NAME
    try:
        manifest = json.loads(p.read_text())
    except FileNotFoundError:
        raise ShardError(f"{p}: no manifest (was `index_corpus.py finalize` run?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ShardError(f"{p}: unreadable manifest ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != "megatron_navil.shards":
        raise ShardError(f"{p}: not a megatron_navil shard manifest")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(
            f"{p}: schema version {manifest.get('schema_version')}, this reader reads "
            f"{SCHEMA_VERSION}"
        )
    return manifest, p.parent


def _check_image_rule(manifest: dict, root: Path) -> None:
    """ShardError (one line) unless the corpus's scales follow :data:`IMAGE_RULE`."""
    image = manifest.get("image")
    if not isinstance(image, dict):
        raise ShardError(f"{root / MANIFEST_NAME}: malformed manifest (no image section)")
    rule = image.get("rule")
    if rule is None:
        raise ShardError(
            f"corpus {root} was indexed with the old image rule (padded-count resize, "
            "sqrt(2)/2 multi-scale chain); this version resizes as the released NaViL code "
            "does: re-index it with tools/index_corpus.py"
        )
    if rule != IMAGE_RULE:
        raise ShardError(
            f"corpus {root} was indexed with image rule {rule!r}; this version implements "
            f"{IMAGE_RULE!r} (the released NaViL code's): re-index it with tools/index_corpus.py"
        )


def _check_tokenizer_rule(manifest: dict, root: Path) -> None:
    """ShardError (one line) unless a sentencepiece corpus's samples follow
    :data:`~megatron_navil.data.tokenizer.SENTENCEPIECE_RULE` (an HF ``tokenizer.json`` corpus
    records no rule: its tokenisation did not change)."""
    tok = manifest.get("tokenizer")
    if not isinstance(tok, dict) or tok.get("kind") != "sentencepiece":
        return
    rule = tok.get("rule")
    if rule is None:
        raise ShardError(
            f"corpus {root} was indexed with the old sentencepiece rule (a dummy-prefix '▁' "
            "before every separately encoded piece, e.g. each assistant answer); this version "
            "tokenises as the model's HF tokenizer does: re-index it with tools/index_corpus.py"
        )
    if rule != SENTENCEPIECE_RULE:
        raise ShardError(
            f"corpus {root} was indexed with sentencepiece rule {rule!r}; this version implements "
            f"{SENTENCEPIECE_RULE!r}: re-index it with tools/index_corpus.py"
        )


VERIFY_MODES = ("checksum", "size", "none")


@dataclass
class ShardDataset:
    """All shards of an indexed corpus as one sample sequence (see the module doc)."""

    path: str | os.PathLike
    """Corpus directory or its ``manifest.json``."""
    verify: str = "checksum"
    """``"checksum"`` (sha256 of every shard file on open), ``"size"`` or ``"none"``."""
    manifest: dict = field(init=False)
    root: Path = field(init=False)
    shards: list[ShardReader] = field(init=False)

    def __post_init__(self) -> None:
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"ShardDataset.verify={self.verify!r}: must be one of {VERIFY_MODES}")
        self.manifest, self.root = load_manifest(self.path)
        _check_image_rule(self.manifest, self.root)
        _check_tokenizer_rule(self.manifest, self.root)
        try:
            counts = self._open_shards()
            for key in ("placeholder_id",):
                int(self.manifest[key])
            self.manifest["tokenizer"]["special_ids"]["<img>"]
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, ShardError):
                raise
            raise ShardError(
                f"{self.root / MANIFEST_NAME}: malformed manifest ({type(exc).__name__}: {exc})"
            ) from None
        self._cum = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)]).astype(np.int64)
        self._arrays: dict[str, np.ndarray] = {}

    def _open_shards(self) -> list[int]:
        self.shards = []
        counts = []
        for entry in self.manifest["shards"]:
            bin_p, idx_p = self.root / entry["bin"], self.root / entry["idx"]
            if self.verify != "none":
                for key, p in (("bin", bin_p), ("idx", idx_p)):
                    try:
                        size = p.stat().st_size
                    except OSError:
                        raise ShardError(f"{p}: missing shard file") from None
                    if size != entry[f"{key}_size"]:
                        raise ShardError(f"{p}: size {size} != {entry[f'{key}_size']} in manifest")
            if self.verify == "checksum":
                for key, p in (("bin", bin_p), ("idx", idx_p)):
                    if sha256_file(p) != entry[f"{key}_sha256"]:
                        raise ShardError(f"{p}: sha256 differs from the manifest (corrupt shard)")
            count = int(entry["num_samples"])
            if self.verify != "none":
                header_count = int(read_header(idx_p)["num_samples"])
                if count < 0 or header_count != count:
                    raise ShardError(f"{idx_p}: {header_count} samples, manifest says {count}")
            self.shards.append(ShardReader(bin_p, idx_p))
            counts.append(count)
        return counts

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_arrays"] = {}
        return state

    def __len__(self) -> int:
        return int(self._cum[-1])

    @property
    def placeholder_id(self) -> int:
        return int(self.manifest["placeholder_id"])

    @property
    def special_ids(self) -> dict[str, int]:
        """Token ids of the 12 special tokens and the template's control tokens."""
        return dict(self.manifest["tokenizer"]["special_ids"])

    @property
    def merge(self) -> int:
        return int(self.manifest["image"]["merge"])

    def _concat(self, name: str) -> np.ndarray:
        if name not in self._arrays:
            parts = [np.asarray(s.records[name], dtype=np.int64) for s in self.shards]
            arr = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            if len(arr) != len(self):
                raise ShardError(
                    f"{self.root}: shards hold {len(arr)} samples, manifest says {len(self)}"
                )
            arr.setflags(write=False)
            self._arrays[name] = arr
        return self._arrays[name]

    @property
    def llm_tokens(self) -> np.ndarray:
        """int64 ``[n]`` read-only: each sample's LLM tokens (image blocks expanded)."""
        return self._concat("llm_tokens")

    @property
    def patches(self) -> np.ndarray:
        """int64 ``[n]`` read-only: each sample's vision patches (all images and scales)."""
        return self._concat("patches")

    @property
    def patches_sq(self) -> np.ndarray:
        """int64 ``[n]`` read-only: each sample's sum of squared patches per image scale
        (``ShardReader.patches_sq``: what the vision attention's cost grows with)."""
        if "patches_sq" not in self._arrays:
            parts = [s.patches_sq for s in self.shards]
            arr = np.concatenate(parts) if parts else np.zeros(0, np.int64)
            arr.setflags(write=False)
            self._arrays["patches_sq"] = arr
        return self._arrays["patches_sq"]

    @property
    def num_images(self) -> np.ndarray:
        """int64 ``[n]`` read-only: images per sample."""
        return self._concat("num_images")

    @property
    def dataset_ids(self) -> np.ndarray:
        """int64 ``[n]`` read-only: index into ``manifest["datasets"]`` of each sample."""
        return self._concat("dataset")

    def shard_of(self, i: int) -> tuple[int, int]:
        """``(shard number, index inside that shard)`` of global sample ``i``."""
        i = operator.index(i)
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} out of range for a corpus of {len(self)}")
        s = int(np.searchsorted(self._cum, i, side="right")) - 1
        return s, i - int(self._cum[s])

    def sample(self, i: int) -> Sample:
        """Global sample ``i`` (``Sample.index == i``)."""
        s, j = self.shard_of(i)
        return self.shards[s].sample(j, index_as=operator.index(i))

    def __getitem__(self, i: int) -> Sample:
        return self.sample(i)
