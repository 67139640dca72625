"""Intermediate-feature taps, teacher/student feature pairing and width projections for feature KD."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .students import check_architecture, meta_unet, public_config, student_key_map


def _image_stream(output: Any) -> torch.Tensor:
    """The image tokens of an MMDiT block: ``JointTransformerBlock`` returns ``(encoder_hidden_states,
    hidden_states)``, whose first element is the text stream (``None`` in the last, context-pre-only block)."""
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[-1])
    return _first_tensor(output)


# Module class name -> how to pick the hidden state from its output, where the first tensor is the wrong one.
OUTPUT_SELECTORS: dict[str, Callable[[Any], torch.Tensor]] = {"JointTransformerBlock": _image_stream}


def _first_tensor(output: Any) -> torch.Tensor:
    """Return the hidden state of a module output (first element of tuples / model outputs)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output:
        return _first_tensor(output[0])
    if isinstance(output, dict) and output:
        return _first_tensor(next(iter(output.values())))
    raise TypeError(f"Cannot extract a tensor from a module output of type {type(output).__name__}.")


class FeatureTaps:
    """Record the outputs of named submodules of ``model`` with forward hooks.

    Pass the unwrapped model (not a DDP/compiled wrapper). Tuple outputs keep their first element,
    which for diffusers down blocks is the hidden state, except for modules whose class name has a
    selector in :data:`OUTPUT_SELECTORS` (an SD3 ``JointTransformerBlock`` records its image tokens, the
    last element) or in ``selectors`` (class name -> function of the output; merged over the defaults).
    Use as a context manager to remove hooks.
    """

    def __init__(
        self,
        model: nn.Module,
        module_names: list[str],
        selectors: dict[str, Callable[[Any], torch.Tensor]] | None = None,
    ) -> None:
        modules = dict(model.named_modules())
        unknown = [name for name in module_names if name not in modules]
        if unknown:
            valid = [name for name in modules if name][:8]
            raise KeyError(
                f"Feature tap module(s) {unknown} not found in {type(model).__name__}; "
                f"valid names look like {valid} (pass the unwrapped model)."
            )
        self._selectors = {**OUTPUT_SELECTORS, **(selectors or {})}
        self._features: dict[str, torch.Tensor] = {}
        self._handles = [
            modules[name].register_forward_hook(
                self._hook(name, self._selectors.get(type(modules[name]).__name__, _first_tensor))
            )
            for name in module_names
        ]

    def _hook(self, name: str, select: Callable[[Any], torch.Tensor]):
        def record(_module: nn.Module, _inputs: Any, output: Any) -> None:
            self._features[name] = select(output)

        return record

    @property
    def features(self) -> dict[str, torch.Tensor]:
        """Outputs recorded since the last :meth:`clear`, keyed by module name."""
        return dict(self._features)

    def clear(self) -> None:
        """Forget recorded features (call once per training step)."""
        self._features.clear()

    def remove(self) -> None:
        """Remove all hooks and recorded features."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._features.clear()

    def __enter__(self) -> FeatureTaps:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _last_inner_layer(config: dict, stage: int) -> str:
    """Name of the last ResNet/attention layer of down ``stage`` (its output before downsampling)."""
    layers = config.get("layers_per_block", 2)
    n_layers = layers[stage] if isinstance(layers, (list, tuple)) else layers
    kind = "attentions" if "CrossAttn" in config["down_block_types"][stage] else "resnets"
    return f"down_blocks.{stage}.{kind}.{n_layers - 1}"


def default_feature_mapping(teacher_config: dict, student_config: dict, architecture: str) -> dict[str, str]:
    """Map teacher module names to student module names at the end of each stage, matched by resolution.

    Every down block, the mid block (when both have one) and every up block are paired. When the
    student drops the lowest-resolution stage (``bk_tiny``), its new last down block has no
    downsampler, so it is paired with the teacher's last layer of that stage before downsampling.
    """
    check_architecture(architecture)
    n_teacher = len(teacher_config["down_block_types"])
    n_student = len(student_config["down_block_types"])
    offset = n_teacher - n_student
    if offset < 0:
        raise ValueError(f"Student has more stages ({n_student}) than the teacher ({n_teacher}).")
    mapping: dict[str, str] = {}
    for stage in range(n_student):
        teacher_name = f"down_blocks.{stage}"
        if offset and stage == n_student - 1:
            teacher_name = _last_inner_layer(teacher_config, stage)
        mapping[teacher_name] = f"down_blocks.{stage}"
    if teacher_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") and student_config.get(
        "mid_block_type", "UNetMidBlock2DCrossAttn"
    ):
        mapping["mid_block"] = "mid_block"
    for block in range(n_student):
        mapping[f"up_blocks.{block + offset}"] = f"up_blocks.{block}"
    return mapping


def _config_of(model_or_config: Any) -> dict[str, Any]:
    config = model_or_config.config if isinstance(model_or_config, nn.Module) else model_or_config
    return public_config(config)


def self_attention_mapping(teacher: Any, student: Any, architecture: str) -> dict[str, str]:
    """Pair every student self-attention (``...transformer_blocks.j.attn1``) with the teacher's ``attn1`` it was
    initialised from, as ``{teacher_name: student_name}``.

    ``teacher``/``student`` are UNets or their configs; ``architecture`` is one of
    :data:`~diffusers_aria.distillation.students.UNET_STUDENT_ARCHITECTURES`. KOALA found the self-attention
    features the most useful feature-KD target; tap them with :class:`FeatureTaps` (the outputs are
    ``(batch, tokens, channels)``).
    """
    check_architecture(architecture)
    teacher_config, student_cfg = _config_of(teacher), _config_of(student)
    key_map = student_key_map(teacher_config, student_cfg, architecture)
    mapping: dict[str, str] = {}
    for name, _module in meta_unet(student_cfg).named_modules():
        if name.endswith(".attn1") and ".transformer_blocks." in name:
            teacher_key = key_map[f"{name}.to_q.weight"]
            mapping[teacher_key[: -len(".to_q.weight")]] = name
    return mapping


def _channels(feature: torch.Tensor) -> int:
    """Channel count of a feature: dim 1 of a feature map, the last dim of ``(batch, tokens, channels)``."""
    return int(feature.shape[-1] if feature.dim() == 3 else feature.shape[1])


@torch.no_grad()
def infer_feature_channels(
    model: nn.Module, module_names: list[str], *args: Any, forward: Any = None, **kwargs: Any
) -> dict[str, int]:
    """Run ``model(*args, **kwargs)`` once (or ``forward(*args, **kwargs)``, a call of ``model`` with its own
    inputs, e.g. a model family's) and return the channel count of each tapped output.

    Feature maps ``(batch, channels, ...)`` count dim 1; token sequences ``(batch, tokens, channels)`` (attention
    and transformer-block outputs) count the last dim.
    """
    with FeatureTaps(model, module_names) as taps:
        (forward or model)(*args, **kwargs)
        return {name: _channels(feature) for name, feature in taps.features.items()}


def _key(name: str) -> str:
    return name.replace(".", "__")


class FeatureProjections(nn.Module):
    """Per-pair 1x1 convolutions lifting student features to the teacher's width.

    A projection exists only where the widths differ; elsewhere the feature passes through unchanged.
    Call ``projections(teacher_name, student_feature)``; a token sequence ``(batch, tokens, channels)`` is
    projected on its last dim with the same weights.
    """

    def __init__(
        self, mapping: dict[str, str], teacher_channels: dict[str, int], student_channels: dict[str, int]
    ) -> None:
        super().__init__()
        self.mapping = dict(mapping)
        self.projections = nn.ModuleDict()
        for teacher_name, student_name in self.mapping.items():
            if teacher_name not in teacher_channels or student_name not in student_channels:
                raise KeyError(
                    f"Missing channel count for pair {teacher_name!r} -> {student_name!r}; "
                    f"teacher has {sorted(teacher_channels)}, student has {sorted(student_channels)}."
                )
            c_t, c_s = int(teacher_channels[teacher_name]), int(student_channels[student_name])
            if c_t != c_s:
                self.projections[_key(teacher_name)] = nn.Conv2d(c_s, c_t, kernel_size=1)

    def has_projection(self, teacher_name: str) -> bool:
        """Whether the pair keyed by ``teacher_name`` uses a learned projection."""
        return _key(teacher_name) in self.projections

    def forward(self, teacher_name: str, student_feature: torch.Tensor) -> torch.Tensor:
        if teacher_name not in self.mapping:
            raise KeyError(f"Unknown feature pair {teacher_name!r}; valid names are {sorted(self.mapping)}.")
        key = _key(teacher_name)
        if key not in self.projections:
            return student_feature
        conv = self.projections[key]
        feature = student_feature.to(conv.weight.dtype)
        if feature.dim() == 3:
            return F.linear(feature, conv.weight.flatten(1), conv.bias)
        return conv(feature)
