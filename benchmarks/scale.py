"""The sampler at scale: N = 10,000,000 prompts, K = 1024 regions (random int32 region ids).

Measures (each in a fresh subprocess, so RSS and its high-water mark belong to the sampler alone):
  * index build time (`AdaptiveRegionSampler(region_ids)`), median of --builds builds;     target <= 5 s
  * memory beyond the region-id array: nbytes of every array the sampler holds, tracemalloc (current and
    peak during the build), RSS delta after the build and RSS high-water delta;              target <= 8 B/prompt
  * drawn indices per second for draw sizes 256, 4096, 65536 (ARIA-like non-uniform probabilities);
                                                                                           target >= 1e6 /s
  * tracker update + policy step at K=1024 (global batch 256), after the policy warm-up.

    python benchmarks/scale.py            # N=10M, K=1024
    python benchmarks/scale.py --quick    # N=200k (smoke test)
Writes benchmarks/results/scale[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

from _common import HERE, header, loadavg, offline_env, summarize, table, write_json

offline_env()


def _region_ids(n: int, k: int, seed: int) -> np.ndarray:
    """Random int32 region ids, generated in chunks (no int64 temporary of size N)."""
    rng = np.random.default_rng(seed)
    ids = np.empty(n, dtype=np.int32)
    for s in range(0, n, 1 << 20):
        ids[s:s + (1 << 20)] = rng.integers(0, k, size=min(1 << 20, n - s), dtype=np.int32)
    ids[:k] = np.arange(k, dtype=np.int32)  # every region non-empty
    return ids


def child(n: int, k: int, seed: int, builds: int, draw_sizes: list[int], draw_reps: int, policy_steps: int) -> dict:
    import gc
    import tracemalloc

    import torch

    from diffusers_aria.allocation import make_policy
    from diffusers_aria.sampler import AdaptiveRegionSampler
    from diffusers_aria.settings import AriaSettings
    from diffusers_aria.tracker import DiscrepancyTracker

    from _common import maxrss_bytes, rss_bytes

    torch.set_num_threads(1)
    ids = _region_ids(n, k, seed)
    # warm the code paths on a small array (imports, first-call costs) before measuring memory
    AdaptiveRegionSampler(ids[:10_000] % 7, seed=seed).draw(0, 16)
    gc.collect()
    rss0, hwm0 = rss_bytes(), maxrss_bytes()
    tracemalloc.start()
    t0 = time.perf_counter()
    sampler = AdaptiveRegionSampler(ids, seed=seed)
    build_first = time.perf_counter() - t0
    tm_current, tm_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    gc.collect()
    rss1, hwm1 = rss_bytes(), maxrss_bytes()
    held = {name: int(getattr(sampler, name).nbytes) for name in
            ("order", "sizes", "offsets", "counters", "probabilities")}
    build_times = [build_first]
    for _ in range(builds - 1):
        t0 = time.perf_counter()
        AdaptiveRegionSampler(ids, seed=seed)
        build_times.append(time.perf_counter() - t0)
        gc.collect()

    # ARIA-like allocation: lognormal tilt of the size prior
    rng = np.random.default_rng(seed + 1)
    p = sampler.sizes * rng.lognormal(0, 0.5, size=k)
    sampler.set_probabilities(p / p.sum())
    draws = {}
    step = 0
    for size in draw_sizes:
        sampler.draw(step, size)
        step += 1
        times = []
        reps = max(3, min(draw_reps, int(draw_reps * 4096 / size) + 3))
        for _ in range(reps):
            t0 = time.perf_counter()
            idx, _ = sampler.draw(step, size)
            times.append(time.perf_counter() - t0)
            step += 1
        assert idx.min() >= 0 and idx.max() < n
        t = np.asarray(times)
        draws[str(size)] = {"ms": summarize(t), "indices_per_s_median": float(size / np.median(t)),
                            "indices_per_s_p10": float(size / np.percentile(t, 90)), "reps": reps}

    s = AriaSettings()
    tracker = DiscrepancyTracker(k, half_life=s.half_life, num_timestep_bins=s.num_timestep_bins,
                                 prior_strength=s.prior_strength)
    policy = make_policy("aria", sampler.sizes, warmup_steps=s.warmup_steps, damping=s.damping, floor=s.floor)
    hard = rng.lognormal(0, 0.5, size=k)
    t_upd, t_pol = [], []
    for i in range(s.warmup_steps + policy_steps):
        _, reg = sampler.draw(step, 256)
        step += 1
        tt = rng.integers(0, 1000, size=256)
        loss = hard[reg] * (0.2 + tt / 1000) * rng.lognormal(0, 0.3, size=256)
        reg_t, loss_t, tt_t = torch.from_numpy(reg), torch.from_numpy(loss), torch.from_numpy(tt)
        t0 = time.perf_counter()
        tracker.update(reg_t, loss_t, tt_t)
        t1 = time.perf_counter()
        policy.step(i, tracker)
        t2 = time.perf_counter()
        sampler.set_probabilities(policy.probabilities)
        if i >= s.warmup_steps:
            t_upd.append(t1 - t0)
            t_pol.append(t2 - t1)
    return {
        "N": n, "K": k,
        "region_ids_nbytes": int(ids.nbytes),
        "build_s": summarize(build_times, scale=1.0),
        "held_nbytes": held,
        "held_bytes_per_prompt": sum(held.values()) / n,
        "tracemalloc_current_bytes_per_prompt": tm_current / n,
        "tracemalloc_peak_bytes_per_prompt": tm_peak / n,
        "rss_delta_bytes_per_prompt": (rss1 - rss0) / n,
        "rss_highwater_delta_bytes_per_prompt": (hwm1 - max(hwm0, rss0)) / n,
        "draw": draws,
        "tracker_update_ms": summarize(t_upd),
        "policy_step_ms": summarize(t_pol),
        "tracker_plus_policy_ms_median": float(np.median(np.asarray(t_upd) + np.asarray(t_pol)) * 1e3),
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, default=10_000_000)
    ap.add_argument("--k", type=int, default=1024)
    ap.add_argument("--builds", type=int, default=3)
    ap.add_argument("--draw_sizes", type=int, nargs="+", default=[256, 4096, 65536])
    ap.add_argument("--draw_reps", type=int, default=200)
    ap.add_argument("--policy_steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out_dir", default=None)
    ap.add_argument("--_child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.builds, args.draw_reps, args.policy_steps = 200_000, 2, 10, 20
    if args._child:
        print(json.dumps(child(args.n, args.k, args.seed, args.builds, args.draw_sizes, args.draw_reps,
                               args.policy_steps)))
        return {}
    res = header(argv if argv is not None else sys.argv[1:], "scale.py")
    res["targets"] = {"bytes_per_prompt": 8.0, "indices_per_s": 1e6, "build_s": 5.0}
    cmd = [sys.executable, os.path.join(HERE, "scale.py"), "--_child", "--n", str(args.n), "--k", str(args.k),
           "--builds", str(args.builds), "--draw_reps", str(args.draw_reps), "--policy_steps",
           str(args.policy_steps), "--seed", str(args.seed), "--draw_sizes", *map(str, args.draw_sizes)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=HERE)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    res["result"] = r
    res["loadavg_end"] = loadavg()
    mem = max(r["held_bytes_per_prompt"], r["rss_delta_bytes_per_prompt"])
    res["met"] = {
        "memory_held": bool(mem <= 8.0),
        "memory_peak_during_build": bool(max(r["tracemalloc_peak_bytes_per_prompt"],
                                             r["rss_highwater_delta_bytes_per_prompt"]) <= 8.0),
        "build_time": bool(r["build_s"]["median"] <= 5.0),
        **{f"draw_{s}": bool(v["indices_per_s_median"] >= 1e6) for s, v in r["draw"].items()},
    }
    print(f"\nsampler at N={args.n:,}, K={args.k} (load {loadavg()})")
    rows = [[f"index build (median of {r['build_s']['n']})", f"{r['build_s']['median']:.3f} s", "<= 5 s"],
            ["held arrays (nbytes)", f"{r['held_bytes_per_prompt']:.3f} B/prompt", "<= 8 B/prompt"],
            ["tracemalloc after build", f"{r['tracemalloc_current_bytes_per_prompt']:.3f} B/prompt", ""],
            ["tracemalloc peak during build", f"{r['tracemalloc_peak_bytes_per_prompt']:.3f} B/prompt", ""],
            ["RSS delta after build", f"{r['rss_delta_bytes_per_prompt']:.3f} B/prompt", ""],
            ["RSS high-water delta", f"{r['rss_highwater_delta_bytes_per_prompt']:.3f} B/prompt", ""]]
    for s, v in r["draw"].items():
        rows.append([f"draw {s} (median of {v['reps']})", f"{v['indices_per_s_median']:,.0f} idx/s "
                     f"({v['ms']['median']:.3f} ms)", ">= 1,000,000/s"])
    rows.append([f"tracker update, K={args.k}", f"{r['tracker_update_ms']['median']:.3f} ms "
                 f"(p90 {r['tracker_update_ms']['p90']:.3f})", ""])
    rows.append([f"ARIA policy step, K={args.k}", f"{r['policy_step_ms']['median']:.3f} ms "
                 f"(p90 {r['policy_step_ms']['p90']:.3f})", ""])
    print(table(rows, ["measure", "value", "target"]))
    path = write_json("scale_quick" if args.quick else "scale", res, args.out_dir)
    print(f"wrote {path}")
    return res


if __name__ == "__main__":  # exit 1 when a target is missed (memory, build time, draw rate)
    sys.exit(0 if all(main().get("met", {}).values()) else 1)
