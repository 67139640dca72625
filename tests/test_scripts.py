"""The repository's shell scripts as a user runs them (scripts/test.sh; scripts/demo.sh is run by test_cli.py)."""

from __future__ import annotations

import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_test_command_prints_why_a_test_was_skipped(tmp_path):
    """scripts/test.sh's pytest options, on a file with one skipped test: the reason is in the output."""
    line = next(x for x in (ROOT / "scripts" / "test.sh").read_text().splitlines() if x.startswith("python -m pytest"))
    options = [a for a in shlex.split(line)[3:] if a not in ("$@", "tests")]
    (tmp_path / "test_skipping.py").write_text(
        "import pytest\n\ndef test_one():\n    pytest.skip('PartiPrompts is not available here')\n")
    res = subprocess.run([sys.executable, "-m", "pytest", *options, "test_skipping.py"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:]
    assert "SKIPPED [1] test_skipping.py:4: PartiPrompts is not available here" in res.stdout, res.stdout
