"""Per-sample knowledge-distillation losses (output KD, feature KD and the denoising task loss)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def prediction_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """Regression target for the scheduler's ``prediction_type`` (epsilon, v_prediction, sample, or the
    rectified-flow velocity ``noise - latents`` of "flow_matching")."""
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "flow_matching":
        return noise - latents
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(
        f"Unknown prediction_type {prediction_type!r}; valid options are {list(PREDICTION_TYPES)}."
    )


def _alpha_sigma(scheduler, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """sqrt(alpha_bar_t) and sqrt(1 - alpha_bar_t), float32, shaped to broadcast against `like` ([B, ...])."""
    ac = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps.long()]
    shape = (-1,) + (1,) * (like.dim() - 1)
    return ac.sqrt().reshape(shape), (1.0 - ac).sqrt().reshape(shape)


def convert_prediction(pred: torch.Tensor, from_type: str, to_type: str, noisy: torch.Tensor,
                       timesteps: torch.Tensor, scheduler) -> torch.Tensor:
    """A model output of one parametrisation (epsilon, v_prediction, sample) rewritten in another.

    With x_t = a x_0 + s eps (a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t)) and v = a eps - s x_0, every
    parametrisation determines eps and x_0 given x_t. Used to distil a teacher into a student that predicts
    another quantity (`--prediction_type`). Computed in float32; the result has `pred`'s dtype.
    """
    for name, value in (("from_type", from_type), ("to_type", to_type)):
        if value not in PREDICTION_TYPES:
            raise ValueError(f"{name}={value!r} is not a prediction type; valid options are {list(PREDICTION_TYPES)}")
    if from_type == to_type:
        return pred
    a, s = _alpha_sigma(scheduler, timesteps, pred)
    x, p = noisy.float(), pred.float()
    if from_type == "epsilon":
        eps, x0 = p, (x - s * p) / a
    elif from_type == "sample":
        x0, eps = p, (x - a * p) / s
    else:  # v_prediction
        eps, x0 = s * x + a * p, a * x - s * p
    out = {"epsilon": eps, "sample": x0, "v_prediction": a * eps - s * x0}[to_type]
    return out.to(pred.dtype)


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma loss weights per sample (arXiv 2303.09556), as diffusers' `--snr_gamma` computes them:
    min(SNR, gamma) / SNR for epsilon and sample targets, min(SNR, gamma) / (SNR + 1) for v_prediction."""
    if gamma <= 0:
        raise ValueError(f"snr_gamma={gamma!r} must be > 0 (diffusers recommends 5.0)")
    a, s = _alpha_sigma(scheduler, timesteps, timesteps)
    snr = (a / s) ** 2
    denom = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    return torch.clamp(snr, max=float(gamma)) / denom


def per_sample_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Float32 mean squared error over all but the batch dimension, shape ``[B]``."""
    if a.shape != b.shape:
        raise ValueError(f"Shape mismatch in per-sample MSE: {tuple(a.shape)} vs {tuple(b.shape)}.")
    diff = a.float() - b.float()
    return diff.pow(2).flatten(1).mean(dim=1)


@dataclass
class LossTerms:
    """Per-sample float32 loss terms of shape ``[B]``."""

    total: torch.Tensor
    output: torch.Tensor
    feature: torch.Tensor
    task: torch.Tensor


class DistillationLoss:
    """BK-SDM-style KD objective: ``l_out * output_kd + l_feat * feature_kd + l_sd * task``."""

    def __init__(
        self, lambda_kd_output: float = 1.0, lambda_kd_feat: float = 1.0, lambda_sd: float = 0.0
    ) -> None:
        for name, value in (
            ("lambda_kd_output", lambda_kd_output),
            ("lambda_kd_feat", lambda_kd_feat),
            ("lambda_sd", lambda_sd),
        ):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}.")
        self.lambda_kd_output = float(lambda_kd_output)
        self.lambda_kd_feat = float(lambda_kd_feat)
        self.lambda_sd = float(lambda_sd)

    def __call__(
        self,
        student_pred: torch.Tensor,
        teacher_pred: torch.Tensor,
        student_feats: dict[str, torch.Tensor] | None = None,
        teacher_feats: dict[str, torch.Tensor] | None = None,
        feature_mapping: dict[str, str] | None = None,
        target: torch.Tensor | None = None,
        paired_mask: torch.Tensor | None = None,
        projections: Callable[[str, torch.Tensor], torch.Tensor] | None = None,
    ) -> LossTerms:
        """Compute per-sample terms; ``feature_mapping`` maps teacher to student feature names.

        The task term uses only samples where ``paired_mask`` is True (all when it is None) and
        is zero elsewhere. Teacher predictions and features are detached.
        """
        batch = student_pred.shape[0]
        zeros = torch.zeros(batch, dtype=torch.float32, device=student_pred.device)
        output = per_sample_mse(student_pred, teacher_pred.detach())

        feature = zeros
        if feature_mapping:
            if student_feats is None or teacher_feats is None:
                raise ValueError("feature_mapping was given but student_feats or teacher_feats is None.")
            for teacher_name, student_name in feature_mapping.items():
                if teacher_name not in teacher_feats or student_name not in student_feats:
                    raise KeyError(
                        f"Missing feature for pair {teacher_name!r} -> {student_name!r}; teacher has "
                        f"{sorted(teacher_feats)}, student has {sorted(student_feats)}."
                    )
                student_feature = student_feats[student_name]
                if projections is not None:
                    student_feature = projections(teacher_name, student_feature)
                feature = feature + per_sample_mse(student_feature, teacher_feats[teacher_name].detach())

        task = zeros
        if target is not None:
            task = per_sample_mse(student_pred, target.detach())
            if paired_mask is not None:
                mask = paired_mask.to(device=task.device, dtype=torch.bool).reshape(-1)
                if mask.shape[0] != batch:
                    raise ValueError(f"paired_mask has {mask.shape[0]} entries for a batch of {batch}.")
                task = torch.where(mask, task, zeros)

        total = self.lambda_kd_output * output + self.lambda_kd_feat * feature + self.lambda_sd * task
        return LossTerms(total=total, output=output, feature=feature, task=task)
