# shellcheck shell=bash
# Shared by pretrain_navil_2b.sh and pretrain_navil_9b.sh (sourced, not run): one NaViL training
# stage on GPU nodes. The model script sets MODEL (its layout is the paper recipe's, in
# megatron_navil/training/paper.py, unless TP, PP, ... are set); this
# file reads the job from the environment, takes the rendezvous from SLURM when the job runs
# under it, and hands everything to `python -m megatron_navil.launch`, which resolves the
# paper's recipe for the stage, checks the GPUs and execs torchrun (or, with --dry-run or
# DRY_RUN=1, prints the plan and exits 0).
#
# Environment (defaults in brackets):
#   STAGE            s1.1 | s1.2 | s2 (required)
#   DATA             indexed corpus directories, space-separated (required to train)
#   EVAL_DATA        held-out indexed corpora, space-separated: their loss every EVAL_INTERVAL
#                    steps [none; EVAL_INTERVAL 1000, EVAL_ITERS 10]
#   SAVE             this stage's checkpoint directory (required to train)
#   LOAD             resume from the newest complete checkpoint here [$SAVE]
#   INIT             start from the weights of the newest checkpoint here (e.g. the previous
#                    stage's SAVE) when LOAD has nothing to resume []
#   LOG_DIR          TensorBoard, progress.txt, loss_curve.png [$SAVE/logs]
#   NNODES           nodes [$SLURM_NNODES or 1];  GPUS_PER_NODE  GPUs per node [8]
#   NODE_RANK        [$SLURM_NODEID or 0];  MASTER_ADDR  [first host of $SLURM_JOB_NODELIST
#                    (scontrol), else 127.0.0.1];  MASTER_PORT  [29500]
#   TP PP VPP EP FIRST_STAGE_LAYERS RECOMPUTE_LLM RECOMPUTE_VISION   the layout [the paper
#                    recipe's: megatron_navil/training/paper.py]
#   STEPS GLOBAL_BATCH SAMPLE_TOKENS SEQ_LENGTH SAVE_INTERVAL   [the paper's / derived; 1000]
#   DRY_RUN=1        same as --dry-run;  PYTHON  interpreter [.venv/bin/python, else python3]
# Arguments: --dry-run; --force (launch a layout the planner says does not fit in GPU memory,
# which is refused otherwise, with the layouts that fit); -h/--help; anything else is passed to
# megatron_navil.train.

set -euo pipefail
script=$(basename "$0")

_navil_help() {  # the model script's header, then this file's environment notes
  for f in "$0" "${BASH_SOURCE[0]}"; do
    awk 'NR == 1 && /^#!/ { next } /^#/ { sub(/^# ?/, ""); if ($0 !~ /^shellcheck/) print; next } { exit }' "$f"
    echo
  done
}
dry_run=${DRY_RUN:-0}
force=0
extra=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry_run=1 ;;
    --force) force=1 ;;
    -h | --help) _navil_help; exit 0 ;;
    *) extra+=("$arg") ;;
  esac
done
[ "$dry_run" = 0 ] || [ "$dry_run" = 1 ] || { echo "$script: DRY_RUN must be 0 or 1, got '$dry_run'" >&2; exit 2; }
if [ -z "${STAGE:-}" ]; then
  echo "$script: set STAGE to s1.1, s1.2 or s2 (the paper's three stages)" >&2
  exit 2
fi

root=$(cd "$(dirname "$0")/.." && pwd)
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$root/.venv/bin/python" ]; then PYTHON=$root/.venv/bin/python; else PYTHON=python3; fi
fi

NNODES=${NNODES:-${SLURM_NNODES:-1}}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-0}}
if [ -z "${MASTER_ADDR:-}" ]; then
  if [ -n "${SLURM_JOB_NODELIST:-}" ]; then
    if ! command -v scontrol > /dev/null; then
      echo "$script: SLURM_JOB_NODELIST is set but scontrol is not on PATH; export MASTER_ADDR" >&2
      exit 2
    fi
    # No `| head -n 1`: head exiting early SIGPIPEs scontrol, which pipefail turns into exit 141.
    hosts=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
    MASTER_ADDR=${hosts%%$'\n'*}
  else
    MASTER_ADDR=127.0.0.1
  fi
fi
MASTER_PORT=${MASTER_PORT:-29500}

args=(
  --config "$MODEL" --stage "$STAGE"
  --nnodes "$NNODES" --gpus-per-node "$GPUS_PER_NODE"
  --node-rank "$NODE_RANK" --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT"
  --save-interval "${SAVE_INTERVAL:-1000}"
)
[ -z "${TP:-}" ] || args+=(--tp "$TP")
[ -z "${PP:-}" ] || args+=(--pp "$PP")
[ -z "${VPP:-}" ] || args+=(--vpp "$VPP")
[ -z "${EP:-}" ] || args+=(--ep "$EP")
[ -z "${RECOMPUTE_LLM:-}" ] || args+=(--recompute-llm "$RECOMPUTE_LLM")
[ -z "${RECOMPUTE_VISION:-}" ] || args+=(--recompute-vision "$RECOMPUTE_VISION")
[ -z "${FIRST_STAGE_LAYERS:-}" ] || args+=(--first-stage-layers "$FIRST_STAGE_LAYERS")
[ -z "${STEPS:-}" ] || args+=(--steps "$STEPS")
[ -z "${GLOBAL_BATCH:-}" ] || args+=(--global-batch "$GLOBAL_BATCH")
[ -z "${SAMPLE_TOKENS:-}" ] || args+=(--sample-tokens "$SAMPLE_TOKENS")
[ -z "${SEQ_LENGTH:-}" ] || args+=(--seq-length "$SEQ_LENGTH")
if [ -n "${DATA:-}" ]; then
  read -r -a data <<< "$DATA"
  args+=(--data "${data[@]}")
fi
if [ -n "${SAVE:-}" ]; then
  args+=(--save "$SAVE" --load "${LOAD:-$SAVE}" --log-dir "${LOG_DIR:-$SAVE/logs}")
elif [ -n "${LOAD:-}" ]; then
  args+=(--load "$LOAD")
fi
[ -z "${INIT:-}" ] || args+=(--init "$INIT")
if [ -n "${EVAL_DATA:-}" ]; then  # train's own flags: after "--" with the other pass-through
  read -r -a eval_data <<< "$EVAL_DATA"
  extra+=(--eval-data "${eval_data[@]}" --eval-interval "${EVAL_INTERVAL:-1000}"
    --eval-iters "${EVAL_ITERS:-10}")
fi
[ "$dry_run" = 0 ] || args+=(--dry-run)
[ "$force" = 0 ] || args+=(--force)

cd "$root"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # TP/SP comm overlap order
export NAVIL_LAUNCH_PROG=$script
exec "$PYTHON" -m megatron_navil.launch "${args[@]}" -- "${extra[@]}"
