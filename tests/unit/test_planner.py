"""The layout planner (megatron_navil/planning/, tools/plan_layout.py).

- Parameter counts per pipeline stage equal the real modules built on the meta device, for the
  same layer assignment as build_model (uneven first stage, interleaving), per recipe group;
  TP=2 / EP=2 shards equal this rank's parameters of the real tiny model (and navil-2b's
  replicated vision tower at TP=2); all in one 2-rank group.
- Activations: autograd's saved tensors of a tiny forward vs the formula; the peak RSS of two
  tiny training steps (fp32, Adam, distributed optimizer) vs the planner's total.
- FLOPs: torch's FlopCounterMode on a tiny forward + backward vs the formula.
- Schedules, search and the CLI.
"""

from __future__ import annotations

import ctypes
import itertools
import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from megatron_navil.config.params import part_params
from megatron_navil.config.registry import get_config
from megatron_navil.parallel import current_groups
from megatron_navil.parallel.spawn import run_distributed
from megatron_navil.planning.activations import stage_activations
from megatron_navil.planning.flops import llm_flops, vision_flops
from megatron_navil.planning.layout import GROUPS, Layout, vision_tp
from megatron_navil.planning.memory import plan_memory
from megatron_navil.planning.params import rank_params, stage_params
from megatron_navil.planning.schedule import in_flight, schedule_order

TOOL = Path(__file__).resolve().parents[2] / "tools" / "plan_layout.py"

# (config, tp=1 layout) whose every virtual stage is built on the meta device and counted.
STAGE_CASES = {
    "tiny": dict(pp=2, vpp=2),
    "navil-2b": dict(pp=2, vpp=2, first_stage_layers=3),
    "navil-9b": dict(pp=4, first_stage_layers=6),
}


def _tiny_batch(seq_length: int, images: int):
    """A packed tiny micro-batch: ``images`` samples with a 16x16-patch image, then text
    samples of 500 tokens up to ``seq_length`` (the rest is padding)."""
    import torch

    from megatron_navil.testing import navil_run as N

    cfg = get_config("tiny")
    samples = [N.Sample(20, (((16, 16),),), 20)] * images
    used = images * 115  # 20 + 75 image-block tokens + 20
    while used + 500 <= seq_length:
        samples.append(N.Sample(500))
        used += 500
    spec = N.BatchSpec(
        micro_batches=(tuple(samples),), seq_length=seq_length,
        special_ids=N.special_ids_for(cfg),
    )  # fmt: skip
    return spec, N.pack(samples, spec, cfg, torch.Generator().manual_seed(0))


def _group_counts(model) -> dict[str, int]:
    from megatron_navil.training.recipes import _visual_expert_locals, parameter_group

    locals_ = _visual_expert_locals(model)
    out = dict.fromkeys(GROUPS, 0)
    for name, p in model.named_parameters():
        out[parameter_group(name, locals_)] += p.numel()
    return out


def _meta_stages(name: str, layout: dict) -> list[dict[str, int]]:
    """Per virtual stage: parameters by group of the NaViLModel chunk build_model makes."""
    import torch

    from megatron_navil.models.build import stage_layer_ranges, transformer_config
    from megatron_navil.models.navil import NaViLModel

    cfg = get_config(name)
    stages = layout["pp"] * layout.get("vpp", 1)
    ranges = stage_layer_ranges(cfg.language.layers, stages, layout.get("first_stage_layers"))
    config = transformer_config(cfg, perform_initialization=False)
    top = cfg.language.vocab
    ids = range(top - 12, top)
    out = []
    for stage, layers in enumerate(ranges):
        with torch.device("meta"):
            model = NaViLModel(
                cfg, config, layers, pre_process=stage == 0, post_process=stage == stages - 1,
                special_token_ids=ids, tp_group=current_groups().tp,
            )  # fmt: skip
        out.append(_group_counts(model))
    return out


def _sharded(name: str, layout: dict, meta: bool) -> list[dict[str, int]]:
    """This rank's chunks of the real model (build_model) in ``layout``, counted by group."""
    import contextlib

    import torch

    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize

    cfg = get_config(name)
    groups = initialize(**layout)
    config = transformer_config(cfg, perform_initialization=False, **layout)
    top = cfg.language.vocab
    with torch.device("meta") if meta else contextlib.nullcontext():
        chunks = build_model(cfg, config, groups, special_ids=range(top - 12, top))
    return [_group_counts(c) for c in chunks]


def _saved_and_flops() -> dict:
    """Saved-tensor bytes and counted FLOPs of one tiny forward (+ backward) at TP=1."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_navil.models.build import build_model, transformer_config

    cfg = get_config("tiny")
    spec, batch = _tiny_batch(4096, 8)
    (model,) = build_model(
        cfg, transformer_config(cfg), current_groups(), special_ids=spec.special_ids
    )
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            seen.setdefault(storage.data_ptr(), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(**batch)
    # The math SDPA backend decomposes attention into matmuls the counter sees (CPU's fused
    # kernel is not counted); it computes the causal product in full.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(**batch).sum().backward()
    cu = batch["cu_seqlens"].tolist()
    vcu = batch["vision_cu_seqlens"].tolist()
    return {
        "saved": sum(seen.values()),
        "flops": counter.get_total_flops(),
        "samples": [b - a for a, b in itertools.pairwise(cu)],
        "segments": [b - a for a, b in itertools.pairwise(vcu)],
        "patches": batch["patches"].shape[0],
    }


def _group_work() -> dict:
    import torch.distributed as dist

    warnings.filterwarnings("ignore")
    from megatron_navil.parallel import initialize

    initialize()
    rank = dist.get_rank()
    out: dict = {"stages": {}}
    # The three configs' stage builds split over the two ranks (meta: nothing allocated).
    for i, (name, layout) in enumerate(STAGE_CASES.items()):
        if i % 2 == rank:
            out["stages"][name] = _meta_stages(name, layout)
    out["tiny_tp2"] = _sharded("tiny", dict(tp=2), meta=False)
    out["tiny_ep2"] = _sharded("tiny", dict(ep=2), meta=False)
    out["tiny_pp2_vpp2"] = _sharded("tiny", dict(pp=2, vpp=2), meta=False)
    out["2b_tp2"] = _sharded("navil-2b", dict(tp=2), meta=True)
    initialize()  # back to TP = PP = EP = 1 (collective: both ranks)
    if rank == 0:
        out.update(_saved_and_flops())
    return out


@pytest.fixture(scope="module")
def group() -> list[dict]:
    return run_distributed(_group_work, 2, timeout=600)


def _expected(name: str, layout: Layout, stage: int, ep_rank: int = 0) -> dict[str, int]:
    p = stage_params(get_config(name), layout, stage, ep_rank)
    return {g: p.dense[g] + p.expert[g] for g in GROUPS}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(STAGE_CASES))
def test_stage_counts_equal_meta_modules(group, name):
    built = next(r["stages"][name] for r in group if name in r["stages"])
    layout = Layout(**STAGE_CASES[name])
    assert len(built) == layout.stages
    for stage, counts in enumerate(built):
        assert counts == _expected(name, layout, stage), f"{name} stage {stage}"


@pytest.mark.slow
def test_tp_ep_shards_equal_the_real_model(group):
    for rank, res in enumerate(group):
        # TP=2: attention and LM head/embedding halve; norms, special table stay whole.
        assert res["tiny_tp2"] == [_expected("tiny", Layout(tp=2), 0)]
        # EP=2: rank 0 holds the text expert, rank 1 the visual one.
        assert res["tiny_ep2"] == [_expected("tiny", Layout(ep=2, dp=2), 0, ep_rank=rank)]
        # PP=2 x VPP=2: rank r holds virtual stages r and r + 2.
        pp = Layout(pp=2, vpp=2)
        assert res["tiny_pp2_vpp2"] == [
            _expected("tiny", pp, rank),
            _expected("tiny", pp, rank + 2),
        ]
        # navil-2b at TP=2: 23 vision heads do not split, the tower is replicated.
        assert res["2b_tp2"] == [_expected("navil-2b", Layout(tp=2), 0)]
    tp1 = _expected("tiny", Layout(), 0)
    tp2 = group[0]["tiny_tp2"][0]
    assert tp2["text_attention"] < tp1["text_attention"] and tp2["vision"] < tp1["vision"]
    b2 = group[0]["2b_tp2"][0]
    assert b2["vision"] == part_params(get_config("navil-2b")).vision  # whole tower


def test_vision_tp_rule_matches_the_model():
    from megatron_navil.models.vision import tp_size_for

    for name in ("tiny", "navil-2b", "navil-9b"):
        cfg = get_config(name)
        for tp in (1, 2, 4, 7, 8):
            assert vision_tp(cfg, tp) == tp_size_for(cfg.vision, tp)


def test_whole_model_equals_analytic_counts():
    from megatron_navil.config.params import param_counts

    for name in ("tiny", "navil-2b", "navil-9b"):
        cfg = get_config(name)
        assert rank_params(cfg, Layout(), 0).total == param_counts(cfg)["total"]


@pytest.mark.slow
def test_saved_activations_match_the_formula(group):
    """Autograd's saved tensors (deduplicated by storage, parameters excluded) of one tiny
    forward at fp32 vs the kept-activation formula. Tolerance [0.95, 1.2]: the formula counts
    what this code saves; CPU's SDPA keeps contiguous copies of q/k/v beyond flash
    attention's set and the routing index tensors are not modelled (measured 1.08)."""
    res = group[0]
    cfg = get_config("tiny")
    layout = Layout(seq_length=4096, patches=res["patches"], dtype="fp32")
    predicted = stage_activations(cfg, layout, 0).total
    assert 0.95 <= res["saved"] / predicted <= 1.2, (res["saved"], predicted)


@pytest.mark.slow
def test_flops_match_counted_flops(group):
    """torch's FlopCounterMode over a tiny forward + backward (matmuls, and attention through
    the math SDPA backend) equals the formula exactly after two known differences: the
    counter sees causal attention computed in full (the formula counts the half flash
    computes) and no input gradient for the patch embedding (patches need none; the formula
    counts 6 N for every matmul, as MFU conventions do)."""
    res = group[0]
    cfg = get_config("tiny")
    lm = cfg.language
    predicted = llm_flops(cfg, res["samples"]) + vision_flops(cfg, res["segments"])
    other_causal_half = sum(6 * lm.layers * lm.heads * lm.head_dim * s * s for s in res["samples"])
    patch_embed_input_grad = 2 * res["patches"] * cfg.vision.width * 3 * cfg.vision.patch**2
    expected = predicted + other_causal_half - patch_embed_input_grad
    assert res["flops"] == expected, (res["flops"], expected)


def _vm_kib(field: str) -> int:
    status = open("/proc/self/status").read()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1))


def _rss_step() -> dict:
    """Peak RSS growth over building the tiny model + DDP + distributed Adam and two
    training steps (the second with the optimizer state allocated).

    The peak is this process's VmHWM after a reset (``5 > /proc/self/clear_refs``), not
    getrusage's ru_maxrss: Linux carries ru_maxrss across fork+exec, so a spawned child of a
    large pytest process starts with the parent's peak and the growth reads as 0."""
    from megatron_navil.parallel import initialize
    from megatron_navil.testing import navil_run as N

    warnings.filterwarnings("ignore")
    # glibc: mmap every block of 64 KiB or more (M_MMAP_THRESHOLD = -3), set here rather than
    # through MALLOC_MMAP_THRESHOLD_, which glibc reads at process start: ranks are forked
    # from a server that started without it.
    assert ctypes.CDLL("libc.so.6").mallopt(-3, 65536) == 1
    initialize()
    spec, batch = _tiny_batch(8192, 32)
    N.make_batches(get_config("tiny"), spec, 0)  # warm the batch code path
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current RSS
    before = _vm_kib("VmRSS") * 1024
    run = N.setup_run(get_config("tiny"), spec=spec, optimizer="adam", distributed_optimizer=True)
    for _ in range(2):
        run.step(batch_seed=0)
    after = _vm_kib("VmHWM") * 1024
    return {"delta": after - before, "patches": batch["patches"].shape[0]}


@pytest.mark.slow
def test_peak_memory_of_a_tiny_step():
    """Planner total (weights + grads + Adam + activations + backward workspace, fp32) vs the
    measured peak RSS growth of a training step on CPU, within [0.8, 1.3].

    glibc is told to mmap every block of 64 KiB or more (``mallopt``), so a freed
    tensor leaves RSS at once and the peak RSS is the peak of live memory, as a GPU's
    allocator peak would be (without it, freed forward temporaries stay in the heap and the
    peak is ~1.5x higher). The measurement also holds the batch copies, Python objects and
    megatron-core's bookkeeping (a few MiB). Measured: 330 MiB vs 326 MiB predicted."""
    res = run_distributed(_rss_step, 1, timeout=300)[0]
    cfg = get_config("tiny")
    layout = Layout(seq_length=8192, patches=res["patches"], dtype="fp32")
    predicted = plan_memory(cfg, layout)[0].total
    assert predicted > 200 * 2**20  # activations dominate, RSS noise is small next to it
    assert 0.8 <= res["delta"] / predicted <= 1.3, (res["delta"] / 2**20, predicted / 2**20)


# ---- schedules -------------------------------------------------------------------------------


@pytest.mark.parametrize("pp", [1, 2, 4])
def test_1f1b_keeps_pp_minus_rank_micro_batches(pp):
    for rank in range(pp):
        assert in_flight(pp, 1, 16, rank, [1.0]) == pp - rank
    assert in_flight(4, 1, 2, 0, [1.0]) == 2  # fewer micro-batches than stages


@pytest.mark.parametrize("pp,vpp", [(2, 2), (4, 2), (4, 3)])
def test_interleaved_in_flight(pp, vpp):
    # Warm-up 2 (pp - rank - 1) + (vpp - 1) pp chunk forwards, + 1 in the steady state.
    for rank in range(pp):
        expected = 2 * (pp - rank - 1) + (vpp - 1) * pp + 1
        assert in_flight(pp, vpp, 4 * pp, rank, [1.0] * vpp) == expected
    order = schedule_order(pp, vpp, 2 * pp, 0)
    assert sorted(o for o in order if o[0] == "F") == sorted(
        ("F", c, m) for c in range(vpp) for m in range(2 * pp)
    )


def test_stage0_memory_grows_with_pp_and_recompute_helps():
    cfg = get_config("navil-9b")
    base = Layout(tp=4, dp=8, patches=16384)
    one = plan_memory(cfg, base)[0]
    two = plan_memory(cfg, Layout(tp=4, pp=2, dp=4, patches=16384))[0]
    assert two.in_flight == 2 and two.activations > 0.9 * one.activations
    full = plan_memory(cfg, Layout(tp=4, dp=8, patches=16384, recompute="full"))[0]
    sel = plan_memory(cfg, Layout(tp=4, dp=8, patches=16384, recompute="selective"))[0]
    assert full.activations < sel.activations < one.activations
    # The distributed optimizer shards: 8x more DP, 8x less optimizer state.
    wide = plan_memory(cfg, Layout(tp=4, dp=64, patches=16384))[0]
    assert wide.optimizer == pytest.approx(one.optimizer / 8)
    # S1.1 trains no text attention / text experts / embeddings: fewer grads.
    s11 = plan_memory(cfg, Layout(tp=4, dp=8, patches=16384, stage="s1.1"))[0]
    assert s11.grads < 0.6 * one.grads and s11.weights == one.weights


def test_bad_layouts_raise_one_line_errors():
    cfg = get_config("navil-9b")
    with pytest.raises(ValueError, match="--tp 3 does not divide"):
        Layout(tp=3).validate(cfg)
    with pytest.raises(ValueError, match="does not split evenly"):
        Layout(pp=5).validate(cfg)
    Layout(pp=5, first_stage_layers=4).validate(cfg)
    with pytest.raises(ValueError, match="--vpp 2 needs --pp"):
        Layout(vpp=2).validate(cfg)
    with pytest.raises(ValueError, match="--ep 4 does not divide"):
        Layout(ep=4, dp=4).validate(cfg)


# ---- CLI -------------------------------------------------------------------------------------


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(TOOL.parents[1]))
    return subprocess.run(
        [sys.executable, str(TOOL), *args], capture_output=True, text=True, timeout=300,
        env=env, check=False,
    )  # fmt: skip


@pytest.mark.slow
def test_cli_search_json_recommends_a_fitting_layout():
    proc = _cli("navil-9b", "--search", "--gpus", "16", "--gpu-mem", "79", "--json", "-")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["recommended"] is not None
    rec = out["rows"][0]
    assert rec["fits"] and rec["peak_gib"] + 6 <= 79
    assert "<- recommended" in proc.stderr  # the table goes to stderr with --json -
    assert "scope: device memory of the model's tensors" in proc.stderr  # what it counts
    times = [r["step_s"] for r in out["rows"] if r["fits"]]
    assert times == sorted(times)
    assert "sorted by the predicted step time on H100" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    "args,message",
    [
        (["navil-7b"], "unknown config 'navil-7b'"),
        (["navil-9b", "--tp", "3"], "--tp 3 does not divide the LLM's 32 heads"),
        (["navil-2b", "--pp", "5"], "pass first_stage_layers"),
        (["navil-2b", "--search", "--gpus", "8"], "--search needs --gpus and --gpu-mem (or --gpu)"),
        (["tiny", "--patches", "99999", "--seq-length", "128"], "more than --seq-length"),
        (
            ["tiny", "--search", "--gpus", "2", "--gpu-mem", "9", "--search-recompute", "most"],
            "unknown mode(s) ['most']",
        ),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(args, message):
    proc = _cli(*args)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_cp_table_shows_the_longest_sequence_per_cp(tmp_path):
    """``--cp-table``: the longest --seq-length navil-9b's S2 layout fits at CP 1..8 (the table
    in docs/training.md), each longer than the last, and the JSON has the same numbers."""
    out = tmp_path / "cp.json"
    proc = _cli("navil-9b", "--tp", "4", "--gpus", "64", "--gpu", "h100", "--stage", "s2",
                "--recompute", "selective", "--recompute-vision", "full", "--cp-table",
                "--json", str(out))  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text())["longest_seq_length"]
    assert got == {"1": 16384, "2": 32768, "4": 73728, "8": 139264}
    assert "--cp 4 (DP 4): 73,728" in proc.stdout
    bad = _cli("navil-9b", "--tp", "4", "--cp-table")
    assert bad.returncode == 2 and "--cp-table needs --gpu-mem" in bad.stderr
