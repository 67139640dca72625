"""Model families: how a teacher of each pipeline class is loaded, conditioned, called, noised and saved.

The sampler, tracker, policy and callback do not care what they distil; this module holds everything that
does. A teacher folder's `model_index.json` names its pipeline class, which selects the family:

| family   | pipelines                                     | denoiser                    | training noise      |
|----------|-----------------------------------------------|-----------------------------|---------------------|
| `sd`     | `StableDiffusionPipeline` (SD 1.x / 2.x)      | `UNet2DConditionModel`      | DDPM (`add_noise`)  |
| `sdxl`   | `StableDiffusionXLPipeline`                   | `UNet2DConditionModel`      | DDPM                |
| `pixart` | `PixArtAlphaPipeline`, `PixArtSigmaPipeline`  | `PixArtTransformer2DModel`  | DDPM                |
| `sd3`    | `StableDiffusion3Pipeline`                    | `SD3Transformer2DModel`     | rectified flow      |

Conditioning is computed by the teacher pipeline's own `encode_prompt` (SDXL: both text encoders, pooled
embeddings and `add_time_ids`; PixArt: T5 states and their attention mask; SD3: the joint CLIP+T5 stream and
pooled projections), so a swapped prompt gets exactly what the pipeline would give it at inference.

Only the standard library is imported at module level: `preflight` reads `PIPELINE_FAMILIES` before any
heavy import.
"""

from __future__ import annotations

import json
import os
from typing import Any

#: model_index.json `_class_name` -> family name
PIPELINE_FAMILIES: dict[str, str] = {
    "StableDiffusionPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "PixArtAlphaPipeline": "pixart",
    "PixArtSigmaPipeline": "pixart",
    "StableDiffusion3Pipeline": "sd3",
}

UNET_STUDENTS = ("bk_base", "bk_small", "bk_tiny")
SDXL_STUDENTS = UNET_STUDENTS + ("koala_1b", "koala_700m")
DIT_STUDENTS = ("dit_every_other", "dit_first_last")
#: every --student_architecture any family takes
ALL_STUDENTS = SDXL_STUDENTS + DIT_STUDENTS
#: --feature_kd_taps choices
FEATURE_TAPS = ("auto", "stages", "self_attention", "all")


def read_pipeline_class(name_or_path: str, revision: str | None = None) -> str:
    """The `_class_name` of a pipeline folder's (or Hub repository's) `model_index.json`."""
    local = os.path.join(name_or_path, "model_index.json")
    if os.path.isfile(local):
        with open(local) as fh:
            return json.load(fh).get("_class_name", "")
    from diffusers import DiffusionPipeline

    return DiffusionPipeline.load_config(name_or_path, revision=revision).get("_class_name", "")


def family_name_for(pipeline_class: str, where: str = "the teacher") -> str:
    """The family of a pipeline class, or a ValueError naming the class and the supported ones."""
    if pipeline_class not in PIPELINE_FAMILIES:
        raise ValueError(f"{where} is a {pipeline_class or 'pipeline without a _class_name'!s}, which diffusers-aria "
                         f"cannot distil; supported pipelines: {', '.join(PIPELINE_FAMILIES)}")
    return PIPELINE_FAMILIES[pipeline_class]


def _cast(value: Any, dtype) -> Any:
    """`value` with its floating-point tensors in `dtype` (dicts and None pass through)."""
    import torch

    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.is_floating_point():
        return value.to(dtype)
    return value


class FlowMatchingNoise:
    """Rectified-flow noising for SD3-class teachers, behind the DDPM scheduler's training interface.

    Integer timesteps t in [0, N) map to sigma = shift * s / (1 + (shift - 1) * s), s = (t + 1) / N (the
    sigmas of `FlowMatchEulerDiscreteScheduler`); x_t = (1 - sigma) x_0 + sigma * noise, the model sees
    `sigma * N` as its timestep and predicts the velocity `noise - x_0` (prediction type "flow_matching").
    ARIA's timestep bins use the integer t, as for DDPM teachers.
    """

    class _Config(dict):
        __getattr__ = dict.__getitem__

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0) -> None:
        self.config = self._Config(num_train_timesteps=int(num_train_timesteps), shift=float(shift),
                                   prediction_type="flow_matching")

    @classmethod
    def from_scheduler(cls, scheduler) -> FlowMatchingNoise:
        cfg = scheduler.config
        return cls(cfg.get("num_train_timesteps", 1000), cfg.get("shift", 1.0))

    def register_to_config(self, **kwargs) -> None:
        if kwargs.get("prediction_type", "flow_matching") != "flow_matching":
            raise ValueError(f"prediction_type {kwargs['prediction_type']!r}: a rectified-flow teacher predicts a "
                             "velocity; --prediction_type does not apply to it")

    def sigmas(self, timesteps):
        import torch

        n, shift = self.config["num_train_timesteps"], self.config["shift"]
        s = (timesteps.to(torch.float32) + 1) / n
        return shift * s / (1 + (shift - 1) * s)

    @property
    def alphas_cumprod(self):
        """The clean latent's share of x_t's variance at each integer timestep, (1 - sigma)^2 / ((1 - sigma)^2 +
        sigma^2): the role DDPM's `alphas_cumprod` plays (ARIA's `--aria_feed congruent` reads it)."""
        import torch

        sigma = self.sigmas(torch.arange(self.config["num_train_timesteps"])).double()
        return (1 - sigma) ** 2 / ((1 - sigma) ** 2 + sigma ** 2)

    def add_noise(self, latents, noise, timesteps):
        sigma = self.sigmas(timesteps).to(latents.device).reshape(-1, *([1] * (latents.dim() - 1)))
        return ((1 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)

    def model_timesteps(self, timesteps):
        return self.sigmas(timesteps) * self.config["num_train_timesteps"]


class Family:
    """What a teacher family does, with SD 1.x/2.x's answers; each family overrides what differs."""

    name = "sd"
    denoiser = "unet"  # the pipeline's attribute and subfolder for the model that is distilled
    pipeline_classes = ("StableDiffusionPipeline",)
    students: tuple[str, ...] = UNET_STUDENTS
    default_student = "bk_small"
    flow_matching = False

    # --- loading ---------------------------------------------------------------------------------------

    def pipeline_class(self, name: str | None = None):
        import diffusers

        return getattr(diffusers, name or self.pipeline_classes[0])

    def denoiser_class(self):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel

    def load_parts(self, name_or_path: str, revision: str | None, variant: str | None,
                   pipeline_class: str | None = None) -> tuple[dict[str, Any], Any]:
        """Every pipeline part but the denoiser, and the training noise scheduler (DDPM, built from the
        teacher's scheduler config, as diffusers' training scripts do)."""
        from diffusers import DDPMScheduler

        pipe = self.pipeline_class(pipeline_class).from_pretrained(name_or_path, revision=revision, variant=variant,
                                                                   **{self.denoiser: None})
        parts = {k: v for k, v in pipe.components.items() if k != self.denoiser}
        return parts, DDPMScheduler.from_pretrained(name_or_path, subfolder="scheduler", revision=revision)

    def load_denoiser(self, name_or_path: str, revision: str | None = None, variant: str | None = None):
        kw = {"variant": variant} if variant is not None else {}
        return self.denoiser_class().from_pretrained(name_or_path, subfolder=self.denoiser, revision=revision, **kw)

    def make_pipeline(self, components: dict[str, Any], denoiser, pipeline_class: str | None = None):
        """A pipeline of the family made of `components` (all parts but the denoiser) and `denoiser`."""
        return self.pipeline_class(pipeline_class)(**components, **{self.denoiser: denoiser})

    def call_kwargs(self) -> dict[str, Any]:
        """Extra keyword arguments for the pipeline's `__call__`."""
        return {}

    # --- conditioning and the denoiser call --------------------------------------------------------------

    def encode(self, pipe, prompts: list[str], device, resolution: int, time_ids=None) -> dict[str, Any]:
        """The denoiser's conditioning for `prompts`, batch first, as the pipeline computes it; `time_ids`:
        SDXL's per-sample micro-conditioning of paired images ([B, 6]; other families ignore it)."""
        return {"encoder_hidden_states": encode_prompts(pipe.text_encoder, pipe.tokenizer, prompts, device)}

    def predict(self, model, noisy, timesteps, cond: dict[str, Any]):
        """The denoiser's prediction for (x_t, t, c) in its training parametrisation."""
        return model(noisy, timesteps, cond["encoder_hidden_states"]).sample

    def model_timesteps(self, noise_scheduler, timesteps):
        return timesteps

    def cast(self, cond: dict[str, Any], dtype) -> dict[str, Any]:
        return _cast(cond, dtype)

    # --- students ------------------------------------------------------------------------------------------

    def check_student(self, architecture: str) -> None:
        if architecture not in self.students:
            raise ValueError(f"--student_architecture {architecture!r} does not fit a {self.name} teacher "
                             f"({self.pipeline_classes[0]}); choose one of {', '.join(self.students)}")

    def build_student(self, teacher, architecture: str, width_scale: float = 1.0, num_blocks: int | None = None,
                      keep_blocks: list[int] | None = None):
        import torch

        from ..distillation import build_student

        self.check_student(architecture)
        if num_blocks is not None or keep_blocks:
            raise ValueError("--student_num_blocks / --student_keep_blocks apply to transformer students "
                             f"({', '.join(DIT_STUDENTS)}), not to {architecture!r}")
        return build_student(teacher, architecture, width_scale, dtype=torch.float32)

    def feature_mapping(self, teacher, student, architecture: str, keep_blocks: list[int] | None = None,
                        taps: str = "auto") -> dict[str, str]:
        """Teacher module -> student module pairs for feature KD. UNet students (`taps`): "stages" (the output
        of every down/mid/up stage, BK-SDM), "self_attention" (every kept transformer block's self-attention,
        which KOALA found the most useful), "all" (both), "auto" (self-attention for koala_*, else stages)."""
        from ..distillation import default_feature_mapping, self_attention_mapping

        if taps not in FEATURE_TAPS:
            raise ValueError(f"--feature_kd_taps {taps!r} is not valid; choose one of {', '.join(FEATURE_TAPS)}")
        if taps == "auto":
            taps = "self_attention" if architecture.startswith("koala") else "stages"
        mapping = {}
        if taps in ("stages", "all"):
            mapping.update(default_feature_mapping(dict(teacher.config), dict(student.config), architecture))
        if taps in ("self_attention", "all"):
            mapping.update(self_attention_mapping(teacher, student, architecture))
        return mapping

    # --- saving ----------------------------------------------------------------------------------------------

    def save_lora(self, student, output_dir: str) -> None:
        from ..distillation import save_lora_weights

        save_lora_weights(student, output_dir)

    def lora_usage(self, model_ref: str) -> str:
        return f'pipe.load_lora_weights("{model_ref}")\n'

    def load_lora(self, pipe, path: str):
        """Load a LoRA student's adapter saved by `save_lora` into `pipe`; returns the adapted denoiser."""
        pipe.load_lora_weights(path)
        return getattr(pipe, self.denoiser)


class SDFamily(Family):
    def make_pipeline(self, components, denoiser, pipeline_class=None):
        from diffusers import StableDiffusionPipeline

        return StableDiffusionPipeline(unet=denoiser, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False, **components)


class SDXLFamily(Family):
    name = "sdxl"
    pipeline_classes = ("StableDiffusionXLPipeline",)
    students = SDXL_STUDENTS

    def encode(self, pipe, prompts, device, resolution, time_ids=None):
        import torch

        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        proj = pipe.text_encoder_2.config.projection_dim if pipe.text_encoder_2 is not None else pooled.shape[-1]
        if time_ids is None:  # original size, crop top-left, target size: a generated square (teacher latents)
            time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]]).repeat(len(prompts), 1)
        expected = pipe.unet.add_embedding.linear_1.in_features if pipe.unet is not None else None
        if expected is not None and expected != pipe.unet.config.addition_time_embed_dim * 6 + proj:
            raise ValueError(f"the SDXL UNet expects added embeddings of {expected}, but 6 time ids and pooled "
                             f"embeddings of {proj} make {pipe.unet.config.addition_time_embed_dim * 6 + proj}")
        return {"encoder_hidden_states": embeds, "text_embeds": pooled,
                "time_ids": time_ids.to(device=device, dtype=embeds.dtype)}

    def predict(self, model, noisy, timesteps, cond):
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        return model(noisy, timesteps, cond["encoder_hidden_states"], added_cond_kwargs=added).sample


class TransformerFamily(Family):
    """Diffusion-transformer teachers: block-subset students (`distillation.dit_students`) tapped per block."""

    denoiser = "transformer"
    students = DIT_STUDENTS
    default_student = "dit_every_other"

    def build_student(self, teacher, architecture, width_scale=1.0, num_blocks=None, keep_blocks=None):
        import torch

        from ..distillation.dit_students import build_dit_student

        self.check_student(architecture)
        if width_scale != 1.0:
            raise ValueError(f"--student_width_scale {width_scale}: transformer students keep the teacher's width "
                             "(they keep a subset of its blocks); leave it at 1")
        return build_dit_student(teacher, architecture, num_blocks=num_blocks, keep_blocks=keep_blocks,
                                 dtype=torch.float32)

    def feature_mapping(self, teacher, student, architecture, keep_blocks=None, taps="auto"):
        """The output of every kept transformer block (image tokens), paired with the teacher block it came from."""
        from ..distillation.dit_students import dit_block_indices, dit_feature_mapping

        if taps != "auto":
            raise ValueError(f"--feature_kd_taps {taps!r} applies to UNet students; transformer students tap the "
                             "output of every kept block (leave it at auto)")

        # the blocks the student kept, found again from its preset (dit_first_last: its own block count)
        num_blocks = student.config.num_layers if architecture == "dit_first_last" and not keep_blocks else None
        keep = dit_block_indices(teacher.config.num_layers, architecture, num_blocks=num_blocks,
                                 keep_blocks=keep_blocks)
        return dit_feature_mapping(keep)


class PixArtFamily(TransformerFamily):
    name = "pixart"
    pipeline_classes = ("PixArtAlphaPipeline", "PixArtSigmaPipeline")

    def denoiser_class(self):
        from diffusers import PixArtTransformer2DModel

        return PixArtTransformer2DModel

    def call_kwargs(self):
        # no caption cleaning (it needs bs4 and ftfy, and training encodes the raw prompt); no resolution
        # binning (its tables know only 256/512/1024-pixel models)
        return {"clean_caption": False, "use_resolution_binning": False}

    def encode(self, pipe, prompts, device, resolution, time_ids=None):
        embeds, mask, _, _ = pipe.encode_prompt(list(prompts), do_classifier_free_guidance=False, device=device,
                                                clean_caption=False)
        return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask}

    def predict(self, model, noisy, timesteps, cond):
        import torch

        cfg = model.config if hasattr(model, "config") else model.module.config
        added = {"resolution": None, "aspect_ratio": None}
        if cfg.sample_size == 128:  # as the pipeline: micro-conditions for the 1024px models
            n = noisy.shape[0]
            size = float(noisy.shape[-1] * 8)
            added = {"resolution": torch.tensor([[size, size]], device=noisy.device, dtype=noisy.dtype).repeat(n, 1),
                     "aspect_ratio": torch.ones(n, 1, device=noisy.device, dtype=noisy.dtype)}
        out = model(noisy, encoder_hidden_states=cond["encoder_hidden_states"],
                    encoder_attention_mask=cond["encoder_attention_mask"], timestep=timesteps,
                    added_cond_kwargs=added).sample
        if out.shape[1] == 2 * noisy.shape[1]:  # learned sigma: the first half is the noise prediction
            out = out[:, : noisy.shape[1]]
        return out

    def save_lora(self, student, output_dir):
        """PixArt pipelines have no `load_lora_weights` and its transformer has no diffusers adapter loader, so
        the adapter is saved in peft's own format (`adapter_config.json`, `adapter_model.safetensors`), which
        `peft.PeftModel.from_pretrained(pipe.transformer, output_dir)` loads."""
        from accelerate.utils import extract_model_from_parallel
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import save_file

        model = extract_model_from_parallel(student)
        model.peft_config[next(iter(model.peft_config))].save_pretrained(output_dir)
        state = {f"base_model.model.{k}": v.detach().contiguous().cpu()
                 for k, v in get_peft_model_state_dict(model).items()}
        save_file(state, os.path.join(output_dir, "adapter_model.safetensors"))

    def load_lora(self, pipe, path):
        from peft import PeftModel

        return PeftModel.from_pretrained(pipe.transformer, path).merge_and_unload()

    def lora_usage(self, model_ref):
        return ("from peft import PeftModel\n\n"
                f'pipe.transformer = PeftModel.from_pretrained(pipe.transformer, "{model_ref}").merge_and_unload()\n')


class SD3Family(TransformerFamily):
    name = "sd3"
    pipeline_classes = ("StableDiffusion3Pipeline",)
    flow_matching = True

    def denoiser_class(self):
        from diffusers import SD3Transformer2DModel

        return SD3Transformer2DModel

    def load_parts(self, name_or_path, revision, variant, pipeline_class=None):
        parts, _ = super().load_parts(name_or_path, revision, variant, pipeline_class)
        return parts, FlowMatchingNoise.from_scheduler(parts["scheduler"])

    def encode(self, pipe, prompts, device, resolution, time_ids=None):
        embeds, _, pooled, _ = pipe.encode_prompt(list(prompts), None, None, device=device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

    def predict(self, model, noisy, timesteps, cond):
        return model(hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
                     pooled_projections=cond["pooled_projections"]).sample

    def model_timesteps(self, noise_scheduler, timesteps):
        return noise_scheduler.model_timesteps(timesteps).to(timesteps.device)

    def save_lora(self, student, output_dir):
        from accelerate.utils import extract_model_from_parallel
        from diffusers import StableDiffusion3Pipeline
        from peft.utils import get_peft_model_state_dict

        model = extract_model_from_parallel(student)
        config = model.peft_config[next(iter(model.peft_config))]
        StableDiffusion3Pipeline.save_lora_weights(output_dir, transformer_lora_layers=get_peft_model_state_dict(model),
                                                   transformer_lora_adapter_metadata=config.to_dict())


FAMILIES: dict[str, Family] = {f.name: f for f in (SDFamily(), SDXLFamily(), PixArtFamily(), SD3Family())}


def family_of(name_or_path: str, revision: str | None = None) -> Family:
    """The family of a teacher pipeline folder or Hub repository, from its `model_index.json`."""
    return FAMILIES[family_name_for(read_pipeline_class(name_or_path, revision), f"--pretrained_model_name_or_path "
                                                                                  f"{name_or_path!r}")]


def encode_prompts(text_encoder, tokenizer, prompts: list[str], device=None, batch_size: int | None = None):
    """Encoder hidden states [B, L, D] for `prompts`, as `StableDiffusionPipeline.encode_prompt` makes them
    (the SD family's conditioning; `SDFamily.encode`).

    Prompts are padded/truncated to `tokenizer.model_max_length`; the attention mask is passed only when
    `text_encoder.config.use_attention_mask` is true (as the pipeline does). `batch_size` bounds memory.
    """
    import torch

    device = device or text_encoder.device
    use_mask = bool(getattr(text_encoder.config, "use_attention_mask", False))
    prompts = list(prompts)
    step = batch_size or max(len(prompts), 1)
    chunks = []
    with torch.no_grad():
        for start in range(0, len(prompts), step):
            tokens = tokenizer(prompts[start:start + step], padding="max_length",
                               max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt")
            mask = tokens.attention_mask.to(device) if use_mask else None
            chunks.append(text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0])
    return torch.cat(chunks)
