"""OMP_WAIT_POLICY=PASSIVE is a default of every entry point, set before torch loads, never of the library import.

OpenMP threads that spin while they wait make 2 torch threads ~7x slower than 1 on a busy CPU; OpenMP reads the
variable once, when torch loads. Each entry point runs in a fresh process whose first `import torch` records the
variable's value at that moment (tests/omp_probe/sitecustomize.py); a value the user set is kept.
"""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROBE = Path(__file__).resolve().parent / "omp_probe"
SCRIPT = ROOT / "train_scripts" / "train_aria_distill.py"
BIN = Path(sys.executable).parent


def _run(cmd: list[str], tmp_path: Path, user_value: str | None = None, **kw) -> list[tuple[str, str]]:
    """Run `cmd` with the probe and without OMP_WAIT_POLICY (or with `user_value`); (program, value) per process."""
    log = tmp_path / f"torch_env_{len(list(tmp_path.iterdir()))}.log"
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env.update(ARIA_TORCH_ENV_LOG=str(log), PYTHONPATH=os.pathsep.join([str(PROBE), env.get("PYTHONPATH", "")]))
    if user_value is not None:
        env["OMP_WAIT_POLICY"] = user_value
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=kw.get("cwd", tmp_path))
    assert res.returncode == kw.get("returncode", 0), (res.stdout[-2000:], res.stderr[-3000:])
    assert log.exists(), f"torch was never imported by {cmd}"
    return [tuple(line.split("\t")) for line in log.read_text().splitlines()]


def test_importing_the_library_sets_nothing(tmp_path):
    """A user's script that imports diffusers_aria (and torch through it) keeps its own environment."""
    code = "import diffusers_aria, sys\nassert 'torch' not in sys.modules\nfrom diffusers_aria import ARIACallback"
    assert _run([sys.executable, "-c", code], tmp_path) == [("-c", "None")]


@pytest.mark.parametrize("user_value", [None, "ACTIVE"])
def test_the_command_line(tmp_path, user_value):
    """`diffusers-aria report` loads torch in its own process (the tiny teacher and the demo's teacher train there)."""
    got = _run([str(BIN / "diffusers-aria"), "report", str(tmp_path)], tmp_path, user_value, returncode=2)
    assert got == [("diffusers-aria", user_value or "PASSIVE")]


@pytest.mark.parametrize("user_value", [None, "ACTIVE"])
def test_the_training_script_run_directly(tmp_path, user_value):
    got = _run([sys.executable, str(SCRIPT), "--help"], tmp_path, user_value)
    assert got == [("train_aria_distill.py", user_value or "PASSIVE")]


def test_the_training_script_under_accelerate_launch(tmp_path):
    """accelerate's launcher loads torch itself (its own business); the script's process sets the default first."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "1", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), "--help"]
    got = dict(_run(cmd, tmp_path))
    assert got["train_aria_distill.py"] == "PASSIVE"


def test_the_benchmarks_helper(tmp_path):
    """benchmarks/_common.py sets the default; every benchmark imports it before torch (next test)."""
    code = "import sys\nsys.path.insert(0, sys.argv[1])\nimport _common\nimport torch"
    assert _run([sys.executable, "-c", code, str(ROOT / "benchmarks")], tmp_path) == [("-c", "PASSIVE")]


TORCH_LOADERS = ("torch", "diffusers_aria", "diffusers", "transformers", "accelerate", "sentence_transformers",
                 "datasets", "_miniature", "faiss")


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "benchmarks").glob("[!_]*.py")))
def test_every_benchmark_sets_the_default_before_torch(name):
    """The first top-level import that can load torch comes after `_common` (or the script's own default)."""
    tree = ast.parse((ROOT / "benchmarks" / name).read_text())
    first_default = first_loader = None
    for i, node in enumerate(tree.body):
        mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
        src = ast.unparse(node)
        if first_default is None and ("_common" in mods or "OMP_WAIT_POLICY" in src):
            first_default = i
        if first_loader is None and any(m.split(".")[0] in TORCH_LOADERS for m in mods):
            first_loader = i
    assert first_default is not None and (first_loader is None or first_default < first_loader), (
        f"benchmarks/{name}: import _common before torch (statement {first_loader})")


def test_bootstrap_exports_the_default_and_keeps_a_user_value():
    """scripts/bootstrap.sh (sourced by scripts/demo.sh and scripts/test.sh) exports it before anything runs."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    env["ARIA_VENV"] = str(BIN.parent)
    show = ". scripts/bootstrap.sh >/dev/null && echo \"$OMP_WAIT_POLICY\""
    for preset, expected in (("", "PASSIVE"), ("export OMP_WAIT_POLICY=ACTIVE; ", "ACTIVE")):
        res = subprocess.run(["bash", "-c", preset + show], cwd=ROOT, capture_output=True, text=True, env=env,
                             timeout=300)
        assert res.returncode == 0, res.stderr[-2000:]
        assert res.stdout.split()[-1] == expected
