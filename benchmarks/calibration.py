"""Calibration of ARIA's allocation: does it stay put on noise, move on real differences, and follow drift?

Synthetic per-sample losses go through the library's own `DiscrepancyTracker`, allocation policies and
`AdaptiveRegionSampler` (numpy only: no model). A sample of region k at timestep t has loss
`baseline(t) * factor_k * noise` with a strongly timestep-dependent baseline (20x from t=0 to t=999, the
tracker's per-timestep normalisation must remove it) and lognormal noise of mean 1 and coefficient of
variation CV. Region sizes are imbalanced (lognormal), the regions of every step are drawn by the sampler
from the policy's own probabilities, so a region drawn less often has fewer samples.

Parts:
    se      the tracker's standard errors against the spread over repeated runs: K in {16, 256}, half-life
            {50, 200}, CV {0.5, 1}, allocation uniform, skewed (fixed, lognormal), feedback_zscore (the
            allocation of the previous z-score rule, which starves regions on noise) and feedback_default (the
            default rule with 10% of the regions 1.5x harder): ratio reported se / empirical sd of the raw
            means (`standard_errors`) and of the shrunk estimates (`uncertainty`); target 1 +- 0.15.
    null    all regions equal: K in {64, 256, 1024, 4096}, global batch max(32, K) (256 from K=1024), CV {0.5, 1},
            2,000 steps. Targets over the second half: mean TV(p, prior) <= 0.05, min p/prior >= 0.5, max
            p/prior <= 2 (p averaged over the second half; the per-step extremes are reported too).
    power   10% of the regions `factor` times harder (1.2, 1.5 at K=256 batch 256; 1.2 at K=1024 batch 256),
            CV 1: their share of p over their prior share, mean over steps 1,000-2,000 (targets 1.5x, 2.5x,
            1.3x), and the first step at which it is reached.
    drift   K=256, batch 256, CV 1: 10% of the regions 1.5x harder until step 1,000, another 10% after it.
            Target: by step 1,300 the new set >= 1.5x its prior share and the old one <= 1.1x.
    response  a planted unlearnable region (2x harder, CV 3, whatever it is drawn) and a learnable one (2x,
            falling as it is drawn), K=64: the first <= 1.1x its prior on average, the second >= 1.5x at its
            peak and back <= 1.1x at the end.
    reliability  split-half reliability of the tracker's region scores at RC's allocation: even and odd samples
            into two trackers, K in {64, 256, 1024, 4096}, 10% of the regions 1.0 / 1.2 / 1.5x harder, batch
            256, 1,000 steps: the correlation of the halves across regions (no target; 1.0x shows ~0).

"prior" is each policy's own starting allocation (`size**alpha` for ARIA, the prompt share for RC, uniform
for region-uniform). Policies are the library's, by the same `name:key=value` specs as benchmarks/quality.py;
`aria_zscore` is the previous default (`aria:score=zscore,tau=0.5,max_ratio=null`).

    python benchmarks/calibration.py --seeds 0 1 2            # the reported grid (~8 min on 2 cores)
    python benchmarks/calibration.py --quick                   # seconds (smoke test)
Writes benchmarks/results/calibration[_TAG].json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as _common does

import numpy as np

from diffusers_aria.allocation import make_policy, policy_arguments
from diffusers_aria.callback import ARIACallback
from diffusers_aria.sampler import AdaptiveRegionSampler
from diffusers_aria.tracker import DiscrepancyTracker

from _common import header, loadavg, region_tree, split_spec, table, tracker_keys, write_json

DEFAULT_POLICIES = ("aria", "aria_zscore", "rc", "region_uniform", "static", "doremi", "exp3")
ALIASES = {"aria_zscore": "aria:score=zscore,tau=0.5,max_ratio=null"}
TRACKER_KEYS = tracker_keys()
STEPS = 2000


# ------------------------------------------------------------------------------------------ simulation
def parse_spec(spec: str) -> tuple[str, dict, dict]:
    name, settings = split_spec(ALIASES.get(spec, spec))
    pol = {k: v for k, v in settings.items() if k not in TRACKER_KEYS}
    return name, pol, {k: v for k, v in settings.items() if k in TRACKER_KEYS}


def baseline(t: np.ndarray) -> np.ndarray:
    return 0.05 + 0.95 * (1.0 - t / 1000.0) ** 2


def region_ids(k: int, seed: int, per_region: int = 100) -> np.ndarray:
    """Imbalanced sizes (lognormal, sd 1 in log space), at least 5 prompts per region."""
    rng = np.random.default_rng([seed, k, 11])
    sizes = np.maximum(np.round(rng.lognormal(0.0, 1.0, k) / np.exp(0.5) * per_region), 5).astype(np.int64)
    return rng.permutation(np.repeat(np.arange(k), sizes)).astype(np.int32)


def make_run_policy(name: str, sizes, k: int, seed: int, **pol_kw):
    """The policy of a spec, with the regions' tree when it takes one."""
    if "tree" in policy_arguments(name):
        pol_kw.setdefault("tree", region_tree(k, seed))
    return make_policy(name, sizes, **pol_kw)


class LossModel:
    """Per-sample losses: baseline(t) * factor[region] * lognormal(mean 1, CV)."""

    def __init__(self, k: int, cv: float, seed: int) -> None:
        self.factor = np.ones(k)
        self.s2 = np.log1p(cv * cv)
        self.rng = np.random.default_rng([seed, 23])

    def sample(self, regions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        n = regions.size
        t = self.rng.integers(0, 1000, n)
        noise = self.rng.lognormal(-self.s2 / 2, np.sqrt(self.s2), n)
        return baseline(t) * self.factor[regions] * noise, t


def hard_set(k: int, seed: int, salt: int, frac: float = 0.1, exclude: np.ndarray | None = None) -> np.ndarray:
    rng = np.random.default_rng([seed, k, salt])
    pool = np.arange(k) if exclude is None else np.setdiff1d(np.arange(k), exclude)
    return np.sort(rng.choice(pool, size=max(1, int(round(frac * k))), replace=False))


def simulate(spec: str, k: int, batch: int, cv: float, seed: int, steps: int = STEPS,
             schedule: list[tuple[int, np.ndarray, float]] = ()) -> dict:
    """One run; `schedule` = [(from_step, regions, factor)] sets the harder regions. Returns p per step."""
    name, pol_kw, trk_kw = parse_spec(spec)
    ids = region_ids(k, seed)
    sampler = AdaptiveRegionSampler(ids, seed=seed)
    policy = make_run_policy(name, sampler.sizes, k, seed, **pol_kw)
    tracker = DiscrepancyTracker(k, **trk_kw)
    cb = ARIACallback(None, sampler, tracker, policy, log_every=0, register_hooks=False)  # the library's glue
    prior = policy.probabilities.copy()
    model = LossModel(k, cv, seed)
    probs = np.empty((steps, k))
    t0 = time.perf_counter()
    for step in range(steps):
        for start, regions, factor in schedule:
            if step == start:
                model.factor[:] = 1.0
                model.factor[regions] = factor
        reg = sampler.draw_regions(step, batch)
        losses, t = model.sample(reg)
        cb.on_step_end(step, reg, losses, t)
        probs[step] = sampler.probabilities
    return {"probs": probs, "prior": prior, "seconds": time.perf_counter() - t0}


def tv(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    return 0.5 * np.abs(p - q).sum(axis=-1)


# ------------------------------------------------------------------------------------------ parts
def null_case(spec: str, k: int, batch: int, cv: float, seed: int, steps: int) -> dict:
    r = simulate(spec, k, batch, cv, seed, steps)
    half = r["probs"][steps // 2:]
    ratio_mean = half.mean(0) / r["prior"]
    ratio_all = half / r["prior"]
    return {"tv": float(tv(half, r["prior"]).mean()), "min_ratio": float(ratio_mean.min()),
            "max_ratio": float(ratio_mean.max()), "min_ratio_any_step": float(ratio_all.min()),
            "max_ratio_any_step": float(ratio_all.max()),
            "starved_share": float((ratio_mean < 0.5).mean()), "seconds": r["seconds"]}


def lift(probs: np.ndarray, prior: np.ndarray, regions: np.ndarray) -> np.ndarray:
    return probs[:, regions].sum(1) / prior[regions].sum()


def power_case(spec: str, k: int, batch: int, cv: float, seed: int, factor: float, target: float, steps: int
               ) -> dict:
    hard = hard_set(k, seed, 1)
    r = simulate(spec, k, batch, cv, seed, steps, schedule=[(0, hard, factor)])
    lt = lift(r["probs"], r["prior"], hard)
    reached = np.flatnonzero(lt >= target)
    return {"lift": float(lt[steps // 2:].mean()), "target": target,
            "first_step": int(reached[0]) if reached.size else None,
            "tv": float(tv(r["probs"][steps // 2:], r["prior"]).mean()),
            "max_ratio": float((r["probs"][steps // 2:].mean(0) / r["prior"]).max()), "seconds": r["seconds"]}


def drift_case(spec: str, k: int, batch: int, cv: float, seed: int, factor: float, steps: int) -> dict:
    old = hard_set(k, seed, 1)
    new = hard_set(k, seed, 2, exclude=old)
    switch = steps // 2
    r = simulate(spec, k, batch, cv, seed, steps, schedule=[(0, old, factor), (switch, new, factor)])
    l_old, l_new = lift(r["probs"], r["prior"], old), lift(r["probs"], r["prior"], new)
    at = min(switch + 300, steps - 1)  # --quick runs are shorter than 1,300 steps
    ok = np.flatnonzero((l_new[switch:] >= 1.5) & (l_old[switch:] <= 1.1))
    return {"old_before": float(l_old[switch - 100:switch].mean()), "new_at_300": float(l_new[at]),
            "old_at_300": float(l_old[at]), "steps_to_switch": int(ok[0]) if ok.size else None,
            "seconds": r["seconds"]}


def response_case(spec: str, k: int, batch: int, seed: int, steps: int, learn_draws: float = 500.0) -> dict:
    """Two planted regions among K equal ones (CV 1): an *unlearnable* one, 2x harder with CV 3 however often it
    is drawn (the student's capacity floor, or noise it cannot fit), and a *learnable* one, 2x harder at first,
    whose excess halves every `learn_draws * ln 2` draws it receives (learnt faster when drawn more often)."""
    name, pol_kw, trk_kw = parse_spec(spec)
    ids = region_ids(k, seed)
    sampler = AdaptiveRegionSampler(ids, seed=seed)
    policy = make_run_policy(name, sampler.sizes, k, seed, **pol_kw)
    tracker = DiscrepancyTracker(k, **trk_kw)
    cb = ARIACallback(None, sampler, tracker, policy, log_every=0, register_hooks=False)
    prior = policy.probabilities.copy()
    rng = np.random.default_rng([seed, k, 29])
    middle = np.argsort(sampler.sizes)[k // 4: 3 * k // 4]  # regions of typical size
    unlearnable, learnable = rng.choice(middle, size=2, replace=False)
    drawn = np.zeros(k)
    s2 = np.log1p(np.full(k, 1.0))
    s2[unlearnable] = np.log1p(9.0)  # CV 3
    ratio_u, ratio_l, excess_l = np.empty(steps), np.empty(steps), np.empty(steps)
    for step in range(steps):
        reg = sampler.draw_regions(step, batch)
        drawn += np.bincount(reg, minlength=k)
        factor = np.ones(k)
        factor[unlearnable] = 2.0
        factor[learnable] = 1.0 + np.exp(-drawn[learnable] / learn_draws)
        t = rng.integers(0, 1000, reg.size)
        noise = rng.lognormal(-s2[reg] / 2, np.sqrt(s2[reg]))
        p = cb.on_step_end(step, reg, baseline(t) * factor[reg] * noise, t)
        ratio_u[step] = p[unlearnable] / prior[unlearnable]
        ratio_l[step] = p[learnable] / prior[learnable]
        excess_l[step] = factor[learnable] - 1.0
    learnt = np.flatnonzero(excess_l < 0.05)
    return {"unlearnable_mean": float(ratio_u.mean()), "unlearnable_max": float(ratio_u.max()),
            "learnable_peak": float(ratio_l.max()), "learnable_end": float(ratio_l[-100:].mean()),
            "learnable_learnt_step": int(learnt[0]) if learnt.size else None,
            "learnable_excess_end": float(excess_l[-1])}


def reliability_case(k: int, factor: float, batch: int, seed: int, steps: int, cv: float = 1.0) -> dict:
    """Split-half reliability of the tracker's region scores: one stream of samples at the prompt-share
    allocation (RC's; no feedback), 10% of the regions `factor` times harder (1.0: nothing to find), the even
    samples fed to one tracker and the odd ones to another. The correlation across regions of the two halves'
    relative excess (`estimates() - 1`), and the Spearman-Brown value 2r / (1 + r) for the whole stream."""
    ids = region_ids(k, seed)
    sampler = AdaptiveRegionSampler(ids, seed=seed)
    model = LossModel(k, cv, seed)
    model.factor[hard_set(k, seed, 1)] = factor
    halves = (DiscrepancyTracker(k), DiscrepancyTracker(k))
    for step in range(steps):
        reg = sampler.draw_regions(step, batch)
        losses, t = model.sample(reg)
        for h, tracker in enumerate(halves):
            tracker.update(reg[h::2], losses[h::2], t[h::2])
    a, b = (tr.estimates() - 1.0 for tr in halves)
    r = float(np.corrcoef(a, b)[0, 1])
    return {"r_halves": r, "spearman_brown": 2 * r / (1 + r) if r > -1 else float("nan")}


def se_case(k: int, half_life: float, cv: float, allocation: str, reps: int, seed: int) -> dict:
    """Reported standard errors vs the empirical sd over `reps` independent runs (fixed regions/sizes)."""
    batch = max(32, k)
    steps = int(6 * half_life)
    ids = region_ids(k, seed)
    raw, est, se_raw, se_est = [], [], [], []
    for rep in range(reps):
        sampler = AdaptiveRegionSampler(ids, seed=seed * 10_000 + rep)
        tracker = DiscrepancyTracker(k, half_life=half_life)
        if allocation == "uniform":
            sampler.set_probabilities(np.full(k, 1.0 / k))
            policy = None
        elif allocation == "skewed":
            w = np.random.default_rng([seed, k, 5]).lognormal(0.0, 1.0, k)
            sampler.set_probabilities(w / w.sum())
            policy = None
        elif allocation == "feedback_zscore":  # the previous z-score rule: moves on noise, starves regions
            policy = make_policy("aria", sampler.sizes, score="zscore", tau=0.5, max_ratio=None)
        else:  # feedback_default: the default rule, with 10% of the regions 1.5x harder so that it moves
            policy = make_policy("aria", sampler.sizes)
        model = LossModel(k, cv, seed * 10_000 + rep)
        if allocation == "feedback_default":
            model.factor[hard_set(k, seed, 1)] = 1.5
        for step in range(steps):
            reg = sampler.draw_regions(step, batch)
            losses, t = model.sample(reg)
            tracker.update(reg, losses, t)
            if policy is not None:
                sampler.set_probabilities(policy.step(step, tracker))
        raw.append(tracker.raw_means())
        est.append(tracker.estimates())
        se_raw.append(tracker.standard_errors())
        se_est.append(tracker.uncertainty())
    raw, est, se_raw, se_est = map(np.asarray, (raw, est, se_raw, se_est))

    def ratio(values, ses):
        ok = np.all(np.isfinite(values), axis=0) & np.all(np.isfinite(ses), axis=0)
        emp = values[:, ok].var(axis=0, ddof=1)
        rep_ = (ses[:, ok] ** 2).mean(axis=0)
        per_region = np.sqrt(rep_ / emp)
        return float(np.sqrt(rep_.sum() / emp.sum())), np.percentile(per_region, [10, 90]).tolist()

    r_raw, q_raw = ratio(raw, se_raw)
    r_est, q_est = ratio(est, se_est)
    return {"ratio_raw": r_raw, "ratio_raw_p10_p90": q_raw, "ratio_estimate": r_est, "ratio_estimate_p10_p90": q_est}


# ------------------------------------------------------------------------------------------ grid
def jobs(args) -> list[tuple[str, dict]]:
    out: list[tuple[str, dict]] = []
    steps = args.steps
    if "se" in args.parts:
        ks = (16,) if args.quick else (16, 256)
        hls = (50,) if args.quick else (50, 200)
        for k in ks:
            for hl in hls:
                for cv in (0.5, 1.0):
                    for alloc in ("uniform", "skewed", "feedback_zscore", "feedback_default"):
                        out.append(("se", dict(k=k, half_life=hl, cv=cv, allocation=alloc, reps=args.se_reps,
                                               seed=args.seeds[0])))
    if "reliability" in args.parts:
        for seed in args.seeds:
            for k in ((64,) if args.quick else (64, 256, 1024, 4096)):
                for factor in (1.0, 1.2, 1.5):
                    out.append(("reliability", dict(k=k, factor=factor, batch=256, seed=seed,
                                                    steps=min(steps, 1000))))
    for spec in args.policies:
        for seed in args.seeds:
            if "null" in args.parts:
                for k in ((16, 256) if args.quick else (64, 256, 1024, 4096)):
                    batch = 256 if k >= 1024 else max(32, k)
                    for cv in (0.5, 1.0):
                        out.append(("null", dict(spec=spec, k=k, batch=batch, cv=cv, seed=seed, steps=steps)))
            if "power" in args.parts:
                for k, factor, target in ((256, 1.2, 1.5), (256, 1.5, 2.5), (1024, 1.2, 1.3)):
                    out.append(("power", dict(spec=_detection(spec), k=k, batch=256, cv=1.0, seed=seed, factor=factor,
                                              target=target, steps=steps)))
            if "drift" in args.parts:
                out.append(("drift", dict(spec=_detection(spec), k=256, batch=256, cv=1.0, seed=seed, factor=1.5,
                                          steps=steps)))
            if "response" in args.parts:
                out.append(("response", dict(spec=spec, k=64, batch=256, seed=seed, steps=steps)))
    return out


def _detection(spec: str) -> str:
    """The spec with ARIA's reducibility test off: power and drift plant regions that stay harder however often
    they are drawn, which that test is made to stop chasing (the response part measures it)."""
    full = ALIASES.get(spec, spec)
    name, settings = split_spec(full)
    if "stall_draws" not in policy_arguments(name) or "stall_draws" in settings:
        return spec
    return full + ("," if ":" in full else ":") + "stall_draws=null"


def run_job(job: tuple[str, dict]) -> dict:
    kind, kw = job
    fn = {"null": null_case, "power": power_case, "drift": drift_case, "se": se_case, "response": response_case,
          "reliability": reliability_case}[kind]
    return {"part": kind, **kw, **fn(**kw)}


def _mean(rows: list[dict], key: str) -> float:
    vals = [r[key] for r in rows if r[key] is not None]
    return float(np.mean(vals)) if vals else float("nan")


def summarise(results: list[dict], policies: list[str]) -> dict[str, str]:
    tables: dict[str, str] = {}
    se = [r for r in results if r["part"] == "se"]
    if se:
        rows = [[r["k"], r["half_life"], r["cv"], r["allocation"], r["ratio_raw"],
                 f"{r['ratio_raw_p10_p90'][0]:.2f}-{r['ratio_raw_p10_p90'][1]:.2f}", r["ratio_estimate"],
                 f"{r['ratio_estimate_p10_p90'][0]:.2f}-{r['ratio_estimate_p10_p90'][1]:.2f}"] for r in se]
        tables["se"] = table(rows, ["K", "half-life", "CV", "allocation", "se/sd raw means", "per region p10-p90",
                                    "se/sd estimates", "per region p10-p90"])
    null = [r for r in results if r["part"] == "null"]
    if null:
        rows = []
        for spec in policies:
            for k in sorted({r["k"] for r in null}):
                for cv in (0.5, 1.0):
                    rs = [r for r in null if r["spec"] == spec and r["k"] == k and r["cv"] == cv]
                    if not rs:
                        continue
                    ok = (max(r["tv"] for r in rs) <= 0.05 and min(r["min_ratio"] for r in rs) >= 0.5
                          and max(r["max_ratio"] for r in rs) <= 2.0)
                    rows.append([spec, k, rs[0]["batch"], cv, _mean(rs, "tv"), min(r["min_ratio"] for r in rs),
                                 max(r["max_ratio"] for r in rs), min(r["min_ratio_any_step"] for r in rs),
                                 max(r["max_ratio_any_step"] for r in rs), _mean(rs, "starved_share"),
                                 "yes" if ok else "**no**"])
        tables["null"] = table(rows, ["policy", "K", "batch", "CV", "TV(p, prior)", "min p/prior", "max p/prior",
                                      "min any step", "max any step", "regions < 0.5x", "null met"])
    power = [r for r in results if r["part"] == "power"]
    if power:
        rows = []
        for spec in policies:
            for k, factor in ((256, 1.2), (256, 1.5), (1024, 1.2)):
                rs = [r for r in power if r["spec"] == _detection(spec) and r["k"] == k and r["factor"] == factor]
                if not rs:
                    continue
                firsts = [r["first_step"] for r in rs]
                rows.append([spec, k, factor, rs[0]["target"], _mean(rs, "lift"), min(r["lift"] for r in rs),
                             str(firsts), _mean(rs, "tv"), _mean(rs, "max_ratio"),
                             "yes" if min(r["lift"] for r in rs) >= rs[0]["target"] else "**no**"])
        tables["power"] = table(rows, ["policy", "K", "harder by", "target", "lift (mean)", "lift (worst seed)",
                                       "first step reached", "TV(p, prior)", "max p/prior", "met"])
    drift = [r for r in results if r["part"] == "drift"]
    if drift:
        rows = []
        for spec in policies:
            rs = [r for r in drift if r["spec"] == _detection(spec)]
            if not rs:
                continue
            ok = min(r["new_at_300"] for r in rs) >= 1.5 and max(r["old_at_300"] for r in rs) <= 1.1
            rows.append([spec, _mean(rs, "old_before"), _mean(rs, "new_at_300"), _mean(rs, "old_at_300"),
                         str([r["steps_to_switch"] for r in rs]), "yes" if ok else "**no**"])
        tables["drift"] = table(rows, ["policy", "old set before switch", "new set at +300", "old set at +300",
                                       "steps to new>=1.5 & old<=1.1", "met"])
    rel = [r for r in results if r["part"] == "reliability"]
    if rel:
        rows = []
        for k in sorted({r["k"] for r in rel}):
            for factor in sorted({r["factor"] for r in rel}):
                rs = [r for r in rel if r["k"] == k and r["factor"] == factor]
                rows.append([k, factor, rs[0]["batch"], rs[0]["steps"], _mean(rs, "r_halves"),
                             _mean(rs, "spearman_brown"), len(rs)])
        tables["reliability"] = table(rows, ["K", "10% of regions harder by", "batch", "steps",
                                             "r(even half, odd half)", "Spearman-Brown (whole stream)", "seeds"])
    response = [r for r in results if r["part"] == "response"]
    if response:
        rows = []
        for spec in policies:
            rs = [r for r in response if r["spec"] == spec]
            if not rs:
                continue
            ok = (max(r["unlearnable_mean"] for r in rs) <= 1.1 and min(r["learnable_peak"] for r in rs) >= 1.5
                  and max(r["learnable_end"] for r in rs) <= 1.1)
            rows.append([spec, max(r["unlearnable_mean"] for r in rs), max(r["unlearnable_max"] for r in rs),
                         min(r["learnable_peak"] for r in rs), max(r["learnable_end"] for r in rs),
                         str([r["learnable_learnt_step"] for r in rs]), "yes" if ok else "**no**"])
        tables["response"] = table(rows, ["policy", "unlearnable: mean p/prior (worst seed)", "max any step",
                                          "learnable: peak p/prior (worst seed)", "at the end (worst seed)",
                                          "step it was learnt", "met"])
    return tables


def missed(tables: dict[str, str], policy: str = "aria") -> list[str]:
    """The criteria the library default (`policy`) misses: the rows of its tables marked **no**."""
    return [f"{part}: {line.strip()}" for part, text in tables.items() for line in text.splitlines()
            if line.startswith(f"| {policy} |") and "**no**" in line]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", default=["se", "null", "power", "drift", "response", "reliability"],
                   choices=["se", "null", "power", "drift", "response", "reliability"])
    p.add_argument("--policies", nargs="+", default=list(DEFAULT_POLICIES),
                   help="policy specs, e.g. aria 'aria:tau=0.2' rc (aria_zscore = the previous default)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--se_reps", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="a small grid in seconds (smoke test)")
    p.add_argument("--tag", default="")
    p.add_argument("--out_dir", default=None)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.se_reps, args.seeds = 400, 20, args.seeds[:1]
        args.policies = [s for s in args.policies if s in ("aria", "aria_zscore", "rc")] or args.policies[:2]
    return args


def main(argv=None) -> dict:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    meta = header(argv, "calibration.py")
    todo = jobs(args)
    t0 = time.time()
    if args.workers > 1:
        with ProcessPoolExecutor(args.workers) as ex:
            results = list(ex.map(run_job, todo, chunksize=1))
    else:
        results = [run_job(j) for j in todo]
    tables = summarise(results, args.policies)
    for name, text in tables.items():
        print(f"\n### {name}\n\n{text}")
    payload = {**meta, "seconds": time.time() - t0, "loadavg_end": loadavg(), "args": vars(args),
               "results": results, "tables": tables}
    name = "calibration" + ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    path = write_json(name, payload, args.out_dir)
    print(f"\n{len(results)} runs in {payload['seconds']:.0f} s; wrote {os.path.relpath(path)}")
    payload["missed"] = missed(tables)
    for line in payload["missed"]:
        print(f"MISSED by the default: {line}")
    return payload


if __name__ == "__main__":
    sys.exit(1 if main()["missed"] else 0)
