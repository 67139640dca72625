"""The training script's command line (`train_scripts/train_aria_distill.py`, `diffusers-aria train`).

Light: parsing loads neither diffusers nor transformers, so that a mistake in the arguments is reported before
the models load. The ARIA and Random Conditioning flags come from `AriaSettings` (their defaults, help and
checks are declared there); `AriaSettings.from_args(args)` turns the parsed flags back into settings.
"""

from __future__ import annotations

import argparse

from ..hierarchy import DEFAULT_BRANCHING
from ..regions import DEFAULT_EMBEDDER
from ..settings import AriaSettings
from ..teachers.families import ALL_STUDENTS, FEATURE_TAPS

DESCRIPTION = "Distil a diffusion teacher into a compressed student with Random Conditioning and ARIA allocation."


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """The training script's parser (`parse_args` also checks that paired data or --image_free was given)."""

    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("teacher and student")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="teacher pipeline (hub id or folder)")
    g.add_argument("--revision", default=None)
    g.add_argument("--variant", default=None, help="weights variant of the teacher, e.g. fp16")
    g.add_argument("--pretrained_vae_model_name_or_path", default=None,
                   help="a VAE (folder or Hub id) to use instead of the teacher's, e.g. an SDXL VAE that stays finite "
                        "in float16; the saved student pipeline holds it")
    g.add_argument("--non_ema_revision", default=None,
                   help="revision of the teacher repository whose UNet the student is built from (e.g. its non-EMA "
                        "weights); the frozen teacher keeps --revision (default: --revision)")
    g.add_argument("--student_architecture", default=None, choices=list(ALL_STUDENTS),
                   help="student preset: bk_* (SD, SDXL), koala_* (SDXL), dit_* (PixArt, SD3); default bk_small "
                        "for UNet teachers, dit_every_other for transformer teachers")
    g.add_argument("--student_num_blocks", type=int, default=None,
                   help="transformer blocks a dit_first_last student keeps (half of them from each end; default: "
                        "half the teacher's)")
    g.add_argument("--student_keep_blocks", type=int, nargs="+", default=None,
                   help="the teacher's transformer blocks a dit_* student keeps, by index (overrides the preset)")
    g.add_argument("--student_width_scale", type=float, default=1.0, help="scale of the student's channel widths")
    g.add_argument("--student_model_name_or_path", default=None, help="start from this student UNet instead of building one")
    g.add_argument("--student_mode", default="full", choices=["full", "lora"])
    g.add_argument("--rank", type=int, default=4, help="LoRA rank (--student_mode lora)")
    g.add_argument("--lora_alpha", type=float, default=None, help="LoRA alpha (default: rank)")
    g.add_argument("--lora_target_modules", nargs="+", default=None, help="LoRA targets (default: to_q to_k to_v to_out.0)")
    g.add_argument("--lambda_kd_output", type=float, default=1.0)
    g.add_argument("--lambda_kd_feat", type=float, default=1.0)
    g.add_argument("--feature_kd_taps", default="auto", choices=list(FEATURE_TAPS),
                   help="UNet students' feature-KD taps: stage outputs (BK-SDM), self-attention outputs (KOALA), "
                        "or all; auto: self_attention for koala_*, stages otherwise. Transformer students tap every "
                        "kept block")
    g.add_argument("--lambda_sd", type=float, default=0.0, help="task (denoising) loss weight on paired samples")
    g.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction", "sample"],
                   help="what the student predicts (default: the teacher's); the teacher's output is converted to it "
                        "for output KD, and the saved pipeline's scheduler records it")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="Min-SNR-gamma weighting of each sample's loss (arXiv 2303.09556; 5.0 is the usual value)")
    g.add_argument("--noise_offset", type=float, default=0.0, help="scale of offset noise (0: off)")
    g.add_argument("--input_perturbation", type=float, default=0.0,
                   help="scale of input perturbation (arXiv 2301.11706; 0.1 is the usual value; 0: off)")
    g.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                   help="xformers attention in teacher and student (needs xformers)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None, help="image/caption dataset (hub name or save_to_disk folder)")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None, help="imagefolder with a metadata.jsonl of captions")
    g.add_argument("--image_column", default="image")
    g.add_argument("--caption_column", default="text")
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--image_free", action="store_true", help="teacher-generated latents for a subset of the pool")
    g.add_argument("--num_teacher_latents", type=int, default=256, help="prompts the teacher generates latents for")
    g.add_argument("--teacher_inference_steps", type=int, default=25)
    g.add_argument("--teacher_guidance_scale", type=float, default=5.0)
    g.add_argument("--resolution", type=int, default=None,
                   help="training and generation size in pixels (default: the teacher's native size, as its pipeline "
                        "generates by default: 512 for SD 1.x, 1024 for SDXL, PixArt-XL and SD3)")
    g.add_argument("--image_interpolation_mode", default="lanczos",
                   choices=["nearest", "bilinear", "bicubic", "box", "hamming", "lanczos"],
                   help="filter for resizing training images")
    g.add_argument("--center_crop", action="store_true")
    g.add_argument("--random_flip", action="store_true")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--cache_dir", default=None)

    g = p.add_argument_group("prompt pool and regions")
    g.add_argument("--prompt_pool", default="builtin",
                   help="'builtin', a file (.txt/.csv/.tsv/.jsonl/.parquet), a save_to_disk folder, or a dataset name")
    g.add_argument("--prompt_pool_column", default=None)
    g.add_argument("--prompt_pool_split", default="train")
    g.add_argument("--builtin_pool_size", type=int, default=4000)
    g.add_argument("--regions_dir", default=None, help="regions folder (built when missing; default OUTPUT_DIR/regions)")
    g.add_argument("--num_regions", type=int, default=None,
                   help="K when the regions are built (default: about 4 prompts a region, a power of 2, at most "
                        "4096); with a prebuilt --regions_dir, checked if given")
    g.add_argument("--region_branching", type=int, default=DEFAULT_BRANCHING,
                   help="the region tree above the regions shrinks by this factor per level (0: no tree)")
    g.add_argument("--embedder", default=DEFAULT_EMBEDDER)
    g.add_argument("--clustering", default="auto", choices=["auto", "faiss", "sklearn"])

    g = p.add_argument_group("ARIA allocation and Random Conditioning")
    AriaSettings.add_arguments(g)  # one flag per setting, declared with its default and help in settings.py

    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=8, help="per device")
    g.add_argument("--num_train_epochs", type=int, default=100,
                   help="epochs over the paired data (teacher latents with --image_free); --max_train_steps overrides")
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps; overrides --num_train_epochs")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true")
    g.add_argument("--learning_rate", type=float, default=5e-5)
    g.add_argument("--scale_lr", action="store_true")
    g.add_argument("--lr_scheduler", default="constant")
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' 8-bit AdamW (needs bitsandbytes)")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--allow_tf32", action="store_true")
    g.add_argument("--use_ema", action="store_true")
    g.add_argument("--ema_decay", type=float, default=0.9999)
    g.add_argument("--offload_ema", action="store_true", help="keep the EMA weights on the CPU between updates")
    g.add_argument("--foreach_ema", action="store_true", help="the EMA's faster foreach update")
    g.add_argument("--max_nonfinite_steps", type=int, default=10,
                   help="a step with a non-finite loss is skipped; stop after this many in a row")
    g.add_argument("--seed", type=int, default=0)

    g = p.add_argument_group("checkpoints, logging, validation, output")
    g.add_argument("--output_dir", default="aria-student")
    g.add_argument("--overwrite_output_dir", action="store_true", help="allow a non-empty output folder")
    g.add_argument("--logging_dir", default="logs")
    g.add_argument("--report_to", default="tensorboard", help="tensorboard, wandb, all, or none")
    g.add_argument("--tracker_project_name", default="aria-distill")
    g.add_argument("--checkpointing_steps", type=int, default=500)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None, help="'latest' or a checkpoint-N folder")
    g.add_argument("--validation_prompts", nargs="*", default=None)
    g.add_argument("--validation_steps", type=int, default=0, help="validate every N steps (0: off)")
    g.add_argument("--validation_epochs", type=int, default=5,
                   help="validate at the end of every N-th epoch, as diffusers does (0: off); the final validation "
                        "always runs")
    g.add_argument("--validation_inference_steps", type=int, default=25)
    g.add_argument("--validation_guidance_scale", type=float, default=5.0)
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None, help="prefer `huggingface-cli login`; never written to disk")
    g.add_argument("--hub_private_repo", action="store_true")
    g.add_argument("--license", default=None,
                   help="the model card's license (default: the teacher's card's; e.g. creativeml-openrail-m for "
                        "Stable Diffusion v1 teachers)")
    g.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    g.add_argument("--write_stream", default=None, help="append every step's drawn pool indices to this JSONL (debug)")
    return p


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The training script's arguments (`argv`; default: `sys.argv[1:]`)."""
    p = build_parser(prog)
    args = p.parse_args(argv)
    if not args.image_free and args.dataset_name is None and args.train_data_dir is None:
        p.error("paired data is needed: pass --dataset_name or --train_data_dir, or --image_free")
    return args


__all__ = ["DESCRIPTION", "build_parser", "parse_args"]
