#!/usr/bin/env bash
# The README's test command: install what is needed (scripts/install.sh, a no-op when nothing
# changed), then every test tier: unit, distributed (multi-process gloo) and e2e. Extra
# arguments go to pytest (e.g. `bash scripts/test.sh tests/unit -x`).
# `--fast` (first argument) runs only the tests not marked `slow` (`-m "not slow"`: no
# distributed/e2e tier, no test that spawns processes or takes more than a few seconds); see
# docs/testing.md for what is slow and the fast lane's time.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
select=()
if [ "${1:-}" = "--fast" ]; then
  shift
  select=(-m "not slow")
fi
bash scripts/install.sh "$venv"
py=$venv/bin/python
[ "${NAVIL_SYSTEM_INSTALL:-0}" = 1 ] && py=python3  # the container image (see install.sh)
export OMP_NUM_THREADS=1
status=0
"$py" -m pytest -q --durations=15 "${select[@]}" "${@:-tests}" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure" >&2
fi
exit "$status"
