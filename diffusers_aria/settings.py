"""`AriaSettings`: every ARIA and Random Conditioning setting of a run, in a module that loads fast.

The training script reads its flags' defaults from here while it parses its arguments, so this module
imports neither diffusers nor transformers (`diffusers_aria.training` re-exports the class).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, fields
from typing import Any

from .allocation import POLICIES, AllocationPolicy, make_policy, policy_arguments
from .errors import UserError

logger = logging.getLogger(__name__)

FEEDS = ("swapped", "all")


@dataclass
class AriaSettings:
    """Every ARIA and Random Conditioning setting of a run (the script's --aria_* and --rc_* flags)."""

    allocation: str = "aria"
    alpha: float = 0.5
    tau: float = 0.1
    score: str = "credible"
    threshold: float = 1.0
    floor: float = 0.05
    max_ratio: float | None = 4.0
    cap: float | None = None
    damping: float = 0.1
    warmup_steps: int = 40
    half_life: float = 50.0
    samples_per_half_life: float | None = 50.0
    num_timestep_bins: int = 10
    timestep_norm: bool = True
    prior_strength: float = 8.0
    feed: str = "all"
    doremi_lr: float = 0.5
    doremi_smoothing: float = 0.05
    exp3_gamma: float = 0.1
    log_every: int = 10
    rc_schedule: str = "exponential"
    rc_lambda: float = 5.0
    rc_constant: float = 0.5
    null_prompt_prob: float = 0.0

    def __post_init__(self) -> None:
        if self.allocation not in POLICIES:
            raise UserError(f"--allocation {self.allocation!r} is not valid; choose one of {', '.join(POLICIES)}")
        if self.feed not in FEEDS:
            raise UserError(f"--aria_feed {self.feed!r} is not valid; choose 'swapped' or 'all'")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def make_tracker(self, num_regions: int, num_train_timesteps: int = 1000):
        """The run's `DiscrepancyTracker`."""
        from .tracker import DiscrepancyTracker

        return DiscrepancyTracker(num_regions, half_life=self.half_life, num_timestep_bins=self.num_timestep_bins,
                                  num_train_timesteps=num_train_timesteps, normalize_timesteps=self.timestep_norm,
                                  prior_strength=self.prior_strength, samples_per_half_life=self.samples_per_half_life)

    def make_policy(self, sizes) -> AllocationPolicy:
        """The run's allocation policy; a setting changed from its default that the chosen policy does not use
        is named in a warning (it has no effect)."""
        values = {"alpha": self.alpha, "tau": self.tau, "score": self.score, "threshold": self.threshold,
                  "floor": self.floor, "max_ratio": self.max_ratio, "cap": self.cap, "damping": self.damping,
                  "warmup_steps": self.warmup_steps, "lr": self.doremi_lr, "smoothing": self.doremi_smoothing,
                  "gamma": self.exp3_gamma}
        defaults = {f.name: f.default for f in fields(self)}
        flags = {"lr": "doremi_lr", "smoothing": "doremi_smoothing", "gamma": "exp3_gamma"}
        accepted = policy_arguments(self.allocation)
        ignored = [flags.get(k, k) for k in values if k not in accepted
                   and values[k] != defaults[flags.get(k, k)]]
        if ignored:
            logger.warning("--allocation %s does not use %s (set away from the default); it takes %s",
                           self.allocation, ", ".join("--" + _flag_name(k) for k in ignored),
                           ", ".join(sorted(accepted)) or "no settings")
        return make_policy(self.allocation, sizes, **{k: v for k, v in values.items() if k in accepted})


def _flag_name(setting: str) -> str:
    """The training script's flag for an `AriaSettings` field."""
    return setting if setting.startswith(("doremi_", "exp3_")) else "aria_" + setting


__all__ = ["AriaSettings", "FEEDS"]
