"""Validation images: the teacher and the student on the same prompts and seeds, as one labelled grid.

The grid has a header with each column's prompt, a "teacher" row and a "student" row, and small pictures
upscaled (nearest neighbour, so pixels stay sharp) to at least `MIN_TILE` pixels. With a `renderer` (the
tiny teacher's `LatentRenderer`), the pipelines' latents are drawn by it instead of decoded by the VAE:
each tile shows the anchors the latent is made of, captioned with their weights, and a legend names the
anchors' prompts. The grid is saved as PNG and sent to the accelerate trackers that show images
(tensorboard, wandb).
"""

from __future__ import annotations

import logging
import os
import textwrap

import numpy as np
import torch

from ..utils.atomic import atomic_save

logger = logging.getLogger(__name__)

#: Smallest side of a grid tile in pixels: smaller pictures are upscaled to it.
MIN_TILE = 128


def make_grid(rows: list[list], pad: int = 2):
    """Paste a list of rows of equally sized PIL images into one image (no labels)."""
    from PIL import Image

    h = max(im.size[1] for row in rows for im in row)
    w = max(im.size[0] for row in rows for im in row)
    ncol = max(len(r) for r in rows)
    grid = Image.new("RGB", (ncol * (w + pad) + pad, len(rows) * (h + pad) + pad), color=(255, 255, 255))
    for i, row in enumerate(rows):
        for j, im in enumerate(row):
            grid.paste(im, (pad + j * (w + pad), pad + i * (h + pad)))
    return grid


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _text_width(draw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return int(right - left)


def _wrap(draw, text: str, font, width: int, max_lines: int) -> list[str]:
    """`text` in lines of at most `width` pixels, at most `max_lines` of them (the last one cut with ...)."""
    chars = max(8, len(text))
    while chars > 8:
        lines = textwrap.wrap(text, chars)
        if all(_text_width(draw, line, font) <= width for line in lines):
            break
        chars -= 2
    lines = textwrap.wrap(text, chars) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: max(len(lines[-1]) - 3, 1)].rstrip() + "..."
    return lines


def labelled_grid(rows: list[list], row_labels: list[str], column_labels: list[str],
                  captions: list[list[str]] | None = None, legend: list[tuple] | None = None,
                  title: str | None = None, min_tile: int = MIN_TILE, pad: int = 6):
    """One picture: a title, a header of column labels (wrapped), labelled rows, captions, a legend.

    Args:
        rows: rows of PIL images (each row one model, each column one prompt).
        row_labels: one label per row, e.g. ["teacher", "student"].
        column_labels: one label per column (the prompts).
        captions: optional text under each tile (lines split at "\\n"), same shape as `rows`.
        legend: optional (small PIL image, text) entries listed under the grid.
        title: optional line above the grid.
        min_tile: tiles smaller than this are upscaled (nearest neighbour) to it.
    """
    from PIL import Image, ImageDraw

    if len(row_labels) != len(rows):
        raise ValueError(f"{len(rows)} rows but {len(row_labels)} row labels")
    ncol = max(len(r) for r in rows)
    if len(column_labels) != ncol:
        raise ValueError(f"{ncol} columns but {len(column_labels)} column labels")
    tile = max(min_tile, *(max(im.size) for row in rows for im in row))
    font, small, bold = _font(14), _font(12), _font(16)
    scratch = ImageDraw.Draw(Image.new("RGB", (8, 8)))
    line_h, small_h = 17, 15
    label_w = max(_text_width(scratch, label, bold) for label in row_labels) + 2 * pad
    headers = [_wrap(scratch, label, font, tile, 3) for label in column_labels]
    header_h = max(len(h) for h in headers) * line_h + pad
    width = label_w + ncol * (tile + pad) + pad
    title_lines = _wrap(scratch, title, font, width - 2 * pad, 3) if title else []
    title_h = len(title_lines) * line_h + pad if title else 0
    caption_lines = max((len(c.split("\n")) for row in captions for c in row), default=0) if captions else 0
    caption_h = caption_lines * small_h + 2 if captions else 0
    row_h = tile + caption_h + pad

    legend_lines: list[list[tuple]] = []
    col_w = 0
    if legend:  # in columns of equal width, as many as fit
        col_w = max(icon.size[0] + 4 + _text_width(scratch, text, small) for icon, text in legend) + 3 * pad
        per_line = max(1, (width - pad) // col_w)
        legend_lines = [legend[i:i + per_line] for i in range(0, len(legend), per_line)]
    legend_h = sum(max(icon.size[1] for icon, _ in line) + 4 for line in legend_lines) + (pad if legend else 0)

    height = title_h + header_h + len(rows) * row_h + legend_h + pad
    grid = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    y = pad
    for k, line in enumerate(title_lines):
        draw.text((pad, y + k * line_h), line, fill=(0, 0, 0), font=font)
    y += title_h
    for j, lines in enumerate(headers):
        x0 = label_w + j * (tile + pad)
        for k, line in enumerate(lines):
            draw.text((x0 + (tile - _text_width(draw, line, font)) // 2, y + k * line_h), line, fill=(0, 0, 0),
                      font=font)
    y += header_h
    for i, row in enumerate(rows):
        draw.text((pad, y + tile // 2 - 8), row_labels[i], fill=(0, 0, 0), font=bold)
        for j, im in enumerate(row):
            if im.size != (tile, tile):
                resample = Image.Resampling.NEAREST if max(im.size) <= tile // 2 else Image.Resampling.LANCZOS
                im = im.resize((tile, tile), resample)
            x0 = label_w + j * (tile + pad)
            grid.paste(im.convert("RGB"), (x0, y))
            if captions:
                for k, text in enumerate(captions[i][j].split("\n")):
                    draw.text((x0 + (tile - _text_width(draw, text, small)) // 2, y + tile + 2 + k * small_h), text,
                              fill=(60, 60, 60), font=small)
        y += row_h
    for line in legend_lines:
        x, lh = pad, max(icon.size[1] for icon, _ in line)
        for icon, text in line:
            grid.paste(icon.convert("RGB"), (x, y))
            draw.text((x + icon.size[0] + 4, y + (lh - 12) // 2), text, fill=(0, 0, 0), font=small)
            x += col_w
        y += lh + 4
    return grid


@torch.no_grad()
def teacher_student_images(components: dict, teacher_unet, student_unet, prompts: list[str], seed: int = 0,
                           num_inference_steps: int = 25, guidance_scale: float = 5.0, resolution: int | None = None,
                           output_type: str = "pil", family=None, pipeline_class: str | None = None,
                           student_scheduler=None) -> tuple[list, list]:
    """One output per prompt from the teacher and from the student (same seeds, same scheduler), on the device
    the denoisers and `components` are on; `family` (`families.Family`, default SD 1.x/2.x) and
    `pipeline_class` make the pipelines; `student_scheduler` replaces `components`' scheduler in the
    student's pipeline (a student trained in another parametrisation than the teacher, `--prediction_type`).

    `output_type="pil"` gives PIL images; `"latent"` gives each prompt's latent `[C, H, W]` (float32, CPU).
    """
    from ..teachers.families import FAMILIES

    family = family or FAMILIES["sd"]
    outputs = []
    student_parts = dict(components, **({"scheduler": student_scheduler} if student_scheduler is not None else {}))
    for unet, parts in ((teacher_unet, components), (student_unet, student_parts)):
        pipe = family.make_pipeline(dict(parts), unet, pipeline_class)
        pipe.set_progress_bar_config(disable=True)
        row = []
        for i, prompt in enumerate(prompts):
            gen = torch.Generator(device="cpu").manual_seed(seed + i)
            out = pipe(prompt, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, generator=gen,
                       height=resolution, width=resolution, output_type=output_type, **family.call_kwargs())
            row.append(out.images[0].float().cpu() if output_type == "latent" else out.images[0])
        outputs.append(row)
    return outputs[0], outputs[1]


def validation_grid(components: dict, teacher_unet, student_unet, prompts: list[str], seed: int = 0,
                    num_inference_steps: int = 25, guidance_scale: float = 5.0, resolution: int | None = None,
                    renderer=None, title: str | None = None, family=None, pipeline_class: str | None = None,
                    student_scheduler=None):
    """The labelled teacher-vs-student grid (a PIL image): VAE images, or `renderer` pictures of the latents."""
    kw = {"seed": seed, "num_inference_steps": num_inference_steps, "guidance_scale": guidance_scale,
          "resolution": resolution, "family": family, "pipeline_class": pipeline_class,
          "student_scheduler": student_scheduler}
    if renderer is not None:
        vae = components["vae"]
        size = (resolution // 2 ** (len(vae.config.block_out_channels) - 1) if resolution
                else int(teacher_unet.config.sample_size))
        if tuple(renderer.patterns.shape[-2:]) != (size, size):
            logger.warning("the renderer's anchors are %s latents, these are %dx%d: decoding with the VAE instead",
                           "x".join(map(str, renderer.patterns.shape[-2:])), size, size)
            renderer = None
    if renderer is None:
        rows = teacher_student_images(components, teacher_unet, student_unet, prompts, **kw)
        return labelled_grid(list(rows), ["teacher", "student"], prompts, title=title)
    latent_rows = teacher_student_images(components, teacher_unet, student_unet, prompts, output_type="latent", **kw)
    stacked = [torch.stack(row) for row in latent_rows]
    rows = [renderer.render(z) for z in stacked]
    captions = [renderer.describe(z) for z in stacked]
    legend = renderer.legend(torch.cat(stacked))
    return labelled_grid(rows, ["teacher", "student"], prompts, captions=captions, legend=legend, title=title)


def log_validation(accelerator, grid, step: int, prompts: list[str]) -> None:
    """Send the grid to every tracker of `accelerator` that shows images."""
    arr = np.asarray(grid)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation/teacher_vs_student", arr[None], step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation/teacher_vs_student": wandb.Image(grid, caption=" | ".join(prompts))}, step=step)


RENDER_TITLE = ("tiny teacher: each glyph is an anchor prompt (legend), opacity = its weight in the latent; "
                "grey speckle = the part no anchor explains")


def run_validation(accelerator, components: dict, teacher_unet, student_unet, prompts: list[str], output_dir: str,
                   step: int, seed: int = 0, num_inference_steps: int = 25, guidance_scale: float = 5.0,
                   resolution: int | None = None, name: str | None = None, renderer=None, family=None,
                   pipeline_class: str | None = None, student_scheduler=None) -> str | None:
    """Generate, save (`output_dir/validation/step-N.png` or `name`) and log the teacher-vs-student grid.

    `renderer`: the tiny teacher's `LatentRenderer` (`tiny_teacher.load_latent_renderer(teacher_path)`, None
    for other teachers) to draw the latents instead of decoding them with the VAE.
    """
    if not prompts:
        return None
    student_unet = accelerator.unwrap_model(student_unet)
    was_training = student_unet.training
    student_unet.eval()
    title = f"step {step}" + (f" - {RENDER_TITLE}" if renderer is not None else "")
    with accelerator.autocast():  # a float32 student beside a text encoder and VAE in the weight dtype
        grid = validation_grid(components, teacher_unet, student_unet, prompts, seed=seed,
                               num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                               resolution=resolution, renderer=renderer, title=title, family=family,
                               pipeline_class=pipeline_class, student_scheduler=student_scheduler)
    student_unet.train(was_training)
    path = None
    if accelerator.is_main_process:
        path = os.path.join(output_dir, name) if name else os.path.join(output_dir, "validation", f"step-{step}.png")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_save(path, lambda tmp: grid.save(tmp, format="PNG"))
        log_validation(accelerator, grid, step, prompts)
    return path
