"""Drawing prompts by region: `AdaptiveRegionSampler`, and `region_dataloader` to put it into a DataLoader.

One global draw per step is a pure function of `(seed, step)`, the current region probabilities and
the per-region draw counters, so every rank computes the same draw and takes its own disjoint slice. A
draw picks regions by the probabilities, then prompts inside each region without replacement: the j-th
draw from region k in its c-th pass is `members_k[perm_{k,c}(j)]`, where `perm_{k,c}` is a keyed
pseudo-random permutation of `range(size_k)` (a cycle-walking Feistel network), so no permutation array is
ever stored. Memory: the region-id order (int32 when N < 2**31, 4 bytes a prompt) plus O(K).

Iterated by a DataLoader (`region_dataloader`), the sampler is one continuous stream: step numbers never
repeat, so epochs (which accelerate resets on resume) do not key the draws. A DataLoader requests draws before
training uses them (one batch ahead; `prefetch_factor * num_workers` more with workers). With `read_ahead > 0`
the sampler makes that invisible: `ARIACallback` reports each trained micro-batch (`mark_consumed`), and new
probabilities take effect `read_ahead` draws after the micro-batch at which they were set, so every draw is the
same whenever the DataLoader happened to request it. The state is then taken at the trained position (the
draws requested but not trained on are undone, and made again, identically, after a resume or by the next
iterator), so it does not depend on how far the DataLoader had read, and the stream under resume is the
uninterrupted one.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

from .rng import GOLDEN as _GOLDEN
from .rng import feistel_params, mix64_array
from .rng import permute as _permute

logger = logging.getLogger(__name__)

def _stable_region_order(ids: np.ndarray, sizes: np.ndarray, dtype, chunk: int = 1 << 18) -> np.ndarray:
    """`np.argsort(ids, kind="stable").astype(dtype)`, built chunk by chunk straight into a `dtype` array.

    A counting sort: each chunk is stably sorted (radix sort on uint16 keys when K <= 65536) and scattered
    after the members of earlier chunks, so peak memory is the output plus O(chunk + K), not an int64 copy.
    """
    n = ids.size
    order = np.empty(n, dtype=dtype)
    key_dtype = np.uint16 if sizes.size <= 1 << 16 else ids.dtype
    fill = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.int64)  # next free slot of each region
    for start in range(0, n, chunk):
        part = np.asarray(ids[start:start + chunk]).astype(key_dtype, copy=False)
        local = np.argsort(part, kind="stable")
        sorted_r = part[local].astype(np.int64)
        counts = np.bincount(sorted_r, minlength=sizes.size)
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        dest = fill[sorted_r] + (np.arange(local.size) - first[sorted_r])
        order[dest] = local + start
        fill += counts
    return order


class AdaptiveRegionSampler(Sampler[int]):
    """Draws pool indices by region probabilities; a `torch.utils.data.Sampler[int]` and a direct `draw`.

    Args:
        region_ids: int array [N], the region of each pool entry (e.g. `ConditionRegions.region_ids`).
        batch_size: global number of indices drawn per step when iterating (the DataLoader's batch size
            times the number of processes, when the DataLoader is prepared by accelerate).
        probabilities: initial region probabilities (default: prompt-uniform, i.e. Random Conditioning).
        seed: all randomness comes from (seed, step) (None: 0; every rank must use the same seed).
        num_replicas, rank: when iterating outside accelerate, yield only this rank's slice of each global
            draw. Leave at 1/0 when the DataLoader goes through `accelerator.prepare`, which shards batches.
        num_samples: indices per epoch when iterating (None: infinite).
        read_ahead: how many draws the DataLoader may request before the micro-batch that uses them is
            trained (0: untracked, new probabilities apply at once). When > 0, trained draws are reported with
            `mark_consumed` (ARIACallback does it), probabilities set after micro-batch c apply from draw
            c + read_ahead, and the state (and a new iterator) starts from the last trained draw.
            `region_dataloader` sets it from the DataLoader's workers and prefetch factor.
    """

    def __init__(self, region_ids, batch_size: int = 1, probabilities=None, seed: int | None = 0,
                 num_replicas: int = 1, rank: int = 0, num_samples: int | None = None, read_ahead: int = 0) -> None:
        ids = np.asarray(region_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"region_ids must be a non-empty 1-D array, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer) or int(ids.min()) < 0:
            raise ValueError("region_ids must be non-negative integers")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank!r} must lie in [0, num_replicas={num_replicas})")
        if isinstance(read_ahead, bool) or not isinstance(read_ahead, (int, np.integer)) or read_ahead < 0:
            raise ValueError(f"read_ahead={read_ahead!r} must be an integer >= 0")
        self.num_prompts = int(ids.size)
        self.num_regions = int(ids.max()) + 1
        index_dtype = np.int32 if self.num_prompts < 2**31 else np.int64
        self.sizes = sum((np.bincount(ids[s:s + (1 << 20)], minlength=self.num_regions)  # chunked: no int64 copy
                          for s in range(0, ids.size, 1 << 20)), np.zeros(self.num_regions, dtype=np.int64))
        self.order = _stable_region_order(ids, self.sizes, index_dtype)
        if np.any(self.sizes == 0):
            empty = np.flatnonzero(self.sizes == 0)[:8].tolist()
            raise ValueError(f"regions {empty} have no prompts; region ids must be contiguous 0..K-1")
        self.offsets = np.concatenate([[0], np.cumsum(self.sizes)[:-1]]).astype(np.int64)
        self._feistel_params = feistel_params(self.sizes)
        self.batch_size = int(batch_size)
        self.seed = 0 if seed is None else int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.num_samples = num_samples
        self.read_ahead = int(read_ahead)
        self.epoch = 0  # recorded for the DataLoader protocol; the draws do not depend on it
        self.step = 0  # next step to draw when iterating
        self.consumed = 0  # draws trained on (reported by mark_consumed)
        self.counters = np.zeros(self.num_regions, dtype=np.int64)  # draws so far per region
        self.probabilities = self.sizes / self.sizes.sum()  # the latest probabilities set
        # (first draw step, probabilities) in step order: a draw uses the last entry that starts at or before it
        self._schedule: list[tuple[int, np.ndarray]] = [(0, self.probabilities)]
        self._cdf: tuple[np.ndarray | None, np.ndarray | None] = (None, None)  # (probabilities, their cumulative sum)
        self._pending: deque[np.ndarray] = deque()  # regions of the draws made by iteration, not yet trained on
        self._warned = False
        if probabilities is not None:
            self.set_probabilities(probabilities)

    # ----------------------------------------------------------------------------------- probabilities
    def set_probabilities(self, probabilities) -> None:
        """New region probabilities: for the next draw, or with `read_ahead > 0` from draw `consumed + read_ahead`.

        Before the first draw (and with `read_ahead == 0`) they apply at once.
        """
        p = np.asarray(probabilities.detach().cpu() if isinstance(probabilities, torch.Tensor) else probabilities,
                       dtype=np.float64).reshape(-1)
        if p.shape != (self.num_regions,):
            raise ValueError(f"got {p.size} probabilities for {self.num_regions} regions")
        if np.any(p < 0) or not np.all(np.isfinite(p)) or p.sum() <= 0:
            raise ValueError("region probabilities must be finite, non-negative and not all zero")
        self.probabilities = p / p.sum()
        if self.read_ahead == 0 or (self.step == 0 and self.consumed == 0):
            self._schedule = [(0, self.probabilities)]
            return
        first = self.consumed + self.read_ahead
        if first < self.step:
            self._warn(f"probabilities set after {self.consumed} trained draws should apply from draw {first}, but "
                       f"draws up to {self.step - 1} were already made (set them after accumulate, not before)")
        if self._schedule[-1][0] >= first:
            self._schedule.pop()
        self._schedule.append((first, self.probabilities))

    def set_epoch(self, epoch: int) -> None:
        """Recorded only: step numbers never repeat, so the stream needs no epoch (and accelerate's resets on
        resume cannot change it)."""
        self.epoch = int(epoch)

    def mark_consumed(self, num_draws: int = 1) -> None:
        """Report that training used the next `num_draws` draws (one micro-batch on every rank is one draw)."""
        self.consumed += int(num_draws)
        if self.read_ahead == 0:
            return
        for _ in range(int(num_draws)):
            if self._pending:
                self._pending.popleft()
        self._schedule = self._schedule_from(self.consumed)
        if self.consumed > self.step:
            self._warn(f"{self.consumed} micro-batches were reported trained but only {self.step} draws were made: "
                       "call ARIACallback.accumulate once per batch of the DataLoader that iterates this sampler, "
                       "and give the sampler the global batch size (per-process batch x processes)")

    def _warn(self, message: str) -> None:
        if not self._warned:
            self._warned = True
            logger.warning("AdaptiveRegionSampler: %s; the index stream is not exact under resume", message)

    # ----------------------------------------------------------------------------------- drawing
    def _rng(self, step: int) -> np.random.Generator:
        # the 0 is a constant of the stream's key (the streams are fixed: changing it changes every draw)
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, 0, int(step)])))

    def _probabilities_at(self, step: int) -> np.ndarray:
        for first, p in reversed(self._schedule):
            if first <= step:
                return p
        return self._schedule[0][1]

    def _schedule_from(self, step: int) -> list[tuple[int, np.ndarray]]:
        """The schedule entries draws from `step` on can use (the one in use at `step`, and later ones)."""
        keep = 0
        for i, (first, _) in enumerate(self._schedule):
            if first <= step:
                keep = i
        return self._schedule[keep:]

    def _rewind(self) -> None:
        """Undo the draws made but not trained on: the next ones are the same draws again."""
        if self._pending:
            self.counters -= np.bincount(np.concatenate(list(self._pending)), minlength=self.num_regions)
            self.step -= len(self._pending)
            self._pending.clear()

    def draw_regions(self, step: int, n: int) -> np.ndarray:
        """The regions of one global draw of `n` samples at `step` (does not advance counters)."""
        u = self._rng(step).random(n)
        p = self._probabilities_at(step)
        if self._cdf[0] is not p:  # the probabilities change only at a refresh (arrays are replaced, never edited)
            cdf = np.cumsum(p)
            cdf[-1] = 1.0
            self._cdf = (p, cdf)
        return np.minimum(np.searchsorted(self._cdf[1], u, side="right"), self.num_regions - 1)

    def draw_global(self, step: int, n: int, lo: int = 0, hi: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """One global draw of `n` (pool index, region) pairs at `step`; advances the per-region counters.

        `lo`, `hi`: return only the pairs [lo, hi) of the draw (a rank's slice): the counters still advance by the
        whole draw, and the slice is exactly that of the whole, but only its own prompts are computed."""
        regions = self.draw_regions(step, n)
        # position of each sample among this step's draws from its region
        order = np.argsort(regions, kind="stable")
        sorted_r = regions[order]
        starts = np.searchsorted(sorted_r, sorted_r, side="left")
        rank_in_region = np.empty(n, dtype=np.int64)
        rank_in_region[order] = np.arange(n) - starts
        pos = self.counters[regions] + rank_in_region
        self.counters += np.bincount(regions, minlength=self.num_regions)
        regions, pos = regions[lo:hi], pos[lo:hi]
        size = self.sizes[regions]
        cycle, within = np.divmod(pos, size)
        with np.errstate(over="ignore"):
            key = mix64_array(regions.astype(np.uint64) * np.uint64(0x100000001B3)
                               + cycle.astype(np.uint64) * _GOLDEN) ^ np.uint64(self.seed)
        within = _permute(within.astype(np.uint64), size.astype(np.uint64), key, self._feistel_params[:, regions])
        return self.order[self.offsets[regions] + within.astype(np.int64)].astype(np.int64), regions

    def draw(self, step: int, n: int, num_replicas: int | None = None, rank: int | None = None
             ) -> tuple[np.ndarray, np.ndarray]:
        """This rank's `n` (pool index, region) pairs of the global draw of `n * num_replicas` at `step`.

        Every rank must call `draw` for every step, in order, with the same `n` and probabilities (as
        `ARIACallback` guarantees): the per-region counters advance with the global draw.
        """
        world = self.num_replicas if num_replicas is None else int(num_replicas)
        r = self.rank if rank is None else int(rank)
        return self.draw_global(step, n * world, r * n, (r + 1) * n)

    def draw_counts(self, step: int, counts: Sequence[int], rank: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """This rank's part of the global draw at `step` when rank r needs `counts[r]` samples.

        For batches whose size differs across ranks (e.g. only the swapped samples of Random Conditioning):
        every rank passes the same `counts` (gathered), draws `sum(counts)` globally and takes its slice.
        """
        counts = [int(c) for c in counts]
        if any(c < 0 for c in counts):
            raise ValueError(f"counts must be >= 0, got {counts}")
        r = self.rank if rank is None else int(rank)
        if not 0 <= r < len(counts):
            raise ValueError(f"rank {r} is outside the {len(counts)} ranks of counts={counts}")
        start = sum(counts[:r])
        return self.draw_global(step, sum(counts), start, start + counts[r])

    def __iter__(self) -> Iterator[int]:
        """Yield this rank's part of one global draw after another (with `read_ahead > 0`, starting after the
        last draw trained on: the draws an iterator left early had made but not trained on come again)."""
        per_rank = self.batch_size // self.num_replicas if self.num_replicas > 1 else self.batch_size
        if self.num_replicas > 1 and self.batch_size % self.num_replicas:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by num_replicas={self.num_replicas}")
        yielded = 0
        self._rewind()
        while self.num_samples is None or yielded < self.num_samples:
            idx = self._draw_for_iteration(per_rank)
            for i in idx[self.rank * per_rank:(self.rank + 1) * per_rank].tolist():
                if self.num_samples is not None and yielded >= self.num_samples:
                    return
                yielded += 1
                yield i

    def _draw_for_iteration(self, per_rank: int) -> np.ndarray:
        step = self.step
        if self.read_ahead and step - self.consumed > self.read_ahead:
            self._warn(f"the DataLoader requested draw {step} when {self.consumed} were trained, more than "
                       f"read_ahead={self.read_ahead} ahead (more workers or prefetch than the sampler was set up for?)")
        idx, regions = self.draw_global(step, per_rank * self.num_replicas)
        self.step += 1
        if self.read_ahead:
            self._pending.append(regions.astype(np.int32))
            while len(self._pending) > 4 * self.read_ahead + 16:  # nobody reports consumption: stay bounded
                self._pending.popleft()
                self._warn("draws are not reported as trained (mark_consumed)")
        return idx

    def __len__(self) -> int:
        if self.num_samples is None:
            raise TypeError("this AdaptiveRegionSampler is infinite (num_samples=None) and has no length")
        return self.num_samples

    # ----------------------------------------------------------------------------------- state
    def draw_shares(self) -> np.ndarray:
        """Share of all draws so far that went to each region."""
        total = self.counters.sum()
        return self.counters / total if total else np.zeros(self.num_regions)

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain types only. With `read_ahead > 0` it is taken at the last draw trained on (draws
        requested ahead are left out: they are made again, identically, after loading), so it does not depend on
        how far the DataLoader had read; it holds the probabilities set but not yet in use."""
        counters, step = self.counters, self.step
        if self._pending:
            counters = counters - np.bincount(np.concatenate(list(self._pending)), minlength=self.num_regions)
            step = step - len(self._pending)
        schedule = self._schedule_from(step)
        return {
            "counters": torch.from_numpy(counters.copy()),
            "probabilities": torch.from_numpy(self.probabilities.copy()),
            "schedule_steps": torch.tensor([first for first, _ in schedule], dtype=torch.int64),
            "schedule_probabilities": torch.from_numpy(np.stack([p for _, p in schedule])),
            "step": int(step),
            "consumed": int(self.consumed),
            "read_ahead": int(self.read_ahead),
            "seed": int(self.seed),
            "num_prompts": int(self.num_prompts),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if int(state["num_prompts"]) != self.num_prompts:
            raise ValueError(
                f"sampler state was saved for {int(state['num_prompts'])} prompts, this sampler has {self.num_prompts}"
            )
        counters = np.asarray(state["counters"], dtype=np.int64)
        if counters.shape != (self.num_regions,):
            raise ValueError(f"sampler state has {counters.size} regions, this sampler has {self.num_regions}")
        self.counters = counters.copy()
        self.probabilities = np.asarray(state["probabilities"], dtype=np.float64).copy()
        self.step, self.seed = int(state["step"]), int(state["seed"])
        self.consumed = int(state["consumed"])
        self.read_ahead = int(state["read_ahead"])  # the saved lag keeps the stream exact
        steps = np.asarray(state["schedule_steps"], dtype=np.int64).reshape(-1)
        probs = np.asarray(state["schedule_probabilities"], dtype=np.float64)
        self._schedule = [(int(first), probs[i].copy()) for i, first in enumerate(steps)]
        self._pending = deque()
        self._warned = False
