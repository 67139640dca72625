"""User errors: mistakes in what was passed to a command, reported as one plain line instead of a traceback.

A `UserError` names the bad value and what would be valid. The entry points (the `diffusers-aria` command
line and `train_scripts/train_aria_distill.py`) run through `run_main`, which prints such an error as
`error: <message>` on stderr and returns exit code 2 (argparse's code for bad arguments); with `--debug`
the traceback is shown instead. Any other exception is a bug, or a failure the user could not have
avoided, and keeps its traceback.

This module imports nothing heavy, so that a command can fail on bad input before torch, diffusers or
transformers load.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from collections.abc import Callable, Sequence
from typing import TypeVar

T = TypeVar("T")

USER_ERROR_EXIT_CODE = 2
DEBUG_FLAG = "--debug"

# Errors of the library that are user mistakes but are not (yet) `UserError` subclasses, by module and name.
# They are looked up only in modules already loaded, so that this stays light.
_LEGACY_USER_ERRORS = (
    ("diffusers_aria.regions", "RegionsMismatchError"),
    ("diffusers_aria.training.student", "FeatureMappingError"),
    ("diffusers_aria.training.inputs", "RankMismatchError"),
    ("diffusers_aria.training.checkpointing", "CheckpointError"),
    ("diffusers_aria.training.data", "StaleCacheError"),
)


class UserError(ValueError):
    """A mistake in the user's input (a path, a flag's value, a folder's state), not a bug in the code.

    The message is one line that names the bad value and what would be valid.
    """


def is_user_error(exc: BaseException) -> bool:
    """Whether `exc` is a user mistake to report as one line (a `UserError` or a known library equivalent)."""
    if isinstance(exc, UserError):
        return True
    for module_name, class_name in _LEGACY_USER_ERRORS:
        cls = getattr(sys.modules.get(module_name), class_name, None)
        if isinstance(cls, type) and isinstance(exc, cls):
            return True
    return False


def one_line(message: object) -> str:
    """`message` as a single line (inner newlines become '; ')."""
    parts = [p.strip() for p in str(message).splitlines() if p.strip()]
    return "; ".join(parts) or "unknown error"


def split_debug_flag(argv: Sequence[str]) -> tuple[list[str], bool]:
    """Remove `--debug` from `argv` (before a `--`, after which arguments belong to another program).

    Returns (the remaining arguments, whether `--debug` was there).
    """
    argv = list(argv)
    end = argv.index("--") if "--" in argv else len(argv)
    debug = DEBUG_FLAG in argv[:end]
    return [a for i, a in enumerate(argv) if i >= end or a != DEBUG_FLAG], debug


def run_main(fn: Callable[[list[str]], int | None], argv: Sequence[str], debug: bool = False) -> int:
    """Run an entry point `fn(argv)` and return its exit code (None counts as 0).

    A user error becomes `error: <message>` on stderr and exit code 2; with `debug=True` it is raised, with
    its traceback. Other exceptions always propagate.
    """
    try:
        code = fn(list(argv))
    except Exception as exc:
        if debug or not is_user_error(exc):
            raise
        print(f"error: {one_line(exc)}", file=sys.stderr, flush=True)
        return USER_ERROR_EXIT_CODE
    return 0 if code is None else int(code)


class OneLineArgumentParser(argparse.ArgumentParser):
    """An `ArgumentParser` whose usage errors are one line (`prog: error: ...; see prog --help`), exit code 2,
    instead of the whole usage text followed by the error."""

    def error(self, message: str):  # noqa: D102 - argparse's hook
        self.exit(USER_ERROR_EXIT_CODE, f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n")


def parse_briefly(parse: Callable[[list[str]], T], argv: Sequence[str]) -> T:
    """`parse(argv)` for an argparse-based parser that is not a `OneLineArgumentParser` (the training script's).

    What argparse would print on a usage error (the usage text, then the error) is held back, and the error
    is raised as a `UserError` of one line; `--help` and warnings printed while parsing pass through.
    """
    held = io.StringIO()
    try:
        with contextlib.redirect_stderr(held):
            parsed = parse(list(argv))
    except SystemExit as exc:
        if exc.code in (0, None):
            sys.stderr.write(held.getvalue())
            raise
        lines = [line for line in held.getvalue().splitlines() if line.strip()]
        message = lines[-1] if lines else f"invalid arguments: {' '.join(argv)}"
        raise UserError(message.split(": error: ", 1)[-1] + " (see --help)") from None
    sys.stderr.write(held.getvalue())
    return parsed


__all__ = [
    "DEBUG_FLAG",
    "OneLineArgumentParser",
    "USER_ERROR_EXIT_CODE",
    "UserError",
    "is_user_error",
    "one_line",
    "parse_briefly",
    "run_main",
    "split_debug_flag",
]
