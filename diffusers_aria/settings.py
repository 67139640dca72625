"""`AriaSettings`: every ARIA and Random Conditioning setting of a run, declared once.

Each field carries its default, its command-line flag, its help and what it feeds (`metadata`), as peft's
`LoraConfig` does; `__post_init__` checks the values. The training script's `--aria_*`/`--rc_*` flags
(`AriaSettings.add_arguments`), the preflight checks (`AriaSettings.from_args`), the tracker
(`make_tracker`) and the allocation policy (`make_policy`) all read them from here, so that a new setting
is one new field.

Metadata keys of a field:
    flag     the training script's flag (its argparse `dest` is the flag without the dashes)
    help     the flag's help (argparse adds the default)
    choices  the valid values (checked here and offered by argparse)
    check    (predicate, what is valid): a value for which the predicate is false is refused
    policy   the keyword of `allocation.make_policy` that the field sets (only policies that take it get it)
    tracker  the keyword of `DiscrepancyTracker` that the field sets
    negate   the flag is a switch that turns the (true by default) setting off
"""

from __future__ import annotations

import argparse
import logging
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .allocation import NULLS, POLICIES, SCORES, VARIANCES, AllocationPolicy, make_policy, policy_arguments
from .conditioning import FEEDS, SCHEDULES
from .utils.errors import UserError

logger = logging.getLogger(__name__)

_POSITIVE = (lambda v: v > 0, "a number above 0")
_NON_NEGATIVE = (lambda v: v >= 0, "a number of 0 or more")
_PROBABILITY = (lambda v: 0 <= v <= 1, "a probability between 0 and 1")
_AT_LEAST_ONE = (lambda v: not isinstance(v, float) and v >= 1, "an integer of 1 or more")


def _setting(default: Any, flag: str, help: str, **meta: Any) -> Any:
    return field(default=default, metadata={"flag": flag, "help": help, **meta})


@dataclass
class AriaSettings:
    """Every ARIA and Random Conditioning setting of a run (the training script's --allocation, --aria_*,
    --doremi_*, --exp3_*, --rc_* and --null_prompt_prob flags). Invalid values raise `UserError`."""

    allocation: str = _setting(
        "aria", "--allocation", "the allocation policy: aria, or a baseline (rc = Random Conditioning's "
        "prompt-uniform draw, region_uniform, static, doremi, exp3)", choices=tuple(POLICIES))
    alpha: float = _setting(
        1.0, "--aria_alpha", "size exponent of the prior, size**alpha (1 = RC's prompt share, 0 = region-uniform)",
        check=_NON_NEGATIVE, policy="alpha")
    tau: float = _setting(
        0.1, "--aria_tau", "temperature: a region credibly tau harder than its prior says gets e times its prior "
        "share (in z units with --aria_score zscore)", check=_POSITIVE, policy="tau")
    score: str = _setting(
        "sparse", "--aria_score", "sparse: each region's excess over its parent in the region tree, shrunk by a "
        "sparse empirical-Bayes prior (noise gives 0, a few real effects keep their size); credible: the same "
        "with a normal prior; zscore: the earlier standardised score (moves on noise)", choices=SCORES,
        policy="score")
    variance: str = _setting(
        "own_max", "--aria_variance", "the noise each region's excess is judged against: own_max, the larger of "
        "the region's own score variance (moderated toward the pooled one) and the pooled variance, so that a "
        "region whose scores are noisier than the rest (a heavy tail, an outlier) does not look credibly harder; "
        "pooled: one variance for all regions", choices=VARIANCES,
        policy="variance")
    null: str = _setting(
        "theoretical", "--aria_null", "what each region-tree level's differences are judged against: theoretical, "
        "the noise alone; empirical, the width of the level's bulk of differences when wider than the noise "
        "(a broad real spread of difficulty is the norm; only regions standing out of it are drawn more); "
        "empirical_leaves, the same at the leaf level only; empirical_large, at the levels of 50 or more nodes",
        choices=NULLS, policy="null")
    refresh_every: int = _setting(
        8, "--aria_refresh_every", "recompute the allocation every N optimizer steps (the statistics still take "
        "every step; damping is compounded over the N steps): cuts ARIA's work per step at many regions",
        check=_AT_LEAST_ONE, policy="refresh_every")
    threshold: float = _setting(
        1.0, "--aria_threshold", "--aria_score credible: heterogeneity threshold, in null standard deviations of "
        "Cochran's Q: spread below it counts as noise", policy="threshold")
    fwer: float = _setting(
        0.05, "--aria_fwer", "--aria_score sparse: the chance that pure noise moves anything at a level of the "
        "region tree", check=(lambda v: 0 < v < 1, "a probability strictly between 0 and 1"), policy="fwer")
    floor: float = _setting(
        0.05, "--aria_floor", "every region keeps at least min(its prior, floor / K)", check=_PROBABILITY,
        policy="floor")
    max_ratio: float | None = _setting(
        None, "--aria_max_ratio", "no region gets more than this times its prior share; 'none': no such bound",
        check=(lambda v: v >= 1, "a number of 1 or more, or 'none'"), policy="max_ratio")
    max_shift: float = _setting(
        0.5, "--aria_max_shift", "at most this much probability mass moves away from the prior (total variation)",
        check=(lambda v: 0 < v <= 1, "a number above 0 and at most 1"), policy="max_shift")
    trial_ratio: float = _setting(
        4.0, "--aria_trial_ratio", "a boosted region gets at most this times its prior until its excess falls",
        check=(lambda v: v >= 1, "a number of 1 or more"), policy="trial_ratio")
    stall_draws: float | None = _setting(
        200.0, "--aria_stall_draws", "a boosted region whose excess has not fallen after this many draws beyond "
        "its prior share is held at its prior (it does not get easier); 'none': never", check=_POSITIVE,
        policy="stall_draws")
    stall_decline: float = _setting(
        0.25, "--aria_stall_decline", "the share of its excess a boosted region must shed to count as progress",
        check=(lambda v: 0 <= v < 1, "a number of 0 or more and below 1"), policy="stall_decline")
    cap: float | None = _setting(
        None, "--aria_cap", "no region's probability exceeds max(its prior, cap); 'none': no cap",
        check=_PROBABILITY, policy="cap")
    damping: float = _setting(
        0.1, "--aria_damping", "each update moves the probabilities this fraction of the way to the new target "
        "(1 = no damping)", check=_PROBABILITY, policy="damping")
    warmup_steps: int = _setting(
        40, "--aria_warmup_steps", "optimizer steps at the prior before the allocation may move",
        check=_NON_NEGATIVE, policy="warmup_steps")
    half_life: float = _setting(
        50.0, "--aria_half_life", "half-life of the discrepancy statistics, in optimizer steps", check=_POSITIVE,
        tracker="half_life")
    samples_per_half_life: float | None = _setting(
        50.0, "--aria_samples_per_half_life", "lengthen the half-life so that it holds this many samples per "
        "region; 'none': off", check=_POSITIVE, tracker="samples_per_half_life")
    num_timestep_bins: int = _setting(
        10, "--aria_num_timestep_bins", "timestep bins of the per-timestep loss baseline", check=_AT_LEAST_ONE,
        tracker="num_timestep_bins")
    timestep_norm: bool = _setting(
        True, "--aria_no_timestep_norm", "score raw losses, not per-timestep-normalised ones", negate=True,
        tracker="normalize_timesteps")
    prior_strength: float = _setting(
        8.0, "--aria_prior_strength", "shrinkage of a region's estimate toward the global mean, in pseudo-samples",
        check=_NON_NEGATIVE, tracker="prior_strength")
    baseline_samples: float = _setting(
        50.0, "--aria_baseline_samples", "each timestep bin's loss baseline is the mean of about its latest this "
        "many samples (a sample is scored against it when it arrives)", check=_POSITIVE, tracker="baseline_samples")
    feed: str = _setting(
        "all", "--aria_feed", "which samples feed the tracker: all; swapped (only those whose prompt was swapped); "
        "congruent (paired ones, and swapped ones where noise dominates the latent, alphas_cumprod[t] <= 0.5)",
        choices=FEEDS)
    doremi_lr: float = _setting(
        0.5, "--doremi_lr", "step size of the doremi policy's exponentiated-gradient update", check=_POSITIVE,
        policy="lr")
    doremi_smoothing: float = _setting(
        0.05, "--doremi_smoothing", "the doremi policy's mixing with the uniform distribution", check=_PROBABILITY,
        policy="smoothing")
    exp3_gamma: float = _setting(
        0.1, "--exp3_gamma", "the exp3 policy's exploration rate", check=_PROBABILITY, policy="gamma")
    log_every: int = _setting(
        1, "--aria_log_every", "log the aria/* metrics every N optimizer steps", check=_AT_LEAST_ONE)
    rc_schedule: str = _setting(
        "exponential", "--rc_schedule", "Random Conditioning's swap probability p(t) over the timestep",
        choices=SCHEDULES)
    rc_lambda: float = _setting(
        5.0, "--rc_lambda", "steepness of the exponential and sigmoid schedules", check=_NON_NEGATIVE)
    rc_constant: float = _setting(
        0.5, "--rc_constant", "p(t) of the constant schedule", check=_PROBABILITY)
    null_prompt_prob: float = _setting(
        0.0, "--null_prompt_prob", "probability that a sample's prompt is replaced by the empty prompt",
        check=_PROBABILITY)

    def __post_init__(self) -> None:
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if value is None and _optional(f):
                continue
            if "choices" in meta and value not in meta["choices"]:
                raise UserError(f"{meta['flag']} {value!r} is not valid; choose one of {', '.join(meta['choices'])}")
            if "check" in meta:
                ok, valid = meta["check"]
                number = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not number or math.isnan(value) or not ok(value):
                    raise UserError(f"{meta['flag']} {value!r} is not valid; it must be {valid}")

    # ------------------------------------------------------------------------------------------ flags
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
        """Add one flag per setting to `parser`, with the defaults, help and choices declared here."""
        for f in fields(cls):
            meta = f.metadata
            if meta.get("negate"):
                parser.add_argument(meta["flag"], action="store_true", help=meta["help"])
                continue
            kind = _optional_float if _optional(f) else type(f.default)
            parser.add_argument(meta["flag"], type=kind, default=f.default, help=meta["help"],
                                **({"choices": list(meta["choices"])} if "choices" in meta else {}))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> AriaSettings:
        """The settings of parsed flags (`add_arguments`); invalid values raise `UserError`."""
        values = {}
        for f in fields(cls):
            value = getattr(args, f.metadata["flag"].lstrip("-"))
            values[f.name] = not value if f.metadata.get("negate") else value
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ------------------------------------------------------------------------------------------ components
    def make_tracker(self, num_regions: int, num_train_timesteps: int = 1000):
        """The run's `DiscrepancyTracker`."""
        from .tracker import DiscrepancyTracker

        kwargs = {f.metadata["tracker"]: getattr(self, f.name) for f in fields(self) if "tracker" in f.metadata}
        return DiscrepancyTracker(num_regions, num_train_timesteps=num_train_timesteps, **kwargs)

    def make_policy(self, sizes, tree=None) -> AllocationPolicy:
        """The run's allocation policy (given the regions' `RegionTree` when it takes one); a setting changed from
        its default that the chosen policy does not use is named in a warning (it has no effect)."""
        accepted = policy_arguments(self.allocation)
        used = {f.metadata["policy"]: getattr(self, f.name) for f in fields(self)
                if f.metadata.get("policy") in accepted}
        if tree is not None and "tree" in accepted:
            used["tree"] = tree
        ignored = [f.metadata["flag"] for f in fields(self)
                   if "policy" in f.metadata and f.metadata["policy"] not in accepted
                   and getattr(self, f.name) != f.default]
        if ignored:
            logger.warning("--allocation %s does not use %s (set away from the default); it takes %s",
                           self.allocation, ", ".join(ignored), ", ".join(sorted(accepted)) or "no settings")
        return make_policy(self.allocation, sizes, **used)


def _optional(f) -> bool:
    """Whether a field takes None (its annotation says `| None`; its flag takes 'none')."""
    return "None" in str(f.type)


def _optional_float(value: str) -> float | None:
    """A float, or 'none' for no value (e.g. --aria_max_ratio none)."""
    if value.strip().lower() == "none":
        return None
    try:
        return float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is neither a number nor 'none'") from None


__all__ = ["AriaSettings", "FEEDS"]
