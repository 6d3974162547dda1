"""Shard format: writer/reader round trip, derived counts vs the ops, corruption detection,
image preparation (kept vs converted modes), tokenizers and chat templates."""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from megatron_navil.config import SPECIAL_TOKENS
from megatron_navil.data.images import ImageRejected, prepare_image
from megatron_navil.data.shards.corpus import IMAGE_RULE, ShardDataset
from megatron_navil.data.shards.format import HEADER_DTYPE, HEADER_SIZE, SAMPLE_DTYPE, ShardError
from megatron_navil.data.shards.reader import ShardReader
from megatron_navil.data.shards.samples import ImageEntry, expand_image_blocks, loss_runs
from megatron_navil.data.shards.writer import ShardWriter
from megatron_navil.data.templates import Renderer
from megatron_navil.data.tokenizer import SENTENCEPIECE_RULE, TextTokenizer, TokenizerError
from megatron_navil.ops import image_token_layout, merged_grid, scales_for_image
from megatron_navil.testing.synthetic_corpus import train_tokenizer

PLACEHOLDER = 4  # any id; the writer is told which


def _png(h: int, w: int, seed: int = 0, mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr, "RGB").convert(mode).save(buf, format="PNG")
    return buf.getvalue()


def _entry(h: int, w: int, seed: int = 0, min_patches: int = 4, max_patches: int = 64):
    scales = tuple(scales_for_image(h, w, 16, 2, min_patches, max_patches))
    grids = tuple(tuple(merged_grid(a, b)) for a, b in scales)
    return ImageEntry(_png(h, w, seed), "png", (h, w), scales, grids)


def _write(tmp_path, samples, name="s"):
    w = ShardWriter(tmp_path / f"{name}.bin", tmp_path / f"{name}.idx", PLACEHOLDER, merge=2)
    for k, (toks, mask, imgs) in enumerate(samples):
        w.add(toks, mask, imgs, dataset=k % 3, record=10 + k)
    info = w.close()
    return ShardReader(tmp_path / f"{name}.bin", tmp_path / f"{name}.idx"), info


def _samples():
    return [
        ([1, 2, PLACEHOLDER, 3, 5], [0, 0, 0, 1, 1], [_entry(40, 90, 1)]),
        ([7, 8, 9], [1, 1, 1], []),  # text only
        (
            [PLACEHOLDER, 11, PLACEHOLDER, 12, 13, 14],
            [0, 1, 0, 0, 1, 0],
            [_entry(128, 33, 2), _entry(32, 32, 3)],
        ),
        ([PLACEHOLDER], [0], [_entry(100, 100, 4)]),
    ]


def test_round_trip_and_counts_equal_ops(tmp_path):
    samples = _samples()
    reader, info = _write(tmp_path, samples)
    assert len(reader) == len(samples) == info["num_samples"]
    for k, (toks, mask, imgs) in enumerate(samples):
        s = reader.sample(k)
        np.testing.assert_array_equal(s.tokens, toks)
        np.testing.assert_array_equal(s.loss_mask, np.array(mask, bool))
        assert s.record == 10 + k and s.dataset == k % 3
        assert len(s.images) == len(imgs)
        for got, want in zip(s.images, imgs, strict=True):
            assert got == want  # bytes, format, sizes, scales, grids
        # llm_tokens / patches against the ops, computed independently
        block = sum(
            len(image_token_layout([(gh // 2, gw // 2) for gh, gw in im.grids])) for im in imgs
        )
        assert s.llm_tokens == len(toks) - len(imgs) + block == reader.llm_tokens[k]
        assert s.patches == sum(gh * gw for im in imgs for gh, gw in im.grids)
        ids, m = expand_image_blocks(
            s.tokens, s.loss_mask, s.images, _special_ids(), PLACEHOLDER, merge=2
        )
        assert len(ids) == s.llm_tokens and m.sum() == sum(mask)
    assert reader.llm_tokens.dtype == np.int64 and reader.patches.dtype == np.int64
    clone = pickle.loads(pickle.dumps(reader))
    assert clone._maps is None and clone.sample(2).images == reader.sample(2).images


def _special_ids():
    ids = {t: 1000 + i for i, t in enumerate(SPECIAL_TOKENS)}
    ids["<img>"] = PLACEHOLDER
    return ids


def test_expand_matches_image_token_layout(tmp_path):
    reader, _ = _write(tmp_path, _samples())
    s = reader.sample(0)
    special = _special_ids()
    ids, mask = expand_image_blocks(s.tokens, s.loss_mask, s.images, special, PLACEHOLDER)
    layout = image_token_layout([(gh // 2, gw // 2) for gh, gw in s.images[0].grids])
    as_ids = np.array([special[SPECIAL_TOKENS[k]] for k in layout.tolist()])
    np.testing.assert_array_equal(ids, np.concatenate([[1, 2], as_ids, [3, 5]]))
    assert not mask[2 : 2 + len(as_ids)].any() and mask[-2:].all()


def test_loss_runs():
    np.testing.assert_array_equal(loss_runs([0, 1, 1, 0, 1]), [[1, 2], [4, 1]])
    assert loss_runs([]).shape == (0, 2)
    assert loss_runs([0, 0]).shape == (0, 2)


def test_writer_rejects_inconsistent_samples(tmp_path):
    w = ShardWriter(tmp_path / "a.bin", tmp_path / "a.idx", PLACEHOLDER)
    with pytest.raises(ShardError, match="placeholders"):
        w.add([1, PLACEHOLDER], [0, 0], [], 0, 0)
    with pytest.raises(ShardError, match="loss mask"):
        w.add([PLACEHOLDER], [1], [_entry(32, 32)], 0, 0)
    with pytest.raises(ShardError, match="uint32"):
        w.add([2**32], [0], [], 0, 0)


def _corpus(tmp_path):
    """A one-shard corpus directory with a manifest (as finalize writes it, minimal)."""
    (tmp_path / "shards").mkdir()
    _, info = _write(tmp_path / "shards", _samples(), name="000000-000")
    manifest = {
        "format": "megatron_navil.shards",
        "schema_version": 1,
        "placeholder_id": PLACEHOLDER,
        "image": {"merge": 2, "rule": IMAGE_RULE},
        "tokenizer": {"special_ids": _special_ids()},
        "datasets": [],
        "shards": [{"bin": "shards/000000-000.bin", "idx": "shards/000000-000.idx", **info}],
    }
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    return tmp_path


def test_dataset_concatenates_and_verifies(tmp_path):
    root = _corpus(tmp_path)
    ds = ShardDataset(root)
    assert len(ds) == 4 and ds.shard_of(3) == (0, 3)
    assert ds.llm_tokens.flags.writeable is False
    assert ds.sample(2).index == 2
    with pytest.raises(IndexError):
        ds.sample(4)
    # a flipped byte anywhere in the .bin: caught by the checksum on open
    bin_path = root / "shards/000000-000.bin"
    data = bytearray(bin_path.read_bytes())
    data[len(data) // 2] ^= 0x01
    bin_path.write_bytes(bytes(data))
    with pytest.raises(ShardError, match="sha256"):
        ShardDataset(root)
    ShardDataset(root, verify="size")  # the named way to skip hashing
    with pytest.raises(ValueError, match="verify"):
        ShardDataset(root, verify="fast")


def test_structural_corruption_is_caught_without_checksum(tmp_path):
    _write(tmp_path, _samples())
    idx = tmp_path / "s.idx"
    good = idx.read_bytes()
    # token offset of sample 1 pointing past the end of the .bin
    samples_off = int(np.frombuffer(good[:HEADER_SIZE], HEADER_DTYPE)[0]["samples_offset"])
    assert samples_off >= HEADER_SIZE and SAMPLE_DTYPE.fields["tok_offset"][1] == 0
    bad = bytearray(good)
    bad[samples_off + 64 : samples_off + 72] = (10**9).to_bytes(8, "little")
    assert len(bad) == len(good)
    idx.write_bytes(bytes(bad))
    with pytest.raises(ShardError, match="token range"):
        len(ShardReader(tmp_path / "s.bin", idx))
    # a patch grid changed: the stored llm_tokens/patches no longer agree
    scales_off = int(np.frombuffer(good[:HEADER_SIZE], HEADER_DTYPE)[0]["scales_offset"])
    bad = bytearray(good)
    bad[scales_off + 8] ^= 0x02  # gh of the first scale
    idx.write_bytes(bytes(bad))
    with pytest.raises(ShardError, match="disagree"):
        len(ShardReader(tmp_path / "s.bin", idx))
    for mutate, match in (
        (lambda b: b"XXXXXXXX" + b[8:], "magic"),
        (lambda b: b[:100], "truncated|size"),
        (lambda b: b + b"\0", "size"),
    ):
        idx.write_bytes(mutate(good))
        with pytest.raises(ShardError, match=match):
            len(ShardReader(tmp_path / "s.bin", idx))


def test_corpus_of_another_image_rule_is_refused(tmp_path):
    """A manifest without ``image["rule"]`` was indexed with the earlier image rule: refused in
    one line before any shard is read; so is an unknown rule."""
    root = _corpus(tmp_path)
    ShardDataset(root)
    manifest = json.loads((root / "manifest.json").read_text())
    assert IMAGE_RULE == "navil-release"
    del manifest["image"]["rule"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    (root / "shards/000000-000.bin").unlink()  # the rule is checked first
    with pytest.raises(ShardError) as err:
        ShardDataset(root, verify="size")
    assert str(err.value) == (
        f"corpus {root} was indexed with the old image rule (padded-count resize, sqrt(2)/2 "
        "multi-scale chain); this version resizes as the released NaViL code does: re-index "
        "it with tools/index_corpus.py"
    )
    manifest["image"]["rule"] = "navil-2027"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"^corpus .* image rule 'navil-2027'; this version imp"):
        ShardDataset(root)
    del manifest["image"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match="malformed manifest"):
        ShardDataset(root)


def test_sentencepiece_corpus_of_another_tokenizer_rule_is_refused(tmp_path):
    """A sentencepiece corpus indexed before the HF-slow rule (every separately encoded piece,
    e.g. each assistant answer, began with a dummy-prefix '▁') has no ``tokenizer["rule"]``:
    refused in one line; an HF ``tokenizer.json`` corpus needs no rule."""
    root = _corpus(tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["tokenizer"]["kind"] = "hf"
    (root / "manifest.json").write_text(json.dumps(manifest))
    ShardDataset(root)
    manifest["tokenizer"].update(kind="sentencepiece", rule=SENTENCEPIECE_RULE)
    (root / "manifest.json").write_text(json.dumps(manifest))
    ShardDataset(root)
    del manifest["tokenizer"]["rule"]
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError) as err:
        ShardDataset(root)
    assert str(err.value) == (
        f"corpus {root} was indexed with the old sentencepiece rule (a dummy-prefix '▁' before "
        "every separately encoded piece, e.g. each assistant answer); this version tokenises as "
        "the model's HF tokenizer does: re-index it with tools/index_corpus.py"
    )
    manifest["tokenizer"]["rule"] = "hf-slow-2"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ShardError, match=r"^corpus .* sentencepiece rule 'hf-slow-2'; this ver"):
        ShardDataset(root)


def test_missing_manifest_is_one_line_error(tmp_path):
    with pytest.raises(ShardError, match="no manifest"):
        ShardDataset(tmp_path)


# ---- images ---------------------------------------------------------------------------------


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def test_prepare_keeps_supported_bytes_unchanged():
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), np.uint8))
    for fmt, name in (("PNG", "png"), ("JPEG", "jpeg"), ("WEBP", "webp")):
        raw = _encode(rgb, fmt)
        p = prepare_image(raw)
        assert (p.data, p.format, p.height, p.width, p.converted) == (raw, name, 20, 30, False)
    gray = _encode(rgb.convert("L"), "PNG")
    assert prepare_image(gray).data == gray


def test_prepare_converts_unsupported_modes():
    rng = np.random.default_rng(1)
    rgba = np.zeros((4, 5, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[0, 0, 3] = 255  # one opaque red pixel, the rest transparent
    p = prepare_image(_encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    out = np.asarray(Image.open(io.BytesIO(p.data)))
    assert p.converted and p.format == "png" and out.shape == (4, 5, 3)
    assert tuple(out[0, 0]) == (200, 0, 0) and tuple(out[1, 1]) == (255, 255, 255)  # on white
    # 16-bit grayscale: scaled to 8 bits, not clipped
    g16 = np.array([[0, 65535, 32896]], np.uint16)
    img16 = Image.fromarray(g16)
    assert img16.mode.startswith("I;16")
    p = prepare_image(_encode(img16, "PNG"))
    assert np.asarray(Image.open(io.BytesIO(p.data)))[0, :, 0].tolist() == [0, 255, 128]
    # CMYK JPEG, palette with transparency, GIF, BMP: converted to RGB PNG
    cmyk = Image.fromarray(rng.integers(0, 256, (8, 8, 3), np.uint8)).convert("CMYK")
    pal = Image.new("P", (6, 6), 0)
    pal.info["transparency"] = 0
    for raw in (
        _encode(cmyk, "JPEG"),
        _encode(pal, "PNG", transparency=0),
        _encode(Image.new("RGB", (7, 3), (1, 2, 3)), "GIF"),
        _encode(Image.new("RGB", (7, 3), (1, 2, 3)), "BMP"),
    ):
        p = prepare_image(raw)
        assert p.converted and p.format == "png"
        assert Image.open(io.BytesIO(p.data)).mode == "RGB"


def test_prepare_rejects_broken_images():
    raw = _encode(Image.new("RGB", (64, 64), (9, 9, 9)), "JPEG")
    for bad, reason in (
        (b"", "zero_size_image"),
        (b"not an image at all", "corrupt_image"),
        (raw[: len(raw) // 2], "corrupt_image"),
    ):
        with pytest.raises(ImageRejected) as exc:
            prepare_image(bad)
        assert exc.value.reason == reason


# ---- tokenizers and templates -----------------------------------------------------------------


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer(["two red circles on the left on a white background."], path)
    return TextTokenizer(path)


def test_special_tokens_are_single_ids(hf_tok):
    for t in SPECIAL_TOKENS:
        assert hf_tok.encode_markup(t) == [hf_tok.special_ids[t]]
    assert hf_tok.vocab_size <= 512
    ids = hf_tok.encode_text("a <ref>cat</ref>")
    assert hf_tok.special_ids["<ref>"] in ids and hf_tok.special_ids["</ref>"] == ids[-1]
    assert hf_tok.decode(ids) == "a <ref>cat</ref>"
    assert hf_tok.find_reserved("x <IMG_CONTEXT>") == "<IMG_CONTEXT>"
    assert hf_tok.find_reserved("a <ref>b</ref> <image>") is None


@pytest.mark.parametrize("template", ["internlm2-chat", "qwen3-chat"])
def test_templates_exactly_as_navil_md(hf_tok, template):
    r = Renderer(hf_tok, template, system="SYS")
    out = r.conversation([("user", "<image>\nQ"), ("assistant", "A")])
    think = "<think>\n\n</think>\n\n" if template == "qwen3-chat" else ""
    text = hf_tok.decode(out.ids)
    assert text == (
        "<|im_start|>system\nSYS<|im_end|><|im_start|>user\n<img>\nQ<|im_end|>"
        f"<|im_start|>assistant\n{think}A<|im_end|>"
    )
    ids = np.array(out.ids)
    assert hf_tok.decode(ids[np.array(out.mask)].tolist()) == "A<|im_end|>"
    assert out.placeholders == 1
    # the prompt is tokenized as the generation prompt is at inference, then the answer
    prompt = text[: text.rindex("A<|im_end|>")]
    enc = hf_tok._hf.encode
    assert out.ids == enc(prompt).ids + enc("A").ids + [hf_tok.special_ids["<|im_end|>"]]


def test_sentencepiece_appends_missing_specials(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["the red circle is on the left", "a blue square"] * 50))
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(tmp_path / "sp"),
        vocab_size=20,
        minloglevel=2,
    )
    tok = TextTokenizer(tmp_path / "sp.model")
    base = tok._sp.get_piece_size()
    assert [tok.special_ids[t] for t in SPECIAL_TOKENS] == list(range(base, base + 12))
    ids = tok.encode_text("red <ref>x</ref>")
    assert tok.special_ids["<ref>"] in ids
    assert tok.decode([tok.special_ids["<img>"]]) == "<img>"


def test_every_sample_starts_with_the_tokenizers_prefix(tmp_path):
    """An InternLM2-style sentencepiece tokenizer adds BOS before a text, as the released
    code's ``tokenizer(query)`` does: so does every rendered sample (no loss on it); a
    tokenizer that adds nothing (byte-level BPE, Qwen3) gets nothing."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["the red circle is on the left", "a blue square"] * 50))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=20, minloglevel=2
    )
    tok = TextTokenizer(tmp_path / "sp.model")
    bos = tok._sp.bos_id()
    assert tok.prefix_ids == (bos,)
    r = Renderer(tok, "internlm2-chat", system="")
    for out in (
        r.conversation([("user", "Q"), ("assistant", "A")]),
        r.caption("a blue square", "raw", ""),
        r.document([("text", "red"), ("image", None)]),
    ):
        assert out.ids[0] == bos and not out.mask[0]
        assert bos not in out.ids[1:]
    (tmp_path / "tokenizer_config.json").write_text('{"add_bos_token": false}')
    plain = Renderer(TextTokenizer(tmp_path / "sp.model"), "internlm2-chat", system="")
    assert plain.conversation([("user", "Q"), ("assistant", "A")]).ids[0] != bos


def test_the_backend_is_chosen_by_content_not_suffix(tmp_path, hf_tok):
    """mistral-common names its sentencepiece files tokenizer.model.v3 (they were parsed as
    JSON); a tokenizer.json under another name is still JSON."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(["the red circle is on the left", "a blue square"] * 50))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "sp"), vocab_size=20, minloglevel=2
    )
    versioned = tmp_path / "tokenizer.model.v3"
    versioned.write_bytes((tmp_path / "sp.model").read_bytes())
    tok = TextTokenizer(versioned)
    assert tok.kind == "sentencepiece"
    assert tok.encode_text("a blue square") == TextTokenizer(tmp_path / "sp.model").encode_text(
        "a blue square"
    )
    renamed = tmp_path / "vocab.bin"
    renamed.write_bytes(hf_tok.path.read_bytes())
    assert TextTokenizer(renamed).kind == "hf"
    junk = tmp_path / "tokenizer.json"
    junk.write_bytes(b"\x00\x01 not a tokenizer")
    with pytest.raises(TokenizerError, match=r"not a sentencepiece model .*nor an HF"):
        TextTokenizer(junk)
