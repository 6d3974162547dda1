#!/usr/bin/env bash
# NaViL-2B: one of the paper's three training stages on H100 nodes (../shared/NAVIL.md,
# "Training recipe"; docs/training.md).
#
#   STAGE=s1.1 DATA="/data/s1.1" SAVE=/ckpt/2b/s1.1 NNODES=8 bash examples/pretrain_navil_2b.sh
#   STAGE=s1.2 DATA=... SAVE=/ckpt/2b/s1.2 INIT=/ckpt/2b/s1.1 NNODES=8 bash examples/pretrain_navil_2b.sh
#   STAGE=s2 NNODES=8 bash examples/pretrain_navil_2b.sh --dry-run   # the plan, no GPU needed
#
# Layout: TP1 PP1, data parallel over every GPU (DP64 on 8 nodes of 8 H100s), selective
# recompute in the LLM and full recompute of the vision blocks. `python tools/plan_layout.py
# navil-2b --search --gpus 64 --gpu-mem 79.6` at S2 (16,384 tokens + 49,152 patches per
# sequence, the heaviest stage) finds nothing that fits without recompute; with the LLM/vision
# recompute at selective/full this is its fastest fitting layout (67.2 GiB on the most loaded
# GPU), and the same layout fits S1.1 and S1.2 (51.1 and 55.3 GiB), so the stages hand over
# checkpoints without resharding. (Unconstrained, the search ranks TP4 PP1 DP16 with selective
# recompute everywhere first, but its cost model ignores that the 2B vision tower's 23 heads do
# not split over TP, so every TP rank runs the whole tower: at S2 that is 68% of the model
# FLOPs, computed 4 times at TP4.)
# Environment and flags: see examples/navil_launch.sh (or --help).
MODEL=navil-2b
TP=${TP:-1}
PP=${PP:-1}
RECOMPUTE_LLM=${RECOMPUTE_LLM:-selective}
RECOMPUTE_VISION=${RECOMPUTE_VISION:-full}
# shellcheck source=examples/navil_launch.sh
source "$(dirname "$0")/navil_launch.sh"
