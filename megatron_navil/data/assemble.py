"""Building one packed sequence from its samples: the work done in data-loader workers.

Per packed sequence (``[k, 2]`` draws ``(dataset, sample)`` from the plan, in layout order):

1. read each sample from its memory-mapped shard (``ShardDataset.sample``);
2. images (:func:`load_image_scales`): decode with Pillow at full size, then resample to
   every stored scale size with bicubic (``Image.resize(..., BICUBIC)``) unless the image
   already is that size, as the released NaViL code does (bitwise its pixels); the base scale
   is the stored ``smart_resize`` target, smaller (VMP) scales are resampled from the same
   decoded image. Opt-in (``draft=True``): for a JPEG whose base scale is smaller than the
   stored image, ``Image.draft`` lets libjpeg decode at a reduced size that is still at least
   the base scale (1/2, 1/4 or 1/8): much faster for large photos, but its pixels differ from
   the full decode's, so from what the released models were trained on;
3. ``ops.patchify_batch`` over all scales of all images of the sequence in one call (C++,
   GIL released), grids checked against the index;
4. ``expand_image_blocks`` turns each ``<img>`` placeholder into the image's block; labels are
   next-token: ``labels[j] = ids[j + 1]`` when token ``j + 1`` is a loss target of the same
   sample, ``IGNORE_INDEX`` elsewhere (never across samples); position ids restart per sample;
5. a padding segment (``pad_id``, positions from 0, no loss) fills the sequence to
   ``seq_length``; ``cu_seqlens``, the vision inputs of ``ops.vision_kwargs`` (positions,
   segments and, with a ``vision_window_size``, the released code's window order) and the loss
   weights (:func:`megatron_navil.data.batch.loss_weights`) complete the
   :class:`~megatron_navil.data.batch.PackedBatch`.

The result is a pure function of the draws and the builder's settings: it does not depend on
the worker, the number of workers or timing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from megatron_navil.config.tokens import IGNORE_INDEX, VISUAL_TOKENS
from megatron_navil.data.batch import LOSS_WEIGHTINGS, PackedBatch, loss_weights
from megatron_navil.data.shards.corpus import ShardDataset
from megatron_navil.data.shards.format import ShardError
from megatron_navil.data.shards.samples import ImageEntry, expand_image_blocks
from megatron_navil.data.tokenizer import fingerprints
from megatron_navil.ops import ImageGeometry, patchify_batch, vision_kwargs


def _pixels(img: Image.Image) -> torch.Tensor:
    """uint8 ``[h, w, 3]`` tensor of an RGB image: one copy (``tobytes``), shared zero-copy
    with torch (``np.asarray`` would give a read-only array that patchify copies again)."""
    data = img.tobytes()
    with warnings.catch_warnings():  # "buffer is not writable": nothing writes to it
        warnings.simplefilter("ignore", UserWarning)
        flat = torch.frombuffer(data, dtype=torch.uint8)
    return flat.view(img.height, img.width, 3)


def load_image_scales(entry: ImageEntry, draft: bool = False) -> list[torch.Tensor]:
    """uint8 ``[h, w, 3]`` tensors of ``entry`` at each of its stored scales (smallest first).

    Decodes once, at full size by default (the released NaViL code's pixels), and resamples to
    each scale with bicubic (see the module doc). ``draft=True`` opts into JPEG draft mode when
    the base scale is smaller than the stored image on both sides: faster, not the same pixels.
    """
    base_h, base_w = entry.scales[-1]
    orig_h, orig_w = entry.orig_size
    shrink = draft and base_h < orig_h and base_w < orig_w
    img = entry.decode(draft=(base_h, base_w) if shrink else None)
    out = []
    for h, w in entry.scales:
        if (img.height, img.width) == (h, w):
            out.append(_pixels(img))
        else:
            out.append(_pixels(img.resize((w, h), Image.Resampling.BICUBIC)))
    return out


def check_compatible(datasets: Sequence[ShardDataset]) -> None:
    """ValueError unless ``datasets`` were indexed with one tokenizer, patch size, merge,
    normalisation, image rule and placeholder id (what one model can train on together)."""
    first = datasets[0].manifest
    norm = ImageGeometry.from_manifest(first["image"])
    for ds in datasets[1:]:
        m = ds.manifest
        if not fingerprints(first["tokenizer"]) & fingerprints(m["tokenizer"]):
            raise ValueError(
                f"corpora {datasets[0].root} and {ds.root} were indexed with different "
                "tokenizers; blend only corpora indexed with the same tokenizer"
            )
        for key, a, b in (
            ("image patch", first["image"]["patch"], m["image"]["patch"]),
            ("image merge", first["image"]["merge"], m["image"]["merge"]),
            ("image rule", first["image"].get("rule"), m["image"].get("rule")),
            ("image mean", norm.mean, ImageGeometry.from_manifest(m["image"]).mean),
            ("image std", norm.std, ImageGeometry.from_manifest(m["image"]).std),
            ("placeholder id", first["placeholder_id"], m["placeholder_id"]),
        ):
            if a != b:
                raise ValueError(
                    f"corpora {datasets[0].root} and {ds.root} differ in {key} ({a} vs {b}); "
                    "blend only corpora indexed with the same tokenizer and image settings"
                )


class PackedSequenceBuilder:
    """Builds :class:`PackedBatch` es from draws over ``datasets`` (module doc).

    Args:
        datasets: the blend's corpora (same tokenizer and image settings).
        seq_length: LLM tokens per sequence; with ``pad`` every batch has exactly this many.
        loss_weighting: ``"token"``, ``"sample"`` or ``"square"``.
        pad_id: token id of the padding segment (default 0; must not be a visual token).
        pad: pad every sequence to ``seq_length`` (False: only the samples' tokens).
        patch_dtype: ``torch.float32`` or ``torch.bfloat16`` patches.
        mean, std: per-channel normalisation (default: the corpora's, which their manifest
            records from the model's ``ImageConfig``; NaViL's is 0.5, 0.5).
        draft: JPEG draft-mode decoding when downscaling (opt-in: faster for large JPEGs, but
            not the pixels of the released code's full decode; default False).
        pixels: decode and patchify the images (False: ``patches`` is ``[0, 3 * patch *
            patch]`` and every other field is unchanged, grids and positions coming from the
            index; for pipeline stages after the first, which never read pixels, so they do
            not pay for decoding and resampling).
        vision_window_size: the model's ``VisionConfig.window_size`` (patches; None: raster
            order): each batch then carries the window order its vision encoder runs in.
    """

    def __init__(
        self,
        datasets: Sequence[ShardDataset],
        seq_length: int,
        loss_weighting: str = "token",
        pad_id: int = 0,
        pad: bool = True,
        patch_dtype: torch.dtype = torch.float32,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
        draft: bool = False,
        pixels: bool = True,
        vision_window_size: int | None = None,
    ):
        if not datasets:
            raise ValueError("PackedSequenceBuilder: no datasets")
        if loss_weighting not in LOSS_WEIGHTINGS:
            raise ValueError(
                f"loss_weighting must be one of {LOSS_WEIGHTINGS}, got {loss_weighting!r}"
            )
        if int(seq_length) < 1:
            raise ValueError(f"seq_length must be >= 1, got {seq_length}")
        check_compatible(datasets)
        self.datasets = list(datasets)
        self.seq_length = int(seq_length)
        self.loss_weighting = loss_weighting
        self.pad = bool(pad)
        self.patch_dtype = patch_dtype
        ds0 = self.datasets[0]
        geometry = ImageGeometry.from_manifest(ds0.manifest["image"])
        self.mean = geometry.mean if mean is None else tuple(mean)
        self.std = geometry.std if std is None else tuple(std)
        self.draft = bool(draft)
        self.pixels = bool(pixels)
        self.special_ids = ds0.special_ids
        self.placeholder_id = ds0.placeholder_id
        self.merge = int(ds0.manifest["image"]["merge"])
        self.patch = int(ds0.manifest["image"]["patch"])
        if vision_window_size is not None and (
            int(vision_window_size) < self.merge or int(vision_window_size) % self.merge
        ):
            raise ValueError(
                f"vision_window_size {vision_window_size} must be a positive multiple of the "
                f"corpus's merge size {self.merge}"
            )
        self.window = None if vision_window_size is None else int(vision_window_size) // self.merge
        visual = {self.special_ids[k] for k in VISUAL_TOKENS}
        if int(pad_id) in visual:
            raise ValueError(f"pad_id {pad_id} is a visual token id ({sorted(visual)})")
        self.pad_id = int(pad_id)

    def build(self, draws: np.ndarray, seq_index: int = 0, epoch: int = 0) -> PackedBatch:
        """The packed sequence of ``draws`` (int ``[k, 2]`` ``(dataset, sample)``).

        Raises:
            ShardError: a sample disagrees with its index (block length, grids), or the
                samples need more than ``seq_length`` tokens.
        """
        draws = np.asarray(draws, np.int64).reshape(-1, 2)
        ids_parts, label_parts, pos_parts, lengths = [], [], [], []
        arrays: list[torch.Tensor] = []
        grids: list[tuple[int, int]] = []
        for d, s in draws.tolist():
            sample = self.datasets[d].sample(s)
            ids, mask = expand_image_blocks(
                sample.tokens,
                sample.loss_mask,
                sample.images,
                self.special_ids,
                self.placeholder_id,
                self.merge,
            )
            n = len(ids)
            if n != sample.llm_tokens:
                raise ShardError(
                    f"dataset {d} sample {s}: {n} tokens after expansion, index says "
                    f"{sample.llm_tokens}"
                )
            labels = np.full(n, IGNORE_INDEX, np.int64)
            labels[:-1] = np.where(mask[1:], ids[1:], IGNORE_INDEX)
            ids_parts.append(ids)
            label_parts.append(labels)
            pos_parts.append(np.arange(n, dtype=np.int64))
            lengths.append(n)
            for image in sample.images:
                if self.pixels:
                    arrays.extend(load_image_scales(image, self.draft))
                grids.extend(image.grids)
        used = sum(lengths)
        if used > self.seq_length:
            raise ShardError(f"samples need {used} tokens > seq_length {self.seq_length}")
        if self.pad and used < self.seq_length:
            pad = self.seq_length - used
            ids_parts.append(np.full(pad, self.pad_id, np.int64))
            label_parts.append(np.full(pad, IGNORE_INDEX, np.int64))
            pos_parts.append(np.arange(pad, dtype=np.int64))
            lengths.append(pad)
        cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        labels = np.concatenate(label_parts) if label_parts else np.zeros(0, np.int64)
        patches, got = patchify_batch(
            arrays, self.patch, self.merge, self.mean, self.std, self.patch_dtype
        )
        if self.pixels and got != grids:
            raise ShardError(f"patch grids {got} differ from the index's {grids}")
        vision = vision_kwargs(grids, self.merge, self.window)
        return PackedBatch(
            input_ids=torch.from_numpy(np.concatenate(ids_parts)),
            position_ids=torch.from_numpy(np.concatenate(pos_parts)),
            cu_seqlens=torch.from_numpy(cu.astype(np.int32)),
            labels=torch.from_numpy(labels),
            loss_weights=torch.from_numpy(loss_weights(labels, cu, self.loss_weighting)),
            patches=patches,
            patch_positions=vision["patch_positions"],
            vision_cu_seqlens=vision["vision_cu_seqlens"],
            sample_keys=torch.from_numpy(draws.copy()),
            seq_index=int(seq_index),
            epoch=int(epoch),
            vision_window_index=vision.get("vision_window_index"),
            vision_window_cu_seqlens=vision.get("vision_window_cu_seqlens"),
        )
