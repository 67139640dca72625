"""Tests for block-subset students of PixArt and SD3 transformers: block choice, init, taps and LoRA."""

from __future__ import annotations

import pytest
import torch
from diffusers import PixArtTransformer2DModel, SD3Transformer2DModel

from diffusers_aria.distillation import (
    DIT_STUDENT_ARCHITECTURES,
    FeatureTaps,
    add_lora,
    build_dit_student,
    count_parameters,
    dit_block_indices,
    dit_feature_mapping,
    dit_student_config,
)
from diffusers_aria.distillation.reference_configs import (
    PIXART_ALPHA_XL_1024_CONFIG,
    PIXART_SIGMA_XL_1024_CONFIG,
    SD3_MEDIUM_CONFIG,
    SD35_MEDIUM_CONFIG,
    meta_model,
)

TINY_PIXART = {
    "sample_size": 8,
    "num_layers": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "in_channels": 4,
    "out_channels": 8,
    "caption_channels": 32,
    "cross_attention_dim": 16,
    "norm_type": "ada_norm_single",
    "patch_size": 2,
    "use_additional_conditions": False,
}
TINY_SD3 = {
    "sample_size": 8,
    "patch_size": 2,
    "in_channels": 4,
    "num_layers": 4,
    "attention_head_dim": 8,
    "num_attention_heads": 2,
    "joint_attention_dim": 32,
    "caption_projection_dim": 16,
    "pooled_projection_dim": 32,
    "out_channels": 4,
    "pos_embed_max_size": 16,
}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def _tiny(kind: str, **overrides):
    torch.manual_seed(0)
    if kind == "pixart":
        return PixArtTransformer2DModel(**{**TINY_PIXART, **overrides}).eval()
    return SD3Transformer2DModel(**{**TINY_SD3, **overrides}).eval()


def _inputs(kind: str) -> dict:
    gen = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, 8, 8, generator=gen)
    context = torch.randn(2, 5, 32, generator=gen)
    timestep = torch.tensor([10, 500])
    if kind == "pixart":
        return {
            "hidden_states": sample,
            "encoder_hidden_states": context,
            "timestep": timestep,
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        }
    pooled = torch.randn(2, 32, generator=gen)
    return {"hidden_states": sample, "encoder_hidden_states": context, "pooled_projections": pooled, "timestep": timestep}


def test_block_indices_presets():
    assert dit_block_indices(28, "dit_every_other") == list(range(1, 28, 2))
    assert dit_block_indices(5, "dit_every_other") == [0, 2, 4]
    assert dit_block_indices(28, "dit_first_last") == list(range(7)) + list(range(21, 28))
    assert dit_block_indices(24, "dit_first_last", num_blocks=5) == [0, 1, 21, 22, 23]
    assert dit_block_indices(4, "dit_first_last", num_blocks=1) == [3]
    assert dit_block_indices(4, "dit_every_other", keep_blocks=[0, 3]) == [0, 3]
    assert dit_block_indices(4, "dit_first_last", num_blocks=2, keep_blocks=(1, 2)) == [1, 2]
    for architecture in DIT_STUDENT_ARCHITECTURES:
        assert dit_block_indices(1, architecture) == [0]


def test_block_indices_bad_values():
    with pytest.raises(ValueError, match=r"'dit_half'.*dit_every_other.*dit_first_last"):
        dit_block_indices(28, "dit_half")
    with pytest.raises(ValueError, match=r"num_blocks=30.*1\.\.28"):
        dit_block_indices(28, "dit_first_last", num_blocks=30)
    with pytest.raises(ValueError, match=r"num_blocks=0"):
        dit_block_indices(28, "dit_first_last", num_blocks=0)
    with pytest.raises(ValueError, match=r"num_blocks=10.*dit_every_other"):
        dit_block_indices(28, "dit_every_other", num_blocks=10)
    with pytest.raises(ValueError, match=r"keep_blocks=\[3, 1\].*increasing.*0\.\.27"):
        dit_block_indices(28, "dit_every_other", keep_blocks=[3, 1])
    with pytest.raises(ValueError, match=r"keep_blocks=\[0, 28\]"):
        dit_block_indices(28, "dit_every_other", keep_blocks=[0, 28])
    with pytest.raises(ValueError, match=r"keep_blocks=\[\]"):
        dit_block_indices(28, "dit_every_other", keep_blocks=[])
    with pytest.raises(ValueError, match=r"num_blocks=3 disagrees"):
        dit_block_indices(28, "dit_first_last", num_blocks=3, keep_blocks=[0, 27])
    with pytest.raises(ValueError, match=r"num_layers.*0"):
        dit_block_indices(0, "dit_every_other")


def test_real_config_sizes():
    pixart = count_parameters(PixArtTransformer2DModel, PIXART_ALPHA_XL_1024_CONFIG) / 1e9
    assert pixart == pytest.approx(0.61, rel=0.02)
    assert count_parameters(PixArtTransformer2DModel, PIXART_SIGMA_XL_1024_CONFIG) / 1e9 == pytest.approx(
        0.61, rel=0.02
    )
    assert count_parameters(SD3Transformer2DModel, SD3_MEDIUM_CONFIG) / 1e9 == pytest.approx(2.03, rel=0.02)
    half = dit_student_config(PIXART_ALPHA_XL_1024_CONFIG, dit_block_indices(28, "dit_every_other"))
    assert half["num_layers"] == 14
    assert count_parameters(PixArtTransformer2DModel, half) / 1e9 == pytest.approx(0.32, abs=0.01)


def test_sd3_student_configs():
    with pytest.raises(ValueError, match=r"keep_blocks=\[0, 1\].*last block 23"):
        dit_student_config(SD3_MEDIUM_CONFIG, [0, 1])
    keep = dit_block_indices(24, "dit_every_other")
    sd35 = dit_student_config(SD35_MEDIUM_CONFIG, keep)
    # teacher dual-attention blocks 0..12 -> kept 1, 3, ..., 11 -> student 0..5
    assert sd35["dual_attention_layers"] == (0, 1, 2, 3, 4, 5)
    assert sd35["qk_norm"] == "rms_norm"
    student = meta_model(SD3Transformer2DModel, sd35)
    assert [b.use_dual_attention for b in student.transformer_blocks] == [True] * 6 + [False] * 6
    assert [b.context_pre_only for b in student.transformer_blocks] == [False] * 11 + [True]
    # PixArt has no context-pre-only block: any subset is valid.
    assert dit_student_config(PIXART_ALPHA_XL_1024_CONFIG, [0, 1])["num_layers"] == 2


@pytest.mark.parametrize("kind", ["pixart", "sd3"])
@pytest.mark.parametrize("architecture", DIT_STUDENT_ARCHITECTURES)
def test_student_copies_kept_blocks(kind, architecture):
    teacher = _tiny(kind)
    student, report = build_dit_student(teacher, architecture)
    keep = dit_block_indices(4, architecture)
    assert student.config.num_layers == len(keep) == 2
    assert report.copied == report.total > 0 and not report.skipped_shape and not report.missing_in_teacher
    for j, i in enumerate(keep):
        t_state = teacher.transformer_blocks[i].state_dict()
        s_state = student.transformer_blocks[j].state_dict()
        assert s_state.keys() == t_state.keys()
        assert all(torch.equal(s_state[k], t_state[k]) for k in s_state), (i, j)
    t_all = teacher.state_dict()
    for key, value in student.state_dict().items():
        if not key.startswith("transformer_blocks."):
            assert torch.equal(value, t_all[key]), key
    if kind == "sd3":
        assert student.transformer_blocks[-1].context_pre_only
    with torch.no_grad():
        out_t = teacher(**_inputs(kind)).sample
        out_s = student(**_inputs(kind)).sample
    assert out_s.shape == out_t.shape and torch.isfinite(out_s).all()
    assert not torch.allclose(out_s, out_t)


@pytest.mark.parametrize("kind", ["pixart", "sd3"])
def test_keeping_all_blocks_reproduces_teacher(kind):
    teacher = _tiny(kind)
    student, _ = build_dit_student(teacher, keep_blocks=[0, 1, 2, 3])
    with torch.no_grad():
        assert torch.equal(student(**_inputs(kind)).sample, teacher(**_inputs(kind)).sample)


def test_sd35_style_student_with_dual_attention_runs(tmp_path):
    teacher = _tiny("sd3", dual_attention_layers=(0, 1), qk_norm="rms_norm")
    student, report = build_dit_student(teacher, keep_blocks=[1, 2, 3])
    assert tuple(student.config.dual_attention_layers) == (0,)
    assert [b.use_dual_attention for b in student.transformer_blocks] == [True, False, False]
    assert not report.skipped_shape and not report.missing_in_teacher
    student.save_pretrained(tmp_path / "student")
    reloaded = SD3Transformer2DModel.from_pretrained(tmp_path / "student").eval()
    with torch.no_grad():
        out = student(**_inputs("sd3")).sample
        assert torch.isfinite(out).all()
        assert torch.equal(reloaded(**_inputs("sd3")).sample, out)


def test_sd3_student_must_keep_last_block():
    with pytest.raises(ValueError, match=r"last block 3"):
        build_dit_student(_tiny("sd3"), keep_blocks=[0, 1, 2])
    with pytest.raises(TypeError, match=r"PixArtTransformer2DModel.*Linear"):
        build_dit_student(torch.nn.Linear(2, 2))


def test_feature_mapping_and_image_stream_taps():
    assert dit_feature_mapping([1, 3]) == {"transformer_blocks.1": "transformer_blocks.0", "transformer_blocks.3": "transformer_blocks.1"}
    with pytest.raises(ValueError, match=r"keep_blocks=\[2, 2\]"):
        dit_feature_mapping([2, 2])
    teacher = _tiny("sd3")
    names = [f"transformer_blocks.{i}" for i in range(4)]
    # reference: the image tokens each block hands on (second element of its output)
    reference = {}
    hooks = [
        teacher.transformer_blocks[i].register_forward_hook(
            lambda _m, _i, out, i=i: reference.__setitem__(f"transformer_blocks.{i}", out[1])
        )
        for i in range(4)
    ]
    with FeatureTaps(teacher, names) as taps, torch.no_grad():
        teacher(**_inputs("sd3"))
        feats = taps.features
    for hook in hooks:
        hook.remove()
    n_image_tokens = (8 // 2) ** 2
    for name in names:
        assert feats[name].shape == (2, n_image_tokens, 16), name
        assert torch.equal(feats[name], reference[name]), name

    text_stream = {"JointTransformerBlock": lambda out: out[0]}
    with FeatureTaps(teacher, ["transformer_blocks.0"], selectors=text_stream) as taps, torch.no_grad():
        teacher(**_inputs("sd3"))
        assert taps.features["transformer_blocks.0"].shape == (2, 5, 16)

    keep = dit_block_indices(4, "dit_first_last")
    student, _ = build_dit_student(teacher, "dit_first_last")
    mapping = dit_feature_mapping(keep)
    with FeatureTaps(teacher, list(mapping)) as t_taps, FeatureTaps(student, list(mapping.values())) as s_taps:
        with torch.no_grad():
            teacher(**_inputs("sd3"))
            student(**_inputs("sd3"))
        # the first kept block sees the same input in both models, so its features agree exactly
        assert torch.equal(t_taps.features["transformer_blocks.0"], s_taps.features["transformer_blocks.0"])
        for t_name, s_name in mapping.items():
            assert t_taps.features[t_name].shape == s_taps.features[s_name].shape


def test_pixart_block_taps_record_tokens():
    teacher = _tiny("pixart")
    with FeatureTaps(teacher, ["transformer_blocks.3"]) as taps, torch.no_grad():
        teacher(**_inputs("pixart"))
        assert taps.features["transformer_blocks.3"].shape == (2, 16, 16)


@pytest.mark.parametrize("kind", ["pixart", "sd3"])
def test_lora_on_dit_students(kind):
    student, _ = build_dit_student(_tiny(kind), "dit_every_other")
    add_lora(student, rank=2, lora_alpha=2, target_modules=LORA_TARGETS)
    trainable = {name: p for name, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in name or ".lora_B." in name for name in trainable)
    attn = "attn1" if kind == "pixart" else "attn"
    assert any(f"transformer_blocks.1.{attn}.to_out.0.lora_B" in name for name in trainable)
    student.train()
    out = student(**_inputs(kind)).sample
    out.square().mean().backward()
    grads = [p.grad for name, p in trainable.items() if ".lora_B." in name]
    assert grads and all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert all(p.grad is None for p in student.parameters() if not p.requires_grad)
