#!/usr/bin/env python
"""Distil a diffusion teacher into a compressed student with Random Conditioning and ARIA allocation.

A diffusers-style training script (see diffusers' examples/text_to_image/train_text_to_image.py). The
teacher's pipeline class picks the family (`diffusers_aria.families`): Stable Diffusion 1.x/2.x and SDXL
teachers get BK-SDM / KOALA UNet students, PixArt and SD3 teachers block-subset transformer students. The
teacher is frozen, only the student (full or LoRA) trains on output + feature KD (+ an optional task
loss on paired samples). With probability p(t) a sample's caption is swapped for a pool prompt chosen by
ARIA: regions of the prompt pool are sampled in proportion to where the student still disagrees with the
teacher. Run it with `accelerate launch` on one or many GPUs and machines.

    accelerate launch train_scripts/train_aria_distill.py \
      --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --student_architecture bk_small \
      --image_free --prompt_pool prompts.txt --num_regions 256 --output_dir bk-small-aria ...

The logic lives in the `diffusers_aria` package; this file parses flags and runs the loop.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch


def _optional_float(value: str) -> float | None:
    """A float, or 'none' for no value (e.g. --aria_max_ratio none)."""
    if value.strip().lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number nor 'none'") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from diffusers_aria.families import ALL_STUDENTS, FEATURE_TAPS  # light: the family table, no diffusers

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
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
                   help="K when the regions are built (default 64); with a prebuilt --regions_dir, checked if given")
    g.add_argument("--embedder", default="sentence-transformers/all-MiniLM-L6-v2")
    g.add_argument("--clustering", default="auto", choices=["auto", "faiss", "sklearn"])

    from diffusers_aria.allocation import POLICIES, SCORES
    from diffusers_aria.settings import AriaSettings  # light: parsing does not load diffusers

    d = AriaSettings()  # the library's defaults, in one place
    g = p.add_argument_group("ARIA allocation and Random Conditioning")
    g.add_argument("--allocation", default=d.allocation, choices=list(POLICIES))
    g.add_argument("--aria_alpha", type=float, default=d.alpha,
                   help="size exponent of the prior (1 = RC, 0 = region-uniform; default %(default)s)")
    g.add_argument("--aria_tau", type=float, default=d.tau,
                   help="temperature: a region credibly tau harder than average gets e times its prior share "
                        "(default %(default)s; in z units with --aria_score zscore)")
    g.add_argument("--aria_score", default=d.score, choices=list(SCORES),
                   help="credible: posterior-mean excess (default); zscore: the earlier standardised score")
    g.add_argument("--aria_threshold", type=float, default=d.threshold,
                   help="heterogeneity threshold, in null standard deviations of Cochran's Q (default %(default)s)")
    g.add_argument("--aria_floor", type=float, default=d.floor)
    g.add_argument("--aria_max_ratio", type=_optional_float, default=d.max_ratio,
                   help="no region gets more than this times its prior share; 'none' removes the bound "
                        "(default %(default)s)")
    g.add_argument("--aria_cap", type=_optional_float, default=d.cap)
    g.add_argument("--aria_damping", type=float, default=d.damping)
    g.add_argument("--aria_warmup_steps", type=int, default=d.warmup_steps)
    g.add_argument("--aria_half_life", type=float, default=d.half_life)
    g.add_argument("--aria_samples_per_half_life", type=_optional_float, default=d.samples_per_half_life,
                   help="lengthen the half-life so that it holds this many samples per region ('none': off; "
                        "default %(default)s)")
    g.add_argument("--aria_num_timestep_bins", type=int, default=d.num_timestep_bins)
    g.add_argument("--aria_no_timestep_norm", action="store_true", help="score raw losses, not per-timestep-normalised")
    g.add_argument("--aria_prior_strength", type=float, default=d.prior_strength)
    g.add_argument("--aria_feed", default=d.feed, choices=["swapped", "all"],
                   help="which samples feed the tracker: all, or only those whose prompt was swapped")
    g.add_argument("--aria_log_every", type=int, default=d.log_every)
    g.add_argument("--doremi_lr", type=float, default=d.doremi_lr)
    g.add_argument("--doremi_smoothing", type=float, default=d.doremi_smoothing)
    g.add_argument("--exp3_gamma", type=float, default=d.exp3_gamma)
    g.add_argument("--rc_schedule", default=d.rc_schedule, choices=["exponential", "sigmoid", "constant"])
    g.add_argument("--rc_lambda", type=float, default=d.rc_lambda)
    g.add_argument("--rc_constant", type=float, default=d.rc_constant, help="p(t) of the constant schedule")
    g.add_argument("--null_prompt_prob", type=float, default=d.null_prompt_prob)

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
    args = p.parse_args(argv)
    if not args.image_free and args.dataset_name is None and args.train_data_dir is None:
        p.error("paired data is needed: pass --dataset_name or --train_data_dir, or --image_free")
    return args


def aria_settings(args):
    from diffusers_aria.training import AriaSettings

    return AriaSettings(
        allocation=args.allocation, alpha=args.aria_alpha, tau=args.aria_tau, score=args.aria_score,
        threshold=args.aria_threshold, floor=args.aria_floor, max_ratio=args.aria_max_ratio, cap=args.aria_cap,
        damping=args.aria_damping, warmup_steps=args.aria_warmup_steps, half_life=args.aria_half_life,
        samples_per_half_life=args.aria_samples_per_half_life, num_timestep_bins=args.aria_num_timestep_bins,
        timestep_norm=not args.aria_no_timestep_norm, prior_strength=args.aria_prior_strength, feed=args.aria_feed,
        doremi_lr=args.doremi_lr, doremi_smoothing=args.doremi_smoothing, exp3_gamma=args.exp3_gamma,
        log_every=args.aria_log_every, rc_schedule=args.rc_schedule, rc_lambda=args.rc_lambda,
        rc_constant=args.rc_constant, null_prompt_prob=args.null_prompt_prob)


def main(args: argparse.Namespace) -> None:
    from diffusers_aria.checkpointing import OutputDirGuard

    with OutputDirGuard(args.output_dir):  # a run that fails before its first checkpoint leaves nothing behind
        _main(args)


def _main(args: argparse.Namespace) -> None:
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from diffusers_aria import checkpointing as ckpt
    from diffusers_aria import run_setup
    from diffusers_aria.data import StepBatchSampler, collate
    from diffusers_aria.distillation import DistillationLoss, add_lora, cast_trainable_to_fp32
    from diffusers_aria.latent_renderer import load_latent_renderer
    from diffusers_aria.reporting import effective_regions
    from diffusers_aria.training import (
        KDStep,
        build_aria,
        sample_step_noise,
        train_length,
        validation_due,
    )
    from diffusers_aria.validation import run_validation

    logger = get_logger("aria", log_level="INFO")
    from diffusers_aria.hub import resolve_license

    args.license = resolve_license(args.pretrained_model_name_or_path, args.license)  # fail now, not after training
    if args.use_8bit_adam:  # missing optional packages fail now, before the models load
        run_setup.require_bitsandbytes()
    if args.enable_xformers_memory_efficient_attention:
        run_setup.require_xformers()
    resume_path = ckpt.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
    run_setup.check_output_dir(args.output_dir, resuming=args.resume_from_checkpoint is not None,
                               overwrite=args.overwrite_output_dir)
    report_to = None if args.report_to == "none" else args.report_to
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps, mixed_precision=args.mixed_precision,
        log_with=report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir,
                                            logging_dir=ckpt.run_logging_dir(args.output_dir, args.logging_dir,
                                                                             resume_path)))
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)
        ckpt.remove_partial_checkpoints(args.output_dir)
    set_seed(args.seed)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)

    # --- teacher (frozen) and student -------------------------------------------------------------------
    teacher_parts = run_setup.load_teacher(args.pretrained_model_name_or_path, revision=args.revision,
                                           variant=args.variant, vae=args.pretrained_vae_model_name_or_path)
    family = teacher_parts.fam  # the teacher's pipeline class picks it: sd, sdxl, pixart or sd3
    if args.resolution is None:
        args.resolution = teacher_parts.native_resolution()
    if args.student_architecture is None:
        args.student_architecture = family.default_student
    family.check_student(args.student_architecture)
    if args.snr_gamma is not None and family.flow_matching:
        raise ValueError(f"--snr_gamma {args.snr_gamma}: Min-SNR weights are for DDPM teachers; a {family.name} "
                         "teacher is trained by rectified flow, so drop --snr_gamma")
    teacher = teacher_parts.unet
    teacher_prediction_type = teacher_parts.scheduler.config.prediction_type
    # the student's parametrisation (--prediction_type); the saved pipeline's scheduler records it
    noise_scheduler = teacher_parts.training_scheduler(args.prediction_type)
    # the student (float32 master weights) is built from the full-precision teacher, then the frozen parts
    # go to the weight dtype together, so that every pipeline made of them has one dtype
    init_unet = run_setup.student_init_unet(teacher_parts, args.non_ema_revision)
    student, init_report = run_setup.make_student(init_unet.to(accelerator.device),
                                                  args.student_architecture, args.student_width_scale,
                                                  args.student_model_name_or_path, family=family,
                                                  num_blocks=args.student_num_blocks,
                                                  keep_blocks=args.student_keep_blocks)
    del init_unet
    student.to(accelerator.device)
    teacher_parts.to_weight_dtype(accelerator.device, weight_dtype)
    logger.info(f"student: {init_report}")
    if args.student_mode == "lora":
        student = add_lora(student, rank=args.rank, lora_alpha=args.lora_alpha,
                           target_modules=args.lora_target_modules)
        if weight_dtype != torch.float32:
            student.to(dtype=weight_dtype)  # frozen base in the weight dtype, adapters kept in fp32
        cast_trainable_to_fp32(student)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    if args.enable_xformers_memory_efficient_attention:
        run_setup.enable_xformers(teacher, student)
    student.train()
    ema = (run_setup.make_ema(student, args.ema_decay, foreach=args.foreach_ema, offload=args.offload_ema)
           if args.use_ema else None)

    # --- prompt pool, regions, ARIA ---------------------------------------------------------------------
    with accelerator.main_process_first():
        pool, groups = run_setup.load_pool(args.prompt_pool, args.prompt_pool_column, args.prompt_pool_split,
                                           args.builtin_pool_size, args.seed)
        # the run's own cache (OUTPUT_DIR/regions) must match every build setting and is rebuilt on
        # --overwrite_output_dir; regions the user names are never rebuilt and only need the same pool (and K,
        # when --num_regions is given)
        own = args.regions_dir is None
        regions = run_setup.load_regions(
            args.regions_dir or os.path.join(args.output_dir, "regions"), pool,
            overwrite=args.overwrite_output_dir and own,
            check=None if own else (("num_regions",) if args.num_regions is not None else ()),
            num_regions=args.num_regions or 64, embedder=args.embedder, seed=args.seed, method=args.clustering,
            progress=accelerator.is_local_main_process)
    run_setup.check_ranks_agree(accelerator, pool, regions, args.seed)
    from diffusers_aria.training import region_names_from_groups

    settings = aria_settings(args)
    aria = build_aria(settings, regions, pool, accelerator, seed=args.seed,
                      num_train_timesteps=noise_scheduler.config.num_train_timesteps,
                      region_names=region_names_from_groups(regions.region_ids, groups))

    # --- paired data ------------------------------------------------------------------------------------
    with accelerator.main_process_first():
        paired = run_setup.paired_dataset(args, pool, regions, teacher_parts, accelerator)

    # --- optimisation -----------------------------------------------------------------------------------
    loss_fn = DistillationLoss(args.lambda_kd_output, args.lambda_kd_feat, args.lambda_sd)
    mapping = (run_setup.feature_mapping(teacher, student, args.student_architecture, family, args.student_keep_blocks,
                                         taps=args.feature_kd_taps) if args.lambda_kd_feat else {})
    with torch.no_grad():  # the widths of the feature pairs, from one forward pass on one prompt's conditioning
        projections = run_setup.feature_projections(teacher, student, mapping, accelerator.device, family=family,
                                                    cond=teacher_parts.encode([""], accelerator.device,
                                                                              args.resolution))
    kd = KDStep(teacher, student, noise_scheduler, loss_fn, feature_mapping=mapping, projections=projections,
                teacher_prediction_type=teacher_prediction_type, snr_gamma=args.snr_gamma, family=family)
    params = [p for p in student.parameters() if p.requires_grad]
    if projections is not None:
        params += list(projections.parameters())
    lr = args.learning_rate * (args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
                               if args.scale_lr else 1)
    optimizer = run_setup.make_optimizer(params, lr, (args.adam_beta1, args.adam_beta2), args.adam_weight_decay,
                                         args.adam_epsilon, use_8bit_adam=args.use_8bit_adam)
    length = train_length(len(paired), args.train_batch_size, accelerator.num_processes,
                          args.gradient_accumulation_steps, args.max_train_steps, args.num_train_epochs)
    # a copy with the resolved length, so that trackers, the card and the loop all see it
    args = argparse.Namespace(**{**vars(args), "max_train_steps": length.max_train_steps})
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=args.max_train_steps * accelerator.num_processes)
    if projections is not None:
        student, projections, optimizer, lr_scheduler = accelerator.prepare(student, projections, optimizer, lr_scheduler)
        kd.projections = projections
    else:
        student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    if ema is not None:
        run_setup.register_ema_hooks(accelerator, ema, foreach=args.foreach_ema)
        if not args.offload_ema:
            ema.to(accelerator.device)

    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=run_setup.loggable_config(args))
    logger.info(f"{args.max_train_steps} optimizer steps, {length.steps_per_epoch} per epoch of {len(paired)} rows "
                f"({length.num_train_epochs} epochs)")

    global_step = 0
    if resume_path is not None:
        accelerator.print(f"resuming from {resume_path}")
        accelerator.load_state(resume_path)
        global_step = ckpt.checkpoint_step(resume_path)
    elif args.resume_from_checkpoint:
        accelerator.print("no checkpoint to resume from: starting a new run")

    rank, world = accelerator.process_index, accelerator.num_processes
    ga = args.gradient_accumulation_steps
    loader = torch.utils.data.DataLoader(
        paired, batch_sampler=StepBatchSampler(len(paired), args.train_batch_size, seed=args.seed, num_replicas=world,
                                               rank=rank, start_step=global_step * ga),
        collate_fn=collate, num_workers=args.dataloader_num_workers)
    batches = iter(loader)
    components = teacher_parts.pipeline_components()
    pipeline_kw = {"family": family, "pipeline_class": teacher_parts.pipeline_class,
                   "student_scheduler": teacher_parts.student_scheduler()}
    renderer = load_latent_renderer(args.pretrained_model_name_or_path)  # the tiny teacher's latents, made legible
    progress = tqdm(range(args.max_train_steps), initial=global_step, desc="distilling",
                    disable=not accelerator.is_local_main_process)
    nonfinite_run = 0
    stream = open(args.write_stream, "a") if args.write_stream and accelerator.is_main_process else None
    vae_scale = teacher_parts.vae.config.scaling_factor
    vae_shift = teacher_parts.vae.config.get("shift_factor") or 0.0  # SD3's VAE: (z - shift) * scale

    while global_step < args.max_train_steps:
        for micro in range(ga):
            draw_step = global_step * ga + micro
            batch = next(batches)
            with accelerator.accumulate(student):
                with torch.no_grad():
                    if "latents" in batch:
                        latents = batch["latents"].to(accelerator.device, dtype=weight_dtype)
                    else:
                        pix = batch["pixel_values"].to(accelerator.device, dtype=weight_dtype)
                        latents = (teacher_parts.vae.encode(pix).latent_dist.sample() - vae_shift) * vae_scale
                    step_noise = sample_step_noise(latents, noise_scheduler.config.num_train_timesteps, args.seed,
                                                   draw_step, rank, noise_offset=args.noise_offset,
                                                   input_perturbation=args.input_perturbation)
                    timesteps = step_noise.timesteps
                    cond = aria.conditioning(draw_step, timesteps.cpu(), batch["caption"],
                                             caption_region_ids=batch["region"], rank=rank, num_replicas=world)
                    hidden = teacher_parts.encode(cond.prompts, accelerator.device, args.resolution,
                                                  time_ids=batch.get("time_ids"))
                terms = kd(student, latents, step_noise.noise, timesteps, hidden,
                           paired_mask=~cond.swapped.to(latents.device), input_noise=step_noise.input_noise)
                loss = terms.total.mean()
                finite = bool(accelerator.gather(torch.isfinite(loss.detach()).float().reshape(1)).min() > 0)
                if finite:
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(params, args.max_grad_norm)
                    optimizer.step()
                    lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            feed_mask = cond.swapped if settings.feed == "swapped" else None
            aria.callback.accumulate(cond.region_ids, terms.total.detach(), timesteps, mask=feed_mask)
            if stream is not None:
                glob = accelerator.gather(cond.pool_indices.to(accelerator.device)).cpu().tolist()
                stream.write(json.dumps({"step": draw_step, "pool_indices": glob}) + "\n")
                stream.flush()
            elif args.write_stream:
                accelerator.gather(cond.pool_indices.to(accelerator.device))
            if not finite:
                nonfinite_run += 1
                logger.warning(f"step {global_step}: non-finite loss, step skipped ({nonfinite_run} in a row)")
                if nonfinite_run >= args.max_nonfinite_steps:
                    raise RuntimeError(
                        f"{nonfinite_run} consecutive steps had a non-finite loss (--max_nonfinite_steps="
                        f"{args.max_nonfinite_steps}); lower --learning_rate, use bf16 instead of fp16, or "
                        "resume from an earlier checkpoint")
            else:
                nonfinite_run = 0
        global_step += 1
        aria.callback.on_step_end(global_step)  # one ARIA update per optimizer step, logged at global_step
        if ema is not None:
            run_setup.ema_step(ema, [p for p in accelerator.unwrap_model(student).parameters() if p.requires_grad],
                               accelerator.device, offload=args.offload_ema)
        progress.update(1)
        logs = {"loss": float(loss.detach()), "loss/output_kd": float(terms.output.detach().mean()),
                "loss/feature_kd": float(terms.feature.detach().mean()), "loss/task": float(terms.task.detach().mean()),
                "lr": lr_scheduler.get_last_lr()[0], "swap_fraction": float(cond.swapped.float().mean())}
        progress.set_postfix(loss=f"{logs['loss']:.4f}", neff=f"{effective_regions(aria.sampler.probabilities):.1f}")
        accelerator.log(logs, step=global_step)
        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0:
            ckpt.save_checkpoint(accelerator, args.output_dir, global_step, args.checkpoints_total_limit)
        if (args.validation_prompts and accelerator.is_main_process  # as diffusers: the other ranks do not wait
                and validation_due(global_step, length.steps_per_epoch, args.validation_steps, args.validation_epochs)):
            run_validation(accelerator, components, teacher, student, args.validation_prompts, args.output_dir,
                           global_step, seed=args.seed, num_inference_steps=args.validation_inference_steps,
                           guidance_scale=args.validation_guidance_scale, resolution=args.resolution,
                           renderer=renderer, **pipeline_kw)
    progress.close()
    if stream is not None:
        stream.close()

    # --- the end: student pipeline, report, validation grid, model card, upload --------------------------
    accelerator.wait_for_everyone()
    final_student = accelerator.unwrap_model(student)
    if ema is not None:
        ema.copy_to([p for p in final_student.parameters() if p.requires_grad])
    grid = None
    if accelerator.is_main_process:
        grid = run_validation(accelerator, components, teacher, final_student, args.validation_prompts or [],
                              args.output_dir, global_step, seed=args.seed,
                              num_inference_steps=args.validation_inference_steps,
                              guidance_scale=args.validation_guidance_scale, resolution=args.resolution,
                              name="validation_final.png", renderer=renderer, **pipeline_kw)
    state_hashes = run_setup.gather_state_hashes(accelerator, aria.callback)
    if accelerator.is_main_process:
        run_setup.save_student_pipeline(args.output_dir, final_student, teacher_parts, lora=args.student_mode == "lora")
        report_paths = aria.callback.write_report(args.output_dir)
        run_setup.write_card(args, report_paths, grid, settings, init_report, device=accelerator.device.type,
                             teacher=teacher_parts)
        run_setup.write_run_info(args.output_dir, num_processes=world, global_step=global_step,
                                 allocation=args.allocation, student_mode=args.student_mode,
                                 nonfinite_samples=aria.tracker.num_nonfinite, aria_state_hashes=state_hashes)
        if args.push_to_hub:
            from diffusers_aria.hub import push_to_hub

            push_to_hub(args.output_dir, args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir)),
                        token=args.hub_token, private=args.hub_private_repo or None)
        accelerator.print(f"done: student pipeline, ARIA report and model card in {args.output_dir}")
    del student, projections, kd  # the prepared (DDP) models, before the process group
    run_setup.end_run(accelerator)


if __name__ == "__main__":
    from diffusers_aria.errors import parse_briefly, run_main, split_debug_flag
    from diffusers_aria.preflight import check_train_args

    # a mistake in the arguments ends in one line and exit code 2 before the models load; --debug: the traceback
    argv, debug = split_debug_flag(sys.argv[1:])
    sys.exit(run_main(lambda a: main(check_train_args(parse_briefly(parse_args, a))), argv, debug=debug))
