"""Quality benchmark: does ARIA beat Random Conditioning on unseen and rare regions, in miniature?

A tiny text-conditioned UNet teacher (8x8x4 latents, cross-attention on MiniLM token states) is trained on
synthetic prompt-dependent latents of ALL PartiPrompts; a student (teacher copy with re-initialised
cross-attention) is distilled by output KD on x_t built from paired latents of *seen* prompts only, the
caption being swapped with p(t)=0.5 for a pool prompt drawn by the allocation policy under test. Policies
share every random stream (paired batch, t, noise, swap coins, sampler uniforms); only the prompt draw
differs. The student is scored on held-out prompts (20% of every group) against the teacher.

    python benchmarks/quality.py --quick                # <= 5 min on 2 cores
    python benchmarks/quality.py                        # full run (<= 60 min on 2 cores)
    python benchmarks/quality.py --experiments clusters --policies aria "aria:tau=0.5" rc oracle \
        --seeds 100 101 --tag ablation                  # ablations on unreported seeds

Policy specs: a name (rc, region_uniform, static, doremi, exp3, aria, oracle) optionally followed by
`:key=value,...`; keys go to the policy (alpha, tau, floor, damping, warmup_steps, form, ...), to the tracker
(half_life, normalize_timesteps, prior_strength, num_timestep_bins), or to the run (feed=all|swapped, default all as in the library;
K=<regions of the sampler, by spherical k-means of the pool>).

Writes benchmarks/results/quality[_<tag>].json and PNG plots beside it; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as _common does

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
if REPO not in sys.path:
    sys.path.insert(0, REPO)
if HERE not in sys.path:
    sys.path.insert(0, HERE)

from diffusers_aria.allocation import AllocationPolicy, make_policy  # noqa: E402
from diffusers_aria.callback import ARIACallback  # noqa: E402
from diffusers_aria.conditioning import SwapSchedule  # noqa: E402
from diffusers_aria.embedded.tiny_teacher import tiny_scheduler  # noqa: E402
from diffusers_aria.regions import spherical_kmeans  # noqa: E402
from diffusers_aria.sampler import AdaptiveRegionSampler  # noqa: E402
from diffusers_aria.tracker import DiscrepancyTracker  # noqa: E402

from _common import split_spec, tracker_keys  # noqa: E402
from _miniature import (  # noqa: E402
    TextStates,
    encode_prompts,
    fingerprint,
    load_parti,
    make_student,
    synthetic_latents,
    text_sensitivity,
    train_or_load_teacher,
)

KINDS = ("seen", "unseen", "rare")
ALL_POLICIES = ("rc", "region_uniform", "static", "doremi", "exp3", "aria", "oracle")
TRACKER_KEYS = tracker_keys()
RUN_KEYS = {"feed", "K"}


def log(msg: str) -> None:
    print(msg, flush=True)


# ------------------------------------------------------------------------------------------ policies
class FixedGroupOracle(AllocationPolicy):
    """Group-aware oracle: a third of the draws each to seen, unseen and rare prompts (size-proportional
    within a group); groups absent from the design share the mass equally among those present."""

    name = "oracle"

    def __init__(self, sizes, region_kind) -> None:
        self.region_kind = np.asarray(region_kind)
        super().__init__(sizes)

    def initial_probabilities(self) -> np.ndarray:
        p = np.zeros(self.num_regions)
        present = [k for k in KINDS if (self.region_kind == k).any()]
        for k in present:
            m = self.region_kind == k
            p[m] = self.sizes[m] / self.sizes[m].sum() / len(present)
        return p


def parse_spec(spec: str) -> tuple[str, dict, dict, dict]:
    name, settings = split_spec(spec)
    pol, trk, run = {}, {}, {"feed": "all", "K": None}  # the library default: every sample feeds the tracker
    for k, val in settings.items():
        if k == "normalize_timesteps":
            val = bool(val)
        (trk if k in TRACKER_KEYS else run if k in RUN_KEYS else pol)[k] = val
    if name not in ALL_POLICIES:
        raise SystemExit(f"unknown policy {name!r}; choose from {', '.join(ALL_POLICIES)}")
    return name, pol, trk, run


# ------------------------------------------------------------------------------------------ design
def make_design(experiment: str, groups: np.ndarray, group_names: list[str], args, rng_seed: int) -> dict:
    """Which groups are seen / unseen / rare, the held-out split, the pool and the paired set."""
    n_groups = int(groups.max()) + 1
    rng = np.random.default_rng(rng_seed)
    sizes = np.bincount(groups, minlength=n_groups)
    kinds = np.array(["seen"] * n_groups, dtype=object)
    if experiment != "control":
        # unseen/rare groups: a seeded choice among groups large enough to keep >= 2 held-out prompts
        eligible = [g for g in rng.permutation(n_groups) if sizes[g] >= max(10, args.rare_size + 4)]
        if args.unseen_choice == "smallest":  # underrepresented: the smallest groups
            eligible = sorted(eligible, key=lambda g: sizes[g])
        for g in eligible[:args.num_unseen]:
            kinds[g] = "unseen"
        for g in eligible[args.num_unseen:args.num_unseen + args.num_rare]:
            kinds[g] = "rare"
    heldout, pool = [], []
    for g in range(n_groups):
        members = rng.permutation(np.flatnonzero(groups == g))
        frac = args.heldout_frac
        if kinds[g] == "unseen" and args.unseen_heldout_frac is not None:
            frac = args.unseen_heldout_frac
        n_h = max(1, int(round(frac * len(members))))
        heldout.extend(members[:n_h].tolist())
        rest = members[n_h:]
        if kinds[g] == "rare":
            rest = rest[:args.rare_size]
        pool.extend(rest.tolist())
    heldout, pool = np.sort(heldout), np.sort(pool)
    paired = np.array([i for i in pool if kinds[groups[i]] != "unseen"])
    return {"groups": groups, "group_names": group_names, "kinds": kinds, "heldout": heldout, "pool": pool,
            "paired": paired}


def sampler_regions(design: dict, emb: np.ndarray, K: int | None, seed: int) -> np.ndarray:
    """Region id of every pool prompt: the design's groups (default) or a K-means partition of the pool."""
    pool = design["pool"]
    if K is None:
        g = design["groups"][pool]
    else:
        _, g = spherical_kmeans(emb[pool], int(K), seed=seed, method="sklearn")
    _, ids = np.unique(g, return_inverse=True)
    return ids.astype(np.int64)


# ------------------------------------------------------------------------------------------ evaluation
class Evaluator:
    """Fixed held-out (prompt, t, noise) triples; the teacher's eps is computed once."""

    def __init__(self, teacher, tokens, latents, design, t_grid, seed: int = 777, batch: int = 512):
        self.design, self.t_grid, self.batch = design, np.asarray(t_grid), batch
        self.tokens = tokens
        h = design["heldout"]
        g = torch.Generator().manual_seed(seed)
        self.prompt = np.repeat(h, len(t_grid))
        self.t = torch.as_tensor(np.tile(self.t_grid, len(h)), dtype=torch.long)
        x0 = latents[torch.as_tensor(self.prompt)]
        noise = torch.randn(x0.shape, generator=g)
        self.x = tiny_scheduler().add_noise(x0, noise, self.t)
        self.group = design["groups"][self.prompt]
        self.kind = design["kinds"][self.group]
        self.t_eps = self._eps(teacher, np.arange(len(self.prompt)))
        self.den = (self.t_eps ** 2).flatten(1).sum(1).numpy()
        self.curve_idx = np.flatnonzero(self.kind != "seen")
        if self.curve_idx.size == 0:
            self.curve_idx = np.arange(len(self.prompt))

    @torch.no_grad()
    def _eps(self, unet, idx) -> torch.Tensor:
        out = []
        for s in range(0, len(idx), self.batch):
            b = idx[s:s + self.batch]
            out.append(self.tokens(unet, self.x[b], self.t[b], self.prompt[b]))
        return torch.cat(out)

    def num(self, student, idx) -> np.ndarray:
        was = student.training
        student.eval()
        e = self._eps(student, idx)
        student.train(was)
        return ((e - self.t_eps[idx]) ** 2).flatten(1).sum(1).numpy()

    @staticmethod
    def _ratio(num, den, m) -> float:
        return float(num[m].sum() / den[m].sum()) if m.any() else float("nan")

    def full(self, student) -> dict:
        idx = np.arange(len(self.prompt))
        num, den = self.num(student, idx), self.den
        out = {"overall": self._ratio(num, den, idx >= 0)}
        for k in KINDS:
            out[k] = self._ratio(num, den, self.kind == k)
        per_group = {str(g): self._ratio(num, den, self.group == g) for g in np.unique(self.group)}
        out["worst_region"] = max(per_group.values())
        out["per_region"] = per_group
        out["per_t"] = {str(int(t)): self._ratio(num, den, self.t.numpy() == t) for t in self.t_grid}
        out["per_t_kind"] = {k: {str(int(t)): self._ratio(num, den, (self.t.numpy() == t) & (self.kind == k))
                                 for t in self.t_grid} for k in KINDS if (self.kind == k).any()}
        return out

    def curve_point(self, student) -> dict:
        idx = self.curve_idx
        num, den = self.num(student, idx), self.den[idx]
        kind = self.kind[idx]
        return {k: self._ratio(num, den, kind == k) for k in KINDS if (kind == k).any()}


# ------------------------------------------------------------------------------------------ one run
def run_one(spec: str, seed: int, ctx: dict, args) -> dict:
    name, pol_kw, trk_kw, run_kw = parse_spec(spec)
    design, tokens, latents, teacher, ev = ctx["design"], ctx["tokens"], ctx["latents"], ctx["teacher"], ctx["eval"]
    pool, paired, groups, kinds = design["pool"], design["paired"], design["groups"], design["kinds"]
    reg = sampler_regions(design, ctx["emb"], run_kw["K"], args.cluster_seed)
    K = int(reg.max()) + 1
    sizes = np.bincount(reg, minlength=K)
    region_of_global = np.full(len(groups), -1, dtype=np.int64)
    region_of_global[pool] = reg
    region_kind = np.array([kinds[groups[pool[reg == k][0]]] for k in range(K)], dtype=object)
    if name == "oracle":
        policy = FixedGroupOracle(sizes, region_kind)
    else:
        policy = make_policy(name, sizes, **pol_kw)
    tracker = DiscrepancyTracker(K, **trk_kw)  # the library defaults unless the spec says otherwise
    sampler = AdaptiveRegionSampler(reg, seed=seed)
    cb = ARIACallback(None, sampler, tracker, policy, log_every=0, register_hooks=False)
    swap = SwapSchedule(kind="constant", value=args.swap_p)
    init_seed = seed if args.student_init_per_seed else None
    student = make_student(teacher, init_seed, args.student_init, args.student_rank)
    opt = torch.optim.AdamW(student.parameters(), lr=args.lr, weight_decay=0.0)
    decay = float(args.eval_ema)
    if decay > 0:  # evaluate an EMA of the student's weights: the last iterate's SGD noise averaged out
        import copy

        scored = copy.deepcopy(student).requires_grad_(False)
        params, ema_params = list(student.parameters()), list(scored.parameters())
    else:
        scored = student
    scheduler = tiny_scheduler()
    B = args.batch
    pool_t = torch.as_tensor(pool)
    shares = {k: np.zeros(args.steps) for k in KINDS}
    swapped_total = np.zeros(args.steps)
    curve = []
    t0 = time.time()
    for step in range(args.steps):
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)  # shared across policies
        pi = torch.as_tensor(paired)[torch.randint(0, len(paired), (B,), generator=g)]
        t = torch.randint(0, 1000, (B,), generator=g)
        x0 = latents[pi] + args.target_noise * torch.randn((B,) + tuple(latents.shape[1:]), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        coins = torch.rand(B, generator=g) < swap(t).float()
        x = scheduler.add_noise(x0, noise, t)
        drawn, _ = sampler.draw(step, B)  # only this differs between policies
        cond = torch.where(coins, pool_t[torch.as_tensor(drawn)], pi)
        with torch.no_grad():
            e_t = tokens(teacher, x, t, cond)
        e_s = tokens(student, x, t, cond)
        per = ((e_s - e_t) ** 2).flatten(1).mean(1)
        loss = per.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if decay > 0:
            with torch.no_grad():
                torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        c = cond.numpy()
        sw = coins.numpy()
        for k in KINDS:
            shares[k][step] = float((kinds[groups[c[sw]]] == k).sum())
        swapped_total[step] = sw.sum()
        cb.on_step_end(step, torch.as_tensor(region_of_global[c]), per.detach(), t,
                       mask=coins if run_kw["feed"] == "swapped" else None)
        if args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps):
            curve.append({"step": step + 1, **ev.curve_point(scored)})
    train_s = time.time() - t0
    final = ev.full(scored)
    w = args.share_window
    nwin = math.ceil(args.steps / w)
    share_curve = {k: [float(shares[k][i * w:(i + 1) * w].sum() / max(swapped_total[i * w:(i + 1) * w].sum(), 1))
                       for i in range(nwin)] for k in KINDS}
    return {
        "policy": spec, "seed": seed, "final": final, "curve": curve, "train_seconds": train_s,
        "draw_share_total": {k: float(shares[k].sum() / max(swapped_total.sum(), 1)) for k in KINDS},
        "draw_share_curve": share_curve, "share_window": w,
        "final_probabilities": [float(p) for p in sampler.probabilities],
        "region_kind": region_kind.tolist(), "region_sizes": sizes.tolist(),
        "final_estimates": [float(e) for e in tracker.estimates()],
        "policy_config": {k: (v if isinstance(v, (int, float, str, bool, type(None))) else str(v))
                          for k, v in (policy.config().items() if name != "oracle" else [])},
    }


# ------------------------------------------------------------------------------------------ summaries
METRICS = ("overall", "worst_region", "seen", "unseen", "rare")


def summarise(runs: list[dict], policies: list[str], seeds: list[int]) -> dict:
    """Paired ratios to RC per seed (mean, sd), oracle-gain shares, steps to RC's final unseen value."""
    by = {(r["policy"], r["seed"]): r for r in runs}
    rc_spec = next((p for p in policies if p == "rc"), None)
    out: dict[str, Any] = {}
    for p in policies:
        if not any((p, s) in by for s in seeds):
            continue
        row: dict[str, Any] = {}
        for m in METRICS:
            vals = [by[(p, s)]["final"][m] for s in seeds if (p, s) in by]
            row[m] = {"mean": float(np.mean(vals)) if vals else None,
                      "sd": float(np.std(vals, ddof=1)) if len(vals) > 1 else None}
            if rc_spec:
                ratios = [by[(p, s)]["final"][m] / by[(rc_spec, s)]["final"][m] for s in seeds
                          if (p, s) in by and (rc_spec, s) in by and by[(rc_spec, s)]["final"][m] > 0]
                ratios = [x for x in ratios if np.isfinite(x)]
                row[m]["ratio_to_rc"] = float(np.mean(ratios)) if ratios else None
                row[m]["ratio_sd"] = float(np.std(ratios, ddof=1)) if len(ratios) > 1 else None
                row[m]["ratios"] = ratios
        shares = {k: float(np.mean([by[(p, s)]["draw_share_total"][k] for s in seeds if (p, s) in by]))
                  for k in KINDS}
        row["draw_share"] = shares
        # steps to reach RC's final unseen value (same seed), from the curve
        if rc_spec:
            st = []
            for s in seeds:
                if (p, s) not in by or (rc_spec, s) not in by:
                    continue
                target = by[(rc_spec, s)]["final"].get("unseen")
                hit = [c["step"] for c in by[(p, s)]["curve"] if c.get("unseen") is not None
                       and target is not None and np.isfinite(target) and c["unseen"] <= target]
                st.append(hit[0] if hit else None)
            row["steps_to_rc_final_unseen"] = st
        out[p] = row
    if "oracle" in out and rc_spec:
        for row in out.values():
            for m in ("unseen", "rare"):
                o, r = out["oracle"][m].get("ratio_to_rc"), row[m].get("ratio_to_rc")
                row[m]["share_of_oracle_gain"] = (float((1 - r) / (1 - o)) if o is not None and r is not None
                                                  and abs(1 - o) > 1e-9 else None)
    return out


def validity(summary: dict) -> dict | None:
    if "oracle" not in summary or "rc" not in summary:
        return None
    u = summary["oracle"]["unseen"]
    if u.get("ratio_to_rc") is None:
        return None
    gain = 1 - u["ratio_to_rc"]
    sd = u.get("ratio_sd") or float("nan")
    return {"oracle_unseen_gain": gain, "paired_ratio_sd": sd, "gain_over_sd": gain / sd if sd else None,
            "valid": bool(gain >= 0.15 and np.isfinite(sd) and gain >= 3 * sd)}


def format_table(summary: dict, title: str) -> str:
    lines = [f"### {title}", "",
             "| policy | overall | worst region | seen | unseen | rare | unseen share of oracle gain | "
             "rare share of oracle gain | draws seen/unseen/rare |",
             "|---|---|---|---|---|---|---|---|---|"]

    def cell(d):
        r, sd, m = d.get("ratio_to_rc"), d.get("ratio_sd"), d.get("mean")
        if m is None or (isinstance(m, float) and math.isnan(m)):
            return "-"
        if r is None:
            return f"{m:.4f}"
        return f"{m:.4f} ({r:.3f}±{sd:.3f})" if sd is not None else f"{m:.4f} ({r:.3f})"

    for p, row in summary.items():
        su, sr = row["unseen"].get("share_of_oracle_gain"), row["rare"].get("share_of_oracle_gain")
        ds = row["draw_share"]
        lines.append(f"| {p} | " + " | ".join(cell(row[m]) for m in METRICS)
                     + f" | {'-' if su is None else f'{su:.0%}'} | {'-' if sr is None else f'{sr:.0%}'}"
                     + f" | {ds['seen']:.2f}/{ds['unseen']:.2f}/{ds['rare']:.2f} |")
    lines.append("")
    lines.append("Cells: held-out normalised eps-MSE (student vs teacher), mean over seeds; in brackets the "
                 "paired ratio to RC (mean ± sd over seeds).")
    return "\n".join(lines)


def plot(results: dict, path_prefix: str) -> list[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    for exp, block in results["experiments"].items():
        runs = block["runs"]
        pols = block["policies"]
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        for p in pols:
            rs = [r for r in runs if r["policy"] == p]
            if not rs:
                continue
            for ax, k in zip(axes[:2], ("unseen", "rare")):
                pts = [[c.get(k, np.nan) for c in r["curve"]] for r in rs]
                if rs[0]["curve"] and not all(np.isnan(x).all() for x in pts):
                    ax.plot([c["step"] for c in rs[0]["curve"]], np.nanmean(pts, 0), label=p)
                    ax.set_title(f"{exp}: held-out {k} nMSE")
            w = rs[0]["share_window"]
            sh = np.mean([r["draw_share_curve"]["unseen"] for r in rs], 0)
            axes[2].plot((np.arange(len(sh)) + 1) * w, sh, label=p)
            axes[2].set_title(f"{exp}: share of swapped draws to unseen")
        for ax in axes:
            ax.set_xlabel("step")
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        fig.tight_layout()
        path = f"{path_prefix}_{exp}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written


def report(paths: list[str]) -> str:
    """Markdown tables (teacher, validity, per-experiment summaries, per-t) from result JSON files.

    Runs of the same experiment in several files (e.g. seeds split over processes) are merged; a
    (policy, seed) pair present twice is taken from the first file.
    """
    out = []
    merged: dict[str, dict] = {}
    res = None
    for path in paths:
        with open(path) as fh:
            r = json.load(fh)
        if res is None or (not res["region_stability"]["ari_vs_seed0"] and r["region_stability"]["ari_vs_seed0"]):
            res = r
        out.append(f"- `{os.path.relpath(path, REPO)}`: `{r['command']}` "
                   f"({r.get('elapsed_seconds', float('nan')) / 60:.1f} min)")
        for exp, block in r["experiments"].items():
            m = merged.setdefault(exp, {"policies": list(block["policies"]), "runs": [], "design": block["design"]})
            have = {(x["policy"], x["seed"]) for x in m["runs"]}
            m["runs"].extend(x for x in block["runs"] if (x["policy"], x["seed"]) not in have)
            m["policies"] += [p for p in block["policies"] if p not in m["policies"]]
    if res is not None:
        out.append("")
        tb = res["teacher"]
        src = "the built-in pool" if res.get("prompt_source") == "builtin" else "PartiPrompts"
        out.append(f"{res['num_prompts']} prompts from {src}. Teacher text sensitivity E||eps(x,t,c1)-eps(x,t,c2)||^2/E||eps||^2 beside p(t):\n")
        out.append("| t | " + " | ".join(tb["text_sensitivity"]) + " |")
        out.append("|---|" + "---|" * len(tb["text_sensitivity"]))
        out.append("| sensitivity | " + " | ".join(f"{v:.3f}" for v in tb["text_sensitivity"].values()) + " |")
        out.append("| p(t) | " + " | ".join(f"{v:.2f}" for v in tb["swap_probability"].values()) + " |\n")
        rs = res["region_stability"]
        out.append(f"Region stability: ARI of the K-means partition vs seed 0 over other clustering seeds "
                   f"{[round(a, 3) for a in rs['ari_vs_seed0']]} (mean {rs['ari_mean'] or float('nan'):.3f}); "
                   f"ARI clusters vs PartiPrompts categories {rs['ari_clusters_vs_categories']:.3f}.\n")
    if True:
        for exp, block in merged.items():
            seeds = sorted({r["seed"] for r in block["runs"]})
            summ = summarise(block["runs"], block["policies"], seeds)
            out.append(f"Design [{exp}]: {block['design']}\n")
            out.append(format_table(summ, f"{exp}: seeds {seeds}, {res['args']['steps']} steps"))
            v = validity(summ)
            if v:
                out.append(f"\nValidity check [{exp}]: oracle beats RC on unseen by {v['oracle_unseen_gain']:.1%}, "
                           f"paired-ratio sd {v['paired_ratio_sd']:.3f} ({(v['gain_over_sd'] or float('nan')):.1f}x sd) -> "
                           f"**{'VALID' if v['valid'] else 'NOT VALID'}** (needs >= 15% and >= 3x sd)\n")
            out.append("Allocation diagnostics at the end of training (mean over seeds): spread (sd across regions) "
                       "of the tracker's estimates, mean estimate of unseen / rare / seen regions, range of p_k/prior_k:\n")
            out.append("| policy | estimate sd | est. unseen | est. rare | est. seen | min p/prior | max p/prior |")
            out.append("|---|---|---|---|---|---|---|")
            for p in block["policies"]:
                rr = [x for x in block["runs"] if x["policy"] == p]
                if not rr:
                    continue
                sds, eu, er, es, lo, hi = [], [], [], [], [], []
                for x in rr:
                    e = np.asarray(x["final_estimates"])
                    kind = np.asarray(x["region_kind"])
                    prior = np.asarray(x["region_sizes"], float) / np.sum(x["region_sizes"])
                    q = np.asarray(x["final_probabilities"]) / prior
                    sds.append(e.std())
                    eu.append(e[kind == "unseen"].mean() if (kind == "unseen").any() else np.nan)
                    er.append(e[kind == "rare"].mean() if (kind == "rare").any() else np.nan)
                    es.append(e[kind == "seen"].mean())
                    lo.append(q.min())
                    hi.append(q.max())
                out.append(f"| {p} | {np.mean(sds):.3f} | {np.mean(eu):.3f} | {np.mean(er):.3f} | {np.mean(es):.3f} | "
                           f"{np.mean(lo):.2f} | {np.mean(hi):.2f} |")
            out.append("")
            steps = {p: row.get("steps_to_rc_final_unseen") for p, row in summ.items()}
            out.append("Steps to reach RC's final unseen value (per seed; None = never): "
                       + "; ".join(f"{p}: {v}" for p, v in steps.items()) + "\n")
            # per-t unseen ratio to RC
            by = {(r["policy"], r["seed"]): r for r in block["runs"]}
            if "rc" in block["policies"]:
                ts = list(block["runs"][0]["final"]["per_t"])
                for kind in ("overall", "unseen", "rare"):
                    rows = []
                    for p in block["policies"]:
                        vals = []
                        for t in ts:
                            rr = []
                            for sd in seeds:
                                if (p, sd) in by and ("rc", sd) in by:
                                    a = by[(p, sd)]["final"]["per_t"] if kind == "overall" else by[(p, sd)]["final"]["per_t_kind"].get(kind, {})
                                    b = by[("rc", sd)]["final"]["per_t"] if kind == "overall" else by[("rc", sd)]["final"]["per_t_kind"].get(kind, {})
                                    if t in a and t in b and b[t] > 0:
                                        rr.append(a[t] / b[t])
                            vals.append(f"{np.mean(rr):.3f}" if rr else "-")
                        rows.append(f"| {p} | " + " | ".join(vals) + " |")
                    if all(r.count("-") >= len(ts) for r in rows):
                        continue
                    out.append(f"Per-t paired ratio to RC, {kind} (t bins):\n")
                    out.append("| policy | " + " | ".join(ts) + " |")
                    out.append("|---|" + "---|" * len(ts))
                    out.extend(rows)
                    out.append("")
                rcrow = [by[("rc", sd)]["final"]["per_t_kind"] for sd in seeds if ("rc", sd) in by]
                if rcrow:
                    out.append("RC's own held-out nMSE per t (mean over seeds):\n")
                    out.append("| kind | " + " | ".join(ts) + " |")
                    out.append("|---|" + "---|" * len(ts))
                    for kind in rcrow[0]:
                        out.append(f"| {kind} | " + " | ".join(f"{np.mean([r[kind][t] for r in rcrow]):.4f}" for t in ts) + " |")
                    out.append("")
    # merged summaries and plots beside the inputs
    if merged:
        base = os.path.splitext(os.path.abspath(paths[0]))[0] + "_report"
        summary = {}
        for exp, block in merged.items():
            seeds = sorted({r["seed"] for r in block["runs"]})
            sm = summarise(block["runs"], block["policies"], seeds)
            summary[exp] = {"seeds": seeds, "summary": sm, "validity": validity(sm), "design": block["design"]}
        with open(base + ".json", "w") as fh:
            json.dump({"inputs": [os.path.relpath(p, REPO) for p in paths], "experiments": summary}, fh, indent=1)
        written = plot({"experiments": merged}, base)
        out.append("Wrote " + ", ".join(os.path.relpath(x, REPO) for x in [base + ".json"] + written))
    return "\n".join(out)


# ------------------------------------------------------------------------------------------ main
def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parti_path", default=os.path.join(REPO, "..", "shared", "data", "PartiPrompts.tsv"))
    ap.add_argument("--prompts", default="parti", choices=["parti", "builtin"],
                    help="PartiPrompts (categories from its file) or the built-in pool (its groups as categories)")
    ap.add_argument("--builtin_size", type=int, default=1600, help="prompts drawn from the built-in pool")
    ap.add_argument("--quick", action="store_true", help="<= 5 minutes: fewer steps, seeds and policies")
    ap.add_argument("--experiments", nargs="+", default=None, choices=["clusters", "control", "categories"])
    ap.add_argument("--policies", nargs="+", default=None, help="policy specs for the clusters experiment")
    ap.add_argument("--control_policies", nargs="+", default=None)
    ap.add_argument("--category_policies", nargs="+", default=None)
    ap.add_argument("--seeds", nargs="+", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--student_init", default="text_kv", choices=["zero_out", "reset", "text_kv", "lowrank_kv", "pooled"])
    ap.add_argument("--student_init_per_seed", type=int, default=0,
                    help="1: re-initialise the student differently for every seed; 0: one fixed student checkpoint "
                         "(as a pruned-teacher student is), so seeds vary the training streams only")
    ap.add_argument("--student_rank", type=int, default=4, help="rank of the lowrank_kv student's text projections")
    ap.add_argument("--pooled_text", type=int, default=1,
                    help="1: teacher and student also take the pooled sentence embedding (re-initialised in the student)")
    ap.add_argument("--swap_p", type=float, default=0.5)
    ap.add_argument("--target_noise", type=float, default=0.05)
    ap.add_argument("--num_regions", type=int, default=16, help="K of the embedding clusters (groups)")
    ap.add_argument("--cluster_seed", type=int, default=0)
    ap.add_argument("--split_seed", type=int, default=0, help="which groups are unseen/rare; held-out split")
    ap.add_argument("--num_unseen", type=int, default=2)
    ap.add_argument("--unseen_choice", default="random", choices=["random", "smallest"],
                    help="which eligible groups become unseen, then rare: a seeded random choice or the smallest")
    ap.add_argument("--num_rare", type=int, default=2)
    ap.add_argument("--rare_size", type=int, default=6)
    ap.add_argument("--heldout_frac", type=float, default=0.2)
    ap.add_argument("--unseen_heldout_frac", type=float, default=0.7,
                    help="held-out share of each unseen group; the rest stays in the pool (design v2: 0.5)")
    ap.add_argument("--eval_t", type=int, nargs="+", default=[50, 150, 250, 350, 450, 550, 650, 750, 850, 950])
    ap.add_argument("--eval_every", type=int, default=None)
    ap.add_argument("--eval_ema", type=float, default=0.98,
                    help="score an EMA of the student's weights with this decay (0: the last iterate)")
    ap.add_argument("--share_window", type=int, default=25)
    ap.add_argument("--teacher_steps", type=int, default=None)
    ap.add_argument("--teacher_width", type=int, default=16)
    ap.add_argument("--num_anchors", type=int, default=64)
    ap.add_argument("--anchor_temperature", type=float, default=0.05)
    ap.add_argument("--max_prompts", type=int, default=None, help="subsample the prompt file (tests)")
    ap.add_argument("--ari_seeds", type=int, default=5, help="clustering seeds for the region-stability ARI")
    ap.add_argument("--cache_dir", default=os.path.join(HERE, "results", "cache"))
    ap.add_argument("--out_dir", default=os.path.join(HERE, "results"))
    ap.add_argument("--tag", default=None, help="output name quality_<tag>.json (default: quick or full)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=None,
                    help="(experiment, seed) runs in this many single-threaded processes at once (default: 2, quick: 1)")
    ap.add_argument("--no_plots", action="store_true")
    args = ap.parse_args(argv)
    q = args.quick
    if args.experiments is None:
        args.experiments = ["clusters"] if q else ["clusters", "control", "categories"]
    if args.policies is None:
        args.policies = ["rc", "region_uniform", "aria", "oracle"] if q else list(ALL_POLICIES)
    if args.control_policies is None:
        args.control_policies = ["rc", "aria"]
    if args.category_policies is None:
        args.category_policies = ["rc", "region_uniform", "aria", "oracle"]
    if args.seeds is None:
        args.seeds = [0, 1] if q else [0, 1, 2, 3, 4]
    if args.steps is None:
        args.steps = 150 if q else 300
    if args.eval_every is None:
        args.eval_every = 25
    if args.teacher_steps is None:
        args.teacher_steps = 2000
    if args.tag is None:
        args.tag = "quick" if q else "full"
    if args.workers is None:
        args.workers = 1 if q else 2
    return args


def _parallel_runs(args, argv_list: list[str]) -> dict:
    """Run every (experiment, seed) as its own single-threaded subprocess, `args.workers` at a time, and
    collect their runs by (experiment, seed, policy). The parent has trained/cached the teacher already."""
    import subprocess

    drop = {"--workers", "--seeds", "--experiments", "--tag", "--out_dir", "--ari_seeds", "--no_plots", "--quick",
            "--steps", "--teacher_steps", "--eval_every", "--policies", "--control_policies", "--category_policies"}
    base, skip = [], False
    for a in argv_list:
        if a.startswith("--"):
            skip = a in drop
        if not skip:
            base.append(a)
    parts = os.path.join(args.out_dir, f"quality_{args.tag}_parts")
    os.makedirs(parts, exist_ok=True)
    jobs = [(e, s) for s in args.seeds for e in args.experiments]
    pending, running, out = list(jobs), [], {}
    fixed = ["--steps", str(args.steps), "--teacher_steps", str(args.teacher_steps), "--eval_every", str(args.eval_every),
             "--policies", *args.policies, "--control_policies", *args.control_policies,
             "--category_policies", *args.category_policies]
    while pending or running:
        while pending and len(running) < args.workers:
            e, s = pending.pop(0)
            tag = f"{e}_s{s}"
            cmd = [sys.executable, os.path.abspath(__file__), *base, *fixed, "--experiments", e, "--seeds", str(s),
                   "--tag", tag, "--out_dir", parts, "--ari_seeds", "1", "--no_plots", "--workers", "1"]
            logf = open(os.path.join(parts, f"{tag}.log"), "w")
            running.append((e, s, tag, subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT), logf))
        time.sleep(1.0)
        for item in list(running):
            e, s, tag, proc, logf = item
            if proc.poll() is None:
                continue
            logf.close()
            running.remove(item)
            if proc.returncode != 0:
                raise SystemExit(f"worker {tag} failed (exit {proc.returncode}); see {logf.name}")
            with open(os.path.join(parts, f"quality_{tag}.json")) as fh:
                for r in json.load(fh)["experiments"][e]["runs"]:
                    out[(e, s, r["policy"])] = r
            log(f"  worker {tag} done ({len(jobs) - len(pending) - len(running)}/{len(jobs)})")
    return out


def main(argv=None) -> dict:
    import warnings

    warnings.filterwarnings("ignore", message="Mean of empty slice")
    warnings.filterwarnings("ignore", message="invalid value encountered")
    argv_list = list(sys.argv[1:] if argv is None else argv)
    if argv_list[:1] == ["--report"]:
        text = report(argv_list[1:])
        print(text)
        return {"report": text}
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    os.makedirs(args.out_dir, exist_ok=True)
    os.makedirs(args.cache_dir, exist_ok=True)
    gi = os.path.join(args.cache_dir, ".gitignore")
    if not os.path.exists(gi):
        with open(gi, "w") as fh:
            fh.write("*\n")
    if args.prompts == "builtin":  # the project's generated pool; its 12 groups play the categories' part
        from diffusers_aria.embedded.builtin_pool import builtin_prompt_records

        recs = builtin_prompt_records(args.builtin_size, seed=0)
        prompts, cats = [r["prompt"] for r in recs], [r["group"] for r in recs]
        log(f"{len(prompts)} prompts from the built-in pool generator")
    else:
        prompts, cats = load_parti(args.parti_path, args.max_prompts)
        log(f"{len(prompts)} prompts from {args.parti_path}")
    tok, emb = encode_prompts(prompts, args.cache_dir)
    tokens = TextStates(tok, torch.from_numpy(emb) if args.pooled_text else None)
    latents = synthetic_latents(emb, num_anchors=args.num_anchors, temperature=args.anchor_temperature)
    pkey = fingerprint(prompts)
    teacher_steps = args.teacher_steps
    teacher = None
    if args.quick:  # reuse the full teacher when cached, otherwise train a smaller one
        teacher, tinfo = train_or_load_teacher(args.cache_dir, tokens, latents, pkey, steps=teacher_steps,
                                               width=args.teacher_width, log=log, only_if_cached=True)
        if teacher is None:
            teacher_steps = min(teacher_steps, 800)
            log(f"quick mode: no cached {args.teacher_steps}-step teacher, training a {teacher_steps}-step one")
    if teacher is None:
        teacher, tinfo = train_or_load_teacher(args.cache_dir, tokens, latents, pkey, steps=teacher_steps,
                                               width=args.teacher_width, log=log)
    log(f"teacher: {'cached' if tinfo.cached else 'trained'} {tinfo.path} ({teacher_steps} steps, "
        f"{tinfo.train_seconds:.0f}s, final loss {tinfo.final_loss:.4f})")
    sens_t = [100, 300, 500, 700, 900]
    sens = text_sensitivity(teacher, tokens, latents, sens_t, num_pairs=64 if args.max_prompts else 128)
    swap = SwapSchedule(kind="constant", value=args.swap_p)
    teacher_block = {"path": os.path.relpath(tinfo.path, REPO), "cached": tinfo.cached, "train_steps": teacher_steps,
                     "train_seconds": tinfo.train_seconds, "final_loss": tinfo.final_loss,
                     "text_sensitivity": {str(t): v for t, v in sens.items()},
                     "swap_probability": {str(t): float(swap(torch.tensor([t]))[0]) for t in sens_t}}
    log("teacher text sensitivity vs p(t): " + ", ".join(f"t={t}: {v:.3f} (p={args.swap_p})" for t, v in sens.items()))

    # groups
    _, clusters = spherical_kmeans(emb, args.num_regions, seed=args.cluster_seed, method="sklearn")
    clusters = np.unique(clusters, return_inverse=True)[1].astype(np.int64)
    from sklearn.metrics import adjusted_rand_score

    aris = []
    for s in range(1, args.ari_seeds):
        _, c2 = spherical_kmeans(emb, args.num_regions, seed=args.cluster_seed + s, method="sklearn")
        aris.append(float(adjusted_rand_score(clusters, c2)))
    cat_names = sorted(set(cats))
    cat_ids = np.array([cat_names.index(c) for c in cats], dtype=np.int64)
    ari_cat = float(adjusted_rand_score(clusters, cat_ids))
    log(f"region stability: ARI across clustering seeds {np.round(aris, 3).tolist()}; ARI clusters vs categories {ari_cat:.3f}")

    results: dict[str, Any] = {
        "command": "python benchmarks/quality.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "args": {k: v for k, v in vars(args).items() if k not in ("cache_dir", "out_dir", "parti_path")},
        "num_prompts": len(prompts), "prompt_source": args.prompts, "teacher": teacher_block,
        "region_stability": {"ari_vs_seed0": aris, "ari_mean": float(np.mean(aris)) if aris else None,
                             "ari_clusters_vs_categories": ari_cat},
        "experiments": {},
    }
    out_json = os.path.join(args.out_dir, f"quality_{args.tag}.json")

    def write():
        results["elapsed_seconds"] = time.time() - t_start
        tmp = out_json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(results, fh, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
        os.replace(tmp, out_json)

    parallel = _parallel_runs(args, argv_list) if args.workers > 1 else None
    for exp in args.experiments:
        if exp == "categories":
            groups, names, pols = cat_ids, cat_names, args.category_policies
        else:
            groups, names = clusters, [f"cluster{k}" for k in range(int(clusters.max()) + 1)]
            pols = args.control_policies if exp == "control" else args.policies
        design = make_design(exp, groups, names, args, args.split_seed)
        if exp == "control":
            pols = [p for p in pols if not p.startswith("oracle")]
        ev = Evaluator(teacher, tokens, latents, design, args.eval_t)
        ctx = {"design": design, "tokens": tokens, "latents": latents, "teacher": teacher, "eval": ev, "emb": emb}
        kinds_of = {names[g]: design["kinds"][g] for g in range(len(names))}
        block = {"policies": pols, "seeds": args.seeds, "runs": [],
                 "design": {"group_kinds": kinds_of,
                            "pool_size": int(len(design["pool"])), "paired_size": int(len(design["paired"])),
                            "heldout_size": int(len(design["heldout"])),
                            "heldout_per_kind": {k: int((design["kinds"][groups[design["heldout"]]] == k).sum()) for k in KINDS},
                            "pool_per_kind": {k: int((design["kinds"][groups[design["pool"]]] == k).sum()) for k in KINDS}}}
        results["experiments"][exp] = block
        log(f"[{exp}] pool {block['design']['pool_size']}, paired {block['design']['paired_size']}, held-out "
            f"{block['design']['heldout_size']} {block['design']['heldout_per_kind']}; unseen "
            f"{[n for n, k in kinds_of.items() if k == 'unseen']}, rare {[n for n, k in kinds_of.items() if k == 'rare']}")
        for seed in args.seeds:
            for p in pols:
                r = parallel[(exp, seed, p)] if parallel is not None else run_one(p, seed, ctx, args)
                block["runs"].append(r)
                f = r["final"]
                log(f"  [{exp}] seed {seed} {p:<28} overall {f['overall']:.4f} seen {f['seen']:.4f} unseen "
                    f"{f['unseen']:.4f} rare {f['rare']:.4f} worst {f['worst_region']:.4f} ({r['train_seconds']:.0f}s)")
                block["summary"] = summarise(block["runs"], pols, [s for s in args.seeds if s <= seed])
                write()
        block["summary"] = summarise(block["runs"], pols, args.seeds)
        block["validity"] = validity(block["summary"])
        log("\n" + format_table(block["summary"], f"{exp} ({len(args.seeds)} seeds, {args.steps} steps)"))
        if block["validity"]:
            v = block["validity"]
            log(f"validity check [{exp}]: oracle beats RC on unseen by {v['oracle_unseen_gain']:.1%} "
                f"(paired-ratio sd {v['paired_ratio_sd']:.3f}, {v['gain_over_sd'] or float('nan'):.1f}x) -> "
                f"{'VALID' if v['valid'] else 'NOT VALID'} (needs >= 15% and >= 3x sd)")
        write()
    if not args.no_plots:
        results["plots"] = [os.path.relpath(p, REPO) for p in plot(results, os.path.join(args.out_dir, f"quality_{args.tag}"))]
    write()
    log(f"wrote {out_json} in {time.time() - t_start:.0f}s")
    return results


if __name__ == "__main__":
    main()
