#!/usr/bin/env bash
# The main job: sets up the environment and runs the benchmark suite on whatever device is here:
# every loss provider side by side, the MONAI / nnU-Net drop-in criteria against the libraries'
# own classes, and last the per-call overhead table (bench/overhead.py: every criterion against
# F.cross_entropy on small inputs). Arguments go to the runner (`bash scripts/bench.sh --help`).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup_env.sh" || exit 1
cd "$root" || exit 1
exec python -m bench "$@"
