"""The package as a user installs it: a wheel, in a fresh virtual environment outside the checkout.

The wheel is built from a copy of the project's files (no network: `--no-build-isolation`) and installed with
`--no-deps` into a new venv that sees this environment's packages (torch, diffusers, ...) through a `.pth`
line, so nothing is downloaded. Every command then runs from a folder outside the checkout: what works there
works from PyPI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _run(cmd, cwd, timeout=600, **kw):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env,
                         **kw)
    assert res.returncode == 0, f"{cmd}:\n{res.stdout[-3000:]}\n{res.stderr[-5000:]}"
    return res


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """A venv outside the checkout with the wheel installed; returns its bin folder."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name) if src.exists() else (src.mkdir(), shutil.copy2(ROOT / name, src / name))
    for folder in ("diffusers_aria", "train_scripts"):  # the package links its training script from train_scripts/
        shutil.copytree(ROOT / folder, src / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    build = _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", tmp / "dist",
                  src], tmp)
    assert "License classifiers are deprecated" not in build.stdout + build.stderr  # the SPDX expression instead
    wheel = next((tmp / "dist").glob("diffusers_aria-*.whl"))
    with zipfile.ZipFile(wheel) as zf:  # the script travels as a file, with the package data
        metadata = zf.read(next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))).decode()
        assert "License-Expression: Apache-2.0" in metadata.splitlines()
        script = zf.read("diffusers_aria/training/train_aria_distill.py").decode()
        assert script == (ROOT / "train_scripts" / "train_aria_distill.py").read_text()
        assert "diffusers_aria/embedded/resources/builtin_pool_words.json" in zf.namelist()
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp)
    py = venv / "bin" / "python"
    site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp).stdout.strip()
    # this environment's packages, after the venv's own (its diffusers_aria is the wheel's; the checkout's
    # editable install is not seen: the .pth files of an added folder are not run)
    Path(site, "test_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index", wheel], tmp)
    where = _run([py, "-c", "import diffusers_aria; print(diffusers_aria.__file__)"], tmp).stdout.strip()
    assert where.startswith(str(venv)), where
    return venv / "bin"


def test_train_help_from_the_wheel(installed, tmp_path):
    res = _run([installed / "diffusers-aria", "train", "--help"], tmp_path)
    assert "usage: diffusers-aria train" in res.stdout
    for flag in ("--pretrained_model_name_or_path", "--aria_alpha", "--rc_schedule", "--allocation"):
        assert flag in res.stdout
    bad = subprocess.run([installed / "diffusers-aria", "train", "--pretrained_model_name_or_path", "no/such/teacher",
                          "--image_free"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert bad.stderr.strip().splitlines() == [bad.stderr.strip()]  # one line
    assert bad.stderr.startswith("error: --pretrained_model_name_or_path 'no/such/teacher'")


def test_the_demo_from_the_wheel(installed, tmp_path):
    """The demo's tiny path: tiny teacher, built-in pool, regions, `accelerate launch` of the shipped script."""
    out = tmp_path / "demo"
    res = _run([installed / "diffusers-aria", "demo", "--output_dir", out, "--teacher_dir", tmp_path / "teacher",
                "--new_teacher", "--teacher_train_steps", "0", "--max_train_steps", "2", "--builtin_pool_size", "200", "--",
                "--num_teacher_latents", "8", "--validation_inference_steps", "1", "--teacher_inference_steps", "1",
                "--validation_prompts", "a red fox"], tmp_path, timeout=900)
    assert "-m diffusers_aria.training.train_aria_distill" in res.stdout
    for name in ("model_index.json", "aria_report.json", "README.md", "validation_final.png"):
        assert (out / name).exists(), name
