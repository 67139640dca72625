"""A loaded teacher: `TeacherParts` (its denoiser and every other part of its pipeline) and `load_teacher`."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class TeacherParts:
    """A loaded teacher: `denoiser` (a UNet, or a transformer for PixArt / SD3), `scheduler` the training noise
    scheduler, `family` its `families.Family` (its pipeline class picks it: `families.family_of`), `extra` the
    other parts of its pipeline (second and third text encoders and tokenizers, the sampling scheduler of non-SD
    families)."""

    denoiser: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    name_or_path: str
    family: Any
    revision: str | None = None
    variant: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    pipeline_class: str | None = None
    student_prediction_type: str | None = None
    vae_name_or_path: str | None = None  # --pretrained_vae_model_name_or_path: a VAE other than the teacher's

    @classmethod
    def from_components(cls, family, components: dict[str, Any], noise_scheduler, name_or_path: str,
                        **fields) -> TeacherParts:
        """The parts of a pipeline of `family` given as its constructor arguments (`components`): the denoiser, VAE, first text encoder and tokenizer by name, everything else in `extra`."""
        parts = dict(components)
        denoiser = parts.pop(family.denoiser)
        core = {k: parts.pop(k) for k in ("vae", "text_encoder", "tokenizer")}
        return cls(denoiser, scheduler=noise_scheduler, name_or_path=name_or_path, family=family, extra=parts,
                   **core, **fields)

    def training_scheduler(self, prediction_type: str | None = None):
        """The noise scheduler for training, in the student's parametrisation (`--prediction_type`; default the
        teacher's). The teacher's own scheduler is left as it is: its pipelines (teacher latents, the teacher
        row of validation) keep sampling in the teacher's parametrisation."""
        if prediction_type is None or prediction_type == self.scheduler.config.prediction_type:
            return self.scheduler
        if not hasattr(self.scheduler, "from_config"):  # FlowMatchingNoise: refuses with a clear error
            self.scheduler.register_to_config(prediction_type=prediction_type)
        self.student_prediction_type = prediction_type
        return type(self.scheduler).from_config(self.scheduler.config, prediction_type=prediction_type)

    def pipeline_components(self, student: bool = False) -> dict[str, Any]:
        """The pipeline's parts but the denoiser (SD 1.x/2.x: with the teacher's DDPM scheduler). `student`: the
        scheduler in the student's parametrisation (`training_scheduler`), for the student's pipelines."""
        parts = {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                 "scheduler": self.scheduler, **self.extra}
        if student and self.student_prediction_type:
            sched = parts["scheduler"]
            parts["scheduler"] = type(sched).from_config(sched.config, prediction_type=self.student_prediction_type)
        return parts

    def student_scheduler(self):
        """The sampling scheduler of the student's pipelines."""
        return self.pipeline_components(student=True)["scheduler"]

    def make_pipeline(self, denoiser=None, components: dict[str, Any] | None = None):
        """A pipeline of the teacher's class with `denoiser` (default: the teacher's own)."""
        return self.family.make_pipeline(dict(components or self.pipeline_components()),
                                      self.denoiser if denoiser is None else denoiser, self.pipeline_class)

    def encode(self, prompts: list[str], device, resolution: int, time_ids=None) -> dict[str, Any]:
        """The denoiser's conditioning for `prompts` (a dict of batch-first tensors), as the pipeline makes it;
        `time_ids`: SDXL micro-conditioning of paired images (`ImageCaptionDataset`'s), else a generated square."""
        if getattr(self, "_pipe", None) is None:
            self._pipe = self.make_pipeline()
            self._pipe.set_progress_bar_config(disable=True)
        return self.family.encode(self._pipe, prompts, device, resolution, time_ids=time_ids)

    def native_resolution(self) -> int:
        """The size the teacher's pipeline generates by default: the denoiser's sample size times the VAE's
        downsampling (SD 1.5: 64 x 8 = 512; SDXL, PixArt-XL, SD3: 128 x 8 = 1024)."""
        size = self.denoiser.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return int(size) * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.denoiser, self.vae, self.text_encoder, *self.extra.values())
                if isinstance(m, torch.nn.Module)]

    def to_weight_dtype(self, device, dtype: torch.dtype) -> None:
        """Freeze the teacher's denoiser, text encoders and VAE and move them to `device` in `dtype` (one dtype)."""
        for m in self.modules():
            m.requires_grad_(False)
            m.eval()
            m.to(device=device, dtype=dtype)

    def float32_components(self) -> dict[str, Any]:
        """`pipeline_components()` with the text encoders and VAE in float32, reloaded from the teacher when
        training holds them in a lower precision (a saved student pipeline has one dtype throughout)."""
        parts = self.pipeline_components(student=True)
        if all(m.dtype == torch.float32 for m in self.modules() if m is not self.denoiser):
            return parts
        kw = {"revision": self.revision, "variant": self.variant}
        vae = load_vae(self.vae_name_or_path).float() if self.vae_name_or_path else None
        if self.family.name != "sd":
            fresh, _ = self.family.load_parts(self.name_or_path, self.revision, self.variant, self.pipeline_class)
            return {**fresh, "scheduler": parts["scheduler"], **({"vae": vae} if vae is not None else {})}
        from diffusers import AutoencoderKL
        from transformers import AutoModel

        if self.vae.dtype != torch.float32:
            parts["vae"] = vae or AutoencoderKL.from_pretrained(self.name_or_path, subfolder="vae", **kw).float()
        if self.text_encoder.dtype != torch.float32:
            parts["text_encoder"] = AutoModel.from_pretrained(self.name_or_path, subfolder="text_encoder",
                                                              trust_remote_code=False, **kw).float()
        return parts


def load_vae(name_or_path: str):
    """An `AutoencoderKL` from a VAE folder or Hub repo (its root, or the `vae` subfolder of a pipeline), e.g.
    an SDXL VAE that stays finite in float16 (diffusers' `--pretrained_vae_model_name_or_path`)."""
    from diffusers import AutoencoderKL

    sub = "vae" if os.path.isfile(os.path.join(name_or_path, "vae", "config.json")) else None
    return AutoencoderKL.from_pretrained(name_or_path, subfolder=sub)


def load_teacher(name_or_path: str, revision: str | None = None, variant: str | None = None,
                 vae: str | None = None) -> TeacherParts:
    """Load a teacher's parts: its pipeline class (model_index.json) picks the family (`families.py`).

    SD 1.x/2.x teachers load part by part (any transformers text encoder; never remote code). `vae`: a VAE
    folder or repo that replaces the teacher's (in training, validation and the saved student pipeline)."""
    from .families import FAMILIES, family_of, read_pipeline_class

    family = family_of(name_or_path, revision)
    if family.name != "sd":
        pipeline_class = read_pipeline_class(name_or_path, revision)
        parts, noise_scheduler = family.load_parts(name_or_path, revision, variant, pipeline_class)
        parts[family.denoiser] = family.load_denoiser(name_or_path, revision, variant)
        if vae:
            parts["vae"] = load_vae(vae)
        return TeacherParts.from_components(family, parts, noise_scheduler, name_or_path, revision=revision,
                                            variant=variant, pipeline_class=pipeline_class, vae_name_or_path=vae)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    kw = {"revision": revision}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", trust_remote_code=False, **kw)
    text_encoder = AutoModel.from_pretrained(name_or_path, subfolder="text_encoder", variant=variant,
                                             trust_remote_code=False, **kw)
    autoencoder = (load_vae(vae) if vae else
                   AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", variant=variant, **kw))
    unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", variant=variant, **kw)
    scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kw)
    return TeacherParts(unet, autoencoder, text_encoder, tokenizer, scheduler, name_or_path, FAMILIES["sd"],
                        revision=revision, variant=variant, vae_name_or_path=vae)
