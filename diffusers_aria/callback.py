"""`ARIACallback`: the glue between a training loop, accelerate, and ARIA's tracker, policy and sampler.

Per micro-batch, `accumulate(region_ids, losses, timesteps, mask)` keeps this process's per-sample losses
(detached; no communication). Once per optimizer step, inside `if accelerator.sync_gradients:`,
`on_step_end(global_step)` gathers the buffered samples of every process (one small all-gather), makes one
tracker update with the same global batch on every rank (so all ranks hold bit-identical statistics and
probabilities, with no rank-0-only state), one allocation step, pushes the probabilities to the sampler, logs
`aria/...` metrics through `accelerator.log` at `global_step`, and empties the buffer. Every rank must call
it, also with nothing buffered. Without gradient accumulation, `on_step_end(step, region_ids, losses,
timesteps, mask)` does both in one call.

The buffer is not checkpointed: save checkpoints after `on_step_end` (as diffusers' scripts do, after the
optimizer step), when it is empty.

Checkpointing: `save_state(dir)`/`load_state(dir)` write and read `aria_state.safetensors` plus
`aria_state.json` (no pickle). When `register_hooks=True` they run inside `accelerator.save_state` and
`accelerator.load_state`, and a readable snapshot (JSON table and allocation plot) is written beside each
checkpoint. The reports themselves (metrics, tables, plot) are rendered by `reporting.py`.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import numpy as np
import torch

from .allocation import AllocationPolicy
from .reporting import ALLOCATION_PLOT
from .sampler import AdaptiveRegionSampler
from .tracker import DiscrepancyTracker
from .utils.atomic import atomic_save, atomic_write_json

logger = logging.getLogger(__name__)

STATE_TENSORS = "aria_state.safetensors"
STATE_JSON = "aria_state.json"


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
                 policy: AllocationPolicy, log_every: int = 1, log_regions_max: int = 64,
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
        self._buffer: list[torch.Tensor] = []  # this process's rows since the last on_step_end (not checkpointed)
        self.sampler.set_probabilities(self.policy.probabilities)
        self._last_set: np.ndarray | None = None  # the probabilities last given to the sampler by on_step_end
        if register_hooks and accelerator is not None:
            accelerator.register_save_state_pre_hook(self._save_hook)
            accelerator.register_load_state_pre_hook(self._load_hook)

    # ----------------------------------------------------------------------------------- per step
    @property
    def is_main_process(self) -> bool:
        return self.accelerator is None or self.accelerator.is_main_process

    def gather(self, region_ids, losses, timesteps=None, mask=None) -> torch.Tensor:
        """[n_global, 3] float64 rows (region, loss, t) of every process; masked-out rows get region -1, and t
        is NaN when no timesteps were given. Collective, like `on_step_end`."""
        return self._gather_rows(self._local_rows(region_ids, losses, timesteps, mask))

    @staticmethod
    def _local_rows(region_ids, losses, timesteps=None, mask=None) -> torch.Tensor:
        """[n, 3] float64 rows (region, loss, t) of this process, detached; t is NaN when not given."""
        losses = torch.as_tensor(losses).detach().reshape(-1).to(torch.float64)
        device = losses.device
        regions = torch.as_tensor(region_ids, device=device).detach().reshape(-1).to(torch.float64)
        if regions.numel() != losses.numel():
            raise ValueError(f"region_ids has {regions.numel()} entries but losses has {losses.numel()}; they must match")
        t = (torch.as_tensor(timesteps, device=device).detach().reshape(-1).to(torch.float64) if timesteps is not None
             else torch.full_like(losses, float("nan")))
        if mask is not None:
            keep = torch.as_tensor(mask, device=device).reshape(-1).bool()
            regions = torch.where(keep, regions, torch.full_like(regions, -1.0))
        return torch.stack([regions, losses, t], dim=1)

    def _gather_rows(self, rows: torch.Tensor) -> torch.Tensor:
        acc = self.accelerator
        if acc is None or acc.num_processes == 1:
            return rows.cpu()
        if rows.shape[0] == 0:  # a rank with nothing to add still takes part: one row that the tracker ignores
            rows = torch.tensor([[-1.0, 0.0, 0.0]], dtype=torch.float64, device=acc.device)
        rows = acc.pad_across_processes(rows, dim=0, pad_index=-1)
        return acc.gather(rows).cpu()

    def accumulate(self, region_ids, losses, timesteps=None, mask=None) -> None:
        """Keep one micro-batch's per-sample losses of this process for the next `on_step_end` (no communication).

        Call it once per batch the DataLoader yields (it also tells the sampler that this draw was trained on).
        Arguments as in `on_step_end`; tensors are detached and may stay on the accelerator.
        """
        self._buffer.append(self._local_rows(region_ids, losses, timesteps, mask))
        self.sampler.mark_consumed()

    def on_step_end(self, step: int, region_ids=None, losses=None, timesteps=None, mask=None) -> np.ndarray:
        """One ARIA update from everything accumulated since the last call; returns the new region probabilities.

        Collective: every rank calls it at the same steps (a rank may have nothing buffered).

        Args:
            step: the optimizer step (logs go to this step; monotonic). Diffusers scripts: `global_step`.
            region_ids, losses, timesteps, mask: optionally one more micro-batch, added as `accumulate` would
                (without gradient accumulation, the whole step in one call):
                region_ids: region of each sample (negative ids, e.g. for the null prompt, are ignored);
                losses: per-sample loss (detached internally, read in float64);
                timesteps: per-sample diffusion timesteps (for the per-timestep baseline);
                mask: which samples feed the tracker (e.g. only those whose prompt was swapped).
        """
        if (region_ids is None) != (losses is None):
            raise ValueError("on_step_end takes region_ids and losses together (or neither, after accumulate)")
        if losses is not None:
            self.accumulate(region_ids, losses, timesteps, mask)
        local = (torch.cat([r.to(self._buffer[0].device) for r in self._buffer]) if self._buffer
                 else torch.zeros((0, 3), dtype=torch.float64))
        self._buffer.clear()
        rows = self._gather_rows(local).numpy()  # t stays NaN where none was given; numpy from here on (fewer calls)
        regions, t = rows[:, 0].astype(np.int64), rows[:, 2]
        has_t = ~np.isnan(t[regions >= 0])
        any_t = bool(has_t.any())
        if any_t and not bool(has_t.all()):
            raise ValueError(f"step {step}: some micro-batches came with timesteps and some without; "
                             "pass timesteps always or never")
        self.tracker.update(regions, rows[:, 1], np.nan_to_num(t, nan=0.0) if any_t else None,
                            baseline_weights=self._baseline_weights(regions))
        probs = self.policy.step(step, self.tracker)
        if probs is not self._last_set:  # a policy between refreshes returns the same array: nothing to set
            self.sampler.set_probabilities(probs)
            self._last_set = probs
        self.last_step = int(step)
        self._record(step, probs)
        if self.tracker.last_nonfinite:
            logger.warning("step %d: %d non-finite per-sample losses were ignored by the ARIA tracker",
                           step, self.tracker.last_nonfinite)
        if self.log_every and self.accelerator is not None and step % self.log_every == 0:
            self.accelerator.log(self.metrics(), step=step)
        return probs

    def _baseline_weights(self, regions: np.ndarray) -> np.ndarray:
        """Prompt share / sampling probability of each sample's region: the tracker's baselines then measure the
        pool's average prompt, not the allocation's (see `DiscrepancyTracker.batch_statistics`)."""
        share = self.policy.prompt_share
        p = np.maximum(self.sampler.probabilities, 1e-12)
        r = np.clip(regions, 0, share.size - 1)
        return np.where(regions >= 0, share[r] / p[r], 1.0)

    def _record(self, step: int, probs: np.ndarray) -> None:
        if step % self.history_stride:
            return
        self.history_steps.append(int(step))
        self.history_probs.append(np.asarray(probs, dtype=np.float32).copy())
        if len(self.history_steps) > self.history_max:  # thin: keep every other snapshot
            self.history_steps = self.history_steps[::2]
            self.history_probs = self.history_probs[::2]
            self.history_stride *= 2

    # ----------------------------------------------------------------------------------- reports
    def metrics(self) -> dict[str, float]:
        """`aria/...` scalars (see `reporting.metrics`)."""
        from .reporting import metrics

        return metrics(self)

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary: global metrics and a per-region table (see `reporting.summary`)."""
        from .reporting import summary

        return summary(self)

    def plot(self, path: str) -> str:
        """The allocation plot as a PNG (see `reporting.plot_allocation`)."""
        from .reporting import plot_allocation

        return plot_allocation(self, path)

    def write_report(self, output_dir: str, plot: bool = True) -> dict[str, str]:
        """aria_report.json, aria_report.md and the allocation plot in `output_dir`, on the main process."""
        from .reporting import write_report

        return write_report(self, output_dir, plot=plot)

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
        self._last_set = None
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
        tensors, plain = flatten_state(self.state_dict())
        atomic_save(os.path.join(directory, STATE_TENSORS),
                    lambda tmp: save_file({k: v.contiguous() for k, v in tensors.items()}, tmp))
        payload = {"state": plain, "summary": self.summary()}
        atomic_write_json(os.path.join(directory, STATE_JSON), payload)
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
        self.load_state_dict(unflatten_state(load_file(tpath), plain))

    def _save_hook(self, models, weights, output_dir) -> None:
        self.save_state(output_dir)

    def _load_hook(self, models, input_dir) -> None:
        self.load_state(input_dir)


def flatten_state(state: dict[str, Any], prefix: str = "") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors: dict[str, torch.Tensor] = {}
    plain: dict[str, Any] = {}
    for k, v in state.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            t, p = flatten_state(v, key + ".")
            tensors.update(t)
            plain.update(p)
        elif isinstance(v, torch.Tensor):
            tensors[key] = v
        else:
            plain[key] = v
    return tensors, plain


def unflatten_state(tensors: dict[str, torch.Tensor], plain: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, v in list(tensors.items()) + list(plain.items()):
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = v
    return out
