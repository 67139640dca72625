"""Fixtures of the add-to-your-script tests: the page, a pasted script, one image folder for every script, the
tiny SDXL teacher, and a two-process run of a pasted script."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from pasting import ASSETS, DOC, NUM_IMAGES, SCRIPTS, paste


@pytest.fixture(scope="session")
def doc() -> str:
    return DOC.read_text()


@pytest.fixture
def pasted(doc, tmp_path):
    """`pasted("train_text_to_image_lora.py")`: the path of that script's asset with the page's blocks pasted."""

    def make(example: str) -> Path:
        path = tmp_path / f"pasted_{SCRIPTS[example]}"
        path.write_text(paste((ASSETS / SCRIPTS[example]).read_text(), doc))
        return path

    return make


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """An imagefolder of 64 random 32x32 images, each with its own caption (metadata.jsonl)."""
    from PIL import Image

    colours = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
    things = ["apple", "car", "mountain", "cat", "house", "boat", "guitar", "tree"]
    folder = tmp_path_factory.mktemp("add_to_your_script") / "images"
    folder.mkdir()
    rng = np.random.default_rng(0)
    with open(folder / "metadata.jsonl", "w") as fh:
        for i in range(NUM_IMAGES):
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(folder / f"{i}.png")
            fh.write(json.dumps({"file_name": f"{i}.png", "text": f"a {colours[i % 8]} {things[i // 8]}"}) + "\n")
    return folder


@pytest.fixture(scope="session")
def tiny_sdxl_teacher(tmp_path_factory) -> str:
    """`diffusers-aria make-tiny-teacher --family sdxl`: a random-weight StableDiffusionXLPipeline (32 px)."""
    from diffusers_aria.embedded.tiny_families import make_tiny_family_teacher

    return make_tiny_family_teacher(str(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl"), "sdxl")
