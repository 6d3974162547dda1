"""Finishing an index: ``manifest.json`` once every unit is done (:func:`finalize`), the
``--strict`` check over finished units, and the copy of the tokenizer beside the shards.
"""

from __future__ import annotations

import json
from pathlib import Path

from megatron_navil.data.indexer.plan import canonical_json, plan_digest, write_atomic
from megatron_navil.data.indexer.settings import MAX_EXAMPLES, SKIP_REASONS, IndexFatal
from megatron_navil.data.indexer.units import unit_done, unit_marker
from megatron_navil.data.shards.corpus import MANIFEST_NAME
from megatron_navil.data.shards.format import SCHEMA_VERSION
from megatron_navil.data.tokenizer import TextTokenizer


def finalize(out: Path) -> dict:
    """Check every unit of the plan is done and write ``manifest.json``; returns it."""
    try:
        plan = json.loads((out / "plan.json").read_text())
    except (OSError, ValueError) as exc:
        raise IndexFatal(f"{out}: no readable plan.json ({exc})") from None
    digest = plan_digest(plan)
    missing = [u for u in range(len(plan["units"])) if not unit_done(out, u)]
    if missing:
        head = ", ".join(map(str, missing[:10]))
        raise IndexFatal(
            f"{out}: {len(missing)} of {len(plan['units'])} units not done (first: {head}); "
            "run `build` for every --shard-index first"
        )
    shards, datasets = [], []
    totals = {k: 0 for k in ("records", "written", "bytes_in")}
    skipped: dict[str, dict] = {}
    agg = {"num_images": 0, "tokens": 0, "llm_tokens": 0, "patches": 0, "bin_bytes": 0}
    ds_counts = [0] * len(plan["datasets"])
    for u in range(len(plan["units"])):
        info = json.loads(unit_marker(out, u).read_text())
        if info.get("plan_sha256") != digest:
            raise IndexFatal(f"{unit_marker(out, u)}: written for a different plan")
        for k in totals:
            totals[k] += info[k]
        ds_counts[info["dataset"]] += info["written"]
        for reason, e in info["skipped"].items():
            acc = skipped.setdefault(reason, {"count": 0, "examples": []})
            acc["count"] += e["count"]
            acc["examples"] = (acc["examples"] + e["examples"])[:MAX_EXAMPLES]
        for s in info["shards"]:
            shards.append(s)
            for k in ("num_images", "tokens", "llm_tokens", "patches"):
                agg[k] += s[k]
            agg["bin_bytes"] += s["bin_size"]
    if totals["written"] == 0:
        raise IndexFatal(
            f"no sample indexed: {totals['records']:,} records skipped ({_skip_summary(skipped)})"
            "; no manifest written"
        )
    first = 0
    for d, spec in enumerate(plan["datasets"]):
        datasets.append(
            {
                "name": spec["name"],
                "kind": spec["kind"],
                "files": spec["files"],
                "repeat_time": spec["repeat_time"],
                "first_sample": first,
                "num_samples": ds_counts[d],
            }
        )
        first += ds_counts[d]
    s = plan["settings"]
    tok = plan["tokenizer"]
    manifest = {
        "format": "megatron_navil.shards",
        "schema_version": SCHEMA_VERSION,
        "plan_sha256": digest,
        "placeholder_token": "<img>",
        "placeholder_id": tok["special_ids"]["<img>"],
        "token_dtype": "uint32",
        "template": s["template"],
        "settings": s,
        "image": s["image"],
        # the copy's own fingerprint too: caption.py and blends accept either file
        "tokenizer": {**tok, "copy_fingerprint": _copy_fingerprint(out, tok)},
        "tokenizer_copy": tokenizer_copy_name(tok),
        "counts": {
            "records": totals["records"],
            "samples": totals["written"],
            "skipped": totals["records"] - totals["written"],
            "input_bytes": totals["bytes_in"],
            "shards": len(shards),
            **agg,
        },
        "skipped": {k: skipped[k] for k in SKIP_REASONS if k in skipped},
        "datasets": datasets,
        "shards": [
            {
                k: sh[k]
                for k in (
                    "name",
                    "bin",
                    "idx",
                    "bin_size",
                    "idx_size",
                    "bin_sha256",
                    "idx_sha256",
                    "num_samples",
                    "num_images",
                    "tokens",
                    "llm_tokens",
                    "patches",
                )
            }
            for sh in shards
        ],
    }
    write_atomic(out / MANIFEST_NAME, canonical_json(manifest))
    return manifest


def _skip_summary(skipped: dict[str, dict]) -> str:
    """``reason count, ...; e.g. location: detail`` of a skip table (one line; the example is
    the first of the first reason in table order)."""
    if not skipped:
        return "the inputs hold no record"
    counts = ", ".join(f"{k} {skipped[k]['count']:,}" for k in SKIP_REASONS if k in skipped)
    first = next(skipped[k]["examples"][0] for k in SKIP_REASONS if k in skipped)
    return f"{counts}; e.g. {first}"


def check_strict(out: Path, units: list[int]) -> None:
    """``--strict`` over finished units (a re-run, or other machines' units before finalize):
    each must have indexed every record, as a ``--strict`` build would have; IndexFatal names
    the first that skipped any (it was built without ``--strict``)."""
    for u in units:
        if not unit_done(out, u):
            continue
        info = json.loads(unit_marker(out, u).read_text())
        if info["skipped"]:
            n = sum(e["count"] for e in info["skipped"].values())
            raise IndexFatal(
                f"--strict: {unit_marker(out, u)} was built without --strict and skipped {n:,} "
                f"of {info['records']:,} records ({_skip_summary(info['skipped'])}); "
                "re-index into a new --output"
            )


def _copy_fingerprint(out: Path, tok: dict) -> str | None:
    copy = out / tokenizer_copy_name(tok)
    return TextTokenizer(copy).fingerprint if copy.is_file() else None


def tokenizer_copy_name(tok: dict) -> str:
    return "tokenizer.model" if tok["kind"] == "sentencepiece" else "tokenizer.json"


def save_tokenizer_copy(out: Path, tok: TextTokenizer) -> None:
    """The tokenizer as used (HF: with the added special tokens; sentencepiece: the file)."""
    dest = out / tokenizer_copy_name(tok.describe())
    if tok.kind == "hf":
        data = tok._hf.to_str(pretty=True).encode()
    else:
        data = tok.path.read_bytes()
    if not dest.exists() or dest.read_bytes() != data:
        write_atomic(dest, data)
