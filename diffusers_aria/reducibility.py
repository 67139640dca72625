"""The reducibility test: a region boosted above its prior share must show that the extra draws help.

`ARIAAllocation` boosts a region whose discrepancy is credibly above its parent's. Some regions stay hard however
often they are drawn (the student's capacity, or noise the student cannot fit); chasing them costs the rest of
the pool and buys nothing. The test (one `ReducibilityTest` per policy, applied at each refresh):

* a boost opens a test at the region's current relative excess (raised to the highest level seen while the
  test is open, as a boost often begins while the excess is still underestimated);
* **progress**: while boosted, the excess falls by `stall_decline` of that level and by more than twice the
  noise of the difference (regression to the mean alone must not count). The region is *proven*: it may go up
  to the policy's bounds, and a new test starts from the new level. Before that it gets at most the policy's
  `trial_ratio` times its prior;
* **failure**: `stall_draws` draws beyond its prior share pass without progress. The region is *held* (its score
  is at most 0) until its excess falls by as much on its own. Each failed test halves the next one's allowance,
  so a lifetime of tests costs at most twice the first;
* a fall while not boosted closes the open test without proving anything (the region came back on its own); an
  unproven test stays open while a boost flickers off and on, so that its extra draws add up; a proven boost
  that ends must prove itself again.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class ReducibilityTest:
    """Per-region state of the reducibility test (module docstring). Arrays of length K, float64; NaN: none.

    `stall_draws=None` turns the test off: `apply` returns the scores unchanged and every boost counts as proven
    (the state is still kept and checkpointed, so that a checkpoint has the same keys either way)."""

    STATE = ("trial_excess", "trial_se", "trial_draws", "stalled_excess", "stalled_se", "proven", "failures")

    def __init__(self, prior: np.ndarray, stall_draws: float | None, stall_decline: float) -> None:
        k = len(prior)
        self.prior, self.stall_decline = prior, float(stall_decline)
        self.stall_draws = None if stall_draws is None else float(stall_draws)
        self.trial_excess = np.full(k, np.nan)  # relative excess when the open test began (or its highest since)
        self.trial_se = np.zeros(k)  # standard error of that excess
        self.trial_draws = np.zeros(k)  # draws beyond the prior share since the test began
        self.stalled_excess = np.full(k, np.nan)  # the excess at which a region was held (NaN: not held)
        self.stalled_se = np.zeros(k)
        self.proven = np.zeros(k)  # 1 once the open boost has shown progress (until it ends)
        self.failures = np.zeros(k)  # failed tests per region

    @property
    def held(self) -> np.ndarray:
        """Regions held at (at most) their prior after a failed test."""
        return np.isfinite(self.stalled_excess)

    def apply(self, scores: np.ndarray, excess: np.ndarray, se: np.ndarray, counts: np.ndarray) -> np.ndarray:
        """Advance the test by one refresh and return the scores to use (a held region's at most 0).

        scores: the credible excess per region; excess, se: the raw relative excess and its standard error;
        counts: the draws per region since the previous refresh."""
        if self.stall_draws is None:
            self.proven[:] = 1.0
            return scores
        extra = np.maximum(counts - self.prior * counts.sum(), 0.0)  # draws beyond what the prior would give
        self._release(excess, se)
        boosted = (scores > 0) & ~self.held
        in_trial = self._open(boosted, excess, se)
        self.trial_draws[in_trial] += extra[in_trial]
        higher = in_trial & (excess > self.trial_excess)  # the fall is measured from the highest level seen
        self.trial_excess[higher], self.trial_se[higher] = excess[higher], se[higher]
        noise = 2.0 * np.sqrt(self.trial_se ** 2 + se ** 2)
        fell = in_trial & (self.trial_excess - excess >= np.maximum(self.stall_decline * self.trial_excess, noise))
        progressed = fell & boosted  # progress: a new test from here
        self.trial_excess[progressed], self.trial_se[progressed] = excess[progressed], se[progressed]
        self.trial_draws[progressed] = 0.0
        self.proven[progressed] = 1.0
        came_back = fell & ~boosted  # it fell on its own: says nothing of what extra draws do for it
        self.trial_excess[came_back] = np.nan
        self._fail(in_trial & ~came_back & ~progressed)
        return np.where(self.held, np.minimum(scores, 0.0), scores)

    def _release(self, excess: np.ndarray, se: np.ndarray) -> None:
        """A held region is released once its excess has fallen on its own."""
        fell = self.stalled_excess - excess >= np.maximum(
            self.stall_decline * self.stalled_excess, 2.0 * np.sqrt(self.stalled_se ** 2 + se ** 2))
        self.stalled_excess[self.held & fell] = np.nan

    def _open(self, boosted: np.ndarray, excess: np.ndarray, se: np.ndarray) -> np.ndarray:
        """Close the tests of proven boosts that ended, open one for each new boost; returns the open tests."""
        done = ~boosted & np.isfinite(self.trial_excess) & (self.proven > 0)
        self.trial_excess[done] = np.nan
        self.proven[done] = 0.0
        start = boosted & ~np.isfinite(self.trial_excess)
        self.trial_excess[start], self.trial_se[start] = excess[start], se[start]
        self.trial_draws[start] = 0.0
        return np.isfinite(self.trial_excess)

    def _fail(self, candidates: np.ndarray) -> None:
        """Open tests whose allowance (halved per earlier failure) is spent without progress: hold the region."""
        failed = candidates & (self.trial_draws >= self.stall_draws * 0.5 ** self.failures)
        self.failures[failed] += 1.0
        self.stalled_excess[failed] = np.maximum(self.trial_excess[failed], 1e-12)
        self.stalled_se[failed] = self.trial_se[failed]
        self.trial_excess[failed] = np.nan
        self.proven[failed] = 0.0

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k).copy() for k in self.STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in self.STATE:
            setattr(self, k, np.asarray(state[k], dtype=np.float64).copy())
