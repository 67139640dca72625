"""Validation images: the teacher and the student on the same prompts and seeds, as one grid.

The grid's first row is the teacher, the second the student (one column a prompt). It is saved as PNG and
sent to the accelerate trackers that can show images (tensorboard, wandb).
"""

from __future__ import annotations

import os

import numpy as np
import torch


def make_grid(rows: list[list], pad: int = 2):
    """Paste a list of rows of equally sized PIL images into one image."""
    from PIL import Image

    h = max(im.size[1] for row in rows for im in row)
    w = max(im.size[0] for row in rows for im in row)
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), color=(255, 255, 255))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im, (pad + j * (w + pad), pad + i * (h + pad)))
    return grid


@torch.no_grad()
def teacher_student_images(components: dict, teacher_unet, student_unet, prompts: list[str], seed: int = 0,
                           num_inference_steps: int = 25, guidance_scale: float = 5.0, resolution: int | None = None,
                           device: torch.device | str = "cpu") -> tuple[list, list]:
    """Generate one image per prompt with the teacher and with the student (same seeds, same scheduler)."""
    from diffusers import StableDiffusionPipeline

    images = []
    for unet in (teacher_unet, student_unet):
        pipe = StableDiffusionPipeline(unet=unet, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **components)
        pipe.set_progress_bar_config(disable=True)
        row = []
        for i, prompt in enumerate(prompts):
            gen = torch.Generator(device="cpu").manual_seed(seed + i)
            out = pipe(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=gen,
                       height=resolution, width=resolution)
            row.append(out.images[0])
        images.append(row)
    return images[0], images[1]


def log_validation(accelerator, grid, step: int, prompts: list[str]) -> None:
    """Send the grid to every tracker of `accelerator` that shows images."""
    arr = np.asarray(grid)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation/teacher_vs_student", arr[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation/teacher_vs_student": wandb.Image(grid, caption=" | ".join(prompts))}, step=step)


def run_validation(accelerator, components: dict, teacher_unet, student_unet, prompts: list[str], output_dir: str,
                   step: int, seed: int = 0, num_inference_steps: int = 25, guidance_scale: float = 5.0,
                   resolution: int | None = None, name: str | None = None) -> str | None:
    """Generate, save (`output_dir/validation/step-N.png` or `name`) and log the teacher-vs-student grid."""
    if not prompts:
        return None
    student_unet = accelerator.unwrap_model(student_unet)
    was_training = student_unet.training
    student_unet.eval()
    with accelerator.autocast():  # a float32 student beside a text encoder and VAE in the weight dtype
        teacher_row, student_row = teacher_student_images(components, teacher_unet, student_unet, prompts, seed=seed,
                                                          num_inference_steps=num_inference_steps,
                                                          guidance_scale=guidance_scale, resolution=resolution,
                                                          device=accelerator.device)
    student_unet.train(was_training)
    grid = make_grid([teacher_row, student_row])
    path = None
    if accelerator.is_main_process:
        path = os.path.join(output_dir, name) if name else os.path.join(output_dir, "validation", f"step-{step}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        grid.save(path + ".tmp.png")
        os.replace(path + ".tmp.png", path)
        log_validation(accelerator, grid, step, prompts)
    return path
