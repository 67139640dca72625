"""Running the training script for the end-to-end tests: through a real `accelerate launch` subprocess (two
processes, the launcher itself, a kill), or in this process (one process: the script's own logic, without the
~12 s of a new interpreter's imports)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

#: the training script of this checkout (a wheel ships the same file as diffusers_aria.training.train_aria_distill)
TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "train_scripts" / "train_aria_distill.py"


def training_script():
    """The training script of this checkout, imported as a module (its `parse_args` and `main`)."""
    if str(TRAIN_SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(TRAIN_SCRIPT.parent))
    import train_aria_distill

    return train_aria_distill


def run_training(args: list[str]):
    """`main(parse_args(ARGS))` of the training script in this process, as one process of `accelerate launch
    --cpu` runs it, from a clean accelerate state (an earlier run's mixed precision would otherwise stick), and
    leaves a clean one. Returns what main() returns."""
    script = training_script()
    with one_process_run():
        return script.main(script.parse_args(args))


@contextlib.contextmanager
def one_process_run():
    """A run of an `Accelerator` script in this process, as one process of `accelerate launch --cpu` runs it: one
    torch thread (the launches set OMP_NUM_THREADS=1: the same arithmetic, bit for bit) and a clean accelerate
    state, before (an earlier run's mixed precision would otherwise stick) and after (for the runs of other tests
    that call a script's main() directly)."""
    import torch

    reset_accelerate_state()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        reset_accelerate_state()


def reset_accelerate_state() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    GradientState._reset_state()


def launch_training(args: list[str], num_processes: int = 1, timeout: int = 600) -> subprocess.CompletedProcess:
    """`accelerate launch train_aria_distill.py ARGS` on CPU (gloo for 2 processes); raises with the tails of
    its output when it fails."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no",
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
