"""Tests for feature taps, the default teacher/student feature pairing and width projections."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from diffusers_aria.distillation import (
    FeatureProjections,
    FeatureTaps,
    build_student,
    default_feature_mapping,
    infer_feature_channels,
    student_config,
)

SD15_CONFIG = {
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}


def test_taps_record_first_element_and_clean_up(tiny_teacher, unet_inputs):
    names = ["down_blocks.0", "mid_block", "up_blocks.1"]
    with FeatureTaps(tiny_teacher, names) as taps:
        with torch.no_grad():
            tiny_teacher(*unet_inputs)
        feats = taps.features
        assert set(feats) == set(names)
        # Down block 0 returns (hidden_states, skips); the hidden state is after downsampling.
        assert feats["down_blocks.0"].shape == (2, 32, 8, 8)
        assert feats["mid_block"].shape == (2, 64, 8, 8)
        assert feats["up_blocks.1"].shape == (2, 32, 16, 16)
        taps.clear()
        assert taps.features == {}
    with torch.no_grad():
        tiny_teacher(*unet_inputs)
    assert taps.features == {}
    assert not any(m._forward_hooks for m in tiny_teacher.modules())


def test_taps_unknown_name_lists_valid_ones(tiny_teacher):
    with pytest.raises(KeyError, match=r"down_blocks\.9.*down_blocks"):
        FeatureTaps(tiny_teacher, ["down_blocks.9"])


@pytest.mark.parametrize("architecture", ["bk_base", "bk_small", "bk_tiny"])
def test_default_mapping_pairs_equal_resolutions(tiny_teacher, unet_inputs, architecture):
    student, _ = build_student(tiny_teacher, architecture)
    mapping = default_feature_mapping(dict(tiny_teacher.config), dict(student.config), architecture)
    assert ("mid_block" in mapping) == (architecture == "bk_base")
    with (
        FeatureTaps(tiny_teacher, list(mapping)) as t_taps,
        FeatureTaps(student, list(mapping.values())) as s_taps,
    ):
        with torch.no_grad():
            tiny_teacher(*unet_inputs)
            student(*unet_inputs)
        for t_name, s_name in mapping.items():
            assert t_taps.features[t_name].shape == s_taps.features[s_name].shape, (t_name, s_name)


def test_default_mapping_for_sd_bk_tiny_matches_bk_sdm():
    tiny = student_config(SD15_CONFIG, "bk_tiny")
    mapping = default_feature_mapping(SD15_CONFIG, tiny, "bk_tiny")
    assert mapping == {
        "down_blocks.0": "down_blocks.0",
        "down_blocks.1": "down_blocks.1",
        "down_blocks.2.attentions.1": "down_blocks.2",
        "up_blocks.1": "up_blocks.0",
        "up_blocks.2": "up_blocks.1",
        "up_blocks.3": "up_blocks.2",
    }
    base = default_feature_mapping(SD15_CONFIG, student_config(SD15_CONFIG, "bk_base"), "bk_base")
    assert len(base) == 9 and base["mid_block"] == "mid_block"
    with pytest.raises(ValueError, match="bk_xl"):
        default_feature_mapping(SD15_CONFIG, tiny, "bk_xl")


def test_projections_only_where_widths_differ(tiny_teacher, unet_inputs):
    student, _ = build_student(tiny_teacher, "bk_small", width_scale=0.5)
    mapping = default_feature_mapping(dict(tiny_teacher.config), dict(student.config), "bk_small")
    t_ch = infer_feature_channels(tiny_teacher, list(mapping), *unet_inputs)
    s_ch = infer_feature_channels(student, list(mapping.values()), *unet_inputs)
    assert t_ch["down_blocks.0"] == 32 and s_ch["down_blocks.0"] == 16
    same = {"down_blocks.0": 32}
    proj = FeatureProjections(mapping, t_ch, s_ch)
    assert all(proj.has_projection(name) for name in mapping)
    feat = torch.randn(2, 16, 8, 8)
    out = proj("down_blocks.0", feat)
    assert out.shape == (2, 32, 8, 8)
    out.sum().backward()
    assert proj.projections["down_blocks__0"].weight.grad is not None

    identity = FeatureProjections({"down_blocks.0": "down_blocks.0"}, same, same)
    assert len(list(identity.parameters())) == 0
    x = torch.randn(2, 32, 4, 4)
    assert identity("down_blocks.0", x) is x
    with pytest.raises(KeyError, match="nope"):
        identity("nope", x)
    with pytest.raises(KeyError, match="up_blocks.0"):
        FeatureProjections({"up_blocks.0": "up_blocks.0"}, same, same)
    assert isinstance(proj, nn.Module)
