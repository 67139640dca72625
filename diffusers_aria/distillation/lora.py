"""LoRA adapters on a (student) UNet via peft, with diffusers-format saving."""

from __future__ import annotations

import os

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict

DEFAULT_LORA_TARGETS: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside DDP/FSDP/DeepSpeed and ``torch.compile`` wrappers (accelerate's own unwrapping)."""
    from accelerate.utils import extract_model_from_parallel

    return extract_model_from_parallel(model)


def _matches(module_name: str, target: str) -> bool:
    """peft's string matching: exact name or a ``.``-separated suffix."""
    return module_name == target or module_name.endswith("." + target)


def _suffix(module_name: str) -> str:
    """Short target-style name of a module, e.g. ``to_q`` or ``to_out.0``."""
    parts = module_name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def add_lora(
    unet: UNet2DConditionModel,
    rank: int = 4,
    lora_alpha: float | None = None,
    target_modules: list[str] | None = None,
) -> UNet2DConditionModel:
    """Freeze ``unet`` and add a trainable LoRA adapter on ``target_modules``; returns ``unet``.

    ``lora_alpha`` defaults to ``rank`` (scale 1). Defaults target the attention projections.
    """
    if not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive int, got {rank!r}.")
    targets = list(target_modules) if target_modules is not None else list(DEFAULT_LORA_TARGETS)
    if not targets:
        raise ValueError("target_modules is empty; name at least one module, e.g. ['to_q', 'to_v'].")
    names = [name for name, _ in unet.named_modules() if name]
    unmatched = [t for t in targets if not any(_matches(name, t) for name in names)]
    if unmatched:
        leaf_names = sorted(
            {
                _suffix(name)
                for name, m in unet.named_modules()
                if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
            }
        )
        raise ValueError(
            f"LoRA target module(s) {unmatched} match nothing in {type(unet).__name__}; "
            f"available Linear/Conv2d module names include {leaf_names[:30]}."
        )
    unet.requires_grad_(False)
    config = LoraConfig(
        r=rank,
        lora_alpha=float(lora_alpha) if lora_alpha is not None else float(rank),
        init_lora_weights="gaussian",
        target_modules=targets,
    )
    if hasattr(unet, "add_adapter"):
        unet.add_adapter(config)
    else:  # models without diffusers' PeftAdapterMixin, e.g. PixArtTransformer2DModel
        from peft import inject_adapter_in_model

        inject_adapter_in_model(config, unet)
    return unet


def cast_trainable_to_fp32(model: torch.nn.Module) -> torch.nn.Module:
    """Upcast trainable parameters (e.g. LoRA adapters) to float32, leaving frozen ones as they are."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    return model


def save_lora_weights(unet: torch.nn.Module, output_dir: str | os.PathLike) -> str:
    """Write the UNet's LoRA as diffusers-format ``pytorch_lora_weights.safetensors``; returns its path."""
    model = _unwrap(unet)
    state = get_peft_model_state_dict(model) if getattr(model, "peft_config", None) else {}
    if not state:
        raise ValueError("The model has no LoRA adapter weights to save; call add_lora first.")
    from diffusers import StableDiffusionPipeline  # heavy import, only needed here

    lora_layers = convert_state_dict_to_diffusers(state)
    os.makedirs(output_dir, exist_ok=True)
    # the adapter's config (rank, alpha, targets) travels in the file's metadata: without it
    # `load_lora_weights` assumes alpha == rank and loads a rank-2/alpha-4 adapter at half its trained scale
    config = model.peft_config[next(iter(model.peft_config))]
    StableDiffusionPipeline.save_lora_weights(
        save_directory=output_dir, unet_lora_layers=lora_layers, safe_serialization=True,
        unet_lora_adapter_metadata=config.to_dict(),
    )
    return os.path.join(os.fspath(output_dir), "pytorch_lora_weights.safetensors")


def base_state_dict(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The UNet's weights without its LoRA adapters, under the plain (non-peft) parameter names.

    The base of a LoRA student is frozen, so this equals the initialised student: save it with
    `save_pretrained` beside `pytorch_lora_weights.safetensors` and load the pair with `load_lora_weights`.
    """
    out = {}
    for key, value in _unwrap(unet).state_dict().items():
        if ".lora_" in key or "lora_magnitude_vector" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value
    return out
