#!/usr/bin/env python
"""Regenerate the README's demo pictures and figures from a finished demo run, with the current code.

    bash scripts/demo.sh                                   # the run (outputs/demo, teacher in outputs/tiny-teacher)
    python scripts/demo_figures.py outputs/demo --readme README.md

It writes `docs/images/demo_validation.png` (the labelled teacher-vs-student grid, the tiny teacher's latents
drawn by its `LatentRenderer`) and `docs/images/demo_allocation.png` (the allocation plot, from the run's newest
valid checkpoint), prints the figures the README quotes as a table, writes them as JSON
(`docs/images/demo_figures.json`), and with `--readme` rewrites the README's block between
`<!-- demo-figures:start -->` and `<!-- demo-figures:end -->`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

START, END = "<!-- demo-figures:start -->", "<!-- demo-figures:end -->"


def demo_validation_settings() -> dict:
    """The validation prompts and settings `diffusers-aria demo` passes to the training script."""
    from diffusers_aria.cli import demo_command

    cmd = demo_command("out", "teacher", 300, 1, [])
    i = cmd.index("--validation_prompts") + 1
    prompts = []
    while not cmd[i].startswith("--"):
        prompts.append(cmd[i])
        i += 1

    def value(flag: str, default: str) -> str:
        return cmd[cmd.index(flag) + 1] if flag in cmd else default

    return {"prompts": prompts, "num_inference_steps": int(value("--validation_inference_steps", "25")),
            "guidance_scale": float(value("--validation_guidance_scale", "5.0")),
            "resolution": int(value("--resolution", "512")), "seed": int(value("--seed", "0"))}


def figures(report: dict, teacher_report: dict | None = None, tolerance: float = 0.02) -> dict:
    """The numbers the README quotes, from a run's `aria_report.json` (with its history) and the teacher's report.

    `at_prior_steps`: logged steps at which every region's probability is within `tolerance` (relative) of
    ARIA's starting allocation, its size prior.
    """
    regions = report["regions"]
    share = np.array([r["size"] for r in regions], dtype=np.float64)
    share /= share.sum()
    est = np.array([r["estimate"] for r in regions])
    se = np.array([np.nan if r["uncertainty"] is None else r["uncertainty"] for r in regions])
    prob = np.array([r["probability"] for r in regions])
    hist = report.get("history") or {}
    steps, probs = hist.get("steps", []), np.array(hist.get("probabilities", []), dtype=np.float64)
    out = {"step": report["step"], "num_regions": len(regions),
           "final_estimate_range": [float(est.min()), float(est.max())],
           "standard_error_range": [float(np.nanmin(se)), float(np.nanmax(se))],
           "real_spread": float(report["metrics"].get("aria/real_spread", float("nan"))),
           "final_ratio_range": [float((prob / share).min()), float((prob / share).max())]}
    if len(probs):
        ratio = probs / share[None, :]
        start = probs[0]
        moved = np.abs(probs / start[None, :] - 1.0).max(axis=1)
        out.update({"prior_ratio_range": [float(ratio[0].min()), float(ratio[0].max())],
                    "ratio_range_over_training": [float(ratio.min()), float(ratio.max())],
                    "vs_prior_range_over_training": [float((probs / start).min()), float((probs / start).max())],
                    "logged_steps": len(steps),
                    "at_prior_steps": int((moved <= tolerance).sum()),
                    "first_step_off_prior": next((int(s) for s, m in zip(steps, moved) if m > tolerance), None)})
    top = int(np.argmax(prob / share))
    out["highest_ratio_region"] = {"region": top, "name": regions[top]["name"], "ratio": float(prob[top] / share[top]),
                                   "estimate": float(est[top]), "size": int(regions[top]["size"])}
    if teacher_report:
        out["teacher_sensitivity_t100"] = [teacher_report["sensitivity_before"]["100"],
                                           teacher_report["sensitivity_after"]["100"]]
    return out


def table(fig: dict) -> str:
    """The figures as a markdown table (the README's block)."""
    def rng(key: str, fmt: str = "{:.2f}", unit: str = "") -> str:
        lo, hi = fig[key]
        return f"{fmt.format(lo)}{unit}-{fmt.format(hi)}{unit}"

    rows = [("steps, regions", f"{fig['step']}, {fig['num_regions']}")]
    if "teacher_sensitivity_t100" in fig:
        before, after = fig["teacher_sensitivity_t100"]
        rows.append(("teacher text sensitivity at t=100, before -> after training", f"{before:.2f} -> {after:.2f}"))
    rows += [("final discrepancy estimates (1 = average)", rng("final_estimate_range")),
             ("their standard errors", rng("standard_error_range", "{:.3f}")),
             ("real spread counted by ARIA, sqrt(A)", f"{fig['real_spread']:.3f}")]
    if "prior_ratio_range" in fig:
        rows += [("ARIA's size prior, probability / prompt share", rng("prior_ratio_range", unit="x")),
                 ("probability / prompt share, any logged step", rng("ratio_range_over_training", unit="x")),
                 ("probability / ARIA's prior, any logged step", rng("vs_prior_range_over_training", "{:.3f}", "x")),
                 ("logged steps within 2% of the prior",
                  f"{fig['at_prior_steps']} of {fig['logged_steps']}"
                  + (f" (first move at step {fig['first_step_off_prior']})" if fig["first_step_off_prior"] else ""))]
    h = fig["highest_ratio_region"]
    rows.append(("highest probability / prompt share at the end",
                 f"{h['ratio']:.2f}x: region {h['region']} ({h['name']}, {h['size']} prompts), estimate "
                 f"{h['estimate']:.3f}"))
    return "| figure | value |\n|---|---|\n" + "\n".join(f"| {a} | {b} |" for a, b in rows)


def allocation_plot(run: str, report: dict, path: str) -> str:
    """The allocation plot of the run's newest valid checkpoint, drawn by the current `ARIACallback.plot`."""
    from dataclasses import fields

    from diffusers_aria import AdaptiveRegionSampler, ARIACallback
    from diffusers_aria.regions import ConditionRegions
    from diffusers_aria.settings import AriaSettings
    from diffusers_aria.training.checkpointing import checkpoint_problems, list_checkpoints

    ckpt = next((p for _, p in reversed(list_checkpoints(run)) if not checkpoint_problems(p)), None)
    if ckpt is None:
        raise SystemExit(f"{run!r} holds no valid checkpoint to draw the allocation from")
    names = {f.name for f in fields(AriaSettings)}
    settings = AriaSettings(allocation=report["policy"],
                            **{k: v for k, v in report["policy_config"].items() if k in names})
    regions = ConditionRegions.load(os.path.join(run, "regions"))
    sampler = AdaptiveRegionSampler(regions.region_ids, seed=0)
    cb = ARIACallback(None, sampler, settings.make_tracker(regions.num_regions), settings.make_policy(sampler.sizes),
                      register_hooks=False, region_names=[r["name"] for r in report["regions"]])
    cb.load_state(ckpt)
    return cb.plot(path)


def validation_picture(run: str, teacher: str, path: str) -> str:
    """The labelled teacher-vs-student grid of the demo's validation prompts, with the run's final student."""
    import torch
    from diffusers import UNet2DConditionModel

    from diffusers_aria.embedded.latent_renderer import load_latent_renderer
    from diffusers_aria.teachers.parts import load_teacher
    from diffusers_aria.training.validation import RENDER_TITLE, validation_grid

    v = demo_validation_settings()
    parts = load_teacher(teacher)
    student = UNet2DConditionModel.from_pretrained(os.path.join(run, "unet")).eval()
    renderer = load_latent_renderer(teacher)
    with torch.no_grad():
        grid = validation_grid(parts.pipeline_components(), parts.denoiser, student, v["prompts"], seed=v["seed"],
                               num_inference_steps=v["num_inference_steps"], guidance_scale=v["guidance_scale"],
                               resolution=v["resolution"], renderer=renderer,
                               title="end of training" + (f" - {RENDER_TITLE}" if renderer is not None else ""))
    grid.save(path)
    return path


def update_readme(readme: str, block: str) -> None:
    with open(readme, encoding="utf-8") as fh:
        text = fh.read()
    if START not in text or END not in text:
        raise SystemExit(f"{readme!r} has no {START} ... {END} block to rewrite")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    with open(readme + ".tmp", "w", encoding="utf-8") as fh:
        fh.write(head + START + "\n" + block + "\n" + END + tail)
    os.replace(readme + ".tmp", readme)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="a finished demo run (e.g. outputs/demo)")
    p.add_argument("--teacher", default=None, help="the run's teacher (default: tiny-teacher beside the run folder)")
    p.add_argument("--images", default="docs/images", help="where the pictures and the JSON go")
    p.add_argument("--readme", default=None, help="rewrite this README's demo-figures block")
    a = p.parse_args(argv)
    teacher = a.teacher or os.path.join(os.path.dirname(os.path.abspath(a.run)), "tiny-teacher")
    with open(os.path.join(a.run, "aria_report.json")) as fh:
        report = json.load(fh)
    from diffusers_aria.utils.file_names import TEACHER_REPORT

    teacher_report = None
    if os.path.isfile(os.path.join(teacher, TEACHER_REPORT)):
        with open(os.path.join(teacher, TEACHER_REPORT)) as fh:
            teacher_report = json.load(fh)
    os.makedirs(a.images, exist_ok=True)
    fig = figures(report, teacher_report)
    validation = validation_picture(a.run, teacher, os.path.join(a.images, "demo_validation.png"))
    allocation = allocation_plot(a.run, report, os.path.join(a.images, "demo_allocation.png"))
    with open(os.path.join(a.images, "demo_figures.json"), "w") as fh:
        json.dump(fig, fh, indent=1)
    block = table(fig)
    print(block)
    if a.readme:
        rel = os.path.relpath(a.images, os.path.dirname(os.path.abspath(a.readme)) or ".")
        update_readme(a.readme, "\n\n".join([
            f"![teacher vs student, labelled]({rel}/{os.path.basename(validation)})",
            f"![ARIA allocation with region names, error bars and a caption]({rel}/{os.path.basename(allocation)})",
            block]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
