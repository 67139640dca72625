"""scripts/gpu_check.sh --smoke: the GPU check's code (SD-1.5-shaped teacher from configs, bk_small student, bf16
autocast, interleaved ARIA and RC steps) run on CPU at 64 px, as CI runs it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_gpu_check_smoke(tmp_path, lora):
    cmd = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--smoke", "--out_dir", str(tmp_path)] + (["--lora"] if lora else [])
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    rec = json.loads((tmp_path / ("gpu_check_smoke" + ("_lora" if lora else "") + ".json")).read_text())
    assert rec["mixed_precision"] == "bf16" and rec["resolution"] == 64 and rec["num_processes"] == 1
    assert rec["feature_pairs"] > 0 and rec["step_ms"]["aria"]["n"] == rec["step_ms"]["rc"]["n"] == 3
    assert 0.2 < rec["ratio_aria_rc"] < 5 and rec["samples_per_s"]["aria"] > 0
    if lora:
        assert rec["student_trainable_params"] < rec["student_params"] / 5
    else:
        assert rec["student_trainable_params"] == rec["student_params"]
    assert "ARIA/RC step time" in res.stdout
