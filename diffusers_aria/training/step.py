"""One distillation step, kept out of the training script so that it can be tested: `KDStep` (teacher and
student on the same (x_t, t, c) into per-sample losses), the step's noise, the run's length, when to validate."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from ..distillation import (
    DistillationLoss,
    FeatureProjections,
    FeatureTaps,
    LossTerms,
    convert_prediction,
    prediction_target,
    snr_weights,
)
from ..rng import step_generator
from ..settings import AriaSettings  # noqa: F401 - re-exported: it lives in the light settings module

logger = logging.getLogger(__name__)


def sample_noise_and_timesteps(latents: torch.Tensor, num_train_timesteps: int, seed: int, step: int, rank: int
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and timesteps of one step, a pure function of (seed, step, rank)."""
    gen = step_generator(seed, step, rank, salt=1)
    noise = torch.randn(latents.shape, generator=gen, dtype=torch.float32).to(latents.device, latents.dtype)
    t = torch.randint(0, num_train_timesteps, (latents.shape[0],), generator=gen).to(latents.device)
    return noise, t


@dataclass
class TrainLength:
    """How long a run is, in optimizer steps, and how many of them make an epoch of the paired data."""

    max_train_steps: int
    steps_per_epoch: int
    num_train_epochs: int


def train_length(num_rows: int, batch_size: int, num_processes: int = 1, gradient_accumulation_steps: int = 1,
                 max_train_steps: int | None = None, num_train_epochs: int = 100) -> TrainLength:
    """diffusers' arithmetic: an epoch is ceil(rows / global micro-batch) micro-batches, grouped into optimizer
    steps of `gradient_accumulation_steps`; `max_train_steps`, when given, overrides `num_train_epochs`."""
    for name, value in (("num_rows", num_rows), ("batch_size", batch_size), ("num_processes", num_processes),
                        ("gradient_accumulation_steps", gradient_accumulation_steps)):
        if value < 1:
            raise ValueError(f"{name}={value!r} must be >= 1")
    micro = math.ceil(num_rows / (batch_size * num_processes))
    per_epoch = max(1, math.ceil(micro / gradient_accumulation_steps))
    if max_train_steps is None:
        if num_train_epochs < 1:
            raise ValueError(f"--num_train_epochs {num_train_epochs!r} must be >= 1 (or pass --max_train_steps)")
        max_train_steps = num_train_epochs * per_epoch
    elif max_train_steps < 1:
        raise ValueError(f"--max_train_steps {max_train_steps!r} must be >= 1")
    return TrainLength(int(max_train_steps), per_epoch, math.ceil(max_train_steps / per_epoch))


def validation_due(global_step: int, steps_per_epoch: int, validation_steps: int = 0,
                   validation_epochs: int | None = None) -> bool:
    """Whether to validate after optimizer step `global_step` (1-based): every `validation_steps` steps, and at
    the end of every epoch e (0-based) with e % validation_epochs == 0, as diffusers' `--validation_epochs`."""
    if validation_steps and global_step % validation_steps == 0:
        return True
    if validation_epochs and global_step % steps_per_epoch == 0:
        return (global_step // steps_per_epoch - 1) % validation_epochs == 0
    return False


@dataclass
class StepNoise:
    """A step's noise: `noise` is the regression target's, `input_noise` makes x_t (they differ only with
    input perturbation), `timesteps` one per sample."""

    noise: torch.Tensor
    input_noise: torch.Tensor
    timesteps: torch.Tensor


def sample_step_noise(latents: torch.Tensor, num_train_timesteps: int, seed: int, step: int, rank: int,
                      noise_offset: float = 0.0, input_perturbation: float = 0.0) -> StepNoise:
    """`sample_noise_and_timesteps` plus diffusers' `--noise_offset` and `--input_perturbation`.

    Offset noise adds `noise_offset * N(0, 1)` per sample and channel (constant over H, W) to the noise
    (crosslabs.org/blog/diffusion-with-offset-noise); input perturbation builds x_t from
    `noise + input_perturbation * N(0, 1)` while the target keeps `noise` (arXiv 2301.11706). Their draws
    come from streams of their own, so turning either on changes neither the base noise nor the timesteps.
    """
    noise, t = sample_noise_and_timesteps(latents, num_train_timesteps, seed, step, rank)
    if noise_offset:
        gen = step_generator(seed, step, rank, salt=2)
        shift = torch.randn(latents.shape[:2] + (1,) * (latents.dim() - 2), generator=gen, dtype=torch.float32)
        noise = noise + (noise_offset * shift).to(noise.device, noise.dtype)
    input_noise = noise
    if input_perturbation:
        gen = step_generator(seed, step, rank, salt=3)
        extra = torch.randn(latents.shape, generator=gen, dtype=torch.float32)
        input_noise = noise + (input_perturbation * extra).to(noise.device, noise.dtype)
    return StepNoise(noise, input_noise, t)


class KDStep:
    """Teacher and student predictions on the same (x_t, t, c), with feature taps, into per-sample losses.

    Args:
        teacher: the frozen teacher denoiser (in its weight dtype).
        student: the *unwrapped* student (taps hook its modules; call with the wrapped model).
        noise_scheduler: provides `add_noise` and the prediction type (`families.FlowMatchingNoise` for
            rectified-flow teachers).
        loss: `DistillationLoss`.
        feature_mapping: teacher module name -> student module name (empty/None: no feature KD).
        projections: optional `FeatureProjections` when widths differ.
        teacher_prediction_type: what the teacher predicts, when the scheduler's `prediction_type` was set to the
            student's (`--prediction_type`): the teacher's output is converted to the student's for output KD.
            None: the scheduler's (no conversion).
        snr_gamma: Min-SNR-gamma weights on each sample's total loss (`--snr_gamma`); None: unweighted.
        family: the teacher's `families.Family`, which calls the denoisers with their conditioning (default:
            SD 1.x/2.x, conditioned on encoder hidden states).
    """

    def __init__(self, teacher, student, noise_scheduler, loss: DistillationLoss,
                 feature_mapping: dict[str, str] | None = None, projections: FeatureProjections | None = None,
                 teacher_prediction_type: str | None = None, snr_gamma: float | None = None, family=None) -> None:
        from ..teachers.families import FAMILIES

        self.teacher, self.noise_scheduler, self.loss = teacher, noise_scheduler, loss
        self.teacher_prediction_type = teacher_prediction_type
        self.snr_gamma = snr_gamma
        self.family = family or FAMILIES["sd"]
        self.feature_mapping = dict(feature_mapping or {}) if loss.lambda_kd_feat > 0 else {}
        self.projections = projections
        self.teacher_taps = FeatureTaps(teacher, list(self.feature_mapping)) if self.feature_mapping else None
        self.student_taps = FeatureTaps(student, list(self.feature_mapping.values())) if self.feature_mapping else None

    def __call__(self, student_model, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                 encoder_hidden_states: torch.Tensor | dict, paired_mask: torch.Tensor | None = None,
                 input_noise: torch.Tensor | None = None) -> LossTerms:
        """Per-sample loss terms; x_t is made from `input_noise` when given (input perturbation), the task
        target from `noise`. `encoder_hidden_states`: the hidden states, or the family's conditioning dict
        (`TeacherParts.encode`)."""
        cond = (encoder_hidden_states if isinstance(encoder_hidden_states, dict)
                else {"encoder_hidden_states": encoder_hidden_states})
        noisy = self.noise_scheduler.add_noise(latents, noise if input_noise is None else input_noise, timesteps)
        model_t = self.family.model_timesteps(self.noise_scheduler, timesteps)
        student_type = self.noise_scheduler.config.prediction_type
        with torch.no_grad():
            t_dtype = next(self.teacher.parameters()).dtype
            teacher_pred = self.family.predict(self.teacher, noisy.to(t_dtype), model_t, self.family.cast(cond, t_dtype))
            if self.teacher_prediction_type and self.teacher_prediction_type != student_type:
                teacher_pred = convert_prediction(teacher_pred, self.teacher_prediction_type, student_type, noisy,
                                                  timesteps, self.noise_scheduler)
            teacher_feats = dict(self.teacher_taps.features) if self.teacher_taps else None
        student_pred = self.family.predict(student_model, noisy, model_t, cond)
        student_feats = dict(self.student_taps.features) if self.student_taps else None
        target = None
        if self.loss.lambda_sd > 0:
            target = prediction_target(self.noise_scheduler, latents, noise, timesteps)
        terms = self.loss(student_pred, teacher_pred, student_feats, teacher_feats, self.feature_mapping or None,
                          target=target, paired_mask=paired_mask, projections=self.projections)
        if self.teacher_taps:
            self.teacher_taps.clear()
            self.student_taps.clear()
        if self.snr_gamma is not None:
            weights = snr_weights(self.noise_scheduler, timesteps, self.snr_gamma).to(terms.total.device)
            terms = LossTerms(total=terms.total * weights, output=terms.output, feature=terms.feature, task=terms.task)
        return terms
