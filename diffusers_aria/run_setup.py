"""Setting up and finishing a distillation run: teacher, student, EMA, pool, regions, paired data, outputs.

Everything the training script needs besides its argument parser and loop, in small functions that the
tests call directly.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .atomic import atomic_write_json
from .file_names import TEACHER_REPORT
from .pool import load_prompt_pool, pool_fingerprint
from .regions import load_or_build_regions


class OutputDirError(ValueError):
    """The output folder holds a previous run and neither resume nor overwrite was asked for."""


def check_output_dir(output_dir: str, resuming: bool, overwrite: bool) -> None:
    """Refuse to start a new run in a non-empty folder (nothing is deleted either way)."""
    if resuming or overwrite or not os.path.isdir(output_dir):
        return
    entries = sorted(os.listdir(output_dir))
    if entries:
        shown = ", ".join(entries[:8]) + (" ..." if len(entries) > 8 else "")
        raise OutputDirError(
            f"--output_dir {output_dir!r} is not empty (it holds {shown}); pass --resume_from_checkpoint latest to "
            "continue that run, --overwrite_output_dir to write into it anyway (nothing is deleted), or choose a new folder"
        )


@dataclass
class TeacherParts:
    """A loaded teacher: `unet` is its denoiser (a UNet, or a transformer for PixArt / SD3), `scheduler` the
    training noise scheduler, `extra` the other parts of its pipeline (second and third text encoders and
    tokenizers, the sampling scheduler of non-SD families), `family` its `families.Family` (None: SD 1.x/2.x)."""

    unet: Any
    vae: Any
    text_encoder: Any
    tokenizer: Any
    scheduler: Any
    name_or_path: str
    revision: str | None = None
    variant: str | None = None
    family: Any = None
    extra: dict[str, Any] = field(default_factory=dict)
    pipeline_class: str | None = None
    student_prediction_type: str | None = None
    vae_name_or_path: str | None = None  # --pretrained_vae_model_name_or_path: a VAE other than the teacher's

    @classmethod
    def from_components(cls, family, components: dict[str, Any], noise_scheduler, name_or_path: str,
                        **fields) -> TeacherParts:
        """The parts of a pipeline of `family` given as its constructor arguments (`components`): the denoiser, VAE, first text encoder and tokenizer by name, everything else in `extra`."""
        parts = dict(components)
        denoiser = parts.pop(family.denoiser)
        core = {k: parts.pop(k) for k in ("vae", "text_encoder", "tokenizer")}
        return cls(denoiser, scheduler=noise_scheduler, name_or_path=name_or_path, family=family, extra=parts,
                   **core, **fields)

    def training_scheduler(self, prediction_type: str | None = None):
        """The noise scheduler for training, in the student's parametrisation (`--prediction_type`; default the
        teacher's). The teacher's own scheduler is left as it is: its pipelines (teacher latents, the teacher
        row of validation) keep sampling in the teacher's parametrisation."""
        if prediction_type is None or prediction_type == self.scheduler.config.prediction_type:
            return self.scheduler
        if not hasattr(self.scheduler, "from_config"):  # FlowMatchingNoise: refuses with a clear error
            self.scheduler.register_to_config(prediction_type=prediction_type)
        self.student_prediction_type = prediction_type
        return type(self.scheduler).from_config(self.scheduler.config, prediction_type=prediction_type)

    @property
    def denoiser(self):
        return self.unet

    @property
    def fam(self):
        from .families import FAMILIES

        return self.family or FAMILIES["sd"]

    def pipeline_components(self, student: bool = False) -> dict[str, Any]:
        """The pipeline's parts but the denoiser (SD 1.x/2.x: with the teacher's DDPM scheduler). `student`: the
        scheduler in the student's parametrisation (`training_scheduler`), for the student's pipelines."""
        parts = {"vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                 "scheduler": self.scheduler, **self.extra}
        if student and self.student_prediction_type:
            sched = parts["scheduler"]
            parts["scheduler"] = type(sched).from_config(sched.config, prediction_type=self.student_prediction_type)
        return parts

    def student_scheduler(self):
        """The sampling scheduler of the student's pipelines."""
        return self.pipeline_components(student=True)["scheduler"]

    def make_pipeline(self, denoiser=None, components: dict[str, Any] | None = None):
        """A pipeline of the teacher's class with `denoiser` (default: the teacher's own)."""
        return self.fam.make_pipeline(dict(components or self.pipeline_components()),
                                      self.unet if denoiser is None else denoiser, self.pipeline_class)

    def encode(self, prompts: list[str], device, resolution: int, time_ids=None) -> dict[str, Any]:
        """The denoiser's conditioning for `prompts` (a dict of batch-first tensors), as the pipeline makes it;
        `time_ids`: SDXL micro-conditioning of paired images (`ImageCaptionDataset`'s), else a generated square."""
        if getattr(self, "_pipe", None) is None:
            self._pipe = self.make_pipeline()
            self._pipe.set_progress_bar_config(disable=True)
        return self.fam.encode(self._pipe, prompts, device, resolution, time_ids=time_ids)

    def native_resolution(self) -> int:
        """The size the teacher's pipeline generates by default: the denoiser's sample size times the VAE's
        downsampling (SD 1.5: 64 x 8 = 512; SDXL, PixArt-XL, SD3: 128 x 8 = 1024)."""
        size = self.unet.config.sample_size
        size = size if isinstance(size, int) else size[0]
        return int(size) * 2 ** (len(self.vae.config.block_out_channels) - 1)

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder, *self.extra.values())
                if isinstance(m, torch.nn.Module)]

    def to_weight_dtype(self, device, dtype: torch.dtype) -> None:
        """Freeze the teacher's denoiser, text encoders and VAE and move them to `device` in `dtype` (one dtype)."""
        for m in self.modules():
            m.requires_grad_(False)
            m.eval()
            m.to(device=device, dtype=dtype)

    def float32_components(self) -> dict[str, Any]:
        """`pipeline_components()` with the text encoders and VAE in float32, reloaded from the teacher when
        training holds them in a lower precision (a saved student pipeline has one dtype throughout)."""
        parts = self.pipeline_components(student=True)
        if all(m.dtype == torch.float32 for m in self.modules() if m is not self.unet):
            return parts
        kw = {"revision": self.revision, "variant": self.variant}
        vae = load_vae(self.vae_name_or_path).float() if self.vae_name_or_path else None
        if self.family is not None and self.family.name != "sd":
            fresh, _ = self.family.load_parts(self.name_or_path, self.revision, self.variant, self.pipeline_class)
            return {**fresh, "scheduler": parts["scheduler"], **({"vae": vae} if vae is not None else {})}
        from diffusers import AutoencoderKL
        from transformers import AutoModel

        if self.vae.dtype != torch.float32:
            parts["vae"] = vae or AutoencoderKL.from_pretrained(self.name_or_path, subfolder="vae", **kw).float()
        if self.text_encoder.dtype != torch.float32:
            parts["text_encoder"] = AutoModel.from_pretrained(self.name_or_path, subfolder="text_encoder",
                                                              trust_remote_code=False, **kw).float()
        return parts


def load_vae(name_or_path: str):
    """An `AutoencoderKL` from a VAE folder or Hub repo (its root, or the `vae` subfolder of a pipeline), e.g.
    an SDXL VAE that stays finite in float16 (diffusers' `--pretrained_vae_model_name_or_path`)."""
    from diffusers import AutoencoderKL

    sub = "vae" if os.path.isfile(os.path.join(name_or_path, "vae", "config.json")) else None
    return AutoencoderKL.from_pretrained(name_or_path, subfolder=sub)


def load_teacher(name_or_path: str, revision: str | None = None, variant: str | None = None,
                 vae: str | None = None) -> TeacherParts:
    """Load a teacher's parts: its pipeline class (model_index.json) picks the family (`families.py`).

    SD 1.x/2.x teachers load part by part (any transformers text encoder; never remote code). `vae`: a VAE
    folder or repo that replaces the teacher's (in training, validation and the saved student pipeline)."""
    from .families import FAMILIES, family_of, read_pipeline_class

    family = family_of(name_or_path, revision)
    if family.name != "sd":
        pipeline_class = read_pipeline_class(name_or_path, revision)
        parts, noise_scheduler = family.load_parts(name_or_path, revision, variant, pipeline_class)
        parts[family.denoiser] = family.load_denoiser(name_or_path, revision, variant)
        if vae:
            parts["vae"] = load_vae(vae)
        return TeacherParts.from_components(family, parts, noise_scheduler, name_or_path, revision=revision,
                                            variant=variant, pipeline_class=pipeline_class, vae_name_or_path=vae)
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import AutoModel, AutoTokenizer

    kw = {"revision": revision}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, subfolder="tokenizer", trust_remote_code=False, **kw)
    text_encoder = AutoModel.from_pretrained(name_or_path, subfolder="text_encoder", variant=variant,
                                             trust_remote_code=False, **kw)
    autoencoder = (load_vae(vae) if vae else
                   AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", variant=variant, **kw))
    unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder="unet", variant=variant, **kw)
    scheduler = DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", **kw)
    return TeacherParts(unet, autoencoder, text_encoder, tokenizer, scheduler, name_or_path, revision, variant,
                        family=FAMILIES["sd"], vae_name_or_path=vae)


def make_student(teacher_unet, architecture: str, width_scale: float = 1.0, pretrained: str | None = None,
                 family=None, num_blocks: int | None = None, keep_blocks: list[int] | None = None):
    """A compressed student initialised from the teacher's denoiser (BK/KOALA UNets, block-subset transformers,
    by `family`; default SD), or a pretrained student. Returns (model, report).

    The student is float32 (the master weights under mixed precision); the teacher is left as it is. Build
    the student before casting the teacher to a lower precision, so that it starts from the full weights.
    """
    from .families import FAMILIES

    family = family or FAMILIES["sd"]
    if pretrained:
        cls = type(teacher_unet)
        sub = family.denoiser if os.path.isdir(os.path.join(pretrained, family.denoiser)) else None
        model = cls.from_pretrained(pretrained, subfolder=sub)
        for key in ("cross_attention_dim", "caption_channels", "joint_attention_dim"):
            mine, theirs = model.config.get(key), teacher_unet.config.get(key)
            if mine != theirs:
                raise ValueError(f"student {pretrained!r} has {key} {mine} but the teacher has {theirs}; the student "
                                 "must share the teacher's text encoder")
        return model.to(torch.float32), f"loaded pretrained student {pretrained}"
    return family.build_student(teacher_unet, architecture, width_scale, num_blocks=num_blocks,
                                keep_blocks=keep_blocks)


class FeatureMappingError(ValueError):
    """Feature KD was asked for (--lambda_kd_feat > 0) but the teacher and student have no BK feature pairs."""


def feature_mapping(teacher, student, architecture: str, family=None, keep_blocks: list[int] | None = None,
                    taps: str = "auto") -> dict[str, str]:
    """The feature pairs (teacher module -> student module) for feature KD: stage outputs or self-attention
    outputs for UNet students (BK, KOALA; `taps`, see `families.Family.feature_mapping`), kept block outputs for
    transformer students.

    Raises `FeatureMappingError` when the models do not have the structure the pairs need, rather than turning
    feature KD off without a word: pass `--lambda_kd_feat 0` for output KD only.
    """
    from .families import FAMILIES

    family = family or FAMILIES["sd"]
    hint = f"pass --lambda_kd_feat 0 to distil with output KD only ({architecture} student)"
    try:
        mapping = family.feature_mapping(teacher, student, architecture, keep_blocks, taps=taps)
    except (ValueError, KeyError) as e:
        raise FeatureMappingError(f"feature KD needs feature pairs, but none fit these models ({e}); {hint}") from None
    names_t = dict(teacher.named_modules())
    names_s = dict(student.named_modules())
    missing = [f"{t} -> {s}" for t, s in mapping.items() if t not in names_t or s not in names_s]
    if missing or not mapping:
        raise FeatureMappingError(f"feature KD pairs not found in the models: {missing or 'none defined'}; {hint}")
    return mapping


def _input_dtype(model) -> torch.dtype:
    """The dtype a model's inputs must have: that of its frozen weights when it has any (the base of a LoRA
    student in the weight dtype, beside float32 adapters), else that of its first parameter."""
    params = list(model.parameters())
    frozen = [p for p in params if not p.requires_grad and p.is_floating_point()]
    return (frozen or params)[0].dtype


def feature_projections(teacher, student, mapping: dict[str, str], device=None, family=None, cond=None):
    """1x1 projections for the feature pairs whose widths differ (e.g. --student_width_scale < 1), else None.

    The widths are read from one forward pass of each model through `family` (`families.Family`, default
    SD 1.x/2.x) on `cond`, the conditioning of one prompt (`TeacherParts.encode`; default: zero SD hidden
    states).
    """
    from functools import partial

    from .distillation import FeatureProjections, infer_feature_channels
    from .families import FAMILIES

    if not mapping:
        return None
    family = family or FAMILIES["sd"]
    cfg = teacher.config
    size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
    x = torch.zeros(1, cfg.in_channels, size, size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    if cond is None:
        cond = {"encoder_hidden_states": torch.zeros(1, 4, cfg.cross_attention_dim, device=device)}
    ch_t, ch_s = (
        infer_feature_channels(model, names, forward=partial(family.predict, model, x.to(dtype), t,
                                                             family.cast(cond, dtype)))
        for model, names, dtype in ((teacher, list(mapping), _input_dtype(teacher)),
                                    (student, list(mapping.values()), _input_dtype(student))))
    if all(ch_t[a] == ch_s[b] for a, b in mapping.items()):
        return None
    return FeatureProjections(mapping, ch_t, ch_s).to(device)


# ------------------------------------------------------------------------------------------ EMA


EMA_DIR = "unet_ema"


def make_ema(student, decay: float, foreach: bool = False, offload: bool = False):
    """diffusers' `EMAModel` over the student's trainable parameters (`--use_ema`, `--foreach_ema`,
    `--offload_ema`). A full student's EMA knows its model class and config, so checkpoints hold it in
    diffusers' `unet_ema/` layout; with `offload` the shadow weights live on the CPU between updates."""
    from diffusers.training_utils import EMAModel

    params = [p for p in student.parameters() if p.requires_grad]
    full = len(params) == len(list(student.parameters()))
    ema = EMAModel(params, decay=decay, foreach=foreach, model_cls=type(student) if full else None,
                   model_config=student.config if full else None)
    if offload:
        ema.to("cpu")
    return ema


def ema_step(ema, params, device, offload: bool = False) -> None:
    """One EMA update after an optimizer step; with `offload` the shadow weights visit `device` for it and
    go back to the CPU (diffusers' `--offload_ema`)."""
    if offload:
        ema.to(device=device, non_blocking=True)
    ema.step(params)
    if offload:
        ema.to(device="cpu", non_blocking=True)


def register_ema_hooks(accelerator, ema, foreach: bool = False) -> None:
    """Save/load the EMA inside accelerate checkpoints, as diffusers' training scripts do: `unet_ema/` is a
    `UNet2DConditionModel` folder (loadable with `EMAModel.from_pretrained(path, UNet2DConditionModel)`) for a
    full student; for a LoRA student it holds the adapter shadow weights by parameter index
    (`shadow_params.safetensors`) and `ema_config.json`. Checkpoints of earlier versions (`ema.safetensors`)
    still load."""
    from safetensors.torch import load_file, save_file

    def save_hook(models, weights, output_dir):
        if not accelerator.is_main_process:
            return
        path = os.path.join(output_dir, EMA_DIR)
        if ema.model_cls is not None:
            ema.save_pretrained(path)
            return
        os.makedirs(path, exist_ok=True)
        save_file({f"p{i}": t.detach().contiguous().cpu() for i, t in enumerate(ema.shadow_params)},
                  os.path.join(path, "shadow_params.safetensors"))
        state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
        with open(os.path.join(path, "ema_config.json"), "w") as fh:
            json.dump(state, fh, indent=1)

    def load_hook(models, input_dir):
        path = os.path.join(input_dir, EMA_DIR)
        legacy = os.path.join(input_dir, "ema.safetensors")
        if ema.model_cls is not None and os.path.isdir(path):
            from diffusers.training_utils import EMAModel

            loaded = EMAModel.from_pretrained(path, ema.model_cls, foreach=foreach)
            shadow = loaded.shadow_params
            state = {k: v for k, v in loaded.state_dict().items() if k != "shadow_params"}
        else:
            tensors = load_file(os.path.join(path, "shadow_params.safetensors") if os.path.isdir(path) else legacy)
            shadow = [tensors[f"p{i}"] for i in range(len(ema.shadow_params))]
            cfg = os.path.join(path, "ema_config.json") if os.path.isdir(path) else legacy.replace(".safetensors", ".json")
            with open(cfg) as fh:
                state = json.load(fh)
        for t, src in zip(ema.shadow_params, shadow):
            t.data.copy_(src.to(t.device, t.dtype))
        ema.optimization_step = int(state["optimization_step"])

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


# ------------------------------------------------------------------------------------------ optimizer, attention


def make_optimizer(params, lr: float, betas: tuple[float, float], weight_decay: float, eps: float,
                   use_8bit_adam: bool = False):
    """AdamW, or bitsandbytes' 8-bit AdamW (`--use_8bit_adam`) with the same settings."""
    cls = torch.optim.AdamW
    if use_8bit_adam:
        cls = require_bitsandbytes().optim.AdamW8bit
    return cls(params, lr=lr, betas=betas, weight_decay=weight_decay, eps=eps)


def require_bitsandbytes():
    """The bitsandbytes module, or a clear error saying how to get it (checked before the models load)."""
    try:
        import bitsandbytes
    except ImportError:
        raise ImportError("--use_8bit_adam needs bitsandbytes, which is not installed: `pip install bitsandbytes` "
                          "(CUDA only), or drop --use_8bit_adam") from None
    return bitsandbytes


def require_xformers() -> None:
    """A clear error when `--enable_xformers_memory_efficient_attention` is asked for without xformers."""
    from diffusers.utils import is_xformers_available

    if not is_xformers_available():
        raise ValueError("--enable_xformers_memory_efficient_attention: xformers is not installed "
                         "(`pip install xformers`, CUDA only); drop the flag to use PyTorch's own attention")


def enable_xformers(*unets) -> None:
    """Memory-efficient attention for every given UNet (teacher and student)."""
    require_xformers()
    for unet in unets:
        unet.enable_xformers_memory_efficient_attention()


def student_init_unet(teacher: TeacherParts, non_ema_revision: str | None = None):
    """The UNet the student is built from: the teacher's, or the teacher repository's UNet at
    `non_ema_revision` (diffusers' `--non_ema_revision`: the non-EMA weights, better to train from) while the
    frozen teacher keeps `--revision`."""
    if non_ema_revision is None or non_ema_revision == teacher.revision:
        return teacher.unet
    return teacher.fam.load_denoiser(teacher.name_or_path, revision=non_ema_revision)


# ------------------------------------------------------------------------------------------ pool, regions


def load_pool(source: str, column: str | None = None, split: str = "train", builtin_size: int = 4000, seed: int = 0):
    """The prompt pool and, for the built-in pool, each prompt's group. Returns (Dataset, groups or None)."""
    import datasets

    if source == "builtin":
        from .builtin_pool import builtin_prompt_pool

        ds = builtin_prompt_pool(num_prompts=builtin_size, seed=seed)
        if not isinstance(ds, datasets.Dataset):
            ds = datasets.Dataset.from_list(list(ds))
        groups = list(ds["group"]) if "group" in ds.column_names else None
        return load_prompt_pool(ds, "prompt"), groups
    if os.path.exists(source):
        return load_prompt_pool(source, column), None
    from .pool import PromptPoolError
    from .preflight import looks_like_local_path

    if looks_like_local_path(source):  # never sent to the Hub, where a missing name costs ~50 s of retries
        raise PromptPoolError(f"prompt pool {source!r} does not exist (looked for {os.path.abspath(source)}); pass an "
                              "existing prompt file or folder, 'builtin', or a Hub dataset name like 'owner/name'")
    ds = datasets.load_dataset(source, split=split)
    return load_prompt_pool(ds, column), None


def load_regions(regions_dir: str, pool, overwrite: bool = False, check=None, **build_kwargs):
    """The regions in `regions_dir` when they were built from `pool` with these settings, else built and saved.

    A saved folder is reused only when its pool fingerprint and its build settings (`num_regions`, `embedder`,
    `seed`, `method`, `min_region_size`) match this call's. Otherwise it raises `RegionsMismatchError` naming
    each setting that differs, or, with `overwrite=True` (for regions inside a run's own output folder when
    --overwrite_output_dir is given), builds the regions again and replaces the folder. `check` limits the
    compared settings to these names (e.g. `()` for regions the user built and named: only the pool must
    match, whatever seed or K this run would have used to build its own).
    """
    import logging

    from .regions import CONFIG_NAME, ConditionRegions, RegionsMismatchError

    if not os.path.isfile(os.path.join(regions_dir, CONFIG_NAME)):
        return load_or_build_regions(regions_dir, pool, **build_kwargs)
    regions = ConditionRegions.load(regions_dir)
    try:
        regions.check_pool(pool)
    except RegionsMismatchError as err:
        if not overwrite:
            raise
        differ = [f"the prompt pool ({err})"]
    else:
        differ = [f"{k} {old!r} (this run: {new!r})" for k, old, new in regions.setting_differences(build_kwargs, check)]
        if not differ:
            return regions
        if not overwrite:
            raise RegionsMismatchError(
                f"the regions in {regions_dir!r} were built with other settings than this run's: {'; '.join(differ)}. "
                "Pass --overwrite_output_dir to build them again (regions inside the output folder), or point "
                "--regions_dir to regions built with these settings (`diffusers-aria regions build`)")
    logging.getLogger(__name__).warning("rebuilding the regions in %s (overwrite): %s", regions_dir, "; ".join(differ))
    from .regions import build_regions

    del regions  # the old folder's region ids are memory-mapped
    rebuilt = build_regions(pool, **build_kwargs)
    rebuilt.save(regions_dir)
    return rebuilt


class RankMismatchError(RuntimeError):
    """The processes of one run hold different pools, regions or seeds."""


def run_fingerprint(pool, regions, seed: int) -> dict[str, str]:
    """What every rank of a run must share: the pool's content, the regions, K and the seed (as short hashes)."""
    import hashlib

    ids = np.ascontiguousarray(np.asarray(regions.region_ids))
    return {"pool": pool_fingerprint(pool), "regions": hashlib.sha256(ids.tobytes()).hexdigest()[:16],
            "num_regions": str(regions.num_regions), "seed": str(int(seed))}


def agreement_error(per_rank: list[dict[str, str]]) -> str | None:
    """A message naming what differs between the ranks' `run_fingerprint`s, or None when they agree."""
    for key in per_rank[0]:
        values = [fp[key] for fp in per_rank]
        if len(set(values)) > 1:
            shown = "; ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            return (f"the processes disagree on the {key} ({shown}). Every rank must load the same prompt pool and "
                    "regions with the same --seed: on several machines without a shared filesystem, build the regions "
                    "once (`diffusers-aria regions build`) and copy that folder to every machine as --regions_dir")
    return None


def check_ranks_agree(accelerator, pool, regions, seed: int) -> None:
    """At start-up: raise `RankMismatchError` when the ranks' pools, regions, K or seeds differ (gathered)."""
    if accelerator.num_processes <= 1:
        return
    from accelerate.utils import gather_object

    message = agreement_error(gather_object([run_fingerprint(pool, regions, seed)]))
    if message:
        raise RankMismatchError(message)


# ------------------------------------------------------------------------------------------ paired data


def paired_dataset(args, pool, regions, teacher: TeacherParts, accelerator):
    """The paired training rows: teacher-generated latents (--image_free) or an image/caption dataset."""
    from .data import ImageCaptionDataset, LatentCaptionDataset, load_image_caption_dataset
    from .pool import get_prompts

    if args.image_free:
        from .data import load_or_generate_teacher_latents

        n = min(args.num_teacher_latents, len(pool))
        idx = np.sort(np.random.default_rng(args.seed).choice(len(pool), size=n, replace=False))
        prompts = get_prompts(pool, idx)
        pipe = teacher.make_pipeline()
        pipe.set_progress_bar_config(disable=True)
        # reused only when every setting matches (else a StaleCacheError naming it); made again on overwrite
        latents = load_or_generate_teacher_latents(
            os.path.join(args.output_dir, "teacher_latents"), pipe, prompts, idx,
            fingerprint={"pool": pool_fingerprint(pool)}, overwrite=bool(getattr(args, "overwrite_output_dir", False)),
            num_inference_steps=args.teacher_inference_steps, guidance_scale=args.teacher_guidance_scale,
            height=args.resolution, width=args.resolution, seed=args.seed, progress=accelerator.is_local_main_process,
            pipeline_kwargs=teacher.fam.call_kwargs())
        return LatentCaptionDataset(latents, prompts, np.asarray(regions.region_ids)[idx])
    ds = load_image_caption_dataset(args.dataset_name, args.train_data_dir, args.dataset_config_name, args.revision,
                                    args.cache_dir, args.max_train_samples, args.seed)
    data = ImageCaptionDataset(ds, args.image_column, args.caption_column, args.resolution, args.center_crop,
                               args.random_flip, args.seed,
                               interpolation=getattr(args, "image_interpolation_mode", "lanczos"))
    data.region_ids = regions.assign(data.captions())
    return data


# ------------------------------------------------------------------------------------------ outputs


def loggable_config(args) -> dict[str, Any]:
    """The run's flags for trackers: scalars only, no secrets (the secret names of `hub.is_secret_key`)."""
    from .hub import is_secret_key

    out = {}
    for k, v in vars(args).items():
        if is_secret_key(k):
            continue
        out[k] = v if isinstance(v, (int, float, str, bool)) or v is None else str(v)
        if out[k] is None:
            out[k] = "None"
    return out


def save_student_pipeline(output_dir: str, student, teacher: TeacherParts, lora: bool = False) -> None:
    """Write a pipeline folder of the teacher's class with the student denoiser into `output_dir` (plus LoRA
    weights), loadable with `DiffusionPipeline.from_pretrained(output_dir)`.

    With `lora=True` the pipeline holds the base student and `pytorch_lora_weights.safetensors` its adapters,
    loadable with `pipe.load_lora_weights(output_dir)` (PixArt: `pipe.transformer.load_lora_adapter`). The
    pipeline is float32 throughout, whatever the training precision: load it with `torch_dtype=` to run it in
    half precision.
    """
    from .distillation import base_state_dict

    tmp = os.path.join(output_dir, ".pipeline.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model = student
    if lora:
        model = type(student).from_config(student.config)
        model.load_state_dict(base_state_dict(student))
    teacher.make_pipeline(model, teacher.float32_components()).save_pretrained(tmp)
    if lora:
        teacher.fam.save_lora(student, tmp)
    for name in os.listdir(tmp):
        dst = os.path.join(output_dir, name)
        if os.path.isdir(dst):
            shutil.rmtree(dst)
        os.replace(os.path.join(tmp, name), dst)
    shutil.rmtree(tmp, ignore_errors=True)


def gather_state_hashes(accelerator, callback) -> list[str]:
    """A sha256 of the ARIA state on every rank (they must all be equal), gathered to every rank."""
    import hashlib

    from accelerate.utils import gather_object

    from .callback import flatten_state

    tensors, plain = flatten_state(callback.state_dict())
    h = hashlib.sha256(json.dumps(plain, sort_keys=True).encode())
    for k in sorted(tensors):
        h.update(k.encode())
        h.update(tensors[k].contiguous().numpy().tobytes())
    return gather_object([h.hexdigest()]) if accelerator.num_processes > 1 else [h.hexdigest()]


def write_run_info(output_dir: str, **info) -> None:
    """`run_info.json`: how the run went (processes, steps, ...), for people and tests."""
    atomic_write_json(os.path.join(output_dir, "run_info.json"), info)


def write_card(args, report_paths: dict, validation_image: str | None, settings, init_report,
               device: str = "cuda", teacher: TeacherParts | None = None) -> str:
    """The model card: license from --license or the teacher's card, usage in the run's precision on `device`,
    with the teacher's pipeline class."""
    from .model_card import write_model_card

    pipeline_class = (teacher.pipeline_class if teacher is not None else None) or "StableDiffusionPipeline"
    lora_load = teacher.fam.lora_usage if teacher is not None else None

    with open(report_paths["json"]) as fh:
        report = json.load(fh)
    report.pop("history", None)
    teacher_report = None
    tr = os.path.join(args.pretrained_model_name_or_path, TEACHER_REPORT)
    if os.path.isfile(tr):
        with open(tr) as fh:
            teacher_report = json.load(fh)
    dtype = {"fp16": "float16", "bf16": "bfloat16"}.get(args.mixed_precision or "no", "float32")
    return write_model_card(
        args.output_dir, base_model=args.pretrained_model_name_or_path, repo_id=args.hub_model_id,
        architecture=args.student_architecture, student_mode=args.student_mode, aria_settings=settings.to_dict(),
        aria_report=report, validation_image=validation_image, allocation_plot=report_paths.get("plot"),
        train_settings={**loggable_config(args), "student_init": str(init_report)},
        teacher_report=teacher_report, license=args.license, torch_dtype=dtype, device=device,
        pipeline_class=pipeline_class, lora_load=lora_load)


def end_run(accelerator) -> None:
    """`accelerator.end_training()` in an order that cannot deadlock gloo at exit.

    Call it after the last reference to the prepared (DDP-wrapped) models is gone from the caller. DDP's C++
    `Reducer` holds the process group. When the Reducer is the group's last owner, the group is destroyed
    with the GIL held, and its destructor joins gloo's worker threads, one of which may be waiting for the
    GIL to free the tensors of a finished collective (pytorch/pytorch#56297): an intermittent hang of
    a rank at exit, after all of its outputs are written. Here every rank arrives together, the accelerator
    drops its references to the models, and the last owner of the group is its Python handle, whose
    destructor releases the GIL.
    """
    import gc

    accelerator.wait_for_everyone()
    group = torch.distributed.group.WORLD if torch.distributed.is_initialized() else None
    accelerator.free_memory()
    gc.collect()
    accelerator.end_training()
    del group
