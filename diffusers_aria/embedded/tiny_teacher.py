"""Embedded default teacher: a tiny, offline ``StableDiffusionPipeline`` whose output depends on its prompt.

ARIA needs a teacher diffusion model to distil, but the project must run without internet access and
without shipping third-party weights.  :func:`make_tiny_teacher` therefore *builds* a teacher:

* a small :class:`~diffusers.UNet2DConditionModel` (latents ``4 x L x L`` with ``L = resolution / 2``,
  two resolution levels with ``layers_per_block=2`` so block-removal students can drop layers,
  cross-attention dimension 384),
* a small, randomly initialised :class:`~diffusers.AutoencoderKL` (two blocks, so
  ``vae_scale_factor == 2``; it only turns latents into pictures of the right size, which look like
  colour noise: see :class:`~diffusers_aria.embedded.latent_renderer.LatentRenderer` for pictures that mean something),
* the real all-MiniLM-L6-v2 text encoder (:mod:`diffusers_aria.embedded.minilm`, prompts padded to
  :data:`TOKEN_LENGTH` tokens),
* a Stable-Diffusion-style :class:`~diffusers.DDPMScheduler` (1000 steps, scaled-linear betas,
  epsilon prediction).

A randomly initialised UNet hardly reacts to its prompt, so the UNet is trained for a short while
(text encoder frozen) with the ordinary epsilon-prediction loss on synthetic, prompt-dependent clean
latents (:mod:`diffusers_aria.embedded.synthetic_latents`: mixtures of anchor patterns, by sentence-embedding
similarity to anchor prompts), so the teacher's noise prediction ends up clearly depending on the
prompt.  10 % of the training prompts are replaced by the empty prompt, so classifier-free guidance
works as usual.

How strongly the UNet depends on its prompt is measured by
:func:`~diffusers_aria.embedded.sensitivity.text_sensitivity`; the values before and after training are stored in
``aria_teacher_report.json`` inside the teacher folder, together with a hash of the settings so a second
call with the same settings returns the cached teacher.  The anchors are saved beside it in
``aria_anchors.safetensors``, for the :class:`~diffusers_aria.embedded.latent_renderer.LatentRenderer`.

This module holds the configs, the training and the building/caching.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..utils.atomic import atomic_write_text, replace_dir
from ..utils.file_names import TEACHER_REPORT as REPORT_NAME
from . import TINY_TEACHER_RECIPE, TINY_TEACHER_TRAIN_STEPS
from .latent_renderer import ANCHORS_NAME, LatentRenderer
from .minilm import (
    CROSS_ATTENTION_DIM,
    TOKEN_LENGTH,
    attention_mask,
    check_prompts,
    encode_prompts,
    load_minilm_text_encoder,
    pool_sentence_embeddings,
    sentence_embeddings,
)
from .sensitivity import DEFAULT_SENSITIVITY_TIMESTEPS, text_sensitivity
from .synthetic_latents import synthetic_latents_and_anchors

__all__ = [
    "DEFAULT_TRAIN_STEPS",
    "TinyTeacherReport",
    "make_tiny_teacher",
    "tiny_scheduler",
    "tiny_unet_config",
    "tiny_vae_config",
]

#: Default number of training steps of :func:`make_tiny_teacher` (about 2-3 minutes on 2 CPU cores).
DEFAULT_TRAIN_STEPS = TINY_TEACHER_TRAIN_STEPS

# Bump (in embedded/__init__.py) when the recipe changes so old cached teachers are rebuilt.
_RECIPE_VERSION = TINY_TEACHER_RECIPE
_BATCH_SIZE = 8
_LEARNING_RATE = 2e-3
_WARMUP_STEPS = 20
_TARGET_NOISE = 0.05
_UNCOND_PROB = 0.1


@dataclass
class TinyTeacherReport:
    """Outcome of :func:`make_tiny_teacher`.

    Attributes:
        path: The teacher folder (loadable with ``StableDiffusionPipeline.from_pretrained``).
        sensitivity_before: Text sensitivity per timestep of the freshly initialised UNet.
        sensitivity_after: Text sensitivity per timestep of the trained UNet.
        train_steps: Number of optimisation steps the UNet was trained for.
        seconds: Wall time spent building the teacher (of the original build when ``cached``).
        cached: ``True`` when an existing teacher with the same settings was reused.
        settings: The settings the teacher was built with (their hash decides cache hits).
        final_loss: Mean diffusion loss over the last training steps (``nan`` without training).
    """

    path: Path
    sensitivity_before: dict[int, float]
    sensitivity_after: dict[int, float]
    train_steps: int
    seconds: float
    cached: bool
    settings: dict[str, Any] = dataclasses.field(default_factory=dict)
    final_loss: float = float("nan")

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form (``cached`` is not stored; it describes one call)."""
        return {
            "path": str(self.path),
            "sensitivity_before": {str(k): v for k, v in self.sensitivity_before.items()},
            "sensitivity_after": {str(k): v for k, v in self.sensitivity_after.items()},
            "train_steps": self.train_steps,
            "seconds": self.seconds,
            "final_loss": self.final_loss,
            "settings": self.settings,
            "settings_hash": _settings_hash(self.settings),
        }

    @classmethod
    def from_json(cls, data: dict[str, Any], path: Path, cached: bool) -> TinyTeacherReport:
        """Rebuild a report from :meth:`to_json` output found in ``path``."""
        return cls(
            path=path,
            sensitivity_before={int(k): float(v) for k, v in data["sensitivity_before"].items()},
            sensitivity_after={int(k): float(v) for k, v in data["sensitivity_after"].items()},
            train_steps=int(data["train_steps"]),
            seconds=float(data["seconds"]),
            cached=cached,
            settings=dict(data.get("settings", {})),
            final_loss=float(data.get("final_loss", float("nan"))),
        )


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------


def _check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise TypeError(f"resolution must be an int, got {resolution!r}")
    if resolution < 8 or resolution % 4 != 0:
        raise ValueError(
            f"resolution must be a multiple of 4 and at least 8 (latents are resolution/2 and the UNet "
            f"halves them once), got {resolution}"
        )
    return resolution // 2


def tiny_unet_config(resolution: int = 32) -> dict[str, Any]:
    """Config of the teacher UNet for images of ``resolution`` pixels (latents ``resolution // 2``)."""
    latent_size = _check_resolution(resolution)
    return {
        "sample_size": latent_size,
        "in_channels": 4,
        "out_channels": 4,
        "layers_per_block": 2,
        "block_out_channels": (32, 64),
        "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": CROSS_ATTENTION_DIM,
        # Attention-pooled prompt embedding added to the time embedding: a global text pathway into
        # every ResNet block, which makes the prompt dependence learnable in a few hundred steps.
        "addition_embed_type": "text",
        "addition_embed_type_num_heads": 4,
        # diffusers' legacy name: this is the number of attention heads.
        "attention_head_dim": 4,
        "norm_num_groups": 32,
    }


def tiny_vae_config(resolution: int = 32) -> dict[str, Any]:
    """Config of the (random, untrained) teacher VAE: two blocks, i.e. ``vae_scale_factor == 2``."""
    _check_resolution(resolution)
    return {
        "sample_size": resolution,
        "in_channels": 3,
        "out_channels": 3,
        "latent_channels": 4,
        "block_out_channels": (32, 64),
        "down_block_types": ("DownEncoderBlock2D", "DownEncoderBlock2D"),
        "up_block_types": ("UpDecoderBlock2D", "UpDecoderBlock2D"),
        "layers_per_block": 1,
        "norm_num_groups": 32,
        # The synthetic training latents already have unit variance.
        "scaling_factor": 1.0,
    }


def tiny_scheduler():
    """Stable-Diffusion-style DDPM scheduler: 1000 steps, scaled-linear betas, epsilon prediction."""
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="epsilon",
        clip_sample=False,
        steps_offset=1,
    )


# --------------------------------------------------------------------------------------------------
# Anchors and training
# --------------------------------------------------------------------------------------------------


def _write_anchors(folder: Path, text_encoder, tokenizer, prompts: list[str], channels: int, size: int,
                   seed: int) -> LatentRenderer:
    """Recompute a build's anchors from its prompts and seed (the generator's first draws) and save them."""
    emb = sentence_embeddings(text_encoder, tokenizer, prompts)
    _, idx, patterns = synthetic_latents_and_anchors(emb, channels, size, torch.Generator().manual_seed(seed))
    renderer = LatentRenderer(patterns, [prompts[int(i)] for i in idx])
    renderer.save_pretrained(folder)
    return renderer


def _train_step(unet, optimizer, scheduler, latents, embeds, gen: torch.Generator) -> float:
    """One epsilon-prediction step on a batch of clean latents and encoder hidden states."""
    batch = latents.shape[0]
    noise = torch.randn(latents.shape, generator=gen)
    timesteps = torch.randint(0, int(scheduler.config.num_train_timesteps), (batch,), generator=gen)
    noisy = scheduler.add_noise(latents, noise, timesteps)
    pred = unet(noisy, timesteps, embeds).sample
    loss = F.mse_loss(pred.float(), noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
    optimizer.step()
    return float(loss.detach())


def _train_unet(
    unet,
    scheduler,
    latents: torch.Tensor,
    embeds: torch.Tensor,
    uncond: torch.Tensor,
    train_steps: int,
    gen: torch.Generator,
    progress: bool,
) -> float:
    """Train ``unet`` in place; returns the mean loss over the last (up to) 50 steps."""
    from tqdm.auto import tqdm

    optimizer = torch.optim.AdamW(unet.parameters(), lr=_LEARNING_RATE, weight_decay=1e-2)
    lr_sched = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: min(1.0, (step + 1) / _WARMUP_STEPS)
        * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(step, train_steps) / max(train_steps, 1)))),
    )
    unet.train()
    n = latents.shape[0]
    losses: list[float] = []
    bar = tqdm(range(train_steps), desc="training tiny teacher", disable=not progress, leave=False)
    for _ in bar:
        idx = torch.randint(0, n, (_BATCH_SIZE,), generator=gen)
        x0 = latents[idx] + _TARGET_NOISE * torch.randn(latents[idx].shape, generator=gen)
        cond = embeds[idx].clone()
        drop = torch.rand(idx.shape[0], generator=gen) < _UNCOND_PROB
        cond[drop] = uncond
        losses.append(_train_step(unet, optimizer, scheduler, x0, cond, gen))
        lr_sched.step()
        if progress and len(losses) % 10 == 0:
            bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.4f}")
    unet.eval()
    tail = losses[-50:]
    return sum(tail) / len(tail) if tail else float("nan")


# --------------------------------------------------------------------------------------------------
# Building, saving, caching
# --------------------------------------------------------------------------------------------------


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_card(folder: Path) -> None:
    """A short model card: the tiny teacher is this project's own random-init model, under its license."""
    text = ("---\nlicense: apache-2.0\nlibrary_name: diffusers\ntags:\n- diffusers-aria\n- tiny-teacher\n---\n\n"
            "# Tiny offline teacher (diffusers-aria)\n\nA miniature Stable Diffusion pipeline made by "
            "`diffusers-aria make-tiny-teacher` for offline tests and the demo. Its VAE is random, so its decoded "
            "images look like colour noise; `diffusers_aria.embedded.latent_renderer.LatentRenderer.from_pretrained(folder)` "
            f"draws its latents instead, as the anchors (`{ANCHORS_NAME}`) they are made of. See "
            f"`{REPORT_NAME}` for how strongly it depends on its prompt.\n")
    atomic_write_text(folder / "README.md", text)


def make_tiny_teacher(
    output_dir: str | os.PathLike[str],
    prompts: Sequence[str] | None = None,
    train_steps: int = DEFAULT_TRAIN_STEPS,
    seed: int = 0,
    resolution: int = 32,
    force: bool = False,
    progress: bool = True,
) -> TinyTeacherReport:
    """Build (or reuse) the tiny offline teacher pipeline in ``output_dir``.

    Args:
        output_dir: Folder to write the ``StableDiffusionPipeline`` to. It is built under a temporary
            sibling name and renamed into place at the end, so a failed build leaves nothing behind.
        prompts: Training prompts; ``None`` uses the prompts of
            :func:`diffusers_aria.embedded.builtin_pool.builtin_prompt_pool` (4000 prompts). At least 2
            distinct prompts are needed.
        train_steps: UNet optimisation steps (batch 16); ``0`` skips training. The default takes
            about 2-3 minutes on 2 CPU cores.
        seed: Seed of the initialisation, synthetic latents, and training.
        resolution: Image size in pixels (multiple of 4, >= 8); latents are ``resolution // 2``.
        force: Rebuild even when ``output_dir`` already holds a teacher with the same settings.
        progress: Show a tqdm progress bar while training.

    Returns:
        A :class:`TinyTeacherReport`; ``cached=True`` when an existing teacher was reused.

    Raises:
        FileExistsError: ``output_dir`` exists but is not a teacher folder made by this function.
    """
    if isinstance(train_steps, bool) or not isinstance(train_steps, int) or train_steps < 0:
        raise ValueError(f"train_steps must be an int >= 0, got {train_steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    _check_resolution(resolution)
    output_dir = Path(output_dir)
    if prompts is None:
        from .builtin_pool import builtin_prompt_records

        prompts = [row["prompt"] for row in builtin_prompt_records()]
    prompts = check_prompts(prompts, minimum=2)
    if len(set(prompts)) < 2:
        raise ValueError("make_tiny_teacher needs at least two different prompts")

    settings = {
        "recipe_version": _RECIPE_VERSION,
        "prompts_sha256": hashlib.sha256("\n".join(prompts).encode("utf-8")).hexdigest(),
        "num_prompts": len(prompts),
        "train_steps": train_steps,
        "seed": seed,
        "resolution": resolution,
        "token_length": TOKEN_LENGTH,
    }

    if output_dir.exists():
        existing = _read_report(output_dir)
        if existing is None or not (output_dir / "model_index.json").is_file():
            raise FileExistsError(
                f"{str(output_dir)!r} exists but holds no tiny teacher ({REPORT_NAME} or model_index.json "
                f"missing); choose an empty or new folder"
            )
        if not force and existing.get("settings_hash") == _settings_hash(settings):
            if not (output_dir / "README.md").exists():  # made before the card existed
                _write_card(output_dir)
            if not (output_dir / ANCHORS_NAME).exists():  # made before the anchors were saved
                text_encoder, tokenizer = load_minilm_text_encoder()
                config = tiny_unet_config(resolution)
                _write_anchors(output_dir, text_encoder, tokenizer, list(dict.fromkeys(prompts)),
                               config["in_channels"], config["sample_size"], seed)
            return TinyTeacherReport.from_json(existing, path=output_dir, cached=True)

    start = time.perf_counter()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = output_dir.parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        report = _build(tmp_dir, prompts, settings, train_steps, seed, resolution, progress)
        report.seconds = time.perf_counter() - start
        report_json = report.to_json()
        report_json["path"] = str(output_dir)
        (tmp_dir / REPORT_NAME).write_text(json.dumps(report_json, indent=2), encoding="utf-8")
        _write_card(tmp_dir)
        replace_dir(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    report.path = output_dir
    return report


def _build(
    out: Path,
    prompts: list[str],
    settings: dict[str, Any],
    train_steps: int,
    seed: int,
    resolution: int,
    progress: bool,
) -> TinyTeacherReport:
    """Build, train, measure and save the teacher into ``out`` (a fresh temporary folder)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel

    text_encoder, tokenizer = load_minilm_text_encoder()
    scheduler = tiny_scheduler()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(**tiny_unet_config(resolution))
        vae = AutoencoderKL(**tiny_vae_config(resolution))
    vae.eval()
    gen = torch.Generator().manual_seed(seed)

    unique_prompts = list(dict.fromkeys(prompts))
    embeds = encode_prompts(text_encoder, tokenizer, unique_prompts).float()
    uncond = encode_prompts(text_encoder, tokenizer, [""])[0].float()
    latents, anchor_idx, patterns = synthetic_latents_and_anchors(  # sentence embeddings, pooled from `embeds`
        pool_sentence_embeddings(embeds, attention_mask(tokenizer, unique_prompts)), int(unet.config.in_channels),
        int(unet.config.sample_size), gen)

    eval_prompts = unique_prompts
    timesteps = DEFAULT_SENSITIVITY_TIMESTEPS
    # x_t is noised from the first prompt's own clean latent: the inputs the teacher is trained on
    before = text_sensitivity(unet, text_encoder, tokenizer, scheduler, eval_prompts, timesteps, seed=seed,
                              clean_latents=latents)
    final_loss, after = float("nan"), dict(before)  # untrained: the same weights give the same measurement
    if train_steps > 0:
        final_loss = _train_unet(unet, scheduler, latents, embeds, uncond, train_steps, gen, progress)
        after = text_sensitivity(unet, text_encoder, tokenizer, scheduler, eval_prompts, timesteps, seed=seed,
                                 clean_latents=latents)

    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out)
    LatentRenderer(patterns, [unique_prompts[int(i)] for i in anchor_idx]).save_pretrained(out)
    return TinyTeacherReport(
        path=out,
        sensitivity_before=before,
        sensitivity_after=after,
        train_steps=train_steps,
        seconds=0.0,
        cached=False,
        settings=settings,
        final_loss=final_loss,
    )
