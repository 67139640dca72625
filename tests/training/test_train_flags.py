"""Every flag of train_aria_distill.py is exercised: one in-process run with most of them, and a coverage check."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import pytest
from launching import training_script

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paired_disk_dataset(tmp_path_factory):
    """An image/caption dataset saved with save_to_disk, with non-default column names."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (36, 36, 3), dtype=np.uint8)) for _ in range(6)]
    caps = ["a red bicycle", "a bowl of soup", "a lighthouse at dusk", "a violin on a chair", "a koala", "a comet"]
    path = tmp_path_factory.mktemp("disk") / "ds"
    datasets.Dataset.from_dict({"img": images, "caption": caps}).save_to_disk(str(path))
    return str(path)


def _spy_on_the_loop(monkeypatch) -> dict:
    """Record what the script hands to the noise sampler, the KD step, the image dataset and the student
    builder, so that a flag the script ignored fails the test."""
    import diffusers_aria.training.data as data
    import diffusers_aria.training.step as training
    import diffusers_aria.training.student as student_setup

    seen: dict = {}
    real_noise, real_kd = training.sample_step_noise, training.KDStep.__init__
    real_ds, real_init = data.ImageCaptionDataset.__init__, student_setup.student_init_unet

    def noise(*a, **kw):
        seen["noise"] = kw
        return real_noise(*a, **kw)

    def kd(self, *a, **kw):
        seen["kd"] = kw
        real_kd(self, *a, **kw)

    def ds(self, *a, **kw):
        seen["interpolation"] = kw.get("interpolation")
        real_ds(self, *a, **kw)

    def init(parts, revision=None):
        seen["non_ema_revision"] = revision
        return real_init(parts, revision)

    monkeypatch.setattr(training, "sample_step_noise", noise)
    monkeypatch.setattr(training.KDStep, "__init__", kd)
    monkeypatch.setattr(data.ImageCaptionDataset, "__init__", ds)
    monkeypatch.setattr(student_setup, "student_init_unet", init)
    return seen


def test_many_flags_in_one_run(tiny_teacher, paired_disk_dataset, tmp_path, monkeypatch):
    from diffusers_aria.regions import ConditionRegions, resolve_embedder_path

    seen = _spy_on_the_loop(monkeypatch)

    pool_csv = tmp_path / "pool.csv"
    with open(pool_csv, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["id", "my_prompt"])
        for i, topic in enumerate(["cat", "dog", "car", "boat", "pizza", "cake", "tree", "river"] * 4):
            w.writerow([i, f"a photo of a {topic} number {i}"])
    out = tmp_path / "out"
    args = training_script().parse_args([
        "--pretrained_model_name_or_path", tiny_teacher, "--revision", "main", "--output_dir", str(out),
        "--student_architecture", "bk_small", "--student_width_scale", "0.5",
        "--lambda_kd_output", "1.0", "--lambda_kd_feat", "0.5", "--lambda_sd", "0.1",
        "--dataset_name", paired_disk_dataset, "--dataset_config_name", "default", "--image_column", "img",
        "--caption_column", "caption", "--max_train_samples", "4", "--cache_dir", str(tmp_path / "cache"),
        "--resolution", "32",
        "--prompt_pool", str(pool_csv), "--prompt_pool_column", "my_prompt", "--prompt_pool_split", "train",
        "--num_regions", "4", "--embedder", resolve_embedder_path("all-MiniLM-L6-v2"), "--clustering", "sklearn",
        "--allocation", "aria", "--aria_alpha", "0.8", "--aria_tau", "0.7", "--aria_score", "credible",
        "--aria_threshold", "0.5", "--aria_max_ratio", "3", "--aria_samples_per_half_life", "none",
        "--aria_floor", "0.2", "--aria_cap", "0.6", "--aria_damping", "0.5", "--aria_warmup_steps", "1",
        "--aria_half_life", "10", "--aria_num_timestep_bins", "4", "--aria_no_timestep_norm",
        "--aria_prior_strength", "2", "--aria_feed", "swapped", "--aria_log_every", "1",
        "--aria_fwer", "0.1", "--aria_max_shift", "0.4", "--aria_trial_ratio", "3", "--aria_stall_draws", "150",
        "--aria_stall_decline", "0.3", "--aria_baseline_samples", "40", "--region_branching", "2",
        "--aria_variance", "pooled", "--aria_refresh_every", "2", "--aria_null", "empirical",
        "--rc_schedule", "constant", "--rc_constant", "0.9", "--rc_lambda", "3",
        "--train_batch_size", "2", "--max_train_steps", "2", "--gradient_accumulation_steps", "2",
        "--gradient_checkpointing", "--learning_rate", "1e-4", "--scale_lr", "--lr_scheduler", "cosine",
        "--lr_warmup_steps", "1", "--adam_beta1", "0.8", "--adam_beta2", "0.99", "--adam_weight_decay", "0.0",
        "--adam_epsilon", "1e-7", "--max_grad_norm", "0.5", "--mixed_precision", "no", "--allow_tf32",
        "--seed", "3", "--logging_dir", "tb", "--report_to", "tensorboard", "--tracker_project_name", "flags",
        "--checkpointing_steps", "1", "--checkpoints_total_limit", "2", "--validation_prompts", "a koala",
        "--validation_steps", "1", "--validation_inference_steps", "2", "--validation_guidance_scale", "3.0",
        "--teacher_guidance_scale", "3.0", "--teacher_inference_steps", "2", "--num_teacher_latents", "4",
        "--dataloader_num_workers", "0", "--write_stream", str(tmp_path / "stream.jsonl"),
        "--license", "creativeml-openrail-m",
        "--snr_gamma", "5", "--noise_offset", "0.05", "--input_perturbation", "0.1", "--prediction_type", "v_prediction",
        "--image_interpolation_mode", "bilinear", "--non_ema_revision", "main",
    ])
    training_script().main(args)
    report = json.load(open(out / "aria_report.json"))
    cfg = report["policy_config"]
    assert (cfg["alpha"], cfg["tau"], cfg["score"], cfg["threshold"], cfg["max_ratio"], cfg["floor"], cfg["cap"],
            cfg["damping"]) == (0.8, 0.7, "credible", 0.5, 3.0, 0.2, 0.6, 0.5)
    assert (cfg["fwer"], cfg["max_shift"], cfg["trial_ratio"], cfg["stall_draws"], cfg["stall_decline"]) == (
        0.1, 0.4, 3.0, 150, 0.3)
    assert (cfg["variance"], cfg["refresh_every"], cfg["null"]) == ("pooled", 2, "empirical")
    assert "| `baseline_samples` | 40 |" in (out / "README.md").read_text()
    assert "| `samples_per_half_life` | — |" in (out / "README.md").read_text()  # None, as the card shows it
    assert max(r["probability"] for r in report["regions"]) <= 0.6 + 1e-12
    regions = ConditionRegions.load(str(out / "regions"))
    assert regions.metadata["method"] == "sklearn" and regions.num_regions <= 4
    assert regions.metadata["branching"] == 2 and regions.tree is not None  # 4 leaves, branching 2: one level of 2
    assert (out / "validation" / "step-1.png").exists() and (out / "validation" / "step-2.png").exists()
    assert any((out / "tb").rglob("events.out.tfevents*"))
    assert json.load(open(out / "run_info.json"))["global_step"] == 2
    # diffusers' flags reach the loop
    assert seen["noise"] == {"noise_offset": 0.05, "input_perturbation": 0.1}
    assert seen["kd"]["snr_gamma"] == 5.0 and seen["kd"]["teacher_prediction_type"] == "epsilon"
    assert seen["interpolation"] == "bilinear" and seen["non_ema_revision"] == "main"
    assert json.load(open(out / "scheduler" / "scheduler_config.json"))["prediction_type"] == "v_prediction"
    # one ARIA update per optimizer step (2), not per micro-batch (4), logged at the 1-based global step
    assert report["metrics"]["aria/tracker_updates"] == 2 and report["step"] == 2
    # gradient accumulation: two draw steps per optimizer step, each of batch 2
    lines = (tmp_path / "stream.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2, 3]
    from diffusers import UNet2DConditionModel

    student = UNet2DConditionModel.from_pretrained(str(out / "unet"))
    teacher = UNet2DConditionModel.from_pretrained(tiny_teacher, subfolder="unet")
    assert student.config.mid_block_type is None  # bk_small
    assert sum(student.config.block_out_channels) < sum(teacher.config.block_out_channels)  # width 0.5
    card = (out / "README.md").read_text()
    assert "bk_small" in card
    assert "license: creativeml-openrail-m" in card  # --license wins over the teacher's card


def _image_free(teacher, regions, out, *extra):
    return training_script().parse_args(["--pretrained_model_name_or_path", teacher, "--output_dir", str(out),
                                 "--regions_dir", regions, "--image_free", "--num_teacher_latents", "4",
                                 "--teacher_inference_steps", "2", "--builtin_pool_size", "200", "--num_regions", "6",
                                 "--resolution", "32", "--train_batch_size", "2", "--report_to", "none", *extra])


def test_epochs_validation_epochs_and_ema_in_unet_ema(tiny_teacher, shared_regions, tmp_path):
    """No --max_train_steps: 2 epochs of 4 latents at batch 2 are 4 steps; validation after epochs 0 and 1;
    the EMA (offloaded, foreach) is checkpointed as diffusers' unet_ema/ folder."""
    from diffusers import UNet2DConditionModel

    out = tmp_path / "epochs"
    training_script().main(_image_free(tiny_teacher, shared_regions, out, "--num_train_epochs", "2", "--validation_epochs", "1",
                               "--validation_prompts", "a koala", "--validation_inference_steps", "2",
                               "--use_ema", "--offload_ema", "--foreach_ema", "--checkpointing_steps", "4"))
    assert json.load(open(out / "run_info.json"))["global_step"] == 4
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-2.png", "step-4.png"]
    ema = UNet2DConditionModel.from_pretrained(str(out / "checkpoint-4" / "unet_ema"))
    assert ema.config["optimization_step"] == 4
    assert not (out / "checkpoint-4" / "ema.safetensors").exists()


def test_missing_optional_packages_fail_before_loading(tiny_teacher, shared_regions, tmp_path, monkeypatch):
    import diffusers.utils

    import diffusers_aria.teachers.parts as parts

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    monkeypatch.setattr(diffusers.utils, "is_xformers_available", lambda: False)
    monkeypatch.setattr(parts, "load_teacher", lambda *a, **k: pytest.fail("the teacher was loaded"))
    with pytest.raises(ImportError, match="--use_8bit_adam needs bitsandbytes"):
        training_script().main(_image_free(tiny_teacher, shared_regions, tmp_path / "a", "--use_8bit_adam"))
    with pytest.raises(ValueError, match="xformers is not installed"):
        training_script().main(_image_free(tiny_teacher, shared_regions, tmp_path / "b",
                                   "--enable_xformers_memory_efficient_attention"))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_bad_flag_values_give_clear_errors():
    s = training_script()
    with pytest.raises(SystemExit):
        s.parse_args(["--pretrained_model_name_or_path", "x", "--image_free", "--allocation", "nope"])
    with pytest.raises(SystemExit):  # no paired data source
        s.parse_args(["--pretrained_model_name_or_path", "x"])
    with pytest.raises(ValueError, match="--aria_feed 'x' is not valid"):
        from diffusers_aria.settings import AriaSettings

        AriaSettings(feed="x")
    with pytest.raises(SystemExit):  # neither a number nor 'none'
        s.parse_args(["--pretrained_model_name_or_path", "x", "--image_free", "--aria_max_ratio", "lots"])
    parsed = s.parse_args(["--pretrained_model_name_or_path", "x", "--image_free", "--aria_max_ratio", "None",
                           "--aria_score", "zscore"])
    assert parsed.aria_max_ratio is None and AriaSettings.from_args(parsed).score == "zscore"


def test_variant_weights_are_loaded(tiny_teacher, tmp_path):
    """--variant picks the variant files of the teacher (as diffusers' from_pretrained does)."""
    import shutil

    from diffusers_aria.teachers.parts import load_teacher

    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_teacher, teacher)
    parts = load_teacher(str(teacher))
    for p in parts.denoiser.parameters():
        p.data.fill_(0.125)
    for name, part in (("unet", parts.denoiser), ("vae", parts.vae), ("text_encoder", parts.text_encoder)):
        part.save_pretrained(teacher / name, variant="ema")
    parts = load_teacher(str(teacher), variant="ema")
    assert float(next(parts.denoiser.parameters()).flatten()[0]) == 0.125
    assert training_script().parse_args(["--pretrained_model_name_or_path", "x", "--image_free", "--variant", "ema"]).variant == "ema"


def test_every_flag_is_exercised_by_a_test():
    from diffusers_aria.training.args import build_parser

    flags = sorted({o for a in build_parser()._actions for o in a.option_strings if o.startswith("--")} - {"--help"})
    assert "--aria_alpha" in flags and "--pretrained_model_name_or_path" in flags
    tests_src = "".join(p.read_text() for p in TESTS.rglob("test_*.py") if p.name != Path(__file__).name)
    tests_src += Path(__file__).read_text().split("def test_every_flag_is_exercised_by_a_test")[0]
    missing = [f for f in flags if f'"{f}"' not in tests_src]
    assert not missing, f"flags no test passes: {missing}"
