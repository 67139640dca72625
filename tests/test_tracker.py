"""Online per-region discrepancy estimates (diffusers_aria/tracker.py)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from diffusers_aria.tracker import DiscrepancyTracker, tracking_error_bound

T = 1000


def _batch(rng, k: int, n: int, scale=None):
    regions = rng.integers(0, k, n)
    timesteps = rng.integers(0, T, n)
    base = 0.2 + timesteps / T
    losses = base * (1.0 if scale is None else np.asarray(scale)[regions]) * rng.uniform(0.5, 1.5, n)
    return regions, losses, timesteps


def _assert_same_statistics(a: DiscrepancyTracker, b: DiscrepancyTracker, rtol=1e-12):
    for name in ("s0", "s1", "s2"):
        np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=rtol, atol=0)
    np.testing.assert_allclose(a.estimates(), b.estimates(), rtol=rtol, atol=0)


# ------------------------------------------------------------------------------------------- merge


def test_update_of_concatenation_equals_summed_batch_statistics():
    rng = np.random.default_rng(0)
    whole = DiscrepancyTracker(4, half_life=10.0)
    parts = DiscrepancyTracker(4, half_life=10.0)
    for _ in range(20):
        r1, l1, t1 = _batch(rng, 4, 13)
        r2, l2, t2 = _batch(rng, 4, 7)
        whole.update(np.concatenate([r1, r2]), np.concatenate([l1, l2]), np.concatenate([t1, t2]))
        s1, n1 = parts.batch_statistics(r1, l1, t1)
        s2, n2 = parts.batch_statistics(r2, l2, t2)
        assert s1.dtype == np.float64 and s1.shape == (4, 4 + 10)  # regions, then timestep bins
        parts.apply_statistics(s1 + s2, n1 + n2)
    _assert_same_statistics(whole, parts)
    assert whole.num_updates == parts.num_updates == 20


def test_torch_inputs_match_numpy_inputs():
    rng = np.random.default_rng(1)
    r, loss, t = _batch(rng, 3, 32)
    a, b = DiscrepancyTracker(3), DiscrepancyTracker(3)
    a.update(r, loss, t)
    b.update(torch.from_numpy(r), torch.from_numpy(loss).to(torch.float64), torch.from_numpy(t))
    _assert_same_statistics(a, b, rtol=0)
    c = DiscrepancyTracker(3)
    c.update(torch.from_numpy(r), torch.from_numpy(loss).to(torch.bfloat16), torch.from_numpy(t))  # low precision ok
    np.testing.assert_allclose(c.s1, a.s1, rtol=1e-2)


def test_batch_statistics_counts_sums_squares():
    tr = DiscrepancyTracker(2, num_timestep_bins=2, num_train_timesteps=10)
    first, _ = tr.batch_statistics([0, 1], [2.0, 4.0], [1, 9])
    np.testing.assert_array_equal(first[:, :2], 0.0)  # no baseline yet: the samples only start the bins' baselines
    np.testing.assert_array_equal(first[:, 2:], [[1, 1], [2.0, 4.0], [4.0, 16.0], [1, 1]])
    tr.apply_statistics(first)
    np.testing.assert_array_equal(tr.bin_baseline(), [2.0, 4.0])
    stats, nonfinite = tr.batch_statistics([0, 0, 1, -1], [1.0, 6.0, 2.0, 100.0], [1, 7, 9, 0])
    assert nonfinite == 0
    # scores against the baseline of each sample's bin: 1/2 (t=1, bin 0), 6/4 and 2/4 (bin 1); region -1 ignored
    np.testing.assert_allclose(stats[:, :2], [[2, 1], [0.5 + 1.5, 0.5], [0.25 + 2.25, 0.25], [2, 1]])
    np.testing.assert_allclose(stats[:, 2:], [[1, 2], [1.0, 8.0], [1.0, 40.0], [1, 2]])


# ------------------------------------------------------------------------------------------- robustness


def test_non_finite_losses_counted_and_ignored():
    rng = np.random.default_rng(2)
    clean = DiscrepancyTracker(4, half_life=20.0)
    dirty = DiscrepancyTracker(4, half_life=20.0)
    total_bad = 0
    for step in range(15):
        r, loss, t = _batch(rng, 4, 16)
        clean.update(r, loss, t)
        bad_l = np.concatenate([loss, [np.nan, np.inf, -np.inf]])
        bad_r = np.concatenate([r, [step % 4, (step + 1) % 4, 0]])
        bad_t = np.concatenate([t, [10, 500, 999]])
        perm = rng.permutation(len(bad_l))
        # shuffle so the non-finite values sit among the finite ones
        dirty.update(bad_r[perm], bad_l[perm], bad_t[perm])
        total_bad += 3
        assert dirty.last_nonfinite == 3
    assert dirty.num_nonfinite == total_bad
    assert clean.num_nonfinite == 0
    assert np.all(np.isfinite(dirty.estimates()))
    np.testing.assert_allclose(dirty.estimates(), clean.estimates(), rtol=1e-12, atol=0)
    np.testing.assert_allclose(dirty.counts(), clean.counts(), rtol=1e-12, atol=0)


def test_null_region_samples_ignored_and_not_counted_as_nonfinite():
    tr = DiscrepancyTracker(2)
    tr.update([0, 1], [1.0, 1.0], [0, 0])  # starts the baseline of bin 0
    tr.update([-1, -1, 0, 1], [np.nan, 5.0, 1.0, 1.0], [0, 0, 0, 0])
    assert tr.last_nonfinite == 0
    np.testing.assert_array_equal(tr.counts(), [1.0, 1.0])


def test_bad_inputs_raise():
    tr = DiscrepancyTracker(3)
    with pytest.raises(ValueError, match=r"region_ids has 2 entries but losses has 3"):
        tr.update([0, 1], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match=r"timesteps has 1 entries but losses has 2"):
        tr.update([0, 1], [1.0, 2.0], [5])
    with pytest.raises(ValueError, match=r"region id 3 is out of range for 3 regions"):
        tr.update([0, 3], [1.0, 2.0])


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"num_regions": 0}, r"num_regions=0 must be >= 1"),
        ({"num_regions": 2, "half_life": 0.0}, r"half_life=0.0 must be > 0"),
        ({"num_regions": 2, "half_life": -5.0}, r"half_life=-5.0 must be > 0"),
        ({"num_regions": 2, "num_timestep_bins": 0}, r"num_timestep_bins=0 must be >= 1"),
        ({"num_regions": 2, "prior_strength": -1.0}, r"prior_strength=-1.0 must be >= 0"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DiscrepancyTracker(**kwargs)


def test_no_discounting_and_infinite_half_life():
    for hl in (None, math.inf):
        tr = DiscrepancyTracker(2, half_life=hl)
        assert tr.decay == 1.0
        for _ in range(6):
            tr.update([0, 1], [1.0, 1.0])
        np.testing.assert_array_equal(tr.counts(), [5.0, 5.0])  # the first update only started the baseline


def test_discounting_halves_weight_after_half_life():
    tr = DiscrepancyTracker(1, half_life=10.0, samples_per_half_life=None, normalize_timesteps=False)
    tr.update([0], [1.0])
    for _ in range(10):
        tr.update(np.zeros(0, dtype=np.int64), np.zeros(0))
    np.testing.assert_allclose(tr.counts(), [0.5], rtol=1e-12)
    np.testing.assert_allclose(tr.q.sum(), 0.25, rtol=1e-12)  # squared weights decay twice as fast


def test_samples_per_half_life_lengthens_the_half_life_for_sparse_regions():
    # 1024 regions, 256 samples per update, 50 samples per region per half-life: 200 steps
    tr = DiscrepancyTracker(1024, half_life=50.0, samples_per_half_life=50.0)
    assert tr.update_decay(256) == pytest.approx(0.5 ** (1 / 200), rel=1e-15)
    assert tr.update_decay(1024) == pytest.approx(0.5 ** (1 / 50), rel=1e-15)  # half_life is the minimum
    assert tr.update_decay(4096) == pytest.approx(0.5 ** (1 / 50), rel=1e-15)
    assert tr.update_decay(0) == 1.0  # no samples, no forgetting
    for _ in range(3):  # the first update starts the baseline; the next two are scored
        tr.update(np.arange(256), np.ones(256))
    np.testing.assert_allclose(tr.counts()[:256], 1 + 0.5 ** (1 / 200), rtol=1e-14)
    with pytest.raises(ValueError, match=r"samples_per_half_life=0 must be > 0"):
        DiscrepancyTracker(4, samples_per_half_life=0)


@pytest.mark.parametrize("half_life, batch_per_region, cv", [(50.0, 2, 0.5), (200.0, 1, 1.0)])
def test_standard_errors_match_the_spread_over_repeated_runs(half_life, batch_per_region, cv):
    """Fast version of benchmarks/calibration.py's se part: Kish-based se vs the empirical sd (+-15%)."""
    k, reps = 8, 120
    s2 = np.log1p(cv * cv)
    raw, est, se_raw, se_est = [], [], [], []
    for rep in range(reps):
        rng = np.random.default_rng(rep)
        tr = DiscrepancyTracker(k, half_life=half_life)
        p = np.linspace(1, 3, k) / np.linspace(1, 3, k).sum()  # skewed: fewer samples in some regions
        for _ in range(int(4 * half_life)):
            r = rng.choice(k, size=k * batch_per_region, p=p)
            t = rng.integers(0, 1000, r.size)
            tr.update(r, (0.1 + t / 1000) * rng.lognormal(-s2 / 2, np.sqrt(s2), r.size), t)
        raw.append(tr.raw_means())
        est.append(tr.estimates())
        se_raw.append(tr.standard_errors())
        se_est.append(tr.uncertainty())
    for values, ses in ((raw, se_raw), (est, se_est)):
        ratio = np.sqrt((np.asarray(ses) ** 2).mean() / np.asarray(values).var(axis=0, ddof=1).mean())
        assert 0.85 <= ratio <= 1.15, ratio
    # the discounted count alone (the earlier formula) would claim a larger se: Kish n is about twice it
    assert np.median(tr.effective_sizes() / tr.counts()) > 1.6


def test_empty_tracker_is_neutral():
    tr = DiscrepancyTracker(3)
    np.testing.assert_array_equal(tr.estimates(), np.ones(3))
    assert tr.global_mean() == 1.0
    assert np.all(np.isnan(tr.raw_means()))
    assert np.all(np.isinf(tr.uncertainty()))


# ------------------------------------------------------------------------------------------- estimates


def test_unobserved_region_drifts_back_to_global_mean():
    rng = np.random.default_rng(3)
    tr = DiscrepancyTracker(4, half_life=10.0, normalize_timesteps=False, prior_strength=4.0)
    scale = np.array([3.0, 1.0, 1.0, 1.0])
    for _ in range(50):
        tr.update(*_batch(rng, 4, 64, scale))
    gap_before = tr.estimates()[0] - tr.global_mean()
    assert gap_before > 0.5
    gaps = []
    for _ in range(200):  # region 0 is no longer observed (20 half-lives)
        r, loss, t = _batch(rng, 4, 64, scale)
        keep = r != 0
        tr.update(r[keep], loss[keep], t[keep])
        gaps.append(abs(tr.estimates()[0] - tr.global_mean()))
    assert gaps[-1] < 0.01 * gap_before
    assert gaps[-1] < gaps[len(gaps) // 2] < gaps[0]
    # with evidence n left, the estimate sits exactly n / (n + kappa) of the way from the mean to the raw mean
    n = tr.counts()[0]
    raw_gap = tr.raw_means()[0] - tr.global_mean()
    assert tr.estimates()[0] - tr.global_mean() == pytest.approx(n / (n + 4.0) * raw_gap, rel=1e-9, abs=1e-15)
    assert tr.counts()[0] < 1e-3


def test_shrinkage_toward_the_mean_for_few_samples():
    rng = np.random.default_rng(4)
    tr = DiscrepancyTracker(3, half_life=None, normalize_timesteps=False, prior_strength=8.0)
    for _ in range(30):
        tr.update(rng.integers(1, 3, 40), np.ones(40))  # regions 1, 2: many samples of loss 1
    tr.update([0, 0], [3.0, 3.0])  # region 0: two samples of loss 3
    raw = tr.raw_means()[0]
    est = tr.estimates()[0]
    mu = tr.global_mean()
    assert raw == pytest.approx(3.0)
    assert mu < est < raw
    # the shrunk estimate is the pseudo-count weighted mean: (n * raw + kappa * mu) / (n + kappa)
    assert est == pytest.approx((2 * raw + 8.0 * mu) / (2 + 8.0), rel=1e-12)
    # with many samples the estimate approaches the raw mean
    for _ in range(200):
        tr.update([0, 0], [3.0, 3.0])
    assert abs(tr.estimates()[0] - tr.raw_means()[0]) < 0.05 * abs(raw - mu)


def test_no_shrinkage_with_zero_prior_strength():
    tr = DiscrepancyTracker(2, normalize_timesteps=False, prior_strength=0.0)
    tr.update([0, 0, 1], [2.0, 4.0, 1.0])
    np.testing.assert_allclose(tr.estimates(), [3.0, 1.0], rtol=1e-12)


def _timestep_confounded_tracker(normalize: bool) -> DiscrepancyTracker:
    """Region 0 is as hard as the others but drawn mostly at high-loss timesteps."""
    rng = np.random.default_rng(5)
    tr = DiscrepancyTracker(4, half_life=200.0, num_timestep_bins=10, normalize_timesteps=normalize,
                            prior_strength=8.0)
    for _ in range(200):
        r = rng.integers(0, 4, 64)
        t = np.where(r == 0, rng.integers(700, 1000, 64), rng.integers(0, 1000, 64))
        loss_of_bin = 0.1 + 0.3 * (t // 100)  # loss depends on the timestep bin only
        tr.update(r, loss_of_bin * rng.uniform(0.9, 1.1, 64), t)
    return tr


def test_timestep_normalisation_removes_timestep_confounding():
    normalised = _timestep_confounded_tracker(True)
    est = normalised.estimates()
    assert np.all(np.abs(est - normalised.global_mean()) < 0.03), est
    assert normalised.global_mean() == pytest.approx(1.0, abs=0.02)

    raw = _timestep_confounded_tracker(False)
    est_raw = raw.estimates()
    assert int(np.argmax(est_raw)) == 0
    assert est_raw[0] > 1.3 * np.max(est_raw[1:]), est_raw


def test_timestep_normalisation_keeps_real_differences():
    rng = np.random.default_rng(6)
    tr = DiscrepancyTracker(3, half_life=100.0)
    for _ in range(100):
        tr.update(*_batch(rng, 3, 60, scale=[1.5, 1.0, 1.0]))
    est = tr.estimates()
    assert int(np.argmax(est)) == 0
    assert est[0] / est[1:].mean() == pytest.approx(1.5, rel=0.08)


def test_scores_follow_the_learning_curve():
    """Losses fall 10x over training; a region 1.3x harder throughout keeps a 1.3x estimate with a tight
    standard error (scored against a long-run baseline, the early, large losses would dominate its mean and
    variance), and the others stay at 1."""
    rng = np.random.default_rng(12)
    tr = DiscrepancyTracker(4, half_life=400.0, num_timestep_bins=5)
    for step in range(400):
        r, loss, t = _batch(rng, 4, 64, scale=[1.3, 1.0, 1.0, 1.0])
        tr.update(r, loss * 10.0 ** (-step / 400), t)
    est = tr.estimates() / tr.global_mean()
    assert est[0] / est[1:].mean() == pytest.approx(1.3, rel=0.04)
    assert np.all(tr.standard_errors() < 0.03)


def test_baseline_weights_keep_the_baseline_of_the_pool_whatever_the_allocation():
    """Region 0 is 2x harder. Drawn 9 times as often as region 1, it would pull an unweighted baseline up to
    1.9 and its own score down to 1.05; weighted by prompt share / probability, the scores stay 2 and 1."""
    rng = np.random.default_rng(13)
    weighted, plain = DiscrepancyTracker(2, num_timestep_bins=1), DiscrepancyTracker(2, num_timestep_bins=1)
    p = np.array([0.9, 0.1])  # the allocation; each region holds half of the pool
    for _ in range(300):
        r = rng.choice(2, size=64, p=p)
        loss = np.where(r == 0, 2.0, 1.0) * rng.uniform(0.9, 1.1, 64)
        weighted.update(r, loss, baseline_weights=0.5 / p[r])
        plain.update(r, loss)
    assert weighted.bin_baseline()[0] == pytest.approx(1.5, rel=0.03)
    np.testing.assert_allclose(weighted.raw_means(), [4 / 3, 2 / 3], rtol=0.03)
    assert plain.bin_baseline()[0] == pytest.approx(1.9, rel=0.03)
    with pytest.raises(ValueError, match=r"baseline_weights has 1 entries but losses has 2"):
        weighted.update([0, 1], [1.0, 1.0], baseline_weights=[1.0])


def test_baseline_follows_the_latest_samples_of_each_bin():
    tr = DiscrepancyTracker(1, num_timestep_bins=2, num_train_timesteps=10, baseline_samples=4.0)
    tr.update(np.zeros(4, dtype=np.int64), [8.0] * 4, [0] * 4)
    tr.update(np.zeros(4, dtype=np.int64), [2.0] * 4, [0] * 4)  # 4 samples: the old ones weigh half
    assert tr.bin_baseline()[0] == pytest.approx((0.5 * 32 + 8) / (0.5 * 4 + 4))
    assert tr.bin_baseline()[1] == 0.0  # no evidence: no baseline
    with pytest.raises(ValueError, match=r"baseline_samples=0 must be > 0"):
        DiscrepancyTracker(2, baseline_samples=0)


def test_uncertainty_shrinks_with_evidence():
    rng = np.random.default_rng(7)
    tr = DiscrepancyTracker(2, half_life=None, num_timestep_bins=1)
    tr.update(*_batch(rng, 2, 20))
    tr.update(*_batch(rng, 2, 20))
    first = tr.uncertainty()
    for _ in range(50):
        tr.update(*_batch(rng, 2, 20))
    assert np.all(np.isfinite(first)) and np.all(tr.uncertainty() < first)


def test_last_batch_means():
    tr = DiscrepancyTracker(3, normalize_timesteps=False)
    tr.update([0, 0, 1], [2.0, 4.0, 5.0])
    counts, means = tr.last_batch_means()
    np.testing.assert_array_equal(counts, [2.0, 1.0, 0.0])
    np.testing.assert_allclose(means[:2], [3.0, 5.0])  # first batch: no baseline yet, raw values
    assert np.isnan(means[2])


# ------------------------------------------------------------------------------------------- state


def _fed_tracker(seed=8) -> DiscrepancyTracker:
    rng = np.random.default_rng(seed)
    tr = DiscrepancyTracker(5, half_life=25.0, num_timestep_bins=4)
    for _ in range(30):
        r, loss, t = _batch(rng, 5, 32)
        loss[0] = np.nan
        tr.update(r, loss, t)
    return tr


def test_state_dict_round_trip_continues_identically():
    rng = np.random.default_rng(9)
    a = _fed_tracker()
    b = DiscrepancyTracker(5, half_life=25.0, num_timestep_bins=4)
    b.load_state_dict(a.state_dict())
    _assert_same_statistics(a, b, rtol=0)
    assert (b.num_updates, b.num_nonfinite, b.last_nonfinite) == (a.num_updates, a.num_nonfinite, a.last_nonfinite)
    np.testing.assert_array_equal(a.last_batch_means()[0], b.last_batch_means()[0])
    for _ in range(5):
        batch = _batch(rng, 5, 32)
        a.update(*batch)
        b.update(*batch)
    _assert_same_statistics(a, b, rtol=0)


def test_state_dict_is_independent_of_the_tracker():
    a = _fed_tracker()
    state = a.state_dict()
    s0 = state["s0"].clone()
    a.update([0], [1.0], [0])
    assert torch.equal(state["s0"], s0)


def test_state_loads_with_weights_only(tmp_path):
    a = _fed_tracker()
    path = tmp_path / "tracker.pt"
    torch.save(a.state_dict(), path)
    state = torch.load(path, weights_only=True)
    b = DiscrepancyTracker(5, half_life=25.0, num_timestep_bins=4)
    b.load_state_dict(state)
    _assert_same_statistics(a, b, rtol=0)
    assert b.num_nonfinite == a.num_nonfinite == 30


def test_load_state_with_wrong_shape_raises():
    a = _fed_tracker()
    with pytest.raises(ValueError, match=r"tracker state has 5 regions and 4 timestep bins but this tracker has 5 and 10"):
        DiscrepancyTracker(5, num_timestep_bins=10).load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match=r"tracker state has 5 regions .* this tracker has 6 and 4"):
        DiscrepancyTracker(6, num_timestep_bins=4).load_state_dict(a.state_dict())


# ------------------------------------------------------------------------------------------- tracking error


@pytest.mark.parametrize("half_life", [10.0, 40.0])
def test_tracking_error_bound_holds_for_drifting_signal(half_life):
    rng = np.random.default_rng(int(half_life))
    amplitude, period, sigma, m = 0.3, 400.0, 0.2, 4
    drift = amplitude * 2 * math.pi / period  # max |d mu / dt| per step
    kappa = 0.0
    bound = tracking_error_bound(half_life, sigma=sigma, drift=drift, samples_per_step=m, c=3.0, kappa=kappa)
    tr = DiscrepancyTracker(1, half_life=half_life, normalize_timesteps=False, prior_strength=kappa)
    burn_in = int(10 * half_life)
    steps = burn_in + 1500
    errors = []
    for t in range(steps):
        mu = 1.0 + amplitude * math.sin(2 * math.pi * t / period)
        tr.update(np.zeros(m, dtype=np.int64), mu + rng.uniform(-sigma, sigma, m))
        if t >= burn_in:
            errors.append(abs(tr.estimates()[0] - mu))
    errors = np.asarray(errors)
    assert np.mean(errors <= bound) >= 0.99, (bound, np.quantile(errors, [0.5, 0.99, 1.0]))
    # the bound is not vacuous: errors are a sizeable share of it
    assert errors.max() > 0.2 * bound


def test_tracking_error_bound_with_shrinkage_between_regions():
    rng = np.random.default_rng(11)
    half_life, amplitude, period, sigma, m, kappa = 20.0, 0.2, 300.0, 0.2, 4, 8.0
    drift = amplitude * 2 * math.pi / period
    tr = DiscrepancyTracker(2, half_life=half_life, normalize_timesteps=False, prior_strength=kappa)
    burn_in, errors, bounds = 200, [], []
    for t in range(burn_in + 1200):
        mu0 = 1.5 + amplitude * math.sin(2 * math.pi * t / period)
        mu1 = 1.0
        losses = np.concatenate([mu0 + rng.uniform(-sigma, sigma, m), mu1 + rng.uniform(-sigma, sigma, m)])
        tr.update(np.repeat([0, 1], m), losses)
        if t >= burn_in:
            gap = abs(mu0 - (mu0 + mu1) / 2)
            bounds.append(tracking_error_bound(half_life, sigma, drift, m, c=3.0, kappa=kappa, gap=gap))
            errors.append(abs(tr.estimates()[0] - mu0))
    assert np.mean(np.asarray(errors) <= np.asarray(bounds)) >= 0.99


def test_tracking_error_bound_formula_terms():
    # lag grows and noise shrinks with the half-life; shrinkage adds kappa / (n + kappa) * gap
    short = tracking_error_bound(5.0, sigma=1.0, drift=0.0)
    long = tracking_error_bound(50.0, sigma=1.0, drift=0.0)
    assert long < short
    assert tracking_error_bound(50.0, sigma=0.0, drift=0.01) > tracking_error_bound(5.0, sigma=0.0, drift=0.01)
    g = 0.5 ** (1 / 10.0)
    n = 2 / (1 - g)
    assert tracking_error_bound(10.0, 0.0, 0.0, samples_per_step=2, kappa=4.0, gap=0.5) == pytest.approx(
        4.0 / (n + 4.0) * 0.5, rel=1e-12)
    assert tracking_error_bound(10.0, 0.0, 0.01) == pytest.approx(0.01 * g / (1 - g), rel=1e-12)


# ------------------------------------------------------------------------------------------- properties


# per-sample losses: zero, float32-representable positive magnitudes, or non-finite values
_losses = st.one_of(st.just(0.0), st.floats(min_value=1e-30, max_value=1e3),
                    st.sampled_from([np.nan, np.inf, -np.inf]))


@st.composite
def _batches(draw, k=4):
    n = draw(st.integers(0, 24))
    regions = draw(hnp.arrays(np.int64, n, elements=st.integers(-1, k - 1)))
    losses = draw(hnp.arrays(np.float64, n, elements=_losses))
    timesteps = draw(hnp.arrays(np.int64, n, elements=st.integers(0, T - 1)))
    return regions, losses, timesteps


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_batches(), min_size=1, max_size=8), st.booleans(), st.floats(0.0, 20.0))
def test_property_estimates_finite_counts_nonnegative(batches, normalize, kappa):
    tr = DiscrepancyTracker(4, half_life=5.0, num_timestep_bins=5, normalize_timesteps=normalize,
                            prior_strength=kappa)
    for r, loss, t in batches:
        tr.update(r, loss, t)
        assert np.all(np.isfinite(tr.estimates()))
        assert np.all(tr.counts() >= 0)
        assert np.all(tr.s0 >= 0) and np.all(tr.s2 >= 0)
        assert math.isfinite(tr.global_mean())
        assert not np.any(np.isnan(tr.uncertainty()))
    expected_bad = sum(int((~np.isfinite(loss) & (r >= 0)).sum()) for r, loss, _ in batches)
    assert tr.num_nonfinite == expected_bad


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(_batches(), _batches()), min_size=1, max_size=5))
def test_property_merge_of_batches(pairs):
    whole = DiscrepancyTracker(4, half_life=7.0, num_timestep_bins=5)
    parts = DiscrepancyTracker(4, half_life=7.0, num_timestep_bins=5)
    for (r1, l1, t1), (r2, l2, t2) in pairs:
        whole.update(np.concatenate([r1, r2]), np.concatenate([l1, l2]), np.concatenate([t1, t2]))
        s1, n1 = parts.batch_statistics(r1, l1, t1)
        s2, n2 = parts.batch_statistics(r2, l2, t2)
        parts.apply_statistics(s1 + s2, n1 + n2)
    for name in ("s0", "s1", "s2"):
        np.testing.assert_allclose(getattr(whole, name), getattr(parts, name), rtol=1e-12, atol=1e-300)
    np.testing.assert_allclose(whole.estimates(), parts.estimates(), rtol=1e-12, atol=1e-15)
    assert whole.num_nonfinite == parts.num_nonfinite
