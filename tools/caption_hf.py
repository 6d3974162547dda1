#!/usr/bin/env python
"""Caption held-out images with an exported Hugging Face NaViL directory, in plain transformers.

Example::

    python tools/caption_hf.py --hf runs/tiny/hf --jsonl runs/tiny/data/val.jsonl --limit 20

Loads ``AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)`` and its tokenizer
(the remote code from the export: NaViL's image preprocessing and chat template), answers each
sample's first user turn about its image greedily (``model.chat_images``), and scores the answers
against the sample's reference like ``tools/caption.py`` (exact match; per-field accuracy and
chance on the synthetic shapes corpus). With ``--compare FILE`` (``tools/caption.py --json``
output over the same samples) it also counts the captions that differ from the megatron
model's: an export that changed the model would show here. Exit status: 0; 1 when --compare
finds a difference; 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="caption_hf.py",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--hf", required=True, help="the exported HF NaViL directory")
    p.add_argument(
        "--jsonl", required=True, help="InternVL-style conversations (images relative to it)"
    )
    p.add_argument("--limit", type=int, default=None, help="first N samples (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=48, help="longest answer (48)")
    p.add_argument("--compare", default=None, help="tools/caption.py --json of the same samples")
    p.add_argument("--json", default=None, help="also write the captions and metrics here")
    p.add_argument("--show", type=int, default=3, help="print this many captions (3)")
    return p.parse_args(argv)


def samples(path: Path, limit: int | None) -> list[tuple[str, Path, str, str]]:
    """``(id, image, question, reference)`` of the first ``limit`` one-image samples."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if limit is not None and len(out) >= limit:
            break
        rec = json.loads(line)
        turns = rec.get("conversations") or []
        if not isinstance(rec.get("image"), str) or len(turns) < 2:
            raise ValueError(f"{path}:{n}: needs one 'image' and a question/answer pair")
        question = turns[0]["value"].replace("<image>", "").strip()
        out.append((rec.get("id", str(n)), path.parent / rec["image"], question, turns[1]["value"]))
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hf, jsonl = Path(args.hf), Path(args.jsonl)
    if not (hf / "config.json").is_file():
        print(f"caption_hf.py: error: {hf}: no config.json (not an HF export)", file=sys.stderr)
        return 2
    try:
        todo = samples(jsonl, args.limit)
    except (OSError, ValueError, KeyError) as exc:
        print(f"caption_hf.py: error: {exc}", file=sys.stderr)
        return 2
    import torch
    from PIL import Image
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_navil.inference.generate import CaptionResult
    from megatron_navil.testing.caption_scores import caption_metrics

    model = AutoModelForCausalLM.from_pretrained(str(hf), trust_remote_code=True).eval()
    tok = AutoTokenizer.from_pretrained(str(hf), trust_remote_code=True)
    results = []
    began = time.perf_counter()
    with torch.no_grad():
        for sid, image, question, reference in todo:
            with Image.open(image) as im:
                text = model.chat_images(tok, question, [im.convert("RGB")], args.max_new_tokens)
            results.append(CaptionResult(sid, reference, text, "", 0, 0, text == reference))
    seconds = time.perf_counter() - began
    for r in results[: args.show]:
        print(f"[{r.source}]\n  reference: {r.reference!r}\n  generated: {r.generated!r}")
    print(f"{len(results)} captions in {seconds:.1f} s through {hf} (transformers)")
    metrics = caption_metrics(results)
    print(metrics.table())
    differ = None
    if args.compare:
        theirs = [c["generated"] for c in json.loads(Path(args.compare).read_text())["captions"]]
        differ = sum(a != r.generated for a, r in zip(theirs, results, strict=False))
        print(f"differ from {args.compare}: {differ} of {min(len(theirs), len(results))}")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "captions": [vars(r) for r in results], "metrics": metrics.metrics,
            "differ_from_megatron": differ,
        }, indent=1))  # fmt: skip
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
