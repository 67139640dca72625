"""Tests for KOALA students of SDXL, BK presets on SDXL-shaped UNets and self-attention feature pairing."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusers_aria.distillation import (
    KOALA_ARCHITECTURES,
    STUDENT_ARCHITECTURES,
    UNET_STUDENT_ARCHITECTURES,
    FeatureProjections,
    FeatureTaps,
    build_student,
    count_parameters,
    default_feature_mapping,
    infer_feature_channels,
    kept_transformer_blocks,
    self_attention_mapping,
    student_config,
    student_key_map,
)
from diffusers_aria.distillation.reference_configs import SDXL_BASE_UNET_CONFIG, meta_model

# Published sizes (billions of parameters): SDXL-base UNet, KOALA-1B, KOALA-700M.
PUBLISHED = {"teacher": 2.57, "koala_1b": 1.16, "koala_700m": 0.78}

TINY_SDXL_CONFIG = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64, 64),
    "layers_per_block": 2,
    "norm_num_groups": 8,
    "cross_attention_dim": 32,
    "attention_head_dim": (2, 4, 4),
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "transformer_layers_per_block": (1, 2, 4),
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "use_linear_projection": True,
}


@pytest.fixture(scope="module")
def sdxl_teacher() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(**TINY_SDXL_CONFIG).eval()


@pytest.fixture
def sdxl_inputs() -> tuple[tuple[torch.Tensor, ...], dict]:
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 16, 16, generator=gen)
    timesteps = torch.tensor([10, 500])
    context = torch.randn(2, 7, 32, generator=gen)
    added = {"text_embeds": torch.randn(2, 32, generator=gen), "time_ids": torch.randn(2, 6, generator=gen)}
    return (sample, timesteps, context), {"added_cond_kwargs": added}


def test_real_sdxl_sizes_match_koala_paper():
    teacher = count_parameters(UNet2DConditionModel, SDXL_BASE_UNET_CONFIG) / 1e9
    assert teacher == pytest.approx(PUBLISHED["teacher"], rel=0.02)
    for architecture in KOALA_ARCHITECTURES:
        count = count_parameters(UNet2DConditionModel, student_config(SDXL_BASE_UNET_CONFIG, architecture)) / 1e9
        assert count == pytest.approx(PUBLISHED[architecture], rel=0.02), (architecture, count)


def test_koala_structure_on_real_sdxl():
    one_b = student_config(SDXL_BASE_UNET_CONFIG, "koala_1b")
    assert one_b["layers_per_block"] == 1
    assert one_b["transformer_layers_per_block"] == [1, 2, 6]
    assert one_b["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    small = student_config(SDXL_BASE_UNET_CONFIG, "koala_700m")
    assert small["transformer_layers_per_block"] == [1, 2, 5]
    assert small["mid_block_type"] is None
    model = meta_model(UNet2DConditionModel, one_b)
    assert len(model.mid_block.attentions[0].transformer_blocks) == 6
    assert [len(a.transformer_blocks) for a in model.up_blocks[0].attentions] == [6, 6]
    assert [len(b.resnets) for b in model.up_blocks] == [2, 2, 2]
    # SDXL itself is unchanged by the BK presets except for layers / stages.
    assert student_config(SDXL_BASE_UNET_CONFIG, "bk_base")["transformer_layers_per_block"] == [1, 2, 10]


@pytest.mark.parametrize("architecture", UNET_STUDENT_ARCHITECTURES)
def test_key_map_covers_real_sdxl(architecture):
    teacher_state = meta_model(UNet2DConditionModel, SDXL_BASE_UNET_CONFIG).state_dict()
    config = student_config(SDXL_BASE_UNET_CONFIG, architecture)
    student_state = meta_model(UNet2DConditionModel, config).state_dict()
    key_map = student_key_map(SDXL_BASE_UNET_CONFIG, config, architecture)
    assert set(key_map) == set(student_state)
    for s_key, t_key in key_map.items():
        assert t_key in teacher_state, (s_key, t_key)
        if architecture != "bk_tiny" or not s_key.startswith("up_blocks.0.resnets.0."):
            assert teacher_state[t_key].shape == student_state[s_key].shape, s_key


def test_koala_keeps_the_first_transformer_blocks():
    assert kept_transformer_blocks(10, 6) == [0, 1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"depth 11.*1\.\.10"):
        kept_transformer_blocks(10, 11)
    config = student_config(SDXL_BASE_UNET_CONFIG, "koala_700m")
    key_map = student_key_map(SDXL_BASE_UNET_CONFIG, config, "koala_700m")
    block = "transformer_blocks.4.attn1.to_q.weight"
    assert key_map[f"down_blocks.2.attentions.0.{block}"] == f"down_blocks.2.attentions.0.{block}"
    assert key_map[f"up_blocks.0.attentions.1.{block}"] == f"up_blocks.0.attentions.2.{block}"
    assert "down_blocks.2.attentions.0.transformer_blocks.5.attn1.to_q.weight" not in key_map


@pytest.mark.parametrize("architecture", UNET_STUDENT_ARCHITECTURES)
def test_all_presets_on_tiny_sdxl(sdxl_teacher, sdxl_inputs, architecture):
    student, report = build_student(sdxl_teacher, architecture)
    assert not report.missing_in_teacher and not report.skipped_shape
    assert report.copied == report.total > 0
    assert student.config.addition_embed_type == "text_time"
    n_student = sum(p.numel() for p in student.parameters())
    assert n_student < sum(p.numel() for p in sdxl_teacher.parameters())
    teacher_state = sdxl_teacher.state_dict()
    key_map = student_key_map(sdxl_teacher.config, student.config, architecture)
    for s_key, tensor in student.state_dict().items():
        assert torch.equal(tensor, teacher_state[key_map[s_key]]), s_key
    args, kwargs = sdxl_inputs
    with torch.no_grad():
        out = student(*args, **kwargs).sample
    assert out.shape == args[0].shape and torch.isfinite(out).all()


def test_koala_depths_on_tiny_sdxl(sdxl_teacher):
    one_b, _ = build_student(sdxl_teacher, "koala_1b")
    small, _ = build_student(sdxl_teacher, "koala_700m")
    assert list(one_b.config.transformer_layers_per_block) == [1, 2, 3]  # ceil(4 * 3/5)
    assert list(small.config.transformer_layers_per_block) == [1, 2, 2]  # ceil(4 / 2)
    assert len(one_b.mid_block.attentions[0].transformer_blocks) == 3
    assert small.mid_block is None
    teacher_blocks = sdxl_teacher.down_blocks[2].attentions[0].transformer_blocks
    for j, block in enumerate(small.down_blocks[2].attentions[0].transformer_blocks):
        for (name, value), (_, ref) in zip(block.state_dict().items(), teacher_blocks[j].state_dict().items()):
            assert torch.equal(value, ref), (j, name)


@pytest.mark.parametrize("architecture", KOALA_ARCHITECTURES)
def test_stage_feature_mapping_for_koala(sdxl_teacher, sdxl_inputs, architecture):
    student, _ = build_student(sdxl_teacher, architecture)
    mapping = default_feature_mapping(dict(sdxl_teacher.config), dict(student.config), architecture)
    assert ("mid_block" in mapping) == (architecture == "koala_1b")
    assert len(mapping) == (7 if architecture == "koala_1b" else 6)
    args, kwargs = sdxl_inputs
    with FeatureTaps(sdxl_teacher, list(mapping)) as t_taps, FeatureTaps(student, list(mapping.values())) as s_taps:
        with torch.no_grad():
            sdxl_teacher(*args, **kwargs)
            student(*args, **kwargs)
        for t_name, s_name in mapping.items():
            assert t_taps.features[t_name].shape == s_taps.features[s_name].shape, (t_name, s_name)


@pytest.mark.parametrize("architecture", UNET_STUDENT_ARCHITECTURES)
def test_self_attention_mapping_pairs_kept_blocks(sdxl_teacher, sdxl_inputs, architecture):
    student, _ = build_student(sdxl_teacher, architecture)
    mapping = self_attention_mapping(sdxl_teacher, student, architecture)
    assert mapping == self_attention_mapping(dict(sdxl_teacher.config), dict(student.config), architecture)
    student_attn1 = [n for n, _ in student.named_modules() if n.endswith("attn1")]
    assert sorted(mapping.values()) == sorted(student_attn1)
    assert all(name.endswith(".attn1") for name in mapping)
    teacher_modules = dict(sdxl_teacher.named_modules())
    student_modules = dict(student.named_modules())
    for t_name, s_name in mapping.items():  # paired modules hold the same (copied) weights
        assert torch.equal(teacher_modules[t_name].to_q.weight, student_modules[s_name].to_q.weight)
    args, kwargs = sdxl_inputs
    with FeatureTaps(sdxl_teacher, list(mapping)) as t_taps, FeatureTaps(student, list(mapping.values())) as s_taps:
        with torch.no_grad():
            sdxl_teacher(*args, **kwargs)
            student(*args, **kwargs)
        assert set(s_taps.features) == set(mapping.values())
        for t_name, s_name in mapping.items():
            t_feat, s_feat = t_taps.features[t_name], s_taps.features[s_name]
            assert t_feat.dim() == 3 and t_feat.shape == s_feat.shape, (t_name, s_name)
    if architecture == "koala_700m":
        assert mapping["up_blocks.0.attentions.2.transformer_blocks.1.attn1"] == (
            "up_blocks.0.attentions.1.transformer_blocks.1.attn1"
        )


def test_self_attention_features_project_across_widths(sdxl_teacher, sdxl_inputs):
    student, _ = build_student(sdxl_teacher, "koala_700m", width_scale=0.5)
    mapping = self_attention_mapping(sdxl_teacher, student, "koala_700m")
    args, kwargs = sdxl_inputs
    t_ch = infer_feature_channels(sdxl_teacher, list(mapping), *args, **kwargs)
    s_ch = infer_feature_channels(student, list(mapping.values()), *args, **kwargs)
    name = "down_blocks.1.attentions.0.transformer_blocks.0.attn1"
    assert t_ch[name] == 64 and s_ch[mapping[name]] == 32
    proj = FeatureProjections(mapping, t_ch, s_ch)
    out = proj(name, torch.randn(2, 64, 32))
    assert out.shape == (2, 64, 64)
    out.sum().backward()
    assert proj.projections[name.replace(".", "__")].weight.grad is not None


def test_bad_architecture_names_list_all_presets(sdxl_teacher):
    with pytest.raises(ValueError, match=r"'koala_2b'.*koala_1b.*koala_700m"):
        student_config(TINY_SDXL_CONFIG, "koala_2b")
    with pytest.raises(ValueError, match="koala_2b"):
        self_attention_mapping(sdxl_teacher, sdxl_teacher, "koala_2b")
    with pytest.raises(ValueError, match=r"transformer_layers_per_block=\[1, 2, 0\]"):
        student_config({**TINY_SDXL_CONFIG, "transformer_layers_per_block": [1, 2, 0]}, "koala_1b")
    assert set(STUDENT_ARCHITECTURES) | set(KOALA_ARCHITECTURES) == set(UNET_STUDENT_ARCHITECTURES)
