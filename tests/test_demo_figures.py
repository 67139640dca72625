"""scripts/demo_figures.py: the README's demo figures are computed from a run's report, and its block rewritten."""

from __future__ import annotations

import importlib.util
import os

import pytest

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "demo_figures.py")


@pytest.fixture(scope="module")
def demo_figures():
    spec = importlib.util.spec_from_file_location("demo_figures", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _report():
    sizes, prior = [10, 30, 60], [0.2, 0.3, 0.5]
    regions = [{"region": k, "name": f"topic{k} (100%)", "size": s, "probability": p, "estimate": e, "uncertainty": u}
               for k, (s, p, e, u) in enumerate(zip(sizes, [0.25, 0.3, 0.45], [1.1, 0.98, 0.97], [0.03, 0.04, 0.02]))]
    return {"step": 3, "policy": "aria", "metrics": {"aria/real_spread": 0.02}, "regions": regions,
            "history": {"steps": [1, 2, 3], "probabilities": [prior, prior, [0.25, 0.3, 0.45]]}}


def test_figures_and_table_come_from_the_report(demo_figures):
    fig = demo_figures.figures(_report(), {"sensitivity_before": {"100": 0.1}, "sensitivity_after": {"100": 0.2}})
    assert fig["prior_ratio_range"] == pytest.approx([0.5 / 0.6, 2.0])
    assert fig["at_prior_steps"] == 2 and fig["first_step_off_prior"] == 3
    assert fig["highest_ratio_region"]["region"] == 0 and fig["highest_ratio_region"]["ratio"] == pytest.approx(2.5)
    text = demo_figures.table(fig)
    assert "| steps, regions | 3, 3 |" in text and "0.10 -> 0.20" in text and "2 of 3 (first move at step 3)" in text


def test_the_readme_block_is_rewritten_in_place(demo_figures, tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{demo_figures.START}\nold numbers\n{demo_figures.END}\nrest\n")
    demo_figures.update_readme(str(readme), "new numbers")
    assert readme.read_text() == f"intro\n{demo_figures.START}\nnew numbers\n{demo_figures.END}\nrest\n"
    assert demo_figures.demo_validation_settings()["prompts"][0] == "a red fox in the snow"
