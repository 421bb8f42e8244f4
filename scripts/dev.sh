#!/usr/bin/env bash
# One-stop set-up and tasks for llc_fast on a fresh machine (CPU): creates .venv with the pinned
# torch/triton, installs the package, then runs the task.
#   bash scripts/dev.sh demo     # estimate the LLC of a built-in deep linear network
#   bash scripts/dev.sh test     # run the test suite
#   bash scripts/dev.sh setup    # only create/refresh the environment
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
venv="$root/.venv"
py="$venv/bin/python"

setup() {
  if [ ! -x "$py" ]; then
    python3 -m venv "$venv"
  fi
  stamp="$venv/.llc_fast-setup"
  if [ ! -f "$stamp" ] || [ requirements-dev.txt -nt "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    "$py" -m pip install -q --upgrade pip setuptools wheel
    "$py" -m pip install -q torch==2.13.0   # first and pinned, so nothing pulls another torch
    "$py" -m pip install -q -r requirements-dev.txt
    "$py" -m pip install -q --no-build-isolation --no-deps -e .
    # devinterp 1.3.2 for the 1.x compatibility tests: beside, not inside, the venv (2.0.1 is there)
    "$py" -m pip install -q --no-deps --upgrade --target .devinterp1 devinterp==1.3.2 einops==0.8.2 cloudpickle==3.1.2
    touch "$stamp"
  fi
}

task="${1:-test}"
shift || true
setup
case "$task" in
  setup) ;;
  demo) exec "$venv/bin/llc-fast" demo "$@" ;;
  test) exec "$py" -m pytest -q "$@" ;;
  *) echo "usage: bash scripts/dev.sh {demo|test|setup} [args...]" >&2; exit 2 ;;
esac
