"""Distributed smoke run of megatron-core on this machine: train a tiny GPT (dense or MoE) in
a TP x PP (x EP) layout with the distributed optimizer, save a dist-checkpoint, reload it in
another layout (default TP=PP=EP=1, i.e. every rank holds the whole model) and check the
held-out loss is the same.

Launch with torchrun (``examples/parallel_smoke.sh`` does), e.g.::

    torchrun --standalone --nproc-per-node 4 examples/parallel_smoke.py --tp 2 --pp 2

It runs the same code on GPUs (nccl) and on CPUs (gloo + megatron_navil's CPU shim).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tp", type=int, default=2, help="tensor-parallel size (default 2)")
    p.add_argument("--pp", type=int, default=2, help="pipeline-parallel size (default 2)")
    p.add_argument("--vpp", type=int, default=None, help="virtual pipeline stages per rank")
    p.add_argument("--ep", type=int, default=1, help="expert-parallel size (needs --experts)")
    p.add_argument("--experts", type=int, default=0, help="MoE experts per layer (0 = dense)")
    p.add_argument("--steps", type=int, default=60, help="training steps (default 60)")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument(
        "--save",
        default="checkpoints/parallel_smoke",
        help="checkpoint directory (default checkpoints/parallel_smoke)",
    )
    p.add_argument("--reload-tp", type=int, default=1, help="TP size to reload in (default 1)")
    p.add_argument("--reload-pp", type=int, default=1, help="PP size to reload in (default 1)")
    p.add_argument(
        "--reload-ep",
        type=int,
        default=1,
        help="EP size to reload in (default 1; megatron-core 0.16 cannot load an "
        "EP>1 MoE optimizer state at EP=1, use 4 for MoE)",
    )
    args = p.parse_args(argv)
    if args.ep > 1 and not args.experts:
        p.error("--ep > 1 needs --experts (a dense model has nothing to split across experts)")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")  # megatron-core/torch deprecation chatter
    import torch
    from tqdm import tqdm

    from megatron_navil.parallel import launch_env
    from megatron_navil.testing import tiny_gpt as T

    world = launch_env().world_size
    rank0 = launch_env().rank == 0
    spec = T.TinyGPTSpec(
        num_layers=4,
        hidden=64,
        heads=4,
        ffn=128,
        vocab=64,
        seq=32,
        num_experts=args.experts or None,
        global_batch=16,
        micro_batch=2,
        learnable=True,
    )
    layout = dict(tp=args.tp, pp=args.pp, ep=args.ep, vpp=args.vpp)
    opt = dict(optimizer="adam", distributed_optimizer=True, lr=args.lr)
    try:
        run = T.setup_run(spec, layout, **opt)
    except ValueError as err:  # a layout that does not fit the world size
        print(f"parallel_smoke: error: {err}", file=sys.stderr)
        return 2
    if rank0:
        dp = world // (args.tp * args.pp)
        print(
            f"world={world} tp={args.tp} pp={args.pp} vpp={args.vpp} ep={args.ep} dp={dp} "
            f"experts={args.experts} backend={torch.distributed.get_backend()}"
        )
    tokens_per_step = spec.global_batch * spec.seq
    start = time.perf_counter()
    bar = tqdm(range(args.steps), disable=not rank0, desc="train", unit="step")
    first = None
    for step in bar:
        loss = run.step(batch_seed=step)
        first = loss if first is None else first
        rate = tokens_per_step * (step + 1) / (time.perf_counter() - start)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
    held_out = 10_000  # a batch never trained on
    before = run.step(batch_seed=held_out, update=False)
    save = os.path.abspath(args.save)
    t = time.perf_counter()
    T.save_checkpoint(run.chunks, run.optimizer, save)
    save_s = time.perf_counter() - t
    target = dict(tp=args.reload_tp, pp=args.reload_pp, ep=args.reload_ep)
    reloaded = T.setup_run(spec, target, seed=1, **opt)  # other weights until loaded
    T.load_checkpoint(reloaded.chunks, reloaded.optimizer, save)
    after = reloaded.step(batch_seed=held_out, update=False)
    ok = abs(after - before) <= 1e-5 * abs(before)
    if rank0:
        print(
            f"loss: step 1 {first:.4f} -> step {args.steps} {loss:.4f} "
            f"(chance {torch.log(torch.tensor(float(spec.vocab))):.4f})"
        )
        print(f"checkpoint: {save} ({save_s:.1f} s to save)")
        where = " ".join(f"{k}={v}" for k, v in target.items())
        print(
            f"held-out loss in the training layout {before:.6f}, reloaded at {where} "
            f"{after:.6f}: {'same' if ok else 'DIFFERENT'}"
        )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
