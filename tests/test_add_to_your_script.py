"""docs/add-to-your-script.md: its snippet runs inside a minimal script shaped like diffusers' train_text_to_image.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "assets" / "minimal_text_to_image.py"
DOC = ROOT / "docs" / "add-to-your-script.md"

pytestmark = pytest.mark.slow


def _aria_blocks(text: str) -> list[str]:
    blocks = re.findall(r"# --- ARIA \((\d)/4\)[^\n]*\n(.*?)# --- end ARIA", text, flags=re.S)
    return [re.sub(r"^\s+", "", body, flags=re.M).strip() for _, body in sorted(blocks)]


def test_doc_snippet_is_the_script_snippet():
    doc_blocks = _aria_blocks(DOC.read_text())
    script_blocks = _aria_blocks(SCRIPT.read_text())
    assert len(script_blocks) == 4 and doc_blocks == script_blocks
    assert sum(len(b.splitlines()) for b in doc_blocks) <= 20


def test_snippet_runs_in_two_processes(tiny_teacher, tmp_path):
    from PIL import Image

    data = tmp_path / "images"
    data.mkdir()
    captions = ["a red apple", "a green apple", "a snowy mountain", "a rocky mountain", "a city street at night",
                "a busy city street", "a cat on a sofa", "a sleeping cat"]
    rng = np.random.default_rng(0)
    with open(data / "metadata.jsonl", "w") as fh:
        for i, c in enumerate(captions):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(data / f"{i}.png")
            fh.write(json.dumps({"file_name": f"{i}.png", "text": c}) + "\n")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), tiny_teacher,
           str(data), str(tmp_path / "out"), "3"]
    res = subprocess.run(cmd, env=dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1"),
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    r0, r1 = (json.load(open(tmp_path / "out" / f"rank{r}.json")) for r in range(2))
    assert r0["world"] == r1["world"] == 2
    assert r0["updates"] == r1["updates"] == 3 and r0["probs"] == r1["probs"]
    assert len(r0["regions_seen"]) == 3 and all(len(b) == 2 for b in r0["regions_seen"])
