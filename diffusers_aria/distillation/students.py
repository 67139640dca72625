"""BK-SDM-style block-removed student UNets built from a teacher ``UNet2DConditionModel``.

Three architectures follow Kim et al., "BK-SDM: A Lightweight, Fast, and Cheap Version of
Stable Diffusion":

* ``bk_base``  -- every down stage keeps one ResNet(+attention) layer, every up stage keeps two
  (the first and the last of the teacher's), the mid block is kept.
* ``bk_small`` -- ``bk_base`` without the mid block.
* ``bk_tiny``  -- ``bk_small`` without the lowest-resolution stage (last down block and first up
  block).

The student is always constructed from its own config and then initialised from the teacher
through an explicit student-key -> teacher-key map (:func:`student_key_map`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

STUDENT_ARCHITECTURES: tuple[str, ...] = ("bk_base", "bk_small", "bk_tiny")

# Config fields given per down stage (diffusers reverses them for the up path).
_PER_STAGE_FIELDS = (
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "layers_per_block",
    "transformer_layers_per_block",
    "only_cross_attention",
)


def _check_architecture(architecture: str) -> None:
    if architecture not in STUDENT_ARCHITECTURES:
        raise ValueError(
            f"Unknown student architecture {architecture!r}; valid options are {list(STUDENT_ARCHITECTURES)}."
        )


def _per_stage(value: Any, n_stages: int) -> list[Any]:
    """Expand an int/bool/None config field into one value per down stage."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * n_stages


def _public_config(config: Any) -> dict[str, Any]:
    """Copy a (Frozen)dict config, dropping private ``_``-prefixed bookkeeping keys."""
    return {k: copy.deepcopy(v) for k, v in dict(config).items() if not k.startswith("_")}


def _scaled_channels(config: dict[str, Any], width_scale: float) -> list[int]:
    """Scale ``block_out_channels`` keeping GroupNorm groups and attention heads divisible."""
    channels = list(config["block_out_channels"])
    if width_scale == 1.0:
        return channels
    n_stages = len(channels)
    groups = config.get("norm_num_groups") or 1
    heads = config.get("num_attention_heads") or config.get("attention_head_dim") or 1
    heads = _per_stage(heads, n_stages)
    scaled = []
    for stage, width in enumerate(channels):
        multiple = math.lcm(int(groups), int(heads[stage] or 1))
        scaled.append(max(multiple, int(round(width * width_scale / multiple)) * multiple))
    return scaled


def student_config(teacher_config: dict, architecture: str, width_scale: float = 1.0) -> dict:
    """Return a ``UNet2DConditionModel`` config for a BK-SDM student of ``teacher_config``.

    ``width_scale`` multiplies ``block_out_channels``; each stage is rounded to a multiple of
    ``lcm(norm_num_groups, num_heads)`` so GroupNorm and attention heads stay valid.
    """
    _check_architecture(architecture)
    if not isinstance(width_scale, (int, float)) or not math.isfinite(width_scale) or width_scale <= 0:
        raise ValueError(f"width_scale must be a finite number > 0, got {width_scale!r}.")
    config = _public_config(teacher_config)
    n_stages = len(config["down_block_types"])
    if len(config.get("up_block_types", ())) != n_stages:
        raise ValueError(
            f"Teacher config has {n_stages} down blocks but {len(config.get('up_block_types', ()))} up blocks; "
            "a symmetric UNet is required."
        )
    layers = _per_stage(config.get("layers_per_block", 2), n_stages)
    if min(layers) < 2:
        raise ValueError(
            f"Teacher layers_per_block={config.get('layers_per_block')!r} cannot be reduced by {architecture!r}: "
            "every down stage needs at least 2 layers."
        )
    if config.get("reverse_transformer_layers_per_block") is not None:
        raise ValueError(
            "Teachers with reverse_transformer_layers_per_block are not supported; valid teachers use "
            "symmetric transformer_layers_per_block."
        )

    config["layers_per_block"] = 1
    if architecture in ("bk_small", "bk_tiny"):
        config["mid_block_type"] = None
    if architecture == "bk_tiny":
        if n_stages < 2:
            raise ValueError(
                f"bk_tiny removes the lowest-resolution stage, but the teacher has only {n_stages} stage(s); "
                "valid teachers have at least 2 (use 'bk_base' or 'bk_small' instead)."
            )
        config["down_block_types"] = list(config["down_block_types"])[:-1]
        config["up_block_types"] = list(config["up_block_types"])[1:]
        config["block_out_channels"] = list(config["block_out_channels"])[:-1]
        for name in _PER_STAGE_FIELDS:
            if isinstance(config.get(name), (list, tuple)):
                config[name] = list(config[name])[:-1]
    config["block_out_channels"] = _scaled_channels(config, float(width_scale))
    return config


def _layers_per_stage(config: dict) -> list[int]:
    return [int(x) for x in _per_stage(config.get("layers_per_block", 2), len(config["down_block_types"]))]


def _map_key(key: str, teacher_config: dict, config: dict) -> str:
    """Map one student state-dict key to the teacher key it is initialised from."""
    parts = key.split(".")
    if parts[0] != "up_blocks":
        # conv_in, time embedding, down blocks (layer k <- layer k), mid block and output head keep names.
        return key
    offset = len(teacher_config["up_block_types"]) - len(config["up_block_types"])
    block = int(parts[1])
    teacher_block = block + offset
    parts[1] = str(teacher_block)
    if parts[2] in ("resnets", "attentions"):
        student_layers = _layers_per_stage(config)[::-1][block] + 1
        teacher_layers = _layers_per_stage(teacher_config)[::-1][teacher_block] + 1
        layer = int(parts[3])
        # BK-SDM: the last student layer takes the teacher's last layer (same skip-connection input).
        parts[3] = str(teacher_layers - 1 if layer == student_layers - 1 else layer)
    return ".".join(parts)


def _meta_unet(config: dict) -> UNet2DConditionModel:
    with init_empty_weights():
        return UNet2DConditionModel.from_config(config)


def student_key_map(teacher_config: dict, student_config: dict, architecture: str) -> dict[str, str]:
    """Map every student state-dict key to its BK-SDM source key in the teacher.

    Down block layer ``k`` comes from teacher layer ``k``; in up blocks the student's first layers
    come from the teacher's first layers and its last layer from the teacher's last layer; for
    ``bk_tiny`` student up block ``j`` comes from teacher up block ``j + 1``.
    """
    _check_architecture(architecture)
    teacher_config = _public_config(teacher_config)
    student_cfg = _public_config(student_config)
    keys = _meta_unet(student_cfg).state_dict().keys()
    return {key: _map_key(key, teacher_config, student_cfg) for key in keys}


@dataclass
class StudentInitReport:
    """Outcome of initialising a student from its teacher."""

    copied: int = 0
    skipped_shape: list[str] = field(default_factory=list)
    missing_in_teacher: list[str] = field(default_factory=list)
    total: int = 0

    def __str__(self) -> str:
        return (
            f"StudentInitReport: copied {self.copied}/{self.total} tensors from the teacher, "
            f"{len(self.skipped_shape)} skipped (shape mismatch), "
            f"{len(self.missing_in_teacher)} without a teacher counterpart"
        )


def build_student(
    teacher: UNet2DConditionModel, architecture: str = "bk_small", width_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[UNet2DConditionModel, StudentInitReport]:
    """Build a BK-SDM student from ``teacher`` and copy every same-shaped mapped tensor into it.

    The student lives on the teacher's device in ``dtype`` (float32: the master weights of a mixed-precision
    run), whatever the teacher's dtype; the teacher is not modified. Tensors whose mapped teacher tensor has
    a different shape (e.g. with ``width_scale != 1``) keep their fresh initialisation and are listed in the
    report's ``skipped_shape``.
    """
    if not isinstance(teacher, UNet2DConditionModel):
        raise TypeError(f"teacher must be a diffusers UNet2DConditionModel, got {type(teacher).__name__}.")
    config = student_config(teacher.config, architecture, width_scale)
    student = UNet2DConditionModel.from_config(config)
    param = next(teacher.parameters())
    device = param.device if param.device.type != "meta" else torch.device("cpu")
    if device.type != "cpu" or dtype != torch.float32:
        student.to(device=device, dtype=dtype)

    key_map = student_key_map(teacher.config, config, architecture)
    teacher_state = teacher.state_dict()
    student_state = student.state_dict()
    report = StudentInitReport(total=len(student_state))
    new_state = {}
    for student_key, teacher_key in key_map.items():
        source = teacher_state.get(teacher_key)
        if source is None:
            report.missing_in_teacher.append(student_key)
        elif source.shape != student_state[student_key].shape:
            report.skipped_shape.append(student_key)
        else:
            new_state[student_key] = source
    with torch.no_grad():
        for key, value in new_state.items():
            student_state[key].copy_(value)
    report.copied = len(new_state)
    return student, report
