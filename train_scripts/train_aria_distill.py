#!/usr/bin/env python
"""Distil a diffusion teacher into a compressed student with Random Conditioning and ARIA allocation.

A diffusers-style training script (see diffusers' examples/text_to_image/train_text_to_image.py). The
teacher's pipeline class picks the family (`diffusers_aria.teachers.families`): Stable Diffusion 1.x/2.x and SDXL
teachers get BK-SDM / KOALA UNet students, PixArt and SD3 teachers block-subset transformer students. The
teacher is frozen, only the student (full or LoRA) trains on output + feature KD (+ an optional task
loss on paired samples). With probability p(t) a sample's caption is swapped for a pool prompt chosen by
ARIA: regions of the prompt pool are sampled in proportion to where the student still disagrees with the
teacher. Run it with `accelerate launch` on one or many GPUs and machines.

    accelerate launch train_scripts/train_aria_distill.py \
      --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 --student_architecture bk_small \
      --image_free --prompt_pool prompts.txt --num_regions 256 --output_dir bk-small-aria ...

The logic lives in the `diffusers_aria` package (the flags in `diffusers_aria.training.args`, the ARIA and
Random Conditioning settings in `diffusers_aria.settings`); this file runs the loop. Installed from a wheel, the
same script runs as `diffusers-aria train ...`.
"""

from __future__ import annotations

import os

# Before torch loads (OpenMP reads it once, then): OpenMP threads that spin while they wait make 2 torch threads
# ~7x slower than 1 on a busy CPU. PASSIVE makes them sleep; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import torch  # noqa: E402

from diffusers_aria.training.args import parse_args  # noqa: E402 - light: the flags, their defaults and help


def main(args: argparse.Namespace) -> None:
    from diffusers_aria.training.checkpointing import OutputDirGuard
    from diffusers_aria.training.outputs import prepare_output_dir

    # never into, inside or above the teacher, VAE or named regions; an earlier run is resumed, refused, or
    # (--overwrite_output_dir) moved aside, never mixed with this one; "no checkpoint yet" is said at once
    prepare_output_dir(args)
    with OutputDirGuard(args.output_dir):  # a run that fails before its first checkpoint leaves nothing behind
        _main(args)


def _main(args: argparse.Namespace) -> None:
    from accelerate import Accelerator
    from accelerate.logging import get_logger
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from tqdm.auto import tqdm

    from diffusers_aria.distillation import DistillationLoss, add_lora, cast_trainable_to_fp32
    from diffusers_aria.embedded.latent_renderer import load_latent_renderer
    from diffusers_aria.regions import BUILD_SETTINGS, load_or_build_regions
    from diffusers_aria.reporting import effective_regions
    from diffusers_aria.settings import AriaSettings
    from diffusers_aria.teachers.parts import load_teacher
    from diffusers_aria.training import checkpointing as ckpt
    from diffusers_aria.training.aria import build_aria
    from diffusers_aria.training.data import StepBatchSampler, collate
    from diffusers_aria.training.ema import ema_step, make_ema, register_ema_hooks
    from diffusers_aria.training.inputs import check_ranks_agree, load_pool, paired_dataset, regions_advice
    from diffusers_aria.training.outputs import (
        end_run,
        gather_state_hashes,
        loggable_config,
        save_student_pipeline,
        write_card,
        write_run_info,
    )
    from diffusers_aria.training.step import KDStep, sample_step_noise, train_length, validation_due
    from diffusers_aria.training.student import (
        enable_xformers,
        feature_mapping,
        feature_projections,
        make_optimizer,
        make_student,
        require_bitsandbytes,
        require_xformers,
        student_init_unet,
    )
    from diffusers_aria.training.validation import run_validation

    logger = get_logger("aria", log_level="INFO")
    from diffusers_aria.publish.model_card import resolve_license

    args.license = resolve_license(args.pretrained_model_name_or_path, args.license)  # fail now, not after training
    if args.use_8bit_adam:  # missing optional packages fail now, before the models load
        require_bitsandbytes()
    if args.enable_xformers_memory_efficient_attention:
        require_xformers()
    resume_path = ckpt.resolve_resume_checkpoint(args.output_dir, args.resume_from_checkpoint)
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
    teacher_parts = load_teacher(args.pretrained_model_name_or_path, revision=args.revision,
                                           variant=args.variant, vae=args.pretrained_vae_model_name_or_path)
    family = teacher_parts.family  # the teacher's pipeline class picks it: sd, sdxl, pixart or sd3
    if args.resolution is None:
        args.resolution = teacher_parts.native_resolution()
    if args.student_architecture is None:
        args.student_architecture = family.default_student
    family.check_student(args.student_architecture)
    if args.snr_gamma is not None and family.flow_matching:
        raise ValueError(f"--snr_gamma {args.snr_gamma}: Min-SNR weights are for DDPM teachers; a {family.name} "
                         "teacher is trained by rectified flow, so drop --snr_gamma")
    teacher = teacher_parts.denoiser
    teacher_prediction_type = teacher_parts.scheduler.config.prediction_type
    # the student's parametrisation (--prediction_type); the saved pipeline's scheduler records it
    noise_scheduler = teacher_parts.training_scheduler(args.prediction_type)
    # the student (float32 master weights) is built from the full-precision teacher, then the frozen parts
    # go to the weight dtype together, so that every pipeline made of them has one dtype
    init_unet = student_init_unet(teacher_parts, args.non_ema_revision)
    student, init_report = make_student(init_unet.to(accelerator.device),
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
        enable_xformers(teacher, student)
    student.train()
    ema = (make_ema(student, args.ema_decay, foreach=args.foreach_ema, offload=args.offload_ema)
           if args.use_ema else None)

    # --- prompt pool, regions, ARIA ---------------------------------------------------------------------
    with accelerator.main_process_first():
        pool, groups = load_pool(args.prompt_pool, args.prompt_pool_column, args.prompt_pool_split,
                                           args.builtin_pool_size, args.seed)
        # the run's own cache (OUTPUT_DIR/regions) must match every build setting and is rebuilt on
        # --overwrite_output_dir; regions the user names are never rebuilt and only need the same pool (and K,
        # when --num_regions is given)
        own = args.regions_dir is None
        regions = load_or_build_regions(
            args.regions_dir or os.path.join(args.output_dir, "regions"), pool,
            overwrite=args.overwrite_output_dir and own,
            check=BUILD_SETTINGS if own else (("num_regions",) if args.num_regions is not None else ()),
            num_regions=args.num_regions, embedder=args.embedder, seed=args.seed, method=args.clustering,
            branching=args.region_branching, progress=accelerator.is_local_main_process,
            on_mismatch=regions_advice(args))  # the error names the folder and what to pass
    check_ranks_agree(accelerator, pool, regions, args.seed)
    from diffusers_aria.training.aria import region_names_from_groups

    settings = AriaSettings.from_args(args)
    aria = build_aria(settings, regions, pool, accelerator, seed=args.seed,
                      num_train_timesteps=noise_scheduler.config.num_train_timesteps,
                      region_names=region_names_from_groups(regions.region_ids, groups),
                      alphas_cumprod=getattr(noise_scheduler, "alphas_cumprod", None))

    # --- paired data ------------------------------------------------------------------------------------
    with accelerator.main_process_first():
        paired = paired_dataset(args, pool, regions, teacher_parts, accelerator)

    # --- optimisation -----------------------------------------------------------------------------------
    loss_fn = DistillationLoss(args.lambda_kd_output, args.lambda_kd_feat, args.lambda_sd)
    mapping = (feature_mapping(teacher, student, args.student_architecture, family, args.student_keep_blocks,
                                         taps=args.feature_kd_taps) if args.lambda_kd_feat else {})
    with torch.no_grad():  # the widths of the feature pairs, from one forward pass on one prompt's conditioning
        projections = feature_projections(teacher, student, mapping, accelerator.device, family=family,
                                                    cond=teacher_parts.encode([""], accelerator.device,
                                                                              args.resolution))
    kd = KDStep(teacher, student, noise_scheduler, loss_fn, feature_mapping=mapping, projections=projections,
                teacher_prediction_type=teacher_prediction_type, snr_gamma=args.snr_gamma, family=family)
    params = [p for p in student.parameters() if p.requires_grad]
    if projections is not None:
        params += list(projections.parameters())
    lr = args.learning_rate * (args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
                               if args.scale_lr else 1)
    optimizer = make_optimizer(params, lr, (args.adam_beta1, args.adam_beta2), args.adam_weight_decay,
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
        register_ema_hooks(accelerator, ema, foreach=args.foreach_ema)
        if not args.offload_ema:
            ema.to(accelerator.device)

    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_project_name, config=loggable_config(args))
    logger.info(f"{args.max_train_steps} optimizer steps, {length.steps_per_epoch} per epoch of {len(paired)} rows "
                f"({length.num_train_epochs} epochs)")

    global_step = 0
    if resume_path is not None:
        accelerator.print(f"resuming from {resume_path}")
        accelerator.load_state(resume_path)
        global_step = ckpt.checkpoint_step(resume_path)

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
            aria.accumulate(cond, terms.total.detach(), timesteps)  # --aria_feed picks the samples
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
            ema_step(ema, [p for p in accelerator.unwrap_model(student).parameters() if p.requires_grad],
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
    state_hashes = gather_state_hashes(accelerator, aria.callback)
    if accelerator.is_main_process:
        save_student_pipeline(args.output_dir, final_student, teacher_parts, lora=args.student_mode == "lora")
        report_paths = aria.callback.write_report(args.output_dir)
        write_card(args, report_paths, grid, settings, init_report, device=accelerator.device.type,
                             teacher=teacher_parts)
        write_run_info(args.output_dir, num_processes=world, global_step=global_step,
                                 allocation=args.allocation, student_mode=args.student_mode,
                                 nonfinite_samples=aria.tracker.num_nonfinite, aria_state_hashes=state_hashes)
        if args.push_to_hub:
            from diffusers_aria.publish.hub import push_to_hub

            push_to_hub(args.output_dir, args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir)),
                        token=args.hub_token, private=args.hub_private_repo or None)
        accelerator.print(f"done: student pipeline, ARIA report and model card in {args.output_dir}")
    del student, projections, kd  # the prepared (DDP) models, before the process group
    end_run(accelerator)


if __name__ == "__main__":
    from diffusers_aria.training.preflight import check_train_args
    from diffusers_aria.utils.errors import parse_briefly, run_main, split_debug_flag

    # a mistake in the arguments ends in one line and exit code 2 before the models load; --debug: the traceback
    argv, debug = split_debug_flag(sys.argv[1:])
    sys.exit(run_main(lambda a: main(check_train_args(parse_briefly(parse_args, a))), argv, debug=debug))
