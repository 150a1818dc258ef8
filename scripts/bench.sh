#!/usr/bin/env bash
# The main job: sets up the environment and runs the benchmark suite on whatever device is here.
# Extra arguments go to the runner (`bash scripts/bench.sh --help`).
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup_env.sh" || exit 1
cd "$root" && python -m bench "$@"
