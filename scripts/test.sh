#!/usr/bin/env bash
# The README's test command: install what is needed (scripts/install.sh, a no-op when nothing
# changed), then every test tier: unit, distributed (multi-process gloo) and e2e. Extra
# arguments go to pytest (e.g. `bash scripts/test.sh tests/unit -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
bash scripts/install.sh "$venv"
export OMP_NUM_THREADS=1
status=0
"$venv/bin/python" -m pytest -q --durations=15 "${@:-tests}" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
fi
exit "$status"
