"""Generation of the evaluation prompts by the teacher and both students, sharded over processes, resumable.

Run under `accelerate launch ... -m diffusers_aria.compare.generate WORK_DIR` (`launch.generation_command`).
The prompts are cut into shards of a fixed size (the plan's `shard_size`); process r of n takes shards r,
r + n, ... . A shard is finished when its record `generate/MODEL/shards/shard-K.json` exists; it is written
after the shard's images (`generate/MODEL/images/INDEX.png`) and, for a student, holds the shard's epsilon
error per prompt. A second launch skips finished shards, with any number of processes.

Every image has its own seed, `(seed, prompt index)`, so an image does not depend on the shard size, the batch
or the number of processes. All three models sample with the teacher's own scheduler and the same guidance.
The epsilon error is `evaluation.prompt_discrepancy` (the normalised teacher-student error at shared
`(x_0, noise, t)`) at the comparison's resolution.
"""

from __future__ import annotations

import json
import os
import sys
import time

from ..utils.atomic import atomic_save, atomic_write_json

MODELS: tuple[str, ...] = ("teacher", "rc", "aria")
EPS_TIMESTEPS: tuple[int, ...] = (100, 400, 700)


def shard_ranges(num_prompts: int, shard_size: int) -> list[tuple[int, int]]:
    """[start, end) of every shard."""
    if shard_size < 1:
        raise ValueError(f"shard_size {shard_size} is not valid; it must be at least 1")
    return [(s, min(s + shard_size, num_prompts)) for s in range(0, num_prompts, shard_size)]


def shards_of_rank(num_shards: int, rank: int, world: int) -> list[int]:
    """The shards process `rank` of `world` generates: rank, rank + world, ..."""
    return list(range(rank, num_shards, world))


def image_seed(seed: int, index: int) -> int:
    return (int(seed) * 1_000_003 + int(index)) % (2**63 - 1)


def shard_record(work_dir: str, model: str, shard: int) -> str:
    return os.path.join(work_dir, "generate", model, "shards", f"shard-{shard:05d}.json")


def image_path(work_dir: str, model: str, index: int) -> str:
    return os.path.join(work_dir, "generate", model, "images", f"{index:06d}.png")


def missing_shards(work_dir: str, model: str, num_prompts: int, shard_size: int) -> list[int]:
    return [k for k in range(len(shard_ranges(num_prompts, shard_size)))
            if not os.path.isfile(shard_record(work_dir, model, k))]


def read_eval_rows(work_dir: str) -> list[dict]:
    with open(os.path.join(work_dir, "data", "eval.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def model_paths(work_dir: str, teacher: str) -> dict[str, str]:
    return {"teacher": teacher, "rc": os.path.join(work_dir, "rc"), "aria": os.path.join(work_dir, "aria")}


def _dtype(mixed_precision: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision, torch.float32)


def load_pipeline(path: str, family, dtype, device, scheduler=None):
    """A model's pipeline on `device` in `dtype` (a LoRA student's adapters loaded), sampling with `scheduler`."""
    from diffusers import DiffusionPipeline

    kwargs = {"safety_checker": None, "requires_safety_checker": False} if family.name == "sd" else {}
    pipe = DiffusionPipeline.from_pretrained(path, torch_dtype=dtype, **kwargs)
    if any(os.path.isfile(os.path.join(path, n)) for n in ("pytorch_lora_weights.safetensors",
                                                           "adapter_model.safetensors")):
        setattr(pipe, family.denoiser, family.load_lora(pipe, path))
    if scheduler is not None:
        pipe.scheduler = type(scheduler).from_config(scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def training_noise(pipe, family):
    """The teacher's training noise (DDPM, or rectified flow for SD3), from its scheduler config."""
    if family.flow_matching:
        from ..families import FlowMatchingNoise

        return FlowMatchingNoise.from_scheduler(pipe.scheduler)
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def generate_images(pipe, family, rows: list[dict], work_dir: str, model: str, settings: dict) -> None:
    """Generate and save the images of `rows` (batches of at most 16), each from its own seed."""
    import torch

    resolution = settings.get("resolution")
    batch = max(1, min(16, settings["shard_size"]))
    for start in range(0, len(rows), batch):
        chunk = rows[start:start + batch]
        gens = [torch.Generator().manual_seed(image_seed(settings["seed"], r["index"])) for r in chunk]
        with torch.no_grad():
            out = pipe([r["prompt"] for r in chunk], num_inference_steps=settings["inference_steps"],
                       guidance_scale=settings["guidance_scale"], generator=gens, height=resolution, width=resolution,
                       output_type="pil", **family.call_kwargs())
        for r, img in zip(chunk, out.images):
            path = image_path(work_dir, model, r["index"])
            os.makedirs(os.path.dirname(path), exist_ok=True)
            atomic_save(path, lambda tmp, img=img: img.save(tmp, format="PNG"), suffix=".png")


def shard_epsilon(teacher_pipe, student_pipe, family, noise, prompts: list[str], settings: dict, shard: int) -> list[float]:
    """The epsilon error of each prompt (mean over `EPS_TIMESTEPS`) between the teacher and a student."""
    from ..training.evaluation import prompt_discrepancy

    denoiser = family.denoiser
    teacher, student = getattr(teacher_pipe, denoiser), getattr(student_pipe, denoiser)
    resolution = settings.get("resolution") or teacher_pipe.vae_scale_factor * _sample_size(teacher)
    size = resolution // teacher_pipe.vae_scale_factor

    def encode(chunk, dev):
        return family.encode(teacher_pipe, chunk, dev, resolution)

    vals = prompt_discrepancy(teacher.eval(), student.eval(), teacher_pipe.text_encoder, teacher_pipe.tokenizer, noise,
                              prompts, EPS_TIMESTEPS, seed=int(settings["seed"]) * 7919 + shard,
                              latent_shape=(teacher.config.in_channels, size, size), family=family,
                              encode=encode)
    return vals.mean(axis=1).tolist()


def _sample_size(model) -> int:
    size = model.config.sample_size
    return int(size if isinstance(size, int) else size[0])


def run_worker(work_dir: str, rank: int = 0, world: int = 1, device=None, models: tuple[str, ...] = MODELS,
               log=print) -> dict[str, list[int]]:
    """Generate this process's unfinished shards of every model; returns the shards it generated per model."""
    import torch

    from ..teachers.families import family_of

    with open(os.path.join(work_dir, "compare_plan.json")) as fh:
        settings = json.load(fh)
    rows = read_eval_rows(work_dir)
    ranges = shard_ranges(len(rows), settings["shard_size"])
    mine = shards_of_rank(len(ranges), rank, world)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _dtype(settings["mixed_precision"]) if str(device).startswith("cuda") else torch.float32
    paths = model_paths(work_dir, settings["teacher"])
    family = family_of(settings["teacher"])
    todo = {m: [k for k in mine if not os.path.isfile(shard_record(work_dir, m, k))] for m in models}
    done: dict[str, list[int]] = {m: [] for m in models}
    if not any(todo.values()):
        return done
    teacher_pipe = load_pipeline(paths["teacher"], family, dtype, device)
    noise = training_noise(teacher_pipe, family)
    for model in models:
        if not todo[model]:
            continue
        pipe = teacher_pipe if model == "teacher" else load_pipeline(paths[model], family, dtype, device,
                                                                   scheduler=teacher_pipe.scheduler)
        for k in todo[model]:
            t0 = time.perf_counter()
            start, end = ranges[k]
            shard_rows = rows[start:end]
            generate_images(pipe, family, shard_rows, work_dir, model, settings)
            record = {"shard": k, "indices": [r["index"] for r in shard_rows], "model": model}
            if model != "teacher":
                record["eps"] = shard_epsilon(teacher_pipe, pipe, family, noise, [r["prompt"] for r in shard_rows],
                                              settings, k)
            record["seconds"] = time.perf_counter() - t0
            atomic_write_json(shard_record(work_dir, model, k), record)
            done[model].append(k)
            log(f"generate {model}: shard {k + 1}/{len(ranges)} ({end - start} prompts, process {rank}) in "
                f"{record['seconds']:.1f} s")
        if pipe is not teacher_pipe:
            del pipe
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    return done


def main(argv: list[str] | None = None) -> int:
    from ..utils.processes import launched_state

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: accelerate launch -m diffusers_aria.compare.generate WORK_DIR", file=sys.stderr)
        return 2
    state = launched_state()
    run_worker(argv[0], state.process_index, state.num_processes, device=state.device,
               log=lambda msg: print(msg, flush=True))
    state.wait_for_everyone()
    return 0


if __name__ == "__main__":
    sys.exit(main())
