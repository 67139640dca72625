"""Allocation policies: discrepancy estimates -> region probabilities (diffusers_aria/allocation.py)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from diffusers_aria.allocation import (
    EXP3,
    NULLS,
    POLICIES,
    ARIAAllocation,
    DoReMiEG,
    PromptUniform,
    RegionUniform,
    StaticAfterWarmup,
    _min_slab_weight,
    credible_excess,
    empirical_null_scale,
    make_policy,
    policy_arguments,
    project_to_bounds,
    sparse_shrinkage,
    standardise,
    tree_excess,
)
from diffusers_aria.hierarchy import RegionTree
from diffusers_aria.reducibility import ReducibilityTest
from diffusers_aria.sampler import AdaptiveRegionSampler
from diffusers_aria.tracker import DiscrepancyTracker

SIZES = np.array([40, 10, 25, 5, 20])
K = len(SIZES)
# small warm-ups so the tests see the adaptive phase quickly
FAST = {"aria": {"warmup_steps": 5}, "static": {"warmup_steps": 5}, "doremi": {"warmup_steps": 5}, "exp3": {},
        "rc": {}, "region_uniform": {}}


class FakeTracker:
    """The part of `DiscrepancyTracker` the policies read, with estimates set by hand."""

    def __init__(self, estimates, num_updates=10_000, uncertainty=None):
        self._est = np.asarray(estimates, dtype=np.float64)
        self.num_updates = num_updates
        self.num_regions = self._est.size
        self._se = np.zeros(self.num_regions) if uncertainty is None else np.asarray(uncertainty, dtype=np.float64)

    def estimates(self):
        return self._est

    def raw_means(self):
        return self._est

    def standard_errors(self, pooled=False):
        return self._se

    def uncertainty(self):
        return self._se

    def variances(self, pooled=False):
        return np.ones(self.num_regions)  # unit variance, as region_moments says

    def global_mean(self):
        return float(self._est.mean())

    def last_batch_means(self):
        return np.full(self.num_regions, 10.0), self._est

    @property
    def last_counts(self):
        return np.zeros(self.num_regions)

    def region_moments(self):
        """Moments whose means are the estimates and whose standard errors are the given ones (unit variance,
        unweighted: se = 1 / sqrt(n)); an exact estimate (se 0) gets a huge count."""
        n = np.where(self._se > 0, 1.0 / np.maximum(self._se, 1e-300) ** 2, 1e12)
        return n, self._est * n, n.copy(), 1.0


def _feed(tracker: DiscrepancyTracker, rng, probabilities, scale, n=128):
    """One step: draw regions by `probabilities`, losses scaled per region with mild noise."""
    regions = rng.choice(len(scale), size=n, p=probabilities)
    t = rng.integers(0, 1000, n)
    losses = (0.2 + t / 1000) * np.asarray(scale)[regions] * rng.uniform(0.8, 1.2, n)
    tracker.update(regions, losses, t)


def _run(policy, steps, scale, seed=0, n=128, half_life=50.0):
    rng = np.random.default_rng(seed)
    tracker = DiscrepancyTracker(policy.num_regions, half_life=half_life)
    history = []
    for step in range(steps):
        _feed(tracker, rng, policy.probabilities, scale, n)
        history.append(policy.step(step, tracker).copy())
    return np.asarray(history), tracker


# ------------------------------------------------------------------------------------------- all policies


def test_policy_registry():
    assert set(POLICIES) == {"aria", "rc", "region_uniform", "static", "doremi", "exp3"}
    for name, cls in POLICIES.items():
        assert cls.name == name
        assert isinstance(make_policy(name, SIZES), cls)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_probabilities_valid_every_step(name):
    policy = make_policy(name, SIZES, **FAST[name])
    assert policy.probabilities.dtype == np.float64
    assert abs(policy.probabilities.sum() - 1.0) <= 1e-12
    history, _ = _run(policy, 40, scale=[1.0, 1.6, 0.8, 1.2, 1.0])
    assert history.shape == (40, K)
    assert np.all(history >= 0)
    np.testing.assert_allclose(history.sum(axis=1), 1.0, rtol=0, atol=1e-12)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_policies_are_deterministic(name):
    a = make_policy(name, SIZES, **FAST[name])
    b = make_policy(name, SIZES, **FAST[name])
    ta, tb = DiscrepancyTracker(K, half_life=20.0), DiscrepancyTracker(K, half_life=20.0)
    rng = np.random.default_rng(1)
    for step in range(30):
        regions = rng.integers(0, K, 64)
        t = rng.integers(0, 1000, 64)
        losses = rng.gamma(2.0, 1.0 + regions / K)
        ta.update(regions, losses, t)
        tb.update(regions.copy(), losses.copy(), t.copy())
        assert np.array_equal(a.step(step, ta), b.step(step, tb))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_state_dict_round_trip_continues_identically(name, tmp_path):
    scale = [1.0, 1.5, 0.9, 1.1, 1.0]
    a = make_policy(name, SIZES, **FAST[name])
    rng = np.random.default_rng(2)
    tracker = DiscrepancyTracker(K, half_life=20.0)
    for step in range(12):
        _feed(tracker, rng, a.probabilities, scale)
        a.step(step, tracker)
    path = tmp_path / "policy.pt"
    torch.save(a.state_dict(), path)
    b = make_policy(name, SIZES, **FAST[name])
    b.load_state_dict(torch.load(path, weights_only=True))
    assert np.array_equal(a.probabilities, b.probabilities)
    for step in range(12, 30):
        _feed(tracker, rng, a.probabilities, scale)
        assert np.array_equal(a.step(step, tracker), b.step(step, tracker))


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_load_state_with_wrong_number_of_regions_raises(name):
    state = make_policy(name, SIZES).state_dict()
    with pytest.raises(ValueError, match=r"allocation state has 5 regions but this policy has 3"):
        make_policy(name, [1, 2, 3]).load_state_dict(state)


# ------------------------------------------------------------------------------------------- priors


def test_prompt_uniform_and_region_uniform():
    np.testing.assert_allclose(PromptUniform(SIZES).probabilities, SIZES / SIZES.sum(), rtol=1e-15)
    assert np.array_equal(RegionUniform(SIZES).probabilities, np.full(K, 1.0 / K))
    # they never move
    tracker = FakeTracker([1.0, 5.0, 1.0, 1.0, 1.0])
    assert np.array_equal(PromptUniform(SIZES).step(0, tracker), SIZES / SIZES.sum())
    assert np.array_equal(RegionUniform(SIZES).step(0, tracker), np.full(K, 1.0 / K))


def test_aria_alpha_zero_is_region_uniform():
    aria = ARIAAllocation(SIZES, alpha=0.0)
    assert np.array_equal(aria.probabilities, RegionUniform(SIZES).probabilities)
    assert np.array_equal(aria.step(0, FakeTracker(np.ones(K), num_updates=0)), np.full(K, 1.0 / K))


def test_aria_alpha_interpolates_between_priors():
    half = ARIAAllocation(SIZES, alpha=0.5).probabilities
    np.testing.assert_allclose(half, np.sqrt(SIZES) / np.sqrt(SIZES).sum(), rtol=1e-14)


def test_aria_alpha_one_equal_estimates_is_exactly_prompt_uniform():
    rc = PromptUniform(SIZES)
    aria = ARIAAllocation(SIZES, alpha=1.0, damping=0.3, warmup_steps=3)
    assert np.array_equal(aria.probabilities, rc.probabilities)
    tracker = DiscrepancyTracker(K, half_life=10.0)
    rng = np.random.default_rng(3)
    for step in range(20):
        # every region receives the same samples: the estimates are equal
        t = rng.integers(0, 1000, 8)
        losses = (0.2 + t / 1000) * rng.uniform(0.5, 1.5, 8)
        tracker.update(np.repeat(np.arange(K), 8), np.tile(losses, K), np.tile(t, K))
        p = aria.step(step, tracker)
        assert np.array_equal(p, rc.step(step, tracker)), step
    assert tracker.num_updates > aria.warmup_steps
    # also with equal estimates given directly, and for the target itself
    assert np.array_equal(aria.step(99, FakeTracker(np.full(K, 1.7))), rc.probabilities)
    assert np.array_equal(aria.target(np.full(K, 0.3)), rc.probabilities)
    zscore = ARIAAllocation(SIZES, alpha=1.0, score="zscore", warmup_steps=0)
    assert np.array_equal(zscore.step(0, FakeTracker(np.full(K, 2.0))), rc.probabilities)


def test_aria_is_prior_during_warmup_then_moves_toward_harder_region():
    scale = [1.0, 1.1, 1.0, 1.0, 1.0]  # region 1 is consistently 10% harder (per-sample noise +-20%)
    policy = ARIAAllocation(SIZES, warmup_steps=30, damping=0.1, stall_draws=None)  # it never gets easier
    history, tracker = _run(policy, 150, scale, n=256, half_life=100.0)
    prior = SIZES / SIZES.sum()  # the default alpha=1: Random Conditioning's prompt share
    for p in history[:29]:
        assert np.array_equal(p, prior)
    assert history[-1][1] > 1.5 * prior[1]
    ratio = history[-1] / prior
    assert int(np.argmax(ratio)) == 1
    # the shift builds up gradually (damping) after the warm-up
    assert history[30][1] < history[60][1] < history[-1][1]
    assert int(np.argmax(tracker.estimates())) == 1


def test_aria_damping_one_jumps_to_target():
    est = FakeTracker(np.array([1.0, 1.3, 0.9, 1.0, 1.1]))
    policy = ARIAAllocation(SIZES, damping=1.0, warmup_steps=0, stall_draws=None)  # no trial bound either
    np.testing.assert_allclose(policy.step(0, est), policy.target_from(est), rtol=0, atol=1e-12)
    damped = ARIAAllocation(SIZES, damping=0.25, warmup_steps=0, stall_draws=None, refresh_every=1)
    p = damped.step(0, est)
    expected = damped.prior + 0.25 * (damped.target_from(est) - damped.prior)
    np.testing.assert_allclose(p, expected, rtol=1e-14)
    assert p[1] > damped.prior[1]


@pytest.mark.parametrize("score, hot_tau, cold_tau", [("sparse", 1.0, 0.2), ("zscore", 4.0, 0.5)])
def test_aria_lower_temperature_tilts_more(score, hot_tau, cold_tau):
    scores = np.array([0.0, 0.3, -0.1, 0.0, 0.1])
    hot = ARIAAllocation(SIZES, score=score, tau=hot_tau, floor=0.0, max_shift=1.0).target(scores)
    cold = ARIAAllocation(SIZES, score=score, tau=cold_tau, floor=0.0, max_shift=1.0).target(scores)
    assert cold[1] > hot[1] > ARIAAllocation(SIZES).prior[1]


def test_aria_max_shift_bounds_the_mass_moved_from_the_prior():
    scores = np.array([0.0, 0.0, 0.0, 2.0, 0.0])  # region 3 far harder: the tilt alone would take almost all
    free = ARIAAllocation(SIZES, max_shift=1.0).target(scores)
    assert free[3] > 0.95
    bounded = ARIAAllocation(SIZES, max_shift=0.3, floor=0.0)
    p = bounded.target(scores)
    assert 0.5 * np.abs(p - bounded.prior).sum() == pytest.approx(0.3, rel=1e-12)
    # the same direction as without the bound, scaled back toward the prior
    unbounded = ARIAAllocation(SIZES, max_shift=1.0, floor=0.0).target(scores)
    shift = 0.5 * np.abs(unbounded - bounded.prior).sum()
    np.testing.assert_allclose(p - bounded.prior, (0.3 / shift) * (unbounded - bounded.prior), rtol=1e-9, atol=1e-15)


def test_aria_floor_keeps_every_region_alive():
    policy = ARIAAllocation(SIZES, floor=0.5, tau=0.01, max_shift=1.0, warmup_steps=0, damping=1.0, stall_draws=None)
    p = policy.step(0, FakeTracker([0.0, 0.0, 0.0, 0.0, 100.0]))
    lower = np.minimum(policy.prior, 0.5 / K)
    assert np.all(p >= lower - 1e-15)
    np.testing.assert_allclose(p[:4], lower[:4], rtol=1e-12)  # the starved regions sit at their floor
    assert abs(p.sum() - 1.0) <= 1e-12


def test_aria_cap_limits_the_hardest_region():
    policy = ARIAAllocation(SIZES, cap=0.3, max_shift=1.0, tau=0.1, warmup_steps=0, damping=1.0, stall_draws=None)
    p = policy.step(0, FakeTracker([5.0, 1.0, 1.0, 10.0, 1.0]))
    assert p[3] == pytest.approx(0.3, abs=1e-12)
    assert abs(p.sum() - 1.0) <= 1e-12
    # a region whose prior is above the cap keeps at most its prior
    big = ARIAAllocation([80, 10, 10], cap=0.2, max_shift=1.0, warmup_steps=0, damping=1.0, stall_draws=None)
    q = big.step(0, FakeTracker([3.0, 1.0, 1.0]))
    assert q[0] <= 0.8 + 1e-15


def test_aria_max_ratio_bounds_the_boost_relative_to_the_prior():
    est = [1.0, 1.0, 1.0, 3.0, 1.0]  # region 3 three times harder, measured exactly
    bounded = ARIAAllocation(SIZES, max_ratio=4.0, max_shift=1.0, warmup_steps=0, damping=1.0, stall_draws=None)
    p = bounded.step(0, FakeTracker(est))
    assert p[3] == pytest.approx(4.0 * bounded.prior[3], rel=1e-12)
    free = ARIAAllocation(SIZES, max_shift=1.0, warmup_steps=0, damping=1.0, stall_draws=None).step(0, FakeTracker(est))
    assert free[3] > 4.5 * bounded.prior[3]  # the default: no bound on the ratio
    assert np.all(ARIAAllocation(SIZES, max_ratio=1.0, warmup_steps=0).step(0, FakeTracker(est))
                  <= bounded.prior + 1e-15)  # max_ratio=1: nothing above the prior, so the prior itself


@st.composite
def _aria_case(draw):
    k = draw(st.integers(2, 8))
    sizes = draw(hnp.arrays(np.int64, k, elements=st.integers(1, 1000)))
    estimates = draw(hnp.arrays(np.float64, k, elements=st.one_of(
        st.floats(0.0, 10.0), st.floats(1e3, 1e12), st.sampled_from([0.0, 1e-12, 1.0]))))
    kwargs = dict(
        alpha=draw(st.floats(0.0, 2.0)),
        tau=draw(st.floats(0.01, 5.0)),
        score=draw(st.sampled_from(["sparse", "credible", "zscore"])),
        threshold=draw(st.floats(0.0, 3.0)),
        floor=draw(st.floats(0.0, 1.0)),
        max_ratio=draw(st.one_of(st.none(), st.floats(1.0, 10.0))),
        max_shift=draw(st.floats(0.01, 1.0)),
        cap=draw(st.one_of(st.none(), st.floats(0.01, 1.0))),
        damping=draw(st.floats(0.01, 1.0)),
        z_clip=draw(st.one_of(st.none(), st.floats(0.5, 5.0))),
    )
    return sizes, estimates, kwargs


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_aria_case(), st.integers(1, 4))
def test_property_aria_floor_and_cap_respected(case, steps):
    sizes, estimates, kwargs = case
    policy = ARIAAllocation(sizes, warmup_steps=0, **kwargs)
    prior = policy.prior
    k = len(sizes)
    lower = np.minimum(prior, kwargs["floor"] / k)
    upper = np.ones(k) if kwargs["cap"] is None else np.maximum(prior, kwargs["cap"])
    if kwargs["max_ratio"] is not None:
        upper = np.minimum(upper, kwargs["max_ratio"] * prior)
    tracker = FakeTracker(estimates, uncertainty=np.abs(estimates) * 0.1)
    for step in range(steps):
        p = policy.step(step, tracker)
        assert np.all(np.isfinite(p))
        assert abs(p.sum() - 1.0) <= 1e-12
        assert np.all(p >= lower - 1e-15), (p, lower)
        assert np.all(p <= upper + 1e-15), (p, upper)
        assert 0.5 * np.abs(p - prior).sum() <= kwargs["max_shift"] + 1e-12
    t = policy.target_from(tracker)
    assert abs(t.sum() - 1.0) <= 1e-12
    assert np.all(t >= lower - 1e-15) and np.all(t <= upper + 1e-15)


# ------------------------------------------------------------------------------------------- other policies


def test_static_after_warmup_freezes():
    policy = StaticAfterWarmup(SIZES, warmup_steps=3, tau=0.5)
    assert policy.damping == 1.0
    prior = policy.prior
    for step in range(3):
        assert np.array_equal(policy.step(step, FakeTracker(np.ones(K), num_updates=step)), prior)
    harder = FakeTracker([1.0, 2.0, 1.0, 1.0, 1.0], num_updates=3)
    first = policy.step(3, harder).copy()
    assert policy.frozen
    assert first[1] > prior[1]
    assert np.array_equal(first, policy.target_from(harder))
    later = policy.step(4, FakeTracker([3.0, 1.0, 1.0, 1.0, 1.0], num_updates=50))
    assert np.array_equal(later, first)
    # the frozen flag survives a checkpoint
    restored = StaticAfterWarmup(SIZES, warmup_steps=3, tau=0.5)
    restored.load_state_dict(policy.state_dict())
    assert restored.frozen
    assert np.array_equal(restored.step(5, FakeTracker([3.0, 1.0, 1.0, 1.0, 1.0])), first)


def test_make_policy_static_accepts_aria_kwargs_but_no_damping():
    policy = make_policy("static", SIZES, tau=0.25, floor=0.1, warmup_steps=7)
    assert isinstance(policy, StaticAfterWarmup)
    assert (policy.tau, policy.floor, policy.damping, policy.warmup_steps) == (0.25, 0.1, 1.0, 7)
    with pytest.raises(TypeError, match="allocation 'static' does not take damping; it takes alpha, cap"):
        make_policy("static", SIZES, damping=0.5)
    with pytest.raises(TypeError, match="allocation 'rc' does not take lr, tau; it takes no arguments"):
        make_policy("rc", SIZES, tau=0.3, lr=0.1)


def test_doremi_increases_weight_of_hardest_region():
    policy = DoReMiEG(SIZES, lr=0.5, warmup_steps=5)
    scale = [1.0, 1.0, 1.0, 1.6, 1.0]
    history, _ = _run(policy, 80, scale)
    prior = SIZES / SIZES.sum()
    for p in history[:4]:
        assert np.array_equal(p, prior)
    assert history[-1][3] > 2 * prior[3]
    assert int(np.argmax(history[-1] / prior)) == 3
    assert np.all(history[-1] >= policy.smoothing / K - 1e-15)


def test_exp3_increases_weight_of_hardest_region():
    policy = EXP3(SIZES, gamma=0.1)
    scale = [1.0, 1.0, 1.8, 1.0, 1.0]
    start = policy.probabilities.copy()
    np.testing.assert_allclose(start, np.full(K, 1.0 / K), rtol=1e-14)  # uniform to start with
    history, _ = _run(policy, 300, scale)
    assert int(np.argmax(history[-1])) == 2
    assert history[-1][2] > 2 * start[2]
    assert np.all(history[-1] >= policy.gamma / K - 1e-15)


def test_exp3_warmup_holds_weights():
    policy = EXP3(SIZES, gamma=0.1, warmup_steps=10)
    history, _ = _run(policy, 10, [1.0, 1.0, 3.0, 1.0, 1.0])
    assert np.all(history == history[0])
    assert np.all(policy.log_weights == 0)


# ------------------------------------------------------------------------------------------- errors, helpers


def test_make_policy_unknown_name_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown allocation 'nope'") as err:
        make_policy("nope", SIZES)
    for name in POLICIES:
        assert name in str(err.value)


def test_make_policy_rejects_foreign_kwargs_and_passes_none_on():
    policy = make_policy("exp3", SIZES, gamma=0.2, eta=None, warmup_steps=2)
    assert isinstance(policy, EXP3)
    assert policy.gamma == 0.2 and policy.warmup_steps == 2
    assert policy.eta == pytest.approx(0.2 / K)
    with pytest.raises(TypeError, match="allocation 'exp3' does not take tau; it takes eta, gamma, warmup_steps"):
        make_policy("exp3", SIZES, tau=3.0, gamma=0.2)
    assert make_policy("aria", SIZES, tau=0.5).tau == 0.5
    assert make_policy("aria", SIZES).max_ratio is None
    assert make_policy("aria", SIZES, max_ratio=4.0).max_ratio == 4.0
    assert make_policy("aria", SIZES, stall_draws=None).stall_draws is None
    assert "damping" not in policy_arguments("static") and "tau" in policy_arguments("static")


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (ARIAAllocation, {"tau": 0.0}, r"tau=0.0 must be > 0"),
        (ARIAAllocation, {"tau": -1.0}, r"tau=-1.0 must be > 0"),
        (ARIAAllocation, {"floor": 1.5}, r"floor=1.5 must lie in \[0, 1\]"),
        (ARIAAllocation, {"floor": -0.1}, r"floor=-0.1 must lie in \[0, 1\]"),
        (ARIAAllocation, {"cap": 0.0}, r"cap=0.0 must lie in \(0, 1\]"),
        (ARIAAllocation, {"cap": 1.5}, r"cap=1.5 must lie in \(0, 1\]"),
        (ARIAAllocation, {"damping": 0.0}, r"damping=0.0 must lie in \(0, 1\]"),
        (ARIAAllocation, {"damping": 1.2}, r"damping=1.2 must lie in \(0, 1\]"),
        (ARIAAllocation, {"warmup_steps": -1}, r"warmup_steps=-1 must be >= 0"),
        (ARIAAllocation, {"score": "linear"}, r"score='linear' is not valid; use one of sparse, credible, zscore"),
        (ARIAAllocation, {"fwer": 0.0}, r"fwer=0.0 must lie in \(0, 1\)"),
        (ARIAAllocation, {"max_shift": 0.0}, r"max_shift=0.0 must lie in \(0, 1\]"),
        (ARIAAllocation, {"stall_draws": 0}, r"stall_draws=0 must be > 0"),
        (ARIAAllocation, {"stall_decline": 1.0}, r"stall_decline=1.0 must lie in \[0, 1\)"),
        (ARIAAllocation, {"tree": RegionTree.flat(3)}, r"the region tree has 3 leaves but there are 5 regions"),
        (ARIAAllocation, {"max_ratio": 0.5}, r"max_ratio=0.5 must be >= 1"),
        (ARIAAllocation, {"threshold": -1.0}, r"threshold=-1.0 must be >= 0"),
        (DoReMiEG, {"smoothing": 1.5}, r"smoothing=1.5 must lie in \[0, 1\]"),
        (EXP3, {"gamma": 0.0}, r"gamma=0.0 must lie in \(0, 1\]"),
        (EXP3, {"gamma": 2.0}, r"gamma=2.0 must lie in \(0, 1\]"),
    ],
)
def test_bad_hyperparameters_raise(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(SIZES, **kwargs)


@pytest.mark.parametrize("sizes", [[], [3, 0, 2], [3, -1], [1.0, float("nan")], [1.0, float("inf")]])
@pytest.mark.parametrize("name", sorted(POLICIES))
def test_bad_sizes_raise(name, sizes):
    with pytest.raises(ValueError, match=r"region sizes must be positive and finite"):
        make_policy(name, sizes)


def test_config_reports_constructor_arguments():
    cfg = ARIAAllocation(SIZES, tau=0.7, cap=0.4).config()
    assert cfg["tau"] == 0.7 and cfg["cap"] == 0.4 and cfg["score"] == "sparse" and cfg["max_ratio"] is None
    assert cfg["alpha"] == 1.0 and cfg["max_shift"] == 0.5
    assert "sizes" not in cfg


def test_standardise():
    z = standardise(np.array([1.0, 2.0, 3.0]), clip=None)
    np.testing.assert_allclose(z, [-np.sqrt(1.5), 0.0, np.sqrt(1.5)], rtol=1e-12)
    assert np.array_equal(standardise(np.full(4, 2.5)), np.zeros(4))
    assert np.abs(standardise(np.array([0.0] * 20 + [1.0]), clip=2.0)).max() == 2.0


def test_project_to_bounds():
    inside = np.array([0.2, 0.3, 0.5])
    assert np.array_equal(project_to_bounds(inside, np.zeros(3), np.ones(3)), inside)
    p = project_to_bounds(np.array([0.9, 0.05, 0.05]), np.full(3, 0.1), np.full(3, 0.6))
    np.testing.assert_allclose(p, [0.6, 0.2, 0.2], rtol=1e-12)
    assert abs(p.sum() - 1.0) <= 1e-12


def test_credible_excess_is_zero_within_the_noise_and_full_when_exact():
    est = np.array([1.01, 0.99, 1.02, 0.98])
    score, a = credible_excess(est, np.full(4, 0.05))  # spread far below the standard errors
    assert a == 0.0 and np.array_equal(score, np.zeros(4))
    score, a = credible_excess(est, np.full(4, 1e-4))  # the same differences, measured precisely
    np.testing.assert_allclose(score, est - est.mean(), atol=1e-3)
    exact, _ = credible_excess(est, np.zeros(4))  # exact estimates: the relative excess itself
    np.testing.assert_allclose(exact, est / est.mean() - 1 - (est / est.mean() - 1).mean(), rtol=1e-12)
    # unobserved regions (NaN mean, infinite se) score 0 and do not count
    score, _ = credible_excess(np.array([1.0, 1.5, np.nan]), np.array([0.01, 0.01, np.inf]))
    assert score[2] == 0.0 and score[1] > 0 > score[0]


def test_credible_score_is_sized_by_excess_and_certainty():
    """A 2% difference under 10% noise does not move the allocation; a 20% one with 3% se does."""
    sizes = np.full(16, 10.0)
    est = np.ones(16)
    est[:2] = 1.02
    for score in ("sparse", "credible"):
        p = ARIAAllocation(sizes, score=score, warmup_steps=0, damping=1.0).step(
            0, FakeTracker(est, uncertainty=np.full(16, 0.1)))
        assert np.array_equal(p, np.full(16, 1 / 16))
        big = est.copy()
        big[:2] = 1.2
        q = ARIAAllocation(sizes, score=score, warmup_steps=0, damping=1.0).step(
            0, FakeTracker(big, uncertainty=np.full(16, 0.03)))
        assert np.all(q[:2] > 2.0 / 16) and np.all(q[2:] < 1 / 16), score
    est[:2] = 1.2
    zscore = ARIAAllocation(sizes, score="zscore", tau=0.5, max_ratio=None, warmup_steps=0, damping=1.0)
    noisy = est.copy()
    noisy[:2] = 1.02
    assert zscore.step(0, FakeTracker(noisy, uncertainty=np.full(16, 0.1)))[0] > 4 / 16  # moves on noise


def _null_run(policy, k: int, batch: int, steps: int, seed: int, factor=None) -> np.ndarray:
    """Synthetic losses (timestep baseline x region factor x lognormal noise, CV 1) through the library's
    tracker and sampler; returns p per step."""
    rng = np.random.default_rng(seed)
    sampler = AdaptiveRegionSampler(np.repeat(np.arange(k), 20), seed=seed)
    sampler.set_probabilities(policy.probabilities)
    tracker = DiscrepancyTracker(k)
    f = np.ones(k) if factor is None else factor
    history = []
    for step in range(steps):
        reg = sampler.draw_regions(step, batch)
        t = rng.integers(0, 1000, batch)
        losses = (0.05 + (1 - t / 1000) ** 2) * f[reg] * rng.lognormal(-np.log(2) / 2, np.sqrt(np.log(2)), batch)
        tracker.update(reg, losses, t)
        sampler.set_probabilities(policy.step(step, tracker))
        history.append(sampler.probabilities.copy())
    return np.asarray(history)


@pytest.mark.parametrize("null", NULLS)
def test_null_the_default_stays_at_its_prior_and_the_zscore_rule_does_not(null):
    """Fast version of benchmarks/calibration.py's null case (K=64, batch 64, CV 1, 600 steps)."""
    k = 64
    aria = ARIAAllocation(np.full(k, 20.0), null=null)
    h = _null_run(aria, k, 64, 600, seed=1)[300:]
    ratio = h.mean(0) * k
    assert 0.5 * np.abs(h - 1 / k).sum(1).mean() < 0.05
    assert ratio.min() > 0.5 and ratio.max() < 2.0
    old = _null_run(ARIAAllocation(np.full(k, 20.0), score="zscore", tau=0.5, max_ratio=None), k, 64, 600, seed=1)
    assert 0.5 * np.abs(old[300:] - 1 / k).sum(1).mean() > 0.3  # the earlier rule moves on pure noise


@pytest.mark.parametrize("null", NULLS)
def test_power_the_default_moves_toward_regions_truly_harder(null):
    """Fast version of the power case: 10% of 64 regions 1.2x harder -> >= 1.5x their prior share over the second
    half (with the reducibility test off: these regions never get easier, which that test is made to stop
    chasing). Judged against their own noise (a harder region's losses vary more), they take a few hundred
    steps of one sample a region to become credible."""
    k = 64
    factor = np.ones(k)
    hard = np.arange(0, k, 10)
    factor[hard] = 1.2
    h = _null_run(ARIAAllocation(np.full(k, 20.0), stall_draws=None, null=null), k, 64, 1200, seed=2, factor=factor)
    lift = h[600:, hard].sum(1).mean() / (len(hard) / k)
    assert lift >= 1.5


# ------------------------------------------------------------------------------------------- sparse, tree, stall


def test_sparse_shrinkage_keeps_noise_at_zero_and_large_effects_nearly_whole():
    rng = np.random.default_rng(20)
    moved = 0
    for _ in range(200):
        mu, w = sparse_shrinkage(rng.normal(size=512), fwer=0.05)
        moved += bool(np.any(mu != 0))
    assert moved / 200 < 0.12  # pure noise stays at exactly zero about 1 - fwer of the time
    z = rng.normal(size=512)
    z[:5] += 8.0  # five real effects of 8 standard errors among 507 null values
    mu, w = sparse_shrinkage(z)
    assert np.all(mu[:5] > z[:5] - 1.5) and np.count_nonzero(mu[5:]) <= 1
    # a normal prior fitted to all 512 values shrinks the same five effects far more
    score, _ = credible_excess(1.0 + 0.01 * z, np.full(512, 0.01))
    assert np.all(score[:5] / 0.01 < 0.6 * mu[:5])


def _tree(groups_of_leaves):
    return RegionTree(np.asarray([groups_of_leaves], dtype=np.int32))


def test_tree_excess_finds_a_small_concept_inside_an_average_coarse_region():
    """64 leaves in 8 coarse nodes; 2 leaves of node 0 are 60% harder. The coarse node is only 15% harder,
    within what noise shows at 8 nodes, but the leaves stand out against their parent."""
    k = 64
    groups = np.repeat(np.arange(8), 8)
    n = np.full(k, 200.0)
    means = np.ones(k)
    means[[0, 1]] = 1.6
    rng = np.random.default_rng(21)
    means = means + rng.normal(0, 1 / np.sqrt(200), k)  # unit variance per sample
    scores, info = tree_excess(n, means * n, n, 1.0, _tree(groups))
    assert np.all(scores[[0, 1]] > 0.3) and np.all(scores[8:] < 0.05)
    assert scores[[0, 1]].min() > scores[2:].max() + 0.3
    assert [lvl["nodes"] for lvl in info["levels"]] == [8, 64]
    # equal statistics everywhere: exactly zero at every level
    flat, _ = tree_excess(n, n.copy(), n, 1.0, _tree(groups))
    assert np.array_equal(flat, np.zeros(k))
    # no tree: one level of leaves, the same detection
    leaves, info = tree_excess(n, means * n, n, 1.0, None)
    assert len(info["levels"]) == 1 and np.all(leaves[[0, 1]] > 0.3)


def test_empirical_null_scale_is_the_noise_for_noise_and_the_bulk_for_a_broad_spread():
    rng = np.random.default_rng(30)
    assert empirical_null_scale(rng.normal(size=4096)) == 1.0  # noise: the theoretical null itself
    assert empirical_null_scale(0.5 * rng.normal(size=4096)) == 1.0  # never narrower than the noise
    assert 2.8 < empirical_null_scale(3.0 * rng.normal(size=4096)) < 3.2
    z = rng.normal(size=4096)
    z[:200] += 10.0  # 5% exceptions barely widen the bulk
    assert empirical_null_scale(z) < 1.15
    assert empirical_null_scale([5.0, -5.0]) == 1.0  # too few values to say
    # a width from few nodes is noise: it counts only when credibly above 1 (at 8 nodes, above ~1.83)
    passed = [empirical_null_scale(rng.normal(size=n)) > 1.0 for n in (8, 64, 512) for _ in range(300)]
    assert np.mean(passed) < 0.05
    assert empirical_null_scale(2.5 * rng.normal(size=64)) > 1.8


def test_the_empirical_null_keeps_the_exceptions_and_drops_a_broad_real_spread():
    """512 leaves that all differ a little for real (sd 0.1 of excess, twice their noise) and 4 leaves 80%
    harder: judged against the noise, dozens of the broad spread's leaves are credible; judged against the
    bulk's width, only the 4 exceptions, with most of their size."""
    k = 512
    rng = np.random.default_rng(31)
    n = np.full(k, 400.0)  # unit variance per sample: noise sd of a leaf's excess 0.05
    means = 1.0 + rng.normal(0, 0.1, k)
    means[:4] = 1.8
    means = means + rng.normal(0, 0.05, k)
    theory, _ = tree_excess(n, means * n, n, 1.0, None)
    empirical, info = tree_excess(n, means * n, n, 1.0, None, null="empirical")
    assert np.count_nonzero(theory[4:]) > 20
    assert np.count_nonzero(empirical[4:]) <= 2 and np.all(empirical[:4] > 0.5)  # a far tail leaf may stay
    assert empirical[4:].max() < 0.5 * empirical[:4].min()
    assert info["levels"][0]["null_width"] > 1.5
    # pure noise: the same zeros either way
    flat = 1.0 + rng.normal(0, 0.05, k)
    assert np.array_equal(tree_excess(n, flat * n, n, 1.0, None, null="empirical")[0], np.zeros(k))


def test_empirical_leaves_judges_only_the_leaves_against_their_bulk():
    """8 coarse groups that all differ for real (a whole group is what a hard concept looks like) over leaves with
    a broad spread of their own: "empirical" widens the null at both levels and so drops the groups' differences
    (8 groups evenly spread are a bulk, not an exception); "empirical_leaves" widens it at the leaves only, and so
    does "empirical_large" (levels of at least 50 nodes)."""
    k = 512
    groups = np.repeat(np.arange(8), 64)
    rng = np.random.default_rng(32)
    n = np.full(k, 400.0)
    means = 1.0 + np.linspace(-0.4, 0.4, 8)[groups] + rng.normal(0, 0.1, k) + rng.normal(0, 0.05, k)
    widths = {}
    for null in NULLS:
        scores, info = tree_excess(n, means * n, n, 1.0, _tree(groups), null=null)
        widths[null] = [lvl["null_width"] for lvl in info["levels"]]
        gap = scores[groups == 7].mean() - scores[groups == 0].mean()
        assert (gap > 0.3) if null != "empirical" else (abs(gap) < 0.05), (null, gap)
    assert widths["theoretical"] == [1.0, 1.0]
    assert widths["empirical"][0] > 2.0 and widths["empirical"][1] > 1.5
    assert widths["empirical_leaves"][0] == 1.0 and widths["empirical_leaves"][1] == widths["empirical"][1]
    assert widths["empirical_large"] == widths["empirical_leaves"]  # 8 nodes are too few for a bulk, 512 are not


def test_tree_excess_moves_a_whole_coarse_region_together():
    k = 64
    groups = np.repeat(np.arange(8), 8)
    n = np.full(k, 400.0)
    means = np.where(groups == 3, 1.3, 1.0)
    for method in ("sparse", "normal"):
        scores, _ = tree_excess(n, means * n, n, 1.0, _tree(groups), method=method)
        assert np.all(scores[groups == 3] > 0.15) and np.all(np.abs(scores[groups != 3]) < 0.1), method
        assert np.ptp(scores[groups == 3]) < 1e-9  # no leaf of it differs from its parent


def test_tree_excess_ignores_unobserved_leaves_and_empty_trackers():
    n = np.array([100.0, 100.0, 0.0, 100.0])
    scores, _ = tree_excess(n, n * np.array([1.0, 3.0, 0.0, 1.0]), n, 0.01, _tree([0, 0, 1, 1]))
    assert scores[1] > 0.5 and np.isfinite(scores).all()
    zero, _ = tree_excess(np.zeros(4), np.zeros(4), np.zeros(4), float("nan"), _tree([0, 0, 1, 1]))
    assert np.array_equal(zero, np.zeros(4))
    with pytest.raises(ValueError, match=r"method='mean' is not valid; use 'sparse' or 'normal'"):
        tree_excess(n, n * 2.0 * np.arange(4), n, 0.01, None, method="mean")


def _response_run(policy, k, steps, seed, learn_draws):
    """Regions 0 (unlearnable: 2x harder always) and 1 (learnable: 2x harder, learnt as it is drawn)."""
    rng = np.random.default_rng(seed)
    sampler = AdaptiveRegionSampler(np.repeat(np.arange(k), 20), seed=seed)
    sampler.set_probabilities(policy.probabilities)
    tracker = DiscrepancyTracker(k)
    drawn = np.zeros(k)
    history = []
    for step in range(steps):
        reg = sampler.draw_regions(step, 128)
        drawn += np.bincount(reg, minlength=k)
        f = np.ones(k)
        f[0] = 2.0
        f[1] = 1.0 + np.exp(-drawn[1] / learn_draws)
        t = rng.integers(0, 1000, reg.size)
        tracker.update(reg, (0.05 + (1 - t / 1000) ** 2) * f[reg] * rng.lognormal(-0.35, np.sqrt(0.7), reg.size), t,
                       baseline_weights=policy.prompt_share[reg] / sampler.probabilities[reg])  # as ARIACallback
        sampler.set_probabilities(policy.step(step, tracker))
        history.append(sampler.probabilities * k)
    return np.asarray(history)


def test_a_boost_is_bounded_by_the_trial_ratio_until_it_shows_progress():
    est = FakeTracker(np.array([1.0, 3.0, 1.0, 1.0, 1.0]))  # region 1 far harder, nothing known of its progress
    policy = ARIAAllocation(SIZES, damping=1.0, warmup_steps=0, trial_ratio=2.0)
    p = policy.step(0, est)
    assert p[1] == pytest.approx(2.0 * policy.prior[1], rel=1e-12)
    assert policy.reducibility.proven[1] == 0 and np.isfinite(policy.reducibility.trial_excess[1])
    free = ARIAAllocation(SIZES, damping=1.0, warmup_steps=0, stall_draws=None).step(0, est)
    assert free[1] > 3.0 * policy.prior[1]


def test_reducibility_stops_chasing_a_region_that_does_not_improve():
    """Fast version of the calibration benchmark's response part: the unlearnable region is boosted only until
    its extra draws show no progress; the learnable one is boosted while it improves, and falls back."""
    k = 32
    h = _response_run(ARIAAllocation(np.full(k, 20.0), stall_draws=100.0), k, 700, seed=3, learn_draws=300.0)
    assert h[:, 0].mean() < 1.3 and h[-200:, 0].max() < 1.1
    assert h[:, 1].max() > 1.5 and h[-100:, 1].mean() < 1.1
    chased = _response_run(ARIAAllocation(np.full(k, 20.0), stall_draws=None), k, 700, seed=3, learn_draws=300.0)
    assert chased[-200:, 0].mean() > 2.0  # without the test the unlearnable region keeps its boost


def test_tree_policy_state_round_trip_and_stall_state(tmp_path):
    tree = _tree(np.repeat(np.arange(4), 5))
    a = ARIAAllocation(np.full(20, 10.0), tree=tree, warmup_steps=2, stall_draws=50.0)
    h = _response_run(a, 20, 150, seed=4, learn_draws=200.0)
    assert np.isfinite(a.reducibility.stalled_excess[0])  # region 0 was tried and held
    path = tmp_path / "aria.pt"
    torch.save(a.state_dict(), path)
    b = ARIAAllocation(np.full(20, 10.0), tree=tree, warmup_steps=2, stall_draws=50.0)
    b.load_state_dict(torch.load(path, weights_only=True))
    for name in ("probabilities", "scores"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in ReducibilityTest.STATE:
        np.testing.assert_array_equal(getattr(a.reducibility, name), getattr(b.reducibility, name))
    assert h.shape == (150, 20)


# ------------------------------------------------------------------------------------------- variance, refresh


def test_an_outlier_leaf_is_credible_with_the_pooled_variance_and_not_with_its_own():
    """Losses are right-skewed: a leaf of 30 samples that caught one loss 12x the average has a mean ~1.37 and,
    against the pooled variance, a z far beyond what pure noise allows at 512 leaves. Its own variance holds the
    outlier and keeps it at zero; a leaf truly harder stays credible. (The library moderates each leaf's own variance toward the pooled one, as done here.)"""
    rng = np.random.default_rng(0)
    k, n = 512, 30
    y = rng.normal(1.0, 0.3, size=(k, n))
    y[7, 0] = 12.0  # one outlier
    y[9] *= 1.5  # really harder: every sample
    counts, sums = np.full(k, float(n)), y.sum(1)
    pooled = float(((y - y.mean(1, keepdims=True)) ** 2).sum() / (k * (n - 1)))
    own = np.maximum((29 * y.var(1, ddof=1) + 30 * pooled) / 59, pooled)  # moderated, never below the pooled
    with_pooled, _ = tree_excess(counts, sums, counts, pooled)
    with_own, _ = tree_excess(counts, sums, counts, own)
    assert with_pooled[7] > 0 and with_own[7] == 0.0
    assert with_own[9] > 0.3 and with_pooled[9] > 0.3
    assert np.count_nonzero(with_own) == 1


@pytest.mark.parametrize("null", NULLS)
def test_null_at_many_leaves_with_a_heavy_tail(null):
    """Fast version of the calibration null at many leaves (1,024 leaves, batch 256, lognormal CV 1): with the
    default variance no leaf holds more than twice its prior over the second half; the pooled one is the
    variance the default replaced (reported seeds: a chance leaf at 20x its prior at 4,096 leaves)."""
    k = 1024
    h = _null_run(ARIAAllocation(np.full(k, 20.0), null=null), k, 256, 500, seed=5)[250:]
    ratio = h.mean(0) * k
    assert 0.5 * np.abs(h - 1 / k).sum(1).mean() < 0.05
    assert ratio.max() < 2.0 and ratio.min() > 0.5, (ratio.max(), ratio.min())


def test_refresh_every_holds_the_probabilities_between_refreshes_and_compounds_damping():
    scale = np.array([1.0, 3.0, 1.0, 1.0, 1.0])
    every = ARIAAllocation(SIZES, warmup_steps=5, refresh_every=4, stall_draws=None, variance="pooled")
    h, tracker = _run(every, 30, scale)
    assert np.array_equal(h[3], every.prior)  # warm-up: 5 updates
    # refreshes at updates 5, 9, 13, ... (steps 4, 8, 12, ...): unchanged in between
    for first in (4, 8, 12, 16):
        for s in range(first + 1, first + 4):
            assert np.array_equal(h[s], h[first])
    assert h[8][1] > h[4][1] > every.prior[1]  # and moving toward the harder region
    assert every.config()["refresh_every"] == 4
    est = FakeTracker(np.array([1.0, 1.3, 0.9, 1.0, 1.1]))
    damped = ARIAAllocation(SIZES, damping=0.25, warmup_steps=0, stall_draws=None, refresh_every=4)
    expected = damped.prior + (1 - 0.75 ** 4) * (damped.target_from(est) - damped.prior)
    np.testing.assert_allclose(damped.step(0, est), expected, rtol=1e-14)  # four steps of damping at once
    with pytest.raises(ValueError, match=r"refresh_every=0 must be an integer of 1 or more"):
        ARIAAllocation(SIZES, refresh_every=0)


def test_refresh_every_counts_the_draws_between_refreshes_and_resumes_exactly(tmp_path):
    a = ARIAAllocation(np.full(20, 10.0), warmup_steps=2, stall_draws=50.0, refresh_every=3)
    _response_run(a, 20, 61, seed=6, learn_draws=200.0)
    assert a.pending_draws.sum() > 0  # draws since the last refresh wait for the next
    path = tmp_path / "aria.pt"
    torch.save(a.state_dict(), path)
    b = ARIAAllocation(np.full(20, 10.0), warmup_steps=2, stall_draws=50.0, refresh_every=3)
    b.load_state_dict(torch.load(path, weights_only=True))
    for name in ("probabilities", "pending_draws"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    for name in ("failures", "trial_draws", "stalled_excess"):
        np.testing.assert_array_equal(getattr(a.reducibility, name), getattr(b.reducibility, name))


def test_a_region_whose_boost_flickers_still_fails_its_test_and_the_next_test_is_shorter():
    """An unproven test stays open when the score drops to 0 for a while (here: its evidence is briefly uncertain,
    its level unchanged), so the extra draws of the flickers add up; each failure halves the next allowance."""
    policy = ARIAAllocation(SIZES, damping=1.0, warmup_steps=0, stall_draws=100.0, variance="pooled")

    class Counting(FakeTracker):
        @property
        def last_counts(self):
            return np.round(self.p * 100)  # 100 draws an update: 30 beyond the prior at 4x region 1's share

    hard, flat = np.array([1.0, 3.0, 1.0, 1.0, 1.0]), np.ones(5)
    tracker = Counting(hard, uncertainty=np.full(5, 0.01))
    tracker.p = policy.probabilities
    failed_at = []
    for step in range(12):
        tracker._se = np.full(5, 5.0 if step % 3 == 0 else 0.01)  # the boost flickers off every third update
        tracker.p = policy.step(step, tracker)
        if policy.reducibility.failures[1] > len(failed_at):
            failed_at.append(step)
    assert failed_at and np.isfinite(policy.reducibility.stalled_excess[1])  # the flickers did not restart its test
    tracker._se = np.full(5, 0.01)
    tracker._est = flat  # its excess falls on its own: released
    tracker.p = policy.step(12, tracker)
    assert not np.isfinite(policy.reducibility.stalled_excess[1])
    tracker._est = hard
    boosted = 0
    for step in range(13, 30):
        tracker.p = policy.step(step, tracker)
        if policy.reducibility.failures[1] == 2:
            break
        boosted += 1
    assert policy.reducibility.failures[1] == 2 and boosted == 2  # 50 extra draws this time: two updates of 30


def test_resume_is_exact_while_the_sparse_fit_starts_from_the_previous_one(tmp_path):
    """The sparse fit begins from the previous refresh's slab weight; a resumed policy must begin from the same
    one, or its probabilities drift from the uninterrupted run's in the last bits (seen at 4,096 leaves)."""
    k, rng = 512, np.random.default_rng(0)
    hardness = np.where(rng.random(k) < 0.1, 1.6, 1.0)  # a tenth of the regions harder: the fit is inside (w_lo, 1)

    def feed(tracker, step):
        r = np.random.default_rng([0, step])
        regions = r.integers(0, k, 256)
        t = r.integers(0, 1000, 256)
        tracker.update(regions, hardness[regions] * (0.2 + t / 1000.0) * r.lognormal(0.0, 0.3, 256), t)

    def policy():
        return ARIAAllocation(np.full(k, 10.0), warmup_steps=5, refresh_every=1)

    a, tracker = policy(), DiscrepancyTracker(k)
    for step in range(40):
        feed(tracker, step)
        a.step(step, tracker)
    w = a._slab_starts[-1]
    assert 0.0 < w < 1.0 and w > _min_slab_weight(k, a.fwer, 0.5)  # the fit's Newton branch, not a bound
    path = tmp_path / "aria.pt"
    torch.save(a.state_dict(), path)
    b = policy()
    b.load_state_dict(torch.load(path, weights_only=True))
    tracker_b = copy.deepcopy(tracker)
    for step in range(40, 60):
        feed(tracker, step)
        feed(tracker_b, step)
        np.testing.assert_array_equal(a.step(step, tracker), b.step(step, tracker_b))
