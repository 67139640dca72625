"""ARIA assembled for a run: regions -> sampler, tracker, policy, callback and Random Conditioning."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..callback import ARIACallback
from ..conditioning import RandomConditioning, SwapSchedule, feed_mask
from ..sampler import AdaptiveRegionSampler
from ..settings import AriaSettings
from ..tracker import DiscrepancyTracker


@dataclass
class AriaComponents:
    """ARIA's parts for one run, built by `build_aria` from `AriaSettings`."""

    sampler: AdaptiveRegionSampler
    tracker: DiscrepancyTracker
    policy: Any
    callback: ARIACallback
    conditioning: RandomConditioning
    feed: str = "all"
    alphas_cumprod: torch.Tensor | None = None

    def accumulate(self, cond, losses: torch.Tensor, timesteps: torch.Tensor) -> None:
        """Report a micro-batch's per-sample losses to the callback, those that `--aria_feed` picks
        (`conditioning.feed_mask`): every sample; only those whose prompt Random Conditioning swapped for a pool
        prompt ("swapped"); or paired samples and the swaps where noise dominates the latent ("congruent").

        `cond`: the micro-batch's `ConditioningBatch` (`conditioning(...)`); `losses` detached, one per sample.
        """
        mask = feed_mask(self.feed, cond.swapped, timesteps, self.alphas_cumprod)
        self.callback.accumulate(cond.region_ids, losses, timesteps, mask=mask)


def build_aria(settings: AriaSettings, regions, pool, accelerator=None, seed: int = 0,
               num_train_timesteps: int = 1000, region_names: list[str] | None = None,
               alphas_cumprod: torch.Tensor | None = None) -> AriaComponents:
    """Sampler, tracker, policy, callback and RC helper for `regions` of `pool`, from `settings`.

    `alphas_cumprod`: the noise scheduler's (needed by `feed="congruent"`)."""
    if settings.feed == "congruent" and alphas_cumprod is None:
        raise ValueError("--aria_feed congruent needs the noise scheduler's alphas_cumprod: pass "
                         "build_aria(..., alphas_cumprod=noise_scheduler.alphas_cumprod)")
    sampler = AdaptiveRegionSampler(regions.region_ids, seed=seed)
    tracker = settings.make_tracker(regions.num_regions, num_train_timesteps)
    policy = settings.make_policy(sampler.sizes, tree=getattr(regions, "tree", None))
    callback = ARIACallback(accelerator, sampler, tracker, policy, log_every=settings.log_every,
                            region_names=region_names)
    schedule = SwapSchedule(kind=settings.rc_schedule, lam=settings.rc_lambda, value=settings.rc_constant,
                            num_train_timesteps=num_train_timesteps)
    gather_counts = None
    if accelerator is not None and accelerator.num_processes > 1:
        def gather_counts(n: int) -> list[int]:
            return accelerator.gather(torch.tensor([n], device=accelerator.device)).cpu().tolist()
    rc = RandomConditioning(sampler, pool, schedule=schedule, null_prompt_prob=settings.null_prompt_prob, seed=seed,
                            regions=regions, gather_counts=gather_counts)
    ab = None if alphas_cumprod is None else torch.as_tensor(alphas_cumprod).detach().double().cpu()
    return AriaComponents(sampler, tracker, policy, callback, rc, feed=settings.feed, alphas_cumprod=ab)


def region_names_from_groups(region_ids: np.ndarray, groups: list[str] | None) -> list[str] | None:
    """Name each region by its majority group (e.g. the built-in pool's topic), when groups are known."""
    if groups is None:
        return None
    ids = np.asarray(region_ids)
    names = []
    for k in range(int(ids.max()) + 1):
        members = [groups[i] for i in np.flatnonzero(ids == k)[:2000]]
        vals, counts = np.unique(members, return_counts=True)
        names.append(f"{vals[counts.argmax()]} ({counts.max() / counts.sum():.0%})")
    return names
