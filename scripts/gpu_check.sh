#!/usr/bin/env bash
# One command for whoever has a GPU: ARIA vs RC distillation steps at SD-1.5 size in bf16, no download.
#   bash scripts/gpu_check.sh            # 512 px; two processes when two or more GPUs are visible
#   bash scripts/gpu_check.sh --lora     # the LoRA student
#   bash scripts/gpu_check.sh --smoke    # the same code on CPU at 64 px (CI)
#   bash scripts/gpu_check.sh --family sdxl   # SDXL-base size (also pixart, sd3), 1024 px
# Extra flags go to benchmarks/gpu_check.py (--steps, --batch_size, --resolution, ...).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/bootstrap.sh"
cd "$ROOT/benchmarks"
gpus=0
if [[ " $* " != *" --smoke "* ]] && command -v nvidia-smi >/dev/null 2>&1; then
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c "^GPU" || true)
fi
if (( gpus >= 2 )); then
  exec python -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 \
    --mixed_precision bf16 --dynamo_backend no gpu_check.py "$@"
fi
exec python gpu_check.py "$@"
