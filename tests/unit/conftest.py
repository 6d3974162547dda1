"""Fixtures shared by the data-loader tests: three small indexed corpora (session-scoped).

* ``shapes``: the synthetic shapes corpus (conversations, PNG, 32..128 px, tiny config):
  images at native size, one to three VMP scales;
* ``photos``: caption pairs of noise+gradient images, 200..500 px, mostly JPEG (every third
  PNG): larger than the tiny config's 16,384-pixel maximum, so they are downscaled (the
  JPEGs are what the loader's opt-in draft decoding would shrink) and have several scales;
* ``text``: text-only conversations of varied lengths (a few longer than the tests' sequence
  length, so the packer must skip them).
All indexed with the shapes corpus's 512-id tokenizer and the qwen3-chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_navil.testing.loader_corpus import index, noise_jpegs
from megatron_navil.testing.synthetic_corpus import write_corpus


@pytest.fixture(scope="session")
def loader_corpora(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loader_corpora")
    write_corpus(root / "src", num_train=120, num_val=2, seed=5)
    tok = root / "src" / "tokenizer.json"
    common = ("--config", "tiny", "--template", "qwen3-chat", "--max-tokens", "4096")
    photos = noise_jpegs(
        root / "photos_src", 40, seed=1, min_side=200, max_side=500, formats=("JPEG", "JPEG", "PNG")
    )
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "red", "circle", "count", "two"]
    rows = []
    for i in range(60):
        n = int(rng.integers(2, 40)) if i % 15 else 150  # every 15th is long
        q = " ".join(rng.choice(words, size=3))
        a = " ".join(rng.choice(words, size=n))
        conv = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        rows.append(json.dumps({"id": i, "conversations": conv}))
    (root / "text.jsonl").write_text("\n".join(rows) + "\n")
    return {
        "shapes": index([root / "src" / "train.jsonl"], root / "shapes", tok, *common),
        "photos": index([photos], root / "photos", tok, *common),
        "text": index([root / "text.jsonl"], root / "text", tok, *common),
    }
