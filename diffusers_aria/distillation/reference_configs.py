"""Reference configs of public teacher models, for sizing students without downloading any weights.

Each ``*_CONFIG`` dict reproduces the public keys of the model's published ``config.json`` (the
``_class_name``/``_diffusers_version`` bookkeeping is left out). :func:`count_parameters` builds a model on
PyTorch's meta device (``accelerate.init_empty_weights``), so counting a 2.6B-parameter UNet takes no real
memory and nothing is downloaded.
"""

from __future__ import annotations

import copy
from typing import Any

from accelerate import init_empty_weights
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel

# runwayml/stable-diffusion-v1-5, unet/config.json (0.86B parameters).
SD15_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2.567B parameters).
SDXL_BASE_UNET_CONFIG: dict[str, Any] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "class_embed_type": None,
    "class_embeddings_concat": False,
    "conv_in_kernel": 3,
    "conv_out_kernel": 3,
    "cross_attention_dim": 2048,
    "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "dual_cross_attention": False,
    "encoder_hid_dim": None,
    "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "num_attention_heads": None,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False,
    "resnet_time_scale_shift": "default",
    "sample_size": 128,
    "time_cond_proj_dim": None,
    "time_embedding_act_fn": None,
    "time_embedding_dim": None,
    "time_embedding_type": "positional",
    "timestep_post_act": None,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "upcast_attention": None,
    "use_linear_projection": True,
}

# PixArt-alpha/PixArt-XL-2-1024-MS, transformer/config.json (0.61B parameters). Published as a
# ``Transformer2DModel`` config; diffusers loads it as ``PixArtTransformer2DModel``. ``sample_size=128``
# switches the resolution/aspect-ratio micro-conditions on (``use_additional_conditions`` left unset).
PIXART_ALPHA_XL_1024_CONFIG: dict[str, Any] = {
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "attention_head_dim": 72,
    "attention_type": "default",
    "caption_channels": 4096,
    "cross_attention_dim": 1152,
    "dropout": 0.0,
    "in_channels": 4,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-06,
    "norm_num_groups": 32,
    "norm_type": "ada_norm_single",
    "num_attention_heads": 16,
    "num_embeds_ada_norm": 1000,
    "num_layers": 28,
    "out_channels": 8,
    "patch_size": 2,
    "sample_size": 128,
    "upcast_attention": False,
}

# PixArt-alpha/PixArt-Sigma-XL-2-1024-MS, transformer/config.json (0.61B parameters; no micro-conditions).
PIXART_SIGMA_XL_1024_CONFIG: dict[str, Any] = {
    **PIXART_ALPHA_XL_1024_CONFIG,
    "interpolation_scale": 2,
    "use_additional_conditions": False,
}

# stabilityai/stable-diffusion-3-medium-diffusers, transformer/config.json (2.03B parameters).
SD3_MEDIUM_CONFIG: dict[str, Any] = {
    "attention_head_dim": 64,
    "caption_projection_dim": 1536,
    "in_channels": 16,
    "joint_attention_dim": 4096,
    "num_attention_heads": 24,
    "num_layers": 24,
    "out_channels": 16,
    "patch_size": 2,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
    "sample_size": 128,
}

# stabilityai/stable-diffusion-3.5-medium, transformer/config.json (MMDiT-X: dual attention in the first
# 13 blocks, RMS-normed queries/keys).
SD35_MEDIUM_CONFIG: dict[str, Any] = {
    **SD3_MEDIUM_CONFIG,
    "dual_attention_layers": list(range(13)),
    "pos_embed_max_size": 384,
    "qk_norm": "rms_norm",
}

# name -> (model class, config, published size in billions of parameters or None).
REFERENCE_MODELS: dict[str, tuple[type, dict[str, Any], float | None]] = {
    "sd15_unet": (UNet2DConditionModel, SD15_UNET_CONFIG, 0.86),
    "sdxl_base_unet": (UNet2DConditionModel, SDXL_BASE_UNET_CONFIG, 2.57),
    "pixart_alpha_xl_1024": (PixArtTransformer2DModel, PIXART_ALPHA_XL_1024_CONFIG, 0.61),
    "pixart_sigma_xl_1024": (PixArtTransformer2DModel, PIXART_SIGMA_XL_1024_CONFIG, 0.61),
    "sd3_medium": (SD3Transformer2DModel, SD3_MEDIUM_CONFIG, 2.03),
    "sd35_medium": (SD3Transformer2DModel, SD35_MEDIUM_CONFIG, None),
}


def reference_config(name: str) -> dict[str, Any]:
    """A deep copy of the reference config called ``name`` (a key of :data:`REFERENCE_MODELS`)."""
    if name not in REFERENCE_MODELS:
        raise KeyError(f"Unknown reference model {name!r}; valid names are {sorted(REFERENCE_MODELS)}.")
    return copy.deepcopy(REFERENCE_MODELS[name][1])


def meta_model(model_class: type, config: dict[str, Any]):
    """Build ``model_class`` from ``config`` on the meta device (parameters and buffers take no memory)."""
    if not hasattr(model_class, "from_config"):
        raise TypeError(f"model_class must be a diffusers model class, got {model_class!r}.")
    with init_empty_weights(include_buffers=True):
        return model_class.from_config(copy.deepcopy(dict(config)))


def count_parameters(model_class: type, config: dict[str, Any]) -> int:
    """Number of parameters of ``model_class`` built from ``config``, counted on the meta device."""
    return sum(p.numel() for p in meta_model(model_class, config).parameters())
