"""A small training script shaped like diffusers' examples/text_to_image/train_text_to_image_sdxl.py, without ARIA.

What it keeps of that script's shape around the places ARIA goes: `main(args)` with two tokenizers and two
text encoders, the UNet saved and loaded by a `save_model_hook` / `load_model_hook` pair registered before the
data, the dataset as `dataset["train"]` until `train_dataset = dataset["train"].with_transform(preprocess_train)`
(random or center crop with the original size and crop corner of every image), then the prompt embeddings of
both encoders (`encode_prompt`: penultimate hidden states concatenated, the second encoder's pooled output)
and the VAE latents (`compute_vae_encodings`) precomputed once with `train_dataset.map(...)` under
`accelerator.main_process_first()`, joined by `concatenate_datasets(..., axis=1)` into `precomputed_dataset`,
the text encoders and the VAE deleted, a `collate_fn` returning a dict literal of `model_input`,
`prompt_embeds`, `pooled_prompt_embeds`, `original_sizes` and `crop_top_lefts`, the DataLoader over
`precomputed_dataset` with `shuffle=True` and `num_workers`, the scheduler arithmetic, the step (time ids from
`compute_time_ids`, `added_cond_kwargs`, the targets of every `--prediction_type`, the `snr_gamma` branch,
`train_loss += ...`, clipping inside `if accelerator.sync_gradients:`), `global_step`, checkpoints saved under
the DeepSpeed-or-main-process condition, and `--resume_from_checkpoint`. Everything else is shortened (no
EMA, timestep bias, validation, hub or pipeline saving; the tiny SDXL teacher's tokenizers are BERT's). It is
written for the tests; it is not a copy of the diffusers file.

The tests paste the blocks of docs/add-to-your-script.md into it, each right after the stock line the page
names (tests/add_to_your_script/). Lines marked `# test only` are not part of the stock shape
(tests/assets/aria_test_hooks.py): they name `aria` and `regions`, which the pasted blocks define.
"""

import argparse
import functools
import gc
import math
import os
import random

import accelerate
import aria_test_hooks  # test only
import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from datasets import concatenate_datasets, load_dataset
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import compute_snr
from packaging import version
from tqdm.auto import tqdm
from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection


def parse_args(input_args=None):
    parser = argparse.ArgumentParser(description="SDXL text-to-image fine-tuning (test asset)")
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True)
    parser.add_argument("--train_data_dir", type=str, required=True)
    parser.add_argument("--image_column", type=str, default="image")
    parser.add_argument("--caption_column", type=str, default="text")
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--proportion_empty_prompts", type=float, default=0)
    parser.add_argument("--output_dir", type=str, default="sdxl-model-finetuned")
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--report_to", type=str, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--center_crop", action="store_true")
    parser.add_argument("--random_flip", action="store_true")
    parser.add_argument("--train_batch_size", type=int, default=2)
    parser.add_argument("--num_train_epochs", type=int, default=100)
    parser.add_argument("--max_train_steps", type=int, default=None)
    parser.add_argument("--gradient_accumulation_steps", type=int, default=1)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--lr_scheduler", type=str, default="constant")
    parser.add_argument("--lr_warmup_steps", type=int, default=0)
    parser.add_argument("--snr_gamma", type=float, default=None)
    parser.add_argument("--prediction_type", type=str, default=None)
    parser.add_argument("--dataloader_num_workers", type=int, default=0)
    parser.add_argument("--max_grad_norm", type=float, default=1.0)
    parser.add_argument("--checkpointing_steps", type=int, default=500)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None)
    aria_test_hooks.add_arguments(parser)  # test only
    args = parser.parse_args(input_args)
    if args.proportion_empty_prompts < 0 or args.proportion_empty_prompts > 1:
        raise ValueError("`--proportion_empty_prompts` must be in the range [0, 1].")
    return args


def encode_prompt(batch, text_encoders, tokenizers, proportion_empty_prompts, caption_column, is_train=True):
    """Both encoders' penultimate hidden states, concatenated, and the second encoder's pooled output."""
    captions = []
    for caption in batch[caption_column]:
        if random.random() < proportion_empty_prompts:
            captions.append("")
        elif isinstance(caption, str):
            captions.append(caption)
        else:
            captions.append(random.choice(caption) if is_train else caption[0])

    prompt_embeds_list = []
    with torch.no_grad():
        for tokenizer, text_encoder in zip(tokenizers, text_encoders):
            text_input_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                                       truncation=True, return_tensors="pt").input_ids
            prompt_embeds = text_encoder(text_input_ids.to(text_encoder.device), output_hidden_states=True,
                                         return_dict=False)
            pooled_prompt_embeds = prompt_embeds[0]  # the last encoder's counts
            prompt_embeds = prompt_embeds[-1][-2]
            bs_embed, seq_len, _ = prompt_embeds.shape
            prompt_embeds_list.append(prompt_embeds.view(bs_embed, seq_len, -1))
    prompt_embeds = torch.concat(prompt_embeds_list, dim=-1)
    pooled_prompt_embeds = pooled_prompt_embeds.view(bs_embed, -1)
    return {"prompt_embeds": prompt_embeds.cpu(), "pooled_prompt_embeds": pooled_prompt_embeds.cpu()}


def compute_vae_encodings(batch, vae):
    images = batch.pop("pixel_values")
    pixel_values = torch.stack(list(images)).to(memory_format=torch.contiguous_format).float()
    pixel_values = pixel_values.to(vae.device, dtype=vae.dtype)
    with torch.no_grad():
        model_input = vae.encode(pixel_values).latent_dist.sample()
    model_input = model_input * vae.config.scaling_factor
    return {"model_input": model_input.cpu()}


def main(args):
    logging_dir = os.path.join(args.output_dir, args.logging_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=args.report_to,
        project_config=ProjectConfiguration(project_dir=args.output_dir, logging_dir=logging_dir),
    )
    if args.seed is not None:
        set_seed(args.seed)
    if accelerator.is_main_process:
        os.makedirs(args.output_dir, exist_ok=True)

    tokenizer_one = AutoTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer")
    tokenizer_two = AutoTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer_2")
    noise_scheduler = DDPMScheduler.from_pretrained(args.pretrained_model_name_or_path, subfolder="scheduler")
    text_encoder_one = CLIPTextModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder")
    text_encoder_two = CLIPTextModelWithProjection.from_pretrained(args.pretrained_model_name_or_path,
                                                                   subfolder="text_encoder_2")
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet")
    vae.requires_grad_(False)
    text_encoder_one.requires_grad_(False)
    text_encoder_two.requires_grad_(False)
    unet.train()

    weight_dtype = torch.float32
    vae.to(accelerator.device, dtype=torch.float32)
    text_encoder_one.to(accelerator.device, dtype=weight_dtype)
    text_encoder_two.to(accelerator.device, dtype=weight_dtype)

    if version.parse(accelerate.__version__) >= version.parse("0.16.0"):

        def save_model_hook(models, weights, output_dir):
            if accelerator.is_main_process:
                for model in models:
                    model.save_pretrained(os.path.join(output_dir, "unet"))
                    if weights:
                        weights.pop()  # saved above: accelerate must not save it again

        def load_model_hook(models, input_dir):
            for _ in range(len(models)):
                model = models.pop()
                load_model = UNet2DConditionModel.from_pretrained(input_dir, subfolder="unet")
                model.register_to_config(**load_model.config)
                model.load_state_dict(load_model.state_dict())
                del load_model

        accelerator.register_save_state_pre_hook(save_model_hook)
        accelerator.register_load_state_pre_hook(load_model_hook)

    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.learning_rate)

    dataset = load_dataset("imagefolder", data_files={"train": os.path.join(args.train_data_dir, "**")})
    column_names = dataset["train"].column_names
    image_column, caption_column = args.image_column, args.caption_column
    if caption_column not in column_names:
        raise ValueError(f"--caption_column {caption_column!r} is not one of {column_names}")

    def preprocess_train(examples):
        original_sizes, all_images, crop_top_lefts = [], [], []
        for image in (image.convert("RGB") for image in examples[image_column]):
            original_sizes.append((image.height, image.width))
            scale = args.resolution / min(image.size)
            image = image.resize((max(args.resolution, round(image.width * scale)),
                                  max(args.resolution, round(image.height * scale))))
            if args.random_flip and random.random() < 0.5:
                image = image.transpose(0)  # FLIP_LEFT_RIGHT
            if args.center_crop:
                y1 = max(0, int(round((image.height - args.resolution) / 2.0)))
                x1 = max(0, int(round((image.width - args.resolution) / 2.0)))
            else:
                y1 = random.randint(0, image.height - args.resolution)
                x1 = random.randint(0, image.width - args.resolution)
            image = image.crop((x1, y1, x1 + args.resolution, y1 + args.resolution))
            crop_top_lefts.append((y1, x1))
            pixels = torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)
            all_images.append(pixels / 127.5 - 1.0)
        examples["original_sizes"] = original_sizes
        examples["crop_top_lefts"] = crop_top_lefts
        examples["pixel_values"] = all_images
        return examples

    with accelerator.main_process_first():
        if args.max_train_samples is not None:
            dataset["train"] = dataset["train"].shuffle(seed=args.seed).select(range(args.max_train_samples))
        train_dataset = dataset["train"].with_transform(preprocess_train)

    # the prompt embeddings and the VAE latents, computed once, so that the text encoders and the VAE can go
    text_encoders = [text_encoder_one, text_encoder_two]
    tokenizers = [tokenizer_one, tokenizer_two]
    compute_embeddings_fn = functools.partial(
        encode_prompt,
        text_encoders=text_encoders,
        tokenizers=tokenizers,
        proportion_empty_prompts=args.proportion_empty_prompts,
        caption_column=args.caption_column,
    )
    compute_vae_encodings_fn = functools.partial(compute_vae_encodings, vae=vae)
    with accelerator.main_process_first():
        from datasets.fingerprint import Hasher

        new_fingerprint = Hasher.hash(args)  # the other processes load the main process's cached result
        new_fingerprint_for_vae = Hasher.hash((args.pretrained_model_name_or_path, args))
        train_dataset_with_embeddings = train_dataset.map(
            compute_embeddings_fn, batched=True, new_fingerprint=new_fingerprint
        )
        train_dataset_with_vae = train_dataset.map(
            compute_vae_encodings_fn,
            batched=True,
            batch_size=args.train_batch_size,
            new_fingerprint=new_fingerprint_for_vae,
        )
        precomputed_dataset = concatenate_datasets(
            [train_dataset_with_embeddings, train_dataset_with_vae.remove_columns(["image", "text"])], axis=1
        )
        precomputed_dataset = precomputed_dataset.with_transform(preprocess_train)

    del compute_vae_encodings_fn, compute_embeddings_fn, text_encoder_one, text_encoder_two
    del text_encoders, tokenizers, vae
    gc.collect()

    def collate_fn(examples):
        model_input = torch.stack([torch.tensor(example["model_input"]) for example in examples])
        original_sizes = [example["original_sizes"] for example in examples]
        crop_top_lefts = [example["crop_top_lefts"] for example in examples]
        prompt_embeds = torch.stack([torch.tensor(example["prompt_embeds"]) for example in examples])
        pooled_prompt_embeds = torch.stack([torch.tensor(example["pooled_prompt_embeds"]) for example in examples])
        return {
            "model_input": model_input,
            "prompt_embeds": prompt_embeds,
            "pooled_prompt_embeds": pooled_prompt_embeds,
            "original_sizes": original_sizes,
            "crop_top_lefts": crop_top_lefts,
        }

    train_dataloader = torch.utils.data.DataLoader(
        precomputed_dataset,
        shuffle=True,
        collate_fn=collate_fn,
        batch_size=args.train_batch_size,
        num_workers=args.dataloader_num_workers,
    )
    aria_test_hooks.after_block_1(args, aria, regions)  # test only  # noqa: F821

    overrode_max_train_steps = False
    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
        overrode_max_train_steps = True

    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=args.lr_warmup_steps * args.gradient_accumulation_steps,
        num_training_steps=args.max_train_steps * args.gradient_accumulation_steps,
    )

    unet, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        unet, optimizer, train_dataloader, lr_scheduler
    )

    num_update_steps_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    if overrode_max_train_steps:
        args.max_train_steps = args.num_train_epochs * num_update_steps_per_epoch
    args.num_train_epochs = math.ceil(args.max_train_steps / num_update_steps_per_epoch)

    if accelerator.is_main_process:
        accelerator.init_trackers("text2image-fine-tune-sdxl", config={"seed": args.seed})

    global_step = 0
    first_epoch = 0
    if args.resume_from_checkpoint:
        if args.resume_from_checkpoint != "latest":
            path = os.path.basename(args.resume_from_checkpoint)
        else:
            dirs = sorted((d for d in os.listdir(args.output_dir) if d.startswith("checkpoint")),
                          key=lambda d: int(d.split("-")[1]))
            path = dirs[-1] if dirs else None
        if path is None:
            args.resume_from_checkpoint = None
            initial_global_step = 0
        else:
            accelerator.load_state(os.path.join(args.output_dir, path))
            global_step = int(path.split("-")[1])
            initial_global_step = global_step
            first_epoch = global_step // num_update_steps_per_epoch
    else:
        initial_global_step = 0
    micro_step = global_step * args.gradient_accumulation_steps  # test only
    trained = []  # test only: (global step, this rank's regions, loss) of every micro-batch

    progress_bar = tqdm(range(0, args.max_train_steps), initial=initial_global_step, desc="Steps",
                        disable=not accelerator.is_local_main_process)

    for epoch in range(first_epoch, args.num_train_epochs):  # noqa: B007 (the stock loop)
        train_loss = 0.0
        for step, batch in enumerate(train_dataloader):  # noqa: B007
            with accelerator.accumulate(unet):
                aria_test_hooks.reseed(micro_step, accelerator.process_index)  # test only
                micro_step += 1  # test only
                model_input = batch["model_input"].to(accelerator.device)
                noise = torch.randn_like(model_input)
                bsz = model_input.shape[0]
                timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (bsz,),
                                          device=model_input.device)
                noisy_model_input = noise_scheduler.add_noise(model_input, noise, timesteps).to(dtype=weight_dtype)

                def compute_time_ids(original_size, crops_coords_top_left):
                    target_size = (args.resolution, args.resolution)
                    add_time_ids = list(original_size + crops_coords_top_left + target_size)
                    return torch.tensor([add_time_ids], device=accelerator.device, dtype=weight_dtype)

                add_time_ids = torch.cat(
                    [compute_time_ids(s, c) for s, c in zip(batch["original_sizes"], batch["crop_top_lefts"])]
                )

                unet_added_conditions = {"time_ids": add_time_ids}
                prompt_embeds = batch["prompt_embeds"].to(accelerator.device, dtype=weight_dtype)
                pooled_prompt_embeds = batch["pooled_prompt_embeds"].to(accelerator.device)
                unet_added_conditions.update({"text_embeds": pooled_prompt_embeds})
                model_pred = unet(noisy_model_input, timesteps, prompt_embeds,
                                  added_cond_kwargs=unet_added_conditions, return_dict=False)[0]

                if args.prediction_type is not None:
                    noise_scheduler.register_to_config(prediction_type=args.prediction_type)
                if noise_scheduler.config.prediction_type == "epsilon":
                    target = noise
                elif noise_scheduler.config.prediction_type == "v_prediction":
                    target = noise_scheduler.get_velocity(model_input, noise, timesteps)
                elif noise_scheduler.config.prediction_type == "sample":
                    target = model_input
                    model_pred = model_pred - noise
                else:
                    raise ValueError(f"Unknown prediction type {noise_scheduler.config.prediction_type}")

                if args.snr_gamma is None:
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
                else:
                    snr = compute_snr(noise_scheduler, timesteps)
                    mse_loss_weights = torch.stack([snr, args.snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
                    if noise_scheduler.config.prediction_type == "epsilon":
                        mse_loss_weights = mse_loss_weights / snr
                    elif noise_scheduler.config.prediction_type == "v_prediction":
                        mse_loss_weights = mse_loss_weights / (snr + 1)
                    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
                    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
                    loss = loss.mean()

                avg_loss = accelerator.gather(loss.repeat(args.train_batch_size)).mean()
                train_loss += avg_loss.item() / args.gradient_accumulation_steps

                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    params_to_clip = unet.parameters()
                    accelerator.clip_grad_norm_(params_to_clip, args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad()
            trained.append([global_step, batch["aria_region"].tolist(), loss.item()])  # test only

            if accelerator.sync_gradients:
                progress_bar.update(1)
                global_step += 1
                accelerator.log({"train_loss": train_loss}, step=global_step)
                train_loss = 0.0

                if accelerator.distributed_type == DistributedType.DEEPSPEED or accelerator.is_main_process:
                    if global_step % args.checkpointing_steps == 0:
                        save_path = os.path.join(args.output_dir, f"checkpoint-{global_step}")
                        accelerator.save_state(save_path)

            progress_bar.set_postfix(step_loss=loss.detach().item(), lr=lr_scheduler.get_last_lr()[0])
            if global_step >= args.max_train_steps:
                break

    accelerator.wait_for_everyone()
    aria_test_hooks.record(args, accelerator, aria, regions, trained)  # test only  # noqa: F821
    # the prepared model goes before the process group, or a gloo rank can hang at exit (docs/reliability.md)
    from diffusers_aria.training.outputs import end_run

    del unet, optimizer, train_dataloader, lr_scheduler
    end_run(accelerator)


if __name__ == "__main__":
    args = parse_args()
    main(args)
