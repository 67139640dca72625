"""validation.py: the labelled teacher-vs-student grid, decoded or drawn by the tiny teacher's renderer."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from diffusers_aria.training.validation import MIN_TILE, labelled_grid, run_validation


def _tiles(colours, size=16):
    from PIL import Image

    return [Image.new("RGB", (size, size), c) for c in colours]


def test_labelled_grid_upscales_small_pictures_and_makes_room_for_labels():
    rows = [_tiles([(255, 0, 0), (0, 0, 255)]), _tiles([(0, 255, 0), (0, 0, 0)])]
    plain = labelled_grid(rows, ["teacher", "student"], ["a red fox", "a bowl of ramen"])
    captioned = labelled_grid(rows, ["teacher", "student"], ["a red fox", "a bowl of ramen"],
                              captions=[["#1 0.90\nunexplained 10%", "x"], ["y", "z"]],
                              legend=[(_tiles([(9, 9, 9)], 24)[0], "#1 an anchor prompt")], title="step 3")
    assert plain.size[0] > 2 * MIN_TILE and plain.size[1] > 2 * MIN_TILE  # 16 px pictures, shown at 128
    assert captioned.size[1] > plain.size[1]
    arr = np.asarray(plain)
    assert (arr == (255, 0, 0)).all(-1).sum() == MIN_TILE * MIN_TILE  # the red picture, upscaled, whole
    with pytest.raises(ValueError, match="2 rows but 1 row labels"):
        labelled_grid(rows, ["teacher"], ["a", "b"])
    with pytest.raises(ValueError, match="2 columns but 3 column labels"):
        labelled_grid(rows, ["teacher", "student"], ["a", "b", "c"])


@pytest.fixture(scope="module")
def parts(tiny_teacher):
    from diffusers_aria.teachers.parts import load_teacher

    return load_teacher(tiny_teacher)


@pytest.mark.parametrize("rendered", [False, True])
def test_run_validation_writes_a_labelled_grid(parts, tiny_teacher, tmp_path, rendered):
    from accelerate import Accelerator
    from PIL import Image

    from diffusers_aria.embedded.latent_renderer import load_latent_renderer

    renderer = load_latent_renderer(tiny_teacher) if rendered else None
    assert (renderer is not None) == rendered
    prompts = ["a red fox in the snow", "a saxophone on a stage"]
    path = run_validation(Accelerator(cpu=True), parts.pipeline_components(), parts.denoiser, parts.denoiser, prompts,
                          str(tmp_path), 2, num_inference_steps=2, resolution=32, renderer=renderer)
    assert path.endswith("validation/step-2.png")
    width, height = Image.open(path).size
    assert width > 2 * MIN_TILE and height > 2 * MIN_TILE + 40  # two upscaled rows under a header of prompts
    if rendered:  # another resolution than the anchors': decoded by the VAE instead, with a warning
        other = run_validation(Accelerator(cpu=True), parts.pipeline_components(), parts.denoiser, parts.denoiser, prompts,
                               str(tmp_path), 3, num_inference_steps=2, resolution=16, renderer=renderer)
        assert Image.open(other).size[1] < height  # no captions, no legend


def test_rendered_rows_show_what_the_pipelines_generate(parts, tiny_teacher):
    """Latent mode: the same UNet in both rows gives the same latents, hence the same pictures and captions."""
    from diffusers_aria.embedded.latent_renderer import load_latent_renderer
    from diffusers_aria.training.validation import teacher_student_images

    renderer = load_latent_renderer(tiny_teacher)
    teacher_row, student_row = teacher_student_images(parts.pipeline_components(), parts.denoiser, parts.denoiser,
                                                      ["a red fox", "a bowl of ramen"], num_inference_steps=2,
                                                      resolution=32, output_type="latent")
    assert [tuple(z.shape) for z in teacher_row] == [(4, 16, 16)] * 2
    assert all(torch.equal(a, b) for a, b in zip(teacher_row, student_row))
    assert renderer.describe(torch.stack(teacher_row)) == renderer.describe(torch.stack(student_row))
