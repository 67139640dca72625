"""Block-removed student UNets (BK-SDM and KOALA presets) built from a teacher ``UNet2DConditionModel``.

Three architectures follow Kim et al., "BK-SDM: A Lightweight, Fast, and Cheap Version of
Stable Diffusion":

* ``bk_base``  -- every down stage keeps one ResNet(+attention) layer, every up stage keeps two
  (the first and the last of the teacher's), the mid block is kept.
* ``bk_small`` -- ``bk_base`` without the mid block.
* ``bk_tiny``  -- ``bk_small`` without the lowest-resolution stage (last down block and first up
  block).

Two follow Lee et al., "KOALA: Empirical Lessons Toward Memory-Efficient and Fast Diffusion Models for
Text-to-Image Synthesis" (made for SDXL, whose depth sits in the transformer blocks of its lowest-resolution
stage):

* ``koala_1b``   -- the ``bk_base`` layer choice (mid block kept) and the lowest-resolution stage's transformer
  depth cut to ceil(3/5 of it) (SDXL: 10 -> 6 in that stage's attentions and in the mid block): 1.16B.
* ``koala_700m`` -- the ``bk_small`` layer choice (no mid block) and that depth cut to ceil(1/2 of it)
  (SDXL: 10 -> 5): 0.78B.

Both keep the *first* ``d`` ``BasicTransformerBlock``s of every shortened ``Transformer2DModel``
(:func:`kept_transformer_blocks`): a contiguous prefix of the residual stream sees exactly the input it saw
in the teacher, so only the block-stack's output projection meets a shifted input, whereas keeping later
blocks would feed every kept block a residual stream it was never trained on.

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
KOALA_ARCHITECTURES: tuple[str, ...] = ("koala_1b", "koala_700m")
UNET_STUDENT_ARCHITECTURES: tuple[str, ...] = STUDENT_ARCHITECTURES + KOALA_ARCHITECTURES

# KOALA: fraction (numerator, denominator) of the lowest-resolution stage's transformer depth kept, rounded up.
_KOALA_DEPTH_FRACTION = {"koala_1b": (3, 5), "koala_700m": (1, 2)}

# Config fields given per down stage (diffusers reverses them for the up path).
_PER_STAGE_FIELDS = (
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "layers_per_block",
    "transformer_layers_per_block",
    "only_cross_attention",
)


def check_architecture(architecture: str) -> None:
    if architecture not in UNET_STUDENT_ARCHITECTURES:
        raise ValueError(
            f"Unknown student architecture {architecture!r}; valid options are {list(UNET_STUDENT_ARCHITECTURES)}."
        )


def _per_stage(value: Any, n_stages: int) -> list[Any]:
    """Expand an int/bool/None config field into one value per down stage."""
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value] * n_stages


def public_config(config: Any) -> dict[str, Any]:
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


def _transformer_depths(config: dict) -> list[int]:
    """Transformer depth (``BasicTransformerBlock``s per ``Transformer2DModel``) of every down stage."""
    n_stages = len(config["down_block_types"])
    depths = _per_stage(config.get("transformer_layers_per_block", 1), n_stages)
    if len(depths) != n_stages or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in depths):
        raise ValueError(
            f"transformer_layers_per_block={config.get('transformer_layers_per_block')!r} is not supported; valid "
            f"values are one int >= 1 or one int >= 1 per down stage ({n_stages} stages)."
        )
    return [int(d) for d in depths]


def kept_transformer_blocks(teacher_depth: int, student_depth: int) -> list[int]:
    """Indices of the teacher's transformer blocks a ``Transformer2DModel`` of ``student_depth`` blocks keeps.

    The first ``student_depth`` blocks (see the module docstring for why a prefix).
    """
    if not 1 <= student_depth <= teacher_depth:
        raise ValueError(
            f"A student Transformer2DModel of depth {student_depth} cannot be taken from a teacher one of depth "
            f"{teacher_depth}; valid depths are 1..{teacher_depth}."
        )
    return list(range(student_depth))


def student_config(teacher_config: dict, architecture: str, width_scale: float = 1.0) -> dict:
    """Return a ``UNet2DConditionModel`` config for a BK-SDM or KOALA student of ``teacher_config``.

    ``width_scale`` multiplies ``block_out_channels``; each stage is rounded to a multiple of
    ``lcm(norm_num_groups, num_heads)`` so GroupNorm and attention heads stay valid.
    """
    check_architecture(architecture)
    if not isinstance(width_scale, (int, float)) or not math.isfinite(width_scale) or width_scale <= 0:
        raise ValueError(f"width_scale must be a finite number > 0, got {width_scale!r}.")
    config = public_config(teacher_config)
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
    if architecture in ("bk_small", "bk_tiny", "koala_700m"):
        config["mid_block_type"] = None
    if architecture in _KOALA_DEPTH_FRACTION:
        num, den = _KOALA_DEPTH_FRACTION[architecture]
        depths = _transformer_depths(config)
        depths[-1] = -(-depths[-1] * num // den)
        config["transformer_layers_per_block"] = depths
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


def _attention_depth(config: dict, parts: list[str]) -> int:
    """Transformer depth of the attention named by ``parts`` (``down_blocks.s``/``up_blocks.b``/``mid_block``)."""
    depths = _transformer_depths(config)
    if parts[0] == "mid_block":
        return depths[-1]
    if parts[0] == "up_blocks":
        return depths[::-1][int(parts[1])]
    return depths[int(parts[1])]


def _map_transformer_block(parts: list[str], teacher_parts: list[str], teacher_config: dict, config: dict) -> None:
    """Rewrite the ``transformer_blocks.j`` index of ``teacher_parts`` to the teacher block student block j takes."""
    if "transformer_blocks" not in parts:
        return
    at = parts.index("transformer_blocks") + 1
    kept = kept_transformer_blocks(_attention_depth(teacher_config, teacher_parts), _attention_depth(config, parts))
    teacher_parts[at] = str(kept[int(parts[at])])


def _map_key(key: str, teacher_config: dict, config: dict) -> str:
    """Map one student state-dict key to the teacher key it is initialised from."""
    parts = key.split(".")
    if parts[0] != "up_blocks":
        # conv_in, time embedding, down blocks (layer k <- layer k), mid block and output head keep names;
        # transformer block j <- the teacher's j-th kept block.
        teacher_parts = list(parts)
        _map_transformer_block(parts, teacher_parts, teacher_config, config)
        return ".".join(teacher_parts)
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
    _map_transformer_block(key.split("."), parts, teacher_config, config)
    return ".".join(parts)


def meta_unet(config: dict) -> UNet2DConditionModel:
    with init_empty_weights():
        return UNet2DConditionModel.from_config(config)


def student_key_map(teacher_config: dict, student_config: dict, architecture: str) -> dict[str, str]:
    """Map every student state-dict key to its BK-SDM/KOALA source key in the teacher.

    Down block layer ``k`` comes from teacher layer ``k``; in up blocks the student's first layers
    come from the teacher's first layers and its last layer from the teacher's last layer; for
    ``bk_tiny`` student up block ``j`` comes from teacher up block ``j + 1``. Inside a
    ``Transformer2DModel``, student transformer block ``j`` comes from the teacher's block
    ``kept_transformer_blocks(teacher_depth, student_depth)[j]`` (the first ``d``).
    """
    check_architecture(architecture)
    teacher_config = public_config(teacher_config)
    student_cfg = public_config(student_config)
    keys = meta_unet(student_cfg).state_dict().keys()
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


def copy_mapped_weights(teacher: torch.nn.Module, student: torch.nn.Module, key_map: dict[str, str]
                        ) -> StudentInitReport:
    """Copy every teacher tensor named by `key_map` (student key -> teacher key) into the student, in place.

    A teacher key that does not exist is listed in the report's `missing_in_teacher`; a tensor whose shape
    differs keeps the student's fresh initialisation and is listed in `skipped_shape`.
    """
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
    return report


def build_student(
    teacher: UNet2DConditionModel, architecture: str = "bk_small", width_scale: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[UNet2DConditionModel, StudentInitReport]:
    """Build a BK-SDM/KOALA student from ``teacher`` and copy every same-shaped mapped tensor into it.

    ``architecture`` is one of :data:`UNET_STUDENT_ARCHITECTURES`.

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
    return student, copy_mapped_weights(teacher, student, key_map)
