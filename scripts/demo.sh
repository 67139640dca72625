#!/usr/bin/env bash
# The README's main command: installs what it needs, then runs the embedded default on the CPU, offline:
# a tiny teacher (trained once, then cached), the built-in prompt pool, regions, and an ARIA distillation.
# Extra arguments go to `diffusers-aria demo` (e.g. --max_train_steps 100); after `--`, to the training script.
# The README's demo pictures and figures: `python scripts/demo_figures.py outputs/demo --readme README.md` after it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/bootstrap.sh"
cd "$ROOT"
exec diffusers-aria demo --output_dir outputs/demo "$@"
