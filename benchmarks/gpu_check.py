"""GPU check: ARIA vs RC distillation steps at Stable Diffusion 1.5 size, in bf16, with no download.

For whoever has a GPU (`bash scripts/gpu_check.sh`). It builds, from configs, a random-init teacher of SD-1.5
size (UNet 860M, the SD VAE, a 12-layer 768-wide BERT text encoder with the MiniLM tokenizer that ships with
an installed package), a `bk_small` student initialised from it (full, or LoRA with `--lora`), the library's
regions of the built-in pool, and runs interleaved output+feature KD steps of ARIA and of plain RC on the same
student, latents, noise and timesteps, under `accelerate` with bf16 autocast (frozen parts in bf16, the
student's master weights in float32). It prints the step time of each, their ratio, samples/s, peak GPU
memory and the student's parameter count, and writes `benchmarks/results/gpu_check[_smoke|_lora].json`.

    bash scripts/gpu_check.sh                 # 512 px, bf16, one or two GPUs (< 5 min on one H100-class GPU)
    bash scripts/gpu_check.sh --lora          # the LoRA student
    bash scripts/gpu_check.sh --smoke         # the same code on CPU at 64 px with 1/10 widths (CI, < 2 min)

Random weights: the figures measure speed and memory, not image quality.
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import header, loadavg, offline_env, summarize, table, write_json

offline_env()

import numpy as np  # noqa: E402
import torch  # noqa: E402

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
SD_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    scaling_factor=0.18215)
TEXT = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, 64 px, 1/10 widths, a few steps (CI)")
    p.add_argument("--lora", action="store_true", help="LoRA student (rank 8) instead of the full bk_small")
    p.add_argument("--steps", type=int, default=None, help="measured steps per policy (default 20; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps per policy (default 3; smoke 1)")
    p.add_argument("--batch_size", type=int, default=None, help="per device (default 8; smoke 2)")
    p.add_argument("--resolution", type=int, default=None, help="pixels (default 512; smoke 64)")
    p.add_argument("--num_regions", type=int, default=64)
    p.add_argument("--pool_size", type=int, default=None, help="built-in pool prompts (default 4000; smoke 300)")
    p.add_argument("--mixed_precision", default=None, choices=["no", "bf16", "fp16"],
                   help="default bf16 (smoke: bf16 on CPU)")
    p.add_argument("--out_dir", default=None)
    args = p.parse_args(argv)
    small = args.smoke
    for name, full, smoke in (("steps", 20, 3), ("warmup", 3, 1), ("batch_size", 8, 2), ("resolution", 512, 64),
                              ("pool_size", 4000, 300)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if small else full)
    args.mixed_precision = args.mixed_precision or "bf16"
    if args.resolution % 64:
        raise SystemExit(f"gpu_check: --resolution {args.resolution} must be a multiple of 64")
    return args


def _scaled(cfg: dict, scale: float, key: str = "block_out_channels") -> dict:
    out = dict(cfg)
    out[key] = tuple(max(16, int(round(c * scale / 16)) * 16) for c in cfg[key])
    out["norm_num_groups"] = 8 if scale < 1 else cfg["norm_num_groups"]
    return out


def build_teacher(resolution: int, scale: float):
    """SD-1.5-shaped teacher parts from configs (random init), as `run_setup.TeacherParts`."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import BertConfig, BertModel, BertTokenizerFast

    from diffusers_aria.minilm import load_minilm_text_encoder
    from diffusers_aria.run_setup import TeacherParts

    _, minilm_tok = load_minilm_text_encoder(max_length=77)
    tokenizer = BertTokenizerFast.from_pretrained(minilm_tok.name_or_path)
    tokenizer.model_max_length = 77
    text = dict(TEXT)
    if scale < 1:
        text.update(hidden_size=96, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192)
    torch.manual_seed(0)
    text_encoder = BertModel(BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=128, **text))
    unet_cfg = _scaled(SD15_UNET, scale) if scale < 1 else dict(SD15_UNET)
    unet_cfg.update(sample_size=resolution // 8, cross_attention_dim=text["hidden_size"])
    unet = UNet2DConditionModel(**unet_cfg)
    vae_cfg = _scaled(SD_VAE, scale) if scale < 1 else dict(SD_VAE)
    vae = AutoencoderKL(sample_size=resolution, **vae_cfg)
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                              num_train_timesteps=1000)
    return TeacherParts(unet, vae, text_encoder, tokenizer, scheduler, "random-init-sd15-size")


def main(args) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from diffusers_aria.distillation import DistillationLoss, add_lora, cast_trainable_to_fp32
    from diffusers_aria.regions import build_regions
    from diffusers_aria.run_setup import feature_mapping, feature_projections, load_pool, make_student
    from diffusers_aria.training import (
        AriaSettings,
        KDStep,
        build_aria,
        encode_prompts,
        sample_noise_and_timesteps,
    )

    rec = header(sys.argv[1:], "gpu_check.py")
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.smoke)
    device, world = accelerator.device, accelerator.num_processes
    if not args.smoke and device.type != "cuda":
        raise SystemExit("gpu_check: no GPU visible (torch.cuda.is_available() is False); use --smoke for the CPU check")
    set_seed(0)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    t0 = time.perf_counter()
    parts = build_teacher(args.resolution, scale=0.1 if args.smoke else 1.0)
    student, init_report = make_student(parts.unet.to(device), "bk_small")
    student.to(device)
    parts.to_weight_dtype(device, weight_dtype)
    if args.lora:
        student = add_lora(student, rank=8)
        student.to(dtype=weight_dtype)
        cast_trainable_to_fp32(student)
    n_total = sum(p.numel() for p in student.parameters())
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    build_s = time.perf_counter() - t0

    with accelerator.main_process_first():
        pool, _ = load_pool("builtin", builtin_size=args.pool_size, seed=0)
        regions = build_regions(pool, num_regions=args.num_regions, seed=0, progress=False)
    mapping = feature_mapping(parts.unet, student, "bk_small")
    projections = feature_projections(parts.unet, student, mapping, device)
    kd = KDStep(parts.unet, student, parts.scheduler, DistillationLoss(1.0, 1.0, 0.0), feature_mapping=mapping,
                projections=projections)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    student, optimizer = accelerator.prepare(student, optimizer)
    policies = {"aria": build_aria(AriaSettings(allocation="aria", warmup_steps=1), regions, pool, accelerator, seed=0),
                "rc": build_aria(AriaSettings(allocation="rc"), regions, pool, accelerator, seed=0)}

    latent = args.resolution // 8
    times: dict[str, list[float]] = {k: [] for k in policies}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n_steps = args.warmup + args.steps
    for step in range(n_steps):
        gen = torch.Generator().manual_seed(1000 * step + accelerator.process_index)
        latents = torch.randn(args.batch_size, 4, latent, latent, generator=gen).to(device, weight_dtype)
        noise, timesteps = sample_noise_and_timesteps(latents, 1000, 0, step, accelerator.process_index)
        order = ("aria", "rc") if step % 2 == 0 else ("rc", "aria")  # interleaved, alternating first
        for name in order:
            aria = policies[name]
            sync()
            start = time.perf_counter()
            cond = aria.conditioning(step, timesteps.cpu(), None, rank=accelerator.process_index, num_replicas=world)
            with torch.no_grad():
                hidden = encode_prompts(parts.text_encoder, parts.tokenizer, cond.prompts, device)
            terms = kd(student, latents, noise, timesteps, hidden)
            accelerator.backward(terms.total.mean())
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            aria.callback.on_step_end(step, cond.region_ids, terms.total.detach(), timesteps)
            sync()
            if step >= args.warmup:
                times[name].append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else None
    a, r = np.asarray(times["aria"]), np.asarray(times["rc"])
    global_batch = args.batch_size * world
    rec.update({
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "num_processes": world, "mixed_precision": accelerator.mixed_precision, "resolution": args.resolution,
        "batch_size_per_device": args.batch_size, "student": "bk_small" + (" LoRA r8" if args.lora else ""),
        "student_params": n_total, "student_trainable_params": n_train, "student_init": str(init_report),
        "build_seconds": build_s, "num_regions": regions.num_regions, "feature_pairs": len(mapping),
        "step_ms": {"aria": summarize(a), "rc": summarize(r)}, "ratio_aria_rc": float(a.sum() / r.sum()),
        "samples_per_s": {"aria": global_batch / float(a.mean()), "rc": global_batch / float(r.mean())},
        "peak_gpu_memory_gib": None if peak is None else peak / 2**30, "loadavg_end": loadavg(),
        "aria_max_p_over_prior": float((policies["aria"].sampler.probabilities
                                        / policies["aria"].policy.prompt_share).max()),
    })
    if accelerator.is_main_process:
        rows = [[k, f"{rec['step_ms'][k]['median']:.1f}", f"{rec['samples_per_s'][k]:.2f}"] for k in ("aria", "rc")]
        print(table(rows, ["policy", "median step ms", "samples/s (global)"]))
        print(f"ARIA/RC step time: {rec['ratio_aria_rc']:.3f}; student {n_total / 1e6:.1f}M params "
              f"({n_train / 1e6:.2f}M trainable); peak GPU memory "
              f"{'n/a (CPU)' if peak is None else f'{peak / 2**30:.2f} GiB'}; {world} process(es), "
              f"{rec['mixed_precision']}, {args.resolution} px, batch {args.batch_size}/device")
        name = "gpu_check" + ("_smoke" if args.smoke else "") + ("_lora" if args.lora else "")
        print("wrote", write_json(name, rec, args.out_dir))
    accelerator.end_training()
    return rec


if __name__ == "__main__":
    main(parse_args())
