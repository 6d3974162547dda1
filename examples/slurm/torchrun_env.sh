#!/usr/bin/env bash
# SLURM job variables -> torchrun's rendezvous, as environment variables (one torchrun agent per
# SLURM task, normally one task per node). Sourced by examples/slurm/*.sbatch in the batch
# shell (which runs on the job's first node, where scontrol exists even when the training runs
# in a container); run directly it prints the variables, one NAME=value a line.
#
# torchrun reads a default for each of its flags from PET_<FLAG> (PET_NNODES for --nnodes, ...),
# so every torchrun started inside the job's steps gets the c10d rendezvous below, also one that
# a launch script starts with its own flags: flags given on its command line win, except that a
# c10d rendezvous makes --node-rank and --master-addr/--master-port unnecessary (ranks are
# assigned at the rendezvous). MASTER_ADDR/MASTER_PORT/NNODES/GPUS_PER_NODE are exported too,
# for launch scripts that read those.
#
#   NNODES          = SLURM_NTASKS (torchrun agents in the job)
#   GPUS_PER_NODE   = $GPUS_PER_NODE, else SLURM_GPUS_ON_NODE, else the count in
#                     SLURM_GPUS_PER_NODE ("h100:8" -> 8), else 1 (processes per agent)
#   MASTER_ADDR     = $MASTER_ADDR, else the first host of SLURM_JOB_NODELIST (scontrol show
#                     hostnames; without scontrol, "gpu[003-006],x" is parsed to gpu003)
#   MASTER_PORT     = $MASTER_PORT, else 20000 + SLURM_JOB_ID % 20000 (jobs sharing a first
#                     node do not collide)
#   PET_NNODES PET_NPROC_PER_NODE PET_RDZV_BACKEND=c10d PET_RDZV_ENDPOINT=MASTER_ADDR:MASTER_PORT
#   PET_RDZV_ID=SLURM_JOB_ID
# Exit status 2 with a one-line message when a needed SLURM variable is missing or malformed.

# First host of a SLURM hostlist expression without scontrol: "gpu[003-006,010],cpu1" -> gpu003.
navil_first_host() {
  local list=$1 first
  first=${list%%,*}
  if [[ $list == *"["* ]]; then
    local prefix=${list%%\[*} inner=${list#*\[}
    inner=${inner%%\]*}
    inner=${inner%%,*}
    first=$prefix${inner%%-*}
  fi
  printf '%s\n' "$first"
}

navil_torchrun_env() {
  local me="torchrun_env.sh" name
  for name in SLURM_JOB_ID SLURM_NTASKS SLURM_JOB_NODELIST; do
    if [ -z "${!name:-}" ]; then
      echo "$me: $name is not set (run inside a SLURM job: sbatch or salloc)" >&2
      return 2
    fi
  done
  for name in SLURM_JOB_ID SLURM_NTASKS; do
    if ! [[ ${!name} =~ ^[0-9]+$ ]]; then
      echo "$me: $name='${!name}' is not a number" >&2
      return 2
    fi
  done
  local gpus=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
  if [ -z "$gpus" ] && [ -n "${SLURM_GPUS_PER_NODE:-}" ]; then
    gpus=${SLURM_GPUS_PER_NODE##*:}  # "h100:8" or "8"
  fi
  gpus=${gpus:-1}
  if ! [[ $gpus =~ ^[1-9][0-9]*$ ]]; then
    echo "$me: processes per node '$gpus' (GPUS_PER_NODE / SLURM_GPUS_*) is not a positive number" >&2
    return 2
  fi
  local addr=${MASTER_ADDR:-}
  if [ -z "$addr" ]; then
    if command -v scontrol > /dev/null 2>&1; then
      addr=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    else
      addr=$(navil_first_host "$SLURM_JOB_NODELIST")
    fi
  fi
  local port=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  export NNODES=$SLURM_NTASKS GPUS_PER_NODE=$gpus MASTER_ADDR=$addr MASTER_PORT=$port
  export PET_NNODES=$NNODES PET_NPROC_PER_NODE=$gpus PET_RDZV_BACKEND=c10d
  export PET_RDZV_ENDPOINT=$addr:$port PET_RDZV_ID=$SLURM_JOB_ID
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then  # run, not sourced: print the variables
  set -euo pipefail
  navil_torchrun_env || exit $?
  for name in NNODES GPUS_PER_NODE MASTER_ADDR MASTER_PORT PET_NNODES PET_NPROC_PER_NODE \
    PET_RDZV_BACKEND PET_RDZV_ENDPOINT PET_RDZV_ID; do
    printf '%s=%s\n' "$name" "${!name}"
  done
fi
