r"""Allocation policies: from per-region discrepancy estimates to region sampling probabilities.

Every policy has the same small protocol: construct it with the region sizes, call `step(step, tracker)`
after each tracker update to get the probabilities for the next draw, and `state_dict`/`load_state_dict`
to checkpoint it. Probabilities are float64, sum to one, and are a deterministic function of the tracker
history, so every rank computes bit-identical values.

Policies:
    * `ARIAAllocation` (default): :math:`p_k \propto s_k^\alpha \exp(\hat\theta_k/\tau)`, with :math:`s_k` the
      region size and :math:`\hat\theta_k` the region's *credible* relative excess discrepancy (posterior
      estimate down the region tree, each level's differences shrunk by a sparse empirical-Bayes prior,
      `tree_excess`), kept within per-region bounds (floor, and a cap on p/prior), damped toward the target,
      equal to the prior until a warm-up is over, and held back where extra draws show no progress (the
      reducibility test, `reducibility.py`). With no real differences it stays at the prior at any K; with
      equal estimates and the default alpha=1 it is exactly `PromptUniform` (Random Conditioning).
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

from .reducibility import ReducibilityTest

SCORES = ("sparse", "credible", "zscore")
VARIANCES = ("own_max", "pooled")
NULLS = ("theoretical", "empirical", "empirical_leaves", "empirical_large")
EMPIRICAL_MIN_NODES = 50  # null="empirical_large": the levels with at least this many nodes have a bulk to measure


def empirical_null_scale(z) -> float:
    """Width of the bulk of standardised differences, where it is credibly wider than the noise (Efron 2004,
    "Large-scale simultaneous hypothesis testing: the choice of a null hypothesis"); 1 otherwise.

    The width is 1.4826 x the median absolute deviation from the median; for n values of pure noise it is about
    1 with a standard deviation of about 1.17 / sqrt(n) (the MAD's efficiency at the normal), so it counts only
    above `1 + 2 x 1.17 / sqrt(n)`: at 8 nodes a width from noise alone would pass 1 in about half the refreshes.
    When most nodes of a level differ a little for real (some classes are simply harder than others), the bulk
    is wider than the noise, and only nodes that stand out of that bulk are exceptions worth drawing more of.
    """
    z = np.asarray(z, dtype=np.float64)
    if z.size < 3:
        return 1.0
    width = 1.4826 * float(np.median(np.abs(z - np.median(z))))
    return width if width > 1.0 + 2.34 / np.sqrt(z.size) else 1.0


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
    deficit = 1.0 - p.sum()
    if deficit > 1e-12:  # every entry with weight is at its upper bound: the rest goes where there is room
        room = upper - p
        p += room * (deficit / room.sum())
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


# ------------------------------------------------------------------------------------ sparse empirical Bayes
def _laplace_parts(z: np.ndarray, a: float) -> tuple[np.ndarray, np.ndarray]:
    """log masses of the positive and negative halves of a Laplace(a) slab convolved with N(0, 1), at z."""
    from scipy.special import log_ndtr

    return -a * z + log_ndtr(z - a), a * z + log_ndtr(-z - a)


def _exact_log_slab_ratio(z: np.ndarray, a: float) -> np.ndarray:
    """log of (Laplace(a) * N(0,1))(z) / N(0,1)(z): how much better the slab explains z than pure noise."""
    lp, ln = _laplace_parts(z, a)
    return np.log(a / 2.0) + a * a / 2.0 + np.logaddexp(lp, ln) + 0.5 * z * z + 0.5 * np.log(2.0 * np.pi)


_Z_GRID = np.linspace(0.0, 40.0, 8001)
_RATIO_TABLES: dict[float, np.ndarray] = {}


def _log_slab_ratio(z: np.ndarray, a: float) -> np.ndarray:
    """`_exact_log_slab_ratio` of |z|, interpolated in a table made once per slab scale (|z| <= 40; exact beyond):
    the special functions cost about 100 ns a value, and a 4,096-leaf tree needs them every update."""
    if a not in _RATIO_TABLES:
        _RATIO_TABLES[a] = _exact_log_slab_ratio(_Z_GRID, a)
    table = _RATIO_TABLES[a]
    za = np.abs(z)
    pos = np.minimum(za, _Z_GRID[-1]) * ((_Z_GRID.size - 1) / _Z_GRID[-1])  # a uniform grid: no search
    i = np.minimum(pos.astype(np.int64), _Z_GRID.size - 2)
    frac = pos - i
    out = table[i] * (1.0 - frac) + table[i + 1] * frac
    far = za > _Z_GRID[-1]
    if far.any():
        out[far] = _exact_log_slab_ratio(za[far], a)
    return out


def _slab_posterior_median(z: np.ndarray, w, a: float) -> np.ndarray:
    """Posterior median of mu under the prior (1 - w) delta_0 + w Laplace(a), observed z ~ N(mu, 1) (w may be an
    array of z's shape)."""
    from scipy.special import ndtr, ndtri

    za = np.abs(z)
    w = np.clip(w, 1e-300, 1.0 - 1e-12)
    p_slab = 1.0 / (1.0 + np.exp(np.clip(-(np.log(w) - np.log1p(-w) + _log_slab_ratio(za, a)), -700.0, 700.0)))
    lp, ln = _laplace_parts(za, a)
    p_pos = 1.0 / (1.0 + np.exp(np.clip(ln - lp, -700.0, 700.0)))
    # given mu > 0 the posterior is N(z - a, 1) truncated to mu > 0: solve P(mu > m | z) = 1/2 for m
    arg = ndtr(za - a) / np.maximum(2.0 * p_slab * p_pos, 1e-300)
    m = np.where(arg < 1.0, za - a - ndtri(np.minimum(arg, 1.0 - 1e-16)), 0.0)
    return np.sign(z) * np.maximum(m, 0.0)


_LOG_W_GRID = np.linspace(-40.0, 0.0, 321)
_THRESHOLDS: dict[float, np.ndarray] = {}


def _thresholds(a: float) -> np.ndarray:
    """|z| below which the posterior median of `_slab_posterior_median` is 0, for every w of `_LOG_W_GRID`
    (decreasing in w; computed once per slab scale by bisection)."""
    if a not in _THRESHOLDS:
        lo, hi = np.zeros_like(_LOG_W_GRID), np.full_like(_LOG_W_GRID, 40.0)
        w = np.exp(_LOG_W_GRID)
        for _ in range(50):
            mid = 0.5 * (lo + hi)
            positive = _slab_posterior_median(mid, w, a) > 0
            hi, lo = np.where(positive, mid, hi), np.where(positive, lo, mid)
        _THRESHOLDS[a] = hi
    return _THRESHOLDS[a]


def _min_slab_weight(n: int, fwer: float, a: float) -> float:
    """The slab weight whose zero-threshold is the Bonferroni bound for n null z-scores at family-wise error
    `fwer`: the fitted weight never goes below it, so pure noise stays at zero with probability ~1 - fwer."""
    from scipy.special import ndtri

    target = float(ndtri(1.0 - fwer / (2.0 * max(n, 2))))
    t = _thresholds(a)  # decreasing in log w
    return float(np.exp(np.interp(-target, -t, _LOG_W_GRID)))


def sparse_shrinkage(z, fwer: float = 0.05, slab_scale: float = 0.5, start: float | None = None
                     ) -> tuple[np.ndarray, float]:
    r"""Empirical-Bayes posterior medians of standardised effects under a sparse (spike-and-slab) prior.

    The model: :math:`z_i \sim N(\mu_i, 1)` with :math:`\mu_i = 0` for most i and :math:`\mu_i` from a
    Laplace slab of rate `slab_scale` for a share w (Johnstone & Silverman's "needles and straw in haystacks"
    empirical Bayes). w is fitted by marginal maximum likelihood, never below the weight whose zero-threshold is
    the Bonferroni bound for n values at family-wise error `fwer`. So pure noise gives exactly zero everywhere
    with probability about 1 - fwer, while a few large effects keep nearly their full size (a normal prior, as
    in `credible_excess`, fits one spread to all and flattens a sparse few).

    `start`: a guess of w (e.g. the previous update's) to begin the fit from; the result does not depend on it.

    Returns (posterior medians [n], fitted w).
    """
    z = np.asarray(z, dtype=np.float64)
    if z.size == 0:
        return z.copy(), 0.0
    a = float(slab_scale)
    w_lo = _min_slab_weight(z.size, fwer, a)
    beta = np.expm1(np.minimum(_log_slab_ratio(np.abs(z), a), 700.0))

    def slope(w: float) -> tuple[float, float]:  # the marginal log-likelihood's first and second derivatives
        r = beta / (1.0 + w * beta)
        return float(r.sum()), float(-(r * r).sum())

    if slope(w_lo)[0] <= 0:
        w = w_lo
    elif slope(1.0)[0] >= 0:
        w = 1.0
    else:  # the log-likelihood is concave in w: safeguarded Newton steps inside a shrinking bracket
        lo, hi = w_lo, 1.0
        w = float(start) if start is not None and lo < start < hi else float(np.sqrt(lo * hi))
        for _ in range(40):
            g, h = slope(w)
            lo, hi = (w, hi) if g > 0 else (lo, w)
            step = w - g / h if h < 0 else 0.5 * (lo + hi)
            w_new = step if lo < step < hi else float(np.sqrt(lo * hi))
            if abs(w_new - w) <= 1e-9 * w:
                w = w_new
                break
            w = w_new
    out = np.zeros_like(z)
    # only values beyond the zero-threshold of this w can have a non-zero median (with a margin for the grid)
    t = float(np.interp(np.log(w), _LOG_W_GRID, _thresholds(a))) - 0.05
    big = np.abs(z) > t
    out[big] = _slab_posterior_median(z[big], w, a)
    return out, w


def tree_excess(counts, sums, sq_weights, variance, tree=None, method: str = "sparse",
                threshold: float = 1.0, fwer: float = 0.05, weights=None,
                slab_starts: list[float] | None = None, null: str = "theoretical") -> tuple[np.ndarray, dict[str, Any]]:
    r"""Credible relative excess of every leaf region, estimated level by level down a `RegionTree`.

    A leaf's mean score is :math:`\bar y_k = \text{sum}_k / n_k` with variance :math:`\sigma^2 q_k / n_k^2`
    (Kish: `variance` the pooled within-region variance, q the sum of squared weights). A node's mean is the
    `weights`-weighted mean of its observed leaves' means (default: the counts, i.e. the mean of its samples;
    `ARIAAllocation` passes the prompt shares, so that a leaf drawn ten times as often does not pull its parent
    and the average toward itself), and its relative excess :math:`x = \bar y / \bar y_{root} - 1`, with
    standard error s. Going down, each node's difference from its parent, :math:`d = x - x_{parent}`, has variance
    :math:`s^2 (1 - 2 W/W_{parent}) + s_{parent}^2` under "no difference" (W the node's share of the weights), and
    is shrunk across all the nodes of its level: `method="sparse"` by `sparse_shrinkage` of :math:`d/sd` (exact
    zeros for noise, large effects kept), `method="normal"` by a DerSimonian-Laird normal prior as
    `credible_excess` (threshold c). A leaf's score is its ancestors' shrunk differences plus its own: a small
    hard concept inside an average coarse region stands out at the leaves, and a coarse region that is harder as
    a whole moves all its leaves together. With no tree this is one level of leaves under the root.

    `slab_starts`: per level, a guess of the slab weight to begin the sparse fit from (the previous update's).
    `null` (sparse): "theoretical" judges each level's standardised differences against the noise alone;
    "empirical" against the width of their bulk when that is wider (`empirical_null_scale`), so that only nodes
    standing out of a broad real spread keep a difference (in excess units, the same size as before);
    "empirical_leaves" does so at the leaf level only (coarse levels have few nodes, and whole groups that differ
    there are what a hard concept looks like); "empirical_large" at the levels of at least `EMPIRICAL_MIN_NODES`
    observed nodes (a bulk needs many nodes to be measured).

    Returns (scores [K], info): info["leaf_excess"] the leaves' raw relative excess x (0 where unobserved),
    info["leaf_se"] its standard error with the pooled variance, info["reference"] the mean score x is relative to,
    info["levels"] per level the nodes, the fitted slab weight (sparse) or real variance (normal) and the number
    of non-zero differences.
    """
    if null not in NULLS:
        raise ValueError(f"null={null!r} is not valid; use one of {', '.join(NULLS)}")
    n = np.asarray(counts, dtype=np.float64)
    m1 = np.asarray(sums, dtype=np.float64)
    q = np.asarray(sq_weights, dtype=np.float64)
    k = n.size
    omega = n.copy() if weights is None else np.asarray(weights, dtype=np.float64)
    info: dict[str, Any] = {"levels": [], "leaf_excess": np.zeros(k), "leaf_se": np.zeros(k)}
    seen = n > 0
    var = np.broadcast_to(np.asarray(variance, dtype=np.float64), (k,))
    if not seen.any() or not np.all(np.isfinite(var[seen])) or np.any(var[seen] <= 0):
        return np.zeros(k), info
    safe = np.where(seen, n, 1.0)
    omega = np.where(seen, omega, 0.0)
    ybar_leaf = np.where(seen, m1 / safe, 0.0)
    total = omega.sum()
    ybar = float((omega * ybar_leaf).sum() / total) if total > 0 else 0.0
    if not np.isfinite(ybar) or ybar <= 0:
        return np.zeros(k), info
    # variance of a leaf's relative excess (its mean over the reference): sigma_k^2 q_k / n_k^2 / ybar^2
    v_leaf = np.where(seen, var * q / safe ** 2, 0.0) / ybar ** 2
    levels = [] if tree is None else [tree.ancestors[lvl] for lvl in range(tree.num_levels)]
    levels.append(np.arange(k))
    prev = np.zeros(k, dtype=np.int64)  # each leaf's node at the level above (the root: 0)
    x_up, s2_up, w_up = np.zeros(1), np.array([(omega ** 2 * v_leaf).sum() / total ** 2]), np.array([total])
    theta_up = np.zeros(1)
    for depth, node in enumerate(levels):
        size = int(node.max()) + 1
        w = np.bincount(node, weights=omega, minlength=size)
        parent = np.zeros(size, dtype=np.int64)
        parent[node] = prev
        obs = w > 0
        wsafe = np.where(obs, w, 1.0)
        x = np.where(obs, np.bincount(node, weights=omega * ybar_leaf, minlength=size) / wsafe / ybar - 1.0, 0.0)
        s2 = np.where(obs, np.bincount(node, weights=omega ** 2 * v_leaf, minlength=size) / wsafe ** 2, 0.0)
        var_d = s2 * (1.0 - 2.0 * w / np.maximum(w_up[parent], 1e-300)) + s2_up[parent]
        d = x - x_up[parent]
        ok = obs & (var_d > 0) & np.isfinite(var_d)
        delta = np.zeros(size)
        level_info: dict[str, Any] = {"nodes": size}
        if ok.sum() >= 2:
            if method == "sparse":
                sd = np.sqrt(var_d[ok])
                start = slab_starts[depth] if slab_starts is not None and depth < len(slab_starts) else None
                z = d[ok] / sd
                empirical = (null == "empirical" or (null == "empirical_leaves" and depth == len(levels) - 1)
                             or (null == "empirical_large" and z.size >= EMPIRICAL_MIN_NODES))
                width = empirical_null_scale(z) if empirical else 1.0
                mu, slab = sparse_shrinkage(z / width, fwer, start=start)
                delta[ok] = mu * sd * width
                level_info["slab_weight"] = slab
                level_info["null_width"] = width
            elif method == "normal":
                wt = 1.0 / var_d[ok]
                groups = parent[ok]
                stat = float((wt * d[ok] ** 2).sum())
                df = int(ok.sum()) - np.unique(groups).size
                sw = np.bincount(groups, weights=wt)
                sw2 = np.bincount(groups, weights=wt * wt)
                denom = float((sw - np.divide(sw2, sw, out=np.zeros_like(sw), where=sw > 0)).sum())
                a = max(stat - df - threshold * np.sqrt(2.0 * max(df, 0)), 0.0) / denom if df > 0 and denom > 0 else 0.0
                delta[ok] = a / (a + var_d[ok]) * d[ok]
                level_info["real_variance"] = a
            else:
                raise ValueError(f"method={method!r} is not valid; use 'sparse' or 'normal'")
        level_info["nonzero"] = int(np.count_nonzero(delta))
        info["levels"].append(level_info)
        theta_up = theta_up[parent] + delta
        x_up, s2_up, w_up, prev = x, s2, w, node
    info["leaf_excess"], info["leaf_se"], info["reference"] = x_up, np.sqrt(s2_up), ybar
    return theta_up, info


class ARIAAllocation(AllocationPolicy):
    r"""ARIA: the prompt-uniform prior tilted by each region's credible, reducible excess discrepancy.

    .. math:: p_k \propto s_k^\alpha \exp(\hat\theta_k / \tau)

    with :math:`s_k` the region size and :math:`\hat\theta_k` the region's credible relative excess
    (`tree_excess`: estimated level by level down the region tree when there is one, each level's differences
    shrunk by a sparse empirical-Bayes prior, so noise gives exactly 0 and a few real effects keep their size).
    With no credible difference anywhere the allocation *is* the prior, and with the default alpha=1 the prior is
    Random Conditioning's prompt share. The target is kept within a floor and an optional cap on
    :math:`p_k/\text{prior}_k`, moves at most `max_shift` of the probability mass away from the prior (total
    variation), is approached by `damping` per update, and is the prior until `warmup_steps` updates.

    Reducible excess (`reducibility.ReducibilityTest`, `self.reducibility`): a region boosted above its prior gets
    at most `trial_ratio` times its prior until its excess has fallen by `stall_decline`; one that gets
    `stall_draws` draws beyond its prior share without such progress is held at its prior until its excess falls
    on its own. So a region that stays hard however much it is drawn stops gaining mass.

    Args:
        sizes: prompts per region (leaf).
        alpha: size exponent of the prior (1 = prompt share, Random Conditioning; 0 = region-uniform).
        tau: temperature, in units of relative excess (a credible excess of tau multiplies the weight by e);
            in standard deviations for score="zscore".
        score: "sparse" (default; sparse empirical Bayes per tree level), "credible" (a normal prior per level,
            DerSimonian-Laird, heterogeneity threshold `threshold`) or "zscore" (the early rule: estimates
            standardised across regions; it moves on pure noise).
        threshold: heterogeneity threshold c of score="credible", in null standard deviations of Cochran's Q.
        fwer: family-wise error of score="sparse" at each tree level: the chance that pure noise moves anything.
        floor: each region keeps at least `min(prior_k, floor / K)`; a tilt never starves a region.
        max_ratio: no region gets more than `max_ratio` times its prior share (None: no bound).
        max_shift: at most this much probability mass moves away from the prior (total variation; 1: no bound).
        cap: no region gets more than `max(prior_k, cap)` of the probability (None: no cap).
        damping: step size toward the target each update (1 = jump to the target).
        warmup_steps: the prior is used until this many updates have been seen.
        z_clip: clip z-scores to [-z_clip, z_clip] (score="zscore").
        tree: a `RegionTree` over the regions (None: all regions under one root).
        stall_draws: extra draws a boosted region gets to show progress (None: no reducibility test).
        stall_decline: the share of its excess a boosted region must shed within `stall_draws` extra draws.
        trial_ratio: the most a boosted region gets (x its prior) before it has shown progress.
        variance: the within-region variance a region's excess is judged against: "own_max" (default) the larger
            of the region's own (moderated toward the pooled one, `DiscrepancyTracker.variances`) and the pooled
            one; "pooled" the pooled one for all. Losses are right-skewed: with the pooled variance a leaf of a
            few dozen samples that caught one large loss has a z far beyond what the normal tail allows, so at
            many leaves chance leaves pass any Bonferroni bound; its own variance carries that outlier too. The
            max keeps a leaf of unusually calm samples from looking credibly different in the same way.
        refresh_every: the scores, the reducibility test and the target are recomputed every this many tracker
            updates after the warm-up (the draws in between are counted); the probabilities stay fixed between
            refreshes and move `1 - (1 - damping)**refresh_every` of the way at each.
        null: what a tree level's differences are judged against (score="sparse"): "theoretical" the noise alone;
            "empirical" the width of the level's bulk of differences when it is wider than the noise
            (`empirical_null_scale`): a broad real spread of difficulty is then the norm, not an exception;
            "empirical_leaves": the same at the leaf level only; "empirical_large": at the levels of at least 50
            observed nodes.
    """

    name = "aria"

    def __init__(self, sizes, alpha: float = 1.0, tau: float = 0.1, score: str = "sparse",
                 threshold: float = 1.0, fwer: float = 0.05, floor: float = 0.05, max_ratio: float | None = None,
                 max_shift: float = 0.5, cap: float | None = None, damping: float = 0.1, warmup_steps: int = 40,
                 z_clip: float | None = 3.0, tree=None, stall_draws: float | None = 200.0,
                 stall_decline: float = 0.25, trial_ratio: float = 4.0, variance: str = "own_max",
                 refresh_every: int = 8, null: str = "theoretical") -> None:
        if score not in SCORES:
            raise ValueError(f"score={score!r} is not valid; use one of {', '.join(SCORES)}")
        if not tau > 0:
            raise ValueError(f"tau={tau!r} must be > 0")
        if not threshold >= 0:
            raise ValueError(f"threshold={threshold!r} must be >= 0")
        if not 0 < fwer < 1:
            raise ValueError(f"fwer={fwer!r} must lie in (0, 1)")
        if not 0 <= floor <= 1:
            raise ValueError(f"floor={floor!r} must lie in [0, 1]")
        if max_ratio is not None and not max_ratio >= 1:
            raise ValueError(f"max_ratio={max_ratio!r} must be >= 1 (or None for no bound)")
        if not 0 < max_shift <= 1:
            raise ValueError(f"max_shift={max_shift!r} must lie in (0, 1]")
        if cap is not None and not 0 < cap <= 1:
            raise ValueError(f"cap={cap!r} must lie in (0, 1] or be None")
        if not 0 < damping <= 1:
            raise ValueError(f"damping={damping!r} must lie in (0, 1]")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps={warmup_steps!r} must be >= 0")
        if stall_draws is not None and not stall_draws > 0:
            raise ValueError(f"stall_draws={stall_draws!r} must be > 0 (or None for no reducibility test)")
        if not 0 <= stall_decline < 1:
            raise ValueError(f"stall_decline={stall_decline!r} must lie in [0, 1)")
        if not trial_ratio >= 1:
            raise ValueError(f"trial_ratio={trial_ratio!r} must be >= 1")
        if variance not in VARIANCES:
            raise ValueError(f"variance={variance!r} is not valid; use one of {', '.join(VARIANCES)}")
        if null not in NULLS:
            raise ValueError(f"null={null!r} is not valid; use one of {', '.join(NULLS)}")
        if not (isinstance(refresh_every, (int, np.integer)) and refresh_every >= 1):
            raise ValueError(f"refresh_every={refresh_every!r} must be an integer of 1 or more")
        self.variance, self.refresh_every, self.null = variance, int(refresh_every), null
        self.alpha, self.tau, self.score, self.threshold = float(alpha), float(tau), score, float(threshold)
        self.fwer, self.floor, self.max_ratio, self.max_shift = float(fwer), float(floor), max_ratio, float(max_shift)
        self.cap, self.damping, self.warmup_steps, self.z_clip = cap, float(damping), int(warmup_steps), z_clip
        self.stall_draws = None if stall_draws is None else float(stall_draws)
        self.stall_decline, self.trial_ratio = float(stall_decline), float(trial_ratio)
        super().__init__(sizes)
        if tree is not None and tree.num_leaves != self.num_regions:
            raise ValueError(f"the region tree has {tree.num_leaves} leaves but there are {self.num_regions} regions")
        self.tree = tree
        self.prior = _normalise(self.sizes ** self.alpha)
        self.lower = np.minimum(self.prior, self.floor / self.num_regions)
        self.upper = np.ones_like(self.prior) if cap is None else np.maximum(self.prior, float(cap))
        if max_ratio is not None:
            self.upper = np.minimum(self.upper, float(max_ratio) * self.prior)
        self.probabilities = self.prior.copy()
        self.scores = np.zeros(self.num_regions)  # the credible excess used by the latest target (0 when stalled)
        self.between_variance = 0.0  # the prior-weighted variance of the scores (logged as aria/real_spread)
        # the z-score rule has no test (its scores are not in units of excess)
        self.reducibility = ReducibilityTest(self.prior, None if score == "zscore" else self.stall_draws, stall_decline)
        # where the next sparse fits begin (the previous refresh's slab weights): checkpointed, since the fit's last
        # bits depend on where it starts, and a resumed run must start where the uninterrupted one would
        self._slab_starts: list[float | None] | None = None
        self.pending_draws = np.zeros(self.num_regions)  # draws per region since the last refresh

    # ------------------------------------------------------------------------------- scores and target
    def credible_scores(self, tracker) -> np.ndarray:
        """The credible relative excess of every region for the tracker's current evidence (before stalls)."""
        return self._scores(tracker)[0]

    def _scores(self, tracker) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(credible excess, raw relative excess, its standard error) per region; regions are averaged by prompt
        share."""
        if self.score == "zscore":
            e = tracker.estimates()
            return standardise(e, self.z_clip), e / tracker.global_mean() - 1.0, tracker.uncertainty()
        counts, sums, sq_weights, variance = tracker.region_moments()
        if self.variance == "own_max":  # each region's own (moderated) variance, never below the pooled one
            variance = np.maximum(tracker.variances(), variance)
        scores, info = tree_excess(counts, sums, sq_weights, variance, self.tree,
                                   "sparse" if self.score == "sparse" else "normal", self.threshold, self.fwer,
                                   weights=self.prompt_share, slab_starts=self._slab_starts, null=self.null)
        self._slab_starts = [lvl.get("slab_weight") for lvl in info["levels"]]
        # the test of progress reads each region's own variance: a harder region's scores vary more (the noise
        # of a loss grows with it), and the pooled variance would take its chance swings for progress
        own_se = np.where(counts > 0, tracker.standard_errors(), 0.0) / info.get("reference", 1.0)
        return scores, info["leaf_excess"], own_se

    def target(self, scores: np.ndarray, upper: np.ndarray | None = None) -> np.ndarray:
        """The undamped allocation for given per-region scores (credible relative excess; z for "zscore"),
        within the policy's bounds (or `upper` instead of its upper bounds)."""
        s = np.asarray(scores, dtype=np.float64) / self.tau
        if np.all(s == s[0]):
            return self.prior.copy()
        w = np.exp(np.clip(s - s.max(), -700.0, 0.0))
        p = project_to_bounds(_normalise(self.prior * w), self.lower, self.upper if upper is None else upper)
        shift = 0.5 * np.abs(p - self.prior).sum()
        if shift > self.max_shift:  # mix back toward the prior (stays within the bounds, which hold the prior)
            p = self.prior + (self.max_shift / shift) * (p - self.prior)
        return p

    @property
    def refresh_rate(self) -> float:
        """How far a refresh moves toward the target: `refresh_every` updates of `damping` each, compounded."""
        return self.damping if self.refresh_every == 1 else 1.0 - (1.0 - self.damping) ** self.refresh_every

    def target_from(self, tracker) -> np.ndarray:
        """The undamped allocation for the tracker's current evidence (without the reducibility test)."""
        return self.target(self.credible_scores(tracker))

    def step(self, step: int, tracker) -> np.ndarray:
        if tracker.num_updates < self.warmup_steps:
            self.probabilities = self.prior.copy()
            return self.probabilities
        self.pending_draws += tracker.last_counts
        if (tracker.num_updates - self.warmup_steps) % self.refresh_every:
            return self.probabilities  # between refreshes: unchanged (the tracker still takes every update)
        counts, self.pending_draws = self.pending_draws, np.zeros(self.num_regions)
        self.scores = self.reducibility.apply(*self._scores(tracker), counts)
        self.between_variance = float((self.prior * self.scores ** 2).sum()) if self.score != "zscore" else 0.0
        # a boost that has not yet shown progress goes no higher than trial_ratio x the prior
        upper = np.where(self.reducibility.proven > 0, self.upper, np.minimum(self.upper, np.maximum(
            self.trial_ratio * self.prior, self.lower)))
        target = self.target(self.scores, upper)
        p = self.probabilities + self.refresh_rate * (target - self.probabilities)
        self.probabilities = p / p.sum() if abs(p.sum() - 1.0) > 1e-12 else p
        return self.probabilities

    _STATE = ("scores", "pending_draws")

    def state_dict(self) -> dict[str, Any]:
        arrays = {**{k: getattr(self, k).copy() for k in self._STATE}, **self.reducibility.state_dict()}
        starts = np.array([np.nan if w is None else w for w in self._slab_starts or []], dtype=np.float64)
        return {**super().state_dict(), **{k: torch.from_numpy(v) for k, v in arrays.items()},
                "slab_starts": torch.from_numpy(starts), "between_variance": float(self.between_variance)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        for k in self._STATE:
            setattr(self, k, np.asarray(state[k], dtype=np.float64).copy())
        self.reducibility.load_state_dict(state)
        self.between_variance = float(state["between_variance"])
        # (a checkpoint written before the starts were saved has none: its fits start cold, as they did then)
        starts = np.asarray(state.get("slab_starts", []), dtype=np.float64)
        self._slab_starts = [None if np.isnan(w) else float(w) for w in starts] if starts.size else None


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
