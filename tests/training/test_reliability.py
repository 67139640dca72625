"""Reliability: hard kills and resume, non-finite losses, bad input with clear errors, no leaked state."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launching import TRAIN_SCRIPT, run_training, training_script

pytestmark = pytest.mark.slow
FAULTS = Path(__file__).parent / "fault_injection"
TIMEOUT = 300  # a launch takes ~15 s; a hang fails the test instead of stalling the suite


def launch_cmd(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--num_processes", "1", "--cpu", str(TRAIN_SCRIPT)] + args


def run_args(teacher, regions, out, stream, steps=6):
    return ["--pretrained_model_name_or_path", teacher, "--output_dir", str(out), "--regions_dir", regions,
            "--image_free", "--num_teacher_latents", "8", "--teacher_inference_steps", "2",
            "--builtin_pool_size", "200", "--num_regions", "6", "--resolution", "32", "--train_batch_size", "4",
            "--max_train_steps", str(steps), "--checkpointing_steps", "3", "--aria_warmup_steps", "1",
            "--report_to", "none", "--learning_rate", "1e-3", "--rc_schedule", "constant", "--rc_constant", "0.6",
            "--write_stream", str(stream)]


def env(**extra) -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", **extra)


def stream_by_step(path) -> dict[int, list[int]]:
    out = {}
    with open(path) as fh:
        for line in fh:
            rec = json.loads(line)
            out[rec["step"]] = rec["pool_indices"]  # a rerun of a step after resume replaces the killed run's
    return out


def aria_state(path):
    from safetensors.torch import load_file

    return load_file(os.path.join(path, "aria_state.safetensors"))


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:  # exact; NaN marks a region the reducibility test has not measured yet
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)


@pytest.fixture(scope="module")
def straight_run(tiny_teacher, shared_regions, tmp_path_factory):
    """The uninterrupted run, in this process: the killed runs below are subprocesses (a kill needs one), and
    they reach the same state bit for bit."""
    d = tmp_path_factory.mktemp("straight")
    run_training(run_args(tiny_teacher, shared_regions, d / "out", d / "s.jsonl"))
    return d


def test_sigkill_after_a_checkpoint_then_resume_matches_uninterrupted(tiny_teacher, shared_regions, straight_run,
                                                                      tmp_path):
    out, stream = tmp_path / "out", tmp_path / "s.jsonl"
    proc = subprocess.Popen(launch_cmd(run_args(tiny_teacher, shared_regions, out, stream)), env=env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    # a random point after the checkpoint of step 3: once k of the 6 steps have drawn their prompts
    k = random.Random(os.getpid()).randint(3, 5)
    deadline = time.time() + 300
    while not ((out / "checkpoint-3").is_dir() and stream.exists() and len(stream.read_text().splitlines()) >= k):
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.time() < deadline
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "run_info.json").exists()
    run_training(run_args(tiny_teacher, shared_regions, out, stream) + ["--resume_from_checkpoint", "latest"])
    assert stream_by_step(stream) == stream_by_step(straight_run / "s.jsonl")
    assert_same_state(aria_state(out / "checkpoint-6"), aria_state(straight_run / "out" / "checkpoint-6"))


def test_sigkill_during_a_checkpoint_write_never_uses_the_partial_checkpoint(tiny_teacher, shared_regions,
                                                                             straight_run, tmp_path):
    out, stream = tmp_path / "out", tmp_path / "s.jsonl"
    res = subprocess.run(launch_cmd(run_args(tiny_teacher, shared_regions, out, stream)), capture_output=True,
                         env=env(PYTHONPATH=f"{FAULTS}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
                                 ARIA_KILL_DURING_SAVE="6"), timeout=TIMEOUT)
    assert res.returncode != 0
    assert (out / ".checkpoint-6.tmp").is_dir() and not (out / "checkpoint-6").exists()
    from diffusers_aria.training.checkpointing import resolve_resume_checkpoint

    assert resolve_resume_checkpoint(str(out), "latest") == str(out / "checkpoint-3")
    run_training(run_args(tiny_teacher, shared_regions, out, stream) + ["--resume_from_checkpoint", "latest"])
    assert not (out / ".checkpoint-6.tmp").exists()  # cleaned up on start
    assert stream_by_step(stream) == stream_by_step(straight_run / "s.jsonl")
    assert_same_state(aria_state(out / "checkpoint-6"), aria_state(straight_run / "out" / "checkpoint-6"))


# ------------------------------------------------------------------------------------- in-process runs


def _inproc_args(teacher, regions, out, *extra):
    return training_script().parse_args(["--pretrained_model_name_or_path", teacher, "--output_dir", str(out),
                                 "--regions_dir", regions, "--image_free", "--num_teacher_latents", "8",
                                 "--teacher_inference_steps", "2", "--builtin_pool_size", "200", "--num_regions", "6",
                                 "--resolution", "32", "--train_batch_size", "4", "--max_train_steps", "4",
                                 "--checkpointing_steps", "100", "--report_to", "none", "--aria_warmup_steps", "1",
                                 *extra])


def _nan_on(monkeypatch, bad_steps: set[int], samples: slice):
    """Make the per-sample losses non-finite on some steps (as an fp16 overflow would)."""
    import diffusers_aria.training.step as training

    original = training.KDStep.__call__
    calls = {"n": 0}

    def patched(self, *a, **kw):
        terms = original(self, *a, **kw)
        if calls["n"] in bad_steps:
            bad = torch.zeros_like(terms.total)
            bad[samples] = float("nan")
            terms.total = terms.total + bad
        calls["n"] += 1
        return terms

    monkeypatch.setattr(training.KDStep, "__call__", patched)


def test_nonfinite_losses_are_skipped_and_never_reach_the_tracker(tiny_teacher, shared_regions, tmp_path, monkeypatch):
    _nan_on(monkeypatch, {1, 2}, slice(0, 2))
    out = tmp_path / "nan"
    training_script().main(_inproc_args(tiny_teacher, shared_regions, out, "--aria_feed", "all", "--max_nonfinite_steps", "3"))
    info = json.load(open(out / "run_info.json"))
    assert info["global_step"] == 4 and info["nonfinite_samples"] == 4
    report = json.load(open(out / "aria_report.json"))
    assert all(torch.isfinite(torch.tensor(r["estimate"])) for r in report["regions"])
    assert report["metrics"]["aria/nonfinite_total"] == 4
    from safetensors.torch import load_file

    weights = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_consecutive_nonfinite_steps_stop_with_a_clear_error(tiny_teacher, shared_regions, tmp_path, monkeypatch):
    _nan_on(monkeypatch, {0, 1, 2, 3}, slice(0, 4))
    with pytest.raises(RuntimeError, match=r"2 consecutive steps had a non-finite loss \(--max_nonfinite_steps=2\)"):
        training_script().main(_inproc_args(tiny_teacher, shared_regions, tmp_path / "nan2", "--max_nonfinite_steps", "2"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_non_empty_output_dir_is_refused_and_left_intact(tiny_teacher, shared_regions, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    before = _snapshot(out)
    from diffusers_aria.training.outputs import OutputDirError

    with pytest.raises(OutputDirError, match=r"--output_dir .*busy.* is not empty \(it holds precious.txt\)"):
        training_script().main(_inproc_args(tiny_teacher, shared_regions, out))
    assert _snapshot(out) == before
    training_script().main(_inproc_args(tiny_teacher, shared_regions, out, "--overwrite_output_dir", "--max_train_steps", "1"))
    assert (out / "precious.txt").read_text() == "keep me" and (out / "run_info.json").exists()


def test_regions_from_another_pool_are_refused_and_left_intact(tiny_teacher, shared_regions, tmp_path):
    from diffusers_aria.regions import RegionsMismatchError

    before = _snapshot(Path(shared_regions))
    args = _inproc_args(tiny_teacher, shared_regions, tmp_path / "other", "--builtin_pool_size", "150")
    with pytest.raises(RegionsMismatchError, match="built for a pool of 200 prompts but this pool has 150"):
        training_script().main(args)
    args = _inproc_args(tiny_teacher, shared_regions, tmp_path / "other2", "--seed", "1")  # same size, other prompts
    with pytest.raises(RegionsMismatchError, match="does not match this prompt pool: fingerprint") as err:
        training_script().main(args)
    assert str(err.value).startswith(f"{shared_regions!r}: ")  # the folder, and what to do with it (issue 27)
    assert ("--regions_dir is never rebuilt: pass the pool its regions were built from (the same --builtin_pool_size "
            "(this run: 200) and --seed (this run: 1)") in str(err.value)
    assert _snapshot(Path(shared_regions)) == before


def _md5s(root: Path) -> dict[str, str]:
    import hashlib

    return {str(p.relative_to(root)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_script_never_writes_into_inside_or_above_the_teacher(tiny_teacher, shared_regions, tmp_path):
    """Called directly (no preflight) with --overwrite_output_dir: the teacher, a VAE and named regions stay
    byte for byte (issue 27: --output_dir equal to the teacher replaced its weights with the student's)."""
    import shutil

    from diffusers_aria.training.outputs import OutputDirError

    teacher = tmp_path / "models" / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    regions, vae = tmp_path / "models" / "regions", tmp_path / "models" / "vae"
    shutil.copytree(shared_regions, regions)
    shutil.copytree(teacher / "vae", vae)
    before = _md5s(tmp_path / "models")
    cases = {str(teacher): "is the teacher's folder", str(teacher / "unet"): "lies inside the teacher's folder",
             str(tmp_path / "models"): "holds the teacher's folder",
             str(vae): "is the VAE's folder (--pretrained_vae_model_name_or_path)",
             str(vae / "run"): "lies inside the VAE's folder", str(regions): "is the regions folder (--regions_dir)"}
    for out, message in cases.items():
        args = _inproc_args(str(teacher), str(regions), out, "--overwrite_output_dir",
                            "--pretrained_vae_model_name_or_path", str(vae))
        with pytest.raises(OutputDirError, match=re.escape(message)):
            training_script().main(args)
    assert _md5s(tmp_path / "models") == before and not list(tmp_path.glob("models/*.previous-*"))


def _own_regions_args(teacher, out, *extra):
    """A run that builds its own regions (OUTPUT_DIR/regions) of a 60-prompt pool."""
    return training_script().parse_args(["--pretrained_model_name_or_path", teacher, "--output_dir", str(out), "--image_free",
                                 "--num_teacher_latents", "8", "--teacher_inference_steps", "2",
                                 "--builtin_pool_size", "60", "--num_regions", "4", "--resolution", "32",
                                 "--train_batch_size", "4", "--report_to", "tensorboard", "--aria_warmup_steps", "1",
                                 *extra])


def test_overwrite_moves_an_earlier_run_aside_and_never_mixes_two_runs(tiny_teacher, tmp_path, capsys):
    """--overwrite_output_dir on a folder holding another run (issue 27: an old checkpoint-300 stayed beside the new
    run's checkpoints): the earlier run moves whole to OUTPUT_DIR.previous-<time>; the new folder holds only the
    new run's checkpoints, images and logs, its own regions and teacher latents reused when they match. Resuming
    with another --seed names the regions folder and --seed."""
    from diffusers_aria.regions import RegionsMismatchError
    from diffusers_aria.training.checkpointing import resolve_resume_checkpoint

    out = tmp_path / "run"
    training_script().main(_own_regions_args(tiny_teacher, out, "--max_train_steps", "3", "--checkpointing_steps", "3",
                                     "--validation_prompts", "a red fox", "--validation_steps", "3",
                                     "--validation_inference_steps", "1"))
    first = _md5s(out)
    assert "checkpoint-3/model.safetensors" in first and "validation/step-3.png" in first
    capsys.readouterr()
    training_script().main(_own_regions_args(tiny_teacher, out, "--overwrite_output_dir", "--max_train_steps", "2",
                                     "--checkpointing_steps", "1"))
    moved = list(tmp_path.glob("run.previous-*"))
    assert len(moved) == 1 and f"the earlier run in {str(out)!r} was moved to {str(moved[0])!r}" in capsys.readouterr().out
    assert _md5s(moved[0]) == first  # the earlier run, whole
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert not (out / "validation").exists() and len(list((out / "logs").iterdir())) == 1
    assert resolve_resume_checkpoint(str(out), "latest") == str(out / "checkpoint-2")
    second = _md5s(out)
    for cache in ("regions/region_ids.npy", "teacher_latents/teacher_latents.safetensors"):  # same settings: reused
        assert second[cache] == first[cache]
        assert os.path.samefile(out / cache, moved[0] / cache)  # hard links: no copy, no extra space
    with pytest.raises(RegionsMismatchError) as err:  # this run's own regions, resumed with another --seed
        training_script().main(_own_regions_args(tiny_teacher, out, "--max_train_steps", "3", "--resume_from_checkpoint",
                                         "latest", "--seed", "1"))
    regions = str(out / "regions")
    assert str(err.value).startswith(f"{regions!r}: ") and (
        f"{regions!r} holds the regions of the earlier run in {str(out)!r}: to continue that run, pass its pool and "
        "region settings (the same --builtin_pool_size (this run: 60) and --seed (this run: 1)") in str(err.value)
    assert _md5s(out) == second and _md5s(moved[0]) == first


def test_resuming_into_an_empty_folder_says_so_before_the_models_load(tiny_teacher, shared_regions, tmp_path,
                                                                     monkeypatch, capsys):
    """issue 27: the message came after ~90 s of loading; now it is the run's first line."""
    import diffusers_aria.teachers.parts as parts

    def not_yet(*args, **kwargs):
        raise RuntimeError("the teacher loads after the message")

    monkeypatch.setattr(parts, "load_teacher", not_yet)
    out = tmp_path / "new"
    with pytest.raises(RuntimeError, match="the teacher loads after the message"):
        training_script().main(_inproc_args(tiny_teacher, shared_regions, out, "--resume_from_checkpoint", "latest"))
    assert capsys.readouterr().out.splitlines()[0] == (f"--resume_from_checkpoint latest: no checkpoint in "
                                                       f"{str(out)!r} yet, starting a new run")
    assert not out.exists()  # the failed start left nothing


def test_bad_lora_targets_and_incompatible_student_are_refused(tiny_teacher, shared_regions, tmp_path):
    with pytest.raises(ValueError, match=r"LoRA target module\(s\) \['to_nothing'\] match nothing"):
        training_script().main(_inproc_args(tiny_teacher, shared_regions, tmp_path / "l", "--student_mode", "lora",
                                    "--lora_target_modules", "to_nothing"))
    from diffusers import UNet2DConditionModel

    bad = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                               cross_attention_dim=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    bad.save_pretrained(tmp_path / "bad_student")
    with pytest.raises(ValueError, match="has cross_attention_dim 16 but the teacher has 384"):
        training_script().main(_inproc_args(tiny_teacher, shared_regions, tmp_path / "s", "--student_model_name_or_path",
                                    str(tmp_path / "bad_student")))


def test_resume_with_a_different_number_of_processes_works(tiny_teacher, shared_regions, tmp_path):
    """A 1-process checkpoint resumed by 2 processes: ARIA's state is global, so the run goes on."""
    out = tmp_path / "out"
    run_training(run_args(tiny_teacher, shared_regions, out, tmp_path / "s.jsonl", steps=3))
    cmd = launch_cmd(run_args(tiny_teacher, shared_regions, out, tmp_path / "s.jsonl", steps=4)
                     + ["--resume_from_checkpoint", "latest"])
    cmd[cmd.index("--num_processes") + 1] = "2"
    cmd[cmd.index("--cpu")] = "--multi_gpu"
    res = subprocess.run(cmd, env=env(ACCELERATE_USE_CPU="true"), capture_output=True, text=True, timeout=TIMEOUT)
    assert res.returncode == 0, res.stderr[-4000:]
    info = json.load(open(out / "run_info.json"))
    assert info["num_processes"] == 2 and info["global_step"] == 4 and len(set(info["aria_state_hashes"])) == 1


def test_state_files_load_without_unpickling(straight_run):
    """Regions and ARIA state are safetensors/JSON/npy (allow_pickle=False); trust_remote_code is never on."""
    import numpy as np

    ckpt = straight_run / "out" / "checkpoint-6"
    aria_state(ckpt)
    json.load(open(ckpt / "aria_state.json"))
    regions = straight_run / "out"
    np.load(next((Path(p) for p in [regions / "regions" / "region_ids.npy"] if p.exists()),
                 Path(__file__)), allow_pickle=False) if (regions / "regions").exists() else None
    src = "".join(p.read_text() for p in Path(TRAIN_SCRIPT).parents[1].joinpath("diffusers_aria").rglob("*.py"))
    assert "trust_remote_code=True" not in src
