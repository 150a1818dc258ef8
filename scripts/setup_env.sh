#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs what the tests and the
# benchmark need: torch 2.14.1 (the CUDA 13.0 build, so the CUDA extension can be compiled
# here even without a GPU), the tools of requirements-test.txt, and this package in editable
# mode. Source it: `source scripts/setup_env.sh`; it leaves the venv activated.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LMFLOSS_VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
# shellcheck disable=SC1091
source "$venv/bin/activate"
# Run a command, hiding pip's noise about local index folders, keeping its exit status.
quiet() {
  local log rc=0
  log=$(mktemp)
  "$@" >"$log" 2>&1 || rc=$?
  grep -vE "is ignored: it is neither|^\s*$" "$log" || true
  rm -f "$log"
  return "$rc"
}
python -c "import torch; assert torch.__version__.startswith('${LMFLOSS_TORCH:-2.14.1}')" 2>/dev/null \
  || quiet pip install -q "torch==${LMFLOSS_TORCH:-2.14.1}"
quiet pip install -q -r "$root/requirements-test.txt"
quiet pip install -q --no-deps -r "$root/requirements-test-nodeps.txt"
# nvcc on PATH may be a wrapper script; point CUDA_HOME at the toolkit it runs.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  real=$(sed -n 's/^exec \(.*\)\/bin\/nvcc.*/\1/p' "$(command -v nvcc)" 2>/dev/null | head -n 1)
  export CUDA_HOME="${real:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}"
fi
(cd "$root" && quiet pip install -q --no-build-isolation --no-deps -e .)
# The build must also load: a library that builds but does not load would turn the cpu-backend
# tests into skips.
python -c "import sys, lmfloss_kernels.ext as e; sys.exit(e.LOAD_ERROR and f'C++ extension not loaded: {e.LOAD_ERROR}')"
set +euo pipefail
