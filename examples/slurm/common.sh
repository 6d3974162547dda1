# shellcheck shell=bash
# Shared by examples/slurm/*.sbatch (sourced in the batch shell, not run): where the run's files
# go, the rendezvous (torchrun_env.sh), bare metal or a container, and navil_srun, which starts
# one command per SLURM task and turns SLURM's advance warning into a checkpoint and a requeue.
#
# Environment (defaults in brackets):
#   NAVIL_ROOT       the repository checkout on the shared file system [$SLURM_SUBMIT_DIR]
#   RUN_DIR          this run's checkpoints (ckpt/) and logs (logs/) [$NAVIL_ROOT/runs/$SLURM_JOB_NAME]
#   CONTAINER_IMAGE  run every task in this image with pyxis/enroot (srun --container-image,
#                    e.g. a squashfs made by `enroot import dockerd://megatron-navil:latest`);
#                    unset: bare metal, with $NAVIL_ROOT/.venv on PATH when it exists
#   CONTAINER_MOUNTS more --container-mounts (data); RUN_DIR is always mounted at its own path
#   CONTAINER_WORKDIR the repository inside the image [/workspace/megatron_navil]
#
# Preemption and time limits. The .sbatch files ask for `--signal=B:USR1@<seconds>` (the batch
# shell gets SIGUSR1 that long before the time limit) and `--requeue`. navil_srun forwards the
# SIGUSR1 to srun, which passes it to every process of the step; the training ranks finish the
# step they are in, write a checkpoint and exit 0 (megatron_navil/training/loop.py); the batch
# shell then requeues the job (scontrol requeue), and the next start resumes from the newest
# checkpoint (--load). Each task's shell sets SIGUSR1 and SIGTERM to "ignore" before it execs the
# launch command, and torchrun is told to handle neither (PET_SIGNALS_TO_HANDLE), so torchrun
# and the launch scripts outlive the signal and wait for the ranks, which install their own
# handlers. SIGTERM from SLURM itself (scancel, preemption with GraceTime) reaches every process
# of the step directly and ends the same way, without the requeue (a preempted job is requeued
# by SLURM; a cancelled one should stay cancelled).

# shellcheck source=examples/slurm/torchrun_env.sh
source "$(dirname "${BASH_SOURCE[0]}")/torchrun_env.sh"

# A warning that arrives before navil_srun has started the step must not kill the batch shell
# (SIGUSR1's default action): remember it, navil_srun passes it on at once. Ranks that have not
# reached the training loop yet ignore it: ask for a lead time (--signal=B:USR1@N) well below
# the time limit.
navil_early_signal=0
trap 'navil_early_signal=1' USR1

navil_setup() {  # paths, rendezvous and the launcher prefix; exits 2 on a setup mistake
  NAVIL_ROOT=${NAVIL_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
  RUN_DIR=${RUN_DIR:-$NAVIL_ROOT/runs/${SLURM_JOB_NAME:-navil}}
  mkdir -p "$RUN_DIR/ckpt" "$RUN_DIR/logs"
  navil_torchrun_env || exit 2
  export PET_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT  # not SIGTERM: the ranks handle it
  export NAVIL_ROOT RUN_DIR
  NAVIL_SRUN=(srun --kill-on-bad-exit=1)  # the job's tasks: one torchrun agent each
  if [ -n "${CONTAINER_IMAGE:-}" ]; then
    local mounts=$RUN_DIR:$RUN_DIR
    [ -z "${CONTAINER_MOUNTS:-}" ] || mounts+=",$CONTAINER_MOUNTS"
    NAVIL_SRUN+=(--container-image="$CONTAINER_IMAGE" --container-mounts="$mounts"
      --container-workdir="${CONTAINER_WORKDIR:-/workspace/megatron_navil}")
  else
    cd "$NAVIL_ROOT" || exit 2
    if [ -d "$NAVIL_ROOT/.venv/bin" ]; then
      export PATH=$NAVIL_ROOT/.venv/bin:$PATH
    fi
  fi
  echo "navil: job ${SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}) on ${SLURM_JOB_NODELIST}:" \
    "${NNODES} agents x ${GPUS_PER_NODE}, rendezvous ${PET_RDZV_ENDPOINT}," \
    "${CONTAINER_IMAGE:-bare metal}, run dir ${RUN_DIR}"
}

navil_srun() {  # navil_srun CMD [ARG...]: CMD on every task; exit status of the step
  local requeue=0 status pid
  # The task's shell ignores the stop signals and execs CMD: ignored signals stay ignored
  # across exec, so only processes that install a handler (the training ranks) react.
  # shellcheck disable=SC2016  # $@ expands in the task's shell
  "${NAVIL_SRUN[@]}" bash -c 'trap "" USR1 TERM; exec "$@"' navil-task "$@" &
  pid=$!
  trap 'echo "navil: SIGUSR1 (time limit near): checkpoint and requeue"; requeue=1; kill -USR1 "$pid"' USR1
  trap 'echo "navil: SIGTERM: waiting for the checkpoint"' TERM
  if [ "$navil_early_signal" = 1 ]; then  # (ranks that are not training yet ignore it)
    echo "navil: SIGUSR1 came before the step started: passing it on now"
    requeue=1
    kill -USR1 "$pid"
  fi
  while :; do
    status=0
    wait "$pid" || status=$?  # (not a failure under set -e: the caller's status is ours)
    kill -0 "$pid" 2> /dev/null || break  # else a trapped signal interrupted the wait
  done
  trap - USR1 TERM
  if [ "$requeue" = 1 ] && [ "$status" = 0 ]; then
    echo "navil: requeueing job $SLURM_JOB_ID; it resumes from $RUN_DIR/ckpt"
    scontrol requeue "$SLURM_JOB_ID"
  fi
  return "$status"
}
