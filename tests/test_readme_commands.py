"""The "Command line" section of docs/usage.md (the README's depth) runs as written, on what `bash scripts/demo.sh` leaves in `outputs/`.

Every ```bash block of that section is run, in order, in one bash shell (as a user types them), in a folder
that holds what the demo makes: `.venv` (this test's virtual environment), `outputs/tiny-teacher` and
`outputs/demo`. Nothing in the commands is substituted. The demo's outputs are stood in for by files of the
same layout, made in seconds by the library itself: the tests' tiny teacher, a student pipeline (the
teacher's parts), 16 regions of the 4,000-prompt built-in pool (assigned without embedding it), and the ARIA
report and checkpoint states of a callback fed a few steps. Set ARIA_DEMO_OUTPUTS to an `outputs/` folder made
by `bash scripts/demo.sh` to run the blocks on the real thing instead (its files are only read).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
README = ROOT / "docs" / "usage.md"  # the README links its "Command line" section there


def readme_command_blocks(text: str | None = None) -> list[str]:
    """The ```bash blocks of the README's "## Command line" section, in order."""
    text = README.read_text(encoding="utf-8") if text is None else text
    section = re.search(r"^## Command line\n(.*?)(?=^## )", text, flags=re.S | re.M)
    assert section, "docs/usage.md has no '## Command line' section"
    return re.findall(r"^```bash\n(.*?)^```", section.group(1), flags=re.S | re.M)


def test_the_blocks_are_found_and_use_only_what_the_demo_made():
    blocks = readme_command_blocks()
    assert blocks[0].strip() == "source .venv/bin/activate"
    commands = "\n".join(blocks)
    assert commands.count("diffusers-aria ") >= 6
    for placeholder in (" T ", " S ", " prompts.txt", " regions/"):  # the old placeholders
        assert placeholder not in commands, placeholder
    assert readme_command_blocks("## Command line\n```bash\nls\n```\n\n```bash\npwd\n```\n## Next\n```bash\nno\n```\n") == \
        ["ls\n", "pwd\n"]


def _venv_link(where: Path) -> None:
    """`.venv` in `where`: this interpreter's virtual environment (or a stand-in that puts it on PATH)."""
    venv = Path(sys.prefix)
    if (venv / "bin" / "activate").is_file():
        os.symlink(venv, where / ".venv")
        return
    (where / ".venv" / "bin").mkdir(parents=True)
    (where / ".venv" / "bin" / "activate").write_text(f'export PATH="{Path(sys.executable).parent}:$PATH"\n')


def _demo_stand_in(outputs: Path, teacher: str) -> None:
    """outputs/tiny-teacher and outputs/demo as the demo leaves them, made without training."""
    import numpy as np

    from diffusers_aria import (
        AdaptiveRegionSampler,
        ARIACallback,
        ConditionRegions,
        DiscrepancyTracker,
        make_policy,
    )
    from diffusers_aria.pool import pool_fingerprint
    from diffusers_aria.regions import DEFAULT_EMBEDDER
    from diffusers_aria.training.aria import region_names_from_groups
    from diffusers_aria.training.inputs import load_pool

    os.symlink(teacher, outputs / "tiny-teacher")
    demo = outputs / "demo"
    demo.mkdir()
    for name in os.listdir(teacher):  # the student pipeline: the teacher's parts stand in for the student's
        if name in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            os.symlink(os.path.join(teacher, name), demo / name)
    pool, groups = load_pool("builtin", builtin_size=4000, seed=0)
    order = np.argsort(np.asarray(groups), kind="stable")
    ids = np.empty(len(pool), dtype=np.int32)
    ids[order] = np.arange(len(pool)) * 16 // len(pool)  # 16 regions, each within one or two topics
    rng = np.random.default_rng(0)
    centroids = rng.standard_normal((16, 384)).astype(np.float32)
    regions = ConditionRegions(ids, centroids / np.linalg.norm(centroids, axis=1, keepdims=True),
                               metadata={"embedder": DEFAULT_EMBEDDER, "embedding_dim": 384, "seed": 0,
                                         "requested_num_regions": 16, "fingerprint": pool_fingerprint(pool)})
    regions.save(str(demo / "regions"))
    sampler = AdaptiveRegionSampler(ids, seed=0)
    callback = ARIACallback(None, sampler, DiscrepancyTracker(16), make_policy("aria", sampler.sizes, warmup_steps=0),
                            region_names=region_names_from_groups(ids, groups))
    for step in range(1, 301):
        drawn = rng.integers(0, 16, 16)
        callback.on_step_end(step, drawn, 1.0 + 0.05 * rng.standard_normal(16))
        if step in (200, 300):
            callback.save_state(str(demo / f"checkpoint-{step}"), plot=False)
    callback.write_report(str(demo), plot=False)


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory, tiny_teacher) -> Path:
    """A folder holding `.venv` and `outputs/` as after `bash scripts/demo.sh`."""
    where = tmp_path_factory.mktemp("after-demo")
    _venv_link(where)
    outputs = where / "outputs"
    outputs.mkdir()
    real = os.environ.get("ARIA_DEMO_OUTPUTS")
    if real:
        for name in ("tiny-teacher", "demo"):
            os.symlink(os.path.join(os.path.abspath(real), name), outputs / name)
    else:
        _demo_stand_in(outputs, tiny_teacher)
    return where


def test_readme_command_line_blocks_run_as_written(demo_folder):
    script = "set -euo pipefail\n" + "\n".join(readme_command_blocks())
    res = subprocess.run(["bash", "-c", script], cwd=demo_folder, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, TOKENIZERS_PARALLELISM="false"))
    assert res.returncode == 0, f"stdout:\n{res.stdout[-3000:]}\nstderr:\n{res.stderr[-3000:]}"
    out = res.stdout
    assert "policy aria at step" in out and "16 regions over 4000 prompts" in out
    assert "saved 3 regions" in out and "3 regions over 12 prompts" in out
    outputs = demo_folder / "outputs"
    result = json.loads((outputs / "eval.json").read_text())
    assert result["num_prompts"] == 64 and len(result["per_region"]) <= 16 and result["per_group"]
    assert (outputs / "my_regions" / "regions_config.json").is_file()
    # the training script on one's own pool and regions (issue 27: the docs showed no command that works)
    assert "done: student pipeline, ARIA report and model card in outputs/my-run" in out
    report = json.loads((outputs / "my-run" / "aria_report.json").read_text())
    assert report["step"] == 30 and len(report["regions"]) == 3
    assert sorted(p.name for p in (outputs / "my-run").glob("checkpoint-*")) == ["checkpoint-15", "checkpoint-30"]
