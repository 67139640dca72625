"""Shared helpers of the speed/scale benchmarks (overhead.py, scale.py, regions_speed.py)."""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from typing import Any

# Before numpy or torch load their threading runtime (it reads this once): spinning OpenMP threads make
# 2 torch threads ~7x slower than 1 on a busy 2-core machine. Reaches this process when _common is imported
# before torch, and every subprocess a benchmark starts. A value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def offline_env() -> None:
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        os.environ.setdefault(k, "1")
    os.environ.setdefault("HF_HOME", os.path.join(REPO, ".hf_home"))


def loadavg() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return [float("nan")] * 3


def machine_info() -> dict[str, Any]:
    import torch

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def summarize(seconds, scale: float = 1e3) -> dict[str, float]:
    """median/p90/mean/min/max of a list of durations, in ms by default (scale=1e3)."""
    a = np.asarray(seconds, dtype=np.float64) * scale
    return {
        "median": float(np.median(a)),
        "p90": float(np.percentile(a, 90)),
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
        "n": int(a.size),
    }


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def maxrss_bytes() -> int:
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def write_json(name: str, payload: dict[str, Any], out_dir: str | None = None) -> str:
    out_dir = out_dir or RESULTS
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{name}.json")
    tmp = path + f".tmp-{os.getpid()}"
    with open(tmp, "w") as fh:
        json.dump(payload, fh, indent=1, default=_json_default)
    os.replace(tmp, path)
    return path


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o).__name__)


def header(argv: list[str] | None, script: str) -> dict[str, Any]:
    cmd = "python benchmarks/" + script + ("" if not argv else " " + " ".join(argv))
    return {"command": cmd, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "loadavg_start": loadavg(),
            "machine": machine_info()}


def table(rows: list[list[Any]], headers: list[str]) -> str:
    """A Markdown table (printed by the scripts and pasted into docs/benchmarks-speed.md)."""

    def fmt(v):
        if isinstance(v, float):
            if not math.isfinite(v):
                return str(v)
            return f"{v:.4g}" if abs(v) < 1e5 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if i else "---" for i in range(len(headers))) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def bootstrap_ratio_ci(num, den, reps: int = 10_000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap CI of sum(num)/sum(den), resampling paired blocks."""
    num, den = np.asarray(num, float), np.asarray(den, float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, num.size, size=(reps, num.size))
    r = num[idx].sum(1) / den[idx].sum(1)
    lo, hi = np.percentile(r, [(1 - level) / 2 * 100, (1 + level) / 2 * 100])
    return float(lo), float(hi)


def tracker_keys() -> set[str]:
    """The `DiscrepancyTracker` keyword arguments a policy spec may set."""
    import inspect

    from diffusers_aria.tracker import DiscrepancyTracker

    return set(inspect.signature(DiscrepancyTracker.__init__).parameters) - {"self", "num_regions"}


def split_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """A policy spec `name:key=value,...` of the benchmarks -> (name, {key: value}), values read as JSON
    where they parse (`null`, numbers, booleans) and kept as strings otherwise."""
    name, _, rest = spec.partition(":")
    settings: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        k, _, v = item.partition("=")
        try:
            settings[k] = json.loads(v)
        except ValueError:
            settings[k] = v
    return name, settings


def region_tree(k: int, seed: int):
    """A random nested grouping of k synthetic regions with the library's level sizes (regions here have no
    geometry, so any nesting is as good as another: the tree must not create differences from noise)."""
    from diffusers_aria.hierarchy import RegionTree, default_level_sizes

    rng = np.random.default_rng([seed, k, 13])
    ancestors, node, current = [], np.arange(k), k
    for n in reversed(default_level_sizes(k)):
        node = rng.permutation(np.arange(current) % n)[node]
        ancestors.append(node.copy())
        current = n
    return RegionTree(np.array(ancestors[::-1], dtype=np.int32).reshape(len(ancestors), k))
