#!/usr/bin/env bash
# The README's main command: the tiny NaViL pretraining run on CPU, end to end.
#   1. a learnable synthetic image-caption corpus + tokenizer (tools/make_synthetic_corpus.py)
#   2. indexed into memory-mapped shards, train and held-out (tools/index_corpus.py)
#   3. trained on 4 processes, TP=2 x PP=2 with EP=2 in the modality experts (megatron-core,
#      gloo), distributed AdamW; stopped half-way with a checkpoint, then resumed to the end;
#      the held-out split's loss evaluated every quarter of the run (--eval-data)
#   4. held-out images captioned by the trained model: accuracy vs chance (tools/caption.py)
#   5. the checkpoint exported to a Hugging Face directory (tools/convert_to_hf.py) and the same
#      images captioned through transformers (tools/caption_hf.py): the same captions
# Steps 4 and 5 need no --config: every checkpoint carries its model config (navil_config.json).
# Everything lands in $OUT (default runs/tiny); re-running reuses the corpus (when made with the
# same arguments) and its shards and starts training afresh. Environment: STEPS (default 540),
# NPROC (4), TP/PP/EP (2/2/2), CAPTION_LIMIT (held-out samples to caption, default all 200).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_NUM_THREADS=1
OUT=${OUT:-runs/tiny}
STEPS=${STEPS:-540}
NPROC=${NPROC:-4}
TP=${TP:-2} PP=${PP:-2} EP=${EP:-2}
PY=.venv/bin/python TORCHRUN=.venv/bin/torchrun
if [ "${NAVIL_SYSTEM_INSTALL:-0}" = 1 ]; then  # the container image: its python3 has the package
  PY=python3 TORCHRUN=torchrun
fi
start=$(date +%s)
phases="" last=$start
mark() {  # mark NAME: the seconds since the previous mark go into the closing summary
  local now; now=$(date +%s)
  phases="$phases, $1 $((now - last)) s"; last=$now
}

# 96..128 px sides: after the tiny config's resize every image is 6x6 or 8x8 patches, so a
# shape covers about 2x2 patches (the tool's default 32..128 px makes many 4x4-patch images
# whose shapes fit inside one patch; the model learnt even their colours far more slowly)
CORPUS_ARGS="--num-train 4000 --num-val 200 --min-side 96 --max-side 128"
if [ "$(cat "$OUT/data/corpus_args" 2>/dev/null)" != "$CORPUS_ARGS" ]; then
  echo "== 1. synthetic corpus =="
  rm -rf "$OUT/data" "$OUT/shards"
  # shellcheck disable=SC2086
  $PY tools/make_synthetic_corpus.py --output "$OUT/data" $CORPUS_ARGS
  echo "$CORPUS_ARGS" > "$OUT/data/corpus_args"
fi
# One scale per image (--no-multi-scale): NaViL's multi-scale packing adds 3 coarser scales
# (16 of every sample's 85 LLM tokens carry the 8x8-patch base scale, 17 the others); without
# them a 1024-token sequence holds 14-15 samples instead of 12 and the vision encoder sees half
# the patches: each step is cheaper and the colours are learnt faster (docs/tiny_run.md). The
# run's checkpoints record multi_scale=false (taken from the corpus), so steps 4 and 5 prepare
# images as training did.
# --no-system: no system turn in the samples. The released models (and the indexer's default)
# put InternVL's default system message in every conversation: about 180 tokens of this tiny
# byte-level tokenizer, 6x a caption sample. The checkpoints record it (the prompt is taken
# from the corpus), so captions and the HF export prompt without one too.
INDEX_ARGS="--config tiny --template qwen3-chat --no-multi-scale --no-system"
if [ "$(cat "$OUT/shards/index_args" 2>/dev/null)" != "$INDEX_ARGS" ]; then
  rm -rf "$OUT/shards"
fi
echo "== 2. index (resumes; skips finished shards) =="
for split in train val; do
  # shellcheck disable=SC2086
  $PY tools/index_corpus.py build --input "$OUT/data/$split.jsonl" \
    --tokenizer "$OUT/data/tokenizer.json" $INDEX_ARGS \
    --output "$OUT/shards/$split" --workers 2 --quiet
done
echo "$INDEX_ARGS" > "$OUT/shards/index_args"
mark "corpus + index"

rm -rf "$OUT/ckpt" "$OUT/logs"
# A step is 4096 tokens (about 58 samples) in 2 micro-batches of 2048: at 4 processes on 2 cores
# a step's cost is mostly per-micro-batch overhead, so 2 x 2048 is cheaper than 4 x 1024 of the
# same samples (docs/tiny_run.md). Checkpoints at the half-way
# stop and at the end only (each save costs seconds of the 10-minute budget). Held-out loss:
# the first 3 global batches of the val split (about 170 of its 200 samples) every quarter.
train() {
  $TORCHRUN --standalone --nproc-per-node "$NPROC" -m megatron_navil.train \
    --config tiny --data "$OUT/shards/train" --tp "$TP" --pp "$PP" --ep "$EP" --etp 1 \
    --steps "$STEPS" --seq-length 2048 --global-batch 2 --stage s2 --lr 2e-3 --min-lr 2e-4 \
    --warmup $((STEPS < 200 ? STEPS / 10 : 20)) --save "$OUT/ckpt" --save-interval $((STEPS / 2)) --log-dir "$OUT/logs" \
    --eval-data "$OUT/shards/val" --eval-interval $((STEPS / 4)) --eval-iters 3 "$@"
}
echo "== 3a. train, stop after $((STEPS / 2)) of $STEPS steps =="
train --exit-after $((STEPS / 2))
mark train
echo "== 3b. resume from the checkpoint, train to $STEPS =="
train --load "$OUT/ckpt"
mark resume
echo "== 4. caption held-out images =="
$PY tools/caption.py --checkpoint "$OUT/ckpt" --data "$OUT/shards/val" --show 3 \
  --limit "${CAPTION_LIMIT:-200}" --json "$OUT/captions.json"
mark caption
echo "== 5. export to Hugging Face format, caption again through transformers =="
rm -rf "$OUT/hf"
$PY tools/convert_to_hf.py --checkpoint "$OUT/ckpt" --output "$OUT/hf" \
  --tokenizer "$OUT/data/tokenizer.json" --template qwen3-chat --dtype float32 --quiet
$PY tools/caption_hf.py --hf "$OUT/hf" --jsonl "$OUT/data/val.jsonl" --show 0 \
  --limit "${CAPTION_LIMIT:-200}" --compare "$OUT/captions.json" --json "$OUT/captions_hf.json"
mark "export + HF captions"
echo "total wall time: $(( $(date +%s) - start )) s (${phases#, }); loss curve: $OUT/logs/loss_curve.png"
