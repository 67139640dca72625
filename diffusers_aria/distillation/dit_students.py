"""Block-subset students of diffusion transformers (PixArt, SD3): fewer transformer blocks, teacher-initialised.

A DiT student is the teacher's architecture with ``num_layers`` = the number of kept blocks. Student block
``j`` is initialised from teacher block ``keep_blocks[j]``; every non-block tensor (patch embedding, timestep
and caption embeddings, output norm and projection) is copied unchanged. Two presets choose the blocks
(:func:`dit_block_indices`):

* ``dit_every_other`` -- every other block, always ending with the teacher's last block
  (28 blocks -> 1, 3, ..., 27).
* ``dit_first_last``  -- the first and the last blocks, ``num_blocks`` in all (default half; an odd count
  gives the extra block to the end), keeping both the input-side and the output-side blocks.

SD3's last ``JointTransformerBlock`` is built with ``context_pre_only=True`` (no text-stream output, different
modules), so an SD3 student must keep the teacher's last block as its own last block. SD3.5's
``dual_attention_layers`` (teacher indices) become the student indices of the kept dual-attention blocks;
``qk_norm`` carries over.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

from .students import StudentInitReport, copy_mapped_weights, public_config

DIT_STUDENT_ARCHITECTURES: tuple[str, ...] = ("dit_every_other", "dit_first_last")
DIT_TEACHER_CLASSES: tuple[type, ...] = (PixArtTransformer2DModel, SD3Transformer2DModel)

_BLOCKS = "transformer_blocks"


def _check_dit_architecture(architecture: str) -> None:
    if architecture not in DIT_STUDENT_ARCHITECTURES:
        raise ValueError(
            f"Unknown DiT student architecture {architecture!r}; valid options are {list(DIT_STUDENT_ARCHITECTURES)}."
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_keep_blocks(keep_blocks: Any, num_layers: int | None = None) -> list[int]:
    """``keep_blocks`` as a list, checked to be strictly increasing indices in ``0..num_layers - 1``."""
    keep = list(keep_blocks) if isinstance(keep_blocks, (list, tuple, range)) else None
    upper = num_layers if num_layers is not None else float("inf")
    if (
        not keep
        or not all(_is_int(i) and 0 <= i < upper for i in keep)
        or any(a >= b for a, b in zip(keep, keep[1:]))
    ):
        valid = f"0..{num_layers - 1}" if num_layers is not None else ">= 0"
        raise ValueError(
            f"keep_blocks={keep_blocks!r} is not valid; pass a non-empty, strictly increasing list of block "
            f"indices in {valid}."
        )
    return [int(i) for i in keep]


def dit_block_indices(
    num_layers: int, architecture: str, num_blocks: int | None = None, keep_blocks: list[int] | None = None
) -> list[int]:
    """Teacher block indices a DiT student of ``architecture`` keeps, in order.

    ``dit_every_other`` keeps every other block ending with the last (``ceil(num_layers / 2)`` blocks; it takes
    no ``num_blocks``). ``dit_first_last`` keeps ``num_blocks`` (default ``num_layers // 2``) blocks: the first
    ``num_blocks // 2`` and the last ``num_blocks - num_blocks // 2``. ``keep_blocks`` (strictly increasing
    indices) overrides the preset's choice.
    """
    if not _is_int(num_layers) or num_layers < 1:
        raise ValueError(f"num_layers must be an int >= 1, got {num_layers!r}.")
    _check_dit_architecture(architecture)
    if keep_blocks is not None:
        keep = _check_keep_blocks(keep_blocks, num_layers)
        if num_blocks is not None and num_blocks != len(keep):
            raise ValueError(
                f"num_blocks={num_blocks!r} disagrees with keep_blocks={keep!r} ({len(keep)} blocks); "
                "pass one of them, or a num_blocks equal to len(keep_blocks)."
            )
        return keep
    if architecture == "dit_every_other":
        if num_blocks is not None:
            raise ValueError(
                f"num_blocks={num_blocks!r} does not apply to 'dit_every_other' (it keeps "
                f"{(num_layers + 1) // 2} of {num_layers} blocks); valid choices are num_blocks=None, "
                "architecture='dit_first_last' with num_blocks, or explicit keep_blocks."
            )
        return list(range((num_layers - 1) % 2, num_layers, 2))
    count = max(1, num_layers // 2) if num_blocks is None else num_blocks
    if not _is_int(count) or not 1 <= count <= num_layers:
        raise ValueError(f"num_blocks={num_blocks!r} is not valid; valid values are ints in 1..{num_layers}.")
    first = count // 2
    return list(range(first)) + list(range(num_layers - (count - first), num_layers))


def _is_sd3(config: dict[str, Any]) -> bool:
    return "joint_attention_dim" in config


def dit_student_config(teacher_config: dict[str, Any], keep_blocks: list[int]) -> dict[str, Any]:
    """Config of a student keeping teacher blocks ``keep_blocks`` (PixArt or SD3 transformer config)."""
    config = public_config(teacher_config)
    if "num_layers" not in config:
        raise ValueError(
            f"Teacher config has no 'num_layers' (keys: {sorted(config)[:12]}); valid teachers are "
            f"{[c.__name__ for c in DIT_TEACHER_CLASSES]}."
        )
    num_layers = int(config["num_layers"])
    keep = _check_keep_blocks(keep_blocks, num_layers)
    if _is_sd3(config) and keep[-1] != num_layers - 1:
        raise ValueError(
            f"keep_blocks={keep!r} drops the SD3 teacher's last block {num_layers - 1}, which is the only "
            "context-pre-only JointTransformerBlock; valid SD3 students keep it as their last block."
        )
    config["num_layers"] = len(keep)
    if config.get("dual_attention_layers"):
        dual = {int(i) for i in config["dual_attention_layers"]}
        config["dual_attention_layers"] = tuple(j for j, i in enumerate(keep) if i in dual)
    return config


def _teacher_key(student_key: str, keep: list[int]) -> str:
    parts = student_key.split(".")
    if parts[0] == _BLOCKS:
        parts[1] = str(keep[int(parts[1])])
    return ".".join(parts)


def dit_student_key_map(student_keys: Any, keep_blocks: list[int]) -> dict[str, str]:
    """Map student state-dict keys to teacher keys: ``transformer_blocks.j.*`` <- ``transformer_blocks.{keep[j]}.*``,
    every other key unchanged."""
    keep = list(keep_blocks)
    return {key: _teacher_key(key, keep) for key in student_keys}


def dit_feature_mapping(keep_blocks: list[int]) -> dict[str, str]:
    """Pair each kept teacher block with the student block initialised from it, ``{teacher_name: student_name}``.

    Tap them with :class:`~diffusers_aria.distillation.features.FeatureTaps`, which records the image tokens of
    SD3 blocks (``(batch, tokens, channels)``).
    """
    keep = _check_keep_blocks(keep_blocks)
    return {f"{_BLOCKS}.{i}": f"{_BLOCKS}.{j}" for j, i in enumerate(keep)}


def build_dit_student(
    teacher: PixArtTransformer2DModel | SD3Transformer2DModel,
    architecture: str = "dit_every_other",
    num_blocks: int | None = None,
    keep_blocks: list[int] | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[PixArtTransformer2DModel | SD3Transformer2DModel, StudentInitReport]:
    """Build a block-subset student of a PixArt/SD3 ``teacher`` and copy the teacher's weights into it.

    Blocks are chosen by :func:`dit_block_indices` (call it with ``teacher.config.num_layers`` and the same
    arguments to get the kept indices, e.g. for :func:`dit_feature_mapping`). As with :func:`~diffusers_aria.distillation.students.build_student`, the student lives on the teacher's
    device in ``dtype`` and the teacher is not modified.
    """
    if not isinstance(teacher, DIT_TEACHER_CLASSES):
        raise TypeError(
            f"teacher must be one of {[c.__name__ for c in DIT_TEACHER_CLASSES]}, got {type(teacher).__name__}."
        )
    keep = dit_block_indices(int(teacher.config.num_layers), architecture, num_blocks, keep_blocks)
    config = dit_student_config(teacher.config, keep)
    student = type(teacher).from_config(config)
    param = next(teacher.parameters())
    device = param.device if param.device.type != "meta" else torch.device("cpu")
    if device.type != "cpu" or dtype != torch.float32:
        student.to(device=device, dtype=dtype)

    return student, copy_mapped_weights(teacher, student, dit_student_key_map(student.state_dict(), keep))
