#!/usr/bin/env bash
# The README's main command (until the tiny NaViL pretraining run lands): install what is
# needed, then train a tiny GPT with megatron-core on 4 CPU processes (gloo): TP=2 x PP=2
# dense, then TP=2 x EP=2 MoE, each with the distributed optimizer, a dist-checkpoint, and a
# reload in another layout (TP=PP=1; EP=4 for MoE) that must give the same held-out loss.
# Extra arguments go to both runs (e.g. --steps 20).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_NUM_THREADS=1
torchrun=.venv/bin/torchrun
[ "${NAVIL_SYSTEM_INSTALL:-0}" = 1 ] && torchrun=torchrun  # the container image
run() { "$torchrun" --standalone --nproc-per-node 4 examples/parallel_smoke.py "$@"; }
echo "== dense GPT, TP=2 x PP=2 =="
run --tp 2 --pp 2 --save checkpoints/parallel_smoke/dense "$@"
echo "== MoE GPT (4 experts, alltoall), TP=2 x EP=2 =="
run --tp 2 --pp 1 --ep 2 --experts 4 --reload-ep 4 --save checkpoints/parallel_smoke/moe "$@"
