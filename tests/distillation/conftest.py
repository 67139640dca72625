"""Shared tiny-UNet fixtures for the distillation tests."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

TINY_UNET_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "down_block_types": ("CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D"),
}


@pytest.fixture
def tiny_config() -> dict:
    return dict(TINY_UNET_CONFIG)


@pytest.fixture
def tiny_teacher() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_UNET_CONFIG).eval()


@pytest.fixture
def unet_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    timesteps = torch.tensor([10, 500])
    encoder_hidden_states = torch.randn(2, 7, 32, generator=gen)
    return sample, timesteps, encoder_hidden_states
