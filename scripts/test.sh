#!/usr/bin/env bash
# The README's test command: installs what it needs, then runs the whole test suite offline on the CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
# -rs: the reason of every skipped test is printed at the end. -n 2 --dist loadfile --no-loadscope-reorder: two
# pytest workers, each given a whole test file at a time (a file's fixtures are built once) in the order of
# tests/conftest.py (the files of end-to-end runs first, so that both workers end on short files).
# `bash scripts/test.sh -n 0` runs in one process.
python -m pytest -q -rs -p no:cacheprovider -n 2 --dist loadfile --no-loadscope-reorder "$@" tests
