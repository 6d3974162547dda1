"""NaViL initialised from an HF LLM (tools/convert_from_hf.py llm): tiny random
``LlamaForCausalLM`` (written at TP=2), ``Qwen3ForCausalLM`` with tied embeddings (written
at PP=2), built from config objects, and the same Llama's weights stored in InternLM2's
layout (fused grouped ``wqkv``, ``feed_forward.w1/w2/w3``; transformers has no InternLM2
class, so its reference logits are the Llama's; written at EP=2).

The imported NaViL's text-only logits equal the LLM's within 1e-5 (absolute and relative to
the largest logit; fp32, the same arithmetic in another order: packed varlen attention vs a
causal mask, megatron-core's MoE dispatch vs one MLP); the visual experts are exact copies of
the text experts; the vision encoder and connector are freshly initialised (not zero, not
copied); an LLM with biases is refused by name."""

from __future__ import annotations

import importlib.util
import json
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from megatron_navil.parallel.spawn import run_distributed

pytestmark = pytest.mark.distributed

ROOT = Path(__file__).resolve().parents[2]
SPECIAL = list(range(500, 512))
TOL = 1e-5


def _tool():
    spec = importlib.util.spec_from_file_location("from_hf", ROOT / "tools" / "convert_from_hf.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _make_llm(kind: str, out: Path) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    common = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
        max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0 if kind == "llama" else 1)
    if kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(**common, rope_theta=1e6, tie_word_embeddings=False))
    else:
        model = Qwen3ForCausalLM(Qwen3Config(**common, rope_theta=1e6, tie_word_embeddings=True))
    with torch.no_grad():  # weights of a trained model's scale, not the tiny init's
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.2 * torch.randn_like(p))
    model.save_pretrained(str(out))
    return model.eval()


def _as_internlm2(llama_dir: Path, out: Path) -> None:
    """The Llama checkpoint re-packed under InternLM2's names and config (same function)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((llama_dir / "config.json").read_text())
    tensors = load_file(str(llama_dir / "model.safetensors"))
    kv, d = config["num_key_value_heads"], config["head_dim"]
    per = config["num_attention_heads"] // kv
    new = {
        "model.tok_embeddings.weight": tensors.pop("model.embed_tokens.weight"),
        "model.norm.weight": tensors.pop("model.norm.weight"),
        "output.weight": tensors.pop("lm_head.weight"),
    }
    for i in range(config["num_hidden_layers"]):
        p, q = f"model.layers.{i}.", f"model.layers.{i}."
        h = tensors[p + "self_attn.q_proj.weight"].shape[1]
        qw = tensors.pop(p + "self_attn.q_proj.weight").view(kv, per, d, h)
        kw = tensors.pop(p + "self_attn.k_proj.weight").view(kv, 1, d, h)
        vw = tensors.pop(p + "self_attn.v_proj.weight").view(kv, 1, d, h)
        new[q + "attention.wqkv.weight"] = torch.cat([qw, kw, vw], 1).reshape(-1, h).contiguous()
        new[q + "attention.wo.weight"] = tensors.pop(p + "self_attn.o_proj.weight")
        for a, b in (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2")):
            new[f"{q}feed_forward.{b}.weight"] = tensors.pop(f"{p}mlp.{a}.weight")
        new[q + "attention_norm.weight"] = tensors.pop(p + "input_layernorm.weight")
        new[q + "ffn_norm.weight"] = tensors.pop(p + "post_attention_layernorm.weight")
    assert not tensors, sorted(tensors)
    out.mkdir()
    save_file(new, str(out / "model.safetensors"))
    config.update(model_type="internlm2", architectures=["InternLM2ForCausalLM"], bias=False)
    (out / "config.json").write_text(json.dumps(config))


def _megatron_logits(checkpoints: list[str], ids: bytes) -> bytes:
    from megatron_navil.checkpoint.store import load
    from megatron_navil.config.io import CONFIG_FILE, config_from_dict
    from megatron_navil.conversion.dist_reader import DistCheckpointReader
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize

    warnings.filterwarnings("ignore")
    groups = initialize()
    samples = pickle.loads(ids)
    out = []
    for path in checkpoints:
        cfg = config_from_dict(json.loads((Path(path) / CONFIG_FILE).read_text()))
        (model,) = build_model(cfg, transformer_config(cfg), groups, special_ids=SPECIAL)
        load(path, [model], None)
        model.eval()
        lengths = [len(s) for s in samples]
        cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
        with torch.no_grad():
            logits = model(
                input_ids=torch.cat(samples),
                position_ids=torch.cat([torch.arange(n) for n in lengths]),
                cu_seqlens=cu,
            )[:, 0]
        reader = DistCheckpointReader(path)
        copies = all(
            torch.equal(reader.read(k), reader.read(k.replace(".text.", ".visual.")))
            for k in reader.shapes
            if ".text." in k
        ) and all(
            torch.equal(t[0], t[1])
            for t in (reader.read(k) for k in reader.shapes if ".experts.experts." in k)
        )
        vision = reader.read("vision_model.encoder.layers.0.attn.qkv.weight")
        out.append({"logits": logits.clone(), "copies": copies, "vision_std": float(vision.std())})
    return pickle.dumps(out)


def test_llm_init_text_logits_equal(tmp_path, capsys):
    llms = {kind: _make_llm(kind, tmp_path / kind) for kind in ("llama", "qwen3")}
    _as_internlm2(tmp_path / "llama", tmp_path / "internlm2")
    llms["internlm2"] = llms["llama"]
    layouts = {"llama": ["--tp", "2"], "qwen3": ["--pp", "2"], "internlm2": ["--ep", "2"]}
    tool = _tool()
    for kind in llms:
        argv = ["llm", "--hf", str(tmp_path / kind), "--config", "tiny",
                "--output", str(tmp_path / f"navil-{kind}"), "--special-token-ids",
                *map(str, SPECIAL), *layouts[kind]]  # fmt: skip
        assert tool.main(argv) == 0, capsys.readouterr().err
    config = json.loads(
        (tmp_path / "navil-llama" / "iter_0000000" / "navil_config.json").read_text()
    )
    assert config["language"]["qk_norm"] is False and config["language"]["variant"] == "qwen3"
    config = json.loads(
        (tmp_path / "navil-internlm2" / "iter_0000000" / "navil_config.json").read_text()
    )
    assert config["language"]["variant"] == "internlm2"
    assert config["language"]["wo_then_wo_ve"] is False  # the paper's formula for new models
    gen = torch.Generator().manual_seed(2)
    samples = [torch.randint(0, 500, (n,), generator=gen) for n in (17, 40, 5)]
    paths = [str(tmp_path / f"navil-{k}" / "iter_0000000") for k in llms]
    results = pickle.loads(
        run_distributed(_megatron_logits, 1, paths, pickle.dumps(samples), timeout=900)[0]
    )
    for (kind, llm), res in zip(llms.items(), results, strict=True):
        assert res["copies"], f"{kind}: visual experts are not copies of the text experts"
        assert res["vision_std"] > 1e-3, f"{kind}: vision encoder not initialised"
        start, worst, scale = 0, 0.0, 0.0
        for s in samples:
            with torch.no_grad():
                want = llm(input_ids=s[None]).logits[0]
            got = res["logits"][start : start + len(s)]
            start += len(s)
            worst = max(worst, float((got - want).abs().max()))
            scale = max(scale, float(want.abs().max()))
        print(f"{kind}: max |diff| {worst:.2e}, max |logit| {scale:.2f}")
        assert worst <= TOL and worst / scale <= TOL, (kind, worst, scale)


def test_llm_with_biases_is_refused(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    _make_llm("llama", tmp_path / "llama")
    path = tmp_path / "llama" / "model.safetensors"
    tensors = load_file(str(path))
    tensors["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    save_file(tensors, str(path))
    capsys.readouterr()  # save_pretrained's progress bar
    argv = ["llm", "--hf", str(tmp_path / "llama"), "--config", "tiny", "--output",
            str(tmp_path / "out"), "--special-token-ids", *map(str, SPECIAL)]  # fmt: skip
    assert _tool().main(argv) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.self_attn.q_proj.bias" in err and len(err.strip().splitlines()) == 1


def test_a_layout_the_model_does_not_split_into_is_one_line_before_any_rank(tmp_path, capsys):
    """9 heads at TP 2 / 4 layers over PP 3: exit 2 with one line, nothing spawned, nothing
    written; --first-stage-layers makes the uneven pipeline split possible."""
    from megatron_navil.config.registry import get_config
    from megatron_navil.models.build import layout_problem

    tiny = get_config("tiny")
    assert layout_problem(tiny, tp=2) is None
    assert layout_problem(tiny, tp=3) == "heads=4 does not split over TP=3"
    assert "does not split evenly over 3" in layout_problem(tiny, pp=3)
    assert layout_problem(tiny, pp=3, first_stage_layers=2) is None
    _make_llm("llama", tmp_path / "llama")
    capsys.readouterr()
    base = ["llm", "--hf", str(tmp_path / "llama"), "--config", "tiny",
            "--special-token-ids", *map(str, SPECIAL)]  # fmt: skip
    cases = (
        (["--tp", "3"], "heads=4 does not split over TP=3"),
        (["--pp", "3"], "does not split evenly over 3 pipeline stages"),
    )
    for extra, match in cases:
        out = tmp_path / f"out{extra[-1]}{extra[0]}"
        assert _tool().main([*base, "--output", str(out), *extra]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err
        assert not out.exists()
    out = tmp_path / "uneven"
    assert (
        _tool().main([*base, "--output", str(out), "--pp", "3", "--first-stage-layers", "2"]) == 0
    )
    cfg = json.loads((out / "iter_0000000" / "navil_config.json").read_text())
    assert cfg["language"]["layers"] == 4
