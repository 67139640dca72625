"""Reliability: hard kills and resume, non-finite losses, bad input with clear errors, no leaked state."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from launching import TRAIN_SCRIPT

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
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight_run(tiny_teacher, shared_regions, tmp_path_factory):
    d = tmp_path_factory.mktemp("straight")
    subprocess.run(launch_cmd(run_args(tiny_teacher, shared_regions, d / "out", d / "s.jsonl")), check=True,
                   env=env(), capture_output=True, timeout=TIMEOUT)
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
    subprocess.run(launch_cmd(run_args(tiny_teacher, shared_regions, out, stream) + ["--resume_from_checkpoint",
                                                                                      "latest"]),
                   check=True, env=env(), capture_output=True, timeout=TIMEOUT)
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
    subprocess.run(launch_cmd(run_args(tiny_teacher, shared_regions, out, stream) + ["--resume_from_checkpoint",
                                                                                      "latest"]),
                   check=True, env=env(), capture_output=True, timeout=TIMEOUT)
    assert not (out / ".checkpoint-6.tmp").exists()  # cleaned up on start
    assert stream_by_step(stream) == stream_by_step(straight_run / "s.jsonl")
    assert_same_state(aria_state(out / "checkpoint-6"), aria_state(straight_run / "out" / "checkpoint-6"))


# ------------------------------------------------------------------------------------- in-process runs


def _script():
    sys.path.insert(0, str(TRAIN_SCRIPT.parent))
    import train_aria_distill

    return train_aria_distill


def _inproc_args(teacher, regions, out, *extra):
    return _script().parse_args(["--pretrained_model_name_or_path", teacher, "--output_dir", str(out),
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
    _script().main(_inproc_args(tiny_teacher, shared_regions, out, "--aria_feed", "all", "--max_nonfinite_steps", "3"))
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
        _script().main(_inproc_args(tiny_teacher, shared_regions, tmp_path / "nan2", "--max_nonfinite_steps", "2"))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_non_empty_output_dir_is_refused_and_left_intact(tiny_teacher, shared_regions, tmp_path):
    out = tmp_path / "busy"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    before = _snapshot(out)
    from diffusers_aria.training.outputs import OutputDirError

    with pytest.raises(OutputDirError, match=r"--output_dir .*busy.* is not empty \(it holds precious.txt\)"):
        _script().main(_inproc_args(tiny_teacher, shared_regions, out))
    assert _snapshot(out) == before
    _script().main(_inproc_args(tiny_teacher, shared_regions, out, "--overwrite_output_dir", "--max_train_steps", "1"))
    assert (out / "precious.txt").read_text() == "keep me" and (out / "run_info.json").exists()


def test_regions_from_another_pool_are_refused_and_left_intact(tiny_teacher, shared_regions, tmp_path):
    from diffusers_aria.regions import RegionsMismatchError

    before = _snapshot(Path(shared_regions))
    args = _inproc_args(tiny_teacher, shared_regions, tmp_path / "other", "--builtin_pool_size", "150")
    with pytest.raises(RegionsMismatchError, match="built for a pool of 200 prompts but this pool has 150"):
        _script().main(args)
    args = _inproc_args(tiny_teacher, shared_regions, tmp_path / "other2", "--seed", "1")  # same size, other prompts
    with pytest.raises(RegionsMismatchError, match="does not match this prompt pool: fingerprint"):
        _script().main(args)
    assert _snapshot(Path(shared_regions)) == before


def test_bad_lora_targets_and_incompatible_student_are_refused(tiny_teacher, shared_regions, tmp_path):
    with pytest.raises(ValueError, match=r"LoRA target module\(s\) \['to_nothing'\] match nothing"):
        _script().main(_inproc_args(tiny_teacher, shared_regions, tmp_path / "l", "--student_mode", "lora",
                                    "--lora_target_modules", "to_nothing"))
    from diffusers import UNet2DConditionModel

    bad = UNet2DConditionModel(sample_size=16, block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8,
                               cross_attention_dim=16, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                               up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=4)
    bad.save_pretrained(tmp_path / "bad_student")
    with pytest.raises(ValueError, match="has cross_attention_dim 16 but the teacher has 384"):
        _script().main(_inproc_args(tiny_teacher, shared_regions, tmp_path / "s", "--student_model_name_or_path",
                                    str(tmp_path / "bad_student")))


def test_resume_with_a_different_number_of_processes_works(tiny_teacher, shared_regions, tmp_path):
    """A 1-process checkpoint resumed by 2 processes: ARIA's state is global, so the run goes on."""
    out = tmp_path / "out"
    args = run_args(tiny_teacher, shared_regions, out, tmp_path / "s.jsonl", steps=3)
    subprocess.run(launch_cmd(args), check=True, env=env(), capture_output=True, timeout=TIMEOUT)
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
