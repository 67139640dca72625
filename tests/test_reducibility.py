"""The reducibility test on its own: progress proves a boost, spent draws hold a region, a held region is released
when it falls on its own, a fall while not boosted proves nothing, and each failure halves the next allowance."""

from __future__ import annotations

import numpy as np

from diffusers_aria.reducibility import ReducibilityTest

PRIOR = np.full(4, 0.25)
SE = np.full(4, 0.01)


def _refresh(test, scores, excess, counts):
    return test.apply(np.asarray(scores, float), np.asarray(excess, float), SE, np.asarray(counts, float))


def test_progress_while_boosted_proves_the_region_and_starts_a_new_test():
    test = ReducibilityTest(PRIOR, stall_draws=100.0, stall_decline=0.25)
    _refresh(test, [0.3, 0, 0, 0], [0.4, 0, 0, 0], [40, 20, 20, 20])  # boost opens a test at 0.4
    assert test.trial_excess[0] == 0.4 and test.proven[0] == 0 and test.trial_draws[0] == 15  # 40 - 25
    _refresh(test, [0.2, 0, 0, 0], [0.25, 0, 0, 0], [40, 20, 20, 20])  # fell by 0.15 >= 25% of 0.4, > noise
    assert test.proven[0] == 1 and test.trial_excess[0] == 0.25 and test.trial_draws[0] == 0


def test_spent_draws_without_progress_hold_the_region_until_it_falls_on_its_own():
    test = ReducibilityTest(PRIOR, stall_draws=30.0, stall_decline=0.25)
    for _ in range(2):  # 15 extra draws each: the allowance of 30 is spent at the second refresh
        out = _refresh(test, [0.3, 0.1, 0, 0], [0.4, 0.1, 0, 0], [40, 20, 20, 20])
    assert test.held.tolist() == [True, False, False, False] and test.failures[0] == 1
    assert out[0] == 0 and out[1] == 0.1  # a held region's score is at most 0; the others are untouched
    _refresh(test, [0.3, 0, 0, 0], [0.35, 0, 0, 0], [25, 25, 25, 25])  # not far enough: still held
    assert test.held[0]
    _refresh(test, [0.1, 0, 0, 0], [0.2, 0, 0, 0], [25, 25, 25, 25])  # fell by half on its own: released
    assert not test.held[0]


def test_a_fall_while_not_boosted_closes_the_test_without_proving_anything():
    test = ReducibilityTest(PRIOR, stall_draws=100.0, stall_decline=0.25)
    _refresh(test, [0.3, 0, 0, 0], [0.4, 0, 0, 0], [40, 20, 20, 20])
    _refresh(test, [0.0, 0, 0, 0], [0.1, 0, 0, 0], [25, 25, 25, 25])  # boost off, and the excess fell
    assert np.isnan(test.trial_excess[0]) and test.proven[0] == 0


def test_each_failure_halves_the_next_allowance_and_the_state_round_trips():
    test = ReducibilityTest(PRIOR, stall_draws=40.0, stall_decline=0.25)
    spent = []
    for failures in range(3):
        test.stalled_excess[:] = np.nan  # released by hand: measure the next test alone
        n = 0
        while test.failures[0] == failures:
            _refresh(test, [0.3, 0, 0, 0], [0.4, 0, 0, 0], [30, 23, 23, 24])  # 5 extra draws a refresh
            n += 1
        spent.append(n)
    assert spent == [8, 4, 2]
    again = ReducibilityTest(PRIOR, stall_draws=40.0, stall_decline=0.25)
    again.load_state_dict(test.state_dict())
    for name in ReducibilityTest.STATE:
        np.testing.assert_array_equal(getattr(again, name), getattr(test, name))


def test_off_returns_the_scores_and_counts_every_boost_as_proven():
    test = ReducibilityTest(PRIOR, stall_draws=None, stall_decline=0.25)
    for _ in range(20):  # far beyond any allowance
        out = _refresh(test, [0.3, 0, 0, 0], [0.4, 0, 0, 0], [90, 3, 3, 4])
    np.testing.assert_array_equal(out, [0.3, 0, 0, 0])
    assert test.proven.tolist() == [1.0] * 4 and not test.held.any() and test.failures.sum() == 0
