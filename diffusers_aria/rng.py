"""Random streams as pure functions of their keys, so that every rank and every resume draws the same.

* `mix64_array`: a 64-bit mixing function (SplitMix64's finaliser) over numpy arrays.
* `keyed_permutation` / `permute` / `feistel_params`: the j-th element of a keyed pseudo-random permutation
  of `range(n)`, computed without storing the permutation (a cycle-walking Feistel network; exact sorting
  of hashes for small n). `AdaptiveRegionSampler` draws within a region with it, `StepBatchSampler` orders
  the paired rows.
* `step_generator`: a torch generator seeded by `(seed, step, rank, salt)`, the source of a step's noise,
  timesteps and swap coins.
"""

from __future__ import annotations

import numpy as np
import torch

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_MUL1, _MUL2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)
GOLDEN = np.uint64(0x9E3779B97F4A7C15)
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
    return permute(j, n, key, params, rounds).astype(np.int64).reshape(shape)


def permute(j: np.ndarray, n: np.ndarray, key: np.ndarray, params: np.ndarray, rounds: int = 4) -> np.ndarray:
    """`keyed_permutation` on flat uint64 arrays of one length (no checks, no broadcasting); uint64 out."""
    with np.errstate(over="ignore"):
        # one mix of the key; round r xors a distinct constant in (the round function hashes again)
        round_keys = mix64_array(key)[None, :] ^ _ROUND_CONSTANTS[:rounds, None]
        out = _feistel(j, params, round_keys)
        small = np.flatnonzero(n <= _SMALL_N)
        if small.size:  # the j-th smallest of n keyed hashes: an exactly uniform-looking order for tiny n
            ns = n[small]
            cols = np.arange(int(ns.max()), dtype=np.uint64)
            h = mix64_array(round_keys[0, small, None] + cols[None, :] * GOLDEN)
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


def step_generator(seed: int, step: int, rank: int, salt: int = 0) -> torch.Generator:
    """A torch generator seeded by (seed, step, rank, salt) — the source of a step's noise and timesteps."""
    state = np.random.SeedSequence([int(seed), int(step), int(rank), int(salt)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state % (2**63 - 1)))


__all__ = ["GOLDEN", "feistel_params", "keyed_permutation", "mix64_array", "permute", "step_generator"]
