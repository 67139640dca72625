"""The student of a run: building it from the teacher, feature-KD pairs and projections, optimizer, attention."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from ..teachers.parts import TeacherParts


def make_student(teacher_unet, architecture: str, width_scale: float = 1.0, pretrained: str | None = None,
                 family=None, num_blocks: int | None = None, keep_blocks: list[int] | None = None):
    """A compressed student initialised from the teacher's denoiser (BK/KOALA UNets, block-subset transformers,
    by `family`; default SD), or a pretrained student. Returns (model, report).

    The student is float32 (the master weights under mixed precision); the teacher is left as it is. Build
    the student before casting the teacher to a lower precision, so that it starts from the full weights.
    """
    from ..teachers.families import FAMILIES

    family = family or FAMILIES["sd"]
    if pretrained:
        cls = type(teacher_unet)
        sub = family.denoiser if os.path.isdir(os.path.join(pretrained, family.denoiser)) else None
        model = cls.from_pretrained(pretrained, subfolder=sub)
        for key in ("cross_attention_dim", "caption_channels", "joint_attention_dim"):
            mine, theirs = model.config.get(key), teacher_unet.config.get(key)
            if mine != theirs:
                raise ValueError(f"student {pretrained!r} has {key} {mine} but the teacher has {theirs}; the student "
                                 "must share the teacher's text encoder")
        return model.to(torch.float32), f"loaded pretrained student {pretrained}"
    return family.build_student(teacher_unet, architecture, width_scale, num_blocks=num_blocks,
                                keep_blocks=keep_blocks)


class FeatureMappingError(ValueError):
    """Feature KD was asked for (--lambda_kd_feat > 0) but the teacher and student have no BK feature pairs."""


def feature_mapping(teacher, student, architecture: str, family=None, keep_blocks: list[int] | None = None,
                    taps: str = "auto") -> dict[str, str]:
    """The feature pairs (teacher module -> student module) for feature KD: stage outputs or self-attention
    outputs for UNet students (BK, KOALA; `taps`, see `families.Family.feature_mapping`), kept block outputs for
    transformer students.

    Raises `FeatureMappingError` when the models do not have the structure the pairs need, rather than turning
    feature KD off without a word: pass `--lambda_kd_feat 0` for output KD only.
    """
    from ..teachers.families import FAMILIES

    family = family or FAMILIES["sd"]
    hint = f"pass --lambda_kd_feat 0 to distil with output KD only ({architecture} student)"
    try:
        mapping = family.feature_mapping(teacher, student, architecture, keep_blocks, taps=taps)
    except (ValueError, KeyError) as e:
        raise FeatureMappingError(f"feature KD needs feature pairs, but none fit these models ({e}); {hint}") from None
    names_t = dict(teacher.named_modules())
    names_s = dict(student.named_modules())
    missing = [f"{t} -> {s}" for t, s in mapping.items() if t not in names_t or s not in names_s]
    if missing or not mapping:
        raise FeatureMappingError(f"feature KD pairs not found in the models: {missing or 'none defined'}; {hint}")
    return mapping


def _input_dtype(model) -> torch.dtype:
    """The dtype a model's inputs must have: that of its frozen weights when it has any (the base of a LoRA
    student in the weight dtype, beside float32 adapters), else that of its first parameter."""
    params = list(model.parameters())
    frozen = [p for p in params if not p.requires_grad and p.is_floating_point()]
    return (frozen or params)[0].dtype


def feature_projections(teacher, student, mapping: dict[str, str], device=None, family=None, cond=None):
    """1x1 projections for the feature pairs whose widths differ (e.g. --student_width_scale < 1), else None.

    The widths are read from one forward pass of each model through `family` (`families.Family`, default
    SD 1.x/2.x) on `cond`, the conditioning of one prompt (`TeacherParts.encode`; default: zero SD hidden
    states).
    """
    from functools import partial

    from ..distillation import FeatureProjections, infer_feature_channels
    from ..teachers.families import FAMILIES

    if not mapping:
        return None
    family = family or FAMILIES["sd"]
    cfg = teacher.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    x = torch.zeros(1, cfg.in_channels, size, size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    if cond is None:
        cond = {"encoder_hidden_states": torch.zeros(1, 4, cfg.cross_attention_dim, device=device)}
    ch_t, ch_s = (
        infer_feature_channels(model, names, forward=partial(family.predict, model, x.to(dtype), t,
                                                             family.cast(cond, dtype)))
        for model, names, dtype in ((teacher, list(mapping), _input_dtype(teacher)),
                                    (student, list(mapping.values()), _input_dtype(student))))
    if all(ch_t[a] == ch_s[b] for a, b in mapping.items()):
        return None
    return FeatureProjections(mapping, ch_t, ch_s).to(device)


def make_optimizer(params, lr: float, betas: tuple[float, float], weight_decay: float, eps: float,
                   use_8bit_adam: bool = False):
    """AdamW, or bitsandbytes' 8-bit AdamW (`--use_8bit_adam`) with the same settings."""
    cls = torch.optim.AdamW
    if use_8bit_adam:
        cls = require_bitsandbytes().optim.AdamW8bit
    return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


def require_bitsandbytes():
    """The bitsandbytes module, or a clear error saying how to get it (checked before the models load)."""
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError("--use_8bit_adam needs bitsandbytes, which is not installed: `pip install bitsandbytes` "
                          "(CUDA only), or drop --use_8bit_adam") from None
    return bitsandbytes


def require_xformers() -> None:
    """A clear error when `--enable_xformers_memory_efficient_attention` is asked for without xformers."""
    from diffusers.utils import is_xformers_available

    if not is_xformers_available():
        raise ValueError("--enable_xformers_memory_efficient_attention: xformers is not installed "
                         "(`pip install xformers`, CUDA only); drop the flag to use PyTorch's own attention")


def enable_xformers(*unets) -> None:
    """Memory-efficient attention for every given UNet (teacher and student)."""
    require_xformers()
    for unet in unets:
        unet.enable_xformers_memory_efficient_attention()


def student_init_unet(teacher: TeacherParts, non_ema_revision: str | None = None):
    """The UNet the student is built from: the teacher's, or the teacher repository's UNet at
    `non_ema_revision` (diffusers' `--non_ema_revision`: the non-EMA weights, better to train from) while the
    frozen teacher keeps `--revision`."""
    if non_ema_revision is None or non_ema_revision == teacher.revision:
        return teacher.denoiser
    return teacher.family.load_denoiser(teacher.name_or_path, revision=non_ema_revision)
