#!/usr/bin/env bash
# Create (or reuse) a virtualenv and install megatron_navil with its dev extras, CPU-safe:
# torch==2.13.0 first (the CPU build on disk here; pinning it first means nothing later can
# pull a CUDA torch of several GB), then the package with --no-build-isolation so its C++
# extension builds against that torch instead of one pip would fetch for an isolated build.
# Usage: bash scripts/install.sh [VENV_DIR]   (default .venv; skipped when nothing changed)
#        bash scripts/install.sh --system     (the Dockerfile: into the current python3, keeping
#                                              its CUDA torch; no venv, no torch pin, no stamp)
# In the container image (NAVIL_SYSTEM_INSTALL=1, set by the Dockerfile) the package was installed
# into the image's python3 at build time: the venv mode is then a no-op (nothing to make).
set -euo pipefail
cd "$(dirname "$0")/.."
system=0
if [ "${1:-}" != "--system" ] && [ "${NAVIL_SYSTEM_INSTALL:-0}" = 1 ]; then
  exit 0
fi
if [ "${1:-}" = "--system" ]; then
  system=1
  py=${PYTHON:-python3}
else
  venv=${1:-${VENV:-.venv}}
  stamp="$venv/.megatron_navil-installed"
  want=$(cat setup.py pyproject.toml csrc/*.cpp csrc/*.h scripts/install.sh | sha256sum | cut -c1-16)
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
  fi
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  py="$venv/bin/python"
fi
# pip here warns once per package about local index folders that do not exist: drop that noise
# (pipefail keeps pip's own exit status).
pip_install() {
  "$py" -m pip install -q --disable-pip-version-check "$@" 2>&1 \
    | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
if [ "$system" = 1 ]; then
  echo "install: build tools, megatron_navil[dev] into $("$py" -c 'import sys; print(sys.prefix)'), keeping its torch"
else
  echo "install: torch 2.13.0 (CPU), build tools, megatron_navil[dev] into $venv"
  pip_install torch==2.13.0
fi
pip_install setuptools wheel pybind11 ninja
pip_install --no-build-isolation -e ".[dev]"
if [ "$system" = 0 ]; then
  "$py" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
  echo "$want" > "$stamp"
fi
