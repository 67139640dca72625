"""The pieces of `diffusers-aria compare` on their own: the concept filter, the evaluation file, the presets
and their cost, the plan, the command lines, the shards, the metrics and the table."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from diffusers_aria.compare import concepts, eval_set, launch, presets, stages, table
from diffusers_aria.utils.errors import UserError

# ------------------------------------------------------------------------------------------ concept filter


def test_default_animal_keywords_match_whole_words_only():
    f = concepts.make_filter()
    assert f.name == "animals" and "giraffe" in f.keywords and "dog" in f.keywords
    assert f.matches_text("Two DOGS playing frisbee") and f.matches_text("a giraffe eating leaves")
    assert f.matched_keyword("A cat on a mat") == "cat"
    for text in ("a hotdog stand", "a catalogue of bearings", "concatenated strings", "a dog-eared book"):
        assert not f.matches_text(text), text


def test_keyword_file_phrases_and_comments(tmp_path):
    (tmp_path / "k.txt").write_text("# vehicles\nfire truck\n\nbus\n")
    f = concepts.make_filter(str(tmp_path / "k.txt"))
    assert f.keywords == ("fire truck", "bus") and f.name == "k.txt"
    assert f.matches_text("a red  fire   truck") and f.matches_text("the Bus stop") and not f.matches_text("a truck")
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(UserError, match="holds no keyword"):
        concepts.make_filter(str(tmp_path / "empty.txt"))
    with pytest.raises(UserError, match="no such file"):
        concepts.make_filter(str(tmp_path / "missing.txt"))


def test_label_column_filter():
    f = concepts.make_filter(column="category", labels=["Dog", "cat"])
    assert f.matches_label("dog") and f.matches_label(["car", "cat"]) and not f.matches_label("car")
    truthy = concepts.make_filter(column="is_animal")
    assert truthy.matches_label(True) and truthy.matches_label("yes") and not truthy.matches_label(0)
    assert "label column 'category'" in f.describe()
    with pytest.raises(UserError, match="pass one of them"):
        concepts.make_filter("k.txt", column="c")
    with pytest.raises(UserError, match="needs --concept_column"):
        concepts.make_filter(labels=["dog"])


# ------------------------------------------------------------------------------------------ evaluation prompts


@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".tsv", ".parquet"])
def test_eval_prompt_files(tmp_path, ext):
    rows = [{"text": f"prompt {i} with a dog" if i % 2 else f"prompt {i}", "file_name": f"{i}.png"} for i in range(6)]
    for r in rows:
        (tmp_path / r["file_name"]).write_bytes(b"png")
    path = tmp_path / f"eval{ext}"
    if ext == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif ext == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        sep = "\t" if ext == ".tsv" else ","
        path.write_text(f"text{sep}file_name\n" + "".join(f"{r['text']}{sep}{r['file_name']}\n" for r in rows))
    got = eval_set.read_eval_prompts(str(path), 4, seed=0, concept=concepts.make_filter())
    assert len(got) == 4 and [r.index for r in got] == [0, 1, 2, 3]
    assert all(r.image == str(tmp_path / f"{r.prompt.split()[1]}.png") for r in got)
    again = eval_set.read_eval_prompts(str(path), 4, seed=0, concept=concepts.make_filter())
    assert [r.prompt for r in again] == [r.prompt for r in got]  # a seeded choice


def test_eval_split_assignment_by_concept_and_coverage():
    rows = [eval_set.EvalRow(0, "a dog on a sofa", region=0), eval_set.EvalRow(1, "a nebula", region=1),
            eval_set.EvalRow(2, "a pizza", region=2), eval_set.EvalRow(3, "a violin", region=1, split="seen")]
    coverage = eval_set.region_coverage(np.array([0, 0, 1, 1, 2, 2]), np.array([0, 2, 2, 2]), 3)
    assert coverage.tolist() == [0.75, 0.0, 2.25]
    eval_set.assign_splits(rows, concepts.make_filter(), coverage, rare_coverage=0.25)
    assert [r.split for r in rows] == ["unseen", "rare", "seen", "seen"]
    assert eval_set.split_counts(rows) == {"seen": 2, "unseen": 1, "rare": 1}


def test_eval_file_errors(tmp_path):
    f = concepts.make_filter()
    (tmp_path / "e.jsonl").write_text(json.dumps({"prompt": "a cat", "split": "hard"}) + "\n")
    with pytest.raises(UserError, match="the splits are seen, unseen, rare"):
        eval_set.read_eval_prompts(str(tmp_path / "e.jsonl"), 5, 0, f, split_column="split", need_images=False)
    with pytest.raises(UserError, match="is not a column"):
        eval_set.read_eval_prompts(str(tmp_path / "e.jsonl"), 5, 0, f, image_column="img")
    (tmp_path / "e.md").write_text("x")
    with pytest.raises(UserError, match="is not a prompt file"):
        eval_set.read_eval_prompts(str(tmp_path / "e.md"), 5, 0, f)
    with pytest.raises(UserError, match="--num_eval_prompts 0"):
        eval_set.read_eval_prompts(str(tmp_path / "e.jsonl"), 0, 0, f, need_images=False)
    with pytest.raises(UserError, match="does not have"):
        eval_set.read_eval_prompts(str(tmp_path / "e.jsonl"), 5, 0, concepts.make_filter(column="label"),
                                   need_images=False)


# ------------------------------------------------------------------------------------------ presets and cost


def test_presets_and_their_cost():
    assert set(presets.PRESETS) == {"smoke", "one-gpu", "paper"}
    paper = presets.get_preset("paper")
    assert paper.train_batch_size * paper.num_processes == 256 and paper.max_train_steps >= 50000
    assert paper.num_eval_prompts == 30000
    one = presets.get_preset("one-gpu")
    assert one.num_processes == 1 and one.resolution == 256 and one.num_eval_prompts == 5000
    cost = presets.nominal_cost(one)
    assert not cost.measured and 1 < cost.total_hours < 10  # "a few hours" on one GPU
    assert "estimate" in cost.describe()
    assert presets.nominal_cost(paper).total_hours > 100
    m = presets.measured_cost(one, step_seconds=2.0, startup_seconds=30.0, num_eval_prompts=100)
    assert m.measured and m.train_hours == pytest.approx((30 + 4000 * 2.0) / 3600)
    assert m.image_seconds == pytest.approx(2 * 25 * 2.0 / (4 * 64))
    assert m.to_json()["total_device_hours"] == pytest.approx(2 * m.train_hours + m.generation_hours)
    with pytest.raises(UserError, match="choose one of smoke, one-gpu, paper"):
        presets.get_preset("huge")


def _args(**kw) -> argparse.Namespace:
    from diffusers_aria.cli import build_parser

    argv = ["compare", "--output_dir", "/tmp/unused-compare"]
    for k, v in kw.items():
        argv += [f"--{k}"] + (list(map(str, v)) if isinstance(v, (list, tuple)) else [str(v)] if v is not True else [])
    return build_parser().parse_args(argv)


OVERRIDE_FLAGS = [("teacher", "/models/t", "--pretrained_model_name_or_path"), ("student_architecture", "bk_base", None),
                  ("resolution", 64, None), ("train_batch_size", 3, None), ("gradient_accumulation_steps", 2, None),
                  ("max_train_steps", 7, None), ("checkpointing_steps", 5, None), ("learning_rate", 0.01, None),
                  ("mixed_precision", "bf16", None), ("report_to", "wandb", None), ("seed", 11, None),
                  ("caption_column", "words", None), ("image_column", "picture", None)]


@pytest.mark.parametrize("flag,value,script_flag", OVERRIDE_FLAGS)
def test_training_flags_reach_both_arms(flag, value, script_flag):
    from diffusers_aria.compare.command import resolve_settings

    _, settings = resolve_settings(_args(**{flag: value}), extra=["--lambda_sd", "0.5"])
    for arm in ("rc", "aria"):
        cmd = launch.training_command(settings, arm, "/out", {"train_data_dir": "/data"}, "/regions", "/pool.txt")
        args = launch.script_args(cmd)
        got = args[args.index(script_flag or f"--{flag}") + 1]
        assert got == str(value), (flag, got)
        assert args[-2:] == ["--lambda_sd", "0.5"]  # what follows `--` goes to both arms


@pytest.mark.parametrize("flag,value", [("num_eval_prompts", 9), ("inference_steps", 3), ("guidance_scale", 1.5),
                                        ("shard_size", 2), ("num_regions", 5), ("fid_features", "clip"),
                                        ("clip_model", "org/clip"), ("timing_steps", 4), ("rare_coverage", 0.1),
                                        ("eval_prompt_column", "p"), ("eval_image_column", "i"),
                                        ("eval_split_column", "s"), ("prompt_pool_column", "c"),
                                        ("dataset_config_name", "cfg"), ("concept_column", "label"),
                                        ("num_processes", 2)])
def test_evaluation_flags_reach_the_plan(flag, value):
    from diffusers_aria.compare.command import resolve_settings

    preset, settings = resolve_settings(_args(**{flag: value}), extra=[])
    assert settings[flag] == value
    if hasattr(preset, flag):
        assert getattr(preset, flag) == value


def test_skip_fid_and_the_preset_flag():
    from diffusers_aria.compare.command import resolve_settings

    assert resolve_settings(_args(skip_fid=True), [])[1]["fid_features"] is None
    assert resolve_settings(_args(), [])[1]["fid_features"] == "clip"  # smoke: the tiny CLIP's image tower
    preset, settings = resolve_settings(_args(preset="paper", train_data_dir="/d", eval_prompts="/e.jsonl"), [])
    assert preset.name == "paper" and settings["teacher"] == "CompVis/stable-diffusion-v1-4"
    assert settings["fid_features"] == "inception" and settings["report_to"] == "tensorboard"
    assert "--gradient_checkpointing" in settings["extra_train_args"]
    _, settings = resolve_settings(_args(concept_keywords="k.txt", concept_labels=["a", "b"], regions_dir="r",
                                         dataset_name="org/data", prompt_pool="org/pool"), [])
    assert settings["concept_labels"] == ["a", "b"] and settings["concept_keywords"] == os.path.abspath("k.txt")
    assert settings["dataset_name"] == "org/data" and settings["prompt_pool"] == "org/pool"
    assert settings["regions_dir"] == os.path.abspath("r")
    with pytest.raises(UserError, match="at least 1"):
        resolve_settings(_args(max_train_steps=0), [])
    with pytest.raises(UserError, match="pass one of them"):
        resolve_settings(_args(train_data_dir="/a", dataset_name="b"), [])
    with pytest.raises(UserError, match="drop it"):
        resolve_settings(_args(), ["--prediction_type", "v_prediction"])


# ------------------------------------------------------------------------------------------ command lines


def test_launch_commands_for_one_and_two_processes():
    one = launch.accelerate_prefix(1, cpu=True)
    assert one[-1] == "--cpu" and "--multi_gpu" not in one
    two = launch.accelerate_prefix(2, "bf16", cpu=True)
    assert two[two.index("--num_processes") + 1] == "2" and "--multi_gpu" in two and "--cpu" not in two
    assert launch.launch_env(cpu=True)["ACCELERATE_USE_CPU"] == "true"
    gen = launch.generation_command({"num_processes": 2, "cpu": True}, "/work")
    assert gen[-3:] == ["-m", "diffusers_aria.compare.generate", "/work"] and "--multi_gpu" in gen
    with pytest.raises(ValueError, match="at least 1"):
        launch.accelerate_prefix(0)
    with pytest.raises(ValueError, match="choose one of rc, aria"):
        launch.training_command({}, "doremi", "/o", {}, "/r", "/p")


def test_cost_watch_times_the_steps_of_a_process(tmp_path):
    from diffusers_aria.compare.command import _watch

    stream = tmp_path / "steps.jsonl"
    code = ("import time, sys\ntime.sleep(0.3)\nfor i in range(5):\n    open(sys.argv[1], 'a').write('{}\\n')\n"
            "    time.sleep(0.25)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(stream)])
    startup, step = _watch(proc, str(stream), timing_steps=3)
    proc.wait()
    assert startup >= 0.25 and 0.15 < step < 0.6


# ------------------------------------------------------------------------------------------ plan and stages


def test_plan_is_written_once_and_checked_on_resume(tmp_path):
    work = stages.WorkFolder(str(tmp_path / "w"))
    assert work.check_or_write_plan({"teacher": "a", "seed": 0}) is False
    assert work.check_or_write_plan({"teacher": "a", "seed": 0, "stop_after": "x"}) is True
    with pytest.raises(UserError, match="teacher 'a' \\(now 'b'\\)"):
        work.check_or_write_plan({"teacher": "b", "seed": 0})
    assert not work.is_done("prepare")
    work.mark_done("prepare", pool="p.txt")
    assert work.is_done("prepare") and work.stage_info("prepare")["pool"] == "p.txt"
    other = stages.WorkFolder(str(tmp_path / "o"))
    os.makedirs(other.root)
    open(other.path("x"), "w").close()
    with pytest.raises(UserError, match="holds no compare_plan.json"):
        other.check_or_write_plan({})
    assert other.check_or_write_plan({}, allowed=frozenset({"x"})) is False
    with pytest.raises(UserError, match="is not a stage"):
        stages.check_stage_name("lunch")


# ------------------------------------------------------------------------------------------ shards


def test_shards_cover_every_prompt_once_for_any_number_of_processes():
    from diffusers_aria.compare.generate import shard_ranges, shards_of_rank

    ranges = shard_ranges(10, 4)
    assert ranges == [(0, 4), (4, 8), (8, 10)]
    for world in (1, 2, 3, 5):
        mine = [k for r in range(world) for k in shards_of_rank(len(ranges), r, world)]
        assert sorted(mine) == [0, 1, 2]
    with pytest.raises(ValueError):
        shard_ranges(3, 0)


def test_two_ranks_generate_disjoint_shards_and_resume(smoke_run):
    """Each rank of a launch generates its own shards; a rank finds a finished shard and skips it."""
    from diffusers_aria.compare.generate import image_path, run_worker, shard_record

    work = smoke_run.work
    saved = {k: open(shard_record(work, "teacher", k)).read() for k in (0, 1)}
    for k in (0, 1):
        os.remove(shard_record(work, "teacher", k))
    try:
        logs: list[str] = []
        done1 = run_worker(work, rank=1, world=2, device="cpu", models=("teacher",), log=logs.append)
        assert done1 == {"teacher": [1]}  # shard 3 of rank 1 is finished and skipped
        done0 = run_worker(work, rank=0, world=2, device="cpu", models=("teacher",), log=logs.append)
        assert done0 == {"teacher": [0]}
        assert run_worker(work, rank=0, world=1, device="cpu", models=("teacher",)) == {"teacher": []}
        assert len(logs) == 2 and os.path.isfile(image_path(work, "teacher", 0))
        for k in (0, 1):
            assert json.load(open(shard_record(work, "teacher", k)))["indices"] == json.loads(saved[k])["indices"]
    finally:
        for k, text in saved.items():
            with open(shard_record(work, "teacher", k), "w") as fh:
                fh.write(text)


def test_generation_entry_point_skips_a_finished_run(smoke_run, capsys):
    from diffusers_aria.compare.generate import main

    assert main([smoke_run.work]) == 0
    assert main([]) == 2


# ------------------------------------------------------------------------------------------ metrics


def test_fid_and_clip_score_with_the_tiny_clip(tiny_clip, smoke_run):
    from diffusers_aria.compare.generate import image_path
    from diffusers_aria.compare.metrics import Scorer

    scorer = Scorer("clip", tiny_clip, image_size=32, device="cpu")
    teacher = [image_path(smoke_run.work, "teacher", i) for i in range(8)]
    student = [image_path(smoke_run.work, "rc", i) for i in range(8)]
    scorer.set_reference("all", teacher)
    assert scorer.fid("all", teacher) == pytest.approx(0.0, abs=1e-3)  # the same images: no distance
    assert scorer.fid("all", student) > 0
    assert scorer.fid("all", student[:1]) is None and scorer.fid("nothing", student) is None
    prompts = [f"prompt {i}" for i in range(8)]
    assert scorer.clip(student, prompts) >= 0 and scorer.clip([], []) is None
    no_fid = Scorer(None, tiny_clip, image_size=32, device="cpu")
    no_fid.set_reference("all", teacher)
    assert no_fid.fid("all", student) is None


def tiny_features():
    """A feature extractor for the test of --fid_features package.module:factory."""
    import torch

    class MeanColour(torch.nn.Module):
        num_features = 3

        def forward(self, images):
            return images.float().mean(dim=(2, 3))

    return MeanColour()


def test_fid_features_can_be_injected(smoke_run, tiny_clip, monkeypatch):
    from diffusers_aria.compare import metrics
    from diffusers_aria.compare.generate import image_path

    monkeypatch.syspath_prepend(os.path.dirname(__file__))
    spec = "test_compare_units:tiny_features"
    assert metrics.fid_extractor(spec).num_features == 3
    scorer = metrics.Scorer(spec, tiny_clip, image_size=32, device="cpu")
    imgs = [image_path(smoke_run.work, "teacher", i) for i in range(6)]
    scorer.set_reference("s", imgs)
    assert scorer.fid("s", imgs) == pytest.approx(0.0, abs=1e-6)
    for bad, message in (("nonsense", "is not valid"), ("no_such_module_xyz:f", "cannot be imported")):
        with pytest.raises(UserError, match=message):
            metrics.check_fid_features(bad)
    monkeypatch.setattr(metrics.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="needs torch-fidelity"):
        metrics.check_fid_features("inception")


# ------------------------------------------------------------------------------------------ table


def test_table_build_and_markdown():
    rows = [{"index": i, "split": s, "region": r} for i, (s, r) in enumerate([("seen", 0), ("unseen", 1), ("unseen", 1)])]
    eps = {"rc": {0: 0.2, 1: 0.4, 2: 0.6}, "aria": {0: 0.2, 1: 0.3, 2: 0.3}}
    metrics = {m: {"seen": {"fid": 10.0, "clip_score": 30.0}, "unseen": {"fid": 20.0, "clip_score": 25.0}}
               for m in ("teacher", "rc", "aria")}
    info = [{"region": 0, "pool_prompts": 10, "concept_share": 0.0, "coverage": 1.0},
            {"region": 1, "pool_prompts": 5, "concept_share": 1.0, "coverage": 0.0},
            {"region": 2, "pool_prompts": 3, "concept_share": 0.0, "coverage": None}]
    settings = {"preset": "smoke", "teacher": "t", "student_architecture": "bk_tiny", "max_train_steps": 2,
                "train_batch_size": 4, "num_processes": 1, "seed": 0, "resolution": 32, "inference_steps": 2,
                "guidance_scale": 5.0, "fid_features": None, "clip_model": "c"}
    report = {"concept": "animals", "paired_rows": 10, "paired_rows_dropped": 3, "pool_prompts": 18,
              "pool_prompts_matched": 5}
    t = table.build_table(settings, report, rows, metrics, eps, info)
    assert t["splits"]["unseen"]["models"]["aria"]["eps"] == pytest.approx(0.3)
    assert t["splits"]["rare"]["num_prompts"] == 0 and t["splits"]["rare"]["models"]["teacher"]["eps"] is None
    assert t["splits"]["all"]["models"]["rc"]["eps"] == pytest.approx(0.4)
    assert [r["region"] for r in t["regions"]] == [0, 1] and t["regions"][1]["aria_over_rc"] == pytest.approx(0.6)
    md = table.render_markdown(t)
    assert "| unseen (2) | ARIA student | 20 | 25 | 0.3 |" in md and "| rare (0) | RC student | - | - | - |" in md
    assert "off (--skip_fid)" in md and "3 of 10 paired rows dropped" in md


def test_a_dataset_is_read_with_its_config_and_filtered_by_label(monkeypatch, tmp_path):
    import datasets

    from diffusers_aria.compare import paired
    from diffusers_aria.training import data

    seen = {}

    def fake_load(dataset_name=None, dataset_config_name=None, **_):
        seen.update(name=dataset_name, config=dataset_config_name)
        return datasets.Dataset.from_dict({"text": [["a dog", "a pet"], ["a car"], ["a cat"]],
                                           "kind": [["animal"], ["vehicle"], ["animal"]]})

    monkeypatch.setattr(data, "load_image_caption_dataset", fake_load)
    concept = concepts.make_filter(column="kind", labels=["animal"])
    source = paired.read_paired(None, "org/coco", "text", concept, dataset_config_name="2014")
    assert seen == {"name": "org/coco", "config": "2014"} and source.first_captions() == ["a dog", "a car", "a cat"]
    unseen = paired.unseen_rows(source, concept)
    assert unseen.tolist() == [True, False, True]
    flags = paired.write_filtered(source, ~unseen, str(tmp_path / "kept"))
    assert flags == {"dataset_name": str(tmp_path / "kept")}
    assert datasets.load_from_disk(str(tmp_path / "kept"))["text"] == [["a car"]]
    with pytest.raises(UserError, match="is not a column"):
        paired.read_paired(None, "org/coco", "caption", concept)
