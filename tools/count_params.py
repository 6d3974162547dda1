"""Parameter counts of NaViL configs, from the model built on the meta device (no memory).

Usage:
  python tools/count_params.py                      # tiny, navil-2b, navil-9b
  python tools/count_params.py navil-9b --json out.json

For each config: total and activated parameters (what one token's forward uses: its modality's
attention projections and top-k of its group's FFN experts, with the vision tower, connector,
embeddings and LM head), and the vision encoder, connector and LLM. The model is the real
megatron-core one (one rank, TP=PP=EP=1); the analytic count of
``megatron_navil.config.params`` is printed beside it and must agree.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

PARTS = ("total", "activated", "vision", "connector", "llm")


def main(argv: list[str] | None = None) -> int:
    from megatron_navil.config.registry import REGISTRY

    parser = argparse.ArgumentParser(
        description="Count NaViL parameters on the meta device (no memory is allocated).",
    )
    parser.add_argument(
        "configs", nargs="*", default=list(REGISTRY), metavar="CONFIG",
        help=f"registered config names (default: all of {', '.join(REGISTRY)})",
    )  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the counts to this JSON file")
    args = parser.parse_args(argv)
    unknown = [c for c in args.configs if c not in REGISTRY]
    if unknown:
        parser.error(f"unknown config {unknown[0]!r}; known: {', '.join(REGISTRY)}")

    warnings.filterwarnings("ignore")  # megatron-core's apex/TE fallbacks
    from megatron_navil.config.params import param_counts
    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import meta_parameter_counts
    from megatron_navil.parallel import initialize
    from megatron_navil.parallel.spawn import free_port

    os.environ.setdefault("MASTER_PORT", str(free_port()))
    groups = initialize()  # one process: megatron-core's layers need its parallel state
    results = {}
    print(f"{'config':10s}" + "".join(f"{p:>16s}" for p in PARTS))
    for name in args.configs:
        cfg = get_config(name)
        counts = meta_parameter_counts(cfg, groups)
        analytic = param_counts(cfg)
        results[name] = counts
        print(f"{name:10s}" + "".join(f"{counts[p]:16,d}" for p in PARTS))
        mismatch = [p for p in PARTS if counts[p] != analytic[p]]
        if mismatch:
            print(f"  analytic count differs for {mismatch}: {[analytic[p] for p in mismatch]}")
            return 1
    print("(equal to the analytic counts of megatron_navil.config.params)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
