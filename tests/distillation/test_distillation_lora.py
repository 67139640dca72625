"""Tests for LoRA students: adapter placement, fp32 casting and diffusers-format save/load."""

from __future__ import annotations

import copy
import json
import os

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from diffusers_aria.distillation import add_lora, cast_trainable_to_fp32, save_lora_weights


def _byte_level_chars() -> list[str]:
    """The 256 printable stand-ins used by byte-level BPE vocabularies."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _write_tokenizer(directory) -> CLIPTokenizer:
    chars = _byte_level_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f)
    with open(os.path.join(directory, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(directory, model_max_length=16)


def _tiny_pipeline(unet: UNet2DConditionModel, tmp_path) -> StableDiffusionPipeline:
    tokenizer = _write_tokenizer(tmp_path / "tokenizer")
    torch.manual_seed(0)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=16,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=(8,),
        norm_num_groups=8,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        sample_size=16,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _lora_params(unet: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in unet.named_parameters() if "lora_" in n}


def test_add_lora_freezes_base_and_targets_attention(tiny_teacher):
    unet = add_lora(tiny_teacher, rank=2)
    lora = _lora_params(unet)
    assert lora, "no LoRA parameters were added"
    trainable = {n for n, p in unet.named_parameters() if p.requires_grad}
    assert trainable == set(lora)
    assert all(any(t in n for t in ("to_q", "to_k", "to_v", "to_out.0")) for n in lora)
    assert {p.shape[0] for n, p in lora.items() if "lora_A" in n} == {2}


def test_bad_target_module_raises_with_available_names(tiny_teacher):
    with pytest.raises(ValueError, match=r"to_qq.*available.*to_q"):
        add_lora(tiny_teacher, target_modules=["to_q", "to_qq"])
    assert not _lora_params(tiny_teacher)
    with pytest.raises(ValueError, match="rank"):
        add_lora(tiny_teacher, rank=0)


def test_cast_trainable_to_fp32_only_touches_adapters(tiny_teacher):
    unet = add_lora(tiny_teacher.to(torch.float16), rank=2)
    cast_trainable_to_fp32(unet)
    for name, param in unet.named_parameters():
        assert param.dtype == (torch.float32 if param.requires_grad else torch.float16), name


def test_saved_lora_loads_into_pipeline_and_changes_unet(tiny_teacher, unet_inputs, tmp_path):
    pipe = _tiny_pipeline(copy.deepcopy(tiny_teacher), tmp_path)
    student = add_lora(tiny_teacher, rank=2, lora_alpha=4)  # scale 2: loads back right only with its metadata
    torch.manual_seed(3)
    with torch.no_grad():
        for name, param in _lora_params(student).items():
            if "lora_B" in name:
                param.normal_(std=0.5)
    path = save_lora_weights(student, tmp_path / "lora")
    assert os.path.basename(path) == "pytorch_lora_weights.safetensors" and os.path.isfile(path)

    sample, timesteps, context = unet_inputs
    with torch.no_grad():
        before = pipe.unet(sample, timesteps, context).sample
        image_before = pipe(
            "a cat",
            num_inference_steps=2,
            height=16,
            width=16,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
        pipe.load_lora_weights(tmp_path / "lora")
        after = pipe.unet(sample, timesteps, context).sample
        expected = student(sample, timesteps, context).sample
        image_after = pipe(
            "a cat",
            num_inference_steps=2,
            height=16,
            width=16,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
        ).images
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, rtol=1e-4, atol=1e-4)
    assert image_before.shape == image_after.shape == (1, 16, 16, 3)
    assert not (image_before == image_after).all()


def test_save_without_adapter_raises(tiny_teacher, tmp_path):
    with pytest.raises(ValueError, match="add_lora"):
        save_lora_weights(tiny_teacher, tmp_path)
