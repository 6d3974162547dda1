#!/usr/bin/env bash
# NaViL-2B: one of the paper's three training stages on H100 nodes (../shared/NAVIL.md,
# "Training recipe"; docs/training.md).
#
#   STAGE=s1.1 DATA="/data/s1.1" SAVE=/ckpt/2b/s1.1 NNODES=8 bash examples/pretrain_navil_2b.sh
#   STAGE=s1.2 DATA=... SAVE=/ckpt/2b/s1.2 INIT=/ckpt/2b/s1.1 NNODES=8 bash examples/pretrain_navil_2b.sh
#   STAGE=s2 NNODES=8 bash examples/pretrain_navil_2b.sh --dry-run   # the plan, no GPU needed
#
# Layout: TP1 PP1, data parallel over every GPU (DP64 on 8 nodes of 8 H100s), with
# selective recompute in the LLM and full recompute of the vision blocks: the paper recipe
# `navil_2b(stage)` in megatron_navil/training/paper.py, which says why; TP=.. PP=.. etc.
# override it.
# Environment and flags: see examples/navil_launch.sh (or --help).
MODEL=navil-2b
# shellcheck source=examples/navil_launch.sh
source "$(dirname "$0")/navil_launch.sh"
