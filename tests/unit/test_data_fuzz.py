"""Fuzz: >= 1000 random corruptions of JSONL lines, image bytes and shard/manifest bytes.

Each must end as a counted skip (indexer) or a one-line ShardError (reader), never another
exception, a hang (hypothesis deadline) or an accepted sample that breaks the format's
invariants. Shard corruption is always caught with ``verify="checksum"``.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from megatron_navil.data.indexer.inputs import DatasetSpec, datasets_from_inputs
from megatron_navil.data.indexer.manifest import finalize, save_tokenizer_copy
from megatron_navil.data.indexer.plan import make_plan, prepare_output
from megatron_navil.data.indexer.samples import SampleBuilder
from megatron_navil.data.indexer.settings import (
    SKIP_REASONS,
    IndexFatal,
    Settings,
    Skip,
)
from megatron_navil.data.indexer.units import Progress, process_unit, run_units
from megatron_navil.data.shards.corpus import ShardDataset
from megatron_navil.data.shards.format import ShardError
from megatron_navil.data.shards.samples import expand_image_blocks
from megatron_navil.data.tokenizer import TextTokenizer
from megatron_navil.ops.geometry import ImageGeometry
from megatron_navil.testing.synthetic_corpus import write_corpus


def fuzz(n: int):
    return settings(
        max_examples=n,
        deadline=5000,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    write_corpus(root / "syn", num_train=6, num_val=0, seed=5)
    tok = TextTokenizer(root / "syn" / "tokenizer.json")
    lines = (root / "syn" / "train.jsonl").read_text().splitlines()
    lines += [
        json.dumps({"image": "images/train/000001.png", "caption": "two red circles"}),
        json.dumps({"text": "plain text document"}),
        json.dumps({"texts": ["a", None, "b"], "images": [None, "images/train/000002.png", None]}),
    ]
    rgb = np.asarray(Image.open(root / "syn/images/train/000000.png").convert("RGB"))
    images = []
    for fmt in ("PNG", "JPEG", "WEBP"):
        buf = io.BytesIO()
        Image.fromarray(rgb).save(buf, format=fmt)
        images.append(buf.getvalue())
    out = root / "corpus"
    specs = datasets_from_inputs([str(root / "syn" / "train.jsonl")], None)
    plan = make_plan(specs, Settings(samples_per_shard=3, image=_tiny(), model_config="tiny"), tok)
    prepare_output(out, plan)
    save_tokenizer_copy(out, tok)
    run_units(out, plan, str(tok.path), list(range(len(plan["units"]))), 1, False, _noop)
    finalize(out)
    builder = SampleBuilder(plan, tok)
    return {
        "root": root,
        "tok": tok,
        "lines": lines,
        "images": images,
        "corpus": out,
        "builder": builder,
    }


def _tiny() -> ImageGeometry:
    return ImageGeometry(min_patches=4, max_patches=64)


def _noop(*_):
    pass


def _mutate(data: bytes, ops: list[tuple[int, int, int]]) -> bytes:
    """Apply (kind, position, value) edits: 0 flip bits, 1 delete, 2 insert, 3 truncate."""
    buf = bytearray(data)
    for kind, pos, value in ops:
        if not buf:
            buf = bytearray([value])
            continue
        i = pos % len(buf)
        if kind == 0:
            buf[i] ^= value or 1
        elif kind == 1:
            del buf[i : i + 1 + value % 8]
        elif kind == 2:
            buf[i:i] = bytes([value]) * (1 + value % 5)
        else:
            del buf[i:]
    return bytes(buf)


OPS = st.lists(
    st.tuples(st.integers(0, 3), st.integers(0, 1 << 30), st.integers(0, 255)),
    min_size=1,
    max_size=4,
)


@pytest.mark.slow
@fuzz(450)
@given(which=st.integers(0, 8), ops=OPS)
def test_fuzz_jsonl_lines(env, which, ops):
    line = _mutate(env["lines"][which % len(env["lines"])].encode(), ops)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        (d / "in.jsonl").write_bytes(line + b"\n")
        specs = [DatasetSpec("in", "jsonl", (str(d / "in.jsonl"),), str(env["root"] / "syn"))]
        settings = Settings(image=_tiny(), max_tokens=4096, model_config="tiny")
        plan = make_plan(specs, settings, env["tok"])
        out = d / "out"
        prepare_output(out, plan)
        markers = [
            process_unit(out, plan, u, SampleBuilder(plan, env["tok"]), False, Progress())
            for u in range(len(plan["units"]))
        ]
        records = sum(m["records"] for m in markers)
        written = sum(m["written"] for m in markers)
        skipped = sum(e["count"] for m in markers for e in m["skipped"].values())
        assert records == written + skipped
        assert all(r in SKIP_REASONS for m in markers for r in m["skipped"])
        save_tokenizer_copy(out, env["tok"])
        if written == 0:  # every record skipped: no manifest, one-line error
            with pytest.raises(IndexFatal, match=r"^no sample indexed: "):
                finalize(out)
            assert not (out / "manifest.json").exists()
            return
        finalize(out)
        ds = ShardDataset(out)
        special = ds.special_ids
        for i in range(len(ds)):
            s = ds.sample(i)
            ids, _ = expand_image_blocks(
                s.tokens, s.loss_mask, s.images, special, ds.placeholder_id
            )
            assert len(ids) == s.llm_tokens and s.loss_mask.any()


@fuzz(300)
@given(which=st.integers(0, 2), ops=OPS)
def test_fuzz_image_bytes(env, which, ops):
    raw = _mutate(env["images"][which], ops)
    try:
        entry = env["builder"].image(raw)
    except Skip as skip:
        assert skip.reason in ("corrupt_image", "zero_size_image", "bad_aspect")
        assert "\n" not in skip.detail
        return
    # accepted: the stored bytes decode to an image of the recorded size
    img = entry.decode()
    assert (img.height, img.width) == entry.orig_size and img.mode == "RGB"


SHARD_FILES = ("bin", "idx", "manifest")


@pytest.mark.slow
@fuzz(300)
@given(target=st.integers(0, 10**6), ops=OPS)
def test_fuzz_shard_bytes(env, target, ops):
    src = env["corpus"]
    manifest = json.loads((src / "manifest.json").read_text())
    with tempfile.TemporaryDirectory() as d:
        dst = Path(d) / "c"
        shutil.copytree(src, dst)
        entry = manifest["shards"][target % len(manifest["shards"])]
        kind = SHARD_FILES[target % 3]
        path = dst / ("manifest.json" if kind == "manifest" else entry[kind])
        before = path.read_bytes()
        after = _mutate(before, ops)
        if after == before:
            return
        path.write_bytes(after)
        if kind != "manifest":
            with pytest.raises(ShardError) as exc:
                ShardDataset(dst)  # checksum on open
            assert "\n" not in str(exc.value)
        # without checksums: a one-line ShardError or samples that keep the invariants
        try:
            ds = ShardDataset(dst, verify="none")
            for i in range(len(ds)):
                s = ds.sample(i)
                assert len(s.tokens) == len(s.loss_mask)
                assert s.patches == sum(gh * gw for im in s.images for gh, gw in im.grids)
        except ShardError as exc:
            assert "\n" not in str(exc)
