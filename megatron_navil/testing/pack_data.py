"""A realistic synthetic distribution of per-sample (LLM tokens, patches) for the pack planner.

Shared by tests/unit/test_ops_pack.py and benchmarks/bench_pack.py so both measure the same
thing. Per sample:
  * text tokens: lognormal with median 300 and sigma 1.0, clipped to [20, 4000];
  * 0 to 3 images with probabilities 0.35 / 0.40 / 0.15 / 0.10;
  * each image's size is drawn from a catalog of ``num_sizes`` sizes (repeated sizes are what
    real corpora look like: camera and screenshot resolutions, resized web images): areas
    lognormal around 0.5 MP (about 64 px to 12 MP), aspect ratios lognormal within 1:6..6:1,
    plus a few common fixed sizes;
  * an image's patches are those of all its VMP scales (``scales_for_image``: base scale from
    ``smart_resize`` plus the smaller ones), each ``merged_grid``'s ``gh * gw``;
  * its LLM tokens are its image block's length (``image_token_layout``):
    ``2 + sum over scales (h * w + h + 1)`` with ``(h, w)`` the merged grid (patch grid / 2):
    ``<img>``, per scale ``h`` rows of ``w`` context tokens and a line break, a frame break,
    then ``</img>``.
The catalog is small, so the cost is a few hundred ``scales_for_image`` calls plus vectorized
numpy draws: a million samples take about a second.
"""

from __future__ import annotations

import numpy as np

from megatron_navil.ops import merged_grid, scales_for_image

COMMON_SIZES = ((224, 224), (336, 336), (480, 640), (720, 1280), (1024, 1024), (1080, 1920))
IMAGES_PER_SAMPLE_P = (0.35, 0.40, 0.15, 0.10)
PATCH, MERGE = 16, 2


def image_cost(height: int, width: int) -> tuple[int, int]:
    """(LLM tokens, vision patches) of one ``height x width`` image over all its VMP scales."""
    tokens, patches = 2, 0  # <img>, </img>
    for h_s, w_s in scales_for_image(height, width, PATCH, MERGE):
        gh, gw = merged_grid(h_s, w_s, PATCH, MERGE)
        patches += gh * gw
        mh, mw = gh // MERGE, gw // MERGE
        tokens += mh * mw + mh + 1  # context tokens, a line break per row, a frame break
    return tokens, patches


def image_catalog(num_sizes: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``num_sizes`` image sizes ``(height, width)``: the common ones, then random draws."""
    sizes = list(COMMON_SIZES)
    while len(sizes) < num_sizes:
        area = float(np.clip(rng.lognormal(np.log(5e5), 1.0), 4096.0, 1.2e7))
        aspect = float(np.exp(np.clip(rng.normal(0.0, 0.5), -np.log(6.0), np.log(6.0))))
        height = max(1, round(np.sqrt(area * aspect)))
        width = max(1, round(np.sqrt(area / aspect)))
        sizes.append((height, width))
    return sizes[:num_sizes]


def realistic_pack_counts(
    num_samples: int, seed: int = 0, num_sizes: int = 512
) -> tuple[np.ndarray, np.ndarray]:
    """``(llm_tokens, patches)`` int64 ``[num_samples]`` (see the module doc)."""
    rng = np.random.default_rng(seed)
    costs = np.array([image_cost(h, w) for h, w in image_catalog(num_sizes, rng)], np.int64)
    text = np.clip(rng.lognormal(np.log(300.0), 1.0, num_samples), 20, 4000).astype(np.int64)
    num_images = rng.choice(len(IMAGES_PER_SAMPLE_P), num_samples, p=IMAGES_PER_SAMPLE_P)
    picks = rng.integers(0, len(costs), (num_samples, len(IMAGES_PER_SAMPLE_P) - 1))
    used = np.arange(picks.shape[1]) < num_images[:, None]  # first k picks of a k-image sample
    tokens = text + (costs[picks, 0] * used).sum(axis=1)
    patches = (costs[picks, 1] * used).sum(axis=1)
    return tokens.astype(np.int64), patches.astype(np.int64)


# Tux Paint-like drawings: a few fixed canvas sizes (the canvas of the default 800x600 window
# and of larger screens), every image of a corpus at one of them.
CANVAS_SIZES = ((376, 448), (472, 608), (544, 672), (600, 800), (768, 1024))
SIDE_RANGE = (64, 2048)  # the lognormal mix's sides, pixels


def image_mix_counts(
    num_samples: int, mix: str = "lognormal", seed: int = 0, geometry: object | None = None
) -> dict[str, np.ndarray]:
    """Per-sample ``llm_tokens``, ``patches`` and ``patches_sq`` (sum of squared patches per
    image scale) int64 ``[num_samples]`` of a corpus whose images follow ``mix``:
    ``lognormal``: each side lognormal (median 512 px, sigma 0.8) clipped to 64..2048 px;
    ``canvas``: one of :data:`CANVAS_SIZES`. Text and images per sample as
    :func:`realistic_pack_counts`; scales from ``geometry`` (an ``ops.ImageGeometry``;
    default NaViL's, multi-scale on)."""
    from megatron_navil.ops.geometry import ImageGeometry

    g = geometry if geometry is not None else ImageGeometry()
    rng = np.random.default_rng(seed)
    if mix == "lognormal":
        sides = np.clip(rng.lognormal(np.log(512.0), 0.8, (256, 2)), *SIDE_RANGE).astype(int)
        catalog = [tuple(int(x) for x in hw) for hw in sides]
    elif mix == "canvas":
        catalog = list(CANVAS_SIZES)
    else:
        raise ValueError(f"mix must be 'lognormal' or 'canvas', got {mix!r}")
    rows = []
    for h, w in catalog:
        grids = [g.grid(a, b) for a, b in g.scales(h, w)]  # type: ignore[attr-defined]
        per = [gh * gw for gh, gw in grids]
        merge = g.merge  # type: ignore[attr-defined]
        tokens = 2 + sum((gh // merge) * (gw // merge) + gh // merge + 1 for gh, gw in grids)
        rows.append((tokens, sum(per), sum(p * p for p in per)))
    costs = np.array(rows, np.int64)
    text = np.clip(rng.lognormal(np.log(300.0), 1.0, num_samples), 20, 4000).astype(np.int64)
    num_images = rng.choice(len(IMAGES_PER_SAMPLE_P), num_samples, p=IMAGES_PER_SAMPLE_P)
    picks = rng.integers(0, len(costs), (num_samples, len(IMAGES_PER_SAMPLE_P) - 1))
    used = np.arange(picks.shape[1]) < num_images[:, None]
    per_sample = (costs[picks] * used[..., None]).sum(axis=1)
    return {
        "llm_tokens": text + per_sample[:, 0],
        "patches": per_sample[:, 1],
        "patches_sq": per_sample[:, 2],
    }
