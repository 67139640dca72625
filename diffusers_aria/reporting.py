"""Reports of an ARIA run, read from an `ARIACallback`'s state: the `aria/*` metrics, the JSON/Markdown
per-region summary, and the allocation plot.

Vocabulary: a region's *prompt share* is its fraction of the pool's prompts (what RC draws it with); a
policy's *prior* is its own starting allocation (`size**alpha` for ARIA).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

from .utils.atomic import atomic_save, atomic_write_json, atomic_write_text

ALLOCATION_PLOT = "aria_allocation.png"
REPORT_JSON = "aria_report.json"
REPORT_MARKDOWN = "aria_report.md"


def entropy(p: np.ndarray) -> float:
    q = p[p > 0]
    return float(-(q * np.log(q)).sum())


def effective_regions(p: np.ndarray) -> float:
    """exp(entropy): K for a uniform allocation, 1 when all draws go to one region."""
    return math.exp(entropy(p))


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    m = p > 0
    return float((p[m] * np.log(p[m] / q[m])).sum())


def metrics(cb) -> dict[str, float]:
    """`aria/...` scalars: entropy, effective regions, KL to the prompt-uniform prior, per-region values."""
    p = cb.sampler.probabilities
    h = entropy(p)
    out: dict[str, float] = {
        "aria/entropy": h,
        "aria/effective_regions": effective_regions(p),
        "aria/kl_to_prompt_share": kl_divergence(p, cb.policy.prompt_share),
        "aria/max_prob_ratio": float((p / cb.policy.prompt_share).max()),
        # ARIA: the prompt-share weighted sd of the credible excess it acts on (0: every difference is within
        # the noise, so the allocation stays at its prior), how many regions have one, and how many are held at
        # their prior because their boost showed no progress
        **({"aria/real_spread": float(np.sqrt(cb.policy.between_variance)),
            "aria/credible_regions": float(np.count_nonzero(cb.policy.scores > 0)),
            "aria/held_regions": float(cb.policy.reducibility.held.sum())}
           if hasattr(cb.policy, "reducibility") else {}),
        "aria/nonfinite_total": float(cb.tracker.num_nonfinite),
        "aria/tracker_updates": float(cb.tracker.num_updates),
    }
    if cb.tracker.num_regions <= cb.log_regions_max:
        est = cb.tracker.estimates()
        share = cb.sampler.draw_shares()
        for k in range(cb.tracker.num_regions):
            out[f"aria/prob/region_{k:03d}"] = float(p[k])
            out[f"aria/estimate/region_{k:03d}"] = float(est[k])
            out[f"aria/draw_share/region_{k:03d}"] = float(share[k])
    return out

def summary(cb) -> dict[str, Any]:
    """A JSON-ready summary: global metrics and a per-region table."""
    p = cb.sampler.probabilities
    est, unc, cnt = cb.tracker.estimates(), cb.tracker.uncertainty(), cb.tracker.counts()
    share = cb.sampler.draw_shares()
    regions = []
    for k in range(cb.tracker.num_regions):
        regions.append({
            "region": k,
            "name": cb.region_names[k] if cb.region_names else None,
            "size": int(cb.sampler.sizes[k]),
            "prompt_share": float(cb.policy.prompt_share[k]),
            "probability": float(p[k]),
            "estimate": float(est[k]),
            "uncertainty": float(unc[k]) if np.isfinite(unc[k]) else None,
            "effective_count": float(cnt[k]),
            "draw_share": float(share[k]),
        })
    return {
        "policy": cb.policy.name,
        "policy_config": {k: v for k, v in cb.policy.config().items() if isinstance(v, (int, float, str, type(None)))},
        "step": cb.last_step,
        "metrics": {k: v for k, v in metrics(cb).items() if "/region_" not in k},
        "regions": regions,
    }

def markdown_table(report: dict[str, Any], max_rows: int = 64) -> str:
    """The per-region table of a `summary`, hardest regions first, as Markdown."""
    s = report
    rows = sorted(s["regions"], key=lambda r: -r["estimate"])[:max_rows]
    lines = ["| region | size | prompt share | probability | estimate | draws |", "|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        label = f"{r['region']}" + (f" ({r['name']})" if r["name"] else "")
        lines.append(f"| {label} | {r['size']} | {r['prompt_share']:.4f} | {r['probability']:.4f} | "
                     f"{r['estimate']:.3f} | {r['draw_share']:.4f} |")
    return "\n".join(lines)

def plot_allocation(cb, path: str) -> str:
    """Allocation over time and the final estimates, with region names and a caption, as a PNG.

    Left: each region's sampling probability / its prompt share over training (one named line per
    region). Right: the tracker's discrepancy estimate per region with +-2 standard errors, the credible
    excess that ARIA actually uses (diamonds), and each region's final probability / prompt share
    printed above its bar. The caption says how the policy turns one into the other.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = cb.tracker.num_regions
    share = np.asarray(cb.policy.prompt_share, dtype=np.float64)
    names = [f"{j}" + (f" {cb.region_names[j]}" if cb.region_names and cb.region_names[j] else "")
             for j in range(k)]
    colours = (plt.get_cmap("tab20")(np.arange(k)) if k <= 20  # a listed map: one colour per index
               else plt.get_cmap("viridis")(np.arange(k) / max(k - 1, 1)))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 6.2), gridspec_kw={"width_ratios": [1, 1.15]})
    if cb.history_steps:
        ratio = np.stack(cb.history_probs) / share[None, :]
        for j in range(k):
            ax1.plot(cb.history_steps, ratio[:, j], lw=1.2, color=colours[j], label=names[j])
        if k > 20:  # too many for a legend: name the five highest and lowest at the end of their lines
            order = np.argsort(ratio[-1])
            for j in np.concatenate([order[:5], order[-5:]]):
                ax1.annotate(names[j], (cb.history_steps[-1], ratio[-1, j]), fontsize=6,
                             xytext=(3, 0), textcoords="offset points", va="center")
    ax1.axhline(1.0, color="k", lw=0.8, ls="--")
    ax1.set_xlabel("step")
    ax1.set_ylabel("sampling probability / prompt share  (1 = RC)")
    ax1.set_title(f"allocation over training ({cb.policy.name})", fontsize=10)
    if cb.history_steps and k <= 20:  # under the panel, where it hides no line
        ax1.legend(fontsize=7, ncol=4 if k > 8 else 2, loc="upper center", bbox_to_anchor=(0.5, -0.13),
                   title="region (main topic); the same colours at the right", title_fontsize=7, frameon=False)

    est, se = cb.tracker.estimates(), cb.tracker.uncertainty()
    err = np.where(np.isfinite(se), 2.0 * se, 0.0)
    x = np.arange(k)
    ax2.bar(x, est, yerr=err, color=colours, ecolor="k", capsize=2 if k <= 32 else 0)
    mean = cb.tracker.global_mean()
    ax2.axhline(mean, color="k", lw=0.8, ls="--")
    from matplotlib.patches import Patch

    handles = [Patch(color="0.75", label="estimate, +-2 standard errors")]
    credible, spread = None, None
    if getattr(cb.policy, "score", None) in ("sparse", "credible"):
        credible, spread = mean * (1.0 + cb.policy.scores), float(np.sqrt(cb.policy.between_variance))
        handles.append(ax2.scatter(x, credible, marker="D", s=22, color="k", zorder=3,
                                   label="credible estimate (what ARIA uses)"))
    lows = [est - err] + ([credible] if credible is not None else [])
    highs = [est + err] + ([credible] if credible is not None else [])
    lo, hi = float(np.nanmin(np.concatenate(lows))), float(np.nanmax(np.concatenate(highs)))
    span = max(hi - lo, 1e-3)
    ax2.set_ylim(lo - 0.08 * span, hi + 0.25 * span)  # not from 0: that would hide differences of a few %
    p = cb.sampler.probabilities / share
    for j in range(k) if k <= 32 else ():
        ax2.annotate(f"{p[j]:.2g}x", (x[j], est[j] + err[j]), xytext=(0, 2), textcoords="offset points",
                     ha="center", fontsize=6.5)
    ax2.set_xticks(x)
    ax2.set_xticklabels(names if k <= 32 else [str(j) for j in x], rotation=60 if k <= 32 else 90, ha="right",
                        fontsize=6.5)
    ax2.set_ylabel("discrepancy estimate (1 = average)")
    title = "final estimates; above each bar: probability / prompt share"
    if spread is not None:
        title += f"\nreal spread between regions counted by ARIA, sqrt(A): {spread:.3f} (0 = all noise)"
    ax2.set_title(title, fontsize=9)
    ax2.legend(handles=handles, fontsize=7, loc="upper right")
    fig.text(0.01, 0.01, plot_caption(cb), fontsize=8, va="bottom", ha="left", wrap=True)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    atomic_save(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
    plt.close(fig)
    return path

def plot_caption(cb) -> str:
    """Why a region's probability and its estimate differ, in the policy's own numbers."""
    pol = cb.policy
    if getattr(pol, "score", None) in ("sparse", "credible"):
        bounds = [f"at least {pol.floor:g}/K each", f"at most {pol.max_shift:.0%} of the mass moved"]
        if pol.max_ratio is not None:
            bounds.append(f"no region above {pol.max_ratio:g}x its prior")
        prior = "the prompt share (Random Conditioning)" if pol.alpha == 1 else f"size^{pol.alpha:g}"
        return (
            f"Probability is not the estimate. ARIA starts from {prior} and multiplies it by "
            f"exp(credible excess / {pol.tau:g}). The credible excess is each region's excess over its parent "
            "in the region tree, shrunk by how sure the tracker is of it: differences inside the error bars "
            f"count for nothing. The result is bounded ({', '.join(bounds)}); a region gets at most "
            f"{pol.trial_ratio:g}x its prior until its excess falls while it is boosted, and one that does not "
            f"fall is held at its prior. {_pace(pol)} So a bar above the line moves nothing until the tracker is "
            "sure of it.")
    if getattr(pol, "score", None) == "zscore":
        return (f"Score 'zscore': probability = size prior (size^{pol.alpha:g}) x exp(z / {pol.tau:g}), z the "
                "estimates standardised across regions (any spread, noise included, becomes unit spread), "
                f"bounded and damped ({pol.damping:.0%} per update). The error bars are not used.")
    return (f"Policy '{pol.name}': its probabilities come from the estimates by its own rule (see "
            "diffusers_aria.allocation); the error bars show how sure the tracker is of each estimate.")

def write_report(cb, output_dir: str, plot: bool = True) -> dict[str, str]:
    """Write aria_report.json, aria_report.md and the allocation plot into `output_dir` (main process)."""
    paths = {"json": os.path.join(output_dir, REPORT_JSON), "markdown": os.path.join(output_dir, REPORT_MARKDOWN)}
    if not cb.is_main_process:
        return paths
    os.makedirs(output_dir, exist_ok=True)
    report = summary(cb)
    report["history"] = {"steps": cb.history_steps,
                           "probabilities": [np.round(p, 6).tolist() for p in cb.history_probs]}
    atomic_write_json(paths["json"], report)
    md = f"# ARIA report\n\nPolicy `{report['policy']}` at step {report['step']}.\n\n"
    md += "\n".join(f"- {k}: {v:.4g}" for k, v in report["metrics"].items()) + "\n\n" + markdown_table(report) + "\n"
    atomic_write_text(paths["markdown"], md)
    if plot:
        paths["plot"] = plot_allocation(cb, os.path.join(output_dir, ALLOCATION_PLOT))
    return paths


def _pace(pol) -> str:
    """How fast the allocation moves, in the caption's words."""
    every = int(getattr(pol, "refresh_every", 1))
    if every == 1:
        return f"The probability moves {pol.damping:.0%} of the way per update after a {pol.warmup_steps}-update warm-up."
    return (f"After a {pol.warmup_steps}-update warm-up the allocation is recomputed every {every} updates and moves "
            f"{pol.refresh_rate:.0%} of the way each time ({pol.damping:.0%} an update, compounded).")
