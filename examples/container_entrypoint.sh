#!/usr/bin/env bash
# The Docker image's entry point (see Dockerfile and docs/cluster.md):
#   docker run IMAGE pretrain_navil_2b.sh [ARGS]   runs examples/pretrain_navil_2b.sh ("pretrain_navil_2b"
#                                                   without .sh works too)
#   docker run IMAGE python -m megatron_navil.train ...   any other command runs as given
#   docker run IMAGE                                the environment report and the examples
# pyxis/enroot (srun --container-image) skips the entry point; the SLURM scripts name what to run.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
if [ $# -eq 0 ]; then
  python -m megatron_navil.env
  echo
  echo "examples (docker run IMAGE NAME [ARGS]):"
  find "$here" -maxdepth 1 -name '*.sh' ! -name "$(basename "$0")" -printf '  %f\n' | sort
  exit 0
fi
name=$1
shift
for candidate in "$here/$name" "$here/$name.sh"; do
  if [[ $name != */* ]] && [ -f "$candidate" ]; then
    exec bash "$candidate" "$@"
  fi
done
exec "$name" "$@"
