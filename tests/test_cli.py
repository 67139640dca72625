"""The `diffusers-aria` command line, including the README's main command at a reduced size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_aria.cli import demo_command, main
from diffusers_aria.embedded import TINY_TEACHER_TRAIN_STEPS

ROOT = Path(__file__).resolve().parents[1]


def test_regions_build_show_and_report(tmp_path, capsys):
    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(f"a {c} {t}" for c in ["red", "blue", "green", "old", "new"]
                              for t in ["cat", "dog", "car", "bus", "cake", "pie"]) + "\n")
    out = tmp_path / "regions"
    assert main(["regions", "build", "--pool", str(pool), "--num_regions", "3", "--output", str(out),
                 "--method", "sklearn", "--embeddings_cache", str(tmp_path / "emb")]) == 0
    assert "saved 3 regions" in capsys.readouterr().out
    assert any((tmp_path / "emb").iterdir())
    assert main(["regions", "show", str(out), "--pool", str(pool)]) == 0
    assert "3 regions over 30 prompts" in capsys.readouterr().out
    other = tmp_path / "other.txt"
    other.write_text("\n".join(f"prompt {i}" for i in range(30)) + "\n")
    assert main(["regions", "show", str(out), "--pool", str(other)]) == 2  # same size, other prompts
    err = capsys.readouterr().err
    assert err.startswith("error: the regions folder does not match this prompt pool") and err.count("\n") == 1
    assert main(["report", str(tmp_path)]) == 2  # no report there
    assert "holds no aria_report.json" in capsys.readouterr().err


def test_regions_build_with_a_work_dir_is_the_sharded_build(tmp_path, capsys):
    """--work_dir: the sharded, resumable build (one process here; tests/test_sharded_regions.py launches two).
    A full sample gives exactly the one-process `build_regions` ids."""
    import numpy as np

    from diffusers_aria.regions import ConditionRegions

    pool = tmp_path / "pool.txt"
    pool.write_text("\n".join(f"a {c} {t}" for c in ["red", "blue", "green", "old", "new"]
                              for t in ["cat", "dog", "car", "bus", "cake", "pie"]) + "\n")
    common = ["regions", "build", "--pool", str(pool), "--num_regions", "3", "--method", "sklearn"]
    assert main(common + ["--output", str(tmp_path / "plain")]) == 0
    assert main(common + ["--output", str(tmp_path / "sharded"), "--work_dir", str(tmp_path / "work"),
                          "--sample_size", "30", "--chunk_size", "8"]) == 0
    assert "saved 3 regions" in capsys.readouterr().out
    assert len(list((tmp_path / "work" / "chunks").glob("*.json"))) == 4  # 30 prompts in chunks of 8
    np.testing.assert_array_equal(ConditionRegions.load(str(tmp_path / "sharded")).region_ids,
                                  ConditionRegions.load(str(tmp_path / "plain")).region_ids)


def test_report_of_a_saved_state(tmp_path, capsys):
    import numpy as np

    from diffusers_aria import AdaptiveRegionSampler, ARIACallback, DiscrepancyTracker, make_policy

    ids = np.repeat(np.arange(3), [5, 3, 2])
    s = AdaptiveRegionSampler(ids)
    cb = ARIACallback(None, s, DiscrepancyTracker(3), make_policy("aria", s.sizes, warmup_steps=0))
    for step in range(5):  # enough samples for the tracker's timestep baseline: region 2 is the hardest
        cb.on_step_end(step, np.array([0, 1, 2, 2] * 4), np.array([1.0, 1.0, 3.0, 3.0] * 4))
    s.draw(5, 10)
    cb.save_state(str(tmp_path / "checkpoint-1"))
    assert main(["report", str(tmp_path / "checkpoint-1"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "policy aria at step 4" in out and len([x for x in out.splitlines() if x.strip().startswith("2 ")]) == 1
    header = next(x for x in out.splitlines() if x.strip().startswith("region"))
    assert header.split() == ["region", "size", "share", "prob", "estimate", "draws", "name"]  # as aria_report.md
    row = next(x for x in out.splitlines() if x.strip().startswith("2 ")).split()
    assert float(row[5]) == pytest.approx(s.draw_shares()[2], abs=1e-4) and float(row[5]) > 0


def test_make_tiny_teacher_and_evaluate(tmp_path, tiny_teacher, capsys):
    out = tmp_path / "t"
    small = ["--num_prompts", "64"]  # the default 4000 prompts cost ~10 s of embedding per build here
    assert main(["make-tiny-teacher", str(out), "--train_steps", "2", "--seed", "1"] + small) == 0
    text = capsys.readouterr().out
    assert "text sensitivity" in text and "t= 100" in text
    assert main(["make-tiny-teacher", str(out), "--train_steps", "2", "--seed", "1"] + small) == 0
    assert "reused cached teacher" in capsys.readouterr().out
    assert main(["make-tiny-teacher", str(out), "--train_steps", "2", "--seed", "1", "--force"] + small) == 0
    assert "trained for 2 steps" in capsys.readouterr().out
    assert json.load(open(out / "aria_teacher_report.json"))["settings"]["num_prompts"] == 64
    assert main(["make-tiny-teacher", str(out), "--num_prompts", "1"]) == 2
    res_path = tmp_path / "eval.json"
    import numpy as np

    from diffusers_aria.regions import ConditionRegions

    regions = tmp_path / "regions"  # 16 regions of the 60 prompts (assigned, not clustered): 8 prompts miss some
    ConditionRegions(region_ids=(np.arange(60) % 16).astype(np.int32), centroids=np.eye(16, 4, dtype=np.float32),
                     metadata={}).save(str(regions))
    capsys.readouterr()
    assert main(["evaluate", "--teacher", tiny_teacher, "--student", str(out), "--pool", "builtin",
                 "--builtin_pool_size", "60", "--num_prompts", "8", "--regions", str(regions),
                 "--output", str(res_path)]) == 0
    res = json.load(open(res_path))
    assert res["num_prompts"] == 8 and res["overall"] > 0 and set(res["per_group"])
    missing = res["regions_without_prompts"]
    assert missing and sorted(missing + [int(k) for k in res["per_region"]]) == list(range(16))
    assert sum(res["per_region_prompts"].values()) == 8 == sum(res["per_group_prompts"].values())
    text = capsys.readouterr().out  # a table, not JSON
    assert not text.lstrip().startswith("{") and f"overall {res['overall']:.4f}; by timestep: t=100 " in text
    assert text.splitlines()[3].split() == ["region", "prompts", "gap"]
    hardest = max(res["per_region"], key=res["per_region"].get)
    assert text.splitlines()[4].split() == [hardest, str(res["per_region_prompts"][hardest]),
                                            f"{res['per_region'][hardest]:.4f}"]
    assert (f"no held-out prompt fell in {len(missing)} of the regions, so they have no value: "
            f"{', '.join(map(str, missing))}; raise --num_prompts to cover them") in text
    assert f"all values: {res_path}" in text


def test_demo_command_line():
    cmd = demo_command("out", "teacher", 300, 1, ["--seed", "5"])
    assert cmd[-2:] == ["--seed", "5"] and "--cpu" in cmd and "--image_free" in cmd
    assert cmd[cmd.index("--num_regions") + 1] == "16"
    cmd2 = demo_command("out", "teacher", 300, 2, [])
    assert "--multi_gpu" in cmd2 and cmd2[cmd2.index("--train_batch_size") + 1] == "8"
    own = demo_command("out", "teacher", 300, 1, ["--prompt_pool", "mine.txt"])  # the library's K for the pool
    assert "--num_regions" not in own and own[-2:] == ["--prompt_pool", "mine.txt"]


def test_demo_help_explains_every_option_and_the_arguments_after_the_separator(capsys):
    from diffusers_aria.cli import build_parser

    demo = next(a for a in build_parser()._actions if a.dest == "command").choices["demo"]
    assert [a.option_strings for a in demo._actions if not a.help] == []
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "Arguments after `--` go to the training script" in text
    assert f"training steps of a new tiny teacher (default: {TINY_TEACHER_TRAIN_STEPS})" in text


def _demo_args(tmp_path, *argv):
    from diffusers_aria.cli import build_parser

    a = build_parser().parse_args(["demo", "--output_dir", str(tmp_path / "demo"), *argv])
    a.teacher_train_steps = a.teacher_train_steps or TINY_TEACHER_TRAIN_STEPS
    return a


def test_demo_trains_a_teacher_only_where_asked_and_moves_an_earlier_run_aside(tmp_path):
    """A --teacher_dir the user names must exist, or --new_teacher asks for one; the default folder is made the
    first time. An earlier run in --output_dir makes the script move it aside, unless the demo resumes it."""
    from diffusers_aria.cli import check_demo_args
    from diffusers_aria.utils.errors import UserError

    new = str(tmp_path / "my-teacher")
    with pytest.raises(UserError, match=f"--teacher_dir '{new}': no tiny teacher there; pass the folder"):
        check_demo_args(_demo_args(tmp_path, "--teacher_dir", new), [])
    cmd = check_demo_args(_demo_args(tmp_path, "--teacher_dir", new, "--new_teacher"), [])
    assert cmd[cmd.index("--pretrained_model_name_or_path") + 1] == new and not os.path.exists(new)
    cmd = check_demo_args(_demo_args(tmp_path), [])  # the default folder, beside --output_dir
    assert cmd[cmd.index("--pretrained_model_name_or_path") + 1] == str(tmp_path / "tiny-teacher")
    assert "--overwrite_output_dir" not in cmd
    from test_preflight import write_checkpoint

    write_checkpoint(tmp_path / "demo" / "checkpoint-300", num_prompts=4000, num_regions=16)
    assert "--overwrite_output_dir" in check_demo_args(_demo_args(tmp_path), [])
    assert "--overwrite_output_dir" not in check_demo_args(_demo_args(tmp_path),
                                                           ["--resume_from_checkpoint", "latest"])


def _md5s(root: Path) -> dict[str, str]:
    """md5 of every file under `root`, by relative path."""
    import hashlib

    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_readme_main_command_at_reduced_size_and_its_rerun(tmp_path):
    """scripts/demo.sh as a user runs it, shortened with its own flags, writes what the README lists. Run again
    with fewer steps (issue 27), it moves the first run aside whole: the new folder holds only the new run's
    checkpoints, so `--resume_from_checkpoint latest` can only find this run's."""
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    out, teacher = tmp_path / "demo", tmp_path / "teacher"
    env = dict(os.environ, ARIA_VENV=str(Path(sys.executable).parents[1]))

    def demo(steps: str) -> subprocess.CompletedProcess:
        return subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--output_dir", str(out),
                               "--teacher_dir", str(teacher), "--new_teacher", "--teacher_train_steps", "3",
                               "--max_train_steps", steps, "--builtin_pool_size", "300", "--",
                               "--num_teacher_latents", "16", "--validation_inference_steps", "2",
                               "--teacher_inference_steps", "2"], capture_output=True, text=True, env=env, timeout=900)

    res = demo("3")
    assert res.returncode == 0, res.stderr[-4000:]
    for name in ("validation_final.png", "aria_allocation.png", "aria_report.md", "aria_report.json", "README.md",
                 "model_index.json", "unet", "logs"):
        assert (out / name).exists(), name
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-2", "checkpoint-3"}
    assert "Look at" in res.stdout and "text sensitivity" in res.stdout
    assert f"no tiny teacher in {teacher} yet: training one (3 steps" in res.stdout  # said before it starts
    first, teacher_md5 = _md5s(out), _md5s(teacher)

    res = demo("2")
    assert res.returncode == 0, res.stderr[-4000:]
    assert f"{out} holds an earlier run: it is moved aside" in res.stdout
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("demo.previous-")]
    assert len(moved) == 1 and f"was moved to {str(moved[0])!r}" in res.stdout + res.stderr
    assert _md5s(moved[0]) == first  # the first run, whole and unchanged
    assert {p.name for p in out.glob("checkpoint-*")} == {"checkpoint-1", "checkpoint-2"}
    assert json.load(open(out / "run_info.json"))["global_step"] == 2
    assert len(list((out / "logs").iterdir())) == 1  # this run's tracker folder only
    assert _md5s(teacher) == teacher_md5  # reused, not trained again


# ------------------------------------------------------------------------------------------ mistakes: one line, exit 2

HEAVY = ("diffusers", "transformers", "sentence_transformers", "datasets")


def _cli_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments, the message expected) of the user mistakes the command line answers in one line."""
    from test_preflight import write_checkpoint, write_fake_pipeline

    (tmp / "empty.txt").write_text("")
    (tmp / "three.txt").write_text("a cat\na dog\na car\n")
    (tmp / "p.csv").write_text("id,text\n1,a cat\n")
    (tmp / "mine").mkdir()
    (tmp / "mine" / "notes.txt").write_text("keep me")
    teacher = write_fake_pipeline(tmp / "tiny-teacher")
    (teacher / "aria_teacher_report.json").write_text(json.dumps(
        {"settings": {"train_steps": TINY_TEACHER_TRAIN_STEPS, "num_prompts": 4000, "seed": 0}}))
    run = tmp / "demo"
    write_checkpoint(run / "checkpoint-3")
    (run / "checkpoint-3" / "aria_state.json").write_text('{"state": ')
    return {
        "missing pool": (["regions", "build", "--pool", "nosuch.txt", "--output", "r"],
                         "--pool 'nosuch.txt': no such prompt pool file or folder"),
        "empty pool": (["regions", "build", "--pool", "empty.txt", "--output", "r"], "--pool 'empty.txt' is empty"),
        "bad column": (["regions", "build", "--pool", "p.csv", "--column", "caption", "--output", "r"],
                       "column 'caption' not found in p.csv; available columns: ['id', 'text'] (pass --column NAME)"),
        "K too large": (["regions", "build", "--pool", "three.txt", "--num_regions", "5", "--output", "r"],
                        "--num_regions 5 is larger than the 3 distinct prompts of --pool 'three.txt'"),
        "regions over other files": (["regions", "build", "--pool", "three.txt", "--num_regions", "2", "--output",
                                      "mine"], "--output 'mine' holds files that are not a regions folder"),
        "missing regions folder": (["regions", "show", "nosuch"], "REGIONS_DIR 'nosuch': no such regions folder"),
        "missing report": (["report", "outputs/demo"], "report 'outputs/demo': no such folder"),
        "damaged report": (["report", str(run / "checkpoint-3")], "aria_state.json' is damaged (not valid JSON"),
        "missing teacher": (["evaluate", "--teacher", "./nosuch", "--student", str(teacher)],
                            "--teacher './nosuch': no such pipeline folder"),
        "student is a UNet folder": (["evaluate", "--teacher", str(teacher), "--student", str(tmp / "mine")],
                                     "is not a diffusers pipeline folder: model_index.json, unet"),
        "teacher over other files": (["make-tiny-teacher", "mine"], "OUTPUT_DIR 'mine' exists and is not a tiny teacher"),
        "demo over other files": (["demo", "--output_dir", "mine"],
                                  "--output_dir 'mine' holds files that are not a distillation run"),
        "demo into the teacher": (["demo", "--output_dir", str(teacher)], "is the teacher's folder (--teacher_dir)"),
        "demo above the teacher": (["demo", "--output_dir", str(tmp), "--teacher_dir", str(teacher)],
                                   f"--output_dir {str(tmp)!r} holds the teacher's folder {str(teacher)!r}"),
        "demo inside the teacher": (["demo", "--output_dir", str(teacher / "run"), "--teacher_dir", str(teacher)],
                                    "lies inside the teacher's folder"),
        "misspelt teacher folder": (["demo", "--teacher_dir", str(tmp / "tiny-teachr")],
                                    f"no tiny teacher there (tiny teachers beside it: {str(tmp / 'tiny-teacher')}); "
                                    "pass the folder of one made before, or add --new_teacher"),
        "teacher of other settings": (["demo", "--output_dir", "new", "--teacher_train_steps", "7"],
                                      f"holds a tiny teacher made with other settings (train_steps "
                                      f"{TINY_TEACHER_TRAIN_STEPS} (this demo: 7)); the demo never replaces a teacher: "
                                      f"pass --teacher_train_steps {TINY_TEACHER_TRAIN_STEPS} to use it"),
        "pool smaller than the demo's regions": (["demo", "--output_dir", "new", "--builtin_pool_size", "10"],
                                                 "the demo builds 16 regions of the built-in pool and needs at least "
                                                 "16 prompts; pass a larger --builtin_pool_size, or fewer regions "
                                                 "after --: -- --num_regions N (N <= 10)"),
        "own pool, too many regions": (["demo", "--output_dir", "new", "--", "--prompt_pool", "three.txt",
                                        "--num_regions", "4"], "--num_regions 4 is larger than the 3 distinct"),
        "unknown allocation": (["demo", "--output_dir", "new", "--", "--allocation", "nope"],
                               "argument --allocation: invalid choice: 'nope'"),
        "unknown command": (["regoins"], "argument command: invalid choice: 'regoins'"),
    }


_DRIVER = """
import contextlib, io, json, sys
from diffusers_aria.cli import main
out = {}
for name, argv in json.loads(sys.argv[1]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        out[name] = [main(argv), err.getvalue()]
print(json.dumps({"results": out, "heavy": sorted(m for m in sys.argv[-1].split(",") if m in sys.modules)}))
"""


def _snapshot(root: Path) -> dict[str, tuple]:
    import hashlib

    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, p.is_file() and hashlib.md5(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


@pytest.fixture(scope="module")
def cli_runs(tmp_path_factory):
    """Every mistake of `_cli_cases` through `main`, in one subprocess without the offline variables set."""
    tmp = tmp_path_factory.mktemp("cli-bad-inputs")
    cases = _cli_cases(tmp)
    before = _snapshot(tmp)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    res = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps({k: v for k, (v, _) in cases.items()}),
                          ",".join(HEAVY)],
                         cwd=tmp, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return cases, json.loads(res.stdout.splitlines()[-1]), before, _snapshot(tmp)


@pytest.mark.parametrize("name", ["missing pool", "empty pool", "bad column", "K too large", "regions over other files",
                                  "missing regions folder", "missing report", "damaged report", "missing teacher",
                                  "student is a UNet folder", "teacher over other files", "demo over other files",
                                  "demo into the teacher", "demo above the teacher", "demo inside the teacher",
                                  "misspelt teacher folder", "teacher of other settings",
                                  "pool smaller than the demo's regions", "own pool, too many regions",
                                  "unknown allocation", "unknown command"])
def test_cli_mistake_is_one_line_and_exit_code_2(cli_runs, name):
    cases, runs, _, _ = cli_runs
    code, err = runs["results"][name]
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert cases[name][1] in err, err


def test_cli_mistakes_fail_before_the_heavy_imports_and_write_nothing(cli_runs):
    _, runs, before, after = cli_runs
    assert runs["heavy"] == []
    assert before == after  # md5, size and time of every file: the teacher's included


def test_cli_missing_pool_file_never_reaches_the_hub_and_debug_shows_the_traceback(tmp_path):
    """The issue's example, as a user runs it: no offline variables, no network; then again with --debug."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    cmd = [sys.executable, "-m", "diffusers_aria.cli", "regions", "build", "--pool", "nosuch.txt", "--output", "r"]
    res = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2
    assert res.stderr.startswith("error: --pool 'nosuch.txt': no such prompt pool file or folder (looked for ")
    assert res.stderr.count("\n") == 1 and "Hub" not in res.stderr.split(";")[0]
    res = subprocess.run(cmd + ["--debug"], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 1 and "Traceback" in res.stderr and "UserError: --pool 'nosuch.txt'" in res.stderr
    assert not (tmp_path / "r").exists()


def test_a_closed_pipe_ends_quietly(tmp_path):
    """`diffusers-aria report ... | head`: the reader leaves early; exit code 1, no traceback."""
    code = ("import sys\nimport diffusers_aria.cli as cli\n"
            "def report(a):\n    raise BrokenPipeError(32, 'Broken pipe')\n"
            "cli._cmd_report = report\nsys.exit(cli.main(['report', sys.argv[1]]))")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
