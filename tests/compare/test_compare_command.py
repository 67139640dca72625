"""`diffusers-aria compare` end to end: the smoke preset (both arms through `accelerate launch`, generation,
metrics with the tiny CLIP as FID's extractor, the table), resume after a stop and after a killed generation,
the prepare stage's flags, and one-line errors for bad inputs before any heavy work."""

from __future__ import annotations

import json
import os
import shutil
import time

import pytest
from conftest import compare_main, mtimes

pytestmark = pytest.mark.slow


def test_smoke_table_has_every_split_model_and_region(smoke_run):
    table = smoke_run.table()
    assert table["settings"]["preset"] == "smoke" and table["settings"]["teacher"] == smoke_run.teacher
    f = table["filter"]
    assert f["paired_rows"] == 40 and 0 < f["paired_rows_dropped"] < 40  # the animals left the paired data
    assert f["pool_prompts"] == 300 and 0 < f["pool_prompts_matched"] < 300  # ... and stayed in the pool
    for split in ("seen", "unseen", "rare", "all"):
        entry = table["splits"][split]
        assert entry["num_prompts"] > 0, split
        models = entry["models"]
        assert models["teacher"]["eps"] == 0.0
        for model in ("teacher", "rc", "aria"):
            assert models[model]["clip_score"] is not None and models[model]["clip_score"] >= 0
            if entry["num_prompts"] >= 2:
                assert models[model]["fid"] is not None and models[model]["fid"] >= 0
        for arm in ("rc", "aria"):
            assert models[arm]["eps"] > 0
    assert sum(table["splits"][s]["num_prompts"] for s in ("seen", "unseen", "rare")) == 18
    regions = table["regions"]
    assert regions and sum(r["eval_prompts"] for r in regions) == 18
    animal_regions = [r for r in regions if r["concept_share"] == 1.0]
    assert animal_regions and all(r["coverage"] == 0 for r in animal_regions)  # no animal caption was trained on
    md = open(smoke_run.path("compare_table.md")).read()
    assert "| unseen (" in md and "teacher (reference)" in md and "ARIA / RC" in md
    assert md in smoke_run.second_output  # the table is printed as it is written
    for arm, allocation in (("rc", "rc"), ("aria", "aria")):
        assert json.load(open(smoke_run.path(arm, "aria_report.json")))["policy"] == allocation
        assert os.path.isfile(smoke_run.path(arm, "model_index.json"))
    cost = json.load(open(smoke_run.path("cost.json")))
    assert cost["measured"] and cost["step_seconds"] > 0 and cost["total_device_hours"] > 0


def test_both_arms_get_the_same_command_but_the_allocation(smoke_run):
    from diffusers_aria.compare.command import arm_command
    from diffusers_aria.compare.stages import WorkFolder

    work = WorkFolder(smoke_run.work)
    plan = work.read_plan()
    rc, aria = (arm_command(work, plan, arm) for arm in ("rc", "aria"))
    differ = [(a, b) for a, b in zip(rc, aria) if a != b]
    assert differ == [(smoke_run.path("rc"), smoke_run.path("aria")), ("rc", "aria")]
    assert "--resume_from_checkpoint" in rc and rc[rc.index("--resume_from_checkpoint") + 1] == "latest"
    assert rc[rc.index("--train_data_dir") + 1] == smoke_run.path("data", "paired")  # the filtered copy


def test_a_second_launch_does_not_redo_finished_stages(smoke_run):
    first = smoke_run.first_launch
    assert first["stages"] == ["prepare.json", "train-rc.json"]  # --stop_after train-rc stopped there
    assert mtimes(smoke_run.path("data")) == first["prepare"]
    assert mtimes(smoke_run.path("regions")) == first["regions"]
    now = mtimes(smoke_run.path("rc"))
    assert all(now[name] == t for name, t in first["rc"].items())  # the RC arm was not trained again
    assert sorted(os.listdir(smoke_run.path("stages"))) == sorted(
        f"{s}.json" for s in ("prepare", "train-rc", "train-aria", "generate", "metrics", "table"))
    assert "train-rc:" not in smoke_run.second_output and "train-aria:" in smoke_run.second_output


def test_a_killed_generation_redoes_only_its_unfinished_shards(smoke_run):
    from diffusers_aria.compare.generate import image_path, shard_record

    work = smoke_run.work
    lost = json.load(open(shard_record(work, "aria", 1)))
    images = {i: open(image_path(work, "aria", i), "rb").read() for i in lost["indices"]}
    before = mtimes(smoke_run.path("generate"))
    table_before = smoke_run.table()
    os.remove(shard_record(work, "aria", 1))  # as if killed before the shard's record was written
    for stage in ("generate", "metrics", "table"):
        os.remove(smoke_run.path("stages", f"{stage}.json"))
    assert compare_main(["--preset", "smoke", "--teacher", smoke_run.teacher, "--output_dir", work]) == 0
    after = mtimes(smoke_run.path("generate"))
    redone = {name for name in after if after[name] != before.get(name)}
    assert redone == {os.path.join("aria", "shards", "shard-00001.json")} | {
        os.path.join("aria", "images", f"{i:06d}.png") for i in lost["indices"]}
    for i, data in images.items():  # each image has its own seed: made again, it is the same
        assert open(image_path(work, "aria", i), "rb").read() == data
    assert json.load(open(shard_record(work, "aria", 1)))["eps"] == pytest.approx(lost["eps"])
    assert smoke_run.table()["splits"] == table_before["splits"]


# ------------------------------------------------------------------------------------------ flags of prepare


def _inputs(smoke_run) -> list[str]:
    i = smoke_run.inputs
    return ["--teacher", smoke_run.teacher, "--train_data_dir", os.path.join(i, "paired"), "--prompt_pool",
            os.path.join(i, "pool.jsonl"), "--prompt_pool_column", "prompt", "--eval_prompts",
            os.path.join(i, "eval.jsonl"), "--clip_model", os.path.join(i, "tiny-clip")]


def _eval_rows(work) -> list[dict]:
    with open(os.path.join(work, "data", "eval.jsonl")) as fh:
        return [json.loads(line) for line in fh]


def test_prepare_with_a_label_column_split_column_and_prebuilt_regions(smoke_run, tmp_path):
    rows = [json.loads(line) for line in open(os.path.join(smoke_run.inputs, "eval.jsonl"))]
    with open(tmp_path / "eval.jsonl", "w") as fh:
        for k, r in enumerate(rows):
            fh.write(json.dumps({"caption": r["prompt"], "picture": os.path.join(smoke_run.inputs, r["image"]),
                                 "group": r["group"], "which": ["seen", "unseen", "rare"][k % 3]}) + "\n")
    work = str(tmp_path / "work")
    args = _inputs(smoke_run) + ["--output_dir", work, "--stop_after", "prepare", "--concept_column", "group",
                                 "--concept_labels", "animals", "--eval_prompts", str(tmp_path / "eval.jsonl"),
                                 "--eval_prompt_column", "caption", "--eval_image_column", "picture",
                                 "--eval_split_column", "which", "--num_eval_prompts", "10", "--regions_dir",
                                 smoke_run.path("regions"), "--seed", "3"]
    assert compare_main(args) == 0
    report = json.load(open(os.path.join(work, "data", "filter.json")))
    paired = [json.loads(line) for line in open(os.path.join(smoke_run.inputs, "paired", "metadata.jsonl"))]
    assert report["paired_rows_dropped"] == sum(r["group"] == "animals" for r in paired)
    assert report["pool_prompts_matched"] is None  # a label column tags paired rows, not pool prompts
    kept = [json.loads(line) for line in open(os.path.join(work, "data", "paired", "metadata.jsonl"))]
    assert len(kept) == 40 - report["paired_rows_dropped"] and all(r["group"] != "animals" for r in kept)
    assert all(os.path.islink(os.path.join(work, "data", "paired", r["file_name"])) for r in kept)
    ev = _eval_rows(work)
    assert len(ev) == 10 and all(r["split"] in ("seen", "unseen", "rare") for r in ev)
    by_prompt = {r["caption"]: r["which"] for r in (json.loads(line) for line in open(tmp_path / "eval.jsonl"))}
    assert all(by_prompt[r["prompt"]] == r["split"] for r in ev)  # the split column, not the computed split
    assert json.load(open(os.path.join(work, "stages", "prepare.json")))["regions_dir"] == smoke_run.path("regions")
    assert not os.path.exists(os.path.join(work, "regions"))  # the prebuilt regions were used, not rebuilt


def test_prepare_with_a_dataset_a_keyword_file_the_default_pool_and_no_fid(smoke_run, tmp_path):
    import datasets

    ds = datasets.load_dataset("imagefolder", data_dir=os.path.join(smoke_run.inputs, "paired"), split="train")
    ds = ds.rename_column("text", "words")
    ds.save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "concept.txt").write_text("# food, as the unseen concept\npizza\nramen\ncurry\nfood photography\n")
    prompts = [json.loads(line)["prompt"] for line in open(os.path.join(smoke_run.inputs, "eval.jsonl"))]
    (tmp_path / "eval.txt").write_text("\n".join(prompts) + "\n")
    work = str(tmp_path / "work")
    args = ["--teacher", smoke_run.teacher, "--clip_model", os.path.join(smoke_run.inputs, "tiny-clip"),
            "--output_dir", work, "--stop_after", "prepare", "--dataset_name", str(tmp_path / "saved"),
            "--caption_column", "words", "--concept_keywords", str(tmp_path / "concept.txt"), "--eval_prompts",
            str(tmp_path / "eval.txt"), "--skip_fid", "--num_regions", "4", "--rare_coverage", "0.5"]
    assert compare_main(args) == 0
    from diffusers_aria.compare.concepts import make_filter

    concept = make_filter(str(tmp_path / "concept.txt"))
    report = json.load(open(os.path.join(work, "data", "filter.json")))
    food = [c for c in ds["words"] if concept.matches_text(c)]
    assert report["paired_rows_dropped"] == len(food) > 0 and report["concept"].startswith("concept.txt")
    kept = datasets.load_from_disk(os.path.join(work, "data", "paired"))
    assert len(kept) == 40 - len(food) and not set(kept["words"]) & set(food)
    pool = open(os.path.join(work, "data", "pool.txt")).read().splitlines()
    assert sorted(pool) == sorted(set(ds["words"]))  # the default pool: every caption, the dropped ones too
    assert report["pool_prompts"] == len(pool) and report["pool_prompts_matched"] == len(food)
    plan = json.load(open(os.path.join(work, "compare_plan.json")))
    assert plan["fid_features"] is None and plan["num_regions"] == 4 and plan["rare_coverage"] == 0.5
    ev = _eval_rows(work)
    assert len(ev) == 18 and all(r["image"] is None for r in ev)
    assert [r["split"] == "unseen" for r in ev] == [concept.matches_text(r["prompt"]) for r in ev]


# ------------------------------------------------------------------------------------------ bad inputs


def _bad(smoke_run, tmp_path, name):
    i = smoke_run.inputs
    base = _inputs(smoke_run)
    if name == "filter matches nothing":
        (tmp_path / "none.txt").write_text("zeppelin\n")
        return base + ["--concept_keywords", str(tmp_path / "none.txt")], "matches none of the 40 paired rows"
    if name == "filter matches everything":
        groups = sorted({json.loads(line)["group"] for line in open(os.path.join(i, "paired", "metadata.jsonl"))})
        return base + ["--concept_column", "group", "--concept_labels", *groups], "matches all 40 paired rows"
    if name == "no reference images":
        (tmp_path / "eval.txt").write_text("a red fox\na bowl of ramen\n")
        return base + ["--eval_prompts", str(tmp_path / "eval.txt")], "FID needs a reference image"
    if name == "a missing reference image":
        rows = [json.loads(line) for line in open(os.path.join(i, "eval.jsonl"))]
        rows[0]["image"] = "nowhere.png"
        (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        return base + ["--eval_prompts", str(tmp_path / "eval.jsonl")], "reference images of --eval_prompts"
    if name == "teacher and student do not fit":
        return base + ["--student_architecture", "dit_every_other"], "does not fit a sd teacher"
    if name == "not a teacher":
        os.makedirs(tmp_path / "empty", exist_ok=True)
        return ["--teacher", str(tmp_path / "empty")] + base[2:], "is not a diffusers pipeline folder"
    if name == "another teacher than the plan's":
        return ["--preset", "smoke", "--teacher", smoke_run.path("rc")], "started with other settings: teacher"
    if name == "a GPU preset without data":
        return ["--preset", "one-gpu"], "--preset one-gpu needs --train_data_dir or --dataset_name and --eval_prompts"
    if name == "a bad stage":
        return base + ["--stop_after", "lunch"], "invalid choice: 'lunch'"
    if name == "a bad extra training flag":
        return base + ["--", "--no_such_flag"], "unrecognized arguments: --no_such_flag"
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["filter matches nothing", "filter matches everything", "no reference images",
                                  "a missing reference image", "teacher and student do not fit", "not a teacher",
                                  "another teacher than the plan's", "a GPU preset without data", "a bad stage",
                                  "a bad extra training flag"])
def test_bad_inputs_end_in_one_line_before_any_work(smoke_run, tmp_path, capfd, name):
    args, expected = _bad(smoke_run, tmp_path, name)
    work = smoke_run.work if name == "another teacher than the plan's" else str(tmp_path / "work")
    before = mtimes(smoke_run.work)
    extra = args[args.index("--"):] if "--" in args else []
    args = args[:len(args) - len(extra)]
    t0 = time.perf_counter()
    code = compare_main(args + ["--output_dir", work] + extra)
    err = capfd.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and expected in err[0], err
    assert time.perf_counter() - t0 < 60
    if work != smoke_run.work:
        assert not os.path.exists(work) or not os.listdir(work)  # nothing written
    assert mtimes(smoke_run.work) == before


def test_a_folder_of_something_else_is_refused(smoke_run, tmp_path, capfd):
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "notes.txt").write_text("mine")
    assert compare_main(_inputs(smoke_run) + ["--output_dir", str(tmp_path / "work")]) == 2
    assert "holds no compare_plan.json" in capfd.readouterr().err
    shutil.rmtree(tmp_path / "work")


def test_a_failed_arm_ends_in_one_line_and_resumes_later(smoke_run, monkeypatch, capfd):
    """A training process that fails: exit code 1, one line that says how to go on, the stage not marked."""
    from diffusers_aria.compare import command

    work = smoke_run.work
    marker = smoke_run.path("stages", "train-aria.json")
    saved = open(marker).read()
    os.remove(marker)

    class Failed:
        def __init__(self, cmd, env=None):
            self.cmd = cmd

        def poll(self):
            return 1

        def wait(self):
            return 1

    monkeypatch.setattr(command.subprocess, "Popen", Failed)
    try:
        code = compare_main(["--preset", "smoke", "--teacher", smoke_run.teacher, "--output_dir", work])
        err = capfd.readouterr().err.strip().splitlines()
        assert code == 1 and err == [f"error: the aria arm's training failed (exit code 1); run the same command again "
                                     f"to resume it from its latest checkpoint in {smoke_run.path('aria')}"]
        assert not os.path.exists(marker)
    finally:
        with open(marker, "w") as fh:
            fh.write(saved)


def test_the_docs_show_the_table_a_run_writes_and_every_flag(smoke_run):
    """docs/compare.md: the smoke table pasted there has the rows and columns of the table a run writes, and
    its flag table names every flag of the command."""
    from diffusers_aria.cli import build_parser

    docs = open(os.path.join(os.path.dirname(__file__), "..", "..", "docs", "compare.md")).read()

    def shape(markdown: str) -> list[list[str]]:  # the table rows, numbers blanked
        rows = []
        for line in markdown.splitlines():
            if line.startswith("| ") and not line.startswith("| flag") and not line.startswith("| preset"):
                cells = [c.strip() for c in line.strip("|").split("|")]
                rows.append([c if not c.replace(".", "").replace("-", "").isdigit() else "#" for c in cells[:2]])
        return rows

    pasted = docs.split("<!-- smoke-table -->")[1].split("What the smoke numbers say")[0]
    written = open(smoke_run.path("compare_table.md")).read()
    assert shape(written)[:14] == shape(pasted)[:14]  # the split x model rows, in order
    assert written.splitlines()[0] in pasted and "ARIA / RC" in pasted
    compare = build_parser()._subparsers._group_actions[0].choices["compare"]
    flags = {o for a in compare._actions for o in a.option_strings if o.startswith("--")} - {"--help", "--debug"}
    missing = sorted(f for f in flags if f"`{f}`" not in docs)
    assert not missing, missing
