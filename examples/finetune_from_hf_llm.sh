#!/usr/bin/env bash
# NaViL from a Hugging Face LLM and your own image-text data, end to end on CPU: the path a user
# takes with a real LLM, at a size that runs in minutes.
#   1. data: your JSONL / CSV / InternVL meta.json / WebDataset tars (DATA, held-out VAL), or by
#      default the synthetic image-caption corpus (tools/make_synthetic_corpus.py)
#   2. LLM: your HF causal-LM directory (HF_LLM: Llama/Mistral, Qwen3 or InternLM2, no biases),
#      or by default a tiny random Qwen3 (or Llama) written with a byte-level BPE tokenizer of
#      its own, 1000 ids, none of them NaViL's (tools/make_tiny_hf_llm.py)
#   3. index: both splits into memory-mapped shards with the LLM's tokenizer, which gets the 12
#      NaViL special tokens (and the chat template's) appended (tools/index_corpus.py)
#   4. import: the LLM's weights into a NaViL of CONFIG's vision encoder and connector (fresh),
#      its text experts copied into the visual experts, the vocabulary padded so that every
#      tokenizer id and the 12 NaViL ids are rows: the tokenizer's size rounded up to a multiple
#      of VOCAB_DIVISIBLE_BY x TP (tools/convert_from_hf.py llm)
#   5. stage S1.1 (torchrun, NPROC processes, TP x PP, EP in the modality experts): the vision
#      encoder, connector, visual experts and special-token table train, the LLM stays frozen;
#      --init starts it from the import
#   6. stage S2: everything trains; --init hands over the S1.1 checkpoint (weights only: a new
#      optimizer, LR schedule and data order)
#   7. held-out images captioned by the S2 checkpoint: accuracy vs chance on the synthetic
#      corpus, exact matches on yours (tools/caption.py)
#   8. S2 exported to a Hugging Face directory with the LLM's tokenizer (tools/convert_to_hf.py),
#      and the same images captioned through transformers, which must give the same captions
#      (tools/caption_hf.py --compare; needs VAL as an InternVL conversations JSONL)
# Every checkpoint carries its model config (navil_config.json): steps 5-8 need no --config.
# Everything lands in $OUT; a re-run reuses the corpus, the tiny LLM and the shards when made
# with the same settings, and imports and trains afresh. Environment (defaults in brackets):
#   OUT [runs/finetune]   where everything goes
#   HF_LLM [tiny random]  an HF LLM directory (config.json + *.safetensors); default $OUT/llm
#   LLM_ARCH [qwen3]      the tiny LLM's family when no HF_LLM: qwen3 or llama (Llama 3 style
#                         tokenizer: a BOS before every text)
#   TOKENIZER [the LLM's] a tokenizer.json / tokenizer.model, or a directory holding one
#                         (default HF_LLM: its tokenizer.json, else its tokenizer.model)
#   DATA [synthetic]      training data: one path tools/index_corpus.py takes (a .jsonl, .csv,
#                         InternVL meta .json, a .tar or a directory of .tar files)
#   VAL [synthetic val]   held-out data, the same kinds (DATA without VAL: steps 7-8 caption
#                         nothing; VAL not a conversations .jsonl: step 8 only exports)
#   CONFIG [tiny]         NaViL config giving the vision encoder, connector and image rules
#   TEMPLATE [qwen3-chat] chat template of conversations (qwen3-chat or internlm2-chat)
#   INDEX_ARGS [--no-multi-scale --no-system]  more tools/index_corpus.py flags (see
#                         examples/pretrain_navil_tiny.sh for why these two; "" for NaViL's
#                         default multi-scale images and system message)
#   VOCAB_DIVISIBLE_BY [128]  --make-vocab-size-divisible-by of the import
#   NPROC [4], TP [2], PP [2], EP [2]  processes and layout of both stages (the import is
#                         written in the same layout)
#   S11_STEPS [50], S2_STEPS [450]  optimizer steps of each stage (S1.1 learns little with
#                         the default random LLM, which stays frozen in it and writes the
#                         words; a pretrained LLM is what S1.1 is for: give it more steps)
#   SEQ_LENGTH [2048], GLOBAL_BATCH [2]  packed tokens per sequence, sequences per step
#   LR [2e-3]             peak LR of both stages (S1.1 constant after warm-up, S2 cosine to
#                         a tenth of it), for the tiny default; S11_LR, S2_LR [LR] set one
#                         stage's (NaViL's recipes: 5e-5 and 2e-5, for a pretrained LLM)
#   CAPTION_LIMIT [200]   held-out samples to caption
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-runs/finetune}
HF_LLM=${HF_LLM:-}
LLM_ARCH=${LLM_ARCH:-qwen3}
TOKENIZER=${TOKENIZER:-}
DATA=${DATA:-}
VAL=${VAL:-}
CONFIG=${CONFIG:-tiny}
TEMPLATE=${TEMPLATE:-qwen3-chat}
INDEX_ARGS=${INDEX_ARGS---no-multi-scale --no-system}
VOCAB_DIVISIBLE_BY=${VOCAB_DIVISIBLE_BY:-128}
NPROC=${NPROC:-4}
TP=${TP:-2} PP=${PP:-2} EP=${EP:-2}
S11_STEPS=${S11_STEPS:-50}
S2_STEPS=${S2_STEPS:-450}
SEQ_LENGTH=${SEQ_LENGTH:-2048}
GLOBAL_BATCH=${GLOBAL_BATCH:-2}
LR=${LR:-2e-3}
S11_LR=${S11_LR:-$LR}
S2_LR=${S2_LR:-$LR}
CAPTION_LIMIT=${CAPTION_LIMIT:-200}
PY=.venv/bin/python
start=$(date +%s)
phases="" last=$start
mark() {  # mark NAME: the seconds since the previous mark go into the closing summary
  local now; now=$(date +%s)
  phases="$phases, $1 $((now - last)) s"; last=$now
}
mkdir -p "$OUT"

echo "== 1. data =="
if [ -z "$DATA" ]; then
  # the tiny example's corpus: 96..128 px images, about 2x2 patches a shape
  CORPUS_ARGS="--num-train 4000 --num-val 200 --min-side 96 --max-side 128"
  if [ "$(cat "$OUT/data/corpus_args" 2>/dev/null)" != "$CORPUS_ARGS" ]; then
    rm -rf "$OUT/data"
    # shellcheck disable=SC2086
    $PY tools/make_synthetic_corpus.py --output "$OUT/data" $CORPUS_ARGS
    echo "$CORPUS_ARGS" > "$OUT/data/corpus_args"
  fi
  DATA=$OUT/data/train.jsonl
  VAL=${VAL:-$OUT/data/val.jsonl}
fi
for path in "$DATA" ${VAL:+"$VAL"}; do
  [ -e "$path" ] || { echo "finetune_from_hf_llm.sh: $path does not exist" >&2; exit 2; }
done
echo "training data: $DATA; held-out: ${VAL:-none}"

echo "== 2. LLM =="
if [ -z "$HF_LLM" ]; then
  HF_LLM=$OUT/llm
  # its BPE learns the training texts first (a .jsonl), as a real tokenizer covers them well
  llm_args=(--arch "$LLM_ARCH" --vocab-size 1000)
  case "$DATA" in *.jsonl) llm_args+=(--texts "$DATA") ;; esac
  if [ "$(cat "$HF_LLM/llm_args" 2>/dev/null)" != "${llm_args[*]}" ]; then
    rm -rf "$HF_LLM"
    $PY tools/make_tiny_hf_llm.py --output "$HF_LLM" "${llm_args[@]}"
    echo "${llm_args[*]}" > "$HF_LLM/llm_args"
  fi
fi
if [ ! -f "$HF_LLM/config.json" ]; then
  echo "finetune_from_hf_llm.sh: $HF_LLM: no config.json (not an HF model directory)" >&2
  exit 2
fi
TOKENIZER=${TOKENIZER:-$HF_LLM}
if [ -d "$TOKENIZER" ]; then  # the tools' rule for a directory: tokenizer.json, else .model
  if [ -f "$TOKENIZER/tokenizer.json" ]; then
    TOKENIZER=$TOKENIZER/tokenizer.json
  elif [ -f "$TOKENIZER/tokenizer.model" ]; then
    TOKENIZER=$TOKENIZER/tokenizer.model
  else
    echo "finetune_from_hf_llm.sh: $TOKENIZER has no tokenizer.json or tokenizer.model" >&2
    exit 2
  fi
fi
echo "LLM: $HF_LLM; tokenizer: $TOKENIZER"
mark "data + LLM"

echo "== 3. index with the LLM's tokenizer (resumes; skips finished shards) =="
# what the shards depend on: any change re-indexes both splits
key="$DATA|$VAL|$(sha256sum "$TOKENIZER" | cut -c1-16)|$CONFIG|$TEMPLATE|$INDEX_ARGS"
if [ "$(cat "$OUT/shards/index_key" 2>/dev/null)" != "$key" ]; then
  rm -rf "$OUT/shards"
fi
splits="train"
[ -n "$VAL" ] && splits="train val"
for split in $splits; do
  input=$DATA
  [ "$split" = val ] && input=$VAL
  # shellcheck disable=SC2086
  $PY tools/index_corpus.py build --input "$input" --tokenizer "$TOKENIZER" --config "$CONFIG" \
    --template "$TEMPLATE" $INDEX_ARGS --output "$OUT/shards/$split" --workers 2 --quiet
done
echo "$key" > "$OUT/shards/index_key"
mark index

echo "== 4. import the LLM into NaViL ($CONFIG's vision encoder and connector, fresh) =="
rm -rf "$OUT/init"
$PY tools/convert_from_hf.py llm --hf "$HF_LLM" --config "$CONFIG" --tokenizer "$TOKENIZER" \
  --make-vocab-size-divisible-by "$VOCAB_DIVISIBLE_BY" --tp "$TP" --pp "$PP" --ep "$EP" \
  --etp 1 --output "$OUT/init"
mark import

rm -rf "$OUT/ckpt_s1.1" "$OUT/ckpt_s2" "$OUT/logs_s1.1" "$OUT/logs_s2"
# Both stages: one checkpoint at the end; --init takes the newest complete one of a directory.
train() {  # train STAGE STEPS LR INIT: --save $OUT/ckpt_STAGE, --log-dir $OUT/logs_STAGE
  local stage=$1 steps=$2 lr=$3 init=$4 min_lr
  min_lr=$(awk -v lr="$lr" 'BEGIN { print lr / 10 }')
  .venv/bin/torchrun --standalone --nproc-per-node "$NPROC" -m megatron_navil.train \
    --init "$init" --data "$OUT/shards/train" --stage "$stage" --steps "$steps" \
    --tp "$TP" --pp "$PP" --ep "$EP" --etp 1 --seq-length "$SEQ_LENGTH" \
    --global-batch "$GLOBAL_BATCH" --lr "$lr" --min-lr "$min_lr" \
    --warmup $((steps < 200 ? steps / 10 : 20)) --save "$OUT/ckpt_$stage" \
    --log-dir "$OUT/logs_$stage"
}
echo "== 5. stage S1.1: vision encoder, connector, visual experts (LLM frozen), $S11_STEPS steps =="
train s1.1 "$S11_STEPS" "$S11_LR" "$OUT/init"
mark "S1.1"
echo "== 6. stage S2: everything, $S2_STEPS steps, from the S1.1 checkpoint =="
train s2 "$S2_STEPS" "$S2_LR" "$OUT/ckpt_s1.1"
mark "S2"

if [ -n "$VAL" ]; then
  echo "== 7. caption held-out images =="
  $PY tools/caption.py --checkpoint "$OUT/ckpt_s2" --data "$OUT/shards/val" --show 3 \
    --limit "$CAPTION_LIMIT" --json "$OUT/captions.json" --quiet
  mark caption
fi
echo "== 8. export to Hugging Face format with the LLM's tokenizer =="
rm -rf "$OUT/hf"
$PY tools/convert_to_hf.py --checkpoint "$OUT/ckpt_s2" --output "$OUT/hf" \
  --tokenizer "$TOKENIZER" --dtype float32 --quiet
# through transformers a caption is the answer to the sample's question about its image: that
# needs InternVL conversations (a caption pair's prompt is the image alone)
if [[ "$VAL" == *.jsonl ]] && head -n 1 "$VAL" | grep -q '"conversations"'; then
  echo "   and caption the held-out images again through transformers"
  $PY tools/caption_hf.py --hf "$OUT/hf" --jsonl "$VAL" --show 0 --limit "$CAPTION_LIMIT" \
    --compare "$OUT/captions.json" --json "$OUT/captions_hf.json"
else
  echo "   (no held-out conversations .jsonl: not captioned through transformers)"
fi
mark "export + HF captions"
echo "total wall time: $(( $(date +%s) - start )) s (${phases#, }); loss curves:" \
  "$OUT/logs_s1.1/loss_curve.png, $OUT/logs_s2/loss_curve.png"
