"""Measuring a student: held-out teacher-student discrepancy per region and per group.

The discrepancy of a prompt is the normalised epsilon error E||eps_s(x_t,t,c) - eps_t(x_t,t,c)||^2 /
E||eps_t||^2 at shared (x_0, noise, t), where x_0 are fixed random latents: the same inputs for every
student, so two students are compared on identical draws. Results aggregate per region and per group
(e.g. seen / unseen / underrepresented).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from ..utils.atomic import atomic_write_json


@torch.no_grad()
def prompt_discrepancy(teacher_unet, student_unet, text_encoder, tokenizer, noise_scheduler, prompts: Sequence[str],
                       timesteps: Sequence[int] = (100, 400, 700), seed: int = 0, batch_size: int = 16,
                       latent_shape: tuple[int, int, int] | None = None, family=None, encode=None) -> np.ndarray:
    """Normalised prediction error per prompt and timestep, float64 [len(prompts), len(timesteps)].

    `family` (`families.Family`, default SD 1.x/2.x) calls the denoisers; `encode(prompts, device)` gives their
    conditioning (default: `text_encoder`'s hidden states, as SD pipelines make them).
    """
    from ..teachers.families import FAMILIES, encode_prompts

    family = family or FAMILIES["sd"]
    cfg = teacher_unet.config
    shape = latent_shape or (cfg.in_channels, cfg.sample_size, cfg.sample_size)
    device = next(student_unet.parameters()).device
    t_dtype, s_dtype = teacher_unet.dtype, student_unet.dtype
    out = np.zeros((len(prompts), len(timesteps)))
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        cond = (encode(chunk, device) if encode is not None
                else {"encoder_hidden_states": encode_prompts(text_encoder, tokenizer, chunk, device)})
        for j, t in enumerate(timesteps):
            gen = torch.Generator().manual_seed(seed * 1_000_003 + start * 1_009 + int(t))
            x0 = torch.randn((len(chunk), *shape), generator=gen)
            noise = torch.randn((len(chunk), *shape), generator=gen)
            tt = torch.full((len(chunk),), int(t), dtype=torch.long)
            xt = noise_scheduler.add_noise(x0, noise, tt).to(device)
            tt = family.model_timesteps(noise_scheduler, tt.to(device))
            et = family.predict(teacher_unet, xt.to(t_dtype), tt, family.cast(cond, t_dtype)).float()
            es = family.predict(student_unet, xt.to(s_dtype), tt, family.cast(cond, s_dtype)).float()
            num = ((es - et) ** 2).flatten(1).mean(1)
            den = (et ** 2).flatten(1).mean(1).clamp_min(1e-12)
            out[start:start + len(chunk), j] = (num / den).double().cpu().numpy()
    return out


def aggregate(values: np.ndarray, labels: Sequence) -> dict[str, float]:
    """Mean of `values` per label (labels may be ints or strings)."""
    labels = np.asarray([str(x) for x in labels])
    return {lab: float(values[labels == lab].mean()) for lab in sorted(set(labels.tolist()))}


def label_counts(labels: Sequence) -> dict[str, int]:
    """How many values each label has (the keys of `aggregate`)."""
    labels = [str(x) for x in labels]
    return {lab: labels.count(lab) for lab in sorted(set(labels))}


def evaluate_student(teacher_path: str, student_path: str, prompts: Sequence[str], region_ids: Sequence[int] | None = None,
                     groups: Sequence[str] | None = None, timesteps: Sequence[int] = (100, 400, 700), seed: int = 0,
                     output_json: str | None = None, num_regions: int | None = None) -> dict:
    """Load a teacher and a student pipeline folder and report the held-out discrepancy.

    Returns {"overall", "per_timestep", "per_region", "per_region_prompts", "per_group", "per_group_prompts",
    "worst_region"}, and with `num_regions` "regions_without_prompts" (the regions none of `prompts` falls in,
    which have no value); written to `output_json`.
    """
    from ..teachers.parts import load_teacher

    teacher = load_teacher(teacher_path)
    student = load_teacher(student_path)
    family = teacher.family
    if student.family.name != family.name:
        raise ValueError(f"the student {student_path!r} is a {student.family.name} pipeline but the teacher {teacher_path!r} "
                         f"is a {family.name} one; compare a student with the teacher it was distilled from")
    if any(os.path.isfile(os.path.join(student_path, name))
           for name in ("pytorch_lora_weights.safetensors", "adapter_model.safetensors")):
        student.denoiser = family.load_lora(student.make_pipeline(), student_path)
    encode = None
    if family.name != "sd":  # the family's conditioning, at the size of the latents compared
        resolution = teacher.native_resolution()

        def encode(chunk, device):
            return teacher.encode(chunk, device, resolution)
    vals = prompt_discrepancy(teacher.denoiser.eval(), student.denoiser.eval(), teacher.text_encoder.eval(), teacher.tokenizer,
                              teacher.scheduler, prompts, timesteps, seed, family=family, encode=encode)
    per_prompt = vals.mean(axis=1)
    result: dict = {"num_prompts": len(prompts), "timesteps": list(map(int, timesteps)),
                    "overall": float(per_prompt.mean()),
                    "per_timestep": {str(t): float(vals[:, j].mean()) for j, t in enumerate(timesteps)}}
    if region_ids is not None:
        per_region = aggregate(per_prompt, region_ids)
        result["per_region"] = per_region
        result["per_region_prompts"] = label_counts(region_ids)
        result["worst_region"] = max(per_region.items(), key=lambda kv: kv[1])
        if num_regions is not None:
            result["regions_without_prompts"] = sorted(set(range(num_regions)) - {int(r) for r in region_ids})
    if groups is not None:
        result["per_group"] = aggregate(per_prompt, groups)
        result["per_group_prompts"] = label_counts(groups)
    if output_json:
        atomic_write_json(output_json, result)
    return result
