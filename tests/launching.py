"""Running the training script through a real `accelerate launch` subprocess, for the end-to-end tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

#: the training script of this checkout (a wheel ships the same file as diffusers_aria.training.train_aria_distill)
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train_scripts" / "train_aria_distill.py"


def launch_training(args: list[str], num_processes: int = 1, timeout: int = 600,
                    mixed_precision: str = "no") -> subprocess.CompletedProcess:
    """`accelerate launch train_aria_distill.py ARGS` on CPU (gloo for 2 processes); raises with the tails of
    its output when it fails."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", mixed_precision,
           "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    cmd += ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    res = subprocess.run(cmd + [str(TRAIN_SCRIPT)] + args, capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode != 0:
        raise AssertionError(f"training failed ({res.returncode}):\n{res.stdout[-3000:]}\n{res.stderr[-6000:]}")
    return res


def write_imagefolder(path) -> str:
    """An imagefolder of 8 random 40x48 images with 4 captions (metadata.jsonl): paired data for a run."""
    from PIL import Image

    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    captions = ["a red apple on a table", "a mountain lake at dawn", "a dog running on grass", "a city at night"]
    with open(os.path.join(path, "metadata.jsonl"), "w") as fh:
        for i in range(8):
            Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(os.path.join(path, f"{i}.png"))
            fh.write(json.dumps({"file_name": f"{i}.png", "text": captions[i % 4]}) + "\n")
    return str(path)
