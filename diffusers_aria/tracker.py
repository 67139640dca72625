r"""Online per-region estimates of teacher-student discrepancy.

The signal is the per-sample value of the (unchanged) distillation loss. Diffusion losses vary strongly with
the timestep, so every statistic is kept per (region, timestep bin) and a sample is scored relative to the
baseline of its bin: the discounted mean loss of that bin over all regions. A region's estimate is then its
mean *normalised* loss (1.0 = as hard as average), shrunk toward the global mean when the region has little
evidence.

All statistics are discounted sums with a half-life `h` in steps (decay :math:`\gamma = 2^{-1/h}` applied once
per `update`): counts :math:`S^0_{kb}`, sums :math:`S^1_{kb}` and sums of squares :math:`S^2_{kb}`.
`samples_per_half_life` lengthens `h` to :math:`m K / b` for an update of `b` samples when that is longer, so
that one half-life holds about `m` samples per region however many regions share the batch (K = 1024 regions
at a global batch of 256: 200 steps rather than 50). The sums are linear in the data, so the update with the
concatenation of several ranks' batches equals the update with each rank's part combined, and a region that
is not observed loses its evidence and drifts back to the prior.
Non-finite losses are counted and ignored, never absorbed.

Tracking-error bound. Let region k receive m >= 1 samples per step whose normalised values are
:math:`y = \mu_t + \varepsilon` with independent noise :math:`|\varepsilon| \le \sigma` (so variance
:math:`\le \sigma^2`) and a mean that drifts at most :math:`\delta` per step. In steady state the
exponentially weighted mean :math:`\hat\mu_t = \sum_j \gamma^j \bar y_{t-j} / \sum_j \gamma^j` has

.. math::
    |\mathbb{E}\hat\mu_t - \mu_t| \le \delta \frac{\gamma}{1-\gamma}, \qquad
    \operatorname{sd}(\hat\mu_t) \le \sigma \sqrt{\frac{1-\gamma}{(1+\gamma)\, m}},

the first from the weights' mean lag :math:`\sum_j j\gamma^j(1-\gamma) = \gamma/(1-\gamma)`, the second
from :math:`\sum_j w_j^2 = (1-\gamma)/(1+\gamma)`. Shrinkage with strength :math:`\kappa` adds at most
:math:`\kappa/(n+\kappa)\,|\mu_k - \bar\mu|` where :math:`n = m/(1-\gamma)` is the effective count. So
with probability at least :math:`1 - 1/c^2` (Chebyshev),

.. math::
    |\hat\mu_t - \mu_t| \le \delta\frac{\gamma}{1-\gamma} + c\,\sigma\sqrt{\frac{1-\gamma}{(1+\gamma) m}}
        + \frac{\kappa}{n+\kappa}|\mu_k - \bar\mu|,

which `tracking_error_bound` returns. A longer half-life trades lag (first term, grows like h) for noise
(second term, shrinks like :math:`1/\sqrt{h}`); the half-life minimising the sum is
:math:`h^\star \approx \ln 2\,(c\sigma)^{2/3} / (2\delta^2 m)^{1/3}`.

Standard errors of discounted means. A weighted mean :math:`\bar y = \sum_i w_i y_i / \sum_i w_i` of
independent values with variance :math:`\sigma^2` has variance :math:`\sigma^2 \sum_i w_i^2 / (\sum_i w_i)^2
= \sigma^2 / n_{\text{Kish}}` with the Kish effective sample size :math:`n_{\text{Kish}} = (\sum w)^2/\sum w^2`,
not :math:`\sigma^2 / \sum w`: with discounting, :math:`\sum w` (the discounted count) is about half of
:math:`n_{\text{Kish}}` in steady state (:math:`1/(1-\gamma)` against :math:`(1+\gamma)/(1-\gamma)` samples at
one per step). So the tracker also keeps :math:`Q_{kb} = \sum w^2`, decayed by :math:`\gamma^2` per update,
and the weights are whatever the allocation made them: a region drawn less often has fewer and older samples,
and its :math:`n_{\text{Kish}}` says so. The within-region variance :math:`\sigma_k^2` is the unbiased
weighted variance :math:`\sum w (y-\bar y)^2 / (\sum w - \sum w^2/\sum w)`, pooled with the variance of
all regions with `variance_pooling` pseudo-degrees of freedom: a region with a handful of samples gets a
tiny variance by chance often enough to matter at K = 1024, and pooling removes that. Then

.. math::
    \operatorname{se}(\bar y_k) = \sigma_k \sqrt{Q_k} / n_k, \qquad
    \operatorname{se}(\hat e_k) = \sigma_k \sqrt{Q_k} / (n_k + \kappa)

for the raw mean (`standard_errors`) and for the shrunk estimate
:math:`\hat e_k = (n_k \bar y_k + \kappa \bar\mu)/(n_k + \kappa)` (`uncertainty`), whose noise is the raw
mean's scaled by :math:`n_k/(n_k+\kappa)` (the global mean is K times better measured and treated as
exact). `benchmarks/calibration.py` checks both against the spread over repeated runs.
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
    """The steady-state tracking-error bound of the module docstring for one region."""
    g = 0.5 ** (1.0 / half_life)
    n_eff = samples_per_step / (1.0 - g)
    lag = drift * g / (1.0 - g)
    noise = c * sigma * math.sqrt((1.0 - g) / ((1.0 + g) * samples_per_step))
    shrink = kappa / (n_eff + kappa) * abs(gap)
    return lag + noise + shrink


class DiscrepancyTracker:
    """Discounted per-region discrepancy statistics with timestep-bin normalisation and shrinkage.

    Args:
        num_regions: K.
        half_life: steps after which an observation's weight halves (`None` or `inf`: no discounting).
        num_timestep_bins: bins of [0, num_train_timesteps) used for the per-timestep baseline.
        num_train_timesteps: T of the noise scheduler.
        normalize_timesteps: score samples relative to their timestep bin's baseline (otherwise raw losses).
        prior_strength: kappa, pseudo-count pulling every region toward the global mean.
        variance_pooling: pseudo-degrees of freedom of the pooled within-region variance in each region's
            variance (see the module docstring).
        samples_per_half_life: lengthen the half-life of an update of b samples to
            `samples_per_half_life * K / b` steps when that is longer than `half_life` (None: `half_life`
            alone). An update without samples does not decay.
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
        self.num_regions = int(num_regions)
        self.half_life = None if half_life is None or math.isinf(half_life) else float(half_life)
        self.num_timestep_bins = int(num_timestep_bins) if normalize_timesteps else 1
        self.num_train_timesteps = int(num_train_timesteps)
        self.normalize_timesteps = bool(normalize_timesteps)
        self.prior_strength = float(prior_strength)
        self.variance_pooling = float(variance_pooling)
        self.samples_per_half_life = None if samples_per_half_life is None else float(samples_per_half_life)
        self.decay = 1.0 if self.half_life is None else 0.5 ** (1.0 / self.half_life)
        shape = (self.num_regions, self.num_timestep_bins)
        self.s0 = np.zeros(shape)
        self.s1 = np.zeros(shape)
        self.s2 = np.zeros(shape)
        self.q = np.zeros(shape)  # discounted sum of squared weights (Kish effective sample size)
        self.num_updates = 0
        self.num_nonfinite = 0
        self.last_nonfinite = 0
        self.last_counts = np.zeros(self.num_regions)
        self.last_sums = np.zeros(self.num_regions)

    # ----------------------------------------------------------------------------------- updates
    def _bins(self, timesteps, n: int) -> np.ndarray:
        if timesteps is None or self.num_timestep_bins == 1:
            return np.zeros(n, dtype=np.int64)
        t = _as_numpy(timesteps, np.float64)
        b = np.floor(t * self.num_timestep_bins / self.num_train_timesteps).astype(np.int64)
        return np.clip(b, 0, self.num_timestep_bins - 1)

    def batch_statistics(self, region_ids, losses, timesteps=None) -> tuple[np.ndarray, int]:
        """Sufficient statistics of one batch: float64 [3, K, B] (count, sum, sum of squares), #non-finite.

        Samples with a negative region id (e.g. the null prompt) are ignored.
        """
        r = _as_numpy(region_ids, np.int64)
        v = _as_numpy(losses, np.float64)
        if r.shape != v.shape:
            raise ValueError(f"region_ids has {r.size} entries but losses has {v.size}; they must match")
        b = self._bins(timesteps, r.size)
        if b.shape != r.shape:
            raise ValueError(f"timesteps has {b.size} entries but losses has {v.size}; they must match")
        if r.size and int(r.max()) >= self.num_regions:
            raise ValueError(f"region id {int(r.max())} is out of range for {self.num_regions} regions")
        finite = np.isfinite(v)
        valid = finite & (r >= 0)
        nonfinite = int((~finite & (r >= 0)).sum())
        flat = r[valid] * self.num_timestep_bins + b[valid]
        vv = v[valid]
        size = self.num_regions * self.num_timestep_bins
        stats = np.stack([
            np.bincount(flat, minlength=size).astype(np.float64),
            np.bincount(flat, weights=vv, minlength=size),
            np.bincount(flat, weights=vv * vv, minlength=size),
        ]).reshape(3, self.num_regions, self.num_timestep_bins)
        return stats, nonfinite

    def apply_statistics(self, stats: np.ndarray, nonfinite: int = 0) -> None:
        """Decay the running statistics once, then add a batch's (possibly all-reduced) statistics."""
        stats = np.asarray(stats, dtype=np.float64)
        d = self.update_decay(float(stats[0].sum()))
        baseline = self.bin_baseline()
        self.s0 *= d
        self.s1 *= d
        self.s2 *= d
        self.q *= d * d
        self.s0 += stats[0]
        self.q += stats[0]  # a new sample has weight 1, so weight**2 = 1
        self.s1 += stats[1]
        self.s2 += stats[2]
        self.last_counts = stats[0].sum(axis=1)
        # batch means in normalised units (relative to the baseline before this batch) for bandit policies
        scale = np.where(baseline > 0, baseline, 1.0)
        self.last_sums = (stats[1] / scale).sum(axis=1)
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

    def update(self, region_ids, losses, timesteps=None) -> None:
        """Add one step's per-sample losses (any shape [n]; tensors are detached and read in float64)."""
        stats, nonfinite = self.batch_statistics(region_ids, losses, timesteps)
        self.apply_statistics(stats, nonfinite)

    # ----------------------------------------------------------------------------------- estimates
    def bin_baseline(self) -> np.ndarray:
        """Discounted mean loss per timestep bin over all regions, [B] (0 where a bin has no evidence)."""
        n = self.s0.sum(axis=0)
        return np.divide(self.s1.sum(axis=0), n, out=np.zeros_like(n), where=n > 0)

    def _normalised_moments(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self.normalize_timesteps:
            base = self.bin_baseline()
            inv = np.divide(1.0, base, out=np.zeros_like(base), where=base > 0)
            m1 = self.s1 @ inv
            m2 = self.s2 @ (inv * inv)
        else:
            m1 = self.s1.sum(axis=1)
            m2 = self.s2.sum(axis=1)
        return self.s0.sum(axis=1), m1, m2

    def counts(self) -> np.ndarray:
        """Effective (discounted) number of samples per region, [K]."""
        return self.s0.sum(axis=1)

    def global_mean(self) -> float:
        n, m1, _ = self._normalised_moments()
        total = n.sum()
        return float(m1.sum() / total) if total > 0 else 1.0

    def raw_means(self) -> np.ndarray:
        """Per-region mean normalised loss without shrinkage (NaN where a region has no evidence)."""
        n, m1, _ = self._normalised_moments()
        return np.divide(m1, n, out=np.full_like(n, np.nan), where=n > 0)

    def estimates(self) -> np.ndarray:
        """Shrunk per-region discrepancy estimates, [K] float64 (1.0 = average when normalising)."""
        n, m1, _ = self._normalised_moments()
        mu = self.global_mean()
        k = self.prior_strength
        denom = n + k
        return np.divide(m1 + k * mu, denom, out=np.full_like(n, mu), where=denom > 0)

    def effective_sizes(self) -> np.ndarray:
        """Kish effective number of samples per region, (sum w)^2 / sum w^2, [K] (0 where unobserved)."""
        n, q = self.s0.sum(axis=1), self.q.sum(axis=1)
        return np.divide(n * n, q, out=np.zeros_like(n), where=q > 0)

    def variances(self, pooled: bool = False) -> np.ndarray:
        """Within-region variance of normalised values, pooled with all regions' (module docstring), [K].

        `pooled=True`: every region gets the pooled variance alone.
        """
        n, m1, m2 = self._normalised_moments()
        q = self.q.sum(axis=1)
        seen = n > 0
        # unbiased weighted (reliability-weight) sums of squares and their degrees of freedom
        ss = np.where(seen, m2 - np.divide(m1 * m1, n, out=np.zeros_like(n), where=seen), 0.0)
        ss = np.maximum(ss, 0.0)
        dof = np.where(seen, n - np.divide(q, n, out=np.zeros_like(n), where=seen), 0.0)
        dof = np.maximum(dof, 0.0)
        total_dof = dof.sum()
        if total_dof <= 0:
            return np.full(self.num_regions, np.nan)
        pooled_var = ss.sum() / total_dof
        if pooled:
            return np.full(self.num_regions, pooled_var)
        # in units of samples: dof_k (normalised by the mean weight) counts like n_kish - 1
        n_kish = self.effective_sizes()
        nu = np.maximum(n_kish - 1.0, 0.0)
        own = np.divide(ss, dof, out=np.full_like(n, pooled_var), where=dof > 0)
        nu0 = self.variance_pooling
        if nu0 <= 0:
            return np.where(nu > 0, own, pooled_var)
        return (nu * own + nu0 * pooled_var) / (nu + nu0)

    def standard_errors(self, pooled: bool = False) -> np.ndarray:
        """Standard error of each region's raw (unshrunk) mean, `raw_means()`, [K] (inf where unobserved).

        `pooled=True` uses the pooled within-region variance for every region (`variances(pooled=True)`).
        """
        n = self.s0.sum(axis=1)
        q = self.q.sum(axis=1)
        var = self.variances(pooled)
        return np.divide(np.sqrt(var * q), n, out=np.full_like(n, np.inf), where=(n > 0) & np.isfinite(var))

    def uncertainty(self) -> np.ndarray:
        """Standard error of each shrunk estimate, `estimates()`, [K]: sigma_k sqrt(sum w^2) / (n_k + kappa).

        Infinite everywhere before any evidence; 0 for a region never observed once others are (its estimate
        is then the global mean itself).
        """
        n = self.s0.sum(axis=1)
        if n.sum() <= 0:
            return np.full(self.num_regions, np.inf)
        q = self.q.sum(axis=1)
        var = np.nan_to_num(self.variances(), nan=0.0)
        return np.sqrt(var * q) / np.maximum(n + self.prior_strength, 1e-12)

    def last_batch_means(self) -> tuple[np.ndarray, np.ndarray]:
        """(counts, mean normalised loss) of the latest update per region (mean NaN where unobserved)."""
        c = self.last_counts
        return c, np.divide(self.last_sums, c, out=np.full_like(c, np.nan), where=c > 0)

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain types only (safe to save with safetensors/JSON, loads with weights_only=True)."""
        return {
            "s0": torch.from_numpy(self.s0.copy()),
            "s1": torch.from_numpy(self.s1.copy()),
            "s2": torch.from_numpy(self.s2.copy()),
            "q": torch.from_numpy(self.q.copy()),
            "last_counts": torch.from_numpy(self.last_counts.copy()),
            "last_sums": torch.from_numpy(self.last_sums.copy()),
            "num_updates": int(self.num_updates),
            "num_nonfinite": int(self.num_nonfinite),
            "last_nonfinite": int(self.last_nonfinite),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        s0 = np.asarray(state["s0"], dtype=np.float64)
        if s0.shape != self.s0.shape:
            raise ValueError(
                f"tracker state has shape {tuple(s0.shape)} (regions x timestep bins) but this tracker has "
                f"{self.s0.shape}; use the same regions and --num_timestep_bins as the checkpoint"
            )
        self.s0 = s0.copy()
        self.s1 = np.asarray(state["s1"], dtype=np.float64).copy()
        self.s2 = np.asarray(state["s2"], dtype=np.float64).copy()
        # checkpoints written before the squared weights were kept: sum w^2 <= sum w, the conservative bound
        self.q = np.asarray(state["q"], dtype=np.float64).copy() if "q" in state else self.s0.copy()
        self.last_counts = np.asarray(state["last_counts"], dtype=np.float64).copy()
        self.last_sums = np.asarray(state["last_sums"], dtype=np.float64).copy()
        self.num_updates = int(state["num_updates"])
        self.num_nonfinite = int(state["num_nonfinite"])
        self.last_nonfinite = int(state["last_nonfinite"])
