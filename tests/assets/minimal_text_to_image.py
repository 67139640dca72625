"""A minimal script of the same shape as diffusers' examples/text_to_image/train_text_to_image.py, with ARIA added.

Every line between `# --- ARIA` markers is the snippet of docs/add-to-your-script.md (a test checks they agree).
Usage: accelerate launch minimal_text_to_image.py PIPELINE_DIR IMAGEFOLDER OUTPUT_DIR STEPS
"""

import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from datasets import load_dataset
from diffusers import DDPMScheduler, UNet2DConditionModel
from transformers import AutoModel, AutoTokenizer

model_dir, data_dir, output_dir, max_train_steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
train_batch_size, caption_column, seed = 2, "text", 0
accelerator = Accelerator()
tokenizer = AutoTokenizer.from_pretrained(model_dir, subfolder="tokenizer")
text_encoder = AutoModel.from_pretrained(model_dir, subfolder="text_encoder").requires_grad_(False)
unet = UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet")
noise_scheduler = DDPMScheduler.from_pretrained(model_dir, subfolder="scheduler")
dataset = load_dataset("imagefolder", data_dir=data_dir)
train_dataset = dataset["train"]

# --- ARIA (1/4): regions over the captions, a region column, and the sampler
from diffusers_aria import AdaptiveRegionSampler, ARIAAllocation, ARIACallback, DiscrepancyTracker, build_regions

regions = build_regions(train_dataset, column=caption_column, num_regions=4, seed=seed)
train_dataset = regions.add_to_dataset(train_dataset, column="aria_region")
sampler = AdaptiveRegionSampler(regions.region_ids, batch_size=train_batch_size * accelerator.num_processes,
                                seed=seed, num_samples=len(train_dataset))
# --- end ARIA


def preprocess_train(examples):
    examples["pixel_values"] = [torch.from_numpy(np.asarray(im.convert("RGB").resize((32, 32)), dtype=np.float32)
                                                 ).permute(2, 0, 1) / 127.5 - 1 for im in examples["image"]]
    examples["input_ids"] = tokenizer(examples[caption_column], padding="max_length", truncation=True,
                                      max_length=tokenizer.model_max_length, return_tensors="pt").input_ids
    return examples


train_dataset = train_dataset.with_transform(preprocess_train)


def collate_fn(examples):
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
             "input_ids": torch.stack([e["input_ids"] for e in examples])}
    # --- ARIA (2/4): carry each row's region into the batch
    batch["aria_region"] = torch.tensor([e["aria_region"] for e in examples])
    # --- end ARIA
    return batch


# stock script: DataLoader(train_dataset, shuffle=True, collate_fn=collate_fn, batch_size=train_batch_size)
# --- ARIA (3/4): the sampler replaces shuffle=True; the callback follows the per-sample losses
train_dataloader = torch.utils.data.DataLoader(train_dataset, sampler=sampler, collate_fn=collate_fn,
                                               batch_size=train_batch_size)
aria = ARIACallback(accelerator, sampler, DiscrepancyTracker(regions.num_regions),
                    ARIAAllocation(sampler.sizes, warmup_steps=1))
# --- end ARIA
optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4)
unet, optimizer, train_dataloader = accelerator.prepare(unet, optimizer, train_dataloader)

global_step, seen = 0, []
for epoch in range(100):
    sampler.set_epoch(epoch)
    for batch in train_dataloader:
        with accelerator.accumulate(unet):
            # the image latents stand in for the VAE here
            latents = F.avg_pool2d(batch["pixel_values"], 2)
            latents = torch.cat([latents, latents[:, :1]], dim=1)
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],))
            noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
            encoder_hidden_states = text_encoder(batch["input_ids"])[0]
            model_pred = unet(noisy_latents, timesteps, encoder_hidden_states).sample
            target = noise
            # stock script: loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")
            # --- ARIA (4/4): per-sample losses, their mean for backward, then the callback
            per_sample = F.mse_loss(model_pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3])
            loss = per_sample.mean()
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
            aria.on_step_end(global_step, batch["aria_region"], per_sample, timesteps)
            # --- end ARIA
        seen.append(batch["aria_region"].tolist())
        global_step += 1
        if global_step >= max_train_steps:
            break
    if global_step >= max_train_steps:
        break

os.makedirs(output_dir, exist_ok=True)
with open(os.path.join(output_dir, f"rank{accelerator.process_index}.json"), "w") as fh:
    json.dump({"world": accelerator.num_processes, "regions_seen": seen, "probs": aria.sampler.probabilities.tolist(),
               "updates": aria.tracker.num_updates}, fh)
# the prepared model goes before the process group, or a gloo rank can hang at exit (docs/reliability.md)
from diffusers_aria.run_setup import end_run  # noqa: E402

del unet, optimizer, train_dataloader
end_run(accelerator)
