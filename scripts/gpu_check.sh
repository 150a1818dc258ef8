#!/usr/bin/env bash
# The GPU checks, for a session that is lent a GPU machine: one call of about 10 minutes.
#
#   bash scripts/gpu_check.sh        # on the GPU machine, from the repository root
#
# 1. builds the C++/CUDA extension with that machine's own torch, for its GPU's architecture
#    (`pip --no-deps`: the GPU machine reaches no package index, its torch and Triton are used);
# 2. runs the tests that need a GPU (`-m gpu`: the cuda backend, > 2**31 elements, CUDA autocast and
#    determinism, the compiled non-finite probe), then the Triton and CALF suites compiled for the GPU;
# 3. runs the GPU benchmark's headline rows (design.md targets: Unified Focal bf16 + uint8 labels at
#    128^3 and 192^3, LMF rows N = 64k and 1M with C = 8, dense LMF) with every provider present.
# Each step has its own time limit, so a slow step cannot starve the others. Everything it writes
# (build log, test logs, benchmark CSV / JSON / markdown / plots) is packed into one archive,
# $OUT/gpu_check.tgz ($OUT: the device tool's folder; bench/results/gpu_check.tgz elsewhere), to be
# unpacked under bench/results/ and committed.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1
out="${OUT:-$root/bench/results}"
work="$(mktemp -d)"
python="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
export CUDA_HOME="${CUDA_HOME:-$(dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")")}"
status=0

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $work/NAME.log, keep the worst status
  local name=$1 limit=$2 rc
  shift 2
  echo "== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$work/$name.log" 2>&1
  rc=$?
  tail -n 25 "$work/$name.log"
  echo "== $name: exit $rc"
  [ "$rc" -eq 0 ] || status=$rc
  return "$rc"
}

arch=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || exit 1
"$python" - >"$work/versions.txt" <<'EOF'
import datetime, platform, subprocess, torch, triton
print("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
print("python", platform.python_version())
print(subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
EOF
cat "$work/versions.txt"

if step build 300 env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" \
  "$python" -m pip install --no-build-isolation --no-deps --no-index -e .; then
  step gpu_tests 150 "$python" -m pytest -q -p no:cacheprovider -m gpu tests
  step triton_tests 150 "$python" -m pytest -q -p no:cacheprovider -x tests/test_triton_ops.py \
    tests/test_triton_rows.py tests/test_triton_regions.py tests/test_calf_transforms.py tests/test_calf_stats.py
  step bench 180 "$python" -m bench --device cuda --losses ufl_asym,lmf_rows,dense_lmf --sizes 128,192 \
    --rows 64k,1M --classes 4,8 --dtypes bf16 --modes full,forward --budget 0.5 --out "$work/bench"
fi
mkdir -p "$out"
tar czf "$out/gpu_check.tgz" -C "$work" .
echo "results: $out/gpu_check.tgz (exit $status)"
exit "$status"
