#!/usr/bin/env bash
# The README's test command: installs what it needs, then runs the whole test suite offline on the CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
python -m pytest -q -p no:cacheprovider "$@" tests
