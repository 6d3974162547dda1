#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one pass, for a GPU node where torch (a CUDA build),
# megatron-core and the project's dependencies are importable by $PY (e.g. inside the Docker
# image). Each step runs under a time limit and the script goes on after a failure; the
# summary at the end lists every step's exit status, and the script exits non-zero if any
# failed. Logs and results land in $OUT (default runs/gpu_checks).
#   1. build the C++/CUDA extensions in place for TORCH_CUDA_ARCH_LIST (default 9.0)
#   2. the GPU tests (pytest -m gpu) and the CUDA compile test
#   3. benchmarks/bench_patchify_cuda.py (kernel vs torch eager vs the HF processor on GPU)
#   4. benchmarks/bench_gpu_slice.py: the NaViL-9B-shaped slice (MFU, tokens/s, peak memory
#      for each transformer impl and attention backend that runs here)
#   5. the tiny model trained on one GPU in fp32 (its loss curve can be compared with the
#      same command on CPU) and in bf16 with a stop, a resume and captioning
# SKIP="name ..." leaves out the named steps (the names in the summary).
# Needs indexed tiny shards: DATA (default runs/gpu/shards, made by examples/pretrain_navil_tiny.sh
# steps 1-2 or tools/make_synthetic_corpus.py + tools/index_corpus.py).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY=${PY:-python3}
OUT=${OUT:-runs/gpu_checks}
DATA=${DATA:-runs/gpu/shards}
mkdir -p "$OUT"
status=()
step() {  # step NAME SECONDS CMD...: run with a limit, log to $OUT/NAME.log, record the status
  local name=$1 limit=$2
  shift 2
  case " ${SKIP:-} " in *" $name "*) status+=("$name skipped"); return ;; esac
  local began
  began=$(date +%s)
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  status+=("$name rc=$rc $(($(date +%s) - began))s")
  echo "== $name: rc=$rc ($(($(date +%s) - began)) s) =="
  tail -n 5 "$OUT/$name.log"
}
train() {  # train NAME SECONDS ARGS...: the tiny model on one GPU
  local name=$1 limit=$2
  shift 2
  step "$name" "$limit" "$PY" -m torch.distributed.run --standalone --nproc-per-node 1 \
    -m megatron_navil.train --config tiny --data "$DATA/train" --seq-length 512 \
    --global-batch 4 --lr 2e-3 --min-lr 2e-4 --no-progress "$@"
}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
step build 400 env TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}" MAX_JOBS="${MAX_JOBS:-16}" \
  "$PY" setup.py build_ext --inplace
step gpu_tests 240 "$PY" -m pytest -q -p no:cacheprovider -rs -m gpu tests/unit
step cuda_compile_test 240 "$PY" -m pytest -q -p no:cacheprovider -rs tests/unit/test_cuda_compile.py
step bench_patchify_cuda 180 "$PY" benchmarks/bench_patchify_cuda.py --json "$OUT/patchify_cuda.json"
step bench_gpu_slice 480 "$PY" benchmarks/bench_gpu_slice.py --json "$OUT/gpu_slice.json"
train train_fp32 180 --steps 10 --warmup 1 --precision fp32 --log-dir "$OUT/fp32"
rm -rf "$OUT/ckpt"
train train_bf16_a 180 --steps 40 --warmup 4 --exit-after 20 --save "$OUT/ckpt" --log-dir "$OUT/bf16"
train train_bf16_b 180 --steps 40 --warmup 4 --load "$OUT/ckpt" --save "$OUT/ckpt" --log-dir "$OUT/bf16"
step caption 180 "$PY" tools/caption.py --checkpoint "$OUT/ckpt" --config tiny --data "$DATA/val" \
  --limit 40 --json "$OUT/captions.json"
echo "== summary =="
printf '%s\n' "${status[@]}" | tee "$OUT/summary.txt"
! grep -v ' skipped$' "$OUT/summary.txt" | grep -qv ' rc=0 '
