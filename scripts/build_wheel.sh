#!/usr/bin/env bash
# Builds a binary wheel of lmfloss-kernels against the torch of the active Python.
#
#   bash scripts/build_wheel.sh                 # CUDA wheel: sm_80, sm_86, sm_89, sm_90 + PTX of compute_90
#   bash scripts/build_wheel.sh --cpu           # CPU-only wheel from the same sources
#   bash scripts/build_wheel.sh --arch-list "9.0+PTX" --out /tmp/wheels --check
#
# Options:
#   --cpu              no CUDA kernels (FORCE_ONLY_CPU=1); local label "+cputorch2.14" instead of "+cu130torch2.14"
#   --arch-list LIST   TORCH_CUDA_ARCH_LIST syntax (default: $TORCH_CUDA_ARCH_LIST, else 8.0;8.6;8.9;9.0+PTX)
#   --out DIR          where the wheel (and its build log) goes (default: dist/)
#   --check            then run scripts/check_wheel.py on it, expecting exactly these targets
# Environment:
#   PYTHON             the interpreter whose torch the wheel is built against (default: python)
#   CUDA_HOME          the CUDA toolkit (default: the one the `nvcc` on PATH runs)
#   MAX_JOBS           parallel compile jobs (default, by setup.py: min(cores, available memory / 2 GiB))
#   LMFLOSS_CPU_ARCH   -march of the CPU kernels (default on x86_64: x86-64-v3, i.e. AVX2/FMA CPUs from
#                      2013 on, whatever the build machine; `x86-64` for a wheel that runs on any x86-64)
#   LMFLOSS_LOCAL_VERSION  overrides the computed local version label
#
# The wheel is `pip wheel --no-build-isolation --no-deps` of a copy of the sources (setup.py,
# pyproject.toml, README.md, csrc/, lmfloss_kernels/) in a temporary directory, so it never sees
# the editable build's library or build/ folder, and never writes into the checkout. Its version
# carries a PEP 440 local label naming the CUDA and torch it was built for (0.1.0+cu130torch2.14;
# such wheels belong on a private index or in a wheel folder, PyPI refuses local versions). torch's
# own libraries are not vendored (no auditwheel repair): the library links against the installed
# torch, whose major.minor and CUDA major version must match at run time (the package checks its
# build metadata, lmfloss_kernels/_build_info.json inside the wheel, at import).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python}"
target=cuda
arch_list="${TORCH_CUDA_ARCH_LIST:-8.0;8.6;8.9;9.0+PTX}"
out="$root/dist"
check=0
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) target=cpu ;;
    --arch-list) arch_list="$2"; shift ;;
    --out) out="$2"; shift ;;
    --check) check=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "build_wheel.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$out"
out="$(cd "$out" && pwd)"

versions=$("$python" -c "import torch; print(torch.__version__, torch.version.cuda or 'none')") || {
  echo "build_wheel.sh: $python cannot import torch; install the torch to build against first" >&2
  exit 1
}
read -r torch_version torch_cuda <<<"$versions"
torch_mm=$(echo "$torch_version" | sed -E 's/^([0-9]+\.[0-9]+).*/\1/')
if [ "$target" = cuda ]; then
  if [ "$torch_cuda" = none ]; then
    echo "build_wheel.sh: torch $torch_version is a CPU build; a CUDA wheel needs a CUDA build of torch (or use --cpu)" >&2
    exit 1
  fi
  if [ -z "${CUDA_HOME:-}" ] && command -v nvcc >/dev/null 2>&1; then
    # The nvcc on PATH may be a wrapper script that execs the toolkit's nvcc.
    real=$(sed -n 's/^exec \(.*\)\/bin\/nvcc.*/\1/p' "$(command -v nvcc)" 2>/dev/null | head -n 1)
    CUDA_HOME="${real:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}"
  fi
  if [ -z "${CUDA_HOME:-}" ] || [ ! -x "$CUDA_HOME/bin/nvcc" ]; then
    echo "build_wheel.sh: no CUDA toolkit: set CUDA_HOME to a toolkit with bin/nvcc (CUDA $torch_cuda for this torch)" >&2
    exit 1
  fi
  export CUDA_HOME FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch_list"
  unset FORCE_ONLY_CPU
  label="cu${torch_cuda//./}torch${torch_mm}"
else
  export FORCE_ONLY_CPU=1
  unset FORCE_CUDA TORCH_CUDA_ARCH_LIST
  label="cputorch${torch_mm}"
fi
export LMFLOSS_LOCAL_VERSION="${LMFLOSS_LOCAL_VERSION:-$label}"
if [ -z "${LMFLOSS_CPU_ARCH:-}" ] && [ "$(uname -m)" = x86_64 ]; then
  export LMFLOSS_CPU_ARCH=x86-64-v3
fi
in_git=0
git -C "$root" rev-parse --git-dir >/dev/null 2>&1 && in_git=1
if [ "$in_git" = 1 ]; then
  revision=$(git -C "$root" rev-parse --short=12 HEAD)
  git -C "$root" diff --quiet HEAD -- setup.py pyproject.toml csrc lmfloss_kernels || revision="$revision+dirty"
  export LMFLOSS_SOURCE_REVISION="$revision"
fi

stage=$(mktemp -d "${TMPDIR:-/tmp}/lmfloss-wheel.XXXXXX")
built=$(mktemp -d "${TMPDIR:-/tmp}/lmfloss-wheel-out.XXXXXX")
trap 'rm -rf "$stage" "$built"' EXIT
sources=(setup.py pyproject.toml README.md csrc lmfloss_kernels)
if [ "$in_git" = 1 ]; then
  # Tracked and new (not ignored) files: no editable-build library, no caches, no scratch output.
  files=()
  while IFS= read -r -d '' file; do
    [ -e "$root/$file" ] && files+=("$file")
  done < <(git -C "$root" ls-files -z --cached --others --exclude-standard -- "${sources[@]}")
  tar -C "$root" -cf - "${files[@]}" | tar -C "$stage" -xf -
else
  tar -C "$root" --exclude='*.so' --exclude='__pycache__' --exclude='_build_info.json' -cf - "${sources[@]}" |
    tar -C "$stage" -xf -
fi

log="$out/build-$LMFLOSS_LOCAL_VERSION.log"
echo "building lmfloss-kernels+$LMFLOSS_LOCAL_VERSION: torch $torch_version, target $target${TORCH_CUDA_ARCH_LIST:+" (archs $TORCH_CUDA_ARCH_LIST)"}," \
  "MAX_JOBS=${MAX_JOBS:-auto}, -march=${LMFLOSS_CPU_ARCH:-default}, source ${LMFLOSS_SOURCE_REVISION:-unknown}; log: $log"
start=$SECONDS
if ! (cd "$stage" && "$python" -m pip wheel --no-build-isolation --no-deps --no-cache-dir -v -w "$built" .) >"$log" 2>&1; then
  tail -n 60 "$log" >&2
  echo "build_wheel.sh: the build failed after $((SECONDS - start)) s; full log: $log" >&2
  exit 1
fi
wheel=$(find "$built" -name 'lmfloss_kernels-*.whl' | head -n 1)
mv -f "$wheel" "$out/"
wheel="$out/$(basename "$wheel")"
echo "built $wheel ($(du -h "$wheel" | cut -f1)) in $((SECONDS - start)) s"

if [ "$check" = 1 ]; then
  if [ "$target" = cuda ]; then
    "$python" "$root/scripts/check_wheel.py" "$wheel" --arch-list "$TORCH_CUDA_ARCH_LIST"
  else
    "$python" "$root/scripts/check_wheel.py" "$wheel" --cpu-only
  fi
fi
