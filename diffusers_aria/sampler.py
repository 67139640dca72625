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

import inspect
import logging
from collections import deque
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, RandomSampler, Sampler, SequentialSampler

logger = logging.getLogger(__name__)

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_MUL1, _MUL2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64_INT, _MUL1_INT, _MUL2_INT = 0xFFFFFFFFFFFFFFFF, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SMALL_N = 128  # ranges up to this size are permuted exactly by sorting hashes (tiny Feistel networks are biased)
_PY_TAIL = 12  # cycle-walk at most this many leftover values with Python ints (cheaper than numpy calls)


def mix64_array(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser on a uint64 array (a new array; array arithmetic wraps without warnings)."""
    x = x ^ (x >> _S30)
    x *= _MUL1
    x ^= x >> _S27
    x *= _MUL2
    x ^= x >> _S31
    return x


def _feistel(x: np.ndarray, params: np.ndarray, round_keys: np.ndarray) -> np.ndarray:
    """One pass of the (possibly unbalanced) Feistel network over `x`; `params` as from `feistel_params`.

    The state is (left: hi bits, right: lo bits); a round maps it to (right, left ^ F(right)), so the widths
    swap every round and an even number of rounds restores them. F is a keyed multiplicative hash: the top
    bits of ((right * c1) ^ round_key) * c2, as many as the half it is xored into (5 numpy calls a round).
    """
    left, right = x >> params[0], x & params[1]
    for r, rk in enumerate(round_keys):
        f = right * _MUL1
        f ^= rk
        f *= _MUL2
        f >>= params[2 + (r & 1)]
        f ^= left
        left, right = right, f
    left <<= params[0]
    left |= right
    return left


def _cycle_walk_int(x: int, n: int, params: list[int], round_keys: list[int]) -> int:
    """`_feistel` applied to one value (Python ints) until it falls inside [0, n)."""
    lo, lo_mask, shifts = params[0], params[1], (params[2], params[3])
    while True:
        left, right = x >> lo, x & lo_mask
        for r, rk in enumerate(round_keys):
            f = ((((right * _MUL1_INT) & _MASK64_INT) ^ rk) * _MUL2_INT) & _MASK64_INT
            left, right = right, left ^ (f >> shifts[r & 1])
        x = (left << lo) | right
        if x < n:
            return x


_ROUND_CONSTANTS = np.array([(r + 1) * 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF for r in range(8)], dtype=np.uint64)


def feistel_params(n: np.ndarray) -> np.ndarray:
    """Feistel network covering range(n) on the smallest bit width b >= 2 with 2**b >= n, element-wise.

    Returns uint64 [4, *n.shape]: the low half's width lo = ceil(b/2), its mask, and the right shifts
    64 - hi and 64 - lo that cut the round function's output to the high (hi = b - lo) and low halves.
    Cycle walking then needs fewer than 2 passes on average (2**b < 2n).
    """
    n = np.asarray(n)
    bits = np.maximum(np.ceil(np.log2(np.maximum(n.astype(np.float64), 2.0))).astype(np.int64), 2)
    lo = (bits + 1) // 2
    hi = bits - lo
    return np.stack([lo, (1 << lo) - 1, 64 - hi, 64 - lo]).astype(np.uint64)


def keyed_permutation(j: np.ndarray, n: np.ndarray, key: np.ndarray, rounds: int = 4,
                      params: np.ndarray | None = None) -> np.ndarray:
    """Image of positions `j` under a keyed pseudo-random permutation of `range(n)` (element-wise n, key).

    A Feistel network on the smallest bit width covering n (unbalanced when that width is odd), with cycle
    walking for the values that fall outside [0, n); for n <= 128, where small networks are measurably
    biased, the rank order of n keyed hashes. Bijective for every (n, key); O(1) memory (O(n) for tiny n).
    `params` may pass `feistel_params(n)` precomputed (the sampler keeps them per region). `rounds` must
    be even.
    """
    if rounds % 2 or not 2 <= rounds <= len(_ROUND_CONSTANTS):
        raise ValueError(f"rounds={rounds} must be even and between 2 and {len(_ROUND_CONSTANTS)}")
    shape = np.broadcast_shapes(np.shape(j), np.shape(n), np.shape(key))
    # broadcast to one flat shape: cycle walking indexes n and key element-wise (scalars included)
    j, n, key = (np.broadcast_to(np.asarray(a, dtype=np.uint64), shape).reshape(-1) for a in (j, n, key))
    if params is None:
        params = feistel_params(n)
    else:
        params = np.broadcast_to(np.asarray(params, dtype=np.uint64), (4,) + shape).reshape(4, -1)
    return _permute(j, n, key, params, rounds).astype(np.int64).reshape(shape)


def _permute(j: np.ndarray, n: np.ndarray, key: np.ndarray, params: np.ndarray, rounds: int = 4) -> np.ndarray:
    """`keyed_permutation` on flat uint64 arrays of one length (no checks, no broadcasting); uint64 out."""
    with np.errstate(over="ignore"):
        # one mix of the key; round r xors a distinct constant in (the round function hashes again)
        round_keys = mix64_array(key)[None, :] ^ _ROUND_CONSTANTS[:rounds, None]
        out = _feistel(j, params, round_keys)
        small = np.flatnonzero(n <= _SMALL_N)
        if small.size:  # the j-th smallest of n keyed hashes: an exactly uniform-looking order for tiny n
            ns = n[small]
            cols = np.arange(int(ns.max()), dtype=np.uint64)
            h = mix64_array(round_keys[0, small, None] + cols[None, :] * _GOLDEN)
            h[cols[None, :] >= ns[:, None]] = _MASK64
            out[small] = np.argsort(h, axis=1)[np.arange(small.size), j[small].astype(np.int64)]
        todo = np.flatnonzero(out >= n)
        if todo.size:
            # walk the values still outside [0, n), compacting as they land; state rows: value, n, params, keys
            state = np.concatenate([out[None, todo], n[None, todo], params[:, todo], round_keys[:, todo]])
            while todo.size > _PY_TAIL:
                cur = _feistel(state[0], state[2:6], state[6:])
                good = cur < state[1]
                out[todo[good]] = cur[good]
                state[0] = cur
                bad = ~good
                todo, state = todo[bad], state[:, bad]
            if todo.size:  # the last few: per-value loops beat per-pass numpy overhead
                rows = state.T.tolist()
                out[todo] = [_cycle_walk_int(r[0], r[1], r[2:6], r[6:]) for r in rows]
    return out


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
        # the 0 is a format constant (it held the epoch once): the streams of earlier versions are kept
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
        cdf = np.cumsum(self._probabilities_at(step))
        cdf[-1] = 1.0
        return np.minimum(np.searchsorted(cdf, u, side="right"), self.num_regions - 1)

    def draw_global(self, step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        """One global draw of `n` (pool index, region) pairs at `step`; advances the per-region counters."""
        regions = self.draw_regions(step, n)
        # position of each sample among this step's draws from its region
        order = np.argsort(regions, kind="stable")
        sorted_r = regions[order]
        starts = np.searchsorted(sorted_r, sorted_r, side="left")
        rank_in_region = np.empty(n, dtype=np.int64)
        rank_in_region[order] = np.arange(n) - starts
        pos = self.counters[regions] + rank_in_region
        self.counters += np.bincount(regions, minlength=self.num_regions)
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
        idx, reg = self.draw_global(step, n * world)
        return idx[r * n:(r + 1) * n], reg[r * n:(r + 1) * n]

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
        idx, reg = self.draw_global(step, sum(counts))
        start = sum(counts[:r])
        return idx[start:start + counts[r]], reg[start:start + counts[r]]

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
        # states saved before read_ahead existed: everything drawn was trained on, the probabilities in use
        self.consumed = int(state.get("consumed", self.step))
        self.read_ahead = int(state.get("read_ahead", self.read_ahead))  # the saved lag keeps the stream exact
        if "schedule_steps" in state:
            steps = np.asarray(state["schedule_steps"], dtype=np.int64).reshape(-1)
            probs = np.asarray(state["schedule_probabilities"], dtype=np.float64)
            self._schedule = [(int(first), probs[i].copy()) for i, first in enumerate(steps)]
        else:
            self._schedule = [(0, self.probabilities)]
        self._pending = deque()
        self._warned = False


# --------------------------------------------------------------------------------------------- DataLoader

_KEPT_DATALOADER_ARGS = ("num_workers", "pin_memory", "drop_last", "timeout", "worker_init_fn",
                         "multiprocessing_context", "generator", "prefetch_factor", "persistent_workers",
                         "pin_memory_device", "in_order")


def region_dataloader(dataloader: DataLoader, regions, num_processes: int = 1, seed: int | None = 0,
                      column: str = "aria_region", read_ahead: int | None = None) -> DataLoader:
    """`dataloader` rebuilt to draw rows by region with ARIA's sampler, its batches carrying each row's region.

    For a training script whose DataLoader shuffles a `datasets.Dataset` (`shuffle=True`) and whose rows are the
    prompt pool: the new DataLoader keeps the dataset (plus an int32 `column` of region ids), the batch size,
    the collate function (wrapped by `RegionCollate`, which adds `batch[column]`) and every other argument
    (workers, pinning, ...); only `shuffle=True` becomes `sampler=AdaptiveRegionSampler(...)`, reachable as
    `.sampler`. Call it before `accelerator.prepare`.

    Args:
        dataloader: the script's DataLoader (a `RandomSampler` or `SequentialSampler`, a `batch_size`).
        regions: a `ConditionRegions` of the dataset's rows (same order), or the region id of every row.
        num_processes: processes that share each global draw (`accelerator.num_processes`): accelerate gives
            each process one `batch_size` slice of it.
        seed: the sampler's seed (None: 0).
        column: name of the region column and of the batch key.
        read_ahead: draws the DataLoader may request before training uses them (default:
            `prefetch_factor * num_workers + 2`, which covers accelerate's one-batch look-ahead).

    Each epoch is `len(dataset)` rounded down to whole global draws (at least one), so every process gets the
    same number of batches.
    """
    from .regions import RegionCollate, RegionsMismatchError

    if not isinstance(dataloader, DataLoader):
        raise TypeError(f"region_dataloader needs a torch DataLoader, got {type(dataloader).__name__}")
    if dataloader.batch_size is None:
        raise ValueError("region_dataloader needs a DataLoader built with batch_size=...; this one has a custom "
                         "batch_sampler. Build it with sampler=AdaptiveRegionSampler(...) yourself")
    if not isinstance(dataloader.sampler, (RandomSampler, SequentialSampler)):
        raise ValueError(f"the DataLoader already has a custom sampler ({type(dataloader.sampler).__name__}); "
                         "region_dataloader replaces shuffle=True only")
    if isinstance(num_processes, bool) or not isinstance(num_processes, (int, np.integer)) or num_processes < 1:
        raise ValueError(f"num_processes={num_processes!r} must be a positive integer (accelerator.num_processes)")
    dataset = dataloader.dataset
    ids = np.asarray(getattr(regions, "region_ids", regions))
    if len(ids) != len(dataset):
        raise RegionsMismatchError(f"the regions cover {len(ids)} rows but the DataLoader's dataset has "
                                   f"{len(dataset)}; build the regions over this dataset's captions, in its order")
    if not hasattr(dataset, "add_column"):
        raise TypeError(f"region_dataloader needs a datasets.Dataset (got {type(dataset).__name__}); for another "
                        "dataset return each row's region from __getitem__ and build the DataLoader with "
                        "sampler=AdaptiveRegionSampler(...)")
    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    dataset = dataset.add_column(column, ids.astype(np.int32, copy=False))
    kept = {k: getattr(dataloader, k) for k in _KEPT_DATALOADER_ARGS
            if k in inspect.signature(DataLoader.__init__).parameters and hasattr(dataloader, k)}
    if read_ahead is None:
        read_ahead = (kept.get("prefetch_factor") or 0) * kept.get("num_workers", 0) + 2
    global_batch = dataloader.batch_size * int(num_processes)
    sampler = AdaptiveRegionSampler(ids, batch_size=global_batch, seed=seed, read_ahead=read_ahead,
                                    num_samples=max(len(dataset) // global_batch, 1) * global_batch)
    return DataLoader(dataset, batch_size=dataloader.batch_size, sampler=sampler,
                      collate_fn=RegionCollate(dataloader.collate_fn, column), **kept)
