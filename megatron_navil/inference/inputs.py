"""What a captioning model is given: prompts cut from indexed samples or built for image files.

What the model is given (:class:`CaptionInput`) is the training sequence of a sample cut before
its answer: the stored tokens up to (not including) the first loss-masked token, every image
placeholder expanded into its image block, and the patches of those images. Both come from the
training loader's own code (``data.assemble.PackedSequenceBuilder``: same decoding, resampling
to the stored scales, patchify and normalisation), so evaluation sees exactly the pixels
training saw. Images given as files go through the indexer's sample builder first (the same
``smart_resize``/multi-scale geometry and chat template), then through the same loader code.
Several inputs go into one forward packed as training packs samples (:func:`pack_inputs`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from megatron_navil.config.model import NaViLConfig
from megatron_navil.data.assemble import PackedSequenceBuilder
from megatron_navil.data.shards.corpus import ShardDataset
from megatron_navil.data.shards.samples import ImageEntry, Sample, expand_image_blocks, image_cost
from megatron_navil.data.tokenizer import TextTokenizer
from megatron_navil.ops import patch_positions, vision_cu_seqlens, vision_kwargs

STOP_TOKEN = "<|im_end|>"
"""Ends an answer: dropped from references, stops generation."""


class CaptionError(ValueError):
    """A bad input to captioning (unusable sample or image): one line."""


@dataclass
class CaptionInput:
    """The model's input for one caption (layouts: ``models/navil.py``)."""

    source: str
    """Where it came from: ``"<corpus>[i]"`` or an image path."""
    input_ids: torch.Tensor
    """int64 ``[t]``: the prompt, image blocks expanded."""
    patches: torch.Tensor
    """float32 ``[p, 3 * patch * patch]`` of the prompt's images (``p`` may be 0)."""
    grids: tuple[tuple[int, int], ...]
    """Patch grid of every scale of the prompt's images, in packing order."""
    merge: int
    """Patches per side of a merge unit."""
    prompt_tokens: np.ndarray
    """int64: the stored prompt tokens (one placeholder per image)."""
    reference: str | None = None
    """The sample's first answer without its ``<|im_end|>`` (None for bare images)."""

    @property
    def patch_positions(self) -> torch.Tensor:
        """int64 ``[p, 2]``."""
        return patch_positions(self.grids, self.merge)

    @property
    def vision_cu_seqlens(self) -> torch.Tensor:
        """int32 ``[images * scales + 1]``."""
        return vision_cu_seqlens(self.grids, self.merge)

    def model_kwargs(self, window: int | None = None) -> dict[str, torch.Tensor]:
        """``NaViLModel.forward`` keyword arguments of the prompt (without any new tokens);
        ``window``: the model's ``VisionConfig.window_units(merge)``."""
        return pack_inputs([self], [self.input_ids], window)


def prompt_length(loss_mask: np.ndarray) -> int:
    """Stored tokens before the first loss-masked one (the answer)."""
    mask = np.asarray(loss_mask, bool)
    if not mask.any():
        raise CaptionError("sample has no loss-masked (answer) token")
    n = int(np.argmax(mask))
    if n == 0:
        raise CaptionError("sample has no prompt (its first token is already a target)")
    return n


def reference_of(sample: Sample, tokenizer: TextTokenizer) -> str:
    """The first answer of ``sample``: its first run of loss-masked tokens, the trailing
    ``<|im_end|>`` dropped, decoded and stripped."""
    mask = np.asarray(sample.loss_mask, bool)
    start = prompt_length(mask)
    end = start
    while end < len(mask) and mask[end]:
        end += 1
    ids = sample.tokens[start:end].tolist()
    if ids and ids[-1] == tokenizer.special_ids[STOP_TOKEN]:
        ids = ids[:-1]
    return tokenizer.decode(ids).strip()


def loader_builder(dataset: Any, patch_dtype: torch.dtype = torch.float32) -> PackedSequenceBuilder:
    """The training loader's sequence builder over one corpus, one sample per sequence
    without padding."""
    longest = int(np.max(dataset.llm_tokens)) if len(dataset) else 1
    return PackedSequenceBuilder([dataset], max(1, longest), pad=False, patch_dtype=patch_dtype)


def caption_input(
    builder: PackedSequenceBuilder,
    index: int,
    tokenizer: TextTokenizer,
    source: str | None = None,
    with_reference: bool = True,
) -> CaptionInput:
    """The input of sample ``index`` of ``builder``'s (only) corpus: the training sequence
    ``builder`` builds for it, cut before the answer (images after the cut dropped)."""
    dataset = builder.datasets[0]
    sample = dataset.sample(index)
    n = prompt_length(sample.loss_mask)
    packed = builder.build(np.array([[0, index]]))
    k = int(np.sum(sample.tokens[:n] == builder.placeholder_id))  # the prompt's images
    ids, _ = expand_image_blocks(
        sample.tokens[:n],
        np.zeros(n, bool),
        sample.images[:k],
        builder.special_ids,
        builder.placeholder_id,
        builder.merge,
    )
    t = len(ids)
    if not torch.equal(packed.input_ids[:t], torch.from_numpy(ids)):
        raise CaptionError(f"sample {index}: prompt differs from the loader's sequence")
    grids = tuple(tuple(g) for im in sample.images[:k] for g in im.grids)  # image scales
    p = int(packed.vision_cu_seqlens[len(grids)]) if packed.patches.shape[0] else 0
    return CaptionInput(
        source=source if source is not None else f"{getattr(dataset, 'root', 'corpus')}[{index}]",
        input_ids=packed.input_ids[:t].clone(),
        patches=packed.patches[:p].clone(),
        grids=grids,
        merge=builder.merge,
        prompt_tokens=sample.tokens[:n].copy(),
        reference=reference_of(sample, tokenizer) if with_reference else None,
    )


def dataset_inputs(
    dataset: ShardDataset, tokenizer: TextTokenizer, limit: int | None = None
) -> Iterator[CaptionInput]:
    """:func:`caption_input` of the first ``limit`` samples of an indexed corpus (all by
    default), lazily."""
    builder = loader_builder(dataset)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    for i in range(n):
        yield caption_input(builder, i, tokenizer, source=f"{dataset.root.name}[{i}]")


class MemoryCorpus:
    """Samples built in memory with the reader interface ``PackedSequenceBuilder`` uses
    (``sample``, ``llm_tokens``, ``special_ids``, ``placeholder_id``, ``manifest["image"]``)."""

    def __init__(
        self,
        samples: Sequence[tuple[Sequence[int], Sequence[bool], Sequence[ImageEntry]]],
        special_ids: dict[str, int],
        image: dict[str, Any],
        root: str = "images",
    ):
        """``image``: a manifest's ``image`` section (``ops.ImageGeometry.to_manifest``), whose
        patch, merge, mean and std the builder uses."""
        self.root = Path(root)
        self.special_ids = dict(special_ids)
        self.placeholder_id = int(special_ids["<img>"])
        self.manifest = {"image": dict(image)}
        merge = int(image["merge"])
        self._samples = []
        for i, (tokens, mask, images) in enumerate(samples):
            toks = np.asarray(tokens, np.int64)
            costs = [image_cost(im.grids, merge) for im in images]
            self._samples.append(
                Sample(
                    index=i,
                    tokens=toks,
                    loss_mask=np.asarray(mask, bool),
                    images=tuple(images),
                    llm_tokens=len(toks) - len(images) + sum(c[0] for c in costs),
                    patches=sum(c[1] for c in costs),
                    dataset=0,
                    record=i,
                )
            )
        self.llm_tokens = np.array([s.llm_tokens for s in self._samples], np.int64)

    def __len__(self) -> int:
        return len(self._samples)

    def sample(self, i: int) -> Sample:
        return self._samples[i]


def image_inputs(
    paths: Sequence[str | Path],
    tokenizer: TextTokenizer,
    settings: dict[str, Any],
    prompt: str,
) -> list[CaptionInput]:
    """Inputs for image files: each rendered as a one-turn conversation (``<image>\\n`` +
    ``prompt``) with ``settings`` (the indexer's ``Settings`` as a dict: template, system and
    the image geometry; a corpus manifest's ``settings`` to match its training data), then
    built like a training sample."""
    from megatron_navil.data.indexer.samples import SampleBuilder
    from megatron_navil.data.indexer.settings import Skip

    # the prompt ends with an empty assistant answer on purpose: no no_target skip for it
    builder = SampleBuilder({"settings": settings}, tokenizer, require_target=False)
    samples = []
    for path in paths:
        record = {
            "image": str(path),
            "conversations": [
                {"from": "human", "value": f"<image>\n{prompt}"},
                {"from": "gpt", "value": ""},
            ],
        }
        try:
            built = builder.build(record, "")
        except Skip as exc:
            raise CaptionError(f"{path}: {exc.reason} ({exc.detail})") from None
        samples.append((built.ids, built.mask, built.images))
    corpus = MemoryCorpus(samples, tokenizer.special_ids, settings["image"])
    loader = loader_builder(corpus)
    return [
        caption_input(loader, i, tokenizer, source=str(p), with_reference=False)
        for i, p in enumerate(paths)
    ]


def indexer_settings(
    cfg: NaViLConfig,
    template: str | None = None,
    system: str | None = None,
    max_tokens: int = 16384,
) -> dict[str, Any]:
    """The indexer's settings (as a dict) for ``cfg``'s image rules, as ``tools/index_corpus.py
    --config`` sets them; template and system message default to ``cfg.prompt``'s."""
    template = cfg.prompt.template if template is None else template
    system = cfg.prompt.system_message if system is None else system
    from megatron_navil.data.indexer.settings import Settings
    from megatron_navil.ops.geometry import ImageGeometry

    image = ImageGeometry.of_config(cfg)
    settings = Settings(
        template=template, system=system, max_tokens=max_tokens, image=image,
        model_config=cfg.name,
    )  # fmt: skip
    return settings.to_plan()


def pack_inputs(
    inputs: Sequence[CaptionInput], ids: Sequence[torch.Tensor], window: int | None = None
) -> dict[str, torch.Tensor]:
    """One packed sequence of ``NaViLModel.forward`` arguments for several samples, sample
    ``i`` being ``ids[i]`` (its prompt + what was generated for it) with the images of
    ``inputs[i]``: tokens and patches concatenated, ``cu_seqlens`` one segment per sample,
    positions restarting at 0 per sample, the vision inputs of all the samples' grids
    (``ops.vision_kwargs``, with the model's ``window``), as the training loader packs."""
    if not inputs or len(inputs) != len(ids):
        raise ValueError(
            f"pack_inputs needs one id tensor per input, got {len(ids)} for {len(inputs)}"
        )
    lengths = torch.tensor([int(x.shape[0]) for x in ids])
    out = {
        "input_ids": torch.cat(list(ids)),
        "position_ids": torch.cat([torch.arange(int(n), dtype=torch.long) for n in lengths]),
        "cu_seqlens": torch.cat(
            [torch.zeros(1, dtype=torch.int32), torch.cumsum(lengths, 0).to(torch.int32)]
        ),
    }
    visual = [inp for inp in inputs if inp.patches.shape[0]]
    if visual:
        out["patches"] = torch.cat([inp.patches for inp in visual])
        grids = [g for inp in visual for g in inp.grids]  # window order is per grid
        out.update(vision_kwargs(grids, visual[0].merge, window))
    return out
