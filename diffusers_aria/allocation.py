r"""Allocation policies: from per-region discrepancy estimates to region sampling probabilities.

Every policy has the same small protocol: construct it with the region sizes, call `step(step, tracker)`
after each tracker update to get the probabilities for the next draw, and `state_dict`/`load_state_dict`
to checkpoint it. Probabilities are float64, sum to one, and are a deterministic function of the tracker
history, so every rank computes bit-identical values.

Policies:
    * `ARIAAllocation` (default): :math:`p_k \propto s_k^\alpha \exp(\hat\theta_k/\tau)`, with :math:`s_k` the
      region size and :math:`\hat\theta_k` the region's *credible* relative excess discrepancy (posterior
      mean under an empirical-Bayes model of the tracker's means and standard errors, `credible_excess`),
      kept within per-region bounds (floor, and a cap on p/prior), damped toward the target, and equal to
      the prior until a warm-up is over. With no real differences it stays at the prior at any K; with
      equal estimates and alpha=1 it is exactly `PromptUniform` (Random Conditioning); the default
      alpha=0.5 tempers the size prior toward small regions (the quality benchmark's evidence).
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
    """Base class: holds the region sizes, their prompt share (what RC draws) and the current probabilities."""

    name = "base"

    def __init__(self, sizes) -> None:
        sizes = np.asarray(sizes, dtype=np.float64).reshape(-1)
        if sizes.size == 0 or np.any(sizes <= 0) or not np.all(np.isfinite(sizes)):
            raise ValueError(f"region sizes must be positive and finite, got {sizes[:8]}... ({sizes.size} regions)")
        self.sizes = sizes
        self.num_regions = sizes.size
        self.prompt_share = _normalise(sizes)
        self.probabilities = self.initial_probabilities()

    def initial_probabilities(self) -> np.ndarray:
        return self.prompt_share.copy()

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


def standardise(estimates: np.ndarray, clip: float | None = 3.0) -> np.ndarray:
    """z-scores across regions (zeros when the estimates do not vary), optionally clipped to [-clip, clip].

    This is the score of `ARIAAllocation(score="zscore")`, the rule before the credible-excess default: it
    turns any spread of the estimates, noise included, into unit spread.
    """
    e = np.asarray(estimates, dtype=np.float64)
    sd = e.std()
    if not np.isfinite(sd) or sd <= 1e-12 * max(abs(e.mean()), 1.0):
        return np.zeros_like(e)
    z = (e - e.mean()) / sd
    return np.clip(z, -clip, clip) if clip is not None else z


def credible_excess(means, standard_errors, threshold: float = 1.0) -> tuple[np.ndarray, float]:
    r"""Posterior-mean relative excess of each region over the average, and the real between-region variance.

    With :math:`x_k = \bar y_k / \bar y - 1` (the region's relative excess) measured with standard error
    :math:`s_k`, the model is :math:`x_k \sim N(\theta_k, s_k^2)` with true excesses
    :math:`\theta_k \sim N(m, A)` across regions. The real spread :math:`A` is estimated by the
    DerSimonian-Laird method of moments from Cochran's :math:`Q = \sum_k w_k (x_k - \bar x_w)^2`
    (:math:`w_k = 1/s_k^2`), which has expectation :math:`K-1` when all regions are equal: only the part of
    :math:`Q` above :math:`K - 1 + c\sqrt{2(K-1)}` (`threshold` = c, in null standard deviations of Q)
    counts as real, so pure noise gives :math:`A = 0` most of the time and a small :math:`A` otherwise. The
    score is the posterior mean of the excess,

    .. math:: \hat\theta_k - m = \frac{A}{A + s_k^2}\,(x_k - \bar x_w),

    which is sized by how much harder the region is *and* how sure the tracker is of it: a region measured
    with :math:`s_k^2 \gg A` keeps almost nothing of its observed excess.

    Args:
        means: per-region raw mean (NaN or inf standard error: unobserved, score 0).
        standard_errors: per-region standard error of `means`; all zero means exact estimates (score = excess).
        threshold: c above.

    Returns:
        (score [K], A).
    """
    mu = np.asarray(means, dtype=np.float64)
    se = np.asarray(standard_errors, dtype=np.float64)
    seen = np.isfinite(mu) & np.isfinite(se)
    score = np.zeros_like(mu)
    if seen.sum() < 2:
        return score, 0.0
    scale = np.average(mu[seen])
    if not np.isfinite(scale) or scale <= 0:
        scale = 1.0
    x = mu[seen] / scale - 1.0
    s2 = (se[seen] / scale) ** 2
    if not np.any(s2 > 0):  # exact estimates: the excess itself
        score[seen] = x - x.mean()
        return score, float(x.var())
    s2 = np.maximum(s2, 1e-12 * s2.max())
    w = 1.0 / s2
    xw = float((w * x).sum() / w.sum())
    q = float((w * (x - xw) ** 2).sum())
    df = seen.sum() - 1
    denom = float(w.sum() - (w * w).sum() / w.sum())
    a = max(q - df - threshold * np.sqrt(2.0 * df), 0.0) / denom if denom > 0 else 0.0
    if a > 0:
        score[seen] = a / (a + s2) * (x - xw)
    return score, float(a)


class ARIAAllocation(AllocationPolicy):
    r"""ARIA: a tempered size prior tilted by each region's credible excess discrepancy, bounded and damped.

    .. math:: p_k \propto s_k^\alpha \exp(\hat\theta_k / \tau)

    with :math:`s_k` the region size and :math:`\hat\theta_k` the posterior-mean relative excess of
    `credible_excess` (derived there and in docs/architecture.md): a region credibly 10% harder than the
    average gets :math:`e^{0.1/\tau}` times its prior share before normalisation; differences within the
    estimation noise give :math:`\hat\theta \approx 0`, i.e. the prior. The target is kept within a floor
    and a cap on :math:`p_k/\text{prior}_k`, the probabilities move toward it by `damping` per update, and
    they are the prior until `warmup_steps` updates have been seen. With equal estimates and alpha=1 it is
    exactly `PromptUniform` (Random Conditioning).

    Args:
        sizes: prompts per region.
        alpha: size exponent of the prior (1 = prompt-uniform/RC, 0 = region-uniform). The default 0.5 gives
            small regions more draws than their prompt share (the quality benchmark's evidence,
            docs/benchmarks-quality.md).
        tau: temperature, in units of relative excess for score="credible" (a credible excess of tau
            multiplies the weight by e), in standard deviations for score="zscore".
        score: "credible" (default) or "zscore", the earlier rule `exp(z / tau)` with z standardised across
            regions, kept for comparison: it moves on pure noise (docs/benchmarks-calibration.md).
        threshold: heterogeneity threshold c of `credible_excess` (score="credible").
        floor: each region keeps at least `min(prior_k, floor / K)`; a tilt never starves a region.
        max_ratio: no region gets more than `max_ratio` times its prior share (None: no bound). It bounds the
            concentration of swaps on a few regions, which costs prompt diversity.
        cap: no region gets more than `max(prior_k, cap)` of the probability (None: no cap).
        damping: step size toward the target each update (1 = jump to the target).
        warmup_steps: the prior is used until this many updates have been seen.
        z_clip: clip z-scores to [-z_clip, z_clip] (score="zscore").
    """

    name = "aria"

    def __init__(self, sizes, alpha: float = 0.5, tau: float = 0.1, score: str = "credible",
                 threshold: float = 1.0, floor: float = 0.05, max_ratio: float | None = 4.0,
                 cap: float | None = None, damping: float = 0.1, warmup_steps: int = 40,
                 z_clip: float | None = 3.0) -> None:
        if score not in SCORES:
            raise ValueError(f"score={score!r} is not valid; use one of {', '.join(SCORES)}")
        if not tau > 0:
            raise ValueError(f"tau={tau!r} must be > 0")
        if not threshold >= 0:
            raise ValueError(f"threshold={threshold!r} must be >= 0")
        if not 0 <= floor <= 1:
            raise ValueError(f"floor={floor!r} must lie in [0, 1]")
        if max_ratio is not None and not max_ratio >= 1:
            raise ValueError(f"max_ratio={max_ratio!r} must be >= 1 (or None for no bound)")
        if cap is not None and not 0 < cap <= 1:
            raise ValueError(f"cap={cap!r} must lie in (0, 1] or be None")
        if not 0 < damping <= 1:
            raise ValueError(f"damping={damping!r} must lie in (0, 1]")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps!r} must be >= 0")
        self.alpha, self.tau, self.score, self.threshold = float(alpha), float(tau), score, float(threshold)
        self.floor, self.max_ratio, self.cap, self.damping = float(floor), max_ratio, cap, float(damping)
        self.warmup_steps, self.z_clip = int(warmup_steps), z_clip
        super().__init__(sizes)
        self.prior = _normalise(self.sizes ** self.alpha)
        self.lower = np.minimum(self.prior, self.floor / self.num_regions)
        self.upper = np.ones_like(self.prior) if cap is None else np.maximum(self.prior, float(cap))
        if max_ratio is not None:
            self.upper = np.minimum(self.upper, float(max_ratio) * self.prior)
        self.probabilities = self.prior.copy()
        self.between_variance = 0.0  # A of the latest credible score (logged as aria/real_spread)

    def tilt(self, estimates: np.ndarray, standard_errors: np.ndarray | None = None) -> np.ndarray:
        """Unnormalised weights exp(score / tau) per region."""
        e = np.asarray(estimates, dtype=np.float64)
        if self.score == "zscore":
            return np.exp(standardise(e, self.z_clip) / self.tau)
        se = np.zeros_like(e) if standard_errors is None else standard_errors
        score, self.between_variance = credible_excess(e, se, self.threshold)
        return np.exp(score / self.tau)

    def target(self, estimates: np.ndarray, standard_errors: np.ndarray | None = None) -> np.ndarray:
        """The undamped allocation for given per-region means (and their standard errors; None: exact)."""
        w = self.tilt(estimates, standard_errors)
        if np.all(w == w[0]):
            return self.prior.copy()
        return project_to_bounds(_normalise(self.prior * w), self.lower, self.upper)

    def target_from(self, tracker) -> np.ndarray:
        """The undamped allocation for the tracker's current evidence."""
        if self.score == "zscore":
            return self.target(tracker.estimates())
        # The pooled variance: weights estimated from the same samples as the means bias Cochran's Q low
        # (measured under the null at K=1024: Q/df = 0.88 with per-region variances, 1.00 pooled).
        return self.target(tracker.raw_means(), tracker.standard_errors(pooled=True))

    def step(self, step: int, tracker) -> np.ndarray:
        if tracker.num_updates < self.warmup_steps:
            self.probabilities = self.prior.copy()
            return self.probabilities
        target = self.target_from(tracker)
        p = self.probabilities + self.damping * (target - self.probabilities)
        self.probabilities = p / p.sum() if abs(p.sum() - 1.0) > 1e-12 else p
        return self.probabilities


SCORES = ("credible", "zscore")


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
        self.probabilities = self.target_from(tracker)
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
    softmax of the log-weights over the prompt share, smoothed with `smoothing` of uniform mass.
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
        self.probabilities = self._mix(self.prompt_share, self.smoothing)
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


def policy_arguments(name: str) -> set[str]:
    """The keyword arguments policy `name` takes (besides `sizes`)."""
    cls = POLICIES[name]
    accepted = set(inspect.signature(cls.__init__).parameters)
    if cls is StaticAfterWarmup:
        accepted |= set(inspect.signature(ARIAAllocation.__init__).parameters) - {"damping"}
    return accepted - {"self", "sizes", "aria_kwargs"}


def make_policy(name: str, sizes, **kwargs) -> AllocationPolicy:
    """Build a policy by name from the keyword arguments it takes (see `policy_arguments`).

    Names: aria, rc, region_uniform, static, doremi, exp3. A `None` value is passed on (e.g. `max_ratio=None`
    removes ARIA's bound). An argument the policy does not take is an error naming the policy and what it
    takes, rather than a setting that silently does nothing.
    """
    if name not in POLICIES:
        raise ValueError(f"unknown allocation {name!r}; valid choices: {', '.join(POLICIES)}")
    accepted = policy_arguments(name)
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise TypeError(f"allocation {name!r} does not take {', '.join(unknown)}; it takes "
                        f"{', '.join(sorted(accepted)) or 'no arguments'}")
    return POLICIES[name](sizes, **kwargs)
