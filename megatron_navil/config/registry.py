"""Named model configs: ``tiny`` (CPU tests and the tiny pretraining run), ``navil-2b``
(InternLM2-1.8B backbone) and ``navil-9b`` (Qwen3-8B backbone), with the paper's numbers
(../shared/NAVIL.md, "Sizes")."""

from __future__ import annotations

from collections.abc import Callable

from megatron_navil.config.model import (
    ImageConfig,
    LanguageConfig,
    NaViLConfig,
    PromptConfig,
    VisionConfig,
)


def _tiny() -> NaViLConfig:
    # Small enough for a training step on 2 CPU cores in well under a second; every dimension
    # still splits across TP=2 (heads, kv heads, FFN) and PP=2 (layers).
    return NaViLConfig(
        name="tiny",
        # window_size 8 (the released models' token order): images up to 128 px wide (4
        # merge units, the tiny run's 96..128 px images and all their scales) are one window
        # wide, so their tokens stay in raster order; wider images are permuted.
        vision=VisionConfig(depth=2, width=32, mlp=64, heads=2),
        language=LanguageConfig(
            variant="qwen3",
            hidden=64,
            layers=4,
            heads=4,
            kv_heads=2,
            head_dim=16,
            ffn=128,
            vocab=512,
            qk_norm=True,
        ),
        # Tiny images (64..128 px sides after resizing) so a CPU step stays fast; min_patches
        # above one merge unit (4 patches), else multi-scale packing never falls below it
        # (every scale pads to >= 4 patches) and halves down to 1-pixel scales.
        image=ImageConfig(min_patches=16, max_patches=64),
    )


def _navil_2b() -> NaViLConfig:
    return NaViLConfig(
        name="navil-2b",
        vision=VisionConfig(depth=24, width=1472, mlp=5888, heads=23),
        language=LanguageConfig(
            variant="internlm2",
            hidden=2048,
            layers=24,
            heads=16,
            kv_heads=8,
            head_dim=128,
            ffn=8192,
            vocab=92544,
            # the released 2B code: a visual token's attention output through wo, then wo_ve
            # (NAVIL.md; the released code's behaviour wins for navil-2b/9b)
            wo_then_wo_ve=True,
        ),
        prompt=PromptConfig(template="internlm2-chat"),
        special_token_first_id=92544,
    )


def _navil_9b() -> NaViLConfig:
    return NaViLConfig(
        name="navil-9b",
        vision=VisionConfig(depth=32, width=1792, mlp=7168, heads=28),
        language=LanguageConfig(
            variant="qwen3",
            hidden=4096,
            layers=36,
            heads=32,
            kv_heads=8,
            head_dim=128,
            ffn=12288,
            vocab=151936,
            qk_norm=True,
        ),
    )


REGISTRY: dict[str, Callable[[], NaViLConfig]] = {
    "tiny": _tiny,
    "navil-2b": _navil_2b,
    "navil-9b": _navil_9b,
}


def get_config(name: str) -> NaViLConfig:
    """The validated config registered as ``name``; ValueError listing the known names."""
    if name not in REGISTRY:
        raise ValueError(f"unknown model config {name!r}; known: {', '.join(REGISTRY)}")
    return REGISTRY[name]().validate()
