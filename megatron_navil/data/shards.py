"""The on-disk shard format of indexed corpora and its memory-mapped reader.

An indexed corpus is a directory written by ``tools/index_corpus.py``::

    OUT/manifest.json         the global manifest (written last, by ``finalize``)
    OUT/plan.json             the work plan (inputs, units, settings); the same on every machine
    OUT/tokenizer.json|.model a copy of the tokenizer the tokens were made with
    OUT/shards/NNNNNN-PPP.bin data: per sample its token ids, then its encoded images
    OUT/shards/NNNNNN-PPP.idx index: header + fixed-width records (numpy-memmappable)
    OUT/units/NNNNNN.json     per work unit: its shards, counts, skips (the resume marker)

Shard ``NNNNNN-PPP`` is part ``PPP`` of work unit ``NNNNNN`` (a contiguous range of input
records of one dataset); a unit rolls over to a new part when the ``.bin`` would grow past
``--shard-size-mb`` (a single sample larger than that gets a part of its own). The global sample
order is the manifest's shard order, samples in file order inside a shard.

``.bin`` (little-endian, no header): for each sample, ``tok_count`` token ids as uint32
starting at byte ``tok_offset`` (4-aligned), then the sample's images' encoded bytes (JPEG, PNG
or WebP), each at its ``byte_offset``/``byte_len``; zero bytes pad to the next 4-byte boundary.

Text is stored with ONE placeholder token per image where its image block goes: the id of
``<img>`` (``manifest["placeholder_id"]``, also in every ``.idx`` header). User text can never
contain ``<img>`` (the indexer skips such samples, reason ``reserved_token_in_text``), so the
k-th ``<img>`` of a sample's tokens is its k-th image. The loader replaces each by the full
block ``image_token_layout(merged grids of that image's scales)`` (it starts with ``<img>``
itself), see :func:`expand_image_blocks`. Loss-mask runs are over the stored (unexpanded)
tokens; a placeholder is never in the loss, nor is any token of an expanded block.
``loss_mask[t] == 1`` marks token ``t`` as a *target* (the loader shifts for next-token labels).

``.idx`` (little-endian): a 128-byte header (:data:`HEADER_DTYPE`: magic ``b"NAVILIDX"``,
schema version, counts, byte offsets of the sections), then four sections, each 64-aligned:

* samples ``[num_samples]`` :data:`SAMPLE_DTYPE` (64 bytes): ``tok_offset`` (byte offset in
  .bin), ``image_start`` (first row in images), ``run_start`` (first row in runs),
  ``llm_tokens`` (text tokens with each placeholder expanded to its whole image block:
  ``tok_count - num_images + sum len(image_token_layout(merged grids))``), ``patches`` (sum of
  ``gh * gw`` over all its images' scales), ``record`` (0-based index of the source record in
  its dataset: the JSONL line - 1, the CSV row, the tar sample), ``tok_count``, ``num_images``,
  ``run_count``, ``dataset`` (index into ``manifest["datasets"]``);
* images ``[num_images]`` :data:`IMAGE_DTYPE` (40 bytes): ``byte_offset``, ``byte_len`` (in
  .bin), ``scale_start`` (first row in scales), ``orig_h``, ``orig_w`` (of the stored image),
  ``num_scales``, ``format`` (0 JPEG, 1 PNG, 2 WebP), ``converted`` (1: re-encoded as PNG from a
  mode or format the loader would not read as is: CMYK, 16-bit, alpha, palette, ...);
* scales ``[num_scales]`` :data:`SCALE_DTYPE` (16 bytes), per image smallest first (VMP, or
  just the base when multi-scale is off): ``h``, ``w`` (size to resample the stored image to;
  the last scale is ``smart_resize``'s target), ``gh``, ``gw`` (its patch grid,
  ``merged_grid(h, w)``: the merged grid is ``(gh // merge, gw // merge)``);
* runs ``[num_runs]`` :data:`RUN_DTYPE` (8 bytes): ``start``, ``length``: loss-mask runs, token
  positions relative to the sample's first token.

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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from megatron_navil.data.tokenizer import SENTENCEPIECE_RULE

MAGIC = b"NAVILIDX"
SCHEMA_VERSION = 1
IMAGE_RULE = "navil-release"
"""The image geometry a corpus's stored scale sizes follow, recorded as the manifest's
``image["rule"]`` (the indexer's ``ImageSettings.rule``). ``"navil-release"`` names the released
NaViL code's rules (../shared/NAVIL.md, "The released code's exact behaviour", 2 and 3):
``ops.smart_resize`` = Qwen2-VL's smart_resize with factor 1 on raw pixels, and
``ops.scales_for_image`` = the demo's multi-scale chain with its float32 budget. Manifests
without it were indexed with the earlier rule (no resize while the padded patch count is in
bounds, a sqrt(2)/2 area-halving chain) and are refused. A change to either op that alters a
stored size needs a new name here."""
MANIFEST_NAME = "manifest.json"
HEADER_SIZE = 128
ALIGN = 64

FORMATS = ("jpeg", "png", "webp")
"""Encoded image formats by their code in ``IMAGE_DTYPE['format']``."""

HEADER_DTYPE = np.dtype(
    [
        ("magic", "S8"),
        ("version", "<u4"),
        ("header_size", "<u4"),
        ("placeholder_id", "<u4"),
        ("token_bytes", "<u4"),  # 4: uint32 little-endian
        ("num_samples", "<u8"),
        ("num_images", "<u8"),
        ("num_scales", "<u8"),
        ("num_runs", "<u8"),
        ("bin_size", "<u8"),
        ("samples_offset", "<u8"),
        ("images_offset", "<u8"),
        ("scales_offset", "<u8"),
        ("runs_offset", "<u8"),
        ("file_size", "<u8"),
        ("merge", "<u4"),  # merge factor the block lengths (llm_tokens) were computed with
        ("reserved", "S20"),
    ]
)
assert HEADER_DTYPE.itemsize == HEADER_SIZE

SAMPLE_DTYPE = np.dtype(
    [
        ("tok_offset", "<u8"),
        ("image_start", "<u8"),
        ("run_start", "<u8"),
        ("llm_tokens", "<i8"),
        ("patches", "<i8"),
        ("record", "<u8"),
        ("tok_count", "<u4"),
        ("num_images", "<u4"),
        ("run_count", "<u4"),
        ("dataset", "<u4"),
    ]
)
IMAGE_DTYPE = np.dtype(
    [
        ("byte_offset", "<u8"),
        ("byte_len", "<u8"),
        ("scale_start", "<u8"),
        ("orig_h", "<u4"),
        ("orig_w", "<u4"),
        ("num_scales", "<u4"),
        ("format", "u1"),
        ("converted", "u1"),
        ("pad", "S2"),
    ]
)
SCALE_DTYPE = np.dtype([("h", "<u4"), ("w", "<u4"), ("gh", "<u4"), ("gw", "<u4")])
RUN_DTYPE = np.dtype([("start", "<u4"), ("length", "<u4")])
assert SAMPLE_DTYPE.itemsize == 64 and IMAGE_DTYPE.itemsize == 40


class ShardError(ValueError):
    """A shard or manifest is missing, corrupt or inconsistent (message: one line)."""


def _align(n: int, a: int = ALIGN) -> int:
    return -(-n // a) * a


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex sha256 of a file, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Samples as the writer takes them and the reader gives them back


@dataclass(frozen=True)
class ImageEntry:
    """One image of a sample: its encoded bytes and what the loader needs to process it."""

    data: bytes
    """Encoded bytes as stored (JPEG/PNG/WebP)."""
    format: str
    """``"jpeg"``, ``"png"`` or ``"webp"``."""
    orig_size: tuple[int, int]
    """``(height, width)`` of the stored image."""
    scales: tuple[tuple[int, int], ...]
    """``(height, width)`` to resample to, per scale, smallest first; the last is the base."""
    grids: tuple[tuple[int, int], ...]
    """Patch grid ``(gh, gw)`` of each scale (``merged_grid``); merged grid = grid // merge."""
    converted: bool = False
    """True when the bytes were re-encoded as PNG (mode or format conversion)."""

    def decode(self, draft: tuple[int, int] | None = None):
        """The image as an RGB ``PIL.Image``. ``draft=(h, w)``: for JPEG, let libjpeg decode
        at a reduced scale no smaller than that (``Image.draft``), for fast downscaling."""
        import io

        from PIL import Image

        img = Image.open(io.BytesIO(self.data))
        if draft is not None and img.format == "JPEG":
            img.draft("RGB", (int(draft[1]), int(draft[0])))
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")


@dataclass(frozen=True)
class Sample:
    """One indexed sample (tokens with one placeholder per image, see the module doc)."""

    index: int
    """Index in the reader it came from (global for ShardDataset, local for ShardReader)."""
    tokens: np.ndarray
    """int64 ``[T]`` stored token ids; each image is one ``placeholder_id`` token."""
    loss_mask: np.ndarray
    """bool ``[T]``: True where the token is a training target."""
    images: tuple[ImageEntry, ...]
    """The sample's images, in placeholder order."""
    llm_tokens: int
    """Tokens after expanding every placeholder into its image block."""
    patches: int
    """Vision patches over all images and scales."""
    dataset: int
    """Index into ``manifest["datasets"]``."""
    record: int
    """0-based index of the source record in its dataset."""


def loss_runs(mask: Sequence[bool] | np.ndarray) -> np.ndarray:
    """``[k, 2]`` int64 ``(start, length)`` runs of True in a boolean mask."""
    m = np.asarray(mask, dtype=bool).astype(np.int8)
    if m.size == 0:
        return np.zeros((0, 2), np.int64)
    d = np.diff(np.concatenate([[0], m, [0]]))
    starts = np.flatnonzero(d == 1)
    ends = np.flatnonzero(d == -1)
    return np.stack([starts, ends - starts], axis=1).astype(np.int64)


def image_cost(scales_grids: Sequence[tuple[int, int]], merge: int) -> tuple[int, int]:
    """``(block tokens, patches)`` of one image from its per-scale patch grids.

    Block tokens = ``len(image_token_layout(merged grids))`` = ``2 + sum(h * (w + 1) + 1)``.
    """
    tokens, patches = 2, 0
    for gh, gw in scales_grids:
        h, w = gh // merge, gw // merge
        tokens += h * (w + 1) + 1
        patches += gh * gw
    return tokens, patches


def expand_image_blocks(
    tokens: np.ndarray,
    loss_mask: np.ndarray,
    images: Sequence[ImageEntry],
    special_ids: dict[str, int],
    placeholder_id: int,
    merge: int = 2,
) -> tuple[np.ndarray, np.ndarray]:
    """Replace each placeholder by its image block; returns ``(ids, loss_mask)`` int64/bool.

    The block's token kinds come from ``ops.image_token_layout`` semantics (``<img>``, per
    scale ``h`` rows of ``w`` ``<IMG_CONTEXT>`` + ``<IMG_LINE_BREAK>``, ``<IMG_FRAME_BREAK>``,
    ``</img>``); block tokens are never in the loss.
    """
    pos = np.flatnonzero(tokens == placeholder_id)
    if len(pos) != len(images):
        raise ShardError(f"sample has {len(pos)} placeholders but {len(images)} images")
    ctx, lb, fb = (
        special_ids[k] for k in ("<IMG_CONTEXT>", "<IMG_LINE_BREAK>", "<IMG_FRAME_BREAK>")
    )
    out_ids: list[np.ndarray] = []
    out_mask: list[np.ndarray] = []
    prev = 0
    for p, image in zip(pos, images, strict=True):
        out_ids.append(tokens[prev:p].astype(np.int64))
        out_mask.append(loss_mask[prev:p].astype(bool))
        parts = [np.array([special_ids["<img>"]], np.int64)]
        for gh, gw in image.grids:
            h, w = gh // merge, gw // merge
            rows = np.full((h, w + 1), ctx, np.int64)
            rows[:, w] = lb
            parts += [rows.reshape(-1), np.array([fb], np.int64)]
        parts.append(np.array([special_ids["</img>"]], np.int64))
        block = np.concatenate(parts)
        out_ids.append(block)
        out_mask.append(np.zeros(len(block), bool))
        prev = p + 1
    out_ids.append(tokens[prev:].astype(np.int64))
    out_mask.append(loss_mask[prev:].astype(bool))
    return np.concatenate(out_ids), np.concatenate(out_mask)


# --------------------------------------------------------------------------------------------
# Writer


class ShardWriter:
    """Writes one shard (``.bin`` + ``.idx``) to the given paths; call :meth:`close` to finish.

    The caller writes to temporary names and renames (the indexer does); the writer only
    streams the ``.bin`` and builds the index in memory (64 + 40/image bytes per sample).
    """

    def __init__(
        self,
        bin_path: str | os.PathLike,
        idx_path: str | os.PathLike,
        placeholder_id: int,
        merge: int = 2,
    ):
        self.bin_path, self.idx_path = Path(bin_path), Path(idx_path)
        self.placeholder_id = int(placeholder_id)
        self.merge = int(merge)
        self._bin = open(self.bin_path, "wb")
        self._hash = hashlib.sha256()
        self._pos = 0
        self._tokens = self._llm_tokens = self._patches = 0
        self._samples: list[tuple] = []
        self._images: list[tuple] = []
        self._scales: list[tuple] = []
        self._runs: list[tuple] = []

    @property
    def bin_size(self) -> int:
        """Bytes written to the ``.bin`` so far."""
        return self._pos

    @property
    def num_samples(self) -> int:
        return len(self._samples)

    def _write(self, data: bytes) -> int:
        start = self._pos
        pad = b"\0" * (-(start + len(data)) % 4)
        for chunk in (data, pad):
            self._bin.write(chunk)
            self._hash.update(chunk)
        self._pos += len(data) + len(pad)
        return start

    @staticmethod
    def sample_bytes(tokens: Sequence[int], images: Sequence[ImageEntry]) -> int:
        """Upper bound of the ``.bin`` bytes a sample takes (for the size roll-over)."""
        return 4 * len(tokens) + sum(len(im.data) + 3 for im in images)

    def add(
        self,
        tokens: Sequence[int] | np.ndarray,
        loss_mask: Sequence[bool] | np.ndarray,
        images: Sequence[ImageEntry],
        dataset: int,
        record: int,
    ) -> tuple[int, int]:
        """Append a sample; returns its ``(llm_tokens, patches)``.

        Raises ShardError when the placeholder count differs from the number of images, or a
        token id does not fit uint32 (the indexer checks both before calling).
        """
        toks = np.asarray(tokens, dtype=np.int64)
        mask = np.asarray(loss_mask, dtype=bool)
        if toks.ndim != 1 or mask.shape != toks.shape:
            raise ShardError("tokens and loss_mask must be 1-D of the same length")
        if toks.size and (toks.min() < 0 or toks.max() >= 2**32):
            raise ShardError("token id outside uint32")
        n_ph = int(np.count_nonzero(toks == self.placeholder_id))
        if n_ph != len(images):
            raise ShardError(f"{n_ph} placeholders for {len(images)} images")
        if np.any(mask[toks == self.placeholder_id]):
            raise ShardError("a placeholder is in the loss mask")
        tok_offset = self._write(toks.astype("<u4").tobytes())
        image_start = len(self._images)
        llm_tokens, patches = len(toks) - len(images), 0
        for im in images:
            if len(im.scales) != len(im.grids) or not im.scales:
                raise ShardError("an image needs one grid per scale and at least one scale")
            off = self._write(im.data)
            self._images.append(
                (
                    off,
                    len(im.data),
                    len(self._scales),
                    im.orig_size[0],
                    im.orig_size[1],
                    len(im.scales),
                    FORMATS.index(im.format),
                    int(im.converted),
                    b"",
                )
            )
            for (h, w), (gh, gw) in zip(im.scales, im.grids, strict=True):
                self._scales.append((h, w, gh, gw))
            t, p = image_cost(im.grids, self.merge)
            llm_tokens += t
            patches += p
        self._tokens += len(toks)
        self._llm_tokens += llm_tokens
        self._patches += patches
        runs = loss_runs(mask)
        run_start = len(self._runs)
        self._runs.extend(map(tuple, runs.tolist()))
        self._samples.append(
            (
                tok_offset,
                image_start,
                run_start,
                llm_tokens,
                patches,
                record,
                len(toks),
                len(images),
                len(runs),
                dataset,
            )
        )
        return llm_tokens, patches

    def abort(self) -> None:
        """Close the ``.bin`` without writing the index (the caller removes the files)."""
        self._bin.close()

    def close(self) -> dict:
        """Flush the ``.bin``, write the ``.idx``; returns sizes, sha256s and totals."""
        self._bin.flush()
        os.fsync(self._bin.fileno())
        self._bin.close()
        sections = [
            np.array(self._samples, SAMPLE_DTYPE),
            np.array(self._images, IMAGE_DTYPE),
            np.array(self._scales, SCALE_DTYPE),
            np.array(self._runs, RUN_DTYPE),
        ]
        offsets, pos = [], HEADER_SIZE
        for arr in sections:
            pos = _align(pos)
            offsets.append(pos)
            pos += arr.nbytes
        header = np.zeros((), HEADER_DTYPE)
        header["magic"] = MAGIC
        header["version"] = SCHEMA_VERSION
        header["header_size"] = HEADER_SIZE
        header["placeholder_id"] = self.placeholder_id
        header["token_bytes"] = 4
        for name, arr in zip(
            ("num_samples", "num_images", "num_scales", "num_runs"), sections, strict=True
        ):
            header[name] = len(arr)
        header["bin_size"] = self._pos
        for name, off in zip(("samples", "images", "scales", "runs"), offsets, strict=True):
            header[f"{name}_offset"] = off
        header["file_size"] = pos
        header["merge"] = self.merge
        parts, pos = [header.tobytes()], HEADER_SIZE
        for arr, off in zip(sections, offsets, strict=True):
            parts += [b"\0" * (off - pos), arr.tobytes()]
            pos = off + arr.nbytes
        idx = b"".join(parts)
        with open(self.idx_path, "wb") as f:
            f.write(idx)
            f.flush()
            os.fsync(f.fileno())
        return {
            "bin_size": self._pos,
            "idx_size": len(idx),
            "bin_sha256": self._hash.hexdigest(),
            "idx_sha256": hashlib.sha256(idx).hexdigest(),
            "num_samples": len(self._samples),
            "num_images": len(self._images),
            "tokens": self._tokens,
            "llm_tokens": self._llm_tokens,
            "patches": self._patches,
        }


# --------------------------------------------------------------------------------------------
# Reader


def _read_header(idx_path: Path) -> np.void:
    try:
        with open(idx_path, "rb") as f:
            raw = f.read(HEADER_SIZE)
    except OSError as exc:
        raise ShardError(f"{idx_path}: cannot read ({exc.strerror})") from None
    if len(raw) < HEADER_SIZE:
        raise ShardError(f"{idx_path}: truncated header ({len(raw)} bytes)")
    header = np.frombuffer(raw, HEADER_DTYPE)[0]
    if header["magic"] != MAGIC:
        raise ShardError(f"{idx_path}: bad magic {bytes(header['magic'])!r}, not a NaViL index")
    if int(header["version"]) != SCHEMA_VERSION:
        raise ShardError(
            f"{idx_path}: schema version {int(header['version'])}, this reader reads "
            f"{SCHEMA_VERSION}"
        )
    return header


class ShardReader:
    """One shard, memory-mapped (nothing is loaded until accessed).

    The ``.idx`` structure is validated on first access (offsets within the ``.bin``, counts
    and sections consistent): a corrupt index raises :class:`ShardError`, never a wrong sample.
    Pickles without its maps (reopened lazily), for data-loader workers.
    """

    def __init__(self, bin_path: str | os.PathLike, idx_path: str | os.PathLike):
        self.bin_path, self.idx_path = Path(bin_path), Path(idx_path)
        self._maps: dict[str, Any] | None = None

    def __getstate__(self) -> dict:
        return {"bin_path": self.bin_path, "idx_path": self.idx_path, "_maps": None}

    def _open(self) -> dict[str, Any]:
        if self._maps is not None:
            return self._maps
        header = _read_header(self.idx_path)
        name = self.idx_path
        idx_size = self.idx_path.stat().st_size
        try:
            bin_size = self.bin_path.stat().st_size
        except OSError as exc:
            raise ShardError(f"{self.bin_path}: cannot read ({exc.strerror})") from None
        if int(header["file_size"]) != idx_size:
            raise ShardError(f"{name}: size {idx_size} != {int(header['file_size'])} in header")
        if int(header["bin_size"]) != bin_size:
            raise ShardError(
                f"{self.bin_path}: size {bin_size} != {int(header['bin_size'])} in its index"
            )
        idx_map = np.memmap(self.idx_path, np.uint8, mode="r") if idx_size else None
        arrays = {}
        for sec, dtype in (
            ("samples", SAMPLE_DTYPE),
            ("images", IMAGE_DTYPE),
            ("scales", SCALE_DTYPE),
            ("runs", RUN_DTYPE),
        ):
            off, count = int(header[f"{sec}_offset"]), int(header[f"num_{sec}"])
            end = off + count * dtype.itemsize
            if off < HEADER_SIZE or end > idx_size:
                raise ShardError(f"{name}: section {sec} [{off}, {end}) outside the file")
            arrays[sec] = idx_map[off:end].view(dtype) if count else np.zeros(0, dtype)
        bin_map = (
            np.memmap(self.bin_path, np.uint8, mode="r") if bin_size else np.zeros(0, np.uint8)
        )
        maps = {"header": header, "bin": bin_map, **arrays}
        self._validate(maps, bin_size)
        self._maps = maps
        return maps

    def _validate(self, m: dict[str, Any], bin_size: int) -> None:
        """Vectorised structural checks of the whole index (cheap next to the data)."""
        s, im, sc, rn = m["samples"], m["images"], m["scales"], m["runs"]

        def bad(why: str) -> ShardError:
            return ShardError(f"{self.idx_path}: corrupt index ({why})")

        n = len(s)
        if n:
            tok_off = s["tok_offset"].astype(np.uint64)
            tok_end = tok_off + s["tok_count"].astype(np.uint64) * np.uint64(4)
            if np.any(tok_off % 4) or np.any(tok_end > np.uint64(bin_size)):
                raise bad("token range outside the .bin")
            img_start, img_cnt = s["image_start"], s["num_images"].astype(np.uint64)
            expect = np.concatenate([[0], np.cumsum(img_cnt)[:-1]]).astype(np.uint64)
            if np.any(img_start != expect) or int(img_cnt.sum()) != len(im):
                raise bad("image rows do not tile the images section")
            run_start, run_cnt = s["run_start"], s["run_count"].astype(np.uint64)
            expect = np.concatenate([[0], np.cumsum(run_cnt)[:-1]]).astype(np.uint64)
            if np.any(run_start != expect) or int(run_cnt.sum()) != len(rn):
                raise bad("run rows do not tile the runs section")
            if np.any(s["llm_tokens"] < 1) or np.any(s["patches"] < 0):
                raise bad("negative token or patch count")
            if len(rn):
                owner = np.repeat(np.arange(n), s["run_count"].astype(np.int64))
                end = rn["start"].astype(np.uint64) + rn["length"].astype(np.uint64)
                if np.any(rn["length"] == 0) or np.any(
                    end > s["tok_count"][owner].astype(np.uint64)
                ):
                    raise bad("loss-mask run outside its sample")
        elif len(im) or len(rn):
            raise bad("images or runs without samples")
        if len(im):
            b_end = im["byte_offset"].astype(np.uint64) + im["byte_len"].astype(np.uint64)
            if np.any(b_end > np.uint64(bin_size)) or np.any(im["byte_len"] == 0):
                raise bad("image bytes outside the .bin")
            if np.any(im["format"] >= len(FORMATS)):
                raise bad("unknown image format code")
            sc_cnt = im["num_scales"].astype(np.uint64)
            expect = np.concatenate([[0], np.cumsum(sc_cnt)[:-1]]).astype(np.uint64)
            if np.any(im["scale_start"] != expect) or int(sc_cnt.sum()) != len(sc):
                raise bad("scale rows do not tile the scales section")
            if np.any(sc_cnt == 0) or np.any(im["orig_h"] == 0) or np.any(im["orig_w"] == 0):
                raise bad("image without scales or with a zero size")
        elif len(sc):
            raise bad("scales without images")
        if len(sc):
            # the derived counts must agree with the grids (catches a flipped grid or count)
            merge = np.uint64(max(1, int(m["header"]["merge"])))
            gh, gw = sc["gh"].astype(np.uint64), sc["gw"].astype(np.uint64)
            sc_tok = (gh // merge) * (gw // merge + np.uint64(1)) + np.uint64(1)
            starts = im["scale_start"].astype(np.int64)
            img_tok = np.add.reduceat(sc_tok, starts) + np.uint64(2) if len(im) else sc_tok[:0]
            img_pat = np.add.reduceat(gh * gw, starts) if len(im) else sc_tok[:0]
        if n:
            llm = s["tok_count"].astype(np.uint64) - s["num_images"].astype(np.uint64)
            pat = np.zeros(n, np.uint64)
            has = s["num_images"] > 0
            if len(im) and has.any():
                first = s["image_start"][has].astype(np.int64)
                llm[has] += np.add.reduceat(img_tok, first)
                pat[has] = np.add.reduceat(img_pat, first)
            if np.any(llm != s["llm_tokens"].astype(np.uint64)) or np.any(
                pat != s["patches"].astype(np.uint64)
            ):
                raise bad("llm_tokens/patches disagree with the image grids")
        if len(sc) and (
            np.any(sc["h"] == 0)
            or np.any(sc["w"] == 0)
            or np.any(sc["gh"] == 0)
            or np.any(sc["gw"] == 0)
        ):
            raise bad("zero scale size or grid")

    def __len__(self) -> int:
        return len(self._open()["samples"])

    @property
    def placeholder_id(self) -> int:
        return int(self._open()["header"]["placeholder_id"])

    @property
    def records(self) -> np.ndarray:
        """The samples section (structured, read-only memmap): all per-sample fields."""
        return self._open()["samples"]

    @property
    def llm_tokens(self) -> np.ndarray:
        """int64 ``[n]``: LLM tokens of each sample (image blocks expanded)."""
        return np.asarray(self._open()["samples"]["llm_tokens"], dtype=np.int64)

    @property
    def patches(self) -> np.ndarray:
        """int64 ``[n]``: vision patches of each sample."""
        return np.asarray(self._open()["samples"]["patches"], dtype=np.int64)

    def sample(self, i: int, index_as: int | None = None) -> Sample:
        """Sample ``i`` of this shard (copies its tokens and image bytes out of the maps)."""
        m = self._open()
        i = operator.index(i)
        n = len(m["samples"])
        if not 0 <= i < n:
            raise IndexError(f"sample {i} out of range for a shard of {n}")
        r = m["samples"][i]
        off, cnt = int(r["tok_offset"]), int(r["tok_count"])
        tokens = m["bin"][off : off + 4 * cnt].view("<u4").astype(np.int64)
        mask = np.zeros(cnt, bool)
        rs = int(r["run_start"])
        for start, length in m["runs"][rs : rs + int(r["run_count"])].tolist():
            mask[start : start + length] = True
        images = []
        i0 = int(r["image_start"])
        for rec in m["images"][i0 : i0 + int(r["num_images"])]:
            b0, bl = int(rec["byte_offset"]), int(rec["byte_len"])
            s0, sn = int(rec["scale_start"]), int(rec["num_scales"])
            scales = m["scales"][s0 : s0 + sn]
            images.append(
                ImageEntry(
                    data=m["bin"][b0 : b0 + bl].tobytes(),
                    format=FORMATS[int(rec["format"])],
                    orig_size=(int(rec["orig_h"]), int(rec["orig_w"])),
                    scales=tuple(
                        (int(a), int(b)) for a, b in zip(scales["h"], scales["w"], strict=True)
                    ),
                    grids=tuple(
                        (int(a), int(b)) for a, b in zip(scales["gh"], scales["gw"], strict=True)
                    ),
                    converted=bool(rec["converted"]),
                )
            )
        return Sample(
            index=i if index_as is None else index_as,
            tokens=tokens,
            loss_mask=mask,
            images=tuple(images),
            llm_tokens=int(r["llm_tokens"]),
            patches=int(r["patches"]),
            dataset=int(r["dataset"]),
            record=int(r["record"]),
        )

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self.sample(i)


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
                header_count = int(_read_header(idx_p)["num_samples"])
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
