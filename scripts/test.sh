#!/usr/bin/env bash
# The README's test command: installs what it needs, then runs the whole test suite offline on the CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
# -rs: the reason of every skipped test is printed at the end. -n 2 --dist worksteal: two pytest workers (most
# tests are single-threaded Python or subprocess start-up, so two cores run two of them at once); a worker
# that runs out of tests takes queued ones from the other (6-8 min on 2 idle cores; whole files per worker,
# slow files first, took as long: docs/benchmarks-speed.md). `bash scripts/test.sh -n 0` runs in one process.
python -m pytest -q -rs -p no:cacheprovider -n 2 --dist worksteal "$@" tests
