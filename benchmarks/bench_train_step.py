"""Training-step time on one device: megatron_navil vs the same model exported to Hugging Face.

The question (issue "HF conversion"): does the Megatron path cost anything on one device? A random
NaViL of about 300M parameters (``bench-300m``: vision 6 x 512, LLM 8 layers of 1024 with a text
and a visual expert each, vocab 32000; fp32) is built by one rank and its initial weights saved as
a dist checkpoint, then exported with ``tools/convert_to_hf.py``. Both sides then train on the
same batch from the same weights, each in its own fresh process with the same number of threads:

* megatron_navil: TP = PP = EP = DP = 1 on CPU, megatron-core DDP + AdamW, the training entry's
  own ``training.step.train_step`` on one packed sequence (``cu_seqlens``; no padding); twice:
  at ``train``'s defaults (``--use-distributed-optimizer auto`` and ``--overlap-* auto``,
  resolved by the same functions: at DP = 1 megatron-core's plain optimizer, no overlap on
  CPU) and with the distributed optimizer forced on (at DP = 1 it has nothing to shard but
  still copies the whole flat parameter and gradient buffers each step);
* HF: ``AutoModelForCausalLM.from_pretrained(trust_remote_code=True)`` in eager PyTorch,
  ``torch.optim.AdamW`` with the same hyper-parameters and weight-decay groups (none on 1-D
  parameters and biases, as megatron-core), ``clip_grad_norm_(1.0)``; the same samples as a
  left-padded ``[B, T]`` batch (how an HF training loop feeds them; samples are of similar
  length so padding is small, and it is reported).

The batch: 4 samples of 330-380 tokens (one image at two scales in one block, one image, two
images, text only): 1,419 tokens (1,520 once HF pads them) and 2,944 patches. Step 1 is a
warm-up and not timed; the median of the timed steps is reported. The loss of every step is
recorded on every side: the same weights, batch and optimizer must give the same curve (a check
that the sides do the same work).

Prints a table and writes JSON (``--json``, default benchmarks/results/train_step.json).
Example: ``python benchmarks/bench_train_step.py --steps 4``
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LR, CLIP, SEED = 1e-4, 1.0, 1234


def bench_config():
    from megatron_navil.config.model import LanguageConfig, VisionConfig
    from megatron_navil.config.registry import get_config

    base = get_config("tiny")
    return dataclasses.replace(
        base,
        name="bench-300m",
        vision=VisionConfig(depth=6, width=512, mlp=2048, heads=8),
        language=LanguageConfig(
            variant="qwen3",
            hidden=1024,
            layers=8,
            heads=16,
            kv_heads=8,
            head_dim=64,
            ffn=2816,
            vocab=32000,
            qk_norm=True,
        ),
    ).validate()


def special_ids(cfg: Any) -> tuple[int, ...]:
    return tuple(range(cfg.language.vocab - 12, cfg.language.vocab))


def samples() -> tuple:
    """Patch grids per scale (smallest first); merge 2, so a 32 x 32 grid is 256 LLM tokens."""
    from megatron_navil.testing.navil_run import Sample

    return (
        Sample(20, (((16, 16), (32, 32)),), 12),  # two scales in one block: 320 image tokens
        Sample(16, (((24, 32),),), 130),
        Sample(10, (((16, 24),), ((16, 32),)), 100),  # two images
        Sample(330),  # text only
    )


def packed_batch(cfg: Any) -> dict[str, Any]:
    """The megatron micro-batch (model kwargs + labels) and its grids, from the real ops."""
    import torch

    from megatron_navil.testing.navil_run import BatchSpec, pack

    smp = samples()
    used = sum(
        s.text_before + s.text_after + sum(_block_len(cfg, scales) for scales in s.images)
        for s in smp
    )  # the sequence length: no padding sample, every token is real
    spec = BatchSpec(micro_batches=(smp,), seq_length=used, special_ids=special_ids(cfg))
    batch = pack(smp, spec, cfg, torch.Generator().manual_seed(SEED))
    grids = [g for s in smp for scales in s.images for g in scales]
    return {"batch": batch, "grids": grids}


def _block_len(cfg: Any, scales: tuple) -> int:
    from megatron_navil.ops import image_token_layout

    merge = cfg.connector.merge
    return int(image_token_layout([(h // merge, w // merge) for h, w in scales]).numel())


def hf_view(data: dict[str, Any]) -> dict[str, Any]:
    """The same samples left-padded to ``[B, T]``; HF labels are unshifted (the model shifts):
    ``hf[j] = megatron[j - 1]``."""
    import torch

    b = data["batch"]
    cu = b["cu_seqlens"].tolist()
    lengths = [e - s for s, e in itertools.pairwise(cu)]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (s, e) in enumerate(itertools.pairwise(cu)):
        n = e - s
        ids[i, width - n :] = b["input_ids"][s:e]
        mask[i, width - n :] = 1
        labels[i, width - n + 1 :] = b["labels"][s : e - 1]
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixel_values": b["patches"],
        "image_grid_hw": torch.tensor(data["grids"], dtype=torch.long),
    }


def _megatron(ckpt_dir: str | None, steps: int, threads: int, optimizer: str) -> dict[str, Any]:
    """One rank: build (the same weights every time: same seed), save them when ``ckpt_dir``
    is given, then ``steps`` training steps timed; ``optimizer``: ``--use-distributed-optimizer``
    (``auto``: what ``train`` picks), the overlap at ``train``'s defaults."""
    import torch

    from megatron_navil.checkpoint.store import save
    from megatron_navil.models.build import build_model, transformer_config
    from megatron_navil.parallel import initialize
    from megatron_navil.training.microbatch import MicroBatch
    from megatron_navil.training.optim import (
        build_optimizer,
        build_scheduler,
        resolve_overlap,
        te_importable,
        use_distributed_optimizer,
        wrap_ddp,
    )
    from megatron_navil.training.recipes import get_stage
    from megatron_navil.training.step import train_step

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    groups = initialize(seed=SEED)
    cfg = bench_config()
    config = transformer_config(cfg)
    (model,) = build_model(cfg, config, groups, special_ids=special_ids(cfg))
    params = sum(p.numel() for p in model.parameters())
    if ckpt_dir is not None:
        save(ckpt_dir, 0, [model], None, {}, model_config=cfg)
    distributed = use_distributed_optimizer(optimizer, groups)
    overlap = resolve_overlap(
        distributed_optimizer=distributed, vpp=None, cuda=torch.cuda.is_available(),
        te_available=te_importable(),
    )  # fmt: skip
    chunks = wrap_ddp([model], config, distributed, overlap)
    recipe = dataclasses.replace(get_stage("s2"), lr_schedule="constant", warmup_steps=0)
    opt = build_optimizer(chunks, recipe, lr=LR, clip_grad=CLIP, distributed=distributed)
    sched = build_scheduler(opt, recipe, steps, lr=LR, warmup_steps=0)
    data = packed_batch(cfg)
    losses, times = [], []
    for i in range(steps):
        start = time.perf_counter()
        result = train_step(
            chunks,
            config,
            groups,
            opt,
            sched,
            [MicroBatch.of(data["batch"])],
            data["batch"]["input_ids"].numel(),
            step=i + 1,
        )
        times.append(time.perf_counter() - start)
        losses.append(result.loss)
    kind = "distributed" if distributed else "plain"
    return {"params": params, "losses": losses, "times": times, "optimizer": kind,
            "overlap": dataclasses.asdict(overlap)}  # fmt: skip


def _hf(hf_dir: str, steps: int, threads: int, out: str) -> None:
    """Child process: the exported model trained ``steps`` times in eager PyTorch."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_navil.training.recipes import get_stage

    warnings.filterwarnings("ignore")
    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        hf_dir, trust_remote_code=True, dtype=torch.float32
    )
    model.train()
    recipe = get_stage("s2")  # the megatron side's hyper-parameters
    decay = [p for n, p in model.named_parameters() if p.ndim > 1 and not n.endswith(".bias")]
    no_decay = [p for n, p in model.named_parameters() if p.ndim <= 1 or n.endswith(".bias")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay},
         {"params": no_decay, "weight_decay": 0.0}],
        lr=LR, betas=recipe.betas, eps=recipe.eps,
    )  # fmt: skip
    batch = hf_view(packed_batch(bench_config()))
    losses, times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        times.append(time.perf_counter() - start)
        losses.append(float(loss))
    padded = int(batch["input_ids"].numel())
    real = int(batch["attention_mask"].sum())
    Path(out).write_text(
        json.dumps({"losses": losses, "times": times, "tokens": real, "padded_tokens": padded})
    )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=4, help="steps per side; the first is not timed")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads, both sides")
    p.add_argument("--work", default="/tmp/bench_train_step", help="scratch directory (deleted)")
    p.add_argument("--json", default=str(ROOT / "benchmarks" / "results" / "train_step.json"))
    p.add_argument("--_hf", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be >= 2 (the first step is a warm-up)")
    if args._hf:
        _hf(args._hf[0], args.steps, args.threads, args._hf[1])
        return 0
    from megatron_navil.parallel.spawn import run_distributed

    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    meg = {}
    for name, choice in (("train_defaults", "auto"), ("distributed_optimizer", "on")):
        print(f"megatron_navil ({name}): {args.steps} steps on {args.threads} threads ...",
              flush=True)  # fmt: skip
        ckpt = str(work / "ckpt") if choice == "auto" else None
        (meg[name],) = run_distributed(
            _megatron, 1, ckpt, args.steps, args.threads, choice, timeout=7200
        )
    cfg = bench_config()
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, str(ROOT / "tools" / "convert_to_hf.py"), "--checkpoint",
           str(work / "ckpt"), "--output", str(work / "hf"), "--dtype", "float32", "--quiet",
           "--special-token-ids", *map(str, special_ids(cfg))]  # fmt: skip
    subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
    print(f"HF eager: {args.steps} steps on {args.threads} threads ...", flush=True)
    hf_cmd = [sys.executable, __file__, "--steps", str(args.steps), "--threads", str(args.threads),
              "--_hf", str(work / "hf"), str(work / "hf.json")]  # fmt: skip
    subprocess.run(hf_cmd, env=env, check=True)
    hf = json.loads((work / "hf.json").read_text())
    hf_s = statistics.median(hf["times"][1:])
    sides = {}
    for name, r in (*meg.items(), ("hf_eager", hf)):
        step_s = statistics.median(r["times"][1:])
        sides[name] = {
            "step_s": step_s,
            "speed_vs_hf": hf_s / step_s,
            "max_loss_diff_vs_hf": max(
                abs(a - b) for a, b in zip(r["losses"], hf["losses"], strict=True)
            ),
            "times": r["times"],
            "losses": r["losses"],
            **({"optimizer": r["optimizer"], "overlap": r["overlap"]} if name in meg else {}),
        }
    result = {
        "params": meg["train_defaults"]["params"],
        "tokens": hf["tokens"],
        "hf_padded_tokens": hf["padded_tokens"],
        "patches": int(packed_batch(cfg)["batch"]["patches"].shape[0]),
        "threads": args.threads,
        "timed_steps": args.steps - 1,
        "sides": sides,
        "speedup_megatron_over_hf": sides["train_defaults"]["speed_vs_hf"],
        "machine": f"{os.cpu_count()} cores",
    }
    print(f"{result['params'] / 1e6:.0f}M parameters, {result['tokens']} tokens "
          f"(HF padded to {result['hf_padded_tokens']}), {result['patches']} patches")  # fmt: skip
    print(f"{'side':<44}{'step s':>8}{'vs HF':>7}{'loss 1':>10}{'loss last':>11}{'max diff':>10}")
    defaults = meg["train_defaults"]["optimizer"]
    labels = {
        "train_defaults": f"megatron_navil TP1, train's defaults ({defaults} optimizer)",
        "distributed_optimizer": "megatron_navil TP1, distributed optimizer on",
        "hf_eager": "HF eager (torch AdamW)",
    }
    for key, label in labels.items():
        r = sides[key]
        print(f"{label:<44}{r['step_s']:>8.2f}{r['speed_vs_hf']:>6.2f}x{r['losses'][0]:>10.5f}"
              f"{r['losses'][-1]:>11.5f}{r['max_loss_diff_vs_hf']:>10.1e}")  # fmt: skip
    Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
