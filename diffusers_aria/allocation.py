r"""Allocation policies: from per-region discrepancy estimates to region sampling probabilities.

Every policy has the same small protocol: construct it with the region sizes, call `step(step, tracker)`
after each tracker update to get the probabilities for the next draw, and `state_dict`/`load_state_dict`
to checkpoint it. Probabilities are float64, sum to one, and are a deterministic function of the tracker
history, so every rank computes bit-identical values.

Policies:
    * `ARIAAllocation` (default): :math:`p_k \propto s_k^\alpha \exp(z_k/\tau)`, with :math:`s_k` the region
      size and :math:`z_k` the region's discrepancy estimate standardised across regions, kept within
      per-region bounds (floor and cap), damped toward the target, and equal to the prior until a warm-up
      is over. With equal estimates and alpha=1 it is exactly `PromptUniform` (Random Conditioning); the
      default alpha=0.5 tempers the size prior toward small regions (the quality benchmark's evidence).
    * `PromptUniform`: every prompt equally likely (RC); `RegionUniform`: every region equally likely.
    * `StaticAfterWarmup`: ARIA's target computed once at the end of the warm-up, then frozen.
    * `DoReMiEG`: exponentiated-gradient ascent on the excess discrepancy with uniform smoothing.
    * `EXP3`: the adversarial bandit, rewarded by the normalised loss of the regions drawn.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch


def _normalise(w: np.ndarray) -> np.ndarray:
    return w / w.sum()


def project_to_bounds(target: np.ndarray, lower: np.ndarray, upper: np.ndarray, iters: int = 100) -> np.ndarray:
    """Closest-in-ratio distribution to `target` within [lower, upper] per entry, summing to one.

    Entries outside their bounds are pinned to the bound; the free entries are rescaled to fill the rest
    (water-filling). Requires sum(lower) <= 1 <= sum(upper). If `target` is already inside, it is returned
    unchanged (bit for bit).
    """
    p = target.copy()
    if np.all(p >= lower) and np.all(p <= upper):
        return p
    # The solution is clip(lam * target, lower, upper) with the scale lam where the sum is one. The sum is
    # nondecreasing in lam and linear between the knots lower_k/target_k and upper_k/target_k: find the knot
    # interval holding the solution by bisection, then rescale its free entries exactly. (`iters` bounds the
    # bisection; log2 of the number of knots steps suffice.)
    pos = target > 0
    knots = np.unique(np.concatenate([[0.0], lower[pos] / target[pos], upper[pos] / target[pos]]))

    def total(lam: float) -> float:
        return float(np.clip(lam * target, lower, upper).sum())

    lo_i, hi_i = 0, len(knots) - 1  # invariant: total(knots[lo_i]) <= 1 (sum(lower) <= 1)
    if total(knots[hi_i]) <= 1.0:
        lo_i = hi_i
    for _ in range(iters):
        if hi_i - lo_i <= 1:
            break
        mid = (lo_i + hi_i) // 2
        if total(knots[mid]) <= 1.0:
            lo_i = mid
        else:
            hi_i = mid
    lam = knots[lo_i] + 1.0 if lo_i == hi_i else 0.5 * (knots[lo_i] + knots[hi_i])
    p = np.clip(lam * target, lower, upper)
    free = pos & (lam * target > lower) & (lam * target < upper)
    mass = target[free].sum()
    if free.any() and mass > 0:
        p[free] = target[free] * ((1.0 - p[~free].sum()) / mass)
    return p


class AllocationPolicy:
    """Base class: holds the region sizes, the prompt-uniform prior and the current probabilities."""

    name = "base"

    def __init__(self, sizes) -> None:
        sizes = np.asarray(sizes, dtype=np.float64).reshape(-1)
        if sizes.size == 0 or np.any(sizes <= 0) or not np.all(np.isfinite(sizes)):
            raise ValueError(f"region sizes must be positive and finite, got {sizes[:8]}... ({sizes.size} regions)")
        self.sizes = sizes
        self.num_regions = sizes.size
        self.prompt_prior = _normalise(sizes)
        self.probabilities = self.initial_probabilities()

    def initial_probabilities(self) -> np.ndarray:
        return self.prompt_prior.copy()

    def step(self, step: int, tracker) -> np.ndarray:
        """Probabilities for the next draw, given the tracker after the update of `step`."""
        return self.probabilities

    def state_dict(self) -> dict[str, Any]:
        return {"probabilities": torch.from_numpy(self.probabilities.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        p = np.asarray(state["probabilities"], dtype=np.float64)
        if p.shape != (self.num_regions,):
            raise ValueError(f"allocation state has {p.size} regions but this policy has {self.num_regions}")
        self.probabilities = p.copy()

    def config(self) -> dict[str, Any]:
        """The constructor arguments other than sizes (for logs and model cards)."""
        params = inspect.signature(type(self).__init__).parameters
        return {k: getattr(self, k) for k in params if k not in ("self", "sizes") and hasattr(self, k)}


class PromptUniform(AllocationPolicy):
    """Random Conditioning: each prompt of the pool equally likely, i.e. p_k proportional to region size."""

    name = "rc"


class RegionUniform(AllocationPolicy):
    """Every region equally likely, whatever its size."""

    name = "region_uniform"

    def initial_probabilities(self) -> np.ndarray:
        return np.full(self.num_regions, 1.0 / self.num_regions)


def standardise(estimates: np.ndarray, clip: float | None = 3.0, uncertainty: np.ndarray | None = None
                ) -> np.ndarray:
    r"""z-scores across regions (zeros when the estimates do not vary), optionally clipped to [-clip, clip].

    With `uncertainty` (each estimate's standard error :math:`s_k`), the score is noise-aware (empirical
    Bayes): the spread that is real is :math:`\tau^2 = \max(\operatorname{var}(e) - \overline{s^2}, 0)`, and
    :math:`z_k = (e_k - \bar e)\,\tau / (\tau^2 + s_k^2)` -- the shrunk deviation in units of the real
    spread. Differences that are consistent (small :math:`s_k`) keep their full standardised score however
    small they are; differences within the noise give z near 0, i.e. the prior (RC with alpha=1).
    """
    e = np.asarray(estimates, dtype=np.float64)
    sd = e.std()
    if not np.isfinite(sd) or sd <= 1e-12 * max(abs(e.mean()), 1.0):
        return np.zeros_like(e)
    se2 = None if uncertainty is None else np.asarray(uncertainty, dtype=np.float64) ** 2
    if se2 is None or not np.any(se2 > 0):  # exact estimates: the plain standardised score
        z = (e - e.mean()) / sd
    else:
        finite = np.isfinite(se2)
        if not finite.any():
            return np.zeros_like(e)
        real = sd * sd - se2[finite].mean()
        if real <= 1e-12 * sd * sd:
            return np.zeros_like(e)
        tau = np.sqrt(real)
        z = np.where(finite, (e - e.mean()) * tau / (real + np.where(finite, se2, 0.0)), 0.0)
    return np.clip(z, -clip, clip) if clip is not None else z


class ARIAAllocation(AllocationPolicy):
    r"""ARIA: tempered size prior times a function of the standardised discrepancy, bounded and damped.

    Args:
        sizes: prompts per region.
        alpha: size exponent of the prior (1 = prompt-uniform/RC, 0 = region-uniform). The default 0.5 gave
            small regions, whose few prompts the student fits before it generalises over the region, more
            draws than RC does; in the quality benchmark it captured more of the oracle's gain on unseen and
            rare prompts than alpha=1 on both prompt pools, and stayed within noise of RC where every
            region is seen (docs/benchmarks-quality.md).
        tau: temperature of the discrepancy tilt `exp(z / tau)` (form="exp").
        form: "exp" (standardised score with temperature, default) or "ratio" (`(estimate/mean) ** beta`).
        beta: exponent of the "ratio" form.
        floor: each region keeps at least `min(prior_k, floor / K)`; a tilt never starves a region.
        cap: no region gets more than `max(prior_k, cap)` (None: no cap).
        damping: step size toward the target each update (1 = jump to the target).
        warmup_steps: the prior is used until this many updates have been seen.
        z_clip: clip z-scores to [-z_clip, z_clip].
        noise_aware: score regions with the empirical-Bayes z of `standardise` (using the tracker's standard
            errors), so that differences within the estimation noise do not move the allocation. Off by
            default: in the quality benchmark (docs/benchmarks-quality.md) it shrank the real 20-40% excess
            of unseen regions to z < 1 and captured about 40% of the oracle's gain, where the plain
            z-score captured all of it. The price of the plain score: on pure noise (the embedded demo,
            estimates within a few percent) it still moves probabilities, to between 0.02x and 4.5x the
            prompt-uniform prior at the end of the demo with the defaults.
    """

    name = "aria"

    def __init__(self, sizes, alpha: float = 0.5, tau: float = 0.5, form: str = "exp", beta: float = 1.0,
                 floor: float = 0.05, cap: float | None = None, damping: float = 0.1, warmup_steps: int = 40,
                 z_clip: float | None = 3.0, noise_aware: bool = False) -> None:
        if form not in ("exp", "ratio"):
            raise ValueError(f"form={form!r} is not valid; use 'exp' or 'ratio'")
        if not tau > 0:
            raise ValueError(f"tau={tau!r} must be > 0")
        if not 0 <= floor <= 1:
            raise ValueError(f"floor={floor!r} must lie in [0, 1]")
        if cap is not None and not 0 < cap <= 1:
            raise ValueError(f"cap={cap!r} must lie in (0, 1] or be None")
        if not 0 < damping <= 1:
            raise ValueError(f"damping={damping!r} must lie in (0, 1]")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps!r} must be >= 0")
        self.alpha, self.tau, self.form, self.beta = float(alpha), float(tau), form, float(beta)
        self.floor, self.cap, self.damping = float(floor), cap, float(damping)
        self.warmup_steps, self.z_clip, self.noise_aware = int(warmup_steps), z_clip, bool(noise_aware)
        super().__init__(sizes)
        self.prior = _normalise(self.sizes ** self.alpha)
        self.lower = np.minimum(self.prior, self.floor / self.num_regions)
        self.upper = np.ones_like(self.prior) if cap is None else np.maximum(self.prior, float(cap))
        self.probabilities = self.prior.copy()

    def tilt(self, estimates: np.ndarray, uncertainty: np.ndarray | None = None) -> np.ndarray:
        if self.form == "exp":
            return np.exp(standardise(estimates, self.z_clip, uncertainty) / self.tau)
        e = np.asarray(estimates, dtype=np.float64)
        return np.maximum(e / max(e.mean(), 1e-12), 1e-12) ** self.beta

    def target(self, estimates: np.ndarray, uncertainty: np.ndarray | None = None) -> np.ndarray:
        """The undamped allocation for given estimates (and standard errors), within the floor and cap."""
        w = self.tilt(estimates, uncertainty)
        if np.all(w == w[0]):
            return self.prior.copy()
        return project_to_bounds(_normalise(self.prior * w), self.lower, self.upper)

    def _uncertainty(self, tracker) -> np.ndarray | None:
        return tracker.uncertainty() if self.noise_aware else None

    def step(self, step: int, tracker) -> np.ndarray:
        if tracker.num_updates < self.warmup_steps:
            self.probabilities = self.prior.copy()
            return self.probabilities
        target = self.target(tracker.estimates(), self._uncertainty(tracker))
        p = self.probabilities + self.damping * (target - self.probabilities)
        self.probabilities = p / p.sum() if abs(p.sum() - 1.0) > 1e-12 else p
        return self.probabilities


class StaticAfterWarmup(ARIAAllocation):
    """ARIA's target computed once when the warm-up ends, then kept fixed for the rest of training."""

    name = "static"

    def __init__(self, sizes, warmup_steps: int = 40, **aria_kwargs) -> None:
        aria_kwargs.pop("damping", None)
        super().__init__(sizes, warmup_steps=warmup_steps, damping=1.0, **aria_kwargs)
        self.frozen = False

    def step(self, step: int, tracker) -> np.ndarray:
        if self.frozen:
            return self.probabilities
        if tracker.num_updates < self.warmup_steps:
            self.probabilities = self.prior.copy()
            return self.probabilities
        self.probabilities = self.target(tracker.estimates(), self._uncertainty(tracker))
        self.frozen = True
        return self.probabilities

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "frozen": bool(self.frozen)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.frozen = bool(state["frozen"])


class _LogWeightPolicy(AllocationPolicy):
    """Shared state for policies that keep log-weights (DoReMi, EXP3)."""

    def __init__(self, sizes) -> None:
        super().__init__(sizes)
        self.log_weights = np.zeros(self.num_regions)

    def _mix(self, base: np.ndarray, smoothing: float) -> np.ndarray:
        lw = self.log_weights + np.log(base)
        w = np.exp(lw - lw.max())
        return (1.0 - smoothing) * _normalise(w) + smoothing / self.num_regions

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "log_weights": torch.from_numpy(self.log_weights.copy())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.log_weights = np.asarray(state["log_weights"], dtype=np.float64).copy()


class DoReMiEG(_LogWeightPolicy):
    """DoReMi-style exponentiated gradient: log-weights ascend the clipped excess discrepancy.

    Each update adds `lr * max(estimate_k - mean, 0)` to region k's log-weight; probabilities are the
    softmax of the log-weights over the prompt-uniform prior, smoothed with `smoothing` of uniform mass.
    """

    name = "doremi"

    def __init__(self, sizes, lr: float = 0.5, smoothing: float = 0.05, warmup_steps: int = 40) -> None:
        if not 0 <= smoothing <= 1:
            raise ValueError(f"smoothing={smoothing!r} must lie in [0, 1]")
        self.lr, self.smoothing, self.warmup_steps = float(lr), float(smoothing), int(warmup_steps)
        super().__init__(sizes)

    def step(self, step: int, tracker) -> np.ndarray:
        if tracker.num_updates < self.warmup_steps:
            return self.probabilities
        est = tracker.estimates()
        self.log_weights += self.lr * np.maximum(est - tracker.global_mean(), 0.0)
        self.log_weights -= self.log_weights.max()
        self.probabilities = self._mix(self.prompt_prior, self.smoothing)
        return self.probabilities


class EXP3(_LogWeightPolicy):
    """EXP3 over regions: reward of a region is its normalised batch loss mapped to [0, 1], importance-weighted.

    Args:
        gamma: uniform exploration mass.
        eta: learning rate (default gamma / K).
    """

    name = "exp3"

    def __init__(self, sizes, gamma: float = 0.1, eta: float | None = None, warmup_steps: int = 0) -> None:
        if not 0 < gamma <= 1:
            raise ValueError(f"gamma={gamma!r} must lie in (0, 1]")
        self.gamma, self.warmup_steps = float(gamma), int(warmup_steps)
        super().__init__(sizes)
        self.eta = float(eta) if eta is not None else self.gamma / self.num_regions
        self.probabilities = self._mix(np.full(self.num_regions, 1.0 / self.num_regions), self.gamma)

    def step(self, step: int, tracker) -> np.ndarray:
        counts, means = tracker.last_batch_means()
        total = counts.sum()
        if total > 0 and tracker.num_updates > self.warmup_steps:
            seen = counts > 0
            reward = np.clip(means[seen] / 2.0, 0.0, 1.0)  # normalised loss ~1 on average -> reward ~0.5
            est = reward * counts[seen] / (total * self.probabilities[seen])
            self.log_weights[seen] += self.eta * est
            self.log_weights -= self.log_weights.max()
        self.probabilities = self._mix(np.full(self.num_regions, 1.0 / self.num_regions), self.gamma)
        return self.probabilities


POLICIES: dict[str, type[AllocationPolicy]] = {
    "aria": ARIAAllocation,
    "rc": PromptUniform,
    "region_uniform": RegionUniform,
    "static": StaticAfterWarmup,
    "doremi": DoReMiEG,
    "exp3": EXP3,
}


def make_policy(name: str, sizes, **kwargs) -> AllocationPolicy:
    """Build a policy by name; keyword arguments the policy does not take are ignored.

    Names: aria, rc, region_uniform, static, doremi, exp3.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown allocation {name!r}; valid choices: {', '.join(POLICIES)}")
    cls = POLICIES[name]
    accepted = set(inspect.signature(cls.__init__).parameters)
    if cls is StaticAfterWarmup:
        accepted |= set(inspect.signature(ARIAAllocation.__init__).parameters) - {"damping"}
    return cls(sizes, **{k: v for k, v in kwargs.items() if k in accepted and v is not None})
