"""checkpointing.py: atomic checkpoints, rotation, and which one is the latest."""

import os

import pytest

from diffusers_aria import checkpointing as ck


class FakeAccelerator:
    is_main_process = True

    def __init__(self):
        self.saved = []

    def wait_for_everyone(self):
        pass

    def save_state(self, path):
        os.makedirs(path, exist_ok=True)
        with open(os.path.join(path, "model.safetensors"), "w") as fh:
            fh.write("w")
        self.saved.append(path)


def test_save_is_atomic_and_rotates(tmp_path):
    acc = FakeAccelerator()
    for step in (2, 4, 6):
        ck.save_checkpoint(acc, str(tmp_path), step, total_limit=2)
    assert [s for s, _ in ck.list_checkpoints(str(tmp_path))] == [4, 6]
    assert all(p.endswith(".tmp") for p in acc.saved)  # written under a temporary name first
    assert ck.resolve_resume_checkpoint(str(tmp_path), "latest").endswith("checkpoint-6")


def test_partial_checkpoints_are_never_latest_and_are_removed(tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    (tmp_path / ".checkpoint-9.tmp").mkdir()
    assert ck.resolve_resume_checkpoint(str(tmp_path), "latest") == str(tmp_path / "checkpoint-3")
    assert ck.remove_partial_checkpoints(str(tmp_path)) == [".checkpoint-9.tmp"]
    assert not (tmp_path / ".checkpoint-9.tmp").exists()


def test_resolve_explicit_and_missing(tmp_path):
    assert ck.resolve_resume_checkpoint(str(tmp_path), None) is None
    assert ck.resolve_resume_checkpoint(str(tmp_path), "latest") is None
    (tmp_path / "checkpoint-5").mkdir()
    assert ck.resolve_resume_checkpoint(str(tmp_path), "checkpoint-5") == str(tmp_path / "checkpoint-5")
    assert ck.checkpoint_step(str(tmp_path / "checkpoint-5")) == 5
    with pytest.raises(FileNotFoundError, match="not a checkpoint-N folder; use 'latest' or one of"):
        ck.resolve_resume_checkpoint(str(tmp_path), "checkpoint-7")
