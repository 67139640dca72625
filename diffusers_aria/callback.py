"""`ARIACallback`: the glue between a training loop, accelerate, and ARIA's tracker, policy and sampler.

Call `on_step_end(step, region_ids, losses, timesteps, mask)` once per draw step with this process's
per-sample losses. The callback gathers the samples of every process (one small all-gather), updates the
tracker with the same global batch on every rank (so all ranks hold bit-identical statistics and
probabilities, with no rank-0-only state), recomputes the allocation, pushes it to the sampler, and logs
`aria/...` metrics through `accelerator.log`.

Checkpointing: `save_state(dir)`/`load_state(dir)` write and read `aria_state.safetensors` plus
`aria_state.json` (no pickle). When `register_hooks=True` they run inside `accelerator.save_state` and
`accelerator.load_state`, and a readable snapshot (JSON table and allocation plot) is written beside each
checkpoint.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import numpy as np
import torch

from .allocation import AllocationPolicy
from .sampler import AdaptiveRegionSampler
from .tracker import DiscrepancyTracker

logger = logging.getLogger(__name__)

STATE_TENSORS = "aria_state.safetensors"
STATE_JSON = "aria_state.json"
ALLOCATION_PLOT = "aria_allocation.png"


def entropy(p: np.ndarray) -> float:
    q = p[p > 0]
    return float(-(q * np.log(q)).sum())


def effective_regions(p: np.ndarray) -> float:
    """exp(entropy): K for a uniform allocation, 1 when all draws go to one region."""
    return math.exp(entropy(p))


def kl_divergence(p: np.ndarray, q: np.ndarray) -> float:
    m = p > 0
    return float((p[m] * np.log(p[m] / q[m])).sum())


def _atomic_write_bytes(path: str, write) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


class ARIACallback:
    """Online ARIA: gather per-sample losses, update the tracker, re-allocate, log, checkpoint.

    Args:
        accelerator: an `accelerate.Accelerator` (or None for a plain single-process loop).
        sampler: the `AdaptiveRegionSampler` whose probabilities are updated.
        tracker: the `DiscrepancyTracker`.
        policy: an `AllocationPolicy` (e.g. `ARIAAllocation`).
        log_every: log `aria/...` metrics every this many steps (0: never).
        log_regions_max: per-region metrics are logged only when K is at most this.
        history_max: at most this many allocation snapshots are kept for the plot (older ones thinned).
        register_hooks: write/read the ARIA state inside `accelerator.save_state`/`load_state`.
    """

    def __init__(self, accelerator, sampler: AdaptiveRegionSampler, tracker: DiscrepancyTracker,
                 policy: AllocationPolicy, log_every: int = 10, log_regions_max: int = 64,
                 history_max: int = 512, register_hooks: bool = True, region_names: list[str] | None = None) -> None:
        if not (sampler.num_regions == tracker.num_regions == policy.num_regions):
            raise ValueError(
                f"sampler ({sampler.num_regions}), tracker ({tracker.num_regions}) and policy ({policy.num_regions}) "
                "must have the same number of regions"
            )
        self.accelerator = accelerator
        self.sampler, self.tracker, self.policy = sampler, tracker, policy
        self.log_every, self.log_regions_max = int(log_every), int(log_regions_max)
        self.history_max = int(history_max)
        self.region_names = region_names
        self.history_steps: list[int] = []
        self.history_probs: list[np.ndarray] = []
        self.history_stride = 1
        self.last_step = -1
        self.sampler.set_probabilities(self.policy.probabilities)
        if register_hooks and accelerator is not None:
            accelerator.register_save_state_pre_hook(self._save_hook)
            accelerator.register_load_state_pre_hook(self._load_hook)

    # ----------------------------------------------------------------------------------- per step
    @property
    def is_main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def gather(self, region_ids, losses, timesteps=None, mask=None) -> torch.Tensor:
        """[n_global, 3] float64 rows (region, loss, t) of every process; masked-out rows get region -1."""
        losses = torch.as_tensor(losses).detach().reshape(-1).to(torch.float64)
        device = losses.device
        regions = torch.as_tensor(region_ids, device=device).reshape(-1).to(torch.float64)
        t = (torch.as_tensor(timesteps, device=device).reshape(-1).to(torch.float64) if timesteps is not None
             else torch.zeros_like(losses))
        if mask is not None:
            keep = torch.as_tensor(mask, device=device).reshape(-1).bool()
            regions = torch.where(keep, regions, torch.full_like(regions, -1.0))
        rows = torch.stack([regions, losses, t], dim=1)
        acc = self.accelerator
        if acc is None or acc.num_processes == 1:
            return rows.cpu()
        rows = acc.pad_across_processes(rows, dim=0, pad_index=-1)
        return acc.gather(rows).cpu()

    def on_step_end(self, step: int, region_ids, losses, timesteps=None, mask=None) -> np.ndarray:
        """Feed one step's per-sample losses (this process's part); returns the new region probabilities.

        Args:
            step: the draw step these samples came from (monotonic).
            region_ids: region of each sample (negative ids, e.g. for the null prompt, are ignored).
            losses: per-sample distillation loss (detached internally, read in float64).
            timesteps: per-sample diffusion timesteps (for the per-timestep baseline).
            mask: which samples feed the tracker (e.g. only those whose prompt was swapped).
        """
        rows = self.gather(region_ids, losses, timesteps, mask)
        self.tracker.update(rows[:, 0].long(), rows[:, 1], rows[:, 2] if timesteps is not None else None)
        probs = self.policy.step(step, self.tracker)
        self.sampler.set_probabilities(probs)
        self.last_step = int(step)
        self._record(step, probs)
        if self.tracker.last_nonfinite:
            logger.warning("step %d: %d non-finite per-sample losses were ignored by the ARIA tracker",
                           step, self.tracker.last_nonfinite)
        if self.log_every and self.accelerator is not None and step % self.log_every == 0:
            self.accelerator.log(self.metrics(), step=step)
        return probs

    def _record(self, step: int, probs: np.ndarray) -> None:
        if step % self.history_stride:
            return
        self.history_steps.append(int(step))
        self.history_probs.append(np.asarray(probs, dtype=np.float32).copy())
        if len(self.history_steps) > self.history_max:  # thin: keep every other snapshot
            self.history_steps = self.history_steps[::2]
            self.history_probs = self.history_probs[::2]
            self.history_stride *= 2

    # ----------------------------------------------------------------------------------- metrics
    def metrics(self) -> dict[str, float]:
        """`aria/...` scalars: entropy, effective regions, KL to the prompt-uniform prior, per-region values."""
        p = self.sampler.probabilities
        h = entropy(p)
        out: dict[str, float] = {
            "aria/entropy": h,
            "aria/effective_regions": effective_regions(p),
            "aria/kl_to_prior": kl_divergence(p, self.policy.prompt_prior),
            "aria/max_prob_ratio": float((p / self.policy.prompt_prior).max()),
            # ARIA: the between-region sd of the relative excess that the credible score counts as real
            # (0: every difference is within the noise, so the allocation stays at its prior)
            **({"aria/real_spread": float(np.sqrt(self.policy.between_variance))}
               if hasattr(self.policy, "between_variance") else {}),
            "aria/nonfinite_total": float(self.tracker.num_nonfinite),
            "aria/tracker_updates": float(self.tracker.num_updates),
        }
        if self.tracker.num_regions <= self.log_regions_max:
            est = self.tracker.estimates()
            share = self.sampler.draw_shares()
            for k in range(self.tracker.num_regions):
                out[f"aria/prob/region_{k:03d}"] = float(p[k])
                out[f"aria/estimate/region_{k:03d}"] = float(est[k])
                out[f"aria/draw_share/region_{k:03d}"] = float(share[k])
        return out

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary: global metrics and a per-region table."""
        p = self.sampler.probabilities
        est, unc, cnt = self.tracker.estimates(), self.tracker.uncertainty(), self.tracker.counts()
        share = self.sampler.draw_shares()
        regions = []
        for k in range(self.tracker.num_regions):
            regions.append({
                "region": k,
                "name": self.region_names[k] if self.region_names else None,
                "size": int(self.sampler.sizes[k]),
                "prior": float(self.policy.prompt_prior[k]),
                "probability": float(p[k]),
                "estimate": float(est[k]),
                "uncertainty": float(unc[k]) if np.isfinite(unc[k]) else None,
                "effective_count": float(cnt[k]),
                "draw_share": float(share[k]),
            })
        return {
            "policy": self.policy.name,
            "policy_config": {k: v for k, v in self.policy.config().items() if isinstance(v, (int, float, str, type(None)))},
            "step": self.last_step,
            "metrics": {k: v for k, v in self.metrics().items() if "/region_" not in k},
            "regions": regions,
        }

    def markdown_table(self, max_rows: int = 64) -> str:
        s = self.summary()
        rows = sorted(s["regions"], key=lambda r: -r["estimate"])[:max_rows]
        lines = ["| region | size | prior | probability | estimate | draws |", "|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            label = f"{r['region']}" + (f" ({r['name']})" if r["name"] else "")
            lines.append(f"| {label} | {r['size']} | {r['prior']:.4f} | {r['probability']:.4f} | "
                         f"{r['estimate']:.3f} | {r['draw_share']:.4f} |")
        return "\n".join(lines)

    def plot(self, path: str) -> str:
        """Allocation over time (probability / prior per region) and final estimates, as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
        if self.history_steps:
            probs = np.stack(self.history_probs)
            ratio = probs / self.policy.prompt_prior[None, :]
            k = probs.shape[1]
            for j in range(min(k, 32)):
                ax1.plot(self.history_steps, ratio[:, j], lw=1)
        ax1.axhline(1.0, color="k", lw=0.8, ls="--")
        ax1.set_xlabel("step")
        ax1.set_ylabel("probability / prompt-uniform prior")
        ax1.set_title(f"ARIA allocation ({self.policy.name})")
        est, se = self.tracker.estimates(), self.tracker.uncertainty()
        err = np.where(np.isfinite(se), 2.0 * se, 0.0)
        ax2.bar(np.arange(len(est)), est, yerr=err, color="tab:orange", ecolor="k", capsize=2 if len(est) <= 32 else 0)
        ax2.axhline(self.tracker.global_mean(), color="k", lw=0.8, ls="--")
        lo = float(np.nanmin(est - err)) if len(est) else 0.0
        ax2.set_ylim(bottom=max(0.0, lo - 0.1 * abs(lo)))
        ax2.set_xlabel("region")
        ax2.set_ylabel("discrepancy estimate (1 = average), +-2 se")
        if hasattr(self.policy, "between_variance"):
            ax2.set_title(f"real spread counted by ARIA: {np.sqrt(self.policy.between_variance):.3f} "
                          "(0 = all within noise)", fontsize=9)
        fig.tight_layout()
        _atomic_write_bytes(path, lambda tmp: fig.savefig(tmp, format="png", dpi=90))
        plt.close(fig)
        return path

    def write_report(self, output_dir: str, plot: bool = True) -> dict[str, str]:
        """Write aria_report.json, aria_report.md and the allocation plot into `output_dir` (main process)."""
        paths = {"json": os.path.join(output_dir, "aria_report.json"), "markdown": os.path.join(output_dir, "aria_report.md")}
        if not self.is_main_process:
            return paths
        os.makedirs(output_dir, exist_ok=True)
        summary = self.summary()
        summary["history"] = {"steps": self.history_steps,
                               "probabilities": [np.round(p, 6).tolist() for p in self.history_probs]}
        _atomic_write_bytes(paths["json"], lambda tmp: open(tmp, "w").write(json.dumps(summary, indent=1)))
        md = f"# ARIA report\n\nPolicy `{summary['policy']}` at step {summary['step']}.\n\n"
        md += "\n".join(f"- {k}: {v:.4g}" for k, v in summary["metrics"].items()) + "\n\n" + self.markdown_table() + "\n"
        _atomic_write_bytes(paths["markdown"], lambda tmp: open(tmp, "w").write(md))
        if plot:
            paths["plot"] = self.plot(os.path.join(output_dir, ALLOCATION_PLOT))
        return paths

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """Tensors and plain types only (loads with `torch.load(..., weights_only=True)`)."""
        hist = np.stack(self.history_probs) if self.history_probs else np.zeros((0, self.tracker.num_regions), np.float32)
        return {
            "tracker": self.tracker.state_dict(),
            "policy": self.policy.state_dict(),
            "sampler": self.sampler.state_dict(),
            "history_steps": torch.tensor(self.history_steps, dtype=torch.int64),
            "history_probs": torch.from_numpy(hist),
            "history_stride": int(self.history_stride),
            "last_step": int(self.last_step),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tracker.load_state_dict(state["tracker"])
        self.policy.load_state_dict(state["policy"])
        self.sampler.load_state_dict(state["sampler"])
        self.history_steps = [int(s) for s in np.asarray(state["history_steps"])]
        self.history_probs = list(np.asarray(state["history_probs"], dtype=np.float32))
        self.history_stride = int(state["history_stride"])
        self.last_step = int(state["last_step"])

    def save_state(self, directory: str, plot: bool = True) -> None:
        """Write aria_state.safetensors + aria_state.json (+ the readable report) into `directory`."""
        if not self.is_main_process:
            return
        from safetensors.torch import save_file

        os.makedirs(directory, exist_ok=True)
        tensors, plain = _flatten(self.state_dict())
        _atomic_write_bytes(os.path.join(directory, STATE_TENSORS),
                            lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
        payload = {"state": plain, "summary": self.summary()}
        _atomic_write_bytes(os.path.join(directory, STATE_JSON), lambda tmp: open(tmp, "w").write(json.dumps(payload, indent=1)))
        if plot:
            self.plot(os.path.join(directory, ALLOCATION_PLOT))

    def load_state(self, directory: str) -> None:
        """Restore from `save_state` output (every rank reads the same files; nothing is unpickled)."""
        from safetensors.torch import load_file

        tpath, jpath = os.path.join(directory, STATE_TENSORS), os.path.join(directory, STATE_JSON)
        if not (os.path.isfile(tpath) and os.path.isfile(jpath)):
            raise FileNotFoundError(f"no ARIA state in {directory!r}: {STATE_TENSORS} and {STATE_JSON} are expected")
        with open(jpath) as fh:
            plain = json.load(fh)["state"]
        self.load_state_dict(_unflatten(load_file(tpath), plain))

    def _save_hook(self, models, weights, output_dir) -> None:
        self.save_state(output_dir)

    def _load_hook(self, models, input_dir) -> None:
        self.load_state(input_dir)


def _flatten(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            t, p = _flatten(v, key + ".")
            tensors.update(t)
            plain.update(p)
        elif isinstance(v, torch.Tensor):
            tensors[key] = v
        else:
            plain[key] = v
    return tensors, plain


def _unflatten(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in list(tensors.items()) + list(plain.items()):
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = v
    return out
