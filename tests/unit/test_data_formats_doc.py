"""docs/data.md's examples index as documented: one file per input format, written here
verbatim as in the doc, run through tools/index_corpus.py (the doc's commands, with the
synthetic corpus's tokenizer), then inspected with --verify; every example must appear in the
doc word for word (so the two cannot drift apart)."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from megatron_navil.data.shards.corpus import ShardDataset
from megatron_navil.testing.synthetic_corpus import train_tokenizer, vocabulary_text

ROOT = Path(__file__).resolve().parents[2]

# path (relative to the directory the commands run in) -> exact file text, as in docs/data.md
EXAMPLES = {
    "mydata/conversations.jsonl": (
        '{"id": "0", "image": "images/cat.jpg", "conversations": [{"from": "human", "value": '
        '"<image>\\nWhat animal is this?"}, {"from": "gpt", "value": "A cat on a sofa."}]}\n'
        '{"id": "1", "image": ["images/cat.jpg", "images/dog.jpg"], "conversations": [{"from": '
        '"human", "value": "Image 1: <image>\\nImage 2: <image>\\nWhat differs?"}, {"from": '
        '"gpt", "value": "A cat, then a dog."}, {"from": "human", "value": "Which is larger?"}, '
        '{"from": "gpt", "value": "The dog."}]}\n'
        '{"id": "2", "image": "images/chart.png", "conversations": [{"from": "human", "value": '
        '"Summarise the chart."}, {"from": "gpt", "value": "Sales double by 2024."}]}\n'
    ),
    "mydata/captions.jsonl": (
        '{"image": "images/cat.jpg", "caption": "A cat on a sofa."}\n'
        '{"image": "images/dog.jpg", "text": "A dog on a lawn."}\n'
    ),
    "mydata/captions.csv": (
        'image,caption\nimages/cat.jpg,A cat on a sofa.\nimages/dog.jpg,"A dog, on a lawn."\n'
    ),
    "mydata/text.jsonl": (
        '{"text": "Plain text for the language model, no image."}\n'
        '{"conversations": [{"from": "human", "value": "What is 2 + 2?"}, {"from": "gpt", '
        '"value": "4."}]}\n'
    ),
    "mydata/interleaved.jsonl": (
        '{"texts": ["How to draw a cat.", null, "Then add a dog:", null, "Done."], '
        '"images": [null, "images/cat.jpg", null, "images/dog.jpg", null]}\n'
    ),
    "meta.json": (
        "{\n"
        '  "llava_style": {"root": "mydata", "annotation": "mydata/conversations.jsonl", '
        '"repeat_time": 2},\n'
        '  "captions": {"root": "mydata", "annotation": "mydata/captions.jsonl", '
        '"repeat_time": 0.5}\n'
        "}\n"
    ),
}
# the WebDataset example: members of wds/shard-000000.tar in order (key = name up to first dot)
TAR_MEMBERS = [
    ("000000.jpg", "images/cat.jpg"),
    ("000000.txt", "A cat on a sofa."),
    ("000001.jpg", "images/dog.jpg"),
    (
        "000001.json",
        '{"conversations": [{"from": "human", "value": "<image>\\nWhat animal is this?"}, '
        '{"from": "gpt", "value": "A dog."}]}',
    ),
    ("000002.png", "images/chart.png"),
    ("000002.txt", "A bar chart of sales."),
]
IMAGES = {"cat.jpg": (640, 480), "dog.jpg": (480, 640), "chart.png": (800, 300)}

# input -> (samples written, images per sample)
EXPECTED = {
    "mydata/conversations.jsonl": (3, [1, 2, 1]),
    "mydata/captions.jsonl": (2, [1, 1]),
    "mydata/captions.csv": (2, [1, 1]),
    "mydata/text.jsonl": (2, [0, 0]),
    "mydata/interleaved.jsonl": (1, [2]),
    "meta.json": (5, [1, 2, 1, 1, 1]),
    "wds/shard-000000.tar": (3, [1, 1, 1]),
    "wds": (3, [1, 1, 1]),
}


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


index_corpus = _load_tool("index_corpus")
inspect_shards = _load_tool("inspect_shards")


@pytest.fixture(scope="module")
def docdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data_doc")
    (root / "mydata" / "images").mkdir(parents=True)
    for name, size in IMAGES.items():
        im = Image.new("RGB", size, (200, 120, 40))
        ImageDraw.Draw(im).ellipse((50, 50, 250, 250), fill=(20, 200, 20))
        im.save(root / "mydata" / "images" / name)
    for rel, text in EXAMPLES.items():
        (root / rel).write_text(text)
    (root / "wds").mkdir()
    with tarfile.open(root / "wds" / "shard-000000.tar", "w") as tar:
        for name, content in TAR_MEMBERS:
            src = root / "mydata" / content
            data = src.read_bytes() if name.endswith((".jpg", ".png")) else content.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    train_tokenizer(vocabulary_text(), root / "tokenizer.json")
    return root


def _build(docdir: Path, out: str, *inputs: str, extra: tuple[str, ...] = ()) -> int:
    argv = ["build", "--output", out, "--tokenizer", "tokenizer.json", "--quiet"]
    for i in inputs:
        argv += ["--input", i]
    return index_corpus.main(argv + list(extra))


@pytest.mark.parametrize("inp", list(EXPECTED))
def test_each_format_indexes(docdir, monkeypatch, inp):
    monkeypatch.chdir(docdir)
    out = "out/" + inp.replace("/", "_")
    assert _build(docdir, out, inp) == 0
    m = json.loads((docdir / out / "manifest.json").read_text())
    n, images = EXPECTED[inp]
    assert m["counts"]["samples"] == n and m["counts"]["skipped"] == 0
    ds = ShardDataset(docdir / out)
    assert [int(x) for x in ds.num_images] == images
    if inp == "meta.json":
        assert [d["repeat_time"] for d in m["datasets"]] == [2.0, 0.5]
    assert inspect_shards.main([out, "--verify"]) == 0


def test_slurm_array_then_finalize(docdir, monkeypatch, capsys):
    monkeypatch.chdir(docdir)
    inputs = ("meta.json", "wds", "mydata/interleaved.jsonl")
    for i in range(3):
        extra = ("--samples-per-shard", "2", "--no-finalize")
        extra += ("--shard-index", str(i), "--num-shards", "3")
        assert _build(docdir, "out/array", *inputs, extra=extra) == 0
    assert not (docdir / "out/array/manifest.json").exists()
    assert index_corpus.main(["finalize", "out/array"]) == 0
    m = json.loads((docdir / "out/array/manifest.json").read_text())
    assert m["counts"]["samples"] == 9 and m["counts"]["shards"] == 6
    assert [d["name"] for d in m["datasets"]] == ["llava_style", "captions", "wds", "interleaved"]
    assert inspect_shards.main(["out/array", "--verify"]) == 0


def test_examples_match_the_data_doc():
    section = (ROOT / "docs" / "data.md").read_text()
    for rel, example in EXAMPLES.items():
        for line in example.splitlines():
            assert line in section, f"{rel}: docs/data.md lacks the line {line!r}"
    for name, content in TAR_MEMBERS:
        assert name in section, f"docs/data.md lacks the tar member {name}"
        if not name.endswith((".jpg", ".png")):
            assert content in section, f"docs/data.md lacks {name}'s content {content!r}"
