"""Shared fixtures of the `diffusers-aria compare` tests: one smoke comparison, run once per session in two
launches (stopped after the RC arm, then resumed to the table), and small inputs made from its files."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import pytest


@dataclass
class SmokeRun:
    work: str  # the comparison's work folder
    teacher: str
    first_launch: dict  # what the first launch (--stop_after train-rc) left: marker and file mtimes
    second_output: str  # what the second launch printed
    seconds: tuple[float, float]

    def path(self, *parts: str) -> str:
        return os.path.join(self.work, *parts)

    @property
    def inputs(self) -> str:
        return self.path("smoke-inputs")

    def table(self) -> dict:
        with open(self.path("compare_table.json")) as fh:
            return json.load(fh)


def mtimes(folder: str) -> dict[str, float]:
    """Every file's modification time under `folder` (links not followed)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            out[os.path.relpath(p, folder)] = os.lstat(p).st_mtime_ns
    return out


def compare_main(argv: list[str]) -> int:
    from diffusers_aria.cli import main

    return main(["compare", *argv])


@pytest.fixture(scope="session")
def smoke_run(tiny_teacher, tmp_path_factory) -> SmokeRun:
    """`compare --preset smoke`, stopped after the RC arm, then launched again to the end."""
    import time

    work = str(tmp_path_factory.mktemp("compare") / "smoke")
    args = ["--preset", "smoke", "--teacher", tiny_teacher, "--output_dir", work]
    t0 = time.perf_counter()
    assert compare_main(args + ["--stop_after", "train-rc"]) == 0
    t1 = time.perf_counter()
    first = {"stages": sorted(os.listdir(os.path.join(work, "stages"))), "prepare": mtimes(os.path.join(work, "data")),
             "regions": mtimes(os.path.join(work, "regions")), "rc": mtimes(os.path.join(work, "rc"))}
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert compare_main(args) == 0
    return SmokeRun(work, tiny_teacher, first, out.getvalue(), (t1 - t0, time.perf_counter() - t1))


@pytest.fixture(scope="session")
def tiny_clip(smoke_run) -> str:
    return smoke_run.path("smoke-inputs", "tiny-clip")
