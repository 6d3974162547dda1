"""Compatibility with the *released* NaViL format, both ways, against an independent reference.

An official-format directory with tiny random weights (``testing.official_dir``: the
documented names and fields, no special-token ids in config.json, the 12 NaViL tokens inside
the tokenizer's vocabulary) and a 64x256 image, which NaViL's rules turn into three scales
of 10, 12 and 16 patch columns (5-8 merge units: wider than one window of 4, so the released
token order permutes every scale). The reference (``testing.official_reference``) is written
from NAVIL.md sections 1-7 in the released code's style, in float64.

* the reference loads the directory with 0 missing and 0 unexpected tensors;
* our remote code (``hf/modeling_navil.py``) with the released API
  (``init_special_token_ids``, ``image_processor``, ``chat``) gives the reference's logits;
* ``tools/convert_from_hf.py navil`` takes the special-token ids from the directory's
  tokenizer; the megatron model's logits on the prompt *our* pipeline builds (the indexer's
  rendering and image rules, the loader's pixels, ``ops.vision_kwargs``' window order) equal
  the reference's on the prompt and pixels the released code builds;
* ``tools/caption.py`` captions the image with the imported checkpoint;
* ``tools/convert_to_hf.py`` exports it back: the reference loads the export with 0 missing
  and 0 unexpected tensors, every tensor bit-exact, the same special-token ids.

Tolerance: 1e-5 of the largest logit. Our side runs in float32 against a float64 reference
(measured ~1e-6 relative); a wrong token order, image size, pixel value, prompt token or
special id changes logits by O(1).
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_navil.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
TOL = 1e-5
QUESTION = "Describe the image."


def _cli(script: str, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    cmd = [sys.executable, str(ROOT / "tools" / script), *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)


# The 9B layout (Qwen3VE, every vision block global, no BOS) and the 2B layout (InternLM2VE with
# wo then wo_ve, block 0 attending within windows, a tokenizer that prepends BOS <s>).
VARIANTS = {
    "qwen3": dict(variant="qwen3"),
    "internlm2": dict(variant="internlm2", bos=True, fullatt_block_indexes=[1]),
}


@pytest.fixture(scope="module", params=list(VARIANTS))
def world(tmp_path_factory, request) -> dict:
    from PIL import Image
    from transformers import PreTrainedTokenizerFast

    from megatron_navil.testing import official_dir as D
    from megatron_navil.testing import official_reference as R

    root = tmp_path_factory.mktemp("official")
    official = D.make_official_dir(root / "official", seed=1, **VARIANTS[request.param])
    rng = np.random.default_rng(0)
    image = root / "wide.png"
    Image.fromarray(rng.integers(0, 256, (64, 256, 3), dtype=np.uint8)).save(image)
    config, state, missing, unexpected = R.load(official)
    tok = PreTrainedTokenizerFast(tokenizer_file=str(official / "tokenizer.json"))
    ref = R.Reference(config, state)
    ref.init_special_token_ids(tok)
    pixels, grids = R.preprocess(Image.open(image), config)
    query = R.prompt(QUESTION, grids, [len(grids)], config)
    ids = tok(query, return_tensors="pt")["input_ids"][0]
    return {
        "root": root, "official": official, "image": image, "config": config,
        "bos": VARIANTS[request.param].get("bos", False),
        "missing": missing, "unexpected": unexpected, "tok": tok, "ref": ref,
        "pixels": pixels, "grids": grids, "ids": ids, "logits": ref.logits(ids, pixels, grids),
    }  # fmt: skip


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.double() - ref).abs().max() / ref.abs().max())


def test_the_reference_loads_the_official_directory(world):
    from megatron_navil.testing import official_reference as R

    assert R.check_config(world["config"]) == []
    assert world["missing"] == [] and world["unexpected"] == []
    assert [g[2] // 2 for g in world["grids"]] == [5, 6, 8]  # every scale wider than 4 units
    assert world["ref"].special_ids == list(range(12))  # inside the vocabulary, from the tokenizer
    bos = world["tok"].convert_tokens_to_ids("<s>") if world["bos"] else None
    assert (world["ids"][0] == bos) == world["bos"]  # the released tokenizer(query) adds BOS


def test_remote_code_with_the_released_api_equals_the_reference(world):
    from megatron_navil.hf.configuration_navil import NaViLChatConfig
    from megatron_navil.hf.modeling_navil import NaViL

    config = NaViLChatConfig(**world["config"])
    model = NaViL.from_pretrained(str(world["official"]), config=config, dtype=torch.float32)
    model.eval()
    with pytest.raises(ValueError, match="init_special_token_ids"):
        model(input_ids=world["ids"][None])
    model.init_special_token_ids(world["tok"])
    with torch.no_grad():
        logits = model(input_ids=world["ids"][None], pixel_values=world["pixels"].float(),
                       image_grid_thw=torch.tensor(world["grids"])).logits[0]  # fmt: skip
    assert _rel(logits, world["logits"]) < TOL
    # the released preprocessing API, per scale as the demo calls it
    out = model.image_processor(
        __import__("PIL.Image").Image.open(world["image"]), return_tensors="pt",
        min_pixels=16 * 256, max_pixels=64 * 256,
    )  # fmt: skip
    assert out["image_grid_thw"].tolist() == [list(world["grids"][-1])]
    base = world["pixels"][-out["pixel_values"].shape[0] :].reshape(out["pixel_values"].shape)
    assert float((out["pixel_values"].double() - base).abs().max()) < 1e-6
    answer = model.chat(
        world["tok"], world["pixels"].float(), QUESTION, {"max_new_tokens": 4},
        num_patches_list=world["grids"], num_scales=[len(world["grids"])],
    )  # fmt: skip
    assert isinstance(answer, str)


def test_import_caption_export(world):
    from megatron_navil.testing import official_reference as R

    root, official = world["root"], world["official"]
    proc = _cli("convert_from_hf.py", "navil", "--hf", str(official), "--output",
                str(root / "imported"))  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "special token ids from" in proc.stdout and str(list(range(12))) in proc.stdout
    checkpoint = root / "imported" / "iter_0000000"
    (side,) = run_distributed(
        R.pipeline_logits_rank, 1, str(checkpoint), str(official / "tokenizer.json"),
        [str(world["image"])], QUESTION, timeout=900,
    )  # fmt: skip
    (side,) = pickle.loads(side)
    # our prompt and pixels are the released code's ...
    assert side["ids"] == world["ids"].tolist()
    assert side["grids"] == [[h, w] for _, h, w in world["grids"]]
    flat = world["pixels"].reshape(world["pixels"].shape[0], -1)
    assert float((side["patches"].double() - flat).abs().max()) < 1e-6
    # ... and so are the logits, through the window order
    assert _rel(side["logits"], world["logits"]) < TOL
    # the same through the compatibility report
    report = _cli("compare_hf.py", "--checkpoint", str(checkpoint), "--official", str(official),
                  "--images", str(world["image"]))  # fmt: skip
    assert report.returncode == 0, report.stdout + report.stderr[-2000:]
    assert "0 config problem(s), 0 missing and 0 unexpected" in report.stdout
    assert "agree within the tolerance" in report.stdout

    caption = _cli("caption.py", "--checkpoint", str(checkpoint), "--images",
                   str(world["image"]), "--tokenizer", str(official / "tokenizer.json"),
                   "--max-new-tokens", "3", "--quiet")  # fmt: skip
    assert caption.returncode == 0, caption.stderr[-2000:]

    export = _cli("convert_to_hf.py", "--checkpoint", str(checkpoint), "--output",
                  str(root / "exported"), "--tokenizer", str(official / "tokenizer.json"),
                  "--dtype", "float32", "--quiet")  # fmt: skip
    assert export.returncode == 0, export.stderr[-2000:]
    assert "the authors' released NaViL code can load it" in export.stdout
    config, state, missing, unexpected = R.load(root / "exported")
    assert R.check_config(config) == [] and missing == [] and unexpected == []
    assert config["special_token_ids"] == list(range(12))
    for name, tensor in world["ref"].sd.items():
        assert torch.equal(state[name].double(), tensor), name
    assert json.loads((official / "config.json").read_text())["template"] == config["template"]
