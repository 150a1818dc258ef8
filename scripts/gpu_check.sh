#!/usr/bin/env bash
# The GPU checks, for a session that is lent a GPU machine: one device command of under 500 s.
#
#   bash scripts/gpu_check.sh              # on the GPU machine, from the repository root
#   bash scripts/gpu_check.sh --dry-run    # anywhere (GPU_CHECK_DRY=1 too): checks the script's own plumbing
#
# Steps, each under its own time limit and all inside GPU_CHECK_BUDGET seconds (default 470; a
# step gets at most what is left of it):
#   versions        interpreter, torch / triton / CUDA / GPU / nvcc / ncu versions, git commit
#   build           the C++/CUDA extension built in place for this GPU's architecture
#                   (setup.py build_ext --inplace: no pip, no package index; CUDA_HOME below)
#   gpu_tests       pytest -m gpu (the cuda backend, > 2**31 elements, autocast, determinism, probes)
#   triton_tests    the Triton and CALF suites, compiled for the GPU (the sigmoid mode's last)
#   traffic         one forward + backward of the headline losses (Unified Focal bf16 + uint8 at
#                   2x4x192^3, LMF rows 1M x 8 bf16), triton and cuda, against a copy of the same bytes
#   ncu             Nsight Compute's DRAM bytes read / written and kernel time of the same calls
#                   (bench/traffic.py: bytes over the ideal one-pass bytes, share of copy bandwidth)
#   bench_headline  python -m bench at the headline sizes; bench_sweep: the smaller sizes
#   bench_dropin    the MONAI / nnU-Net drop-in criteria at 2x4x128^3 (2x3x128^3 multi-hot), ours
#                   (rows marked when they delegated; MONAI is absent there: no library rows), then
#                   the per-call overhead table; last, so that it never takes the headline rows' time
# A step that fails or times out does not stop the next ones. pytest gets SIGINT at its limit, so
# it still prints the failures so far; the benchmark writes its rows as they are measured.
#
# Results: after EVERY step, and on every exit (trap), $OUT (the device tool's folder; else
# bench/results/gpu_check) receives gpu_check.tgz (every log, versions.txt, summary.tsv, the
# benchmark and traffic results so far), plus summary.tsv and versions.txt beside it. A command
# killed outright (SIGKILL at the device's limit) still leaves the archive of its finished steps.
# Unpack it under bench/results/ and commit it.
#
# Environment: PYTHON (default python3); CUDA_HOME (kept when it holds bin/nvcc; else
# /usr/local/cuda when it does; else the toolkit a wrapper `nvcc` on PATH execs; else nvcc's
# real path); GPU_CHECK_BUDGET (seconds); GPU_CHECK_STEPS (comma-separated subset of the steps).
# Test hooks, dry mode only: GPU_CHECK_INJECT="step=fail,step=hang,step=stall" replaces a step
# by `false`, by a sleep under a 2 s limit (a timeout), or by a sleep under the step's own limit.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root" || exit 1

dry="${GPU_CHECK_DRY:-0}"
for arg in "$@"; do
  case "$arg" in
    --dry-run) dry=1 ;;
    *) echo "usage: bash scripts/gpu_check.sh [--dry-run]" >&2; exit 2 ;;
  esac
done
[ "$dry" = 1 ] || GPU_CHECK_INJECT=""

out="${OUT:-$root/bench/results/gpu_check}"
work="$(mktemp -d)"
python="${PYTHON:-python3}"
budget="${GPU_CHECK_BUDGET:-470}"
started=$SECONDS
status=0
export PYTHONUNBUFFERED=1 PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
printf 'step\texit\tseconds\tlimit\tnote\n' >"$work/summary.tsv"

pack() {  # the archive of everything so far, renamed into place (a kill mid-write leaves the last one)
  mkdir -p "$out" || return
  tar czf "$out/gpu_check.tgz.part" -C "$work" . && mv -f "$out/gpu_check.tgz.part" "$out/gpu_check.tgz"
  cp -f "$work/summary.tsv" "$out/summary.tsv"
  [ -f "$work/versions.txt" ] && cp -f "$work/versions.txt" "$out/versions.txt"
}

finish() {
  local rc=$?
  [ "$rc" -eq 0 ] || [ "$status" -ne 0 ] || status=$rc
  printf 'end\t%s\t%s\t%s\t%s\n' "$status" "$((SECONDS - started))" "$budget" "${ending:-finished}" >>"$work/summary.tsv"
  pack
  echo "results: $out/gpu_check.tgz (exit $status)"
  cat "$work/summary.tsv"
  rm -rf "$work"
  exit "$status"
}
on_signal() {  # stop the step in flight (timeout passes the signal to its process group), then pack
  ending="interrupted ($1)" status=$2
  if [ -n "${child:-}" ]; then
    kill -TERM "$child" 2>/dev/null
    wait "$child"
    printf '%s\t%s\t%s\t%s\t%s\n' "$current" "$2" "$((SECONDS - begin))" "-" "interrupted by $1" >>"$work/summary.tsv"
  fi
  exit "$2"
}
child=""
trap finish EXIT
trap 'on_signal SIGINT 130' INT
trap 'on_signal SIGTERM 143' TERM

wanted() { [ -z "${GPU_CHECK_STEPS:-}" ] || [[ ",$GPU_CHECK_STEPS," == *",$1,"* ]]; }

step() {  # step NAME LIMIT SIGNAL COMMAND...: run under min(LIMIT, budget left), log, record, pack
  local name=$1 limit=$2 signal=$3 rc note="" left
  shift 3
  wanted "$name" || return 0
  case ",${GPU_CHECK_INJECT:-}," in
    *",$name=fail,"*) set -- false; note="injected failure" ;;
    *",$name=hang,"*) set -- sleep 600; limit=2; note="injected hang" ;;
    *",$name=stall,"*) set -- sleep 600; note="injected stall" ;;
  esac
  left=$((budget - (SECONDS - started) - 5))
  if [ "$left" -lt 10 ]; then
    printf '%s\tskipped\t0\t%s\tno time left in the budget\n' "$name" "$limit" >>"$work/summary.tsv"
    echo "== $name: skipped, ${left}s left of the ${budget}s budget"
    pack
    return 0
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit}s): $*"
  begin=$SECONDS current=$name
  # In the background, so that a signal to this script runs its trap at once (bash defers traps
  # while a foreground command runs); timeout gives the command its own process group and signals
  # all of it (compilers, ncu's target) at the limit, SIGINT first for pytest's summary.
  timeout -s "$signal" -k 10 "$limit" "$@" >"$work/$name.log" 2>&1 &
  child=$!
  wait "$child"
  rc=$?
  child=""
  [ "$rc" -ne 124 ] && [ "$rc" -ne 137 ] || note="${note:+$note; }timed out after ${limit}s"
  tail -n 25 "$work/$name.log"
  echo "== $name: exit $rc after $((SECONDS - begin))s"
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - begin))" "$limit" "$note" >>"$work/summary.tsv"
  [ "$rc" -eq 0 ] || status=$rc
  pack
  return 0
}

# ---------------------------------------------------------------------------------------- set-up

if ! command -v "$python" >/dev/null 2>&1; then
  ending="no interpreter: '$python' not found (set PYTHON)"
  echo "$ending" | tee "$work/versions.txt" >&2
  status=127
  exit 127
fi

# The CUDA toolkit the build links against. A wrapper `nvcc` (a script that execs the real one)
# must not make CUDA_HOME its own prefix: that has no lib64/libcudart and the link fails.
cuda_candidate="${GPU_CHECK_CUDA_CANDIDATE:-/usr/local/cuda}"
if [ -n "${CUDA_HOME:-}" ] && [ -x "$CUDA_HOME/bin/nvcc" ]; then
  cuda_from="CUDA_HOME as given"
elif [ -x "$cuda_candidate/bin/nvcc" ]; then
  CUDA_HOME="$cuda_candidate" cuda_from="$cuda_candidate"
elif nvcc_path="$(command -v nvcc)"; then
  wrapped="$(sed -n 's/^exec \(.*\)\/bin\/nvcc.*/\1/p' "$nvcc_path" 2>/dev/null | head -n 1)"
  if [ -n "$wrapped" ]; then
    CUDA_HOME="$wrapped" cuda_from="the wrapper $nvcc_path"
  else
    CUDA_HOME="$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")" cuda_from="the real path of $nvcc_path"
  fi
else
  CUDA_HOME="" cuda_from="no nvcc found"
fi
export CUDA_HOME

versions() {
  {
    echo "mode $([ "$dry" = 1 ] && echo dry-run || echo gpu)"
    echo "interpreter $(command -v "$python")"
    echo "CUDA_HOME ${CUDA_HOME:-none} (from $cuda_from)"
    [ -n "$CUDA_HOME" ] && "$CUDA_HOME/bin/nvcc" --version 2>/dev/null | tail -n 1
    echo "ncu ${ncu:-none}"
    [ -n "$ncu" ] && "$ncu" --version 2>/dev/null | tail -n 1
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader 2>/dev/null
    "$python" - <<'EOF'
import datetime, platform, subprocess, torch
print("date", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton
    print("triton", triton.__version__)
except ImportError as error:
    print("triton missing:", error)
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
else:
    print("device none (torch.cuda.is_available() is False)")
print("commit", subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip())
print("changes", subprocess.run(["git", "status", "--short"], capture_output=True, text=True).stdout.strip() or "none")
EOF
  } >"$work/versions.txt" 2>&1
  local rc=$?
  cat "$work/versions.txt"
  return $rc
}

ncu="$(command -v ncu || true)"
for candidate in "${CUDA_HOME:-/nonexistent}/bin/ncu" /opt/nvidia/nsight-compute/*/ncu; do
  [ -n "$ncu" ] || { [ -x "$candidate" ] && ncu=$candidate; }
done
[ "$dry" = 1 ] && ncu=""  # no counters without a GPU: the dry run checks the plumbing around ncu

export -f versions
export work python dry CUDA_HOME cuda_from ncu
step versions 20 TERM bash -c versions

# The sigmoid (multi-label) suite last: should the step's limit cut it short, the others have run.
triton_suites=(tests/test_triton_ops.py tests/test_triton_rows.py tests/test_triton_regions.py
  tests/test_calf_transforms.py tests/test_calf_stats.py tests/test_triton_sigmoid.py)
pytest_flags=(-p no:cacheprovider -q -rfE --maxfail=200)
cases="ufl_bf16_u8_192 lmf_rows_bf16_1M"

ncu_step() {  # Nsight Compute over each headline case and backend, then the summary against the ideal bytes
  local case backend
  mkdir -p "$work/ncu"
  if [ "$dry" = 1 ]; then  # the profiled program once per kind (a copy, a loss), without ncu
    for backend in copy cpu; do
      "$python" -m bench.traffic profile "${cases%% *}" "$backend" --device cpu --small || return
    done
    "$python" -m bench.traffic summarize --small --ncu-dir "$work/ncu" --out "$work/ncu/dram.json"
    return
  fi
  [ -n "$ncu" ] || { echo "ncu not found: no DRAM counters (the traffic step has the copy-bandwidth share)"; return 1; }
  for case in $cases; do
    for backend in copy triton cuda; do
      "$ncu" --clock-control none --profile-from-start off --csv --print-units base \
        --metrics dram__bytes_read.sum,dram__bytes_write.sum,gpu__time_duration.sum \
        --log-file "$work/ncu/ncu_${case}_${backend}.csv" \
        "$python" -m bench.traffic profile "$case" "$backend" || echo "ncu failed on $case $backend"
      if ! grep -q '^"ID"' "$work/ncu/ncu_${case}_${backend}.csv" 2>/dev/null; then
        # No counters at all (a gVisor machine says "Failed to initialize the profiler"): the
        # other calls would fail alike, so the time goes to the next steps.
        cat "$work/ncu/ncu_${case}_${backend}.csv" 2>/dev/null | tail -n 20
        echo "ncu read no metrics for $case $backend: stopping this step"
        return 1
      fi
    done
  done
  "$python" -m bench.traffic summarize --ncu-dir "$work/ncu" --out "$work/ncu/dram.json"
}
export -f ncu_step

build_step() {  # the extension in place, then a check that it loads (a library that builds but
  # does not load would turn the cuda-backend tests into skips)
  "$python" setup.py build_ext --inplace || return
  "$python" -c "import sys, lmfloss_kernels.ext as e; print('extension', e.LOAD_ERROR or 'loads'); sys.exit(bool(e.LOAD_ERROR))"
}
export -f build_step
export cases

if [ "$dry" = 1 ]; then
  # Each step in a trivial form that exercises its interpreter, imports and output paths.
  step build 60 TERM "$python" -c "import setuptools, torch.utils.cpp_extension; print('build tools import')"
  step gpu_tests 120 INT "$python" -m pytest "${pytest_flags[@]}" --collect-only -m gpu tests/test_hardening_numerics.py
  step triton_tests 120 INT "$python" -m pytest "${pytest_flags[@]}" --collect-only "${triton_suites[@]}"
  step traffic 120 TERM "$python" -m bench.traffic time --device cpu --small --backends cpu --out "$work/traffic.json"
  step ncu 120 TERM bash -c ncu_step
  step bench_headline 120 TERM "$python" -m bench --quick --device cpu --threads 1 --providers eager \
    --losses lmf_rows --dtypes fp32 --modes forward --no-plots --no-overhead --out "$work/bench_headline"
  step bench_sweep 120 TERM "$python" -m bench --quick --device cpu --threads 1 --providers eager \
    --losses ufl_asym --sizes 8 --modes forward --no-plots --no-overhead --out "$work/bench_sweep"
  step bench_dropin 120 TERM "$python" -m bench --quick --device cpu --threads 1 --providers cpu,triton,cuda \
    --losses monai_dice_ce,monai_dice_sigmoid --sizes 8 --modes forward --no-plots --overhead-calls 2 \
    --out "$work/bench_dropin"
else
  arch=$("$python" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())" 2>/dev/null || echo 9.0)
  step build 140 TERM env FORCE_CUDA=1 TORCH_CUDA_ARCH_LIST="$arch" MAX_JOBS="$(nproc)" bash -c build_step
  step gpu_tests 60 INT "$python" -m pytest "${pytest_flags[@]}" -m gpu tests
  step triton_tests 70 INT "$python" -m pytest "${pytest_flags[@]}" "${triton_suites[@]}"
  step traffic 30 TERM "$python" -m bench.traffic time --out "$work/traffic.json"
  step ncu 55 TERM bash -c ncu_step
  bench=("$python" -m bench --device cuda --dtypes bf16 --targets labels --modes full,forward --budget 0.2
    --providers triton,cuda,eager,compile --classes 4,8 --no-overhead)
  step bench_headline 60 TERM "${bench[@]}" --losses ufl_asym,lmf_rows --sizes 192 --rows 1M \
    --out "$work/bench_headline"
  step bench_sweep 25 TERM "${bench[@]}" --losses ufl_asym,dense_lmf,lmf_rows --sizes 128 --rows 64k \
    --no-plots --out "$work/bench_sweep"
  # The plan's classes (4, or 3 regions for the sigmoid criteria), fwd+bwd only, no torch.compile
  # (MONAI's class is not there to compile); the overhead stage runs after the rows are written.
  step bench_dropin 35 TERM "$python" -m bench --device cuda --dtypes bf16 --modes full --budget 0.2 \
    --providers triton,cuda,eager,monai,nnunet --sizes 128 --no-plots --overhead-calls 20 \
    --losses monai_dice_ce,monai_dice_sigmoid,monai_dice_focal,monai_dice_focal_sigmoid,nnunet_dc_ce \
    --out "$work/bench_dropin"
fi
