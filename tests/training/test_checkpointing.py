"""checkpointing.py: atomic checkpoints, rotation, verification with fallback, and the run folder."""

import json
import logging
import os
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from diffusers_aria.training import checkpointing as ck


def write_checkpoint_files(path) -> None:
    """The files `accelerator.save_state` writes (model, optimizer, random states) plus the ARIA state."""
    os.makedirs(path, exist_ok=True)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, os.path.join(path, "model.safetensors"))
    torch.save({"state": {0: torch.zeros(4)}}, os.path.join(path, "optimizer.bin"))
    torch.save({"random_state": [1, 2, 3]}, os.path.join(path, "random_states_0.pkl"))
    save_file({"tracker.n": torch.ones(3)}, os.path.join(path, "aria_state.safetensors"))
    with open(os.path.join(path, "aria_state.json"), "w") as fh:
        json.dump({"state": {"last_step": 1}}, fh)


class FakeAccelerator:
    is_main_process = True

    def __init__(self):
        self.saved = []

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        write_checkpoint_files(path)
        self.saved.append(path)


def test_save_is_atomic_and_rotates(tmp_path):
    acc = FakeAccelerator()
    for step in (2, 4, 6):
        ck.save_checkpoint(acc, str(tmp_path), step, total_limit=2)
    assert [s for s, _ in ck.list_checkpoints(str(tmp_path))] == [4, 6]
    assert all(p.endswith(".tmp") for p in acc.saved)  # written under a temporary name first
    assert ck.resolve_resume_checkpoint(str(tmp_path), "latest").endswith("checkpoint-6")


def test_partial_checkpoints_are_never_latest_and_are_removed(tmp_path):
    write_checkpoint_files(tmp_path / "checkpoint-3")
    (tmp_path / ".checkpoint-9.tmp").mkdir()
    assert ck.resolve_resume_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-3")
    assert ck.remove_partial_checkpoints(str(tmp_path)) == [".checkpoint-9.tmp"]
    assert not (tmp_path / ".checkpoint-9.tmp").exists()


def test_resolve_explicit_and_missing(tmp_path):
    assert ck.resolve_resume_checkpoint(str(tmp_path), None) is None
    assert ck.resolve_resume_checkpoint(str(tmp_path), "latest") is None
    write_checkpoint_files(tmp_path / "checkpoint-5")
    assert ck.resolve_resume_checkpoint(str(tmp_path), "checkpoint-5") == str(tmp_path / "checkpoint-5")
    assert ck.checkpoint_step(str(tmp_path / "checkpoint-5")) == 5
    with pytest.raises(FileNotFoundError, match="not a checkpoint-N folder; use 'latest' or one of"):
        ck.resolve_resume_checkpoint(str(tmp_path), "checkpoint-7")


def _truncate(path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])


def test_latest_falls_back_past_a_truncated_file_with_a_warning_naming_it(tmp_path, caplog):
    for step in (200, 300):
        write_checkpoint_files(tmp_path / f"checkpoint-{step}")
    bad = tmp_path / "checkpoint-300" / "model.safetensors"
    _truncate(bad, -40)  # the header parses, the data is cut short: what safetensors calls "not fully covered"
    assert ck.checkpoint_problems(str(tmp_path / "checkpoint-200")) == []
    [problem] = ck.checkpoint_problems(str(tmp_path / "checkpoint-300"))
    assert problem.startswith(f"{bad}: tensor data ends at byte") and "truncated" in problem
    with caplog.at_level(logging.WARNING, logger="diffusers_aria.training.checkpointing"):
        assert ck.resolve_resume_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-200")
    assert f"skipping damaged checkpoint {tmp_path / 'checkpoint-300'}: {bad}" in caplog.text
    # named explicitly: an error naming the file and the valid alternatives
    with pytest.raises(ck.CheckpointError, match=r"'checkpoint-300' is damaged: .*model\.safetensors.*"
                                                 r"Valid checkpoints: \['checkpoint-200'\]"):
        ck.resolve_resume_checkpoint(str(tmp_path), "checkpoint-300")
    assert ck.resolve_resume_checkpoint(str(tmp_path), "checkpoint-300", verify=False).endswith("checkpoint-300")


@pytest.mark.parametrize(("damage", "expected"), [
    (lambda d: _truncate(d / "optimizer.bin", 100), "optimizer.bin: "),
    (lambda d: _truncate(d / "random_states_0.pkl", 0), "random_states_0.pkl: empty"),
    (lambda d: (d / "aria_state.json").write_text('{"state": '), "aria_state.json: not valid JSON"),
    (lambda d: (d / "aria_state.json").unlink(), "aria_state.json: missing (the ARIA state is a pair)"),
    (lambda d: (d / "model.safetensors").unlink(), "model.safetensors: missing (no model weights file)"),
    (lambda d: _truncate(d / "aria_state.safetensors", 5), "too short for a safetensors header"),
    (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 16), "does not fit in a file"),
])
def test_every_file_is_checked(tmp_path, damage, expected):
    ckpt = tmp_path / "checkpoint-4"
    write_checkpoint_files(ckpt)
    damage(ckpt)
    problems = ck.checkpoint_problems(str(ckpt))
    assert any(expected in p for p in problems), problems
    with pytest.raises(ck.CheckpointError, match="is damaged"):
        ck.verify_checkpoint(str(ckpt))


def test_latest_with_every_checkpoint_damaged_is_an_error(tmp_path):
    write_checkpoint_files(tmp_path / "checkpoint-2")
    _truncate(tmp_path / "checkpoint-2" / "model.safetensors", -1)
    with pytest.raises(ck.CheckpointError, match=r"every checkpoint in .* is damaged: checkpoint-2 \("):
        ck.resolve_resume_checkpoint(str(tmp_path), "latest")


def test_real_accelerate_checkpoint_verifies(tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model, opt = acc.prepare(model, opt)
    acc.save_state(str(tmp_path / "checkpoint-1"))
    assert ck.checkpoint_problems(str(tmp_path / "checkpoint-1")) == []


def test_each_run_gets_its_own_logging_dir(tmp_path):
    first = ck.run_logging_dir(str(tmp_path), "logs", now=0.0)
    assert os.path.dirname(first) == str(tmp_path / "logs") and os.path.basename(first).startswith("run-")
    os.makedirs(first)
    second = ck.run_logging_dir(str(tmp_path), "logs", now=0.0)  # the same second: a suffix
    assert second == first + "-2"
    resumed = ck.run_logging_dir(str(tmp_path), "logs", resume_path=str(tmp_path / "checkpoint-200"), now=0.0)
    assert resumed.endswith("-from-200")


def test_a_failed_start_leaves_no_folder(tmp_path):
    out = tmp_path / "fresh"
    with pytest.raises(ValueError, match="num_regions"):
        with ck.OutputDirGuard(str(out)):
            os.makedirs(out / "logs" / "run-1")  # what a run makes before its regions fail
            raise ValueError("num_regions=5000 is larger than the number of unique prompts")
    assert not out.exists()


def test_a_failed_start_in_an_existing_folder_removes_only_what_it_created(tmp_path):
    out = tmp_path / "busy"
    (out / "logs" / "run-old").mkdir(parents=True)
    (out / "precious.txt").write_text("keep me")
    with pytest.raises(KeyboardInterrupt):
        with ck.OutputDirGuard(str(out), is_main_process=True):
            (out / "logs" / "run-new").mkdir()
            (out / "teacher_latents").mkdir()
            (out / "teacher_latents" / "teacher_latents.json").write_text("{}")
            raise KeyboardInterrupt
    assert sorted(os.listdir(out)) == ["logs", "precious.txt"] and os.listdir(out / "logs") == ["run-old"]
    with pytest.raises(RuntimeError):  # not the main process: nothing is removed
        with ck.OutputDirGuard(str(out), is_main_process=False):
            (out / "teacher_latents").mkdir()
            raise RuntimeError("rank 1 fails")
    assert (out / "teacher_latents").is_dir()
    # once a checkpoint exists the run can resume: nothing is removed
    with pytest.raises(RuntimeError):
        with ck.OutputDirGuard(str(out)):
            write_checkpoint_files(out / "checkpoint-3")
            raise RuntimeError("later failure")
    assert (out / "checkpoint-3").is_dir() and (out / "teacher_latents").is_dir()
    ok = tmp_path / "ok"
    with ck.OutputDirGuard(str(ok)):  # success: everything stays
        ok.mkdir()
        (ok / "model_index.json").write_text("{}")
    assert (ok / "model_index.json").exists()


def test_move_run_aside_keeps_the_earlier_run_whole_and_links_its_caches(tmp_path):
    from diffusers_aria.training.checkpointing import move_run_aside

    out = tmp_path / "run"
    for rel in ("checkpoint-300/model.safetensors", "regions/region_ids.npy", "validation_final.png"):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(rel.encode())
    moved = move_run_aside(str(out), reuse=("regions", "teacher_latents"), now=0)
    assert moved == time.strftime(f"{out}.previous-%Y%m%d-%H%M%S", time.localtime(0))
    assert sorted(p.name for p in Path(moved).iterdir()) == ["checkpoint-300", "regions", "validation_final.png"]
    assert [p.name for p in out.iterdir()] == ["regions"]  # only the cache asked for (teacher_latents: none)
    assert os.path.samefile(out / "regions" / "region_ids.npy", Path(moved) / "regions" / "region_ids.npy")
    (out / "checkpoint-1").mkdir()
    assert move_run_aside(str(out), now=0) == moved + "-2"  # the same second: a new name, nothing replaced
    assert (Path(moved) / "checkpoint-300" / "model.safetensors").read_bytes() == b"checkpoint-300/model.safetensors"
