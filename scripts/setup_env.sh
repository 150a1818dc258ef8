#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs what the tests and the
# benchmark need: torch 2.14.1 (the CUDA 13.0 build, so the CUDA extension can be compiled
# here even without a GPU), the tools of requirements-test.txt, and this package in editable
# mode. Source it: `source scripts/setup_env.sh`; it leaves the venv activated.
#
# Every step says what it does, and pip's own progress lines (Collecting / Downloading /
# Installing) are shown as they come. Steps whose inputs did not change are skipped: the tools
# when requirements-test.txt is the one last installed, the editable install (which compiles the
# C++ extension) when csrc/, setup.py, pyproject.toml, the torch version and the build switches
# are those of the last build and the library still loads. The stamps live in the venv
# ($venv/.lmfloss-*.stamp), so a fresh venv installs everything. LMFLOSS_REBUILD=1 forces both.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${LMFLOSS_VENV:-$root/.venv}"
step() { echo "setup_env: $*" >&2; }
if [ ! -x "$venv/bin/python" ]; then
  step "creating the virtual environment $venv"
  python3 -m venv "$venv"
fi
# shellcheck disable=SC1091
source "$venv/bin/activate"
# Run pip, streaming its progress lines (without "already satisfied" and the noise about local index
# folders), keeping its exit status.
pip_install() {
  local rc
  set +e
  local noise="is ignored: it is neither|^Requirement already satisfied|^\s*$"
  pip install --progress-bar off "$@" 2>&1 | grep --line-buffered -vE "$noise"
  rc=${PIPESTATUS[0]}
  set -e
  return "$rc"
}
# A hash of the given files' contents (directories: every file under them, in a fixed order)
# and of any extra words.
fingerprint() {
  local extra="$1"
  shift
  {
    printf '%s\n' "$extra"
    find "$@" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  } | sha256sum | cut -d' ' -f1
}
stamp_matches() { [ "${LMFLOSS_REBUILD:-0}" != 1 ] && [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; }

torch_wanted="${LMFLOSS_TORCH:-2.14.1}"
torch_version=$(python -c "import torch; print(torch.__version__)" 2>/dev/null || true)
if [[ "$torch_version" == "$torch_wanted"* ]]; then
  step "torch $torch_version: already installed"
else
  step "installing torch==$torch_wanted (a download of a few GB the first time)"
  pip_install "torch==$torch_wanted"
  torch_version=$(python -c "import torch; print(torch.__version__)")
fi

tools_stamp="$venv/.lmfloss-tools.stamp"
tools_print=$(fingerprint "$torch_wanted" "$root/requirements-test.txt" "$root/requirements-test-nodeps.txt")
if stamp_matches "$tools_stamp" "$tools_print"; then
  step "test and benchmark tools: unchanged since the last install, skipped"
else
  step "installing the test and benchmark tools (requirements-test.txt)"
  pip_install -r "$root/requirements-test.txt"
  pip_install --no-deps -r "$root/requirements-test-nodeps.txt"
  echo "$tools_print" >"$tools_stamp"
fi

# nvcc on PATH may be a wrapper script; point CUDA_HOME at the toolkit it runs.
if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
  real=$(sed -n 's/^exec \(.*\)\/bin\/nvcc.*/\1/p' "$(command -v nvcc)" 2>/dev/null | head -n 1)
  export CUDA_HOME="${real:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}"
fi

build_stamp="$venv/.lmfloss-build.stamp"
switches="torch=$torch_version FORCE_CUDA=${FORCE_CUDA:-} FORCE_ONLY_CPU=${FORCE_ONLY_CPU:-} \
TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-} LMFLOSS_CPU_ARCH=${LMFLOSS_CPU_ARCH:-} CUDA_HOME=${CUDA_HOME:-}"
build_print=$(fingerprint "$switches" "$root/csrc" "$root/setup.py" "$root/pyproject.toml")
# The build must also load: a library that builds but does not load would turn the cpu-backend
# tests into skips.
check_load() {
  python -c "import sys, lmfloss_kernels.ext as e; sys.exit(e.LOAD_ERROR and f'C++ extension not loaded: {e.LOAD_ERROR}')"
}
if stamp_matches "$build_stamp" "$build_print" && (cd "$root" && check_load 2>/dev/null); then
  step "C++ extension: sources, torch and build switches unchanged since the last build, skipped"
else
  step "installing this package in editable mode and compiling the C++ extension (a few minutes)"
  rm -f "$build_stamp"
  (cd "$root" && pip_install --no-build-isolation --no-deps -e .)
  check_load
  echo "$build_print" >"$build_stamp"
fi
step "ready"
set +euo pipefail
