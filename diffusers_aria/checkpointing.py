"""Checkpoints that survive a hard kill: write to a temporary name, then rename; rotate; find the latest.

`save_checkpoint` runs `accelerator.save_state` into `.checkpoint-N.tmp` and renames it to `checkpoint-N`
only when every process has finished writing, so a run killed mid-write leaves a `.tmp` folder that is
never chosen as latest (and is cleaned up on the next start). Rotation keeps at most `total_limit`
complete checkpoints.
"""

from __future__ import annotations

import logging
import os
import re
import shutil

logger = logging.getLogger(__name__)

_CKPT = re.compile(r"^checkpoint-(\d+)$")
_TMP = re.compile(r"^\.checkpoint-(\d+)\.tmp$")


def list_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """Complete checkpoints as (step, path), oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT.match(name)
        if m and os.path.isdir(os.path.join(output_dir, name)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return sorted(found)


def remove_partial_checkpoints(output_dir: str) -> list[str]:
    """Delete `.checkpoint-N.tmp` folders left by a run killed while writing. Returns what was removed."""
    removed = []
    if os.path.isdir(output_dir):
        for name in os.listdir(output_dir):
            if _TMP.match(name):
                shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
                removed.append(name)
    return removed


def resolve_resume_checkpoint(output_dir: str, resume_from_checkpoint: str | None) -> str | None:
    """The checkpoint folder to resume from: "latest" (None if there is none yet) or an explicit path."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        ckpts = list_checkpoints(output_dir)
        return ckpts[-1][1] if ckpts else None
    path = resume_from_checkpoint
    if not os.path.isabs(path) and not os.path.isdir(path):
        path = os.path.join(output_dir, path)
    if not os.path.isdir(path) or not _CKPT.match(os.path.basename(os.path.normpath(path))):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint-N folder; use 'latest' or one of "
            f"{[os.path.basename(p) for _, p in list_checkpoints(output_dir)]}"
        )
    return path


def checkpoint_step(path: str) -> int:
    m = _CKPT.match(os.path.basename(os.path.normpath(path)))
    if not m:
        raise ValueError(f"{path!r} is not a checkpoint-N folder")
    return int(m.group(1))


def save_checkpoint(accelerator, output_dir: str, step: int, total_limit: int | None = None) -> str:
    """`accelerator.save_state` into `output_dir/checkpoint-{step}` atomically, keeping at most `total_limit`."""
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
    if accelerator.is_main_process:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp)
        if total_limit is not None:
            existing = [c for c in list_checkpoints(output_dir) if c[0] != step]
            excess = len(existing) + 1 - total_limit
            for _, path in existing[:max(excess, 0)]:
                logger.info("removing old checkpoint %s (checkpoints_total_limit=%d)", path, total_limit)
                shutil.rmtree(path)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if os.path.isdir(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final
