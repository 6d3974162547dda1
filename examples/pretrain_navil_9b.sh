#!/usr/bin/env bash
# NaViL-9B: one of the paper's three training stages on H100 nodes (../shared/NAVIL.md,
# "Training recipe"; docs/training.md).
#
#   STAGE=s1.1 DATA="/data/s1.1" SAVE=/ckpt/9b/s1.1 NNODES=8 bash examples/pretrain_navil_9b.sh
#   STAGE=s1.2 DATA=... SAVE=/ckpt/9b/s1.2 INIT=/ckpt/9b/s1.1 NNODES=8 bash examples/pretrain_navil_9b.sh
#   STAGE=s2 NNODES=8 bash examples/pretrain_navil_9b.sh --dry-run   # the plan, no GPU needed
#
# Layout: TP4 PP1 inside each node (DP16 on 8 nodes of 8 H100s), with selective recompute
# in the LLM and full recompute of the vision blocks: the paper recipe `navil_9b(stage)` in
# megatron_navil/training/paper.py, which says why; TP=.. PP=.. etc. override it.
# Environment and flags: see examples/navil_launch.sh (or --help).
MODEL=navil-9b
# shellcheck source=examples/navil_launch.sh
source "$(dirname "$0")/navil_launch.sh"
