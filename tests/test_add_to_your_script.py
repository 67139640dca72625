"""docs/add-to-your-script.md: its blocks, pasted after the lines it names, run inside a script shaped like
diffusers' train_text_to_image.py (tests/assets/minimal_text_to_image.py), and resume exactly."""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "assets" / "minimal_text_to_image.py"
DOC = ROOT / "docs" / "add-to-your-script.md"
NUM_BLOCKS = 3

pytestmark = pytest.mark.slow


def _blocks(text: str) -> dict[int, str]:
    """Block number -> its code (indentation and the marker comments removed)."""
    found = re.findall(rf"# --- ARIA \((\d)/{NUM_BLOCKS}\)[^\n]*\n(.*?)# --- end ARIA", text, flags=re.S)
    return {int(n): re.sub(r"^\s+", "", body, flags=re.M).strip() for n, body in found}


def _named_lines(doc: str) -> dict[int, str]:
    """Block number -> the stock line the page says it follows (`**N. After `line`...**`)."""
    return {int(n): line for n, line in re.findall(r"\*\*(\d)\. After `([^`]+)`", doc)}


def _statement_before(script: str, marker: str) -> str:
    """Source of the statement that ends right before the line holding `marker` (comments skipped)."""
    lines = script.splitlines()
    at = next(i for i, line in enumerate(lines) if marker in line)
    while lines[at - 1].strip().startswith("#") or not lines[at - 1].strip():
        at -= 1
    ends = [node for node in ast.walk(ast.parse(script)) if isinstance(node, ast.stmt) and node.end_lineno == at]
    return ast.get_source_segment(script, min(ends, key=lambda n: n.end_lineno - n.lineno))


def test_doc_blocks_are_the_script_blocks_after_the_lines_the_doc_names():
    doc, script = DOC.read_text(), SCRIPT.read_text()
    doc_blocks, script_blocks = _blocks(doc), _blocks(script)
    assert sorted(doc_blocks) == list(range(1, NUM_BLOCKS + 1)) and doc_blocks == script_blocks
    code = [ln for b in doc_blocks.values() for ln in b.splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(code) <= 12, code
    named = _named_lines(doc)
    assert sorted(named) == list(range(1, NUM_BLOCKS + 1))
    for n, line in named.items():
        before = " ".join(_statement_before(script, f"# --- ARIA ({n}/{NUM_BLOCKS})").split())
        want = " ".join(line.split())
        assert before.startswith(want[:-len("...)")]) if want.endswith("(...)") else before == want, (n, before)


def _write_images(folder: Path, n: int = 64) -> None:
    from PIL import Image

    colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
    things = ["apple", "car", "mountain", "cat", "house", "boat", "guitar", "tree"]
    folder.mkdir()
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as fh:
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            caption = f"a {colours[i % 8]} {things[i // 8]}"
            fh.write(json.dumps({"file_name": f"{i}.png", "text": caption}) + "\n")


def _launch(tiny_teacher: str, data: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
           "--pretrained_model_name_or_path", tiny_teacher, "--train_data_dir", str(data), "--output_dir", str(out),
           "--train_batch_size", "8", "--gradient_accumulation_steps", "2", "--max_train_steps", "6",
           "--checkpointing_steps", "3", "--seed", "0", "--snr_gamma", "5", "--aria_test_warmup", "1", *extra]
    res = subprocess.run(cmd, env=dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    assert "not exact" not in res.stderr, res.stderr[-4000:]
    return res


def _rank_files(out: Path) -> list[dict]:
    return [json.load(open(out / f"trained_rank{r}.json")) for r in range(2)]


def _aria_state(checkpoint: Path) -> tuple[dict, dict]:
    from safetensors.numpy import load_file

    return load_file(checkpoint / "aria_state.safetensors"), json.load(open(checkpoint / "aria_state.json"))["state"]


def test_blocks_train_with_accumulation_in_two_processes_and_resume_exactly(tiny_teacher, tmp_path):
    data, straight, resumed = tmp_path / "images", tmp_path / "straight", tmp_path / "resumed"
    _write_images(data)
    # uninterrupted: 6 optimizer steps of 2 micro-batches, 64 rows = 4 global draws of 16 an epoch, so the
    # epochs end at micro-batches 4, 8, 12; with 2 DataLoader workers per process
    _launch(tiny_teacher, data, straight, "--dataloader_num_workers", "2")
    # killed after checkpoint-3 (mid-epoch 1): a new output dir holds that checkpoint and the regions only;
    # resumed without workers (the script restarts epoch 1, so its epochs end elsewhere)
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    shutil.copytree(straight / "aria_regions", resumed / "aria_regions")
    config = resumed / "aria_regions" / "regions_config.json"
    built_at = config.stat().st_mtime_ns
    _launch(tiny_teacher, data, resumed, "--dataloader_num_workers", "0", "--resume_from_checkpoint", "latest")
    assert config.stat().st_mtime_ns == built_at  # the regions were loaded, not rebuilt

    s0, s1 = _rank_files(straight)
    assert s0["world"] == 2 and s0["read_ahead"] == 2 * 2 + 2
    for r in (s0, s1):  # one ARIA update per optimizer step, at the script's global_step
        assert len(r["trained"]) == 12 and all(len(regions) == 8 for _, regions, _ in r["trained"])
        assert r["history_steps"] == [1, 2, 3, 4, 5, 6] and r["tracker_updates"] == 6
    assert s0["probs"] == s1["probs"]  # bit-identical on both ranks
    prior = np.sqrt(s0["sizes"]) / np.sqrt(s0["sizes"]).sum()
    assert np.abs(np.array(s0["probs"]) - prior).max() > 1e-3  # ARIA moved: the stream depends on it

    for straight_rank, resumed_rank in zip((s0, s1), _rank_files(resumed)):
        after = [m for m in straight_rank["trained"] if m[0] >= 3]
        assert resumed_rank["trained"] == after  # same rows (regions), same losses, same steps
        assert resumed_rank["probs"] == straight_rank["probs"]
        assert resumed_rank["history_steps"] == straight_rank["history_steps"]
    tensors_a, plain_a = _aria_state(straight / "checkpoint-6")
    tensors_b, plain_b = _aria_state(resumed / "checkpoint-6")
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
