"""Checkpoints that survive a hard kill: write to a temporary name, then rename; rotate; find the latest.

`save_checkpoint` runs `accelerator.save_state` into `.checkpoint-N.tmp` and renames it to `checkpoint-N`
only when every process has finished writing, so a run killed mid-write leaves a `.tmp` folder that is
never chosen as latest (and is cleaned up on the next start). Rotation keeps at most `total_limit`
complete checkpoints.

A checkpoint can still be damaged after it was written (a full disk, a copy cut short). `verify_checkpoint`
reads every file's structure without loading any weights: safetensors headers parse and cover their file,
JSON parses, torch archives are whole zip files. `resolve_resume_checkpoint(..., "latest")` skips damaged
checkpoints with a warning naming the bad file and resumes from the newest valid one; a named checkpoint
that is damaged is an error naming the file.

The run folder itself: `run_logging_dir` gives each run (new or resumed) its own tracker folder,
`move_run_aside` moves an earlier run out of the way of a new one (`--overwrite_output_dir`: nothing is deleted
and two runs never mix), and `OutputDirGuard` removes what a run created when it fails before its first
checkpoint, so a failed start leaves no half-made folder behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import time
import zipfile

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


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file or holds one that cannot be read."""


# accelerate's `save_state` file names (per prepared object, `_N` from the second one on)
_WEIGHTS = re.compile(r"^(model(_\d+)?\.safetensors|pytorch_model(_\d+)?\.bin)$")
_RANDOM_STATES = re.compile(r"^random_states_\d+\.pkl$")
_ARIA_FILES = ("aria_state.safetensors", "aria_state.json")


def _check_safetensors(path: str) -> str | None:
    """None if `path` is a whole safetensors file (header parses, tensors cover the data exactly)."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a safetensors header"
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            return f"header of {n} bytes does not fit in a file of {size} bytes (truncated)"
        try:
            header = json.loads(fh.read(n))
        except ValueError as e:
            return f"header is not valid JSON ({e})"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            start, stop = (int(x) for x in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            return f"tensor {name!r} has no valid data_offsets"
        if not 0 <= start <= stop:
            return f"tensor {name!r} has invalid data_offsets {info['data_offsets']}"
        end = max(end, stop)
    if 8 + n + end != size:
        return f"tensor data ends at byte {8 + n + end} but the file has {size} bytes (truncated or padded)"
    return None


def _check_torch_file(path: str) -> str | None:
    """None if `path` looks like a whole `torch.save` file: a zip archive whose members lie within the file."""
    size = os.path.getsize(path)
    if zipfile.is_zipfile(path):
        try:
            with zipfile.ZipFile(path) as zf:
                for info in zf.infolist():
                    if info.header_offset + info.compress_size > size:
                        return f"archive member {info.filename!r} runs past the end of the file (truncated)"
        except (zipfile.BadZipFile, OSError, ValueError) as e:
            return f"damaged zip archive ({e})"
        return None
    with open(path, "rb") as fh:  # the legacy pickle format: a pickle ends with the STOP opcode
        head = fh.read(2)
        fh.seek(max(size - 1, 0))
        last = fh.read(1)
    if not head or head[:1] != b"\x80" or last != b".":
        return "neither a zip archive nor a complete pickle (truncated?)"
    return None


def _check_json(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as fh:
            json.load(fh)
    except (ValueError, UnicodeDecodeError) as e:
        return f"not valid JSON ({e})"
    return None


_CHECKS = {".safetensors": _check_safetensors, ".bin": _check_torch_file, ".pkl": _check_torch_file,
           ".pt": _check_torch_file, ".pth": _check_torch_file, ".json": _check_json}


def checkpoint_problems(path: str) -> list[str]:
    """Every problem of the checkpoint folder `path`, as "file: what is wrong" (empty when it is usable).

    Expected: a model weights file (`model.safetensors` or `pytorch_model.bin`, as `accelerate.save_state`
    writes them), a `random_states_N.pkl`, and the ARIA state as a pair (`aria_state.safetensors` with
    `aria_state.json`) when either is there. Every file is read for its structure only (no weights are
    loaded): safetensors headers must parse and cover the file, JSON must parse, torch files must be whole
    zip archives (or complete pickles), and no file may be empty.
    """
    if not os.path.isdir(path):
        return [f"{path}: not a folder"]
    problems: list[str] = []
    names = set(os.listdir(path))
    if not any(_WEIGHTS.match(n) for n in names):
        problems.append(f"{os.path.join(path, 'model.safetensors')}: missing (no model weights file)")
    if not any(_RANDOM_STATES.match(n) for n in names):
        problems.append(f"{os.path.join(path, 'random_states_0.pkl')}: missing")
    if any(n in names for n in _ARIA_FILES):
        problems += [f"{os.path.join(path, n)}: missing (the ARIA state is a pair)" for n in _ARIA_FILES
                     if n not in names]
    for root, dirs, files in os.walk(path):
        dirs.sort()
        for name in sorted(files):
            file = os.path.join(root, name)
            try:
                if os.path.getsize(file) == 0:
                    problems.append(f"{file}: empty")
                    continue
                check = _CHECKS.get(os.path.splitext(name)[1])
                problem = check(file) if check else None
            except OSError as e:
                problem = f"cannot be read ({e})"
            if problem:
                problems.append(f"{file}: {problem}")
    return problems


def verify_checkpoint(path: str) -> str:
    """`path` if the checkpoint is usable (see `checkpoint_problems`), else `CheckpointError` naming the bad files."""
    problems = checkpoint_problems(path)
    if problems:
        raise CheckpointError(f"checkpoint {path!r} is damaged: " + "; ".join(problems))
    return path


def resolve_resume_checkpoint(output_dir: str, resume_from_checkpoint: str | None, verify: bool = True) -> str | None:
    """The checkpoint folder to resume from: "latest" (None if there is none yet) or an explicit path.

    With `verify` (the default) every candidate is checked with `checkpoint_problems` first. "latest" skips
    damaged checkpoints with a warning that names the bad file, and takes the newest valid one; when every
    checkpoint is damaged it raises `CheckpointError`. A named checkpoint that is damaged raises
    `CheckpointError` naming the bad file (the older valid ones are listed).
    """
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        ckpts = list_checkpoints(output_dir)
        if not verify:
            return ckpts[-1][1] if ckpts else None
        skipped = []
        for _, path in reversed(ckpts):
            problems = checkpoint_problems(path)
            if not problems:
                if skipped:
                    logger.warning("resuming from %s, the newest valid checkpoint", path)
                return path
            logger.warning("skipping damaged checkpoint %s: %s", path, "; ".join(problems))
            skipped.append(f"{os.path.basename(path)} ({problems[0]})")
        if skipped:
            raise CheckpointError(
                f"--resume_from_checkpoint latest: every checkpoint in {output_dir!r} is damaged: {'; '.join(skipped)}. "
                "Remove them to start a new run, or restore a checkpoint from a copy"
            )
        return None
    path = resume_from_checkpoint
    if not os.path.isabs(path) and not os.path.isdir(path):
        path = os.path.join(output_dir, path)
    if not os.path.isdir(path) or not _CKPT.match(os.path.basename(os.path.normpath(path))):
        raise FileNotFoundError(
            f"--resume_from_checkpoint {resume_from_checkpoint!r} is not a checkpoint-N folder; use 'latest' or one of "
            f"{[os.path.basename(p) for _, p in list_checkpoints(output_dir)]}"
        )
    if verify:
        problems = checkpoint_problems(path)
        if problems:
            valid = [os.path.basename(p) for _, p in list_checkpoints(output_dir)
                     if os.path.normpath(p) != os.path.normpath(path) and not checkpoint_problems(p)]
            raise CheckpointError(
                f"--resume_from_checkpoint {resume_from_checkpoint!r} is damaged: {'; '.join(problems)}. "
                f"Valid checkpoints: {valid or 'none'} (or 'latest', which picks the newest valid one)"
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


# ------------------------------------------------------------------------------------------ the run folder


def run_logging_dir(output_dir: str, logging_dir: str = "logs", resume_path: str | None = None,
                    now: float | None = None) -> str:
    """A tracker folder of this run's own: `output_dir/logging_dir/run-YYYYmmdd-HHMMSS[-from-N]`.

    Every start (a new run, each resume, a failed attempt) writes its events into a new folder, so that
    `tensorboard --logdir output_dir/logging_dir` shows the runs side by side instead of one merged curve.
    A resumed run's name ends in `-from-N`, N its checkpoint's step. The name is unique in that folder (a
    `-2`, `-3`, ... suffix when two starts fall in the same second); nothing is created here.
    """
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    name = f"run-{stamp}" + (f"-from-{checkpoint_step(resume_path)}" if resume_path else "")
    return _unused_path(os.path.join(output_dir, logging_dir, name))


def _unused_path(path: str) -> str:
    """`path`, or `path-2`, `path-3`, ... : the first name nothing holds yet."""
    candidate, n = path, 1
    while os.path.lexists(candidate):
        n += 1
        candidate = f"{path}-{n}"
    return candidate


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another file system, or links not supported
        shutil.copy2(src, dst)


def move_run_aside(output_dir: str, reuse: tuple[str, ...] = (), now: float | None = None) -> str:
    """Rename the folder of an earlier run to a sibling `<output_dir>.previous-YYYYmmdd-HHMMSS` (a `-2`, `-3`, ...
    suffix when taken) and return that path: a new run then starts in a new folder, and the earlier run's
    checkpoints, images and report stay whole beside it (nothing is deleted).

    `reuse` names caches of the earlier run (e.g. "regions", "teacher_latents") to place into the new folder as
    hard links (copies where links fail): their readers check them against the new run's settings and replace
    them by renaming new files over them, so the earlier run's files never change.
    """
    base = os.path.normpath(output_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(time.time() if now is None else now))
    target = _unused_path(f"{base}.previous-{stamp}")
    os.rename(base, target)
    for name in reuse:
        if os.path.isdir(os.path.join(target, name)):
            shutil.copytree(os.path.join(target, name), os.path.join(base, name), copy_function=_link_or_copy)
    return target


def _entries(folder: str) -> set[str]:
    """Relative paths of `folder`'s entries and of their entries (two levels: `logs/run-...` included)."""
    found = set()
    for name in os.listdir(folder):
        found.add(name)
        sub = os.path.join(folder, name)
        if os.path.isdir(sub) and not os.path.islink(sub):
            found.update(os.path.join(name, child) for child in os.listdir(sub))
    return found


def _is_main_process() -> bool:
    """accelerate's view when its state exists, else the launcher's RANK (0 when not launched)."""
    try:
        from accelerate.state import PartialState

        if PartialState._shared_state:
            return PartialState().is_main_process
    except ImportError:  # pragma: no cover - accelerate is a dependency
        pass
    return int(os.environ.get("RANK", "0")) == 0


class OutputDirGuard:
    """Take back what a run created in its output folder when it fails before its first checkpoint.

    Wrap the whole run, from before anything is written::

        with OutputDirGuard(args.output_dir):
            run(args)

    When the block raises (an error, Ctrl-C) and the folder holds no complete checkpoint, the folder is
    removed if it did not exist before, otherwise what the run added is removed: new entries, and new
    entries inside folders that were there (such as this run's `logs/run-...`). What was there before is
    never touched. Once a checkpoint exists nothing is removed: `--resume_from_checkpoint latest` continues
    from there. Only the main process removes anything (`is_main_process=None`: asked of accelerate when
    the block fails, so the guard can be made before the `Accelerator`).
    """

    def __init__(self, output_dir: str, is_main_process: bool | None = None) -> None:
        self.output_dir, self.is_main_process = output_dir, is_main_process
        self.existed = os.path.isdir(output_dir)
        self.before = _entries(output_dir) if self.existed else set()

    def __enter__(self) -> OutputDirGuard:
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:
            self.discard()
        return False

    def discard(self) -> list[str]:
        """Remove what this run created (nothing once a checkpoint exists). Returns the removed paths."""
        main = self.is_main_process if self.is_main_process is not None else _is_main_process()
        if not main or not os.path.isdir(self.output_dir) or list_checkpoints(self.output_dir):
            return []
        if not self.existed:
            shutil.rmtree(self.output_dir, ignore_errors=True)
            logger.warning("the run failed before its first checkpoint: removed %s", self.output_dir)
            return [self.output_dir]
        removed: list[str] = []
        for rel in sorted(_entries(self.output_dir) - self.before, key=lambda r: (r.count(os.sep), r)):
            path = os.path.join(self.output_dir, rel)
            if not os.path.lexists(path):  # inside a new folder removed just before
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                os.remove(path)
            removed.append(path)
        if removed:
            logger.warning("the run failed before its first checkpoint: removed what it created in %s: %s",
                           self.output_dir, ", ".join(os.path.relpath(p, self.output_dir) for p in removed))
        return removed
