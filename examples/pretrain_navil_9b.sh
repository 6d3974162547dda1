#!/usr/bin/env bash
# NaViL-9B: one of the paper's three training stages on H100 nodes (../shared/NAVIL.md,
# "Training recipe"; docs/training.md).
#
#   STAGE=s1.1 DATA="/data/s1.1" SAVE=/ckpt/9b/s1.1 NNODES=8 bash examples/pretrain_navil_9b.sh
#   STAGE=s1.2 DATA=... SAVE=/ckpt/9b/s1.2 INIT=/ckpt/9b/s1.1 NNODES=8 bash examples/pretrain_navil_9b.sh
#   STAGE=s2 NNODES=8 bash examples/pretrain_navil_9b.sh --dry-run   # the plan, no GPU needed
#
# Layout: TP4 PP1 inside each node (DP16 on 8 nodes of 8 H100s), selective recompute in the
# LLM and full recompute of the vision blocks. `python tools/plan_layout.py navil-9b --search
# --gpus 64 --gpu-mem 79.6` at S2 (16,384 tokens + 49,152 patches per sequence, the heaviest
# stage) recommends exactly this (64.6 GiB on the most loaded GPU); nothing fits without
# recompute, and the next fitting layouts with these recompute modes (TP4 PP2, with or without
# VPP2) are slower in its cost model (pipeline bubble). The same layout fits S1.1 and S1.2,
# so the stages hand over checkpoints without resharding.
# Environment and flags: see examples/navil_launch.sh (or --help).
MODEL=navil-9b
TP=${TP:-4}
PP=${PP:-1}
RECOMPUTE_LLM=${RECOMPUTE_LLM:-selective}
RECOMPUTE_VISION=${RECOMPUTE_VISION:-full}
# shellcheck source=examples/navil_launch.sh
source "$(dirname "$0")/navil_launch.sh"
