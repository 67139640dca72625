"""docs/add-to-your-script.md read as text: its blocks go after lines that each of the four reduced scripts holds
once, they pass diffusers' own lint and format settings where they land, and the defaults the page states are
the code's."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys

import pytest
from pasting import ASSETS, SCRIPTS, doc_blocks, named_lines, named_statement, paste

# diffusers' pyproject.toml: `make quality` runs `ruff check` and `ruff format --check` with these settings
DIFFUSERS_RUFF = """\
[tool.ruff]
line-length = 119
[tool.ruff.lint]
ignore = ["C901", "E501", "E721", "E741", "F402", "F823"]
select = ["C", "E", "I", "W"]  # and "F", which a block alone fails: it uses the script's names
[tool.ruff.lint.isort]
lines-after-imports = 2
known-first-party = ["diffusers"]
[tool.ruff.format]
quote-style = "double"
indent-style = "space"
skip-magic-trailing-comma = false
"""


@pytest.mark.parametrize("example", sorted(SCRIPTS))
def test_every_named_line_is_in_every_script_once_and_the_pasted_script_compiles(doc, example):
    script = (ASSETS / SCRIPTS[example]).read_text()
    assert "# --- ARIA" not in script and "diffusers_aria import (" not in script  # the test pastes, not the asset
    for line in named_lines(doc).values():
        named_statement(script, line)  # exactly one statement
    pasted = paste(script, doc)
    compile(pasted, SCRIPTS[example], "exec")
    assert pasted.count("# --- end ARIA") == 3
    assert "region_dataloader(" in pasted and "aria.accumulate(" in pasted and "aria.on_step_end(" in pasted


def test_blocks_fit_100_characters_and_pass_diffusers_ruff_where_they_land(doc, tmp_path):
    blocks = doc_blocks(doc)
    too_long = [line for block in blocks.values() for line in block.splitlines() if len(line) > 100]
    assert not too_long, too_long
    (tmp_path / "pyproject.toml").write_text(DIFFUSERS_RUFF)
    script = (ASSETS / SCRIPTS["train_text_to_image.py"]).read_text()
    for n, block in blocks.items():
        indent = named_statement(script, named_lines(doc)[n]).col_offset  # the same in the four scripts
        assert indent % 4 == 0
        nesting = "".join("    " * i + "if True:\n" for i in range(indent // 4))
        placed = nesting + "".join(" " * indent + line if line.strip() else line
                                   for line in block.splitlines(keepends=True))
        path = tmp_path / f"block_{n}.py"
        path.write_text(placed)
        for cmd in (["format", "--check", "--diff"], ["check"]):
            res = subprocess.run([sys.executable, "-m", "ruff", *cmd, str(path)], cwd=tmp_path, capture_output=True,
                                 text=True)
            assert res.returncode == 0, (n, cmd, res.stdout + res.stderr)


def test_the_defaults_the_page_states_are_the_codes(doc):
    from diffusers_aria import ARIAAllocation, ARIACallback, DiscrepancyTracker

    defaults = {}
    for cls in (ARIACallback, ARIAAllocation, DiscrepancyTracker):
        for name, p in inspect.signature(cls).parameters.items():
            if p.default is not inspect.Parameter.empty:
                defaults.setdefault(name, set()).add(p.default)
    prose = re.sub(r"```.*?```", "", doc, flags=re.S)
    stated = re.findall(r"`(\w+)=([\d.]+)`", prose)
    assert {"log_every", "warmup_steps", "alpha", "max_shift", "trial_ratio", "stall_draws", "damping",
            "log_regions_max"} <= {k for k, _ in stated}
    for name, value in stated:
        assert float(value) in defaults[name], (name, value, defaults.get(name))
    # block 1 shows log_every at its default and passes the regions' tree, and the text says when metrics come
    assert "log_every=1,  # aria/* metrics every optimizer step (the default)" in doc_blocks(doc)[1]
    assert "ARIAAllocation(regions.sizes, tree=regions.tree)" in doc_blocks(doc)[1]
    assert re.search(r"warm-up|warmup", prose) and "`aria/kl_to_prompt_share`" in prose


def test_the_page_names_the_four_scripts_and_the_diffusers_commit(doc):
    for example in SCRIPTS:
        assert f"`{example}`" in doc
        assert f"58eb52c0803ea9af3abec60841c2a093bdf1f951/examples/text_to_image/{example}" in doc
    assert "`58eb52c0803e`" in doc
