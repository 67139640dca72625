"""The same training script on SDXL, PixArt and SD3 teachers: SD3's first full run in two processes through a real
`accelerate launch`, the others in this process (`run_training`).

Per family: a full student trains 2 steps with feature KD and a validation grid, resumes to step 3 from its
latest checkpoint in one process, and its saved pipeline (the teacher's class) reloads and generates; a LoRA
student trains 2 steps in bf16 and its adapter loads into the saved pipeline the way the model card says. SD3's
first full run uses two processes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from launching import launch_training, run_training, write_imagefolder

from diffusers_aria.embedded.tiny_families import make_tiny_family_teacher

pytestmark = pytest.mark.slow

# family -> (pipeline class, full-student flags, LoRA-student flags, processes of the full run); the LoRA runs
# of SDXL (random crops and flips: per-image time ids) and SD3 (its VAE's shift) train on paired images
CASES = {
    "sdxl": ("StableDiffusionXLPipeline", ["--student_architecture", "koala_700m"], ["--feature_kd_taps", "all"], 1),
    "pixart": ("PixArtAlphaPipeline", ["--student_architecture", "dit_first_last", "--student_num_blocks", "2",
                                       "--use_ema"], [], 1),
    "sd3": ("StableDiffusion3Pipeline", ["--gradient_checkpointing"], ["--student_keep_blocks", "0", "3"], 2),
}


@pytest.fixture(scope="module")
def teachers(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("family-teachers")
    return {f: make_tiny_family_teacher(str(root / f), f) for f in CASES}


def run_args(teacher: str, out, regions: str, steps: int, extra: list[str], data: list[str] | None = None) -> list[str]:
    # no --resolution: the teacher's native size (the tiny teachers' 16x16 latents of a 2x VAE: 32 px)
    return ["--pretrained_model_name_or_path", teacher, "--output_dir", str(out), "--regions_dir", regions,
            *(data or ["--image_free"]), "--num_teacher_latents", "8", "--teacher_inference_steps", "2",
            "--builtin_pool_size", "200", "--num_regions", "6", "--train_batch_size", "2",
            "--max_train_steps", str(steps), "--aria_warmup_steps", "1", "--aria_log_every", "1",
            "--aria_feed", "congruent",  # needs each family's noise schedule (flow matching's too)
            "--report_to", "none", "--learning_rate", "1e-3"] + extra


def generate(pipe, family: str) -> np.ndarray:
    kw = {"clean_caption": False, "use_resolution_binning": False} if family == "pixart" else {}
    out = pipe("a red cube", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0), **kw)
    return out.images[0]


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", list(CASES))
def test_full_student_trains_resumes_saves_and_generates(family, teachers, shared_regions, tmp_path):
    from diffusers import DiffusionPipeline

    pipeline_class, flags, _, procs = CASES[family]
    out = tmp_path / "full"
    train = launch_training if procs > 1 else (lambda args, num_processes: run_training(args))
    train(run_args(teachers[family], out, shared_regions, 2,
                   flags + ["--checkpointing_steps", "1", "--validation_prompts", "a red cube",
                            "--validation_inference_steps", "2"]), num_processes=procs)
    assert (out / "checkpoint-2").is_dir() and (out / "validation_final.png").is_file()
    if "--use_ema" in flags:  # the EMA of a transformer student, in diffusers' EMA folder layout
        ema = json.load(open(out / "checkpoint-2" / "unet_ema" / "config.json"))
        assert ema["_class_name"] == "PixArtTransformer2DModel" and ema["num_layers"] == 2
    info = json.load(open(out / "run_info.json"))
    assert info["global_step"] == 2 and info["num_processes"] == procs
    assert len(set(info["aria_state_hashes"])) == 1  # the same ARIA state on every rank
    # resumed in this process (SD3's two-process checkpoint in one process: ARIA's state is global)
    run_training(run_args(teachers[family], out, shared_regions, 3,
                          flags + ["--checkpointing_steps", "1", "--resume_from_checkpoint", "latest"]))
    info = json.load(open(out / "run_info.json"))
    assert info["global_step"] == 3 and info["num_processes"] == 1
    index = json.load(open(out / "model_index.json"))
    assert index["_class_name"] == pipeline_class
    card = (out / "README.md").read_text()
    assert f"from diffusers import {pipeline_class}" in card
    assert "| `resolution` | 32 |" in card  # the teacher's native size

    pipe = DiffusionPipeline.from_pretrained(str(out))
    teacher = DiffusionPipeline.from_pretrained(teachers[family])
    assert type(pipe).__name__ == pipeline_class
    denoiser = pipe.unet if family == "sdxl" else pipe.transformer
    teacher_denoiser = teacher.unet if family == "sdxl" else teacher.transformer
    assert n_params(denoiser) < n_params(teacher_denoiser)  # compressed
    if family != "sdxl":
        assert denoiser.config.num_layers == 2 < teacher_denoiser.config.num_layers
    image = generate(pipe, family)
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


@pytest.mark.parametrize("family", list(CASES))
def test_lora_student_saves_an_adapter_that_loads_as_the_card_says(family, teachers, shared_regions, tmp_path):
    from diffusers import DiffusionPipeline

    pipeline_class, _, flags, _ = CASES[family]
    out = tmp_path / "lora"
    data = None if family == "pixart" else ["--train_data_dir", write_imagefolder(tmp_path / "images"),
                                            "--random_flip"]
    vae_flags = []
    if family == "sdxl":  # a VAE of its own (diffusers' flag, e.g. for an fp16-safe SDXL VAE)
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(teachers[family], subfolder="vae")
        vae.register_to_config(scaling_factor=0.5)
        vae.save_pretrained(tmp_path / "own-vae")
        vae_flags = ["--pretrained_vae_model_name_or_path", str(tmp_path / "own-vae")]
    run_training(run_args(teachers[family], out, shared_regions, 2,
                          flags + vae_flags + ["--student_mode", "lora", "--rank", "2", "--checkpointing_steps", "100",
                                               "--mixed_precision", "bf16"], data=data))
    assert (out / "teacher_latents").exists() == (data is None)
    card = (out / "README.md").read_text()
    if flags:  # the flag reached the run's recorded settings
        value = flags[1] if len(flags) == 2 else "[" + ", ".join(flags[1:]) + "]"
        assert f"| `{flags[0][2:]}` | {value} |" in card
    pipe = DiffusionPipeline.from_pretrained(str(out))
    assert type(pipe).__name__ == pipeline_class
    # trained in bf16, saved in one dtype throughout (float32)
    assert {m.dtype for m in pipe.components.values() if isinstance(m, torch.nn.Module)} == {torch.float32}
    if family == "sdxl":  # the run's VAE is the saved pipeline's
        assert pipe.vae.config.scaling_factor == 0.5
    if family == "sd3":  # --student_keep_blocks 0 3
        assert pipe.transformer.config.num_layers == 2
    base = generate(pipe, family)
    if family == "pixart":  # PixArt has no diffusers LoRA loader: the card loads it with peft
        from peft import PeftModel

        assert "PeftModel.from_pretrained(pipe.transformer" in card
        pipe.transformer = PeftModel.from_pretrained(pipe.transformer, str(out)).merge_and_unload()
    else:
        assert "pipe.load_lora_weights(" in card
        pipe.load_lora_weights(str(out))
        assert pipe.get_list_adapters()
    adapted = generate(pipe, family)
    assert np.isfinite(adapted).all() and not np.array_equal(adapted, base)  # the trained adapter acts
