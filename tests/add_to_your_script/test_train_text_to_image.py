"""docs/add-to-your-script.md in diffusers' train_text_to_image.py: the page's blocks pasted into a reduced copy of
its stock structure (tests/assets/minimal_text_to_image.py) and run as a user runs it, through `accelerate launch`
in two processes, stopped after a checkpoint, resumed without workers and compared with an uninterrupted run."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from pasting import ASSETS, aria_state, assert_resumed_like_uninterrupted, rank_records

pytestmark = pytest.mark.slow


def _launch(script: Path, tiny_teacher: str, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    with socket.socket() as s:  # a free port: another test run on this machine may hold accelerate's default
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), str(script), "--pretrained_model_name_or_path", tiny_teacher, "--train_data_dir", str(data),
           "--output_dir", str(out), "--train_batch_size", "8", "--gradient_accumulation_steps", "2",
           "--max_train_steps", "6", "--checkpointing_steps", "3", "--seed", "0", "--snr_gamma", "5",
           "--aria_test_warmup", "1", *extra]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=str(ASSETS))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "not exact" not in res.stderr, res.stderr[-4000:]
    return res


def test_blocks_train_with_accumulation_in_two_processes_and_resume_exactly(pasted, tiny_teacher, image_folder,
                                                                              tmp_path):
    script = pasted("train_text_to_image.py")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    # uninterrupted: 6 optimizer steps of 2 micro-batches, 64 rows = 4 global draws of 16 an epoch, so the
    # epochs end at micro-batches 4, 8, 12; with 2 DataLoader workers per process
    _launch(script, tiny_teacher, image_folder, straight, "--dataloader_num_workers", "2")
    # killed after checkpoint-3 (mid-epoch 1): a new output dir holds that checkpoint and the regions only;
    # resumed without workers (the script restarts epoch 1, so its epochs end elsewhere)
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copytree(straight / "aria_regions", resumed / "aria_regions")
    config = resumed / "aria_regions" / "regions_config.json"
    built_at = config.stat().st_mtime_ns
    _launch(script, tiny_teacher, image_folder, resumed, "--dataloader_num_workers", "0",
            "--resume_from_checkpoint", "latest")
    assert config.stat().st_mtime_ns == built_at  # the regions were loaded, not rebuilt

    s0, s1 = rank_records(straight)
    assert s0["world"] == 2 and s0["read_ahead"] == 2 * 2 + 2
    for r in (s0, s1):  # one ARIA update per optimizer step, at the script's global_step
        assert len(r["trained"]) == 12 and all(len(regions) == 8 for _, regions, _ in r["trained"])
        assert r["history_steps"] == [1, 2, 3, 4, 5, 6] and r["tracker_updates"] == 6
    assert s0["probs"] == s1["probs"]  # bit-identical on both ranks
    prior = np.asarray(s0["sizes"]) / np.sum(s0["sizes"])  # alpha=1: the prompt share
    assert np.abs(np.array(s0["probs"]) - prior).max() > 1e-3  # ARIA moved: the stream depends on it

    assert_resumed_like_uninterrupted(straight, resumed, 3)
    tensors_a, plain_a = aria_state(straight / "checkpoint-6")  # and what the checkpoints hold
    tensors_b, plain_b = aria_state(resumed / "checkpoint-6")
    assert plain_a == plain_b and sorted(tensors_a) == sorted(tensors_b)
    for key in tensors_a:
        np.testing.assert_array_equal(tensors_a[key], tensors_b[key], err_msg=key)
    assert (resumed / "aria_report.json").is_file()


def test_block_1_regions_of_a_dataset_column_are_built_once_then_loaded(tmp_path, minilm_embedder, caplog,
                                                                          monkeypatch):
    import datasets

    import diffusers_aria.regions as regions_module
    from diffusers_aria import RegionsMismatchError, load_or_build_regions

    captions = [f"a {c} {t}" for c in ("red", "blue", "green") for t in ("apple", "car", "mountain", "cat")]
    ds = datasets.Dataset.from_dict({"image": list(range(len(captions))), "text": captions})
    folder = str(tmp_path / "aria_regions")
    built = load_or_build_regions(folder, ds, column="text", num_regions=4, seed=None, progress=False)
    assert built.num_regions == 4 and built.metadata["seed"] == 0  # the stock --seed default, None, means 0

    def no_build(*args, **kwargs):
        raise AssertionError("build_regions must not run when the folder holds regions of this pool")

    monkeypatch.setattr(regions_module, "build_regions", no_build)
    loaded = load_or_build_regions(folder, ds, column="text", num_regions=4, seed=None)
    np.testing.assert_array_equal(loaded.region_ids, built.region_ids)
    with pytest.raises(RegionsMismatchError, match=r"num_regions 4 \(this run: 5\)"):  # strict (issue 26)
        load_or_build_regions(folder, ds, column="text", num_regions=5, seed=None)
    with pytest.raises(RegionsMismatchError, match="does not match this prompt pool"):
        load_or_build_regions(folder, ds.map(lambda r: {"text": r["text"] + "!"}), column="text", num_regions=4)
    # the error names the folder to delete (issue 27)
    with pytest.raises(RegionsMismatchError, match=rf"num_regions 4 \(this run: 5\); delete '{folder}' to build"):
        load_or_build_regions(folder, ds, column="text", num_regions=5, seed=None)


def test_block_1_regions_of_selected_rows_name_the_folder_and_the_seed(tmp_path, minilm_embedder):
    """With --max_train_samples the stock script's pool is `shuffle(seed=args.seed).select(...)` of the dataset:
    another --seed selects other rows, and the error says to keep --seed as well as which folder to delete."""
    import datasets

    from diffusers_aria import RegionsMismatchError, load_or_build_regions

    captions = [f"a {c} {t}" for c in ("red", "blue", "green") for t in ("apple", "car", "mountain", "cat")]
    ds = datasets.Dataset.from_dict({"image": list(range(len(captions))), "text": captions})
    folder = str(tmp_path / "aria_regions")
    load_or_build_regions(folder, ds.shuffle(seed=1).select(range(8)), column="text", num_regions=3, seed=1,
                          progress=False)
    with pytest.raises(RegionsMismatchError) as err:  # the same --max_train_samples, another --seed
        load_or_build_regions(folder, ds.shuffle(seed=2).select(range(8)), column="text", num_regions=3, seed=2)
    message = str(err.value)
    assert message.startswith(f"'{folder}': the regions folder does not match this prompt pool"), message
    assert f"delete '{folder}' to build them again" in message
    assert "pass the same --seed on every launch" in message
    with pytest.raises(RegionsMismatchError) as err:  # the whole dataset: no seed picks its rows
        load_or_build_regions(folder, ds.select(range(8)).flatten_indices(), column="text", num_regions=3, seed=1)
    assert f"delete '{folder}'" in str(err.value) and "--seed" not in str(err.value)
