#!/usr/bin/env bash
# The test command: sets up the environment (scripts/setup_env.sh) and runs the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k unified -x`.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup_env.sh" || exit 1
cd "$root" && python -m pytest -q -p no:cacheprovider "$@"
