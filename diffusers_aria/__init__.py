"""diffusers-aria: adaptive region-based importance allocation of conditioning prompts for diffusion distillation.

Public API:
    build_regions, ConditionRegions      -- partition a prompt pool into regions (regions.py)
    DiscrepancyTracker                   -- online per-region discrepancy estimates (tracker.py)
    ARIAAllocation, make_policy, ...     -- estimates -> region probabilities (allocation.py)
    AdaptiveRegionSampler                -- draw prompts by region (sampler.py)
    region_dataloader, RegionCollate     -- put the sampler and each row's region into a script's DataLoader
    ARIACallback                         -- accelerate glue: accumulate, gather, update, re-allocate, log, checkpoint
    RandomConditioning, SwapSchedule     -- RC's condition switching (conditioning.py)
    load_prompt_pool                     -- read a pool from a list, a Dataset or a file (pool.py)
"""

import os as _os
import sys as _sys

if "torch" not in _sys.modules:
    # CPU runs on a shared machine: OpenMP threads that spin-wait make 2 torch threads ~7x slower than 1 as
    # soon as another process is busy (13.9 s vs 2.0 s per tiny UNet step). The policy is read once, when
    # torch loads, so it is set here, before our first import of torch, unless the user chose one.
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .allocation import (  # noqa: E402
    EXP3,
    POLICIES,
    AllocationPolicy,
    ARIAAllocation,
    DoReMiEG,
    PromptUniform,
    RegionUniform,
    StaticAfterWarmup,
    make_policy,
)
from .callback import ARIACallback
from .conditioning import ConditioningBatch, RandomConditioning, SwapSchedule
from .pool import PromptPoolError, load_prompt_pool, pool_fingerprint
from .regions import (
    ConditionRegions,
    RegionCollate,
    RegionsMismatchError,
    build_regions,
    load_or_build_regions,
)
from .sampler import AdaptiveRegionSampler, region_dataloader
from .tracker import DiscrepancyTracker

__version__ = "0.1.0"

__all__ = [
    "ARIAAllocation",
    "ARIACallback",
    "AdaptiveRegionSampler",
    "AllocationPolicy",
    "ConditionRegions",
    "ConditioningBatch",
    "DiscrepancyTracker",
    "DoReMiEG",
    "EXP3",
    "POLICIES",
    "PromptPoolError",
    "PromptUniform",
    "RandomConditioning",
    "RegionCollate",
    "RegionUniform",
    "RegionsMismatchError",
    "StaticAfterWarmup",
    "SwapSchedule",
    "build_regions",
    "load_or_build_regions",
    "load_prompt_pool",
    "make_policy",
    "pool_fingerprint",
    "region_dataloader",
]
