#!/usr/bin/env bash
# The test command: sets up the environment (scripts/setup_env.sh) and runs the whole suite.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k unified -x`.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
source "$root/scripts/setup_env.sh" || exit 1
# Whole test modules are spread over worker processes (pytest-xdist): most tests are single-threaded
# Python (the Triton interpreter), so a 2-core machine runs the suite in about half the time.
# LMFLOSS_TEST_WORKERS sets how many (0: in this process, as plain pytest); by default one per core,
# at most 4 (each worker holds its own torch and Triton, about 1 GiB).
workers="${LMFLOSS_TEST_WORKERS:-$(nproc 2>/dev/null || echo 1)}"
[ "$workers" -gt 4 ] && workers=4
cd "$root" && python -m pytest -q -p no:cacheprovider -n "$workers" --dist loadfile --no-loadscope-reorder "$@"
