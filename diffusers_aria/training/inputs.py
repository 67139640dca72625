"""What a run reads: the prompt pool named by a flag, the paired rows, and the check that every rank read the same."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import numpy as np

from ..pool import load_prompt_pool, pool_fingerprint

if TYPE_CHECKING:
    from ..teachers.parts import TeacherParts


def load_pool(source: str, column: str | None = None, split: str = "train", builtin_size: int = 4000, seed: int = 0):
    """The prompt pool and, for the built-in pool, each prompt's group. Returns (Dataset, groups or None)."""
    import datasets

    if source == "builtin":
        from ..embedded.builtin_pool import builtin_prompt_pool

        ds = builtin_prompt_pool(num_prompts=builtin_size, seed=seed)
        if not isinstance(ds, datasets.Dataset):
            ds = datasets.Dataset.from_list(list(ds))
        groups = list(ds["group"]) if "group" in ds.column_names else None
        return load_prompt_pool(ds, "prompt"), groups
    if os.path.exists(source):
        return load_prompt_pool(source, column), None
    from ..pool import PromptPoolError
    from ..utils.paths import looks_like_local_path

    if looks_like_local_path(source):  # never sent to the Hub, where a missing name costs ~50 s of retries
        raise PromptPoolError(f"prompt pool {source!r} does not exist (looked for {os.path.abspath(source)}); pass an "
                              "existing prompt file or folder, 'builtin', or a Hub dataset name like 'owner/name'")
    ds = datasets.load_dataset(source, split=split)
    return load_prompt_pool(ds, column), None


def regions_advice(args) -> str:
    """What the training script's `RegionsMismatchError` tells the user to do, for its own regions folder
    (OUTPUT_DIR/regions, made by an earlier run there) and for one named with --regions_dir (never rebuilt)."""
    pool = ("the same --prompt_pool" if args.prompt_pool != "builtin"
            else f"the same --builtin_pool_size (this run: {args.builtin_pool_size}) and --seed (this run: {args.seed}), "
                 "which pick the built-in pool's prompts")
    if getattr(args, "regions_dir", None):
        return (f"--regions_dir is never rebuilt: pass the pool its regions were built from ({pool}), or build regions "
                "of this pool into a new folder (diffusers-aria regions build --pool ... --output NEW) and pass "
                "--regions_dir NEW")
    folder = os.path.join(args.output_dir, "regions")
    return (f"{folder!r} holds the regions of the earlier run in {args.output_dir!r}: to continue that run, pass "
            f"its pool and region settings ({pool}, --num_regions, --embedder); to start a new one, pass "
            "--overwrite_output_dir (the earlier run is moved aside) or choose another --output_dir")


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


def paired_dataset(args, pool, regions, teacher: TeacherParts, accelerator):
    """The paired training rows: teacher-generated latents (--image_free) or an image/caption dataset."""
    from ..pool import get_prompts
    from .data import ImageCaptionDataset, LatentCaptionDataset, load_image_caption_dataset

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
            pipeline_kwargs=teacher.family.call_kwargs())
        return LatentCaptionDataset(latents, prompts, np.asarray(regions.region_ids)[idx])
    ds = load_image_caption_dataset(args.dataset_name, args.train_data_dir, args.dataset_config_name, args.revision,
                                    args.cache_dir, args.max_train_samples, args.seed)
    data = ImageCaptionDataset(ds, args.image_column, args.caption_column, args.resolution, args.center_crop,
                               args.random_flip, args.seed,
                               interpolation=getattr(args, "image_interpolation_mode", "lanczos"))
    data.region_ids = regions.assign(data.captions())
    return data
