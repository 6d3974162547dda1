#!/usr/bin/env bash
# Create (or reuse) a virtualenv and install megatron_navil with its dev extras, CPU-safe:
# torch==2.13.0 first (the CPU build on disk here; pinning it first means nothing later can
# pull a CUDA torch of several GB), then the package with --no-build-isolation so its C++
# extension builds against that torch instead of one pip would fetch for an isolated build.
# Usage: bash scripts/install.sh [VENV_DIR]   (default .venv; skipped when nothing changed)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${1:-${VENV:-.venv}}
stamp="$venv/.megatron_navil-installed"
want=$(cat setup.py pyproject.toml csrc/*.cpp csrc/*.h scripts/install.sh | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
py="$venv/bin/python"
echo "install: torch 2.13.0 (CPU), build tools, megatron_navil[dev] into $venv"
"$py" -m pip install -q --disable-pip-version-check torch==2.13.0
"$py" -m pip install -q --disable-pip-version-check setuptools wheel pybind11 ninja
"$py" -m pip install -q --disable-pip-version-check --no-build-isolation -e ".[dev]"
"$py" -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
echo "$want" > "$stamp"
