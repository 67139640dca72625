"""docs/add-to-your-script.md in the LoRA, SDXL and LoRA SDXL examples: the page's blocks pasted into reduced
copies of their stock structure (tests/assets/minimal_text_to_image_{lora,sdxl,lora_sdxl}.py), each trained in
two processes with gradient accumulation and DataLoader workers, stopped after a checkpoint, resumed with fewer
workers, and compared with the uninterrupted run.

The runs are forked from one fork server (as `accelerate.debug_launcher` forks, with its environment), 4 optimizer
steps of 2 micro-batches each, so that the three scripts add little to the suite; the SD page's own test goes
through `accelerate launch`.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from pasting import assert_resumed_like_uninterrupted, rank_records, run_two_processes

pytestmark = pytest.mark.slow

# 7 optimizer steps of 2 micro-batches of 4 rows a process: a global draw of 8 rows, 8 draws an epoch, so the
# epochs end at steps 4 and 8. The one checkpoint, at step 5, is mid-epoch: the resumed run restarts that epoch
# (the stock scripts do), which is the last one (the stock loop stops only at the end of its last epoch). ARIA
# moves from step 1 on; with 2 workers its new probabilities apply 6 draws later (read_ahead), so the draws
# after the resume follow probabilities that ARIA set.
STEPS, CHECKPOINT, BATCH = 7, 5, 4
COMMON = ["--train_batch_size", BATCH, "--gradient_accumulation_steps", "2", "--max_train_steps", STEPS,
          "--checkpointing_steps", CHECKPOINT, "--seed", "0", "--aria_test_warmup", "1"]


def _train_then_resume(script: Path, teacher: str, data: Path, tmp_path: Path, extra=(), straight_extra=(),
                       workers=(2, 0)) -> tuple[Path, Path]:
    """An uninterrupted run, then a run resumed in a new folder from its checkpoint (and its regions) only."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    base = ["--pretrained_model_name_or_path", teacher, "--train_data_dir", data, *COMMON, *extra]
    run_two_processes(script, [*base, "--output_dir", straight, "--dataloader_num_workers", workers[0],
                               *straight_extra])
    resumed.mkdir()
    shutil.copytree(straight / f"checkpoint-{CHECKPOINT}", resumed / f"checkpoint-{CHECKPOINT}")
    shutil.copytree(straight / "aria_regions", resumed / "aria_regions")
    built_at = (resumed / "aria_regions" / "regions_config.json").stat().st_mtime_ns
    run_two_processes(script, [*base, "--output_dir", resumed, "--dataloader_num_workers", workers[1],
                               "--resume_from_checkpoint", "latest"])
    assert (resumed / "aria_regions" / "regions_config.json").stat().st_mtime_ns == built_at  # loaded
    return straight, resumed


def _assert_trained_as_the_page_says(out: Path, workers: int) -> None:
    """Two processes, one ARIA update per optimizer step at global_step, ranks bit-identical, ARIA moved."""
    r0, r1 = rank_records(out)
    assert r0["world"] == r1["world"] == 2
    assert r0["read_ahead"] == 2 * workers + 2  # prefetch_factor 2 per worker, + accelerate's look-ahead
    for rank in (r0, r1):
        assert len(rank["trained"]) == 2 * STEPS and all(len(regions) == BATCH for _, regions, _ in rank["trained"])
        assert rank["history_steps"] == list(range(1, STEPS + 1)) and rank["tracker_updates"] == STEPS
    assert r0["probs"] == r1["probs"]
    assert r0["trained"] != r1["trained"]  # each rank its own slice of the global draw
    prior = np.asarray(r0["sizes"]) / np.sum(r0["sizes"])  # alpha=1: the prompt share
    assert np.abs(np.array(r0["probs"]) - prior).max() > 1e-3  # ARIA moved: the stream depends on it


def _scalars(logs: Path) -> dict[str, list[int]]:
    """Tag -> steps of every scalar in the tensorboard event files under `logs`."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[str, list[int]] = {}
    for events in logs.rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            steps.setdefault(tag, []).extend(e.step for e in acc.Scalars(tag))
    return steps


def test_lora_script(pasted, tiny_teacher, image_folder, tmp_path, doc):
    script = pasted("train_text_to_image_lora.py")
    # the straight run logs to tensorboard, every 2nd optimizer step
    straight, resumed = _train_then_resume(
        script, tiny_teacher, image_folder, tmp_path, workers=(2, 1),
        straight_extra=["--report_to", "tensorboard", "--aria_test_log_every", "2"])
    _assert_trained_as_the_page_says(straight, workers=2)
    assert_resumed_like_uninterrupted(straight, resumed, CHECKPOINT)
    # the LoRA hooks saved the adapter only, beside ARIA's state
    checkpoint = straight / f"checkpoint-{CHECKPOINT}"
    assert (checkpoint / "pytorch_lora_weights.safetensors").is_file() and (checkpoint / "aria_state.json").is_file()
    assert not list(checkpoint.glob("model*.safetensors"))

    # every aria/ tag the page names is written, every log_every optimizer steps, under output_dir/logs
    logged = _scalars(straight / "logs" / "text2image-fine-tune")
    aria_tags = {tag: s for tag, s in logged.items() if tag.startswith("aria/")}
    assert all(sorted(s) == [2, 4, 6] for s in aria_tags.values()), aria_tags
    assert sorted(logged["train_loss"]) == list(range(1, STEPS + 1))
    k = len(rank_records(straight)[0]["sizes"])  # block 1's default: about 4 captions a region
    assert len(aria_tags) == 9 + 3 * k
    named = set(re.findall(r"`(aria/[a-z_/]+(?:region_\d{3})?)`", doc))
    assert {"aria/kl_to_prompt_share", "aria/real_spread", "aria/prob/region_000"} <= named
    assert named <= set(aria_tags), named - set(aria_tags)
    assert re.search(r"K regions that is 9 \+ 3K\s+tags", doc)


def test_sdxl_script(pasted, tiny_sdxl_teacher, image_folder, tmp_path):
    """The DataLoader reads the precomputed embeddings and latents (`dataset.map`), block 1 the captions of
    `dataset["train"]`: the regions are those of the same rows."""
    script = pasted("train_text_to_image_sdxl.py")
    straight, resumed = _train_then_resume(script, tiny_sdxl_teacher, image_folder, tmp_path, workers=(2, 0),
                                           extra=["--snr_gamma", "5"])
    _assert_trained_as_the_page_says(straight, workers=2)
    assert_resumed_like_uninterrupted(straight, resumed, CHECKPOINT)
    # the stock hooks saved the UNet in diffusers' layout, beside ARIA's state
    checkpoint = straight / f"checkpoint-{CHECKPOINT}"
    assert (checkpoint / "unet" / "config.json").is_file() and (checkpoint / "aria_state.safetensors").is_file()


def test_lora_sdxl_script(pasted, tiny_sdxl_teacher, image_folder, tmp_path):
    """LoRA on the UNet (its adapter alone in the checkpoint), the prompts encoded at every step from
    `input_ids_one` / `input_ids_two`, `--debug_loss`'s file names in the batch beside the region column.
    (`--train_text_encoder` is left out: transformers 5.25 refuses text-encoder adapters with peft 0.21.2, the
    newest this environment installs, with or without ARIA.)"""
    script = pasted("train_text_to_image_lora_sdxl.py")
    straight, resumed = _train_then_resume(script, tiny_sdxl_teacher, image_folder, tmp_path, workers=(2, 1),
                                           extra=["--debug_loss"])
    _assert_trained_as_the_page_says(straight, workers=2)
    assert_resumed_like_uninterrupted(straight, resumed, CHECKPOINT)
    from safetensors import safe_open

    with safe_open(straight / f"checkpoint-{CHECKPOINT}" / "pytorch_lora_weights.safetensors", "pt") as fh:
        prefixes = {key.split(".")[0] for key in fh.keys()}
    assert prefixes == {"unet"}
