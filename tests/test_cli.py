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
    from diffusers_aria.regions import RegionsMismatchError

    with pytest.raises(RegionsMismatchError):
        main(["regions", "show", str(out), "--pool", str(other)])
    assert main(["report", str(tmp_path)]) == 2  # no report there
    assert "holds no aria_report.json" in capsys.readouterr().err


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
    assert main(["make-tiny-teacher", str(out), "--train_steps", "2", "--seed", "1"]) == 0
    text = capsys.readouterr().out
    assert "text sensitivity" in text and "t= 100" in text
    assert main(["make-tiny-teacher", str(out), "--train_steps", "2", "--seed", "1"]) == 0
    assert "reused cached teacher" in capsys.readouterr().out
    assert main(["make-tiny-teacher", str(out), "--train_steps", "2", "--seed", "1", "--force"]) == 0
    assert "trained for 2 steps" in capsys.readouterr().out
    res_path = tmp_path / "eval.json"
    assert main(["evaluate", "--teacher", tiny_teacher, "--student", str(out), "--pool", "builtin",
                 "--builtin_pool_size", "60", "--num_prompts", "8", "--output", str(res_path)]) == 0
    res = json.load(open(res_path))
    assert res["num_prompts"] == 8 and res["overall"] > 0 and set(res["per_group"])


@pytest.mark.parametrize("user_value", [None, "ACTIVE"])
def test_main_defaults_omp_wait_policy_to_passive_and_keeps_a_user_value(tmp_path, user_value):
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    if user_value is not None:
        env["OMP_WAIT_POLICY"] = user_value
    code = ("import os, sys\nfrom diffusers_aria.cli import main\n"
            "rc = main(['report', sys.argv[1]])\nprint(rc, os.environ.get('OMP_WAIT_POLICY'))")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.split()[-2:] == ["2", user_value or "PASSIVE"]  # rc 2: no report in tmp_path


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
