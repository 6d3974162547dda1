"""Comparing model configs: where two configs describe different models.

Training refuses a ``--config`` that differs from the checkpoint it resumes, the HF importer and
``tools/compare_hf.py`` check that a source is the named config's model, all by this one rule.
"""

from __future__ import annotations

from megatron_navil.config.model import NaViLConfig


def same_model(a: NaViLConfig, b: NaViLConfig) -> list[str]:
    """Fields (``part.field``) in which two configs' models differ (names ignored)."""
    out = []
    for part in ("vision", "language", "connector", "experts", "image", "prompt"):
        pa, pb = getattr(a, part), getattr(b, part)
        for field in pa.__dataclass_fields__:
            if getattr(pa, field) != getattr(pb, field):
                out.append(f"{part}.{field}: {getattr(pa, field)!r} vs {getattr(pb, field)!r}")
    return out
