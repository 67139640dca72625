"""The experiment's presets (`smoke`, `one-gpu`, `paper`) and its cost, stated before the work starts.

A preset fixes the teacher, the student, the training length and batch, the evaluation size and the metrics'
models; any flag the user passes overrides its value. The cost is stated twice: up front, from the
preset's sizes and a nominal speed (an estimate, marked as such), and after the first training steps of the
RC arm, from their measured time (`measured_cost`).

Only the standard library is used: the plan is printed before anything heavy loads.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from ..utils.errors import UserError


@dataclass(frozen=True)
class Preset:
    """One experiment size. `None` means "the user must give it" (the GPU presets' data)."""

    name: str
    teacher: str | None
    student_architecture: str
    resolution: int | None
    train_batch_size: int  # per process
    gradient_accumulation_steps: int
    max_train_steps: int
    checkpointing_steps: int
    learning_rate: float
    mixed_precision: str
    num_processes: int
    num_eval_prompts: int
    inference_steps: int
    guidance_scale: float
    shard_size: int  # evaluation prompts per generation shard (the unit of resume)
    num_regions: int
    fid_features: str  # "inception" (torchmetrics' InceptionV3, 2048 features) or "clip" (the CLIP image tower)
    clip_model: str | None  # None: the smoke preset's tiny CLIP, built from a config
    timing_steps: int  # RC steps timed before the measured cost is printed
    # nominal speed for the up-front estimate: seconds per optimizer step (every process doing its batch)
    nominal_step_seconds: float
    nominal_device: str
    extra_train_args: tuple[str, ...] = ()
    description: str = ""


PRESETS: dict[str, Preset] = {
    "smoke": Preset(
        name="smoke", teacher=None, student_architecture="bk_tiny", resolution=32, train_batch_size=4,
        gradient_accumulation_steps=1, max_train_steps=2, checkpointing_steps=1, learning_rate=1e-3,
        mixed_precision="no", num_processes=1, num_eval_prompts=18, inference_steps=2, guidance_scale=5.0,
        shard_size=4, num_regions=12, fid_features="clip", clip_model=None, timing_steps=2,
        nominal_step_seconds=1.0, nominal_device="2 CPU cores",
        extra_train_args=("--rc_schedule", "constant", "--rc_constant", "0.5", "--aria_warmup_steps", "1",
                          "--aria_log_every", "1"),
        description="CPU, the tiny teacher and its own data, minutes: what CI runs. The numbers are not a result"),
    "one-gpu": Preset(
        name="one-gpu", teacher="stable-diffusion-v1-5/stable-diffusion-v1-5", student_architecture="bk_small",
        resolution=256, train_batch_size=64, gradient_accumulation_steps=1, max_train_steps=4000,
        checkpointing_steps=500, learning_rate=5e-5, mixed_precision="bf16", num_processes=1,
        num_eval_prompts=5000, inference_steps=25, guidance_scale=7.5, shard_size=250, num_regions=256,
        fid_features="inception", clip_model="openai/clip-vit-large-patch14", timing_steps=10,
        nominal_step_seconds=1.4, nominal_device="one 80 GB A100/H100 (estimate)",
        extra_train_args=("--gradient_checkpointing", "--lr_scheduler", "constant", "--lambda_kd_feat", "1.0",
                          "--lambda_sd", "1.0", "--center_crop", "--random_flip"),
        description="SD 1.5 -> BK-SDM-Small at 256 px, 4,000 steps of batch 64, a 5k-prompt evaluation"),
    "paper": Preset(
        name="paper", teacher="CompVis/stable-diffusion-v1-4", student_architecture="bk_small", resolution=512,
        train_batch_size=32, gradient_accumulation_steps=1, max_train_steps=50000, checkpointing_steps=1000,
        learning_rate=5e-5, mixed_precision="bf16", num_processes=8, num_eval_prompts=30000, inference_steps=25,
        guidance_scale=7.5, shard_size=500, num_regions=1024, fid_features="inception",
        clip_model="openai/clip-vit-large-patch14", timing_steps=10, nominal_step_seconds=2.8, nominal_device="8 x 80 GB A100 (estimate)",
        extra_train_args=("--gradient_checkpointing", "--lr_scheduler", "constant", "--lambda_kd_feat", "1.0",
                          "--lambda_sd", "1.0", "--center_crop", "--random_flip"),
        description="RC's recipe: SD v1.4 -> BK-SDM-Small, batch 256 (8 x 32), 50k steps, 30k COCO prompts"),
}


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise UserError(f"--preset {name!r} is not valid; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]


def apply_overrides(preset: Preset, overrides: dict) -> Preset:
    """The preset with every override that is not None (flags the user gave) in place of its value."""
    known = {f.name for f in fields(Preset)}
    return replace(preset, **{k: v for k, v in overrides.items() if k in known and v is not None})


def preset_dict(preset: Preset) -> dict:
    out = asdict(preset)
    out["extra_train_args"] = list(preset.extra_train_args)
    return out


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.2f}" if seconds < 36_000 else f"{seconds / 3600:.0f}"


@dataclass(frozen=True)
class Cost:
    """The planned device time of a run: two training arms and the generation of three models' images."""

    step_seconds: float  # one optimizer step (all processes together take it at once)
    image_seconds: float  # one generated image on one process
    startup_seconds: float
    train_steps: int
    num_images: int
    num_processes: int
    measured: bool

    @property
    def train_hours(self) -> float:  # device-hours of one arm
        return (self.startup_seconds + self.train_steps * self.step_seconds) * self.num_processes / 3600

    @property
    def generation_hours(self) -> float:
        return self.num_images * self.image_seconds / 3600 + self.startup_seconds * self.num_processes / 3600

    @property
    def total_hours(self) -> float:
        return 2 * self.train_hours + self.generation_hours

    def to_json(self) -> dict:
        return {**asdict(self), "train_hours_per_arm": self.train_hours, "generation_hours": self.generation_hours,
                "total_device_hours": self.total_hours,
                "wall_hours": self.total_hours / max(self.num_processes, 1)}

    def describe(self) -> str:
        how = "measured on the first steps" if self.measured else "estimate from the preset's nominal speed"
        return (f"planned {_hours(self.total_hours * 3600)} device-hours ({how}): 2 arms x {self.train_steps} steps "
                f"at {self.step_seconds:.3g} s/step = {_hours(2 * self.train_hours * 3600)} h, generation of "
                f"{self.num_images} images at {self.image_seconds:.3g} s/image = {_hours(self.generation_hours * 3600)} h;"
                f" about {_hours(self.total_hours * 3600 / max(self.num_processes, 1))} h of wall time on "
                f"{self.num_processes} process(es)")


def image_seconds(preset: Preset, step_seconds: float) -> float:
    """Seconds of one generated image on one process, from the time of a distillation step: a step runs about
    four forward passes per sample (teacher, student, and the student's backward at twice a forward), an image
    `2 * inference_steps` of them (classifier-free guidance), at the per-sample speed of the training batch."""
    per_forward = step_seconds / (4 * preset.train_batch_size * preset.gradient_accumulation_steps)
    return 2 * preset.inference_steps * per_forward


def nominal_cost(preset: Preset) -> Cost:
    """The up-front estimate, from the preset's nominal step time (not measured on this machine)."""
    return Cost(step_seconds=preset.nominal_step_seconds,
                image_seconds=image_seconds(preset, preset.nominal_step_seconds),
                startup_seconds=60.0 if preset.name != "smoke" else 15.0, train_steps=preset.max_train_steps,
                num_images=3 * preset.num_eval_prompts, num_processes=preset.num_processes, measured=False)


def measured_cost(preset: Preset, step_seconds: float, startup_seconds: float, num_eval_prompts: int) -> Cost:
    """The plan from the RC arm's first steps (`step_seconds` measured, images costed by `image_seconds`)."""
    return Cost(step_seconds=step_seconds, image_seconds=image_seconds(preset, step_seconds),
                startup_seconds=startup_seconds, train_steps=preset.max_train_steps, num_images=3 * num_eval_prompts,
                num_processes=preset.num_processes, measured=True)


__all__ = ["Cost", "PRESETS", "Preset", "apply_overrides", "get_preset", "measured_cost", "nominal_cost", "preset_dict"]
