"""benchmarks/soak.py exits 1 when a criterion it states is missed (its verdict, on recorded results)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _soak():
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import soak

    return soak


def test_the_recorded_soak_passes_and_each_missed_criterion_fails():
    soak = _soak()
    good = json.loads((BENCH / "results" / "soak.json").read_text())
    assert soak.failures(good) == []
    cases = {
        "did not finish": {"hung": True},
        "exited with code 1": {"returncode": 1},
        "299 of 300 steps": {"global_step": 299},
        "ARIA states differ": {"same_aria_state_on_all_ranks": False},
        "grew 9.00 MB": {"ranks": [{**good["ranks"][0], "slope_mb_per_100_steps": 9.0}]},
        "grew nan MB": {"ranks": [{**good["ranks"][0], "slope_mb_per_100_steps": float("nan")}]},
        "no memory samples": {"ranks": []},
    }
    for expected, change in cases.items():
        missed = soak.failures({**good, **change})
        assert any(expected in m for m in missed), (expected, missed)
    assert soak.failures({**good, "ranks": [{**good["ranks"][0], "slope_mb_per_100_steps": 9.0}]}, max_slope_mb=10) == []
