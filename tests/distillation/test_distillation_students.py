"""Tests for BK-SDM student construction and teacher initialisation."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel

from diffusers_aria.distillation import (
    STUDENT_ARCHITECTURES,
    StudentInitReport,
    build_student,
    student_config,
    student_key_map,
)

SD15_UNET_CONFIG = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD21_BASE_UNET_CONFIG = {
    **SD15_UNET_CONFIG,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
}

# Published BK-SDM UNet sizes (billions of parameters).
PUBLISHED_SIZES = {
    "sd15": {"teacher": 0.86, "bk_base": 0.58, "bk_small": 0.49, "bk_tiny": 0.33},
    "sd21": {"teacher": 0.87, "bk_base": 0.59, "bk_small": 0.49, "bk_tiny": 0.33},
}
TEACHER_CONFIGS = {"sd15": SD15_UNET_CONFIG, "sd21": SD21_BASE_UNET_CONFIG}


def _meta_param_count(config: dict) -> float:
    with init_empty_weights():
        model = UNet2DConditionModel.from_config(config)
    return sum(p.numel() for p in model.parameters()) / 1e9


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_parameter_counts_match_bk_sdm(family):
    teacher_config = TEACHER_CONFIGS[family]
    expected = PUBLISHED_SIZES[family]
    assert _meta_param_count(teacher_config) == pytest.approx(expected["teacher"], abs=0.01)
    for architecture in STUDENT_ARCHITECTURES:
        count = _meta_param_count(student_config(teacher_config, architecture))
        assert count == pytest.approx(expected[architecture], abs=0.01), architecture


@pytest.mark.parametrize("family", ["sd15", "sd21"])
def test_key_map_covers_real_configs(family):
    teacher_config = TEACHER_CONFIGS[family]
    with init_empty_weights():
        teacher_state = UNet2DConditionModel.from_config(teacher_config).state_dict()
    for architecture in STUDENT_ARCHITECTURES:
        config = student_config(teacher_config, architecture)
        with init_empty_weights():
            student_state = UNet2DConditionModel.from_config(config).state_dict()
        key_map = student_key_map(teacher_config, config, architecture)
        assert set(key_map) == set(student_state)
        for s_key, t_key in key_map.items():
            assert t_key in teacher_state, (architecture, s_key, t_key)
            assert teacher_state[t_key].shape == student_state[s_key].shape, (architecture, s_key)


def test_structure_of_architectures():
    base = student_config(SD15_UNET_CONFIG, "bk_base")
    assert base["layers_per_block"] == 1
    with init_empty_weights():
        assert UNet2DConditionModel.from_config(base).mid_block is not None
    small = student_config(SD15_UNET_CONFIG, "bk_small")
    assert small["mid_block_type"] is None
    tiny = student_config(SD21_BASE_UNET_CONFIG, "bk_tiny")
    assert tiny["block_out_channels"] == [320, 640, 1280]
    assert tiny["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
    assert tiny["up_block_types"] == ["CrossAttnUpBlock2D"] * 3
    assert tiny["attention_head_dim"] == [5, 10, 20]
    with init_empty_weights():
        model = UNet2DConditionModel.from_config(small)
    assert model.mid_block is None
    assert [len(b.resnets) for b in model.down_blocks] == [1, 1, 1, 1]
    assert [len(b.resnets) for b in model.up_blocks] == [2, 2, 2, 2]


def test_key_map_follows_bk_sdm_layer_choice():
    base_map = student_key_map(SD15_UNET_CONFIG, student_config(SD15_UNET_CONFIG, "bk_base"), "bk_base")
    assert base_map["up_blocks.1.resnets.1.conv1.weight"] == "up_blocks.1.resnets.2.conv1.weight"
    assert base_map["up_blocks.1.resnets.0.conv1.weight"] == "up_blocks.1.resnets.0.conv1.weight"
    assert (
        base_map["down_blocks.1.attentions.0.proj_in.weight"] == "down_blocks.1.attentions.0.proj_in.weight"
    )
    tiny_map = student_key_map(SD15_UNET_CONFIG, student_config(SD15_UNET_CONFIG, "bk_tiny"), "bk_tiny")
    assert tiny_map["up_blocks.0.attentions.1.proj_out.weight"] == "up_blocks.1.attentions.2.proj_out.weight"
    assert "up_blocks.2.upsamplers.0.conv.weight" not in tiny_map
    assert "down_blocks.2.downsamplers.0.conv.weight" not in tiny_map
    assert tiny_map["up_blocks.1.upsamplers.0.conv.weight"] == "up_blocks.2.upsamplers.0.conv.weight"


@pytest.mark.parametrize("architecture", STUDENT_ARCHITECTURES)
def test_tiny_student_forward_and_exact_copy(tiny_teacher, unet_inputs, architecture):
    student, report = build_student(tiny_teacher, architecture)
    assert isinstance(report, StudentInitReport)
    assert not report.missing_in_teacher
    if architecture == "bk_tiny":
        # Teacher up block 1 receives 64 channels from the dropped stage, the student's only 32,
        # so only the first up ResNet's input-side tensors cannot be copied.
        assert report.skipped_shape and all(
            k.startswith("up_blocks.0.resnets.0.") for k in report.skipped_shape
        )
    else:
        assert not report.skipped_shape
    assert report.copied == report.total - len(report.skipped_shape) > 0
    assert f"{report.copied}/{report.total}" in str(report)
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in tiny_teacher.parameters())

    teacher_state = tiny_teacher.state_dict()
    key_map = student_key_map(tiny_teacher.config, student.config, architecture)
    for s_key, tensor in student.state_dict().items():
        if s_key in report.skipped_shape:
            continue
        assert torch.equal(tensor, teacher_state[key_map[s_key]]), s_key

    sample, timesteps, context = unet_inputs
    with torch.no_grad():
        out_t = tiny_teacher(sample, timesteps, context).sample
        out_s = student(sample, timesteps, context).sample
    assert out_s.shape == out_t.shape == sample.shape
    assert torch.isfinite(out_s).all()


def test_width_scale_changes_channels_and_reports_skips(tiny_teacher, unet_inputs):
    student, report = build_student(tiny_teacher, "bk_small", width_scale=0.5)
    assert list(student.config.block_out_channels) == [16, 32]
    assert student.conv_in.out_channels == 16
    assert report.skipped_shape and report.copied + len(report.skipped_shape) == report.total
    sample, timesteps, context = unet_inputs
    with torch.no_grad():
        assert student(sample, timesteps, context).sample.shape == sample.shape
    # Channels are rounded to a multiple of lcm(norm_num_groups, heads) = 8.
    config = student_config(tiny_teacher.config, "bk_base", width_scale=0.3)
    assert all(c % 8 == 0 and c >= 8 for c in config["block_out_channels"])
    wide = student_config(SD21_BASE_UNET_CONFIG, "bk_small", width_scale=0.5)
    assert all(c % 32 == 0 and c % h == 0 for c, h in zip(wide["block_out_channels"], [5, 10, 20, 20]))


def test_bad_inputs_raise(tiny_config):
    with pytest.raises(ValueError, match=r"'bk_huge'.*bk_base"):
        student_config(tiny_config, "bk_huge")
    with pytest.raises(ValueError, match=r"width_scale.*-1"):
        student_config(tiny_config, "bk_small", width_scale=-1)
    with pytest.raises(ValueError, match=r"width_scale.*0"):
        student_config(tiny_config, "bk_small", width_scale=0)
    one_stage = {
        **tiny_config,
        "block_out_channels": (32,),
        "down_block_types": ("CrossAttnDownBlock2D",),
        "up_block_types": ("CrossAttnUpBlock2D",),
    }
    with pytest.raises(ValueError, match=r"bk_tiny.*1 stage"):
        student_config(one_stage, "bk_tiny")
    with pytest.raises(ValueError, match=r"layers_per_block=1"):
        student_config({**tiny_config, "layers_per_block": 1}, "bk_base")
    with pytest.raises(ValueError, match="bk_nano"):
        student_key_map(tiny_config, tiny_config, "bk_nano")


def test_student_round_trips_through_save_pretrained(tiny_teacher, unet_inputs, tmp_path):
    student, _ = build_student(tiny_teacher, "bk_tiny")
    student.save_pretrained(tmp_path / "student")
    reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "student")
    assert reloaded.config.mid_block_type is None
    assert len(reloaded.down_blocks) == 1
    sample, timesteps, context = unet_inputs
    with torch.no_grad():
        torch.testing.assert_close(
            reloaded(sample, timesteps, context).sample, student(sample, timesteps, context).sample
        )
