"""Random Conditioning (RC): swap a sample's paired caption for a pool prompt with probability p(t).

RC (CVPR 2025) replaces, for a noised latent x_t at timestep t, the paired caption by a prompt from a large
text pool with probability p(t); the student then matches the teacher on (x_t, t, new prompt). ARIA only
changes *which* pool prompt is drawn: `RandomConditioning` takes its prompts from an
`AdaptiveRegionSampler`. Schedules: exponential `exp(-lam * (1 - t/T))` (lam=5 by default), sigmoid,
constant. Null-prompt dropout replaces a prompt by "" (region -1, ignored by the tracker).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .pool import get_prompts
from .sampler import AdaptiveRegionSampler

SCHEDULES = ("exponential", "sigmoid", "constant")
NULL_REGION = -1
FEEDS = ("all", "swapped", "congruent")


def feed_mask(feed: str, swapped, timesteps=None, alphas_cumprod=None, max_signal: float = 0.5):
    """Which samples of a batch feed ARIA's tracker (None: all of them).

    - "all": every sample;
    - "swapped": only samples whose caption Random Conditioning swapped for a pool prompt;
    - "congruent": paired samples, and swapped ones only where the noise dominates the latent
      (`alphas_cumprod[t] <= max_signal`: at most half of x_t's variance is the paired image). A swap at a small
      t asks the teacher about an image that contradicts the prompt, a case no prompt's own sample ever shows;
      its loss measures that contradiction, not how well the student renders the prompt. Under RC's exponential
      p(t) about 3% of the swaps fall below the line (Stable Diffusion's scaled-linear betas: t < 354 of 1000);
      with a constant p(t) about a third.

    `swapped`: bool [B]; `timesteps`: [B]; `alphas_cumprod`: the noise scheduler's, indexed by timestep.
    """
    if feed not in FEEDS:
        raise ValueError(f"feed {feed!r} is not valid; choose one of {', '.join(FEEDS)}")
    if feed == "all":
        return None
    swapped = torch.as_tensor(swapped, dtype=torch.bool)
    if feed == "swapped":
        return swapped
    if timesteps is None or alphas_cumprod is None:
        raise ValueError("feed 'congruent' needs the batch's timesteps and the scheduler's alphas_cumprod")
    ab = torch.as_tensor(alphas_cumprod, dtype=torch.float64)
    t = torch.as_tensor(timesteps).long().cpu().clamp(0, ab.numel() - 1)
    return ~swapped.cpu() | (ab[t] <= max_signal)


@dataclass
class SwapSchedule:
    """p(t), the probability of swapping the caption at timestep t.

    kind: "exponential" -> exp(-lam * (1 - t/T)); "sigmoid" -> 1 / (1 + exp(-lam * (t/T - center)));
    "constant" -> `value`.
    """

    kind: str = "exponential"
    lam: float = 5.0
    center: float = 0.5
    value: float = 0.5
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if self.kind not in SCHEDULES:
            raise ValueError(f"rc schedule {self.kind!r} is not valid; choose one of {', '.join(SCHEDULES)}")
        if self.kind == "constant" and not 0 <= self.value <= 1:
            raise ValueError(f"constant swap probability {self.value!r} must lie in [0, 1]")
        if self.lam < 0:
            raise ValueError(f"rc lambda {self.lam!r} must be >= 0")

    def __call__(self, timesteps: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(timesteps, dtype=torch.float64) / self.num_train_timesteps
        if self.kind == "exponential":
            return torch.exp(-self.lam * (1.0 - t))
        if self.kind == "sigmoid":
            return torch.sigmoid(self.lam * (t - self.center))
        return torch.full_like(t, self.value)

    def mean(self) -> float:
        """Average swap probability over uniform t."""
        t = torch.arange(self.num_train_timesteps, dtype=torch.float64)
        return float(self(t).mean())


@dataclass
class ConditioningBatch:
    """What `RandomConditioning` decided for one batch."""

    prompts: list[str]
    swapped: torch.Tensor  # bool [B]: the prompt came from the pool
    region_ids: torch.Tensor  # long [B]: region of the prompt used (-1: null prompt / unknown)
    pool_indices: torch.Tensor  # long [B]: pool index of swapped prompts, -1 otherwise


class RandomConditioning:
    """Per-sample condition switching with prompts drawn by an `AdaptiveRegionSampler`.

    Args:
        sampler: the region sampler (its probabilities are ARIA's allocation).
        pool: the prompt pool (list of str or a `datasets.Dataset` with a `prompt` column).
        schedule: the swap probability p(t).
        null_prompt_prob: probability of replacing the final prompt by "" (classifier-free-guidance dropout).
        seed: swap coins come from (seed, step, rank).
        regions: `ConditionRegions` to assign paired captions to regions when no ids are given.
        gather_counts: with several processes, a function that takes this rank's number of pool prompts
            needed at this step and returns every rank's (a tiny all-gather; `build_aria` makes it from the
            accelerator). Pool prompts are drawn only for the samples that use one, and the ranks' counts
            fix each rank's slice of the global draw. Without it, several processes are allowed only in
            image-free mode without null prompts, where every rank needs its whole batch.
    """

    def __init__(self, sampler: AdaptiveRegionSampler, pool, schedule: SwapSchedule | None = None,
                 null_prompt_prob: float = 0.0, seed: int = 0, regions=None,
                 gather_counts: Callable[[int], Sequence[int]] | None = None) -> None:
        if not 0 <= null_prompt_prob <= 1:
            raise ValueError(f"null_prompt_prob={null_prompt_prob!r} must lie in [0, 1]")
        if len(pool) != sampler.num_prompts:
            raise ValueError(f"the pool has {len(pool)} prompts but the sampler covers {sampler.num_prompts}")
        self.sampler, self.pool = sampler, pool
        self.schedule = schedule or SwapSchedule()
        self.null_prompt_prob = float(null_prompt_prob)
        self.seed = int(seed)
        self.regions = regions
        self.gather_counts = gather_counts
        self._assigned: dict[str, int] = {}

    def _caption_regions(self, captions: Sequence[str]) -> np.ndarray:
        if self.regions is None:
            return np.full(len(captions), NULL_REGION, dtype=np.int64)
        todo = [c for c in dict.fromkeys(captions) if c not in self._assigned]
        if todo:
            if len(self._assigned) + len(todo) > 100_000:  # bound the cache, but keep this batch's captions
                self._assigned.clear()
                todo = list(dict.fromkeys(captions))
            for c, r in zip(todo, self.regions.assign(todo).tolist()):
                self._assigned[c] = int(r)
        return np.asarray([self._assigned.get(c, NULL_REGION) for c in captions], dtype=np.int64)

    def decide(self, step: int, timesteps: torch.Tensor, with_captions: bool = True,
               rank: int = 0) -> tuple[torch.Tensor, np.ndarray]:
        """The coins of one batch: (swapped [B] bool, null [B] bool), from (seed, step, rank) and t alone."""
        t = torch.as_tensor(timesteps).reshape(-1).cpu()
        n = t.numel()
        gen = torch.Generator().manual_seed(_step_seed(self.seed, step, rank))
        coins = torch.rand(n, generator=gen, dtype=torch.float64)
        nulls = (torch.rand(n, generator=gen, dtype=torch.float64) < self.null_prompt_prob).numpy()
        swapped = coins < self.schedule(t) if with_captions else torch.ones(n, dtype=torch.bool)
        return swapped, nulls

    def __call__(self, step: int, timesteps: torch.Tensor, captions: Sequence[str] | None = None,
                 caption_region_ids=None, rank: int = 0, num_replicas: int = 1) -> ConditioningBatch:
        """Decide the prompts of one batch (this rank's part of the global batch of `step`).

        Every rank must call this once per step: it advances the sampler's global draw. A pool prompt is
        drawn only for a sample that uses one (swapped, and not replaced by the null prompt), so the
        sampler's counters count prompts that were trained on. With `captions=None` (image-free training)
        every sample takes a pool prompt.
        """
        n = torch.as_tensor(timesteps).numel()
        if captions is not None and len(captions) != n:
            raise ValueError(f"got {len(captions)} captions for {n} timesteps")
        swapped, nulls = self.decide(step, timesteps, captions is not None, rank)
        sw = swapped.numpy()
        use = sw & ~nulls
        idx = np.full(n, -1, dtype=np.int64)
        reg = np.full(n, NULL_REGION, dtype=np.int64)
        counts = self._rank_counts(int(use.sum()), n, captions is None, num_replicas)
        idx[use], reg[use] = self.sampler.draw_counts(step, counts, rank)
        if captions is None:
            cap_regions = np.full(n, NULL_REGION, dtype=np.int64)
            captions = [""] * n
        else:
            cap_regions = (np.asarray(caption_region_ids, dtype=np.int64).reshape(-1) if caption_region_ids is not None
                           else self._caption_regions(captions))
        pool_prompts = iter(get_prompts(self.pool, idx[use]) if use.any() else [])
        prompts = ["" if z else (next(pool_prompts) if s else c) for s, z, c in zip(sw.tolist(), nulls.tolist(), captions)]
        regions = np.where(nulls, NULL_REGION, np.where(sw, reg, cap_regions))
        return ConditioningBatch(
            prompts=prompts,
            swapped=swapped,
            region_ids=torch.from_numpy(regions.astype(np.int64)),
            pool_indices=torch.from_numpy(idx),
        )

    def _rank_counts(self, needed: int, n: int, image_free: bool, num_replicas: int) -> list[int]:
        """Every rank's number of pool prompts at this step (this rank's alone with one process)."""
        if num_replicas <= 1:
            return [needed]
        if self.gather_counts is not None:
            counts = [int(c) for c in self.gather_counts(needed)]
            if len(counts) != num_replicas:
                raise ValueError(f"gather_counts returned {len(counts)} counts for num_replicas={num_replicas}")
            if needed not in counts:
                raise ValueError(f"gather_counts returned {counts}, which lacks this rank's count {needed}")
            return counts
        if image_free and self.null_prompt_prob == 0:
            return [n] * num_replicas  # every rank needs its whole batch (the batches must be equal)
        raise ValueError(
            f"with num_replicas={num_replicas} and paired captions or null prompts, the ranks need different numbers "
            "of pool prompts: pass gather_counts= to RandomConditioning (build_aria does, given the accelerator)")


def _step_seed(seed: int, step: int, rank: int) -> int:
    return int(np.random.SeedSequence([seed, step, rank, 0x5C]).generate_state(1, dtype=np.uint64)[0] % (2**63 - 1))

