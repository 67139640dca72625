"""AriaSettings: each ARIA and Random Conditioning setting is declared once (default, flag, help, checks), and the
script's flags, the preflight checks, the tracker and the policy read it from there."""

from __future__ import annotations

import argparse
import re
from dataclasses import fields
from pathlib import Path

import pytest

from diffusers_aria.settings import AriaSettings
from diffusers_aria.utils.errors import UserError

PKG = Path(__file__).resolve().parents[1] / "diffusers_aria"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    AriaSettings.add_arguments(p)
    return p


def test_every_field_has_a_flag_and_help_declared_once_in_the_package():
    source = {p: p.read_text() for p in PKG.rglob("*.py")}
    for f in fields(AriaSettings):
        flag = f.metadata["flag"]
        assert f.metadata["help"], f.name
        assert f'"{flag}"' in source[PKG / "settings.py"], flag
        declared = [p.name for p, text in source.items() if f'add_argument("{flag}"' in text]
        assert declared == [], (flag, declared)  # no second declaration: the parser adds them from the fields


def test_the_flags_round_trip_to_the_defaults_and_back():
    assert AriaSettings.from_args(_parser().parse_args([])) == AriaSettings()
    args = _parser().parse_args(["--allocation", "exp3", "--aria_alpha", "0.8", "--aria_max_ratio", "none",
                                 "--aria_no_timestep_norm", "--exp3_gamma", "0.3", "--rc_schedule", "sigmoid",
                                 "--aria_feed", "congruent", "--aria_warmup_steps", "7", "--aria_null", "empirical"])
    s = AriaSettings.from_args(args)
    assert s.null == "empirical" and AriaSettings(null=s.null).make_policy([1, 2]).null == "empirical"
    assert (s.allocation, s.alpha, s.max_ratio, s.timestep_norm, s.exp3_gamma, s.rc_schedule, s.feed,
            s.warmup_steps) == ("exp3", 0.8, None, False, 0.3, "sigmoid", "congruent", 7)
    assert args.aria_no_timestep_norm is True and isinstance(args.aria_warmup_steps, int)


@pytest.mark.parametrize("change, message", [
    ({"allocation": "nope"}, "--allocation 'nope' is not valid; choose one of aria, rc"),
    ({"score": "z"}, "--aria_score 'z' is not valid; choose one of sparse, credible, zscore"),
    ({"rc_schedule": "linear"}, "--rc_schedule 'linear' is not valid; choose one of exponential, sigmoid, constant"),
    ({"feed": "x"}, "--aria_feed 'x' is not valid; choose one of all, swapped, congruent"),
    ({"tau": 0.0}, "--aria_tau 0.0 is not valid; it must be a number above 0"),
    ({"floor": 1.5}, "--aria_floor 1.5 is not valid; it must be a probability between 0 and 1"),
    ({"max_ratio": 0.5}, "--aria_max_ratio 0.5 is not valid; it must be a number of 1 or more, or 'none'"),
    ({"num_timestep_bins": 0}, "--aria_num_timestep_bins 0 is not valid; it must be an integer of 1 or more"),
    ({"half_life": float("nan")}, "--aria_half_life nan is not valid"),
    ({"null_prompt_prob": -0.1}, "--null_prompt_prob -0.1 is not valid"),
    ({"variance": "own"}, "--aria_variance 'own' is not valid; choose one of own_max, pooled"),
    ({"null": "none"}, "--aria_null 'none' is not valid; choose one of theoretical, empirical, empirical_leaves, "
                      "empirical_large"),
    ({"refresh_every": 0}, "--aria_refresh_every 0 is not valid; it must be an integer of 1 or more"),
    ({"refresh_every": 2.5}, "--aria_refresh_every 2.5 is not valid; it must be an integer of 1 or more"),
    ({"log_every": 1.0}, "--aria_log_every 1.0 is not valid; it must be an integer of 1 or more"),
])
def test_invalid_values_are_one_line_user_errors_naming_the_flag(change, message):
    with pytest.raises(UserError, match=re.escape(message)):
        AriaSettings(**change)


def test_none_is_valid_only_where_the_flag_takes_none():
    AriaSettings(max_ratio=None, cap=None, samples_per_half_life=None)
    with pytest.raises(UserError, match="--aria_tau None is not valid"):
        AriaSettings(tau=None)


def test_the_tracker_and_the_policy_take_their_arguments_from_the_metadata():
    s = AriaSettings(half_life=20.0, num_timestep_bins=3, prior_strength=2.0,
                     samples_per_half_life=None, tau=0.3, warmup_steps=5)
    t = s.make_tracker(4, num_train_timesteps=100)
    assert (t.num_timestep_bins, t.normalize_timesteps, t.prior_strength) == (3, True, 2.0)
    assert AriaSettings(timestep_norm=False).make_tracker(4).normalize_timesteps is False
    p = s.make_policy([1, 2, 3, 4])
    assert (p.tau, p.warmup_steps) == (0.3, 5)
