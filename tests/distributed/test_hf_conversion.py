"""Megatron <-> HF conversion end to end, on real dist checkpoints written at TP2 x PP2 x EP2.

* Export (tools/convert_to_hf.py) of the tiny model in both backbones (Qwen3 with QK-norm;
  InternLM2 with the released 2B ``wo`` then ``wo_ve`` flag): the HF model, loaded with
  ``AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)``, gives the megatron
  model's logits on a batch with images of different sizes, two scales in one block, two
  images in one sample and a text-only sample. Tolerance 1e-5 (absolute, and relative to the
  largest logit), fp32: the two sides do the same arithmetic in a different order (packed
  vs padded attention, gather/scatter vs masked experts, megatron-core's MoE vs plain linears),
  so they differ by float32 rounding only (measured ~5e-7).
* Greedy ``generate`` of the HF model on an image file, with its own preprocessing and chat
  template, gives exactly the tokens of ``tools/caption.py`` (the prompt ids and the pixels are
  checked equal first).
* megatron (TP2 x PP2 x EP2) -> HF -> megatron (TP1 x PP2) is bit-exact for every tensor, and
  -> HF again is bit-exact for every tensor and keeps config.json (``wo_then_wo_ve`` too).
* A tensor deleted from, or added to, a dist checkpoint or an HF directory fails the
  converter with the tensor's name.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from megatron_navil.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
CASES = ("tiny", "tiny-internlm2-wo")
TOL = 1e-5
MAX_NEW = 12


def _save_layouts(root: str) -> int:
    from megatron_navil.checkpoint.store import save
    from megatron_navil.testing import navil_run as N
    from megatron_navil.testing.hf_cases import tiny_case

    warnings.filterwarnings("ignore")
    for case in CASES:
        run = N.setup_run(tiny_case(case), dict(tp=2, pp=2, ep=2, etp=1), seed=11)
        save(Path(root) / case, 1, run.chunks, None, {})
    return 0


def _megatron_side(root: str, tokenizer: str, image: str) -> bytes:
    """1 rank: logits of the parity inputs for each case, and the caption of ``image``."""
    from megatron_navil.checkpoint.model import model_special_ids
    from megatron_navil.checkpoint.store import load
    from megatron_navil.conversion import parity as P
    from megatron_navil.data.tokenizer import TextTokenizer
    from megatron_navil.inference.generate import Captioner
    from megatron_navil.inference.inputs import image_inputs, indexer_settings
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize
    from megatron_navil.testing.hf_cases import tiny_case

    warnings.filterwarnings("ignore")
    groups = initialize()
    tok = TextTokenizer(tokenizer)
    ids = model_special_ids(tok.special_ids)
    out: dict = {"logits": {}}
    for case in CASES:
        cfg = tiny_case(case)
        (model,) = build_model(cfg, transformer_config(cfg), groups, special_ids=ids)
        load(Path(root) / case / "iter_0000001", [model], None)
        model.eval()
        inputs = P.make_inputs(cfg, ids, seed=3)
        with torch.no_grad():
            out["logits"][case] = model(**inputs.packed)[:, 0].clone()
        if case == "tiny":
            settings = indexer_settings(cfg, "qwen3-chat")
            (inp,) = image_inputs([image], tok, settings, "Describe the image.")
            gen = Captioner(model, tok, max_new_tokens=MAX_NEW).generate(inp)
            out["caption_input"] = inp
            out["caption_tokens"] = gen.token_ids
    return pickle.dumps(out)


def _multi_scale_image(directory: Path) -> Path:
    """An image of the corpus that gets two or more scales under the tiny config's rules."""
    from PIL import Image

    from megatron_navil.hf.processing_navil import scales_for_image

    for path in sorted(directory.glob("*.png")):
        with Image.open(path) as im:
            if len(scales_for_image(im.height, im.width, 16, 2, 16, 64)) >= 2:
                return path
    raise AssertionError(f"no multi-scale image in {directory}")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    from megatron_navil.conversion.export import export
    from megatron_navil.testing import synthetic_corpus as S
    from megatron_navil.testing.hf_cases import tiny_case

    root = tmp_path_factory.mktemp("hfconv")
    corpus = S.write_corpus(root / "src", num_train=1, num_val=8, seed=11)
    image = _multi_scale_image(root / "src" / "images" / "val")
    run_distributed(_save_layouts, 4, str(root / "ckpt"), timeout=900)
    for case in CASES:
        export(
            root / "ckpt" / case / "iter_0000001", root / "hf" / case, tiny_case(case),
            tokenizer=corpus["tokenizer"], template="qwen3-chat", dtype="float32",
            max_shard_bytes=300_000,
        )  # fmt: skip
    side = run_distributed(
        _megatron_side, 1, str(root / "ckpt"), str(corpus["tokenizer"]), str(image), timeout=900
    )
    return {"root": root, "tokenizer": corpus["tokenizer"], "image": image,
            **pickle.loads(side[0])}  # fmt: skip


@pytest.mark.parametrize("case", CASES)
def test_hf_logits_equal_megatron(world, case):
    from megatron_navil.conversion import parity as P
    from megatron_navil.testing.hf_cases import tiny_case

    hf_dir = world["root"] / "hf" / case
    assert len(list(hf_dir.glob("model-*-of-*.safetensors"))) > 1
    assert (hf_dir / "model.safetensors.index.json").is_file()
    config = json.loads((hf_dir / "config.json").read_text())
    assert config["llm_config"]["wo_then_wo_ve"] == (case == "tiny-internlm2-wo")
    model = P.load_hf(hf_dir)
    assert model.config.template == "qwen3-chat"
    ids = config["special_token_ids"]
    inputs = P.make_inputs(tiny_case(case), ids, seed=3)
    assert inputs.image_grid_hw is not None and len(inputs.image_grid_hw) >= 5
    diff = P.differences(world["logits"][case], P.hf_logits(model, inputs), inputs)
    print(f"{case}: {diff}")
    assert diff["max_abs"] <= TOL and diff["max_rel"] <= TOL, diff


def test_generate_equals_caption_tool(world):
    from PIL import Image
    from transformers import AutoTokenizer

    from megatron_navil.conversion import parity as P

    hf_dir = world["root"] / "hf" / "tiny"
    model = P.load_hf(hf_dir)
    tok = AutoTokenizer.from_pretrained(str(hf_dir), trust_remote_code=True)
    from megatron_navil.config.tokens import SPECIAL_TOKENS

    special = [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS]
    assert special == model.config.special_token_ids
    inputs = model.build_inputs(tok, "Describe the image.", [Image.open(world["image"])])
    ref = world["caption_input"]
    # the HF preprocessing and chat template give the training pipeline's prompt and pixels
    assert inputs["input_ids"][0].tolist() == ref.input_ids.tolist()
    assert torch.equal(inputs["pixel_values"], ref.patches)
    assert len(inputs["image_grid_hw"]) >= 2  # multi-scale: several scales of one image
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    out = model.generate(**inputs, max_new_tokens=MAX_NEW, eos_token_id=im_end)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    new = new[: new.index(im_end)] if im_end in new else new
    assert new == world["caption_tokens"], (new, world["caption_tokens"])
    # and tools/caption.py itself, run as users run it, prints the same caption
    cmd = [
        sys.executable, str(ROOT / "tools" / "caption.py"),
        "--checkpoint", str(world["root"] / "ckpt" / "tiny"), "--config", "tiny",
        "--images", str(world["image"]), "--tokenizer", str(world["tokenizer"]),
        "--template", "qwen3-chat", "--max-new-tokens", str(MAX_NEW), "--quiet",
        "--json", str(world["root"] / "caption.json"),
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (caption,) = json.loads((world["root"] / "caption.json").read_text())["captions"]
    assert caption["new_tokens"] == len(new)
    assert caption["generated"] == model.chat_images(tok, "Describe the image.",
                                              [Image.open(world["image"])], MAX_NEW)  # fmt: skip


def test_round_trips_bit_exact_across_layouts(world):
    from safetensors.torch import load_file

    from megatron_navil.config import io as CIO
    from megatron_navil.conversion import importer as I
    from megatron_navil.conversion.dist_reader import DistCheckpointReader
    from megatron_navil.conversion.export import export
    from megatron_navil.conversion.hf_config import from_hf_config

    case = "tiny-internlm2-wo"
    root = world["root"]
    hf1 = root / "hf" / case
    config = json.loads((hf1 / "config.json").read_text())
    spec = I.ImportSpec(
        "navil", str(hf1), str(root / "back"), CIO.config_to_dict(from_hf_config(config)),
        tuple(config["special_token_ids"]), tp=1, pp=2,
    )  # fmt: skip
    back = I.run_import(spec, timeout=900)
    a, b = DistCheckpointReader(root / "ckpt" / case / "iter_0000001"), DistCheckpointReader(back)
    assert a.shapes == b.shapes and len(a.shapes) > 50
    for key in a.shapes:
        assert torch.equal(a.read(key), b.read(key)), key
    # HF -> megatron -> HF: every tensor and the config
    from megatron_navil.checkpoint.config import resolve_config

    cfg = resolve_config(back)
    assert cfg.language.wo_then_wo_ve
    export(back, root / "hf2", cfg, tokenizer=world["tokenizer"], template="qwen3-chat",
           dtype="float32", max_shard_bytes=300_000)  # fmt: skip
    assert json.loads((root / "hf2" / "config.json").read_text()) == config
    first = {k: v for f in hf1.glob("*.safetensors") for k, v in load_file(f).items()}
    again = {k: v for f in (root / "hf2").glob("*.safetensors") for k, v in load_file(f).items()}
    assert first.keys() == again.keys()
    for name, tensor in first.items():
        assert torch.equal(tensor, again[name]), name


def _rewrite(src: Path, dst: Path, drop: str | None = None, add: str | None = None) -> None:
    """A copy of a dist checkpoint with one tensor dropped or one unknown tensor added."""
    import shutil

    from torch.distributed.checkpoint import FileSystemWriter, save

    from megatron_navil.conversion.dist_reader import DistCheckpointReader

    reader = DistCheckpointReader(src)
    state = {k: reader.read(k) for k in reader.shapes if k != drop}
    if add:
        state[add] = torch.zeros(3)
    dst.mkdir(parents=True)
    save(state, storage_writer=FileSystemWriter(str(dst)), no_dist=True)
    for name in ("metadata.json", "common.pt", "train_state.json"):
        shutil.copy(src / name, dst / name)


def test_missing_or_unknown_tensor_is_named(world, tmp_path, capsys):
    import importlib.util

    from safetensors.torch import load_file, save_file

    def tool(name):
        spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    to_hf, from_hf = tool("convert_to_hf"), tool("convert_from_hf")
    src = world["root"] / "ckpt" / "tiny" / "iter_0000001"
    key = "layers.2.mlp.experts.experts.linear_fc2.weight"
    cases = {"iter_0000001": dict(drop=key), "iter_0000002": dict(add="layers.9.extra.weight")}
    for name, change in cases.items():
        _rewrite(src, tmp_path / name, **change)
        argv = ["--checkpoint", str(tmp_path / name), "--config", "tiny", "--dtype", "float32",
                "--output", str(tmp_path / f"out-{name}"), "--quiet",
                "--special-token-ids", *map(str, range(500, 512))]  # fmt: skip
        assert to_hf.main(argv) == 2
        err = capsys.readouterr().err
        assert (change.get("drop") or change.get("add")) in err and len(err.splitlines()) == 1
    # an HF directory missing a tensor, or with an unknown one
    hf = world["root"] / "hf" / "tiny"
    tensors = {k: v for f in hf.glob("*.safetensors") for k, v in load_file(f).items()}
    gone = "language_model.model.layers.1.mlp_ve.up_proj.weight"
    for label, change in (("missing", {gone: None}), ("unknown", {"vision_model.extra": 1})):
        d = tmp_path / f"hf-{label}"
        d.mkdir()
        edited = {k: v for k, v in tensors.items() if k != gone or label != "missing"}
        if label == "unknown":
            edited["vision_model.extra"] = torch.zeros(2)
        save_file(edited, str(d / "model.safetensors"))
        (d / "config.json").write_text((hf / "config.json").read_text())
        argv = ["navil", "--hf", str(d), "--output", str(tmp_path / f"meg-{label}")]
        assert from_hf.main(argv) == 2
        err = capsys.readouterr().err
        assert next(iter(change)) in err and len(err.strip().splitlines()) == 1, err


def test_compare_cli(world, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_hf", ROOT / "tools" / "compare_hf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = world["root"] / "compare.json"
    argv = ["--checkpoint", str(world["root"] / "ckpt" / "tiny-internlm2-wo"), "--hf",
            str(world["root"] / "hf" / "tiny-internlm2-wo"), "--json", str(out)]  # fmt: skip
    assert mod.main(argv) == 0
    result = json.loads(out.read_text())
    assert result["max_rel"] <= TOL and "max |diff|" in capsys.readouterr().out
    # the other model's export does not match this checkpoint: a failure, not a pass
    argv[3] = str(world["root"] / "hf" / "tiny")
    assert mod.main(argv) == 2  # different backbone: refused before running


def test_bf16_export_is_the_fp32_export_rounded(world, tmp_path):
    """``--dtype bfloat16``: every tensor is the fp32 export's rounded to bf16 (bit for bit),
    config.json says so, and the model loads and runs in bf16 with logits near megatron's
    fp32 ones. Tolerance 3e-2 relative to the largest logit: bf16 keeps 8 mantissa bits
    (2**-9 relative rounding per weight and per op) on a 4-layer model; measured 9.4e-3."""
    from safetensors.torch import load_file

    from megatron_navil.conversion import parity as P
    from megatron_navil.conversion.export import export
    from megatron_navil.testing.hf_cases import tiny_case

    case = "tiny"
    fp32_dir, bf16_dir = world["root"] / "hf" / case, tmp_path / "bf16"
    export(world["root"] / "ckpt" / case / "iter_0000001", bf16_dir, tiny_case(case),
           tokenizer=world["tokenizer"], template="qwen3-chat", dtype="bfloat16")  # fmt: skip

    def tensors(directory: Path) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for shard in sorted(directory.glob("model*.safetensors")):
            out.update(load_file(shard))
        return out

    full, half = tensors(fp32_dir), tensors(bf16_dir)
    assert full.keys() == half.keys()
    for name, t in full.items():
        assert half[name].dtype == torch.bfloat16, name
        assert torch.equal(half[name], t.to(torch.bfloat16)), name
    assert json.loads((bf16_dir / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = P.load_hf(bf16_dir, dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16
    ids = json.loads((bf16_dir / "config.json").read_text())["special_token_ids"]
    inputs = P.make_inputs(tiny_case(case), ids, seed=3)
    diff = P.differences(world["logits"][case], P.hf_logits(model, inputs), inputs)
    print(f"bf16: {diff}")
    assert 0 < diff["max_rel"] <= 3e-2, diff
