"""Writing one shard (``.bin`` + ``.idx``, see ``data/shards/format.py``)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from megatron_navil.data.shards.format import (
    FORMATS,
    HEADER_DTYPE,
    HEADER_SIZE,
    IMAGE_DTYPE,
    MAGIC,
    RUN_DTYPE,
    SAMPLE_DTYPE,
    SCALE_DTYPE,
    SCHEMA_VERSION,
    ShardError,
    align,
)
from megatron_navil.data.shards.samples import ImageEntry, image_cost, loss_runs


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
            pos = align(pos)
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
