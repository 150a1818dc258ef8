#!/usr/bin/env bash
# The main job: sets up the environment and runs the benchmark suite on whatever device is here,
# then the per-call overhead table (bench/overhead.py: every criterion against F.cross_entropy on
# small inputs). Extra arguments go to the suite's runner (`bash scripts/bench.sh --help`).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup_env.sh" || exit 1
cd "$root" || exit 1
python -m bench "$@" || exit $?
calls=200
for arg in "$@"; do
  case "$arg" in
    -h | --help) exit 0 ;;
    --quick) calls=50 ;;
  esac
done
echo "== per-call overhead (python -m bench.overhead --calls $calls)"
python -m bench.overhead --calls "$calls"
