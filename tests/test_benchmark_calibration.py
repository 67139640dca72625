"""Smoke test of benchmarks/calibration.py --quick: every part runs, the JSON holds the tables, and the
default ARIA rule behaves as the full benchmark says (stays put on the null, moves on real excess)."""

from __future__ import annotations

import importlib
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")


def _calibration():
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    return importlib.import_module("calibration")


def test_calibration_quick(tmp_path):
    res = _calibration().main(["--quick", "--workers", "1", "--out_dir", str(tmp_path)])
    data = json.loads((tmp_path / "calibration_quick.json").read_text())
    assert data["command"].startswith("python benchmarks/calibration.py --quick")
    assert set(data["tables"]) == {"se", "null", "power", "drift", "response", "reliability"}
    assert data["args"]["policies"] == ["aria", "aria_zscore", "rc"]
    by = {(r["part"], r.get("spec"), r.get("k")): r for r in res["results"] if r["part"] != "se"}
    # 400 steps: the default stays within its null bounds, the previous z-score rule does not
    assert by[("null", "aria", 256)]["tv"] < 0.05 and by[("null", "aria_zscore", 256)]["tv"] > 0.3
    assert by[("null", "rc", 256)]["tv"] < 1e-12
    # power runs with the reducibility test off (its regions never get easier)
    assert by[("power", "aria:stall_draws=null", 256)]["lift"] > 1.2
    # the response part: the unlearnable region is held back, the learnable one boosted
    resp = by[("response", "aria", 64)]
    assert resp["unlearnable_max"] <= 4.0 + 1e-9 and resp["learnable_peak"] > 1.5
    # 400 steps are short for two parts the full benchmark (2,000 steps) meets: the response part's learnable
    # region is not learnt yet, and a 1.2x difference at 1,024 leaves becomes credible only after ~180 steps
    # (each leaf judged against its own noise), so its second-half mean falls short of 1.3x
    assert all(line.startswith(("response", "power: | aria | 1024 |")) for line in res["missed"])
    assert by[("power", "aria:stall_draws=null", 1024)]["first_step"] is not None  # it is found, later
    # split-half reliability: the halves agree where regions differ, and not where nothing differs
    rel = {r["factor"]: r for r in res["results"] if r["part"] == "reliability"}
    assert rel[1.5]["r_halves"] > 0.3 and abs(rel[1.0]["r_halves"]) < 0.45
    assert rel[1.5]["spearman_brown"] > rel[1.5]["r_halves"]
    se = [r for r in res["results"] if r["part"] == "se"]
    assert {r["allocation"] for r in se} == {"uniform", "skewed", "feedback_zscore", "feedback_default"}
    assert all(0.5 < r["ratio_raw"] < 2.0 for r in se)


def test_spec_parsing_routes_tracker_and_policy_settings():
    c = _calibration()
    name, pol, trk = c.parse_spec("aria:tau=0.2,max_ratio=null,half_life=100,samples_per_half_life=null")
    assert name == "aria" and pol == {"tau": 0.2, "max_ratio": None}
    assert trk == {"half_life": 100, "samples_per_half_life": None}
    assert c.parse_spec("aria_zscore")[1] == {"score": "zscore", "tau": 0.5, "max_ratio": None}
