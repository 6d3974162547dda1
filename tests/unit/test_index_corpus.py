"""tools/index_corpus.py end to end: round trip, every input format, every bad-input class,
kill -9 + resume, --num-shards partitions, 1 vs 2 workers, the CLI's errors, inspect_shards."""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from megatron_navil.config.model import DEFAULT_SYSTEM_MESSAGE
from megatron_navil.config.registry import get_config
from megatron_navil.data.shards.corpus import ShardDataset
from megatron_navil.data.tokenizer import TextTokenizer
from megatron_navil.ops import merged_grid, scales_for_image
from megatron_navil.testing.synthetic_corpus import write_corpus

ROOT = Path(__file__).resolve().parents[2]


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


index_corpus = _load_tool("index_corpus")
inspect_shards = _load_tool("inspect_shards")


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    write_corpus(root, num_train=40, num_val=5, seed=3)
    return root


def _build(inputs, out, tok, *extra, quiet=True):
    argv = ["build", "--output", str(out), "--tokenizer", str(tok), "--config", "tiny"]
    for i in inputs:
        argv += ["--input", str(i)]
    return index_corpus.main(argv + (["--quiet"] if quiet else []) + list(map(str, extra)))


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


# ---- round trip ------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["internlm2-chat", "qwen3-chat"])
def test_round_trip_conversations(syn, tmp_path, template):
    out = tmp_path / "out"
    assert _build([syn / "train.jsonl"], out, syn / "tokenizer.json", "--template", template) == 0
    ds = ShardDataset(out)
    tok = TextTokenizer(out / "tokenizer.json")
    lines = (syn / "train.jsonl").read_text().splitlines()
    assert len(ds) == len(lines) == _manifest(out)["counts"]["samples"]
    think = "<think>\n\n</think>\n\n" if template == "qwen3-chat" else ""
    for i, line in enumerate(lines):
        rec = json.loads(line)
        s = ds.sample(i)
        q, a = rec["conversations"][0]["value"], rec["conversations"][1]["value"]
        # the default system turn (InternVL's message, as the released models are prompted)
        want = f"<|im_start|>system\n{DEFAULT_SYSTEM_MESSAGE}<|im_end|>"
        want += (
            f"<|im_start|>user\n{q.replace('<image>', '<img>')}<|im_end|><|im_start|>assistant\n"
        )
        assert tok.decode(s.tokens.tolist()) == want + think + a + "<|im_end|>"
        assert tok.decode(s.tokens[s.loss_mask].tolist()) == a + "<|im_end|>"
        assert s.record == i
        # pixels: the stored bytes decode to the source image
        (img,) = s.images
        src = np.asarray(Image.open(syn / rec["image"]).convert("RGB"))
        np.testing.assert_array_equal(np.asarray(img.decode()), src)
        # stored geometry == the ops
        h, w = src.shape[:2]
        assert img.orig_size == (h, w)
        bounds = get_config("tiny").image
        scales = scales_for_image(h, w, 16, 2, bounds.min_patches, bounds.max_patches)
        assert list(img.scales) == [tuple(x) for x in scales]
        assert list(img.grids) == [tuple(merged_grid(a_, b_)) for a_, b_ in scales]
    m = _manifest(out)
    assert m["placeholder_id"] == tok.special_ids["<img>"] and m["template"] == template
    assert m["tokenizer"]["fingerprint"] == TextTokenizer(syn / "tokenizer.json").fingerprint


# ---- input formats ---------------------------------------------------------------------------


def _img(path: Path, h: int, w: int, colour=(10, 200, 30), fmt="PNG", mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (w, h), colour).convert(mode).save(path, format=fmt)
    return path


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _decoded(out: Path) -> list[str]:
    ds = ShardDataset(out)
    tok = TextTokenizer(out / "tokenizer.json")
    return [tok.decode(ds.sample(i).tokens.tolist()) for i in range(len(ds))]


def test_jsonl_record_kinds(syn, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _img(d / "a.png", 40, 50)
    _img(d / "b.jpg", 64, 32, fmt="JPEG")
    _img(d / "c.png", 33, 90, mode="RGBA")  # converted
    rows = [
        {
            "image": "a.png",
            "conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}],
        },
        {
            "image": ["a.png", "b.jpg"],
            "conversations": [
                {"from": "system", "value": "S"},
                {"from": "human", "value": "<image> and <image>"},
                {"from": "gpt", "value": "two"},
                {"from": "human", "value": "more"},
                {"from": "gpt", "value": "done"},
            ],
        },
        {"image": "c.png", "caption": "a green square"},
        {"text": "just text"},
        {"texts": ["before", None, "after"], "images": [None, "b.jpg", None]},
        {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]},
    ]
    out = tmp_path / "out"
    assert _build([_jsonl(d / "mix.jsonl", rows)], out, syn / "tokenizer.json", "--no-system") == 0
    text = _decoded(out)
    assert text == [
        "<|im_start|>user\n<img>\nQ<|im_end|><|im_start|>assistant\nA<|im_end|>",  # prepended
        "<|im_start|>system\nS<|im_end|><|im_start|>user\n<img> and <img><|im_end|>"
        "<|im_start|>assistant\ntwo<|im_end|><|im_start|>user\nmore<|im_end|>"
        "<|im_start|>assistant\ndone<|im_end|>",
        "<img>a green square<|im_end|>",
        "just text<|im_end|>",
        "before<img>after<|im_end|>",
        "<|im_start|>user\nhi<|im_end|><|im_start|>assistant\nyo<|im_end|>",
    ]
    ds = ShardDataset(out)
    assert ds.num_images.tolist() == [1, 2, 1, 0, 1, 0]
    conv = ds.sample(2).images[0]
    assert conv.converted and conv.format == "png" and ds.sample(1).images[1].format == "jpeg"
    tok = TextTokenizer(out / "tokenizer.json")
    s = ds.sample(1)
    assert tok.decode(s.tokens[s.loss_mask].tolist()) == "two<|im_end|>done<|im_end|>"
    s = ds.sample(4)
    assert tok.decode(s.tokens[s.loss_mask].tolist()) == "beforeafter<|im_end|>"


def test_captions_csv_chat_format_meta_and_tars(syn, tmp_path):
    d = tmp_path / "in"
    imgs = d / "imgs"
    _img(imgs / "x.png", 40, 40)
    _img(imgs / "y.webp", 50, 70, fmt="WEBP")
    with open(d / "pairs.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "caption"])
        w.writerow(["imgs/x.png", "a green square, with a comma"])
        w.writerow(["imgs/y.webp", "multi\nline"])
    _jsonl(d / "ann.jsonl", [{"image": "x.png", "text": "cap"}])
    meta = {"set_a": {"root": "imgs", "annotation": "ann.jsonl", "repeat_time": 2.5}}
    (d / "meta.json").write_text(json.dumps(meta))
    tar_path = d / "wds.tar"
    with tarfile.open(tar_path, "w") as tf:
        members = [
            ("000.png", (imgs / "x.png").read_bytes()),
            ("000.txt", b"tar caption"),
            ("001.webp", (imgs / "y.webp").read_bytes()),
            ("001.json", json.dumps({"caption": "json caption"}).encode()),
            ("002.txt", b"text only sample"),
        ]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    out = tmp_path / "out"
    inputs = [d / "pairs.csv", d / "meta.json", tar_path]
    assert _build(inputs, out, syn / "tokenizer.json", "--caption-format", "chat", "--system",
                  "Be brief.") == 0  # fmt: skip
    chat = "<|im_start|>system\nBe brief.<|im_end|>"
    chat += "<|im_start|>user\n<img>\nDescribe the image.<|im_end|><|im_start|>assistant\n"
    assert _decoded(out) == [
        chat + "a green square, with a comma<|im_end|>",
        chat + "multi\nline<|im_end|>",
        chat + "cap<|im_end|>",
        chat + "tar caption<|im_end|>",
        chat + "json caption<|im_end|>",
        "text only sample<|im_end|>",
    ]
    m = _manifest(out)
    assert [
        (x["name"], x["first_sample"], x["num_samples"], x["repeat_time"]) for x in m["datasets"]
    ] == [
        ("pairs", 0, 2, 1.0),
        ("set_a", 2, 1, 2.5),
        ("wds", 3, 3, 1.0),
    ]
    ds = ShardDataset(out)
    assert ds.dataset_ids.tolist() == [0, 0, 1, 2, 2, 2]
    assert ds.sample(4).images[0].format == "webp"


# ---- bad input -------------------------------------------------------------------------------


def _bad_corpus(d: Path) -> tuple[Path, dict[str, int]]:
    d.mkdir(parents=True, exist_ok=True)
    good = _img(d / "ok.png", 40, 40)
    raw = _img(d / "j.jpg", 64, 64, fmt="JPEG").read_bytes()
    (d / "trunc.jpg").write_bytes(raw[: len(raw) // 2])
    (d / "empty.png").write_bytes(b"")
    _img(d / "thin.png", 1, 400)  # aspect 400 > 200
    conv = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    rows = [
        {"image": good.name, "conversations": conv},  # fine
        "{not json",
        "",
        [1, 2],
        {"image": "nope.png", "conversations": conv},
        {"image": "trunc.jpg", "conversations": conv},
        {"image": "empty.png", "conversations": conv},
        {"image": "thin.png", "conversations": conv},
        {"image": [good.name, good.name], "conversations": conv},
        {
            "conversations": [
                {"from": "human", "value": "x <IMG_CONTEXT>"},
                {"from": "gpt", "value": "A"},
            ]
        },
        {"conversations": [{"from": "human", "value": "only a question"}]},
        {"text": "word " * 3000},
        {"conversations": [{"from": "robot", "value": "x"}]},
    ]
    expect = {
        "malformed_json": 1,
        "empty_line": 1,
        "bad_record": 2,
        "missing_image": 1,
        "corrupt_image": 1,
        "zero_size_image": 1,
        "bad_aspect": 1,
        "placeholder_mismatch": 1,
        "reserved_token_in_text": 1,
        "no_target": 1,
        "too_long": 1,
    }
    return _jsonl(d / "bad.jsonl", rows), expect


def test_bad_input_is_counted_with_locations(syn, tmp_path, capsys):
    path, expect = _bad_corpus(tmp_path / "in")
    out = tmp_path / "out"
    assert _build([path], out, syn / "tokenizer.json", "--max-tokens", "2000") == 0
    m = _manifest(out)
    assert {k: v["count"] for k, v in m["skipped"].items()} == expect
    assert m["counts"]["samples"] == 1
    assert m["skipped"]["malformed_json"]["examples"][0].startswith(f"{path}:2: ")
    assert m["skipped"]["missing_image"]["examples"][0].startswith(f"{path}:5: ")
    report = capsys.readouterr().out
    assert "skipped 12:" in report and f"{path}:8:" in report  # bad_aspect location


def test_strict_stops_with_one_line(syn, tmp_path, capsys):
    path, _ = _bad_corpus(tmp_path / "in")
    assert _build([path], tmp_path / "out", syn / "tokenizer.json", "--strict") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{path}:2: malformed_json" in err[0]
    assert not (tmp_path / "out" / "manifest.json").exists()
    assert not list((tmp_path / "out" / "shards").iterdir())  # no partial shard left


@pytest.mark.parametrize(
    "argv, message",
    [
        (["build"], "required"),
        (["build", "--input", "x", "--output", "o", "--tokenizer", "t", "--workers", "0"], ">= 1"),
        (
            ["build", "--input", "/nonexistent.jsonl", "--output", "o", "--tokenizer", "T"],
            "no such",
        ),
        (["build", "--input", "x.jsonl", "--output", "o", "--tokenizer", "/no.json"], "tokenizer"),
        (["finalize", "/nonexistent-dir"], "plan.json"),
    ],
)
def test_cli_errors_are_one_line_exit_2(argv, message, capsys, syn):
    argv = [a if a != "T" else str(syn / "tokenizer.json") for a in argv]
    try:
        code = index_corpus.main(argv)
    except SystemExit as exc:  # argparse errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]


def test_changed_inputs_refuse_to_resume(syn, tmp_path, capsys):
    out = tmp_path / "out"
    assert _build([syn / "val.jsonl"], out, syn / "tokenizer.json") == 0
    assert _build([syn / "val.jsonl"], out, syn / "tokenizer.json", "--max-tokens", "99") == 2
    assert "plan.json differs" in capsys.readouterr().err


# ---- determinism: workers, machines, kill -9 --------------------------------------------------


def test_two_workers_equal_one_and_shards_are_bounded(syn, tmp_path):
    args = ("--samples-per-shard", "7", "--shard-size-mb", "0.001")
    tok = syn / "tokenizer.json"
    assert _build([syn / "train.jsonl"], tmp_path / "w1", tok, *args) == 0
    assert _build([syn / "train.jsonl"], tmp_path / "w2", tok, *args, "--workers", "2") == 0
    a, b = _tree(tmp_path / "w1"), _tree(tmp_path / "w2")
    assert a == b
    m = _manifest(tmp_path / "w1")
    assert len(m["shards"]) > 40 // 7 + 1  # size roll-over made more parts than units
    for s in m["shards"]:
        assert s["bin_size"] <= 0.001 * (1 << 20) or s["num_samples"] == 1


def test_num_shards_partitions_are_disjoint_and_complete(syn, tmp_path):
    tok = syn / "tokenizer.json"
    args = ("--samples-per-shard", "6")
    assert _build([syn / "train.jsonl"], tmp_path / "full", tok, *args) == 0
    parts = []
    for i in range(3):
        out = tmp_path / f"m{i}"
        assert (
            _build([syn / "train.jsonl"], out, tok, *args, "--shard-index", i, "--num-shards", 3)
            == 0
        )
        assert not (out / "manifest.json").exists()
        parts.append({k for k in _tree(out) if k.startswith(("shards/", "units/"))})
    assert all(not (parts[i] & parts[j]) for i in range(3) for j in range(i + 1, 3))
    merged = tmp_path / "merged"
    for i in range(3):
        for k, v in _tree(tmp_path / f"m{i}").items():
            (merged / k).parent.mkdir(parents=True, exist_ok=True)
            (merged / k).write_bytes(v)
    assert index_corpus.main(["finalize", str(merged)]) == 0
    assert _tree(merged) == _tree(tmp_path / "full")


@pytest.mark.slow
def test_kill_9_then_resume_is_byte_identical(syn, tmp_path):
    tok = syn / "tokenizer.json"
    args = ["--samples-per-shard", "5"]
    assert _build([syn / "train.jsonl"], tmp_path / "clean", tok, *args) == 0
    out = tmp_path / "killed"
    cmd = [sys.executable, str(ROOT / "tools/index_corpus.py"), "build", "--quiet"]
    cmd += ["--input", str(syn / "train.jsonl"), "--output", str(out), "--tokenizer", str(tok)]
    cmd += ["--config", "tiny", *args]
    env = dict(os.environ, PYTHONPATH=str(ROOT), MEGATRON_NAVIL_INDEX_UNIT_DELAY="30")
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (out / "units" / "000000.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "first unit never finished"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "manifest.json").exists()
    # leave a half-written next unit behind, as a kill during a write would
    (out / "shards" / "000001-000.bin.tmp").write_bytes(b"partial")
    assert _build([syn / "train.jsonl"], out, tok, *args) == 0
    assert _tree(out) == _tree(tmp_path / "clean")


# ---- inspect_shards --------------------------------------------------------------------------


def test_inspect_shards(syn, tmp_path, capsys):
    out = tmp_path / "out"
    assert _build([syn / "val.jsonl"], out, syn / "tokenizer.json") == 0
    capsys.readouterr()
    assert inspect_shards.main([str(out), "--verify", "--sample", "0", "--sample", "-1"]) == 0
    text = capsys.readouterr().out
    assert "verify: 2 of 2 files fine" in text and "5 samples" in text
    assert "<image 0: png" in text and "loss [" in text
    shard = next((out / "shards").glob("*.bin"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert inspect_shards.main([str(out), "--verify"]) == 2
    assert "CORRUPT" in capsys.readouterr().out
    assert inspect_shards.main([str(tmp_path / "nothing")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_system_turn_default_override_and_none(syn, tmp_path):
    """NAVIL.md, "The released code's exact behaviour", 4: every conversation gets the
    template's system turn with InternVL's default message (as InternVL's training adds it);
    --system replaces it, --no-system drops it, a record's own system turn wins."""
    rows = [
        {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q"},
                           {"from": "gpt", "value": "A"}]},
    ]  # fmt: skip
    src = _jsonl(tmp_path / "conv.jsonl", rows)
    body = "<|im_start|>user\nQ<|im_end|><|im_start|>assistant\nA<|im_end|>"
    for extra, system in (
        ((), DEFAULT_SYSTEM_MESSAGE),
        (("--system", "X"), "X"),
        (("--no-system",), None),
    ):
        out = tmp_path / f"out{len(extra)}{system is None}"
        assert _build([src], out, syn / "tokenizer.json", *extra) == 0
        head = "" if system is None else f"<|im_start|>system\n{system}<|im_end|>"
        assert _decoded(out) == [head + body, f"<|im_start|>system\nS<|im_end|>{body}"]
        assert _manifest(out)["settings"]["system"] == (system or "")


# ---- edge cases from a user's report -----------------------------------------------------------


def test_strict_rerun_checks_the_existing_output(syn, tmp_path, capsys):
    """--strict over an OUT whose units are finished checks them: an index built without
    --strict that skipped records is refused (one line, exit 2); an all-good one passes."""
    path, _ = _bad_corpus(tmp_path / "in")
    out = tmp_path / "out"
    tok = syn / "tokenizer.json"
    assert _build([path], out, tok, "--max-tokens", "2000") == 0
    before = _tree(out)
    capsys.readouterr()
    assert _build([path], out, tok, "--max-tokens", "2000", "--strict") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "--strict" in err[0] and "built without --strict and skipped 12 of 13" in err[0]
    assert f"e.g. {path}:3: blank line" in err[0]  # an example of the first reason
    assert _tree(out) == before  # nothing rewritten
    # an index that skipped nothing is what --strict promises: the re-run passes
    good = tmp_path / "good"
    assert _build([syn / "val.jsonl"], good, tok) == 0
    assert _build([syn / "val.jsonl"], good, tok, "--strict") == 0


def _svg_corpus(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    _img(d / "ok.png", 40, 40)
    svg = '<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="8" height="8">'
    (d / "logo.svg").write_text(svg + '<rect width="8" height="8"/></svg>\n')
    (d / "noise.bin").write_bytes(bytes(range(7, 71)))
    rows = [{"image": n, "caption": f"picture {i}"} for i, n in
            enumerate(["ok.png", "logo.svg", "ok.png", "noise.bin", "ok.png"])]  # fmt: skip
    return _jsonl(d / "svg.jsonl", rows)


def test_unreadable_image_names_format_and_path_deterministically(syn, tmp_path):
    path = _svg_corpus(tmp_path / "in")
    tok = syn / "tokenizer.json"
    args = ("--samples-per-shard", "1")  # one record per unit: both workers get SVG-free units
    assert _build([path], tmp_path / "w1", tok, *args) == 0
    assert _build([path], tmp_path / "w2", tok, *args, "--workers", "2") == 0
    assert _tree(tmp_path / "w1") == _tree(tmp_path / "w2")  # manifest and units/*.json too
    examples = _manifest(tmp_path / "w1")["skipped"]["corrupt_image"]["examples"]
    assert examples == [
        f"{path}:2: logo.svg: SVG is not supported (a vector image); convert it to PNG",
        f"{path}:4: noise.bin: not an image format Pillow reads "
        "(first bytes: 07 08 09 0a 0b 0c 0d 0e)",
    ]


def test_unidentified_formats_are_named():
    from megatron_navil.data.images import ImageRejected, prepare_image

    cases = {
        b"\xef\xbb\xbf  <svg width='1'/>": "SVG is not supported",
        b"<!DOCTYPE html><html>404</html>": "an HTML page",
        b"%PDF-1.7\n...": "PDF is not supported",
        b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00": "HEIC/HEIF is not supported",
        b"\x00\x00\x00\x0cJXL \r\n\x87\n": "JPEG XL is not supported",
    }
    for raw, want in cases.items():
        with pytest.raises(ImageRejected) as exc:
            prepare_image(raw)
        assert exc.value.reason == "corrupt_image" and want in str(exc.value), raw
        assert "0x" not in str(exc.value) and "BytesIO" not in str(exc.value)


@pytest.mark.parametrize("mode, key", [("RGB", (10, 200, 30)), ("L", 77), ("I;16", 4000)])
def test_png_colour_key_is_composited_onto_white(mode, key):
    """A PNG with a tRNS colour key: its key-coloured pixels are transparent, so they become
    white like every other transparent pixel; the others keep their value."""
    from megatron_navil.data.images import prepare_image

    other = {"RGB": (1, 2, 3), "L": 9, "I;16": 1000}[mode]
    # left half opaque, right half the transparent key colour
    if mode == "I;16":
        img = Image.fromarray(np.array([[other] * 3 + [key] * 3] * 4, "<u2"))
    else:
        img = Image.new(mode, (6, 4), key)
        img.paste(other, (0, 0, 3, 4))
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=key)
    assert "transparency" in Image.open(io.BytesIO(buf.getvalue())).info
    p = prepare_image(buf.getvalue())
    assert p.converted and p.format == "png"
    got = np.asarray(Image.open(io.BytesIO(p.data)).convert("RGB"))
    opaque = {"RGB": (1, 2, 3), "L": (9, 9, 9), "I;16": (4, 4, 4)}[mode]  # 1000 * 255 / 65535
    assert (got[:, :3] == opaque).all() and (got[:, 3:] == 255).all()
    # without the key the same pixels are kept (RGB/L: stored as they are)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    if mode != "I;16":
        assert not prepare_image(buf.getvalue()).converted


def test_empty_targets_are_no_target(syn, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _img(d / "a.png", 40, 40)
    q = {"from": "human", "value": "Q"}
    rows = [
        {"image": "a.png", "caption": "kept"},
        {"image": "a.png", "caption": ""},
        {"image": "a.png", "text": "  \n"},
        {"text": ""},
        {"text": "\t"},
        {"conversations": [q, {"from": "gpt", "value": ""}]},
        {"conversations": [q, {"from": "gpt", "value": " "}, q, {"from": "gpt", "value": ""}]},
        {"conversations": [q, {"from": "gpt", "value": ""}, q, {"from": "gpt", "value": "B"}]},
        {"texts": ["", None, " "], "images": [None, "a.png", None]},
        {"text": "kept too"},
    ]
    out = tmp_path / "out"
    assert _build([_jsonl(d / "e.jsonl", rows)], out, syn / "tokenizer.json", "--no-system") == 0
    m = _manifest(out)
    assert m["counts"]["samples"] == 3
    assert {k: v["count"] for k, v in m["skipped"].items()} == {"no_target": 7}
    ex = m["skipped"]["no_target"]["examples"]
    assert ex[0] == f"{d / 'e.jsonl'}:2: the caption is empty"
    assert ex[3] == f"{d / 'e.jsonl'}:5: the text is empty"
    assert ex[4] == f"{d / 'e.jsonl'}:6: every assistant answer is empty"
    assert _decoded(out)[1].endswith("<|im_start|>assistant\nB<|im_end|>")


def test_inference_prompt_with_empty_answer_still_builds(syn, tmp_path):
    """inference.inputs.image_inputs ends its prompt with an empty answer on purpose."""
    from megatron_navil.data.indexer.samples import SampleBuilder
    from megatron_navil.data.indexer.settings import Skip

    _img(tmp_path / "a.png", 40, 40)
    tok = TextTokenizer(syn / "tokenizer.json")
    plan = {"settings": json.loads(json.dumps(_settings_dict()))}
    record = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"},
                                                  {"from": "gpt", "value": ""}]}  # fmt: skip
    built = SampleBuilder(plan, tok, require_target=False).build(record, str(tmp_path))
    assert len(built.images) == 1
    with pytest.raises(Skip) as exc:
        SampleBuilder(plan, tok).build(record, str(tmp_path))
    assert exc.value.reason == "no_target"


def _settings_dict() -> dict:
    from megatron_navil.data.indexer.settings import Settings
    from megatron_navil.ops.geometry import ImageGeometry

    b = get_config("tiny").image
    image = ImageGeometry(min_patches=b.min_patches, max_patches=b.max_patches)
    return Settings(image=image).to_plan()


def test_all_records_bad_fails_at_indexing(syn, tmp_path, capsys):
    d = tmp_path / "in"
    d.mkdir()
    path = _jsonl(d / "bad.jsonl", ["{nope", {"image": "gone.png", "caption": "x"}, {"text": ""}])
    out = tmp_path / "out"
    assert _build([path], out, syn / "tokenizer.json") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "index_corpus.py: error: no sample indexed: 3 records skipped (malformed_json 1, "
        f"missing_image 1, no_target 1; e.g. {path}:1: Expecting property name enclosed in "
        "double quotes at column 2); no manifest written"
    ]
    assert not (out / "manifest.json").exists()
    assert index_corpus.main(["finalize", str(out)]) == 2


def test_skip_messages_have_one_location_and_labelled_sizes(syn, tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _img(d / "wide.png", 30, 7000)  # W 7000, H 30: aspect 233 > 200
    _img(d / "tall.png", 7000, 30)
    rows = [
        {"image": "wide.png", "caption": "w"},
        {"image": "tall.png", "caption": "t"},
        '{"image": "wide.png", "caption": "w"',
        '{"a": 1,}',
        {"text": "kept"},
    ]
    path = _jsonl(d / "m.jsonl", rows)
    out = tmp_path / "out"
    assert _build([path], out, syn / "tokenizer.json") == 0
    m = _manifest(out)["skipped"]
    assert m["bad_aspect"]["examples"] == [
        f"{path}:1: wide.png: 7000 x 30 (W x H): aspect ratio 233.3 > 200",
        f"{path}:2: tall.png: 30 x 7000 (W x H): aspect ratio 233.3 > 200",
    ]
    assert m["malformed_json"]["examples"] == [
        f"{path}:3: Expecting ',' delimiter at the end of the line",
        f"{path}:4: Expecting property name enclosed in double quotes at column 9",
    ]
    text = json.dumps(m)
    assert "smart_resize" not in text and "scales_for_image" not in text and "line 2" not in text


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def test_tar_layout_errors_and_records_unique_across_tars(syn, tmp_path, capsys):
    """Issue: non-adjacent members (`tar cf x.tar *.png *.txt`) silently became text-only
    documents, a key seen twice went unnoticed, and record numbers restarted in every tar of a
    directory. Now: one line naming the tar and the sample, exit 2; records unique in the
    dataset and traced back to their tar."""
    png = tmp_path / "x.png"
    _img(png, 40, 40)
    data = png.read_bytes()
    apart = _write_tar(
        tmp_path / "apart.tar",
        [("a.png", data), ("b.png", data), ("a.txt", b"cap a"), ("b.txt", b"cap b")],
    )
    twice = _write_tar(
        tmp_path / "twice.tar", [("a.png", data), ("a.txt", b"one"), ("a.txt", b"two")]
    )
    cases = (
        (apart, "members of sample 'a' are not adjacent"),
        (twice, "sample 'a' has two .txt members"),
    )
    for tar, match in cases:
        capsys.readouterr()
        assert _build([tar], tmp_path / f"out_{tar.stem}", syn / "tokenizer.json") == 2
        err = capsys.readouterr().err
        assert match in err and str(tar) in err and len(err.strip().splitlines()) == 1, err
    shards = tmp_path / "wds"
    for i in range(2):
        members = []
        for k in ("a", "b"):
            members += [(f"{k}.png", data), (f"{k}.txt", f"cap {i}{k}".encode())]
        _write_tar(shards / f"shard-{i}.tar", members)
    out = tmp_path / "out_dir"
    assert _build([shards], out, syn / "tokenizer.json") == 0
    ds = ShardDataset(out)
    assert [ds.sample(i).record for i in range(len(ds))] == [0, 1, 2, 3]
    spec = ds.manifest["datasets"][0]
    assert [f["first_record"] for f in spec["files"]] == [0, 2]
    inspect_shards = _load_tool("inspect_shards")
    assert inspect_shards.source_of(spec, 3) == f", {shards / 'shard-1.tar'} record 1"
    assert inspect_shards.source_of(spec, 0) == f", {shards / 'shard-0.tar'} record 0"
