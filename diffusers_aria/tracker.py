"""Online per-region estimates of teacher-student discrepancy.

The signal is the per-sample value of the (unchanged) distillation loss. Diffusion losses vary strongly with the
timestep and fall as the student learns, so every sample is scored *when it arrives*, relative to the current
baseline of its timestep bin (the mean loss of the bin's latest `baseline_samples` samples, over all regions):
a value of 1.2 means 20% above what a sample of that timestep costs at this point of training. A region's
statistics are discounted sums of these scores (count, sum, sum of squares, sum of squared weights) with a
half-life in updates; its estimate is the mean score (1.0 = as hard as average), shrunk toward the global mean
when the region has little evidence, with a Kish standard error. Scoring at arrival keeps the learning curve out
of the statistics: scored against one long-run baseline, early samples (10x larger losses) dominate a region's
mean and variance for as long as its memory lasts.

Everything is linear in the data given the baseline before the update, and every rank holds the same baseline,
so the update with the concatenation of several ranks' batches equals the update with their summed
`batch_statistics`. A region that is not observed loses its evidence and drifts back to the prior.
Non-finite losses are counted and ignored, never absorbed. The derivations (the tracking-error bound, Kish
standard errors of discounted means, the pooled variance) are in docs/architecture.md.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch


def _as_numpy(x: Any, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu")
        if x.dtype in (torch.bfloat16, torch.float16):
            x = x.float()
        x = x.numpy()
    return np.asarray(x, dtype=dtype).reshape(-1)


def tracking_error_bound(half_life: float, sigma: float, drift: float, samples_per_step: float = 1.0,
                         c: float = 3.0, kappa: float = 0.0, gap: float = 0.0) -> float:
    """Steady-state bound on |estimate - truth| for one region (docs/architecture.md, "Tracking error"):
    lag `drift * g / (1 - g)` + noise `c * sigma * sqrt((1 - g) / ((1 + g) m))` + shrinkage `kappa / (n + kappa) * gap`,
    with g = 2**(-1/half_life), m samples per step and n = m / (1 - g)."""
    g = 0.5 ** (1.0 / half_life)
    n_eff = samples_per_step / (1.0 - g)
    lag = drift * g / (1.0 - g)
    noise = c * sigma * math.sqrt((1.0 - g) / ((1.0 + g) * samples_per_step))
    shrink = kappa / (n_eff + kappa) * abs(gap)
    return lag + noise + shrink


class DiscrepancyTracker:
    """Discounted per-region discrepancy statistics of samples scored against their timestep bin's baseline.

    Args:
        num_regions: K.
        half_life: updates after which an observation's weight halves (`None` or `inf`: no discounting).
        num_timestep_bins: bins of [0, num_train_timesteps) with a baseline each.
        num_train_timesteps: T of the noise scheduler.
        normalize_timesteps: score samples against their timestep bin's baseline (False: the raw losses are the
            scores, with no baseline at all).
        prior_strength: kappa, pseudo-count pulling every region's estimate toward the global mean.
        variance_pooling: pseudo-degrees of freedom of the pooled within-region variance in each region's variance.
        samples_per_half_life: lengthen the half-life of an update of b samples to `samples_per_half_life * K / b`
            updates when that is longer than `half_life` (None: `half_life` alone). An update without samples
            does not decay.
        baseline_samples: a bin's baseline is the mean loss of about its latest this-many samples (its weights halve
            every `baseline_samples` samples of the bin), so it follows the learning curve.
    """

    def __init__(
        self,
        num_regions: int,
        half_life: float | None = 50.0,
        num_timestep_bins: int = 10,
        num_train_timesteps: int = 1000,
        normalize_timesteps: bool = True,
        prior_strength: float = 8.0,
        variance_pooling: float = 30.0,
        samples_per_half_life: float | None = 50.0,
        baseline_samples: float = 50.0,
    ) -> None:
        if int(num_regions) < 1:
            raise ValueError(f"num_regions={num_regions!r} must be >= 1")
        if half_life is not None and not (half_life > 0):
            raise ValueError(f"half_life={half_life!r} must be > 0 (or None for no discounting)")
        if int(num_timestep_bins) < 1:
            raise ValueError(f"num_timestep_bins={num_timestep_bins!r} must be >= 1")
        if prior_strength < 0:
            raise ValueError(f"prior_strength={prior_strength!r} must be >= 0")
        if samples_per_half_life is not None and not samples_per_half_life > 0:
            raise ValueError(f"samples_per_half_life={samples_per_half_life!r} must be > 0 (or None)")
        if not variance_pooling >= 0:
            raise ValueError(f"variance_pooling={variance_pooling!r} must be >= 0")
        if not baseline_samples > 0:
            raise ValueError(f"baseline_samples={baseline_samples!r} must be > 0")
        self.num_regions = int(num_regions)
        self.half_life = None if half_life is None or math.isinf(half_life) else float(half_life)
        self.num_timestep_bins = int(num_timestep_bins) if normalize_timesteps else 1
        self.num_train_timesteps = int(num_train_timesteps)
        self.normalize_timesteps = bool(normalize_timesteps)
        self.prior_strength = float(prior_strength)
        self.variance_pooling = float(variance_pooling)
        self.samples_per_half_life = None if samples_per_half_life is None else float(samples_per_half_life)
        self.baseline_samples = float(baseline_samples)
        self.decay = 1.0 if self.half_life is None else 0.5 ** (1.0 / self.half_life)
        k = self.num_regions
        self.s0, self.s1, self.s2 = np.zeros(k), np.zeros(k), np.zeros(k)
        self.q = np.zeros(k)  # discounted sum of squared weights (Kish effective sample size)
        self.b0 = np.zeros(self.num_timestep_bins)  # per-bin baseline: discounted count and loss sum
        self.b1 = np.zeros(self.num_timestep_bins)
        self.num_updates = 0
        self.num_nonfinite = 0
        self.last_nonfinite = 0
        self.last_counts = np.zeros(k)
        self.last_sums = np.zeros(k)

    # ----------------------------------------------------------------------------------- updates
    def _bins(self, timesteps, n: int) -> np.ndarray:
        if timesteps is None or self.num_timestep_bins == 1:
            return np.zeros(n, dtype=np.int64)
        t = _as_numpy(timesteps, np.float64)
        b = np.floor(t * self.num_timestep_bins / self.num_train_timesteps).astype(np.int64)
        return np.clip(b, 0, self.num_timestep_bins - 1)

    def batch_statistics(self, region_ids, losses, timesteps=None, baseline_weights=None) -> tuple[np.ndarray, int]:
        """Sufficient statistics of one batch and its number of non-finite losses.

        Returns float64 [4, K + B]: columns :K are the regions (count, sum and sum of squares of the samples'
        scores against the current baselines, count), columns K: the timestep bins (count, weighted loss sum,
        weighted loss sum of squares, weight sum) for the baselines. Statistics of several parts of one batch
        sum to those of the whole. Samples with a negative region id (e.g. the null prompt) are ignored; samples
        of a bin that has no baseline yet only start it (with `normalize_timesteps=False` every loss is its own
        score). `baseline_weights` (default 1) weigh each sample in its bin's baseline: `ARIACallback` passes
        prompt share / sampling probability of its region, so that the baseline is the loss of the pool's
        average prompt whatever the allocation (a region drawn 10x as often would otherwise raise the baseline
        and lower its own scores).
        """
        r = _as_numpy(region_ids, np.int64)
        v = _as_numpy(losses, np.float64)
        if r.shape != v.shape:
            raise ValueError(f"region_ids has {r.size} entries but losses has {v.size}; they must match")
        b = self._bins(timesteps, r.size)
        if b.shape != r.shape:
            raise ValueError(f"timesteps has {b.size} entries but losses has {v.size}; they must match")
        w = np.ones_like(v) if baseline_weights is None else _as_numpy(baseline_weights, np.float64)
        if w.shape != v.shape:
            raise ValueError(f"baseline_weights has {w.size} entries but losses has {v.size}; they must match")
        if r.size and int(r.max()) >= self.num_regions:
            raise ValueError(f"region id {int(r.max())} is out of range for {self.num_regions} regions")
        finite = np.isfinite(v)
        valid = finite & (r >= 0)
        nonfinite = int((~finite & (r >= 0)).sum())
        k, nb = self.num_regions, self.num_timestep_bins
        rv, bv, vv, wv = r[valid], b[valid], v[valid], w[valid]
        if self.normalize_timesteps:
            base = self.bin_baseline()
            scored = base[bv] > 0
            y, rs = vv[scored] / base[bv[scored]], rv[scored]
        else:
            y, rs = vv, rv
        stats = np.empty((4, k + nb))
        stats[0, :k] = np.bincount(rs, minlength=k)
        stats[1, :k] = np.bincount(rs, weights=y, minlength=k)
        stats[2, :k] = np.bincount(rs, weights=y * y, minlength=k)
        stats[3, :k] = stats[0, :k]
        stats[0, k:] = np.bincount(bv, minlength=nb)
        stats[1, k:] = np.bincount(bv, weights=wv * vv, minlength=nb)
        stats[2, k:] = np.bincount(bv, weights=wv * vv * vv, minlength=nb)
        stats[3, k:] = np.bincount(bv, weights=wv, minlength=nb)
        return stats, nonfinite

    def apply_statistics(self, stats: np.ndarray, nonfinite: int = 0) -> None:
        """Decay the running statistics once, then add a batch's (possibly all-reduced) statistics."""
        stats = np.asarray(stats, dtype=np.float64)
        k = self.num_regions
        if stats.shape != (4, k + self.num_timestep_bins):
            raise ValueError(f"statistics of shape {stats.shape} do not fit {k} regions and "
                             f"{self.num_timestep_bins} timestep bins")
        count, total = stats[0, :k], stats[1, :k]
        d = self.update_decay(float(count.sum()))
        self.s0 *= d
        self.s1 *= d
        self.s2 *= d
        self.q *= d * d
        self.s0 += count
        self.q += count  # a new sample has weight 1, so weight**2 = 1
        self.s1 += total
        self.s2 += stats[2, :k]
        bin_decay = 0.5 ** (stats[0, k:] / self.baseline_samples)  # a half-life in samples of the bin
        self.b0 = self.b0 * bin_decay + stats[3, k:]
        self.b1 = self.b1 * bin_decay + stats[1, k:]
        self.last_counts = count.copy()
        self.last_sums = total.copy()
        self.num_updates += 1
        self.last_nonfinite = int(nonfinite)
        self.num_nonfinite += int(nonfinite)

    def update_decay(self, num_samples: float) -> float:
        """The decay applied by an update of `num_samples` samples (see `samples_per_half_life`)."""
        if self.half_life is None:
            return 1.0
        if self.samples_per_half_life is None:
            return self.decay
        if num_samples <= 0:
            return 1.0
        h = max(self.half_life, self.samples_per_half_life * self.num_regions / num_samples)
        return 0.5 ** (1.0 / h)

    def update(self, region_ids, losses, timesteps=None, baseline_weights=None) -> None:
        """Add one step's per-sample losses (any shape [n]; tensors are detached and read in float64); see
        `batch_statistics` for `baseline_weights`."""
        stats, nonfinite = self.batch_statistics(region_ids, losses, timesteps, baseline_weights)
        self.apply_statistics(stats, nonfinite)

    # ----------------------------------------------------------------------------------- estimates
    def bin_baseline(self) -> np.ndarray:
        """Current mean loss per timestep bin over all regions, [B] (0 where a bin has no evidence)."""
        return np.divide(self.b1, self.b0, out=np.zeros_like(self.b0), where=self.b0 > 0)

    def counts(self) -> np.ndarray:
        """Effective (discounted) number of samples per region, [K]."""
        return self.s0.copy()

    def global_mean(self) -> float:
        total = self.s0.sum()
        return float(self.s1.sum() / total) if total > 0 else 1.0

    def raw_means(self) -> np.ndarray:
        """Per-region mean score without shrinkage (NaN where a region has no evidence)."""
        n = self.s0
        return np.divide(self.s1, n, out=np.full_like(n, np.nan), where=n > 0)

    def estimates(self) -> np.ndarray:
        """Shrunk per-region discrepancy estimates, [K] float64 (1.0 = average)."""
        n, mu, k = self.s0, self.global_mean(), self.prior_strength
        denom = n + k
        return np.divide(self.s1 + k * mu, denom, out=np.full_like(n, mu), where=denom > 0)

    def effective_sizes(self) -> np.ndarray:
        """Kish effective number of samples per region, (sum w)^2 / sum w^2, [K] (0 where unobserved)."""
        n, q = self.s0, self.q
        return np.divide(n * n, q, out=np.zeros_like(n), where=q > 0)

    def variances(self, pooled: bool = False) -> np.ndarray:
        """Within-region variance of the scores, pooled with all regions' (docs/architecture.md), [K].

        `pooled=True`: every region gets the pooled variance alone.
        """
        n, m1, m2, q = self.s0, self.s1, self.s2, self.q
        seen = n > 0
        # unbiased weighted (reliability-weight) sums of squares and their degrees of freedom
        ss = np.where(seen, m2 - np.divide(m1 * m1, n, out=np.zeros_like(n), where=seen), 0.0)
        ss = np.maximum(ss, 0.0)
        dof = np.maximum(np.where(seen, n - np.divide(q, n, out=np.zeros_like(n), where=seen), 0.0), 0.0)
        total_dof = dof.sum()
        if total_dof <= 0:
            return np.full(self.num_regions, np.nan)
        pooled_var = ss.sum() / total_dof
        if pooled:
            return np.full(self.num_regions, pooled_var)
        # in units of samples: dof_k (normalised by the mean weight) counts like n_kish - 1
        nu = np.maximum(self.effective_sizes() - 1.0, 0.0)
        own = np.divide(ss, dof, out=np.full_like(n, pooled_var), where=dof > 0)
        nu0 = self.variance_pooling
        if nu0 <= 0:
            return np.where(nu > 0, own, pooled_var)
        return (nu * own + nu0 * pooled_var) / (nu + nu0)

    def standard_errors(self, pooled: bool = False) -> np.ndarray:
        """Standard error of each region's raw (unshrunk) mean, `raw_means()`, [K] (inf where unobserved):
        sigma_k sqrt(sum w^2) / sum w. `pooled=True` uses the pooled variance for every region."""
        n, q = self.s0, self.q
        var = self.variances(pooled)
        return np.divide(np.sqrt(var * q), n, out=np.full_like(n, np.inf), where=(n > 0) & np.isfinite(var))

    def uncertainty(self) -> np.ndarray:
        """Standard error of each shrunk estimate, `estimates()`, [K]: sigma_k sqrt(sum w^2) / (n_k + kappa).

        Infinite everywhere before any evidence; 0 for a region never observed once others are (its estimate
        is then the global mean itself).
        """
        n = self.s0
        if n.sum() <= 0:
            return np.full(self.num_regions, np.inf)
        var = np.nan_to_num(self.variances(), nan=0.0)
        return np.sqrt(var * self.q) / np.maximum(n + self.prior_strength, 1e-12)

    def region_moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, float]:
        """(count, score sum, sum of squared weights, pooled within-region variance): what the allocation's
        tree estimates read. Sums are linear, so a group of regions has the sums of its members."""
        var = self.variances(pooled=True)
        return self.s0.copy(), self.s1.copy(), self.q.copy(), float(var[0]) if var.size else float("nan")

    def last_batch_means(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts, mean score) of the latest update per region (mean NaN where unobserved)."""
        c = self.last_counts
        return c, np.divide(self.last_sums, c, out=np.full_like(c, np.nan), where=c > 0)

    # ----------------------------------------------------------------------------------- state
    _ARRAYS = ("s0", "s1", "s2", "q", "b0", "b1", "last_counts", "last_sums")

    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain types only (safe to save with safetensors/JSON, loads with weights_only=True)."""
        state: dict[str, Any] = {name: torch.from_numpy(getattr(self, name).copy()) for name in self._ARRAYS}
        state.update(num_updates=int(self.num_updates), num_nonfinite=int(self.num_nonfinite),
                     last_nonfinite=int(self.last_nonfinite))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s0 = np.asarray(state["s0"], dtype=np.float64)
        b0 = np.asarray(state.get("b0", np.zeros(0)), dtype=np.float64)
        if s0.shape != self.s0.shape or b0.shape != self.b0.shape:
            raise ValueError(
                f"tracker state has {s0.shape[0] if s0.ndim == 1 else tuple(s0.shape)} regions and "
                f"{b0.size} timestep bins but this tracker has {self.num_regions} and {self.num_timestep_bins}; "
                "use the same regions and --aria_num_timestep_bins as the checkpoint"
            )
        for name in self._ARRAYS:
            setattr(self, name, np.asarray(state[name], dtype=np.float64).copy())
        self.num_updates = int(state["num_updates"])
        self.num_nonfinite = int(state["num_nonfinite"])
        self.last_nonfinite = int(state["last_nonfinite"])
