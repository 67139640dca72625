"""GPU check: ARIA vs RC distillation steps at real model sizes (SD 1.5; SDXL, PixArt, SD3), in bf16, no download.

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
    bash scripts/gpu_check.sh --family sdxl   # SDXL-base size (2.57B UNet, CLIP-L + bigG), koala_700m, 1024 px
    bash scripts/gpu_check.sh --family pixart # PixArt-alpha XL-2 (0.61B, T5-XXL 4.7B), dit_every_other, 1024 px
    bash scripts/gpu_check.sh --family sd3    # SD3-medium (2.03B, CLIP-L + bigG + T5-XXL), dit_every_other, 1024 px

The other families' teachers are the real configs of `diffusers_aria.distillation.reference_configs` with text
encoders of the real sizes (vocabulary: the MiniLM BERT tokenizer's); `--smoke --family F` runs the tiny
random teacher of `diffusers_aria.embedded.tiny_families` instead.

Random weights: the figures measure speed and memory, not image quality.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _common import REPO, header, loadavg, offline_env, summarize, table, write_json

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


#: where a --smoke run writes its JSON unless --out_dir is given (untracked: outputs/ is git-ignored)
SMOKE_OUT_DIR = os.path.join(REPO, "outputs", "benchmarks")

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="CPU, 64 px, 1/10 widths, a few steps (CI)")
    p.add_argument("--lora", action="store_true", help="LoRA student (rank 8) instead of the full student")
    p.add_argument("--family", default="sd", choices=["sd", "sdxl", "pixart", "sd3"],
                   help="teacher family (default sd: SD-1.5 size)")
    p.add_argument("--student", default=None,
                   help="student preset (default: bk_small for sd, koala_700m for sdxl, dit_every_other otherwise)")
    p.add_argument("--steps", type=int, default=None, help="measured steps per policy (default 20; smoke 3)")
    p.add_argument("--warmup", type=int, default=None, help="unmeasured steps per policy (default 3; smoke 1)")
    p.add_argument("--batch_size", type=int, default=None, help="per device (default 8, other families 4; smoke 2)")
    p.add_argument("--resolution", type=int, default=None,
                   help="pixels (default 512, other families 1024; smoke 64)")
    p.add_argument("--num_regions", type=int, default=64)
    p.add_argument("--pool_size", type=int, default=None, help="built-in pool prompts (default 4000; smoke 300)")
    p.add_argument("--mixed_precision", default=None, choices=["no", "bf16", "fp16"],
                   help="default bf16 (smoke: bf16 on CPU)")
    p.add_argument("--out_dir", default=None,
                   help="folder of the JSON (default benchmarks/results; with --smoke outputs/benchmarks, untracked)")
    args = p.parse_args(argv)
    small = args.smoke
    if args.smoke and args.out_dir is None:  # a smoke run never writes into the tracked results
        args.out_dir = str(SMOKE_OUT_DIR)
    other = args.family != "sd"
    for name, full, smoke in (("steps", 20, 3), ("warmup", 3, 1), ("batch_size", 4 if other else 8, 2),
                              ("resolution", 1024 if other else 512, 64), ("pool_size", 4000, 300)):
        if getattr(args, name) is None:
            setattr(args, name, smoke if small else full)
    args.mixed_precision = args.mixed_precision or "bf16"
    args.student = args.student or {"sd": "bk_small", "sdxl": "koala_700m"}.get(args.family, "dit_every_other")
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

    from diffusers_aria.embedded.minilm import load_minilm_text_encoder
    from diffusers_aria.teachers.families import FAMILIES
    from diffusers_aria.teachers.parts import TeacherParts

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
    return TeacherParts(unet, vae, text_encoder, tokenizer, scheduler, "random-init-sd15-size", FAMILIES["sd"])


# Text encoders of the real sizes (CLIP ViT-L/14, OpenCLIP bigG/14, T5 v1.1 XXL's encoder).
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              projection_dim=768, hidden_act="quick_gelu")
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280, hidden_act="gelu")
T5_XXL = dict(d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64, feed_forward_proj="gated-gelu")
FAMILY_LATENTS = {"sdxl": (4, 0.13025, None), "pixart": (4, 0.18215, None), "sd3": (16, 1.5305, 0.0609)}


def _real_components(family: str, resolution: int, device) -> dict:
    """Random-init pipeline parts of the real sizes of `family`, made on `device` (no download)."""
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        PixArtTransformer2DModel,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        T5Config,
        T5EncoderModel,
    )

    from diffusers_aria.distillation import reference_configs as rc
    from diffusers_aria.embedded.tiny_families import bert_tokenizer

    def clip(size: dict, projection: bool):
        tok = bert_tokenizer(77)
        cfg = CLIPTextConfig(vocab_size=len(tok), max_position_embeddings=77, bos_token_id=tok.cls_token_id,
                             eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id, **size)
        return tok, (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg)

    def t5(length: int):
        tok = bert_tokenizer(length)
        cfg = T5Config(vocab_size=len(tok), is_encoder_decoder=False, use_cache=False, pad_token_id=tok.pad_token_id,
                       eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.pad_token_id, **T5_XXL)
        return tok, T5EncoderModel(cfg)

    channels, scaling, shift = FAMILY_LATENTS[family]
    vae_cfg = dict(SD_VAE, latent_channels=channels, scaling_factor=scaling, shift_factor=shift)
    if family == "sd3":
        vae_cfg.update(use_quant_conv=False, use_post_quant_conv=False)
    size = resolution // 8
    with torch.device(device):
        parts = {"vae": AutoencoderKL(sample_size=resolution, **vae_cfg)}
        if family == "sdxl":
            parts["tokenizer"], parts["text_encoder"] = clip(CLIP_L, projection=False)
            parts["tokenizer_2"], parts["text_encoder_2"] = clip(CLIP_G, projection=True)
            parts["unet"] = UNet2DConditionModel(**dict(rc.SDXL_BASE_UNET_CONFIG, sample_size=size))
        elif family == "pixart":
            parts["tokenizer"], parts["text_encoder"] = t5(120)
            parts["transformer"] = PixArtTransformer2DModel(**dict(rc.PIXART_ALPHA_XL_1024_CONFIG, sample_size=size))
        else:
            parts["tokenizer"], parts["text_encoder"] = clip(CLIP_L, projection=True)
            parts["tokenizer_2"], parts["text_encoder_2"] = clip(CLIP_G, projection=True)
            parts["tokenizer_3"], parts["text_encoder_3"] = t5(256)
            parts["transformer"] = SD3Transformer2DModel(**dict(rc.SD3_MEDIUM_CONFIG, sample_size=size))
            parts["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return parts


def build_family_teacher(family: str, resolution: int, smoke: bool, device):
    """A teacher of `family` as `run_setup.TeacherParts`: the real sizes, or the tiny random teacher (smoke)."""
    from diffusers_aria.embedded.tiny_families import family_components
    from diffusers_aria.embedded.tiny_teacher import tiny_scheduler
    from diffusers_aria.teachers.families import FAMILIES, FlowMatchingNoise
    from diffusers_aria.teachers.parts import TeacherParts

    fam = FAMILIES[family]
    parts = family_components(family, resolution) if smoke else _real_components(family, resolution, device)
    if fam.flow_matching:
        noise = FlowMatchingNoise.from_scheduler(parts["scheduler"])
    else:
        noise = tiny_scheduler()  # SD/SDXL-style DDPM betas (the step time does not depend on them)
        parts.setdefault("scheduler", noise)
    return TeacherParts.from_components(fam, parts, noise, f"random-init-{family}",
                                        pipeline_class=fam.pipeline_classes[0])


def main(args) -> dict:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from diffusers_aria.distillation import DistillationLoss, add_lora, cast_trainable_to_fp32
    from diffusers_aria.regions import build_regions
    from diffusers_aria.settings import AriaSettings
    from diffusers_aria.training.aria import build_aria
    from diffusers_aria.training.inputs import load_pool
    from diffusers_aria.training.step import KDStep, sample_noise_and_timesteps
    from diffusers_aria.training.student import feature_mapping, feature_projections, make_student

    rec = header(sys.argv[1:], "gpu_check.py")
    accelerator = Accelerator(mixed_precision=args.mixed_precision, cpu=args.smoke)
    device, world = accelerator.device, accelerator.num_processes
    if not args.smoke and device.type != "cuda":
        raise SystemExit("gpu_check: no GPU visible (torch.cuda.is_available() is False); use --smoke for the CPU check")
    set_seed(0)
    weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision, torch.float32)
    t0 = time.perf_counter()
    if args.family == "sd":
        parts = build_teacher(args.resolution, scale=0.1 if args.smoke else 1.0)
    else:
        parts = build_family_teacher(args.family, args.resolution, args.smoke, device)
    parts.family.check_student(args.student)
    student, init_report = make_student(parts.denoiser.to(device), args.student, family=parts.family)
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
    mapping = feature_mapping(parts.denoiser, student, args.student, parts.family)
    with torch.no_grad():
        projections = feature_projections(parts.denoiser, student, mapping, device, family=parts.family,
                                          cond=parts.encode([""], device, args.resolution))
    kd = KDStep(parts.denoiser, student, parts.scheduler, DistillationLoss(1.0, 1.0, 0.0), feature_mapping=mapping,
                projections=projections, family=parts.family)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5)
    student, optimizer = accelerator.prepare(student, optimizer)
    policies = {"aria": build_aria(AriaSettings(allocation="aria", warmup_steps=1), regions, pool, accelerator, seed=0),
                "rc": build_aria(AriaSettings(allocation="rc"), regions, pool, accelerator, seed=0)}

    latent = args.resolution // 2 ** (len(parts.vae.config.block_out_channels) - 1)
    channels = parts.denoiser.config.in_channels
    times: dict[str, list[float]] = {k: [] for k in policies}
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    n_steps = args.warmup + args.steps
    nonfinite: dict[str, int] = {k: 0 for k in policies}
    for step in range(n_steps):
        gen = torch.Generator().manual_seed(1000 * step + accelerator.process_index)
        latents = torch.randn(args.batch_size, channels, latent, latent, generator=gen).to(device, weight_dtype)
        noise, timesteps = sample_noise_and_timesteps(latents, 1000, 0, step, accelerator.process_index)
        order = ("aria", "rc") if step % 2 == 0 else ("rc", "aria")  # interleaved, alternating first
        for name in order:
            aria = policies[name]
            sync()
            start = time.perf_counter()
            cond = aria.conditioning(step, timesteps.cpu(), None, rank=accelerator.process_index, num_replicas=world)
            with torch.no_grad():
                hidden = parts.encode(cond.prompts, device, args.resolution)
            terms = kd(student, latents, noise, timesteps, hidden)
            nonfinite[name] += int(not bool(torch.isfinite(terms.total.detach()).all()))
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
        "batch_size_per_device": args.batch_size, "family": args.family,
        "student": args.student + (" LoRA r8" if args.lora else ""),
        "teacher_params": sum(p.numel() for p in parts.denoiser.parameters()),
        "frozen_params": sum(p.numel() for m in parts.modules() for p in m.parameters()),
        "student_params": n_total, "student_trainable_params": n_train, "student_init": str(init_report),
        "build_seconds": build_s, "num_regions": regions.num_regions, "feature_pairs": len(mapping),
        "step_ms": {"aria": summarize(a), "rc": summarize(r)}, "ratio_aria_rc": float(a.sum() / r.sum()),
        "samples_per_s": {"aria": global_batch / float(a.mean()), "rc": global_batch / float(r.mean())},
        "peak_gpu_memory_gib": None if peak is None else peak / 2**30, "loadavg_end": loadavg(),
        "nonfinite_loss_steps": nonfinite, "finite_loss": not any(nonfinite.values()),
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
        name = ("gpu_check" + ("" if args.family == "sd" else f"_{args.family}") + ("_smoke" if args.smoke else "")
                + ("_lora" if args.lora else ""))
        print("wrote", write_json(name, rec, args.out_dir))
        if not rec["finite_loss"]:
            print(f"FAILED: a non-finite loss in {nonfinite} steps (aria, rc)")
    accelerator.end_training()
    return rec


if __name__ == "__main__":
    # the criterion: every measured step's loss is finite (exit 1 otherwise)
    sys.exit(0 if main(parse_args())["finite_loss"] else 1)
