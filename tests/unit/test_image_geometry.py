"""``ops.ImageGeometry``: one object for how images become patches. The model's config gives
it, the indexer records it in the manifest (normalisation included), the loader normalises
with the manifest's mean and std, and ``scales`` is the one multi-scale-or-not decision."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest
import torch

from megatron_navil.config.registry import get_config
from megatron_navil.data.assemble import PackedSequenceBuilder, check_compatible, load_image_scales
from megatron_navil.data.indexer.settings import Settings
from megatron_navil.data.shards.corpus import ShardDataset
from megatron_navil.ops import (
    ImageGeometry,
    patchify_batch_reference,
    scales_for_image,
    smart_resize,
)
from megatron_navil.train import corpus_image_config

ODD_MEAN, ODD_STD = (0.25, 0.5, 0.75), (0.2, 0.3, 0.4)


def test_of_config_and_manifest_round_trip():
    cfg = get_config("tiny")
    g = ImageGeometry.of_config(cfg)
    assert (g.patch, g.merge, g.min_patches, g.max_patches) == (
        cfg.vision.patch, cfg.connector.merge, cfg.image.min_patches, cfg.image.max_patches,
    )  # fmt: skip
    assert ImageGeometry.from_manifest(json.loads(json.dumps(g.to_manifest()))) == g
    odd = dataclasses.replace(cfg.image, mean=ODD_MEAN, std=ODD_STD)
    plan = Settings(image=ImageGeometry.of_config(cfg.replace(image=odd)), model_config="x")
    image = plan.to_plan()["image"]
    assert (image["mean"], image["std"], image["config"]) == (list(ODD_MEAN), list(ODD_STD), "x")
    assert image["rule"] == "navil-release"
    # a manifest written before the normalisation was recorded: NaViL's, the only one then
    old = {k: v for k, v in image.items() if k not in ("mean", "std")}
    assert ImageGeometry.from_manifest(old).mean == (0.5, 0.5, 0.5)


def test_scales_is_the_multi_scale_decision():
    g = ImageGeometry()
    assert g.scales(1024, 1024) == scales_for_image(1024, 1024) and len(g.scales(1024, 1024)) == 5
    single = dataclasses.replace(g, multi_scale=False)
    assert single.scales(1024, 1024) == [smart_resize(1024, 1024)]
    small = ImageGeometry(min_patches=16, max_patches=64)
    assert small.scales(128, 128) == scales_for_image(128, 128, 16, 2, 16, 64)


def _with_normalisation(src, dst, mean, std):
    shutil.copytree(src, dst)
    path = dst / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["image"].update(mean=list(mean), std=list(std))
    path.write_text(json.dumps(manifest))
    return ShardDataset(dst)


def test_loader_normalises_with_the_manifests_mean_and_std(loader_corpora, tmp_path):
    plain = ShardDataset(loader_corpora["shapes"])
    odd = _with_normalisation(loader_corpora["shapes"], tmp_path / "odd", ODD_MEAN, ODD_STD)
    draws = torch.tensor([[0, 0], [0, 1]]).numpy()
    arrays = [a for s in (0, 1) for im in odd.sample(s).images for a in load_image_scales(im)]
    got = PackedSequenceBuilder([odd], 4096, pad=False).build(draws).patches
    want, _ = patchify_batch_reference(arrays, 16, 2, ODD_MEAN, ODD_STD)
    assert torch.equal(got, want)
    default = PackedSequenceBuilder([plain], 4096, pad=False).build(draws).patches
    assert not torch.equal(got, default)
    with pytest.raises(ValueError, match="differ in image mean"):
        check_compatible([plain, odd])
    # the run's config (and so its checkpoints and HF export) takes the corpus's
    cfg, changes = corpus_image_config(get_config("tiny"), [odd.manifest["image"]])
    assert changes["mean"] == ODD_MEAN and cfg.image.std == ODD_STD


def test_captioning_image_files_normalises_with_the_models_mean_and_std(tmp_path):
    """``inference.inputs.image_inputs`` prepares an image file with the model config's
    geometry, its normalisation included (a model trained on another mean sees that mean)."""
    import numpy as np
    from PIL import Image

    from megatron_navil.data.tokenizer import TextTokenizer
    from megatron_navil.inference.inputs import image_inputs, indexer_settings
    from megatron_navil.testing.synthetic_corpus import write_corpus

    write_corpus(tmp_path / "c", num_train=2, num_val=1, seed=0)
    tok = TextTokenizer(tmp_path / "c" / "tokenizer.json")
    rgb = (np.arange(96 * 128 * 3) % 251).astype(np.uint8).reshape(96, 128, 3)
    Image.fromarray(rgb).save(tmp_path / "x.png")
    cfg = get_config("tiny")
    odd = cfg.replace(image=dataclasses.replace(cfg.image, mean=ODD_MEAN, std=ODD_STD))
    got = {
        name: image_inputs([tmp_path / "x.png"], tok, indexer_settings(c), "Describe.")[0]
        for name, c in (("plain", cfg), ("odd", odd))
    }
    assert got["plain"].grids == got["odd"].grids
    scales = ImageGeometry.of_config(cfg).scales(96, 128)
    arrays = [np.asarray(Image.fromarray(rgb).resize((w, h), Image.Resampling.BICUBIC))
              for h, w in scales]  # fmt: skip
    want, _ = patchify_batch_reference(arrays, 16, 2, ODD_MEAN, ODD_STD)
    assert torch.equal(got["odd"].patches, want)
    assert not torch.equal(got["plain"].patches, want)
