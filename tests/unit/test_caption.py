"""Captioning (inference/, checkpoint/model.py, tools/caption.py), the caption grammar.

* grammar: every caption the generator can produce parses back (the whole enumerated support,
  and make_scene over seeds), the enumerated distribution is the generator's, chance levels;
* inputs: a sample's prompt is its training sequence before the first loss token, the patches
  are what data.assemble builds for it, and an image file with the same prompt gives the same
  input as its indexed sample;
* generation (scripted fake model): stops at <|im_end|> or the limit, never emits image-block
  tokens, deterministic; scoring: a perfect generator scores 1.0, parse failures count wrong;
* the real tiny model in one rank: save untrained, load through resolve_checkpoint, caption
  the held-out split (the prompt the model receives is the training prompt; deterministic);
  then memorise the split with training-loader batches: every caption comes out exact;
* CLI: bad inputs exit 2 with one line; a full run writes the JSON.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from megatron_navil.checkpoint.directory import resolve_checkpoint
from megatron_navil.checkpoint.model import load_model, model_special_ids
from megatron_navil.config.tokens import IGNORE_INDEX, IMAGE_BLOCK_TOKENS
from megatron_navil.data.assemble import PackedSequenceBuilder
from megatron_navil.data.shards.corpus import ShardDataset
from megatron_navil.data.tokenizer import TextTokenizer
from megatron_navil.inference.generate import (
    Captioner,
    CaptionResult,
    Generation,
    caption_all,
)
from megatron_navil.inference.inputs import (
    CaptionError,
    dataset_inputs,
    image_inputs,
    indexer_settings,
    prompt_length,
)
from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.testing import synthetic_corpus as S
from megatron_navil.testing.caption_scores import caption_metrics
from megatron_navil.testing.loader_corpus import index

ROOT = Path(__file__).resolve().parents[2]
NUM_VAL = 6
MEMORISE_STEPS = 120  # Adam 3e-3: loss 6.2 -> ~0.01 (measured 0.014 after 100)


def _tool():
    spec = importlib.util.spec_from_file_location("caption_tool", ROOT / "tools" / "caption.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A tiny synthetic corpus with its held-out split indexed (tiny config, qwen3-chat)."""
    root = tmp_path_factory.mktemp("caption")
    write = S.write_corpus(root / "src", num_train=3, num_val=NUM_VAL, seed=11)
    common = ("--config", "tiny", "--template", "qwen3-chat", "--max-tokens", "4096")
    index([write["val"]], root / "val", write["tokenizer"], *common)
    return root


def _val_records(corpus: Path) -> list[dict]:
    return [json.loads(x) for x in (corpus / "src" / "val.jsonl").read_text().splitlines()]


# ---- the grammar -----------------------------------------------------------------------------


def test_parser_round_trips_the_whole_support():
    dist = S.scene_distribution()
    assert len(dist) == 5 * 72 * 3 + 2 * 72 * 68 * 3  # single groups + ordered pairs
    assert math.isclose(math.fsum(dist.values()), 1.0, rel_tol=1e-14)
    for caption in dist:
        parsed = S.parse_caption(caption)
        assert parsed is not None and S.caption_of(*parsed) == caption


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_parser_round_trips_generated_captions(seed):
    rng = random.Random(seed)
    for _ in range(5):
        _, caption = S.make_scene(rng, 8, 12)
        parsed = S.parse_caption(caption)
        assert parsed is not None, caption
        groups, background = parsed
        assert S.caption_of(groups, background) == caption
        assert caption in S.scene_distribution()
        assert 1 <= len(groups) <= 2 and background in S.BACKGROUNDS


def test_distribution_matches_the_generator():
    """Empirical frequencies of make_scene (2000 draws) against the enumerated probabilities,
    for events with probability >= 0.1: within 5 standard errors."""
    rng = random.Random(0)
    dist = S.scene_distribution()
    draws = [S.make_scene(rng, 4, 4)[1] for _ in range(2000)]
    events = {
        "pair": lambda c: " and " in c,
        "left": lambda c: "on the left" in c,
        "center": lambda c: "in the center" in c,
        "white": lambda c: "white background" in c,
        "first count one": lambda c: c.startswith("one "),
    }
    for name, event in events.items():
        p = sum(pr for c, pr in dist.items() if event(c))
        freq = sum(map(event, draws)) / len(draws)
        assert abs(freq - p) < 5 * math.sqrt(p * (1 - p) / len(draws)), (name, freq, p)


def test_chance_levels():
    levels = S.chance_levels()
    assert levels["exact"].uniform == pytest.approx(1 / 30456)
    assert levels["exact"].majority == pytest.approx(0.5 / 5 / 72 / 3)  # one group, any
    uniform = {k: levels[k].uniform for k in S.FIELDS}
    assert uniform == pytest.approx(
        {"groups": 1 / 2, "count": 1 / 4, "colour": 1 / 6, "shape": 1 / 3, "position": 1 / 5,
         "background": 1 / 3}
    )  # fmt: skip
    # position: first group "left" (0.5/5 + 0.5/2), second "right" (1/2 of the pairs), over
    # 1.5 groups per caption on average
    assert levels["position"].majority == pytest.approx((0.1 + 0.25 + 0.25) / 1.5)
    assert levels["count"].majority == pytest.approx(0.25)


def test_parse_failures_and_partial_credit():
    ref = "two red circles on the left and one blue square on the right on a white background."
    assert S.parse_caption("two red circles on the left on a white") is None
    assert S.parse_caption("") is None
    got = S.score_captions(
        [
            (ref, "two red circles on the left on a white background."),  # 1 group missing
            (ref, "garbage"),
        ]
    )
    assert got["exact"]["accuracy"] == 0.0 and got["parsed"]["accuracy"] == 0.5
    assert (got["count"]["correct"], got["count"]["total"]) == (1, 4)
    assert (got["background"]["correct"], got["background"]["total"]) == (1, 2)
    assert got["groups"]["correct"] == 0
    with pytest.raises(ValueError, match="not in the grammar"):
        S.score_captions([("hello", ref)])


# ---- inputs ----------------------------------------------------------------------------------


def test_prompt_is_the_training_prompt_and_pixels_are_the_loaders(corpus):
    ds = ShardDataset(corpus / "val")
    tok = TextTokenizer(corpus / "val" / "tokenizer.json")
    inputs = list(dataset_inputs(ds, tok))
    assert len(inputs) == NUM_VAL
    builder = PackedSequenceBuilder([ds], 4096, pad=False)
    records = _val_records(corpus)
    for i, inp in enumerate(inputs):
        packed = builder.build(np.array([[0, i]]))
        first_label = int(torch.nonzero(packed.labels != IGNORE_INDEX)[0])
        prompt = packed.input_ids[: first_label + 1]  # the token whose label is the answer's
        assert torch.equal(inp.input_ids, prompt)
        assert torch.equal(inp.patches, packed.patches)
        assert torch.equal(inp.patch_positions, packed.patch_positions)
        assert torch.equal(inp.vision_cu_seqlens, packed.vision_cu_seqlens)
        text = tok.decode(inp.prompt_tokens.tolist())
        assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert inp.reference == records[i]["conversations"][1]["value"]
        kwargs = inp.model_kwargs()
        assert torch.equal(kwargs["position_ids"], torch.arange(len(prompt)))
        assert kwargs["cu_seqlens"].tolist() == [0, len(prompt)]


def test_image_files_give_the_indexed_samples_input(corpus):
    ds = ShardDataset(corpus / "val")
    tok = TextTokenizer(corpus / "val" / "tokenizer.json")
    records = _val_records(corpus)
    from_data = list(dataset_inputs(ds, tok))
    for i, rec in enumerate(records[:3]):
        prompt = rec["conversations"][0]["value"].removeprefix("<image>\n")
        path = corpus / "src" / rec["image"]
        (inp,) = image_inputs([path], tok, ds.manifest["settings"], prompt)
        assert inp.reference is None and inp.source == str(path)
        assert torch.equal(inp.input_ids, from_data[i].input_ids)
        assert torch.equal(inp.patches, from_data[i].patches)
        assert torch.equal(inp.vision_cu_seqlens, from_data[i].vision_cu_seqlens)
    # the config's rules give the same geometry as the tiny-config index
    settings = indexer_settings(_tiny_cfg(), "qwen3-chat")
    assert settings["image"] == ds.manifest["settings"]["image"]
    with pytest.raises(CaptionError, match="missing_image"):
        image_inputs([corpus / "nope.png"], tok, settings, "Describe the image.")


def _tiny_cfg():
    from megatron_navil.config.registry import get_config

    return get_config("tiny")


def test_prompt_length_errors():
    with pytest.raises(CaptionError, match="no loss-masked"):
        prompt_length(np.zeros(4, bool))
    with pytest.raises(CaptionError, match="no prompt"):
        prompt_length(np.array([True, False]))
    assert prompt_length(np.array([False, False, True, True])) == 2


# ---- generation with a scripted model --------------------------------------------------------


class _Scripted(torch.nn.Module):
    """Logits whose argmax is ``script[k]`` at generation step ``k``; ``boost`` ids get an
    even larger logit (they must be masked out)."""

    def __init__(self, script, prompt_len, vocab=512, boost=()):
        super().__init__()
        self.script, self.prompt_len, self.boost = list(script), prompt_len, list(boost)
        self.cfg = _tiny_cfg()
        self.vocab = vocab
        self.seen: list[torch.Tensor] = []

    def forward(self, input_ids, position_ids, cu_seqlens, **vision):
        self.seen.append(input_ids.clone())
        t = input_ids.shape[0]
        step = t - self.prompt_len
        logits = torch.zeros(t, 1, self.vocab)
        logits[-1, 0, self.script[min(step, len(self.script) - 1)]] = 5.0
        for b in self.boost:
            logits[-1, 0, b] = 9.0
        return logits


@pytest.fixture(scope="module")
def inputs(corpus):
    ds = ShardDataset(corpus / "val")
    tok = TextTokenizer(corpus / "val" / "tokenizer.json")
    return tok, list(dataset_inputs(ds, tok))


def test_generation_stops_at_im_end_and_at_the_limit(inputs):
    tok, (inp, *_) = inputs
    words = tok.encode_text("two red circles")
    end = tok.special_ids["<|im_end|>"]
    t = int(inp.input_ids.shape[0])
    banned = [tok.special_ids[x] for x in IMAGE_BLOCK_TOKENS]
    model = _Scripted([*words, end, *words], t, boost=banned)
    gen = Captioner(model, tok, max_new_tokens=20).generate(inp)
    assert gen.stop == "im_end" and gen.token_ids == words and gen.text == "two red circles"
    assert len(model.seen) == len(words) + 1  # one forward per step, the whole sequence
    for k, seen in enumerate(model.seen):
        assert torch.equal(seen[:t], inp.input_ids) and seen[t:].tolist() == words[:k]
    model = _Scripted(words, t)
    gen = Captioner(model, tok, max_new_tokens=2).generate(inp)
    assert gen.stop == "max_new_tokens" and gen.token_ids == words[:2]
    with pytest.raises(ValueError, match="max_new_tokens"):
        Captioner(model, tok, max_new_tokens=0)


def test_perfect_generator_scores_one(inputs, monkeypatch):
    tok, items = inputs

    def perfect(self, inps):
        return [Generation([], inp.reference, "im_end") for inp in inps]

    monkeypatch.setattr(Captioner, "generate_batch", perfect)
    captioner = Captioner(_Scripted([0], 0), tok)
    results = caption_all(captioner, items)
    metrics = caption_metrics(results)
    assert metrics.grammar and metrics.samples == NUM_VAL
    for name in ("exact", "parsed", *S.FIELDS):
        assert metrics.metrics[name]["accuracy"] == 1.0, name
    assert all(r.exact for r in results)
    table = metrics.table()
    assert "position" in table and "chance" in table.splitlines()[0]
    # not the synthetic grammar: exact match only, no chance level
    other = [CaptionResult("x", "hello", "hello", "im_end", 3, 1, True)]
    m = caption_metrics(other)
    assert not m.grammar and m.metrics["exact"]["accuracy"] == 1.0
    assert math.isnan(m.metrics["exact"]["chance"])


# ---- the real tiny model in one rank ---------------------------------------------------------


def _real_model_run(root: str) -> dict:
    import warnings

    from megatron_navil.checkpoint.store import save
    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize

    warnings.filterwarnings("ignore")
    groups = initialize(seed=3)
    root_p = Path(root)
    cfg = get_config("tiny")
    tok = TextTokenizer(root_p / "val" / "tokenizer.json")
    (model,) = build_model(
        cfg, transformer_config(cfg), groups, special_ids=model_special_ids(tok.special_ids)
    )
    save(root_p / "ckpt", 5, [model], None, {})
    path = resolve_checkpoint(root_p / "ckpt")
    loaded = load_model(cfg, path, tok.special_ids, groups)
    want, got = model.state_dict(), loaded.state_dict()
    tensors = [k for k, v in want.items() if isinstance(v, torch.Tensor)]
    same = bool(tensors) and all(torch.equal(want[k], got[k]) for k in tensors)
    ds = ShardDataset(root_p / "val")
    items = list(dataset_inputs(ds, tok))
    calls: list[dict] = []
    forward = loaded.forward

    def spy(**kwargs):
        calls.append({k: v.clone() for k, v in kwargs.items()})
        return forward(**kwargs)

    loaded.forward = spy
    captioner = Captioner(loaded, tok, max_new_tokens=4)
    first = caption_all(captioner, items, batch_size=1)
    first_calls = list(calls)
    second = caption_all(captioner, items, batch_size=4)  # packed: 4 + 2 samples
    batched_calls = calls[len(first_calls) :]

    # Memorise the split with training-loader batches (all six samples packed in one
    # sequence), then caption it one sample per sequence: exact only if prompt, pixels and the
    # stop token line up with what training saw.
    loaded.forward = forward
    loaded.train()
    builder = PackedSequenceBuilder([ds], 4096, pad=False, vision_window_size=8)  # tiny's
    batch = builder.build(np.array([[0, i] for i in range(len(ds))]))
    kwargs = batch.as_model_kwargs()
    count = (batch.labels != IGNORE_INDEX).sum()
    opt = torch.optim.Adam(loaded.parameters(), lr=3e-3)
    for _ in range(MEMORISE_STEPS):
        loss = loaded(**kwargs).sum() / count
        opt.zero_grad()
        loss.backward()
        opt.step()
    loaded.eval()
    memorised = caption_all(Captioner(loaded, tok, max_new_tokens=40), items)
    one_by_one = caption_all(Captioner(loaded, tok, max_new_tokens=40), items, batch_size=1)
    # pickled here, by value: torch's queue pickler shares tensors through file descriptors
    # that die with this process
    return pickle.dumps(
        {
            "path": str(path),
            "same_weights": same,
            "first": first,
            "second": second,
            "calls": first_calls,
            "batched_calls": batched_calls,
            "items": items,
            "final_loss": float(loss),
            "memorised": memorised,
            "one_by_one": one_by_one,
        }
    )


@pytest.fixture(scope="module")
def real(corpus) -> dict:
    return pickle.loads(run_distributed(_real_model_run, 1, str(corpus), timeout=400)[0])


@pytest.mark.slow
def test_real_model_captions(real, corpus):
    assert real["same_weights"]
    assert real["path"].endswith("iter_0000005")
    first, second = real["first"], real["second"]
    assert len(first) == NUM_VAL
    assert [(r.generated, r.stop) for r in first] == [(r.generated, r.stop) for r in second]
    by_call = iter(real["calls"])
    for r, inp in zip(first, real["items"], strict=True):
        assert r.stop in ("im_end", "max_new_tokens")
        assert r.new_tokens <= 4 and (r.stop == "im_end" or r.new_tokens == 4)
        assert r.reference == inp.reference and r.exact == (r.generated == r.reference)
        # the first forward of each sample gets exactly the training prompt and its pixels
        call = next(by_call)
        assert torch.equal(call["input_ids"], inp.input_ids)
        assert torch.equal(call["patches"], inp.patches)
        assert call["cu_seqlens"].tolist() == [0, inp.input_ids.shape[0]]
        for _ in range(r.new_tokens + (r.stop == "im_end") - 1):
            next(by_call)
    assert next(by_call, None) is None
    # batched: the first forward packs samples 0-3 as training would, and the captions above
    # (one sample per forward) are the same (second == first)
    call = real["batched_calls"][0]
    lengths = [int(inp.input_ids.shape[0]) for inp in real["items"][:4]]
    assert call["cu_seqlens"].tolist() == [0, *np.cumsum(lengths).tolist()]
    assert torch.equal(call["input_ids"], torch.cat([i.input_ids for i in real["items"][:4]]))
    assert torch.equal(call["patches"], torch.cat([i.patches for i in real["items"][:4]]))
    assert call["position_ids"].tolist() == [p for n in lengths for p in range(n)]
    bounds = call["vision_cu_seqlens"].tolist()
    assert bounds[0] == 0 and bounds[-1] == call["patches"].shape[0]
    assert len(bounds) - 1 == sum(len(i.vision_cu_seqlens) - 1 for i in real["items"][:4])


@pytest.mark.slow
def test_memorised_split_is_captioned_exactly(real):
    assert real["final_loss"] < 0.05
    results = real["memorised"]
    assert all(r.stop == "im_end" for r in results)
    assert [r.generated for r in results] == [r.reference for r in results]
    assert [r.generated for r in real["one_by_one"]] == [r.generated for r in results]
    metrics = caption_metrics(results)
    assert metrics.metrics["exact"]["accuracy"] == 1.0
    assert metrics.metrics["position"]["accuracy"] == 1.0


# ---- CLI -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["--checkpoint", "/nonexistent/ckpt", "--config", "tiny", "--data", "x"], "no such"),
        (["--checkpoint", "{tmp}", "--config", "tiny", "--data", "x"], "no complete checkpoint"),
        (["--checkpoint", "{tmp}", "--config", "navil-7b", "--data", "x"], "unknown config"),
        (["--checkpoint", "{tmp}", "--config", "tiny"], "nothing to caption"),
        (["--checkpoint", "{tmp}", "--config", "tiny", "--max-new-tokens", "0"], "must be >= 1"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, match):
    (tmp_path / "iter_0000001.tmp").mkdir()  # a crashed save: not a checkpoint
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    try:
        rc = _tool().main(argv)
    except SystemExit as exc:  # argparse's own checks
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err, err
    assert "Traceback" not in err


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (["--config", "navil-2b", "--data", "{val}"], "does not hold a 'navil-2b' model"),
        (["--config", "tiny", "--images", "{img}"], "--images needs --tokenizer"),
        (["--config", "tiny", "--images", "{src}/nope.png", "--tokenizer", "{tok}"], "no such"),
        (["--config", "tiny", "--data", "{src}"], "no manifest"),
        (["--config", "tiny", "--data", "{val}", "--tokenizer", "{other}"], "not the tokenizer"),
        (["--config", "tiny", "--data", "{val}", "--json", "/nonexistent/x.json"], "--json"),
    ],
)
def test_cli_bad_input_with_a_checkpoint(real, corpus, tmp_path, capsys, extra, match):
    other = tmp_path / "other.json"
    S.train_tokenizer(["completely different text"], other, vocab_size=300)
    subst = {
        "{val}": str(corpus / "val"),
        "{src}": str(corpus / "src"),
        "{img}": str(corpus / "src" / "images" / "val" / "000000.png"),
        "{tok}": str(corpus / "src" / "tokenizer.json"),
        "{other}": str(other),
    }
    argv = ["--checkpoint", str(corpus / "ckpt" / "iter_0000005")]
    for a in extra:
        for k, v in subst.items():
            a = a.replace(k, v)
        argv.append(a)
    assert _tool().main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and match in err, err


@pytest.mark.slow
def test_cli_end_to_end(real, corpus, tmp_path):
    out = tmp_path / "captions.json"
    image = corpus / "src" / "images" / "val" / "000000.png"
    bad = tmp_path / "bad.png"  # exists, but is no image: skipped, the others still captioned
    bad.write_bytes(b"not an image at all")
    cmd = [
        sys.executable, str(ROOT / "tools" / "caption.py"),
        "--checkpoint", str(corpus / "ckpt"), "--config", "tiny",
        "--data", str(corpus / "val"), "--limit", "2", "--images", str(image), str(bad),
        "--max-new-tokens", "3", "--show", "1", "--json", str(out), "--quiet",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"skipped {bad}" in proc.stderr and "1 of 2 image(s) skipped" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "accuracy" in proc.stdout and "generated:" in proc.stdout
    payload = json.loads(out.read_text())
    caps = payload["captions"]
    assert [c["source"] for c in caps] == [str(image), "val[0]", "val[1]"]
    assert caps[0]["reference"] is None and caps[1]["reference"]
    assert all(c["new_tokens"] <= 3 for c in caps)
    assert payload["metrics"]["exact"]["total"] == 2 and payload["grammar"]
    assert payload["metrics"]["parsed"]["chance"] is None


@pytest.mark.slow
def test_cli_default_tokenizer_of_a_corpus_whose_tokenizer_lacked_the_navil_tokens(
    real, corpus, tmp_path, capsys
):
    """Issue: `caption.py --data DIR` without --tokenizer refused every corpus indexed with a
    tokenizer that lacked the NaViL tokens (its copy, tokens added, had another fingerprint).
    The manifest now records the copy's fingerprint too; the original still matches."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from megatron_navil.data.tokenizer import TextTokenizer, same_tokenizer

    plain = Tokenizer(models.BPE())
    plain.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    plain.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    records = (corpus / "src" / "val.jsonl").read_text().splitlines()
    plain.train_from_iterator(records, trainer=trainer)
    original = tmp_path / "plain.json"
    original.write_text(plain.to_str())
    out = tmp_path / "val_plain"
    index([corpus / "src" / "val.jsonl"], out, original, "--config", "tiny", "--template",
          "qwen3-chat", "--max-tokens", "4096")  # fmt: skip
    entry = ShardDataset(out).manifest["tokenizer"]
    assert entry["added_tokens"] and entry["copy_fingerprint"] != entry["fingerprint"]
    assert same_tokenizer(entry, TextTokenizer(original))
    assert same_tokenizer(entry, TextTokenizer(out / "tokenizer.json"))
    # in a subprocess: a whole captioning run initialises a process group and megatron-core's
    # CPU patches, which must not leak into this test process
    cmd = [sys.executable, str(ROOT / "tools" / "caption.py"),
           "--checkpoint", str(corpus / "ckpt" / "iter_0000005"), "--config", "tiny",
           "--data", str(out), "--limit", "1", "--max-new-tokens", "1", "--quiet"]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
