"""Atomic file writes: a file (or a folder) is either its old self or complete, never half-written.

Every write goes to a fresh temporary name in the target's folder (unique per process and call, so two
processes writing the same path never share a temporary file) and is renamed over the target with
`os.replace` once complete; on an error the temporary file is removed and the target is untouched.
Temporary files and folders are created as `open()` and `os.makedirs` create theirs (mode 0o666 / 0o777 less
the user's umask), not owner-only as `tempfile.mkstemp`/`mkdtemp` make them: the renamed file keeps that mode.

    with atomic_write("report.json") as fh:        # text (mode "w") or bytes (mode "wb")
        json.dump(report, fh)
    atomic_write_json("state.json", state)
    atomic_save("ids.npy", lambda tmp: np.save(tmp, ids))   # any writer that takes a path
    atomic_copy("grid.png", "out/images/grid.png")
    tmp = make_temp_dir("regions")                      # a folder built under a temporary name beside "regions",
    replace_dir(tmp, "regions")                         # then moved into place
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from typing import IO, Any


def _unique_name(directory: str, base: str) -> str:
    return os.path.join(directory, f".{base}.{os.getpid()}-{secrets.token_hex(4)}.tmp")


def _temp_path(path: str) -> str:
    """A new empty file beside `path`, created with the mode `open()` gives (0o666 less the umask)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    while True:
        tmp = _unique_name(directory, base)
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return tmp
        except FileExistsError:  # pragma: no cover - 32 random bits taken by another writer
            continue


def make_temp_dir(path: str | os.PathLike) -> str:
    """A new empty folder beside `path` (for `replace_dir`), created with the mode `os.makedirs` gives
    (0o777 less the umask)."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    while True:
        tmp = _unique_name(directory, os.path.basename(path))
        try:
            os.mkdir(tmp, 0o777)
            return tmp
        except FileExistsError:  # pragma: no cover
            continue


def atomic_save(path: str | os.PathLike, write: Callable[[str], Any], suffix: str = "") -> None:
    """Call `write(tmp_path)`, then rename the result to `path`. `suffix` is appended to the temporary name
    for writers that insist on an extension (e.g. `np.save` adds `.npy` unless the name has it)."""
    path = os.fspath(path)
    tmp = _temp_path(path)
    target = tmp + suffix
    try:
        write(target)
        os.replace(target, path)
    finally:
        for leftover in {tmp, target}:
            with contextlib.suppress(FileNotFoundError):
                os.remove(leftover)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[IO]:
    """Open a temporary file for writing; on a clean exit it replaces `path`, on an error it is removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_write mode {mode!r} is not valid; use 'w' (text) or 'wb' (bytes)")
    path = os.fspath(path)
    tmp = _temp_path(path)
    try:
        with open(tmp, mode, **({"encoding": encoding} if mode == "w" else {})) as fh:
            yield fh
            fh.flush()
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_write(path) as fh:
        fh.write(text)


def atomic_write_json(path: str | os.PathLike, data: Any, indent: int | None = 1, **dump_kwargs) -> None:
    with atomic_write(path) as fh:
        json.dump(data, fh, indent=indent, **dump_kwargs)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Copy `src` to `dst` (contents and permission bits) through a temporary file."""
    atomic_save(dst, lambda tmp: shutil.copyfile(src, tmp))


def replace_dir(tmp_dir: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move the complete folder `tmp_dir` to `path` (a sibling, on the same file system), replacing any folder there.

    `os.replace` cannot replace a folder that is not empty, so an existing one is first renamed aside to
    `<path>.old-<name of tmp_dir>` and removed once the new one is in place. The caller builds `tmp_dir` under a
    name its readers ignore, and removes it when the build fails.
    """
    tmp_dir, path = os.fspath(tmp_dir), os.fspath(path)
    if os.path.exists(path):
        old = f"{path}.old-{os.path.basename(tmp_dir)}"
        os.replace(path, old)
        os.replace(tmp_dir, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp_dir, path)
