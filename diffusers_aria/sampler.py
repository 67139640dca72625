"""Drawing prompts by region: `AdaptiveRegionSampler`.

One global draw per step is a pure function of `(seed, epoch, step)`, the current region probabilities and
the per-region draw counters, so every rank computes the same draw and takes its own disjoint slice. A
draw picks regions by the probabilities, then prompts inside each region without replacement: the j-th
draw from region k in its c-th pass is `members_k[perm_{k,c}(j)]`, where `perm_{k,c}` is a keyed
pseudo-random permutation of `range(size_k)` (a cycle-walking Feistel network), so no permutation array is
ever stored. Memory: the region-id order (int32 when N < 2**31, 4 bytes a prompt) plus O(K).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Sampler

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_MUL1, _MUL2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64_INT, _MUL1_INT, _MUL2_INT = 0xFFFFFFFFFFFFFFFF, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB
_SMALL_N = 128  # ranges up to this size are permuted exactly by sorting hashes (tiny Feistel networks are biased)
_PY_TAIL = 12  # cycle-walk at most this many leftover values with Python ints (cheaper than numpy calls)


def _mix64_array(x: np.ndarray) -> np.ndarray:
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
        round_keys = _mix64_array(key)[None, :] ^ _ROUND_CONSTANTS[:rounds, None]
        out = _feistel(j, params, round_keys)
        small = np.flatnonzero(n <= _SMALL_N)
        if small.size:  # the j-th smallest of n keyed hashes: an exactly uniform-looking order for tiny n
            ns = n[small]
            cols = np.arange(int(ns.max()), dtype=np.uint64)
            h = _mix64_array(round_keys[0, small, None] + cols[None, :] * _GOLDEN)
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
        seed: all randomness comes from (seed, epoch, step).
        num_replicas, rank: when iterating outside accelerate, yield only this rank's slice of each global
            draw. Leave at 1/0 when the DataLoader goes through `accelerator.prepare`, which shards batches.
        num_samples: indices per epoch when iterating (None: infinite).
    """

    def __init__(self, region_ids, batch_size: int = 1, probabilities=None, seed: int = 0,
                 num_replicas: int = 1, rank: int = 0, num_samples: int | None = None) -> None:
        ids = np.asarray(region_ids)
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError(f"region_ids must be a non-empty 1-D array, got shape {ids.shape}")
        if not np.issubdtype(ids.dtype, np.integer) or int(ids.min()) < 0:
            raise ValueError("region_ids must be non-negative integers")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} must be >= 1")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank!r} must lie in [0, num_replicas={num_replicas})")
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
        self.seed = int(seed)
        self.num_replicas, self.rank = int(num_replicas), int(rank)
        self.num_samples = num_samples
        self.epoch = 0
        self.step = 0  # next step to draw when iterating
        self.counters = np.zeros(self.num_regions, dtype=np.int64)  # draws so far per region
        self.probabilities = self.sizes / self.sizes.sum()
        if probabilities is not None:
            self.set_probabilities(probabilities)

    # ----------------------------------------------------------------------------------- probabilities
    def set_probabilities(self, probabilities) -> None:
        p = np.asarray(probabilities.detach().cpu() if isinstance(probabilities, torch.Tensor) else probabilities,
                       dtype=np.float64).reshape(-1)
        if p.shape != (self.num_regions,):
            raise ValueError(f"got {p.size} probabilities for {self.num_regions} regions")
        if np.any(p < 0) or not np.all(np.isfinite(p)) or p.sum() <= 0:
            raise ValueError("region probabilities must be finite, non-negative and not all zero")
        self.probabilities = p / p.sum()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    # ----------------------------------------------------------------------------------- drawing
    def _rng(self, step: int) -> np.random.Generator:
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence([self.seed, self.epoch, int(step)])))

    def draw_regions(self, step: int, n: int) -> np.ndarray:
        """The regions of one global draw of `n` samples at `step` (does not advance counters)."""
        u = self._rng(step).random(n)
        cdf = np.cumsum(self.probabilities)
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
            key = _mix64_array(regions.astype(np.uint64) * np.uint64(0x100000001B3)
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
        per_rank = self.batch_size // self.num_replicas if self.num_replicas > 1 else self.batch_size
        if self.num_replicas > 1 and self.batch_size % self.num_replicas:
            raise ValueError(f"batch_size={self.batch_size} must be divisible by num_replicas={self.num_replicas}")
        yielded = 0
        while self.num_samples is None or yielded < self.num_samples:
            idx, _ = self.draw(self.step, per_rank)
            self.step += 1
            for i in idx.tolist():
                if self.num_samples is not None and yielded >= self.num_samples:
                    return
                yielded += 1
                yield i

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
        return {
            "counters": torch.from_numpy(self.counters.copy()),
            "probabilities": torch.from_numpy(self.probabilities.copy()),
            "step": int(self.step),
            "epoch": int(self.epoch),
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
        self.step, self.epoch, self.seed = int(state["step"]), int(state["epoch"]), int(state["seed"])
