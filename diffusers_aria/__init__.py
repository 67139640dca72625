"""diffusers-aria: adaptive region-based importance allocation of conditioning prompts for diffusion distillation.

Public API:
    build_regions, ConditionRegions      -- partition a prompt pool into regions (regions.py)
    RegionTree                           -- coarser, nested groupings of the regions (hierarchy.py)
    DiscrepancyTracker                   -- online per-region discrepancy estimates (tracker.py)
    ARIAAllocation, make_policy, ...     -- estimates -> region probabilities (allocation.py)
    AdaptiveRegionSampler                -- draw prompts by region (sampler.py)
    region_dataloader, RegionCollate     -- put the sampler and each row's region into a script's DataLoader
    ARIACallback                         -- accelerate glue: accumulate, gather, update, re-allocate, log, checkpoint
    RandomConditioning, SwapSchedule     -- RC's condition switching (conditioning.py)
    load_prompt_pool                     -- read a pool from a list, a Dataset or a file (pool.py)

The names load on first use (PEP 562), so that `import diffusers_aria` loads neither torch nor numpy: an entry
point (the `diffusers-aria` command, a script) can set the process's environment (OMP_WAIT_POLICY) and check
its arguments before torch loads. `from diffusers_aria import X` works as usual.
"""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> the core module that defines it
_EXPORTS = {
    "allocation": ("EXP3", "POLICIES", "AllocationPolicy", "ARIAAllocation", "DoReMiEG", "PromptUniform",
                   "RegionUniform", "StaticAfterWarmup", "make_policy"),
    "callback": ("ARIACallback",),
    "conditioning": ("ConditioningBatch", "RandomConditioning", "SwapSchedule"),
    "dataloading": ("RegionCollate", "region_dataloader"),
    "hierarchy": ("RegionTree",),
    "pool": ("PromptPoolError", "load_prompt_pool", "pool_fingerprint"),
    "regions": ("ConditionRegions", "RegionsMismatchError", "build_regions", "load_or_build_regions"),
    "sampler": ("AdaptiveRegionSampler",),
    "tracker": ("DiscrepancyTracker",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}

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
    "RegionTree",
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


def __getattr__(name: str):
    module = _MODULE_OF.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


if TYPE_CHECKING:  # what type checkers and IDEs see
    from .allocation import (
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
    from .dataloading import RegionCollate, region_dataloader
    from .hierarchy import RegionTree
    from .pool import PromptPoolError, load_prompt_pool, pool_fingerprint
    from .regions import ConditionRegions, RegionsMismatchError, build_regions, load_or_build_regions
    from .sampler import AdaptiveRegionSampler
    from .tracker import DiscrepancyTracker
