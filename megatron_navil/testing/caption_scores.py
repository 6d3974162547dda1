"""Caption accuracy: exact match of the stripped texts and, where every reference is a caption
of the synthetic shapes grammar, the per-field accuracies and chance levels of
:func:`megatron_navil.testing.synthetic_corpus.score_captions`. Used by ``tools/caption.py`` and
``tools/caption_hf.py`` (the tiny example's scoring); the package itself never imports it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_navil.testing.synthetic_corpus import parse_caption, score_captions


@dataclass
class CaptionMetrics:
    """Accuracies of the results that have a reference."""

    samples: int
    grammar: bool
    """Every reference is a synthetic-corpus caption (the per-field metrics exist)."""
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    """``name -> {"accuracy", "correct", "total", "chance", "majority"}`` (NaN: not defined)."""

    def table(self) -> str:
        """The metrics as a small text table with the chance levels and how they are made."""
        lines = [f"{'metric':<12s}{'accuracy':>10s}{'chance':>10s}{'majority':>10s}{'n':>7s}"]

        def num(x: float) -> str:
            if math.isnan(x):
                return "n/a"
            return f"{x:.4f}" if x == 0 or x >= 1e-3 else f"{x:.1e}"

        for name, m in self.metrics.items():
            lines.append(
                f"{name:<12s}{num(m['accuracy']):>10s}{num(m['chance']):>10s}"
                f"{num(m['majority']):>10s}{int(m['total']):>7d}"
            )
        if self.grammar:
            lines.append(
                "chance: uniform guess (exact: 1 / the generator's distinct captions; a field: "
                "1 / its values); majority: the best constant answer under the generator's "
                "distribution (per group slot for group fields)"
            )
        else:
            lines.append("references are not synthetic-corpus captions: exact match only")
        return "\n".join(lines)


def caption_metrics(results: Sequence[Any]) -> CaptionMetrics:
    """Exact match, and with synthetic-corpus references the per-field accuracies
    (``testing.synthetic_corpus.score_captions``); parse failures count as wrong."""
    pairs = [(r.reference, r.generated) for r in results if r.reference is not None]
    grammar = bool(pairs) and all(parse_caption(ref) is not None for ref, _ in pairs)
    if grammar:
        return CaptionMetrics(len(pairs), True, score_captions(pairs))
    correct = sum(ref.strip() == gen.strip() for ref, gen in pairs)
    exact = {
        "accuracy": correct / len(pairs) if pairs else math.nan,
        "correct": correct,
        "total": len(pairs),
        "chance": math.nan,
        "majority": math.nan,
    }
    return CaptionMetrics(len(pairs), False, {"exact": exact})
