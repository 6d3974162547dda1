"""Reading one shard: memory-mapped, its ``.idx`` validated before the first sample is read."""

from __future__ import annotations

import operator
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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
)
from megatron_navil.data.shards.samples import ImageEntry, Sample


def read_header(idx_path: Path) -> np.void:
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
        header = read_header(self.idx_path)
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

    @property
    def patches_sq(self) -> np.ndarray:
        """int64 ``[n]``: each sample's sum, over its images and their scales, of the squared
        patch count of the scale (each scale is its own vision-attention segment, so this is
        what the vision attention's cost grows with), from the index alone."""
        m = self._open()
        scales, images, samples = m["scales"], m["images"], m["samples"]
        per_scale = scales["gh"].astype(np.int64) * scales["gw"].astype(np.int64)
        per_image = _segment_sums(per_scale**2, images["scale_start"], images["num_scales"])
        return _segment_sums(per_image, samples["image_start"], samples["num_images"])

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


def _segment_sums(values: np.ndarray, starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """int64 sums of ``values[start : start + count]`` for each (start, count)."""
    csum = np.concatenate([[0], np.cumsum(values, dtype=np.int64)])
    starts = np.asarray(starts, np.int64)
    return csum[starts + np.asarray(counts, np.int64)] - csum[starts]
