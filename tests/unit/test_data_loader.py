"""The packed-sequence loader on real indexed corpora (tests/unit/conftest.py): batch layout,
labels, pixels, loss weights, determinism across worker counts, resume, and a batch through the
tiny NaViL model."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from PIL import Image

from megatron_navil.config.tokens import IGNORE_INDEX
from megatron_navil.data.assemble import PackedSequenceBuilder, load_image_scales
from megatron_navil.data.batch import PackedBatch, loss_weights
from megatron_navil.data.loader import build_data_loader
from megatron_navil.data.shards.corpus import ShardDataset
from megatron_navil.ops import patchify_batch_reference

SEQ = 256
MAX_PATCHES = 256


@pytest.fixture(scope="module")
def datasets(loader_corpora):
    return [ShardDataset(loader_corpora[k]) for k in ("shapes", "photos", "text")]


def _loader(datasets, **kw):
    args = dict(
        seq_length=SEQ, max_patches=MAX_PATCHES, global_batch=4, window=40, seed=3,
        vision_window_size=8,  # the tiny model's token order
    )  # fmt: skip
    args.update(kw)
    return build_data_loader(datasets, **args)


def _take(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.fixture(scope="module")
def batches(datasets):
    return _take(_loader(datasets), 24)


def test_batch_layout(batches, datasets):
    special = datasets[0].special_ids
    ctx, img = special["<IMG_CONTEXT>"], special["<img>"]
    seen_images = seen_text_only = 0
    for b in batches:
        t = b.num_tokens
        assert t == SEQ and b.input_ids.dtype == b.labels.dtype == torch.int64
        cu = b.cu_seqlens
        assert cu.dtype == torch.int32 and cu[0] == 0 and cu[-1] == t and (cu.diff() > 0).all()
        assert len(cu) - 1 in (b.num_samples, b.num_samples + 1)
        for k in range(len(cu) - 1):  # positions restart in every segment
            assert torch.equal(b.position_ids[cu[k] : cu[k + 1]], torch.arange(cu[k + 1] - cu[k]))
        # vision segments: one per image and scale, in block order, sized by the index's grids
        grids = [
            g
            for d, s in b.sample_keys.tolist()
            for im in datasets[d].sample(s).images
            for g in im.grids
        ]
        vcu = b.vision_cu_seqlens
        assert vcu.dtype == torch.int32 and vcu[0] == 0 and vcu[-1] == b.patches.shape[0]
        assert vcu.diff().tolist() == [gh * gw for gh, gw in grids]
        assert b.patches.shape[1] == 768 and b.patch_positions.shape == (b.patches.shape[0], 2)
        assert int((b.input_ids == ctx).sum()) * 4 == b.patches.shape[0]
        assert int((b.input_ids == img).sum()) == sum(
            len(datasets[d].sample(s).images) for d, s in b.sample_keys.tolist()
        )
        seen_images += b.patches.shape[0] > 0
        seen_text_only += any(d == 2 for d, _ in b.sample_keys.tolist())
        if len(cu) - 1 > b.num_samples:  # the padding segment: no loss
            pad = slice(int(cu[-2]), t)
            assert (b.labels[pad] == IGNORE_INDEX).all() and (b.loss_weights[pad] == 0).all()
    assert seen_images and seen_text_only


def test_labels_are_next_token_targets_within_a_sample(batches, datasets):
    sid = datasets[0].special_ids
    block = {
        sid[k]
        for k in ("<img>", "</img>", "<IMG_CONTEXT>", "<IMG_LINE_BREAK>", "<IMG_FRAME_BREAK>")
    }
    for b in batches:
        cu = b.cu_seqlens.tolist()
        for k, (d, s) in enumerate(b.sample_keys.tolist()):
            sample = datasets[d].sample(s)
            ids = b.input_ids[cu[k] : cu[k + 1]]
            labels = b.labels[cu[k] : cu[k + 1]]
            # no label on the last token: nothing crosses into the next sample
            assert labels[-1] == IGNORE_INDEX
            has = (labels != IGNORE_INDEX).nonzero().flatten()
            assert torch.equal(labels[has], ids[has + 1])
            # the targets are exactly the stored loss-masked tokens (independent of expansion)
            want = sample.tokens[sample.loss_mask]
            if sample.loss_mask[0]:
                want = want[1:]  # the first token of a sample has no predecessor
            assert labels[has].tolist() == want.tolist()
            assert not block & set(labels[has].tolist())  # no image-block token is a target
            # the stored text comes back when each image block is folded into its placeholder
            folded, i = [], 0
            ids_l = ids.tolist()
            start, end = datasets[0].special_ids["<img>"], datasets[0].special_ids["</img>"]
            while i < len(ids_l):
                if ids_l[i] == start:
                    folded.append(datasets[0].placeholder_id)
                    i = ids_l.index(end, i) + 1
                else:
                    folded.append(ids_l[i])
                    i += 1
            assert folded == sample.tokens.tolist()


def _independent_scales(entry, draft: bool = False) -> list[np.ndarray]:
    """Each scale decoded and resized with Pillow directly: from the full decode (the released
    code's pixels), or with ``draft`` from libjpeg's reduced decode of a shrinking JPEG."""
    img = Image.open(io.BytesIO(entry.data))
    (bh, bw), (oh, ow) = entry.scales[-1], entry.orig_size
    if draft and img.format == "JPEG" and bh < oh and bw < ow:
        img.draft("RGB", (bw, bh))
    img = img.convert("RGB")
    out = []
    for h, w in entry.scales:
        same = img.size == (w, h)
        out.append(np.array(img if same else img.resize((w, h), Image.Resampling.BICUBIC)))
    return out


def _shrinking_jpeg(entry) -> bool:
    (bh, bw), (oh, ow) = entry.scales[-1], entry.orig_size
    return entry.format == "jpeg" and bh < oh and bw < ow


def test_pixels_equal_patchify_of_the_resized_images(batches, datasets):
    """By default every scale is resampled from the full decode, as the released code does
    (no JPEG draft decoding), so the loader's pixels are bitwise Pillow's."""
    shrunk = checked = 0
    for b in batches[:12]:
        arrays, entries = [], []
        for d, s in b.sample_keys.tolist():
            for entry in datasets[d].sample(s).images:
                arrays += _independent_scales(entry)
                entries.append(entry)
                shrunk += _shrinking_jpeg(entry)
        want, _ = patchify_batch_reference(arrays)
        assert torch.equal(b.patches, want)
        checked += len(entries)
    assert checked > 5 and shrunk > 0  # JPEGs that draft mode would have decoded reduced
    entry = next(e for d in datasets[1:2] for e in d.sample(0).images)
    full = load_image_scales(entry)[-1]
    ref = Image.open(io.BytesIO(entry.data)).convert("RGB")
    h, w = entry.scales[-1]
    assert np.array_equal(full, np.array(ref.resize((w, h), Image.Resampling.BICUBIC)))


def test_jpeg_draft_decoding_is_opt_in(datasets):
    """``draft=True`` decodes a shrinking JPEG at a reduced size (never below the base scale)
    before resampling: other pixels than the default full decode."""
    builder = PackedSequenceBuilder(datasets, 4096, pad=False, draft=True)
    default = PackedSequenceBuilder(datasets, 4096, pad=False)
    assert default.draft is False
    drafted = differs = 0
    for d, ds in enumerate(datasets):
        for s in range(min(len(ds), 40)):
            images = ds.sample(s).images
            if not any(_shrinking_jpeg(e) for e in images):
                continue
            arrays = [a for e in images for a in _independent_scales(e, draft=True)]
            got = builder.build(np.array([[d, s]]))
            assert torch.equal(got.patches, patchify_batch_reference(arrays)[0])
            for entry in images:
                if _shrinking_jpeg(entry):
                    decoded = entry.decode(draft=entry.scales[-1])
                    drafted += decoded.size != (entry.orig_size[1], entry.orig_size[0])
                    assert decoded.height >= entry.scales[-1][0]
                    assert decoded.width >= entry.scales[-1][1]
            differs += not torch.equal(got.patches, default.build(np.array([[d, s]])).patches)
    assert drafted > 0 and differs > 0


def test_loss_weight_modes(datasets, batches):
    labels = np.array([IGNORE_INDEX, 5, 6, IGNORE_INDEX, 7, IGNORE_INDEX, IGNORE_INDEX, 9])
    cu = np.array([0, 4, 6, 8])
    assert loss_weights(labels, cu, "token").tolist() == [0, 1, 1, 0, 1, 0, 0, 1]
    np.testing.assert_allclose(loss_weights(labels, cu, "sample"), [0, 0.5, 0.5, 0, 1, 0, 0, 1])
    r = 1 / math.sqrt(2)
    np.testing.assert_allclose(loss_weights(labels, cu, "square"), [0, r, r, 0, 1, 0, 0, 1])
    with pytest.raises(ValueError, match="loss weighting"):
        loss_weights(labels, cu, "mean")
    for mode, per_sample in (("sample", lambda n: 1.0), ("square", math.sqrt)):
        b = _take(_loader(datasets, loss_weighting=mode), 3)[-1]
        ref = batches[2]
        assert torch.equal(b.labels, ref.labels) and torch.equal(b.patches, ref.patches)
        cu = b.cu_seqlens.tolist()
        for k in range(b.num_samples):
            w = b.loss_weights[cu[k] : cu[k + 1]]
            n = int((b.labels[cu[k] : cu[k + 1]] != IGNORE_INDEX).sum())
            assert math.isclose(float(w.sum()), per_sample(n) if n else 0.0, rel_tol=1e-5)
    assert torch.equal(batches[2].loss_weights, (batches[2].labels != IGNORE_INDEX).float())


def test_workers_do_not_change_the_output(datasets, batches):
    two = _take(_loader(datasets, num_workers=2), 12)
    assert [b.seq_index for b in two] == list(range(12))
    assert all(a.equals(b) for a, b in zip(two, batches[:12], strict=True))
    # the loader's batch k is the builder's output for the sampler's k-th sequence
    loader = _loader(datasets)
    refs = loader.sampler.refs(loader.sampler.position)
    builder = loader.dataset.builder
    for b in batches[:4]:
        ref = next(refs)
        assert builder.build(ref.draws, ref.index, ref.epoch).equals(b)


def test_loader_resume_is_exact_with_workers_and_a_dp_change(datasets, batches):
    loader = _loader(datasets, num_workers=2, prefetch_factor=4)
    it = iter(loader)
    for _ in range(9):
        next(it)
    with pytest.raises(ValueError, match="between steps"):
        loader.state_dict()  # 9 of 12 sequences: mid global batch
    for _ in range(3):
        next(it)
    state = loader.state_dict()
    del it
    assert state["consumed"] == 12  # not the prefetched position
    resumed = _loader(datasets, num_workers=2)
    resumed.load_state_dict(state)
    got = _take(resumed, 12)
    assert all(a.equals(b) for a, b in zip(got, batches[12:24], strict=True))
    # the same state on DP=2: rank r gets sequences 12 + 4 g + 2 r, 12 + 4 g + 2 r + 1
    for rank in range(2):
        dp = _loader(datasets, dp_rank=rank, dp_size=2)
        dp.load_state_dict(state)
        got = _take(dp, 4)
        want = [batches[12 + 4 * g + 2 * rank + j] for g in range(2) for j in range(2)]
        assert all(a.equals(b) for a, b in zip(got, want, strict=True))


def test_pin_memory_flag(datasets, batches):
    loader = _loader(datasets, pin_memory=True, num_workers=1)
    (b,) = _take(loader, 1)
    assert b.equals(batches[0])
    if torch.cuda.is_available():
        assert b.input_ids.is_pinned() and b.patches.is_pinned()
    else:
        assert not loader.pin_memory  # nothing to pin for: silently off


def test_without_pixels_only_the_patches_are_left_out(datasets, batches):
    # Later pipeline stages load batches with pixels=False: the same sequences, images counted
    # from the index (vision_cu_seqlens, positions), no patches decoded.
    with_images = [b for b in batches if b.patches.shape[0]]
    assert with_images
    for b, nb in zip(batches, _take(_loader(datasets, pixels=False), len(batches)), strict=True):
        assert nb.patches.shape == (0, b.patches.shape[1]) and nb.patches.dtype == b.patches.dtype
        assert PackedBatch(**{**vars(nb), "patches": b.patches}).equals(b)
        assert int(nb.vision_cu_seqlens[-1]) == b.patches.shape[0]


def test_builder_errors(datasets):
    img = datasets[0].special_ids["<IMG_CONTEXT>"]
    with pytest.raises(ValueError, match="visual token"):
        PackedSequenceBuilder(datasets, SEQ, pad_id=img)
    with pytest.raises(ValueError, match="loss_weighting"):
        PackedSequenceBuilder(datasets, SEQ, loss_weighting="mean")
    builder = PackedSequenceBuilder(datasets, 16)
    with pytest.raises(ValueError, match="seq_length"):
        builder.build(np.array([[0, 0]]))


# ---- the real model ------------------------------------------------------------------------


def _model_loss(batch: PackedBatch, special_ids: tuple[int, ...]) -> dict:
    import warnings

    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize

    warnings.filterwarnings("ignore")
    groups = initialize(seed=0)
    cfg = get_config("tiny")
    (model,) = build_model(cfg, transformer_config(cfg), groups, special_ids=special_ids)
    per_token = model(**batch.as_model_kwargs())
    w = batch.loss_weights
    loss = (per_token * w).sum() / w.sum()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    return {
        "per_token": per_token.detach(),
        "loss": float(loss),
        "grads_finite": all(bool(torch.isfinite(g).all()) for g in grads),
        "num_grads": len(grads),
        "vocab": cfg.language.vocab,
    }


@pytest.mark.slow
def test_a_loader_batch_trains_the_tiny_model(datasets, batches):
    from megatron_navil.config.tokens import SPECIAL_TOKENS
    from megatron_navil.parallel.spawn import run_distributed

    vocab = datasets[0].manifest["tokenizer"]["vocab_size"]
    batch = next(b for b in batches if b.patches.shape[0] and (b.labels != IGNORE_INDEX).any())
    special = tuple(datasets[0].special_ids[name] for name in SPECIAL_TOKENS)
    (res,) = run_distributed(_model_loss, 1, batch, special)
    assert vocab <= res["vocab"]  # the synthetic tokenizer fits the tiny model's 512 ids
    assert math.isfinite(res["loss"]) and res["loss"] > 0 and res["grads_finite"]
    ignored = batch.labels == IGNORE_INDEX
    assert (res["per_token"][ignored] == 0).all() and (res["per_token"][~ignored] > 0).all()
