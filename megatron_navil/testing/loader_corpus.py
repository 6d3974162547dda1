"""Small indexed corpora for the data-loader tests and benchmark (built with the real indexer).

* :func:`noise_jpegs`: seeded JPEGs of smooth gradients + a wave + uniform noise (neither flat
  nor pure noise, so JPEG sizes and decode times are realistic), written with caption pairs
  as a JSONL that ``tools/index_corpus.py`` reads.
* :func:`index`: run ``tools/index_corpus.py build`` (in this process) on inputs.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Sequence
from functools import cache
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]


@cache
def _index_tool():
    spec = importlib.util.spec_from_file_location(
        "index_corpus", ROOT / "tools" / "index_corpus.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def noise_image(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 ``[h, w, 3]``: per-channel gradients + a low-frequency wave + noise (+-24)."""
    y = np.linspace(0.0, 1.0, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0.0, 1.0, w, dtype=np.float32)[None, :, None]
    a, b, f = rng.uniform(-1, 1, 3), rng.uniform(-1, 1, 3), rng.uniform(1, 6, 3)
    base = 128 + 60 * (a * y + b * x) + 30 * np.sin(f * 6.283 * (x + 0.7 * y))
    noise = rng.integers(-24, 25, (h, w, 3), dtype=np.int16)
    return np.clip(base + noise, 0, 255).astype(np.uint8)


WORDS = ("red", "green", "blue", "circle", "square", "left", "right", "top", "bottom", "one")


def noise_jpegs(
    out: str | Path,
    count: int,
    seed: int = 0,
    min_side: int = 256,
    max_side: int = 1024,
    quality: int = 90,
    formats: Sequence[str] = ("JPEG",),
) -> Path:
    """Write ``count`` images (sides log-uniform in ``[min_side, max_side]``, format cycling
    through ``formats``) and ``out/captions.jsonl`` (caption pairs); returns the JSONL path."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(count):
        h, w = (
            round(math.exp(rng.uniform(math.log(min_side), math.log(max_side)))) for _ in range(2)
        )
        fmt = formats[i % len(formats)]
        ext = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[fmt]
        name = f"images/{i:06d}.{ext}"
        kwargs = {"quality": quality} if fmt in ("JPEG", "WEBP") else {}
        Image.fromarray(noise_image(h, w, rng)).save(out / name, format=fmt, **kwargs)
        words = rng.choice(WORDS, size=int(rng.integers(3, 12)))
        lines.append(json.dumps({"image": name, "caption": " ".join(words) + "."}))
    path = out / "captions.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def index(
    inputs: Sequence[str | Path], out: str | Path, tokenizer: str | Path, *extra: str
) -> Path:
    """``tools/index_corpus.py build`` of ``inputs`` into ``out`` (quiet); raises on failure."""
    argv = ["build", "--output", str(out), "--tokenizer", str(tokenizer), "--quiet"]
    for i in inputs:
        argv += ["--input", str(i)]
    rc = _index_tool().main(argv + list(extra))
    if rc != 0:
        raise RuntimeError(f"index_corpus.py {' '.join(argv + list(extra))} exited {rc}")
    return Path(out)
