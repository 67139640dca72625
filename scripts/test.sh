#!/usr/bin/env bash
# The README's test command: installs what it needs, then runs the whole test suite offline on the CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
# -rs: the reason of every skipped test is printed at the end
python -m pytest -q -rs -p no:cacheprovider "$@" tests
