"""Paired training data for distillation, as a stream indexed by step.

Every batch is a pure function of `(seed, step, rank)`: row order comes from a keyed permutation per epoch,
noise and timesteps from a generator seeded by the step, and an image's random crop and flip (and the pick
among a row's captions) from `(seed, index, epoch)` - the sampler hands the dataset `(index, epoch)` pairs,
so this also holds in DataLoader worker processes. A run resumed at step s therefore sees exactly the
batches an uninterrupted run would, without any data-loader state in the checkpoint.

Sources: a `datasets` image/caption dataset (hub name or an imagefolder with a metadata file), or the
image-free mode of Random Conditioning, in which the teacher generates clean latents for a subset of the
prompt pool once at start (cached on disk as safetensors).
"""

from __future__ import annotations

import json
import operator
import os
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset

from ..rng import keyed_permutation, mix64_array
from ..utils.atomic import atomic_save, atomic_write_json


def split_key(key) -> tuple[int, int]:
    """`(row index, epoch)` of a dataset key: a plain row index (epoch 0) or an `(index, epoch)` pair."""
    if isinstance(key, (tuple, list)):
        if len(key) != 2:
            raise TypeError(f"a dataset key pair is (index, epoch), got {key!r}")
        return operator.index(key[0]), operator.index(key[1])
    try:
        return operator.index(key), 0
    except TypeError:
        raise TypeError(f"a dataset key is a row index or an (index, epoch) pair, got {key!r}") from None


class StepBatchSampler:
    """Batches of dataset keys for steps `start_step, start_step+1, ...` (infinite), this rank's slice.

    Global position p = step * global_batch + rank * batch_size + i; epoch e = p // num_rows; the row is a
    keyed permutation of the epoch, so every row is seen once per epoch across all ranks. Iteration yields
    `(row, epoch)` pairs, which `ImageCaptionDataset` and `LatentCaptionDataset` accept, so per-epoch
    augmentation needs no epoch attribute shared with the DataLoader's workers; `with_epoch=False` yields
    plain row indices instead, for a dataset that only takes ints.
    """

    def __init__(self, num_rows: int, batch_size: int, seed: int = 0, num_replicas: int = 1, rank: int = 0,
                 start_step: int = 0, with_epoch: bool = True) -> None:
        if num_rows < 1:
            raise ValueError("the paired dataset is empty; it needs at least one row")
        self.num_rows, self.batch_size = int(num_rows), int(batch_size)
        self.seed, self.num_replicas, self.rank = int(seed), int(num_replicas), int(rank)
        self.start_step, self.with_epoch = int(start_step), bool(with_epoch)

    def rows_and_epochs(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's row indices at `step` and the epoch each one belongs to (int64 arrays)."""
        g = self.batch_size * self.num_replicas
        pos = step * g + self.rank * self.batch_size + np.arange(self.batch_size, dtype=np.int64)
        epoch, within = pos // self.num_rows, pos % self.num_rows
        with np.errstate(over="ignore"):
            key = mix64_array(np.uint64(self.seed) * np.uint64(0x9E3779B97F4A7C15) + epoch.astype(np.uint64))
        return keyed_permutation(within, np.full(pos.shape, self.num_rows), key).astype(np.int64), epoch

    def indices(self, step: int) -> np.ndarray:
        """This rank's row indices at `step`."""
        return self.rows_and_epochs(step)[0]

    def keys(self, step: int) -> list:
        """The dataset keys of `step`: `(row, epoch)` pairs, or row indices when `with_epoch=False`."""
        rows, epochs = self.rows_and_epochs(step)
        return list(zip(rows.tolist(), epochs.tolist())) if self.with_epoch else rows.tolist()

    def __iter__(self) -> Iterator[list]:
        step = self.start_step
        while True:
            yield self.keys(step)
            step += 1


# --image_interpolation_mode (diffusers' names) -> PIL resampling filter used for the resize
INTERPOLATION_MODES = {"nearest": "NEAREST", "bilinear": "BILINEAR", "bicubic": "BICUBIC", "box": "BOX",
                       "hamming": "HAMMING", "lanczos": "LANCZOS"}


class ImageCaptionDataset(Dataset):
    """Rows of a `datasets.Dataset` as {pixel_values [3,H,W] in [-1,1], caption, region, index, time_ids}.

    `time_ids` are SDXL's micro-conditioning of the row: (original height, original width, crop top, crop
    left, target height, target width), the crop in the resized (and, when flipped, mirrored) image.

    A key is a row index or an `(index, epoch)` pair (as `StepBatchSampler` yields; a plain index is epoch
    0). Images are resized (shorter side to `resolution`, with the `interpolation` filter; diffusers'
    default lanczos) and cropped. The random crop (`center_crop=False`), the random flip and the pick of a list caption are drawn
    from `(seed, index, epoch)`: the same for the same key in any process, new every epoch.
    """

    def __init__(self, dataset, image_column: str, caption_column: str, resolution: int, center_crop: bool = True,
                 random_flip: bool = False, seed: int = 0, region_ids: np.ndarray | None = None,
                 interpolation: str = "lanczos") -> None:
        if interpolation not in INTERPOLATION_MODES:
            raise ValueError(f"image interpolation {interpolation!r} is not valid; choose one of "
                             f"{', '.join(INTERPOLATION_MODES)}")
        self.interpolation = interpolation
        for col in (image_column, caption_column):
            if col not in dataset.column_names:
                raise ValueError(f"column {col!r} not in the dataset; available columns: {dataset.column_names}")
        self.ds, self.image_column, self.caption_column = dataset, image_column, caption_column
        self.resolution, self.center_crop, self.random_flip, self.seed = resolution, center_crop, random_flip, seed
        self.region_ids = region_ids

    def __len__(self) -> int:
        return len(self.ds)

    def captions(self) -> list[str]:
        """One caption a row (the first of a list; used to assign regions)."""
        caps = self.ds[self.caption_column]
        return [c if isinstance(c, str) else (c[0] if c is not None and len(c) else "") for c in caps]

    def _rng(self, index: int, epoch: int, salt: int) -> np.random.Generator:
        # One stream per use (0 crop, 1 flip, 2 caption), so turning one on does not shift the others.
        return np.random.default_rng([self.seed, index, epoch, salt])

    def _image(self, image, index: int, epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The resized, cropped (and maybe flipped) image and its SDXL time ids."""
        from PIL import Image

        image = image.convert("RGB") if isinstance(image, Image.Image) else Image.open(image).convert("RGB")
        w, h = image.size
        original = (h, w)
        scale = self.resolution / min(w, h)
        image = image.resize((max(self.resolution, round(w * scale)), max(self.resolution, round(h * scale))),
                             Image.Resampling[INTERPOLATION_MODES[self.interpolation]])
        w, h = image.size
        if self.center_crop:
            left, top = (w - self.resolution) // 2, (h - self.resolution) // 2
        else:
            rng = self._rng(index, epoch, 0)
            left, top = int(rng.integers(0, w - self.resolution + 1)), int(rng.integers(0, h - self.resolution + 1))
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and self._rng(index, epoch, 1).random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
            left = w - left - self.resolution  # where the crop lies in the mirrored image
        arr = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
        time_ids = torch.tensor([*original, top, left, self.resolution, self.resolution], dtype=torch.float32)
        return arr.permute(2, 0, 1).contiguous(), time_ids

    def _caption(self, caption, index: int, epoch: int) -> str:
        """The caption itself, or one entry of a list of captions drawn from (seed, index, epoch)."""
        if isinstance(caption, str):
            return caption
        if caption is None or len(caption) == 0:
            return ""
        return caption[int(self._rng(index, epoch, 2).integers(len(caption)))]

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, epoch = split_key(key)
        row = self.ds[index]
        pixels, time_ids = self._image(row[self.image_column], index, epoch)
        return {"pixel_values": pixels, "caption": self._caption(row[self.caption_column], index, epoch),
                "region": int(self.region_ids[index]) if self.region_ids is not None else -1, "index": index,
                "time_ids": time_ids}


class LatentCaptionDataset(Dataset):
    """Rows of cached clean latents with their captions and regions (the image-free mode)."""

    def __init__(self, latents: torch.Tensor, captions: list[str], region_ids: np.ndarray) -> None:
        if not (len(latents) == len(captions) == len(region_ids)):
            raise ValueError("latents, captions and region ids must have the same length")
        self.latents, self._captions, self.region_ids = latents, captions, np.asarray(region_ids)

    def __len__(self) -> int:
        return len(self._captions)

    def captions(self) -> list[str]:
        return list(self._captions)

    def __getitem__(self, key: int | tuple[int, int]) -> dict:
        index, _ = split_key(key)  # no augmentation: the epoch does not change a row
        return {"latents": self.latents[index], "caption": self._captions[index],
                "region": int(self.region_ids[index]), "index": index}


def collate(rows: list[dict]) -> dict:
    out = {"caption": [r["caption"] for r in rows],
           "region": torch.tensor([r["region"] for r in rows], dtype=torch.long),
           "index": torch.tensor([r["index"] for r in rows], dtype=torch.long)}
    for key in ("pixel_values", "latents", "time_ids"):
        if key in rows[0]:
            out[key] = torch.stack([r[key] for r in rows])
    return out


def load_image_caption_dataset(dataset_name: str | None = None, train_data_dir: str | None = None,
                               dataset_config_name: str | None = None, revision: str | None = None,
                               cache_dir: str | None = None, max_train_samples: int | None = None, seed: int = 0):
    """A `datasets.Dataset` of images and captions from a hub name (or local dataset path) or an imagefolder."""
    import datasets

    if dataset_name is None and train_data_dir is None:
        raise ValueError("paired data needs --dataset_name or --train_data_dir (or --image_free)")
    if dataset_name is not None:
        if os.path.isdir(dataset_name) and os.path.isfile(os.path.join(dataset_name, "dataset_info.json")):
            ds = datasets.load_from_disk(dataset_name)
        else:
            ds = datasets.load_dataset(dataset_name, dataset_config_name, revision=revision, cache_dir=cache_dir)
    else:
        if not os.path.isdir(train_data_dir):
            raise ValueError(f"--train_data_dir {train_data_dir!r} is not a folder")
        ds = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir)
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise ValueError(f"the dataset has no 'train' split; splits: {list(ds)}")
        ds = ds["train"]
    if max_train_samples is not None:
        ds = ds.shuffle(seed=seed).select(range(min(max_train_samples, len(ds))))
    return ds


@torch.no_grad()
def generate_teacher_latents(pipeline, prompts: list[str], num_inference_steps: int = 25, guidance_scale: float = 5.0,
                             batch_size: int = 8, seed: int = 0, height: int | None = None, width: int | None = None,
                             progress: bool = True, pipeline_kwargs: dict | None = None) -> torch.Tensor:
    """Clean latents the teacher generates for `prompts` (RC's teacher-generated images), float32 on CPU;
    `pipeline_kwargs`: the family's extra call arguments (`families.Family.call_kwargs`)."""
    from tqdm.auto import tqdm

    out = []
    for start in tqdm(range(0, len(prompts), batch_size), desc="teacher latents", disable=not progress):
        chunk = prompts[start:start + batch_size]
        gen = torch.Generator(device="cpu").manual_seed(seed + start)
        res = pipeline(chunk, num_inference_steps=num_inference_steps, guidance_scale=guidance_scale,
                       generator=gen, output_type="latent", height=height, width=width, **(pipeline_kwargs or {}))
        lat = res.images if hasattr(res, "images") else res[0]
        out.append(lat.float().cpu())  # output_type='latent' is already in the UNet's (scaled) latent space
    return torch.cat(out)


class StaleCacheError(ValueError):
    """A cache on disk was made with other settings than this run's, and rebuilding it was not asked for."""


def _module_fingerprint(module) -> str:
    """A short hash of a model's weights, from up to 256 evenly spaced values of every tensor (rounded to
    bfloat16, so the same weights in float32 or in a half precision hash alike; the dtype is recorded apart).
    Cheap on a large UNet, and it changes when the weights do."""
    import hashlib

    h = hashlib.sha256()
    for name, t in module.state_dict().items():
        flat = t.detach().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}".encode())
        if flat.is_floating_point() and flat.numel():
            sample = flat[:: max(1, flat.numel() // 256)][:256].to(torch.bfloat16).to(torch.float32)
            h.update(sample.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def teacher_latents_settings(pipeline, prompts: list[str], prompt_indices, **gen_kwargs) -> dict:
    """Everything the teacher latents depend on: the teacher's UNet and text encoder weights (sampled hashes),
    its scheduler config, the dtype, the prompts and their pool indices, and the `generate_teacher_latents`
    arguments with its defaults filled in (seed, steps, guidance, height, width, batch size)."""
    import hashlib
    import inspect

    defaults = {k: p.default for k, p in inspect.signature(generate_teacher_latents).parameters.items()
                if p.default is not inspect.Parameter.empty and k not in ("progress", "pipeline_kwargs")}
    unknown = set(gen_kwargs) - set(defaults) - {"progress", "pipeline_kwargs"}
    if unknown:
        raise TypeError(f"unknown generation argument(s) {sorted(unknown)}; expected some of {sorted(defaults)}")
    gen = {**defaults, **{k: v for k, v in gen_kwargs.items() if k not in ("progress", "pipeline_kwargs")}}
    if gen_kwargs.get("pipeline_kwargs"):  # recorded only when given: caches of SD teachers stay valid
        gen["pipeline_kwargs"] = dict(gen_kwargs["pipeline_kwargs"])
    scheduler = json.dumps({k: v for k, v in dict(pipeline.scheduler.config).items() if not k.startswith("_")},
                           sort_keys=True, default=str)
    denoiser = pipeline.unet if hasattr(pipeline, "unet") else pipeline.transformer
    return {
        "teacher_unet": _module_fingerprint(denoiser),
        "teacher_text_encoder": _module_fingerprint(pipeline.text_encoder),
        "scheduler": f"{type(pipeline.scheduler).__name__}:{hashlib.sha256(scheduler.encode()).hexdigest()[:16]}",
        "dtype": str(getattr(denoiser, "dtype", None) or next(denoiser.parameters()).dtype).replace("torch.", ""),
        "num_prompts": len(prompts),
        "prompts": hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16],
        "prompt_indices": hashlib.sha256(np.asarray(prompt_indices, np.int64).tobytes()).hexdigest()[:16],
        **gen,
    }


def load_or_generate_teacher_latents(cache_dir: str, pipeline, prompts: list[str], prompt_indices: np.ndarray,
                                     fingerprint: str | dict | None = None, overwrite: bool = False,
                                     **gen_kwargs) -> torch.Tensor:
    """Teacher latents for `prompts`, cached as safetensors + JSON in `cache_dir` (written atomically).

    The cache records every setting the latents were made from (`teacher_latents_settings`, plus
    `fingerprint`: extra settings of the caller, e.g. the pool's fingerprint). It is reused only when all of
    them match. Otherwise `StaleCacheError` names each setting that differs, with its cached and its new
    value; with `overwrite=True` the latents are generated again and replace the cache. A cache whose files
    are incomplete or unreadable is generated again (with a warning).
    """
    import logging

    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    log = logging.getLogger(__name__)
    path, meta_path = os.path.join(cache_dir, "teacher_latents.safetensors"), os.path.join(cache_dir, "teacher_latents.json")
    settings = teacher_latents_settings(pipeline, prompts, prompt_indices, **gen_kwargs)
    if isinstance(fingerprint, dict):
        settings.update({k: v for k, v in fingerprint.items() if k not in settings})
    elif fingerprint is not None:
        settings["fingerprint"] = fingerprint
    settings = json.loads(json.dumps(settings, default=str))  # as it reads back from JSON
    if os.path.isfile(path) and os.path.isfile(meta_path):
        old = None
        try:
            with open(meta_path) as fh:
                old = json.load(fh).get("settings")
        except (OSError, ValueError, AttributeError) as err:  # unreadable: derived data, made again
            log.warning("the teacher latents cache in %s is unreadable (%s): generating it again", cache_dir, err)
        old = old if isinstance(old, dict) and old else None
        differ = [f"{k} {old.get(k, 'not recorded')!r} (this run: {settings.get(k, 'not set')!r})"
                  for k in sorted(set(old) | set(settings)) if old.get(k) != settings.get(k)] if old else []
        if old and not differ:
            try:
                return load_file(path)["latents"]
            except (OSError, ValueError, KeyError, SafetensorError) as err:
                log.warning("the teacher latents in %s are unreadable (%s): generating them again", path, err)
        elif old is None:  # a cache that records no settings cannot be trusted: made again
            log.warning("the teacher latents in %s do not record their settings: generating them again", cache_dir)
        elif not overwrite:
            raise StaleCacheError(
                f"the teacher latents cached in {cache_dir!r} were made with other settings than this run's: "
                f"{'; '.join(differ)}. Pass overwrite=True (--overwrite_output_dir in the training script) to "
                "generate them again, or use another output folder")
        else:
            log.warning("teacher latents in %s were made with other settings (%s): generating them again",
                        cache_dir, "; ".join(differ))
    latents = generate_teacher_latents(pipeline, prompts, **gen_kwargs)
    os.makedirs(cache_dir, exist_ok=True)
    if os.path.exists(meta_path):  # the old settings go first: a crash in between leaves no stale pair
        os.remove(meta_path)
    indices = torch.from_numpy(np.asarray(prompt_indices, np.int64))
    atomic_save(path, lambda tmp: save_file({"latents": latents.contiguous(), "pool_indices": indices}, tmp))
    atomic_write_json(meta_path, {"settings": settings})
    return latents
