"""End-to-end runs of train_scripts/train_aria_distill.py: two processes through a real `accelerate launch`, one
process in this one (`run_training`: the script's main() from a clean accelerate state).

A tiny teacher pipeline is built once per session; every run trains 2-6 steps. Between them the runs cover
the full and LoRA students, image-free and imagefolder data, one and two processes, every --allocation
choice, exact resume, and the outputs (pipeline, LoRA weights, report, model card).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from launching import launch_training as launch
from launching import run_training, training_script, write_imagefolder

pytestmark = pytest.mark.slow


def base_args(teacher: str, out: str, regions: str, steps: int = 2, extra: list[str] | None = None) -> list[str]:
    return ["--pretrained_model_name_or_path", teacher, "--output_dir", out, "--regions_dir", regions,
            "--image_free", "--num_teacher_latents", "8", "--teacher_inference_steps", "2",
            "--builtin_pool_size", "200", "--num_regions", "6", "--resolution", "32", "--train_batch_size", "4",
            "--max_train_steps", str(steps), "--checkpointing_steps", "100", "--aria_warmup_steps", "1",
            "--aria_log_every", "1", "--report_to", "none", "--learning_rate", "1e-3"] + (extra or [])


def read_stream(path: str) -> list[list[int]]:
    with open(path) as fh:
        return [json.loads(line)["pool_indices"] for line in fh]


def test_two_process_full_student_aria(tiny_teacher, shared_regions, tmp_path):
    out = tmp_path / "run"
    launch(base_args(tiny_teacher, str(out), shared_regions, steps=3,
                     extra=["--allocation", "aria", "--checkpointing_steps", "2", "--write_stream",
                            str(tmp_path / "stream.jsonl"), "--validation_prompts", "a red fox",
                            "--validation_inference_steps", "2"]), num_processes=2)
    info = json.load(open(out / "run_info.json"))
    assert info["num_processes"] == 2 and info["global_step"] == 3
    assert len(info["aria_state_hashes"]) == 2 and len(set(info["aria_state_hashes"])) == 1  # same state on both ranks
    # both ranks drew disjoint halves of one global draw each step
    stream = read_stream(str(tmp_path / "stream.jsonl"))
    assert len(stream) == 3 and all(len(s) == 8 for s in stream)
    for name in ("model_index.json", "unet/config.json", "aria_report.json", "aria_report.md", "aria_allocation.png",
                 "README.md", "validation_final.png", "checkpoint-2/aria_state.safetensors"):
        assert (out / name).exists(), name
    report = json.load(open(out / "aria_report.json"))
    assert report["policy"] == "aria" and len(report["regions"]) == 6
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    image = pipe("a red fox", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()
    assert pipe.unet.config.mid_block_type is None  # bk_small has no mid block


def test_lora_student_exp3(tiny_teacher, shared_regions, tmp_path):
    out = tmp_path / "lora"
    run_training(base_args(tiny_teacher, str(out), shared_regions,
                           extra=["--student_mode", "lora", "--student_architecture", "bk_tiny", "--rank", "2", "--lora_alpha", "4", "--lora_target_modules",
                            "to_q", "to_v", "--allocation", "exp3", "--exp3_gamma", "0.2"]))
    assert (out / "pytorch_lora_weights.safetensors").exists()
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    gen = torch.Generator().manual_seed(0)
    before = pipe("a blue car", num_inference_steps=2, output_type="np", generator=gen).images[0]
    pipe.load_lora_weights(str(out))
    gen = torch.Generator().manual_seed(0)
    after = pipe("a blue car", num_inference_steps=2, output_type="np", generator=gen).images[0]
    assert not np.allclose(before, after)
    assert json.load(open(out / "aria_report.json"))["policy"] == "exp3"


def test_imagefolder_region_uniform_ema_task_loss(tiny_teacher, shared_regions, tmp_path):
    out = tmp_path / "paired"
    args = base_args(tiny_teacher, str(out), shared_regions)
    args.remove("--image_free")
    run_training(args + ["--train_data_dir", write_imagefolder(tmp_path / "images"), "--random_flip", "--center_crop",
                   "--allocation", "region_uniform", "--use_ema", "--ema_decay", "0.9", "--lambda_sd", "0.5",
                   "--rc_schedule", "sigmoid", "--rc_lambda", "8", "--null_prompt_prob", "0.1",
                   "--dataloader_num_workers", "1", "--checkpointing_steps", "1", "--checkpoints_total_limit", "1"])
    ckpts = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-2"]  # rotation kept only the newest
    assert (out / "checkpoint-2" / "unet_ema" / "diffusion_pytorch_model.safetensors").exists()  # diffusers' layout
    report = json.load(open(out / "aria_report.json"))
    probs = [r["probability"] for r in report["regions"]]
    assert np.allclose(probs, 1 / 6)


def _single_dtype(folder) -> set:
    from safetensors.torch import load_file

    dtypes = set()
    for sub in ("unet", "vae", "text_encoder"):
        for f in (folder / sub).glob("*.safetensors"):
            dtypes |= {t.dtype for t in load_file(f).values()}
    return dtypes


def test_bf16_full_student_paired_with_validation(tiny_teacher, shared_regions, tmp_path):
    """bf16 end to end: frozen parts in bf16, the float32 student under autocast, validation, the save."""
    out = tmp_path / "bf16"
    args = base_args(tiny_teacher, str(out), shared_regions)
    args.remove("--image_free")
    run_training(args + ["--train_data_dir", write_imagefolder(tmp_path / "images"), "--mixed_precision", "bf16",
                         "--validation_prompts", "a red fox", "--validation_steps", "1",
                         "--validation_inference_steps", "2", "--use_ema"])
    assert (out / "validation" / "step-1.png").exists() and (out / "validation_final.png").exists()
    assert _single_dtype(out) == {torch.float32}  # one dtype throughout, whatever the training precision
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    image = pipe("a red fox", num_inference_steps=2, output_type="np").images[0]
    assert np.isfinite(image).all()
    assert "torch.bfloat16" in (out / "README.md").read_text()  # the usage snippet follows the run's precision


def test_bf16_lora_student_image_free_with_feature_kd(tiny_teacher, shared_regions, tmp_path):
    out = tmp_path / "bf16-lora"
    run_training(base_args(tiny_teacher, str(out), shared_regions,
                           extra=["--student_mode", "lora", "--rank", "2", "--lora_alpha", "4", "--mixed_precision",
                                  "bf16", "--lambda_kd_feat", "1.0", "--validation_prompts", "a blue car",
                                  "--validation_inference_steps", "2"]))
    assert (out / "validation_final.png").exists() and (out / "pytorch_lora_weights.safetensors").exists()
    assert _single_dtype(out) == {torch.float32}
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(out))
    pipe.load_lora_weights(str(out))
    image = pipe("a blue car", num_inference_steps=2, output_type="np").images[0]
    assert np.isfinite(image).all()


def test_resume_continues_the_exact_prompt_stream(tiny_teacher, shared_regions, tmp_path):
    common = ["--allocation", "static", "--checkpointing_steps", "3", "--rc_schedule", "constant", "--rc_constant",
              "0.7", "--aria_warmup_steps", "2"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    run_training(base_args(tiny_teacher, str(straight), shared_regions, steps=6,
                           extra=common + ["--write_stream", str(tmp_path / "a.jsonl")]))
    run_training(base_args(tiny_teacher, str(split), shared_regions, steps=3,
                           extra=common + ["--write_stream", str(tmp_path / "b.jsonl")]))
    run_training(base_args(tiny_teacher, str(split), shared_regions, steps=6,
                           extra=common + ["--write_stream", str(tmp_path / "b.jsonl"),
                                           "--resume_from_checkpoint", "latest"]))
    assert read_stream(str(tmp_path / "a.jsonl")) == read_stream(str(tmp_path / "b.jsonl"))
    from safetensors.torch import load_file

    a = load_file(straight / "checkpoint-6" / "aria_state.safetensors")
    b = load_file(split / "checkpoint-6" / "aria_state.safetensors")
    assert a.keys() == b.keys()
    for k in a:  # exact; NaN marks a region the reducibility test has not measured yet
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, equal_nan=True, msg=k)
    wa = load_file(straight / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(split / "unet" / "diffusion_pytorch_model.safetensors")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_push_to_hub_and_doremi_in_process(tiny_teacher, shared_regions, tmp_path, monkeypatch):
    """The script's main() with the Hub calls replaced: everything up to the network call is real."""
    train_aria_distill = training_script()

    import diffusers_aria.publish.hub as hub

    calls = {}
    monkeypatch.setattr(hub, "create_repo", lambda repo_id, **kw: calls.setdefault("create", (repo_id, kw)))
    monkeypatch.setattr(hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw) and "https://hub/commit/1")
    token = "hf_" + "abcdefghijklmnopqrstuvwxyzABCD"
    out = tmp_path / "pushed"
    args = train_aria_distill.parse_args(base_args(tiny_teacher, str(out), shared_regions, extra=[
        "--allocation", "doremi", "--doremi_lr", "1.0", "--doremi_smoothing", "0.1", "--push_to_hub",
        "--hub_model_id", "me/aria-student", "--hub_token", token, "--hub_private_repo", "--report_to", "tensorboard",
        "--checkpointing_steps", "1"]))
    train_aria_distill.main(args)
    repo_id, kw = calls["create"]
    assert repo_id == "me/aria-student" and kw["token"] == token and kw["private"] is True
    up = calls["upload"]
    assert up["folder_path"] == str(out) and up["repo_id"] == "me/aria-student" and up["token"] == token
    assert "checkpoint-*" in up["ignore_patterns"]
    files = hub.files_to_upload(str(out))
    assert (out / "checkpoint-1").is_dir() and os.listdir(out / "checkpoint-1")  # there was something to leave out
    assert not [f for f in files if f.startswith(("checkpoint-", "logs/"))] and "README.md" in files
    assert "unet/diffusion_pytorch_model.safetensors" in files
    # the token is in no file the run wrote
    for root, _, files in os.walk(out):
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                assert token.encode() not in fh.read(), os.path.join(root, f)
    card = open(out / "README.md").read()
    assert "doremi" in card and "aria_allocation.png" in card
    assert "license: apache-2.0" in card  # the tiny teacher's card's license
    assert "/pytest-" not in card and "base_model:" not in card  # a local teacher: no path is published
