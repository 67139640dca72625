"""The `diffusers-aria` command line, including the README's main command at a reduced size."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from diffusers_aria.cli import demo_command, main

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
    cb.on_step_end(0, np.array([0, 1, 2, 2]), np.array([1.0, 1.0, 3.0, 3.0]))
    cb.save_state(str(tmp_path / "checkpoint-1"))
    assert main(["report", str(tmp_path / "checkpoint-1"), "--top", "2"]) == 0
    out = capsys.readouterr().out
    assert "policy aria at step 0" in out and len([x for x in out.splitlines() if x.strip().startswith("2 ")]) == 1


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
    assert main(["evaluate", "--teacher", tiny_teacher, "--student", str(out), "--pool", "builtin",
                 "--builtin_pool_size", "60", "--num_prompts", "8", "--output", str(res_path)]) == 0
    res = json.load(open(res_path))
    assert res["num_prompts"] == 8 and res["overall"] > 0 and set(res["per_group"])


def test_demo_command_line():
    cmd = demo_command("out", "teacher", 300, 1, ["--seed", "5"])
    assert cmd[-2:] == ["--seed", "5"] and "--cpu" in cmd and "--image_free" in cmd
    cmd2 = demo_command("out", "teacher", 300, 2, [])
    assert "--multi_gpu" in cmd2 and cmd2[cmd2.index("--train_batch_size") + 1] == "8"


@pytest.mark.slow
def test_readme_main_command_at_reduced_size(tmp_path):
    """scripts/demo.sh as a user runs it, shortened with its own flags, writes what the README lists."""
    readme = (ROOT / "README.md").read_text()
    assert "bash scripts/demo.sh" in readme and "bash scripts/test.sh" in readme
    out = tmp_path / "demo"
    env = dict(os.environ, ARIA_VENV=str(Path(sys.executable).parents[1]))
    res = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh"), "--output_dir", str(out),
                          "--teacher_dir", str(tmp_path / "teacher"), "--teacher_train_steps", "3",
                          "--max_train_steps", "3", "--builtin_pool_size", "300", "--", "--num_teacher_latents", "16",
                          "--validation_inference_steps", "2", "--teacher_inference_steps", "2"],
                         capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-4000:]
    for name in ("validation_final.png", "aria_allocation.png", "aria_report.md", "aria_report.json", "README.md",
                 "model_index.json", "unet", "logs"):
        assert (out / name).exists(), name
    assert any(p.name.startswith("checkpoint-") for p in out.iterdir())
    assert "Look at" in res.stdout and "text sensitivity" in res.stdout


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
    (teacher / "aria_teacher_report.json").write_text("{}")
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
        "demo into the teacher": (["demo", "--output_dir", str(teacher)], "is also the teacher's folder"),
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


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


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
                                  "demo into the teacher", "unknown allocation", "unknown command"])
def test_cli_mistake_is_one_line_and_exit_code_2(cli_runs, name):
    cases, runs, _, _ = cli_runs
    code, err = runs["results"][name]
    assert code == 2, err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert cases[name][1] in err, err


def test_cli_mistakes_fail_before_the_heavy_imports_and_write_nothing(cli_runs):
    _, runs, before, after = cli_runs
    assert runs["heavy"] == []
    assert before == after


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
