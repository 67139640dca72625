"""The tiny random-weight SDXL, PixArt-alpha and SD3 teachers: complete pipeline folders that load and run offline."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from diffusers_aria.cli import main
from diffusers_aria.embedded.tiny_families import CLIP_TOKEN_LENGTH, FAMILIES, make_tiny_family_teacher

PIPELINES = {"sdxl": "StableDiffusionXLPipeline", "pixart": "PixArtAlphaPipeline", "sd3": "StableDiffusion3Pipeline"}
# PixArt bins sizes into its aspect-ratio tables only for sample_size 32/64/128; its caption cleaning needs bs4/ftfy.
CALL_KWARGS = {"pixart": {"clean_caption": False, "use_resolution_binning": False}}
OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_families")
    return {family: make_tiny_family_teacher(root / family, family) for family in FAMILIES}


@pytest.fixture(scope="module")
def pipes(teachers):
    from diffusers import DiffusionPipeline

    return {family: DiffusionPipeline.from_pretrained(path) for family, path in teachers.items()}


def _encode(pipe, family: str, prompts: list[str]):
    """(prompt_embeds, pooled or attention mask) for `prompts`, without classifier-free guidance."""
    if family == "sdxl":
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
        return embeds, pooled
    if family == "sd3":
        embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device="cpu", do_classifier_free_guidance=False)
        return embeds, pooled
    embeds, mask, _, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False, clean_caption=False)
    return embeds, mask


@pytest.mark.parametrize("family", FAMILIES)
def test_folder_loads_as_the_family_pipeline_with_a_card(teachers, pipes, family):
    folder = teachers[family]
    assert type(pipes[family]).__name__ == PIPELINES[family]
    card = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    assert "license: apache-2.0" in card and "Random-weight test teacher" in card
    report = json.load(open(os.path.join(folder, "aria_teacher_report.json")))
    assert report["family"] == family and report["random_weights"] is True
    assert not [n for n in os.listdir(os.path.dirname(folder)) if n.startswith(".")]  # no temporary folders left


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_prompt_depends_on_the_prompt(pipes, family):
    pipe = pipes[family]
    with torch.no_grad():
        embeds, second = _encode(pipe, family, ["a red cube", "a blue sphere on a table"])
        again, _ = _encode(pipe, family, ["a red cube", "a red cube"])
    assert embeds.shape[0] == 2 and torch.isfinite(embeds).all()
    assert not torch.allclose(embeds[0], embeds[1]) and torch.allclose(again[0], embeds[0], atol=1e-6)
    if family == "pixart":
        assert embeds.shape == (2, 120, pipe.text_encoder.config.d_model) and second.shape == (2, 120)
        return
    # Pooled CLIP projections: SDXL's text_encoder_2, SD3's two CLIPs concatenated.
    proj = pipe.text_encoder_2.config.projection_dim + (pipe.text_encoder.config.projection_dim if family == "sd3" else 0)
    assert second.shape == (2, proj) and not torch.allclose(second[0], second[1])
    if family == "sdxl":  # both encoders' penultimate states, side by side
        width = pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        assert embeds.shape == (2, CLIP_TOKEN_LENGTH, width) == (2, pipe.tokenizer.model_max_length, width)
        assert width == pipe.unet.config.cross_attention_dim
    else:  # CLIP tokens, then T5's 256
        assert embeds.shape == (2, CLIP_TOKEN_LENGTH + 256, pipe.transformer.config.joint_attention_dim)


def test_clip_pools_at_the_bert_sep_token(pipes):
    pipe = pipes["sdxl"]
    tok = pipe.tokenizer_2(["a red cube", "a much longer prompt about a blue sphere"], padding="max_length",
                           max_length=pipe.tokenizer_2.model_max_length, truncation=True, return_tensors="pt")
    assert pipe.text_encoder_2.config.max_position_embeddings == pipe.tokenizer_2.model_max_length
    with torch.no_grad():
        out = pipe.text_encoder_2(tok.input_ids)
        sep = (tok.input_ids == pipe.tokenizer_2.sep_token_id).int().argmax(-1)
        expected = pipe.text_encoder_2.text_projection(out.last_hidden_state[torch.arange(2), sep])
    assert sep.tolist()[0] < sep.tolist()[1]
    assert torch.allclose(out.text_embeds, expected, atol=1e-6)


@pytest.mark.parametrize("family", FAMILIES)
def test_pipeline_makes_a_finite_32px_image(pipes, family):
    out = pipes[family](["a red cube"], num_inference_steps=2, height=32, width=32, output_type="np",
                        generator=torch.Generator().manual_seed(0), **CALL_KWARGS.get(family, {}))
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


def test_same_seed_same_weights_and_cache(tmp_path, teachers):
    from safetensors.torch import load_file

    first = load_file(os.path.join(teachers["pixart"], "transformer", "diffusion_pytorch_model.safetensors"))
    path = make_tiny_family_teacher(tmp_path / "p", "pixart")
    again = load_file(os.path.join(path, "transformer", "diffusion_pytorch_model.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    mtime = os.path.getmtime(os.path.join(path, "model_index.json"))
    assert make_tiny_family_teacher(path, "pixart") == path  # cached: nothing rewritten
    assert os.path.getmtime(os.path.join(path, "model_index.json")) == mtime
    make_tiny_family_teacher(path, "pixart", seed=1)  # other settings: rebuilt in place
    assert json.load(open(os.path.join(path, "aria_teacher_report.json")))["settings"]["seed"] == 1


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="family must be one of"):
        make_tiny_family_teacher(tmp_path / "x", "sd")
    with pytest.raises(ValueError, match="resolution"):
        make_tiny_family_teacher(tmp_path / "x", "sd3", resolution=36)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError):
        make_tiny_family_teacher(tmp_path / "mine", "sdxl")
    assert os.listdir(tmp_path / "mine") == ["notes.txt"] and not (tmp_path / "x").exists()


def test_cli_family_flag_mistakes(tmp_path, capsys):
    assert main(["make-tiny-teacher", str(tmp_path / "t"), "--family", "sdxl", "--train_steps", "5"]) == 2
    assert "--train_steps applies only to --family sd" in capsys.readouterr().err
    assert main(["make-tiny-teacher", str(tmp_path / "t"), "--family", "flux"]) == 2
    assert "invalid choice" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_cli_makes_an_sd3_teacher(tmp_path):
    out = tmp_path / "sd3"
    cmd = [sys.executable, "-m", "diffusers_aria.cli", "make-tiny-teacher", str(out), "--family", "sd3"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, **OFFLINE_ENV), timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"tiny sd3 teacher (random weights) at {out}" in res.stdout
    index = json.load(open(out / "model_index.json"))
    assert index["_class_name"] == "StableDiffusion3Pipeline" and index["text_encoder_3"][1] == "T5EncoderModel"
    assert json.load(open(out / "aria_teacher_report.json"))["family"] == "sd3"
