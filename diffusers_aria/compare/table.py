"""The comparison's one table: FID, CLIP score and epsilon error per split (seen / unseen / rare / all) for the
teacher (the reference row), the RC student and the ARIA student, then the epsilon error per ARIA region.
Written as Markdown (`compare_table.md`) and JSON (`compare_table.json`)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .eval_set import SPLITS

MODEL_NAMES = {"teacher": "teacher (reference)", "rc": "RC student", "aria": "ARIA student"}
ALL_SPLITS: tuple[str, ...] = (*SPLITS, "all")


def epsilon_by_split(eps: dict[int, float], rows: Sequence[dict]) -> dict[str, float | None]:
    """Mean epsilon error of the prompts of each split (and of all), from the per-prompt values."""
    out: dict[str, float | None] = {}
    for split in ALL_SPLITS:
        vals = [eps[r["index"]] for r in rows if split == "all" or r["split"] == split]
        out[split] = float(np.mean(vals)) if vals else None
    return out


def region_rows(eps: dict[str, dict[int, float]], rows: Sequence[dict], region_info: Sequence[dict]) -> list[dict]:
    """Per ARIA region with evaluation prompts: its size, concept share, coverage, and each arm's epsilon error."""
    out = []
    for info in region_info:
        k = info["region"]
        members = [r["index"] for r in rows if r["region"] == k]
        if not members:
            continue
        entry = {**info, "eval_prompts": len(members)}
        for arm in ("rc", "aria"):
            entry[f"eps_{arm}"] = float(np.mean([eps[arm][i] for i in members]))
        entry["aria_over_rc"] = entry["eps_aria"] / entry["eps_rc"] if entry["eps_rc"] > 0 else None
        out.append(entry)
    return out


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def render_markdown(table: dict) -> str:
    """The Markdown of a table made by `build_table`."""
    s = table["settings"]
    f = table["filter"]
    lines = [
        f"# RC vs ARIA: {s['preset']} preset",
        "",
        f"Teacher `{s['teacher']}`, student `{s['student_architecture']}`, {s['max_train_steps']} steps of batch "
        f"{s['train_batch_size']} x {s['num_processes']} process(es), seed {s['seed']}, {s['resolution'] or 'native'} px; "
        f"{s['inference_steps']} sampling steps, guidance {s['guidance_scale']}.",
        f"Concept filter {f['concept']}: {f['paired_rows_dropped']} of {f['paired_rows']} paired rows dropped; "
        f"{_fmt(f['pool_prompts_matched'])} of {f['pool_prompts']} pool prompts match it (the pool keeps them).",
        f"FID features: {s['fid_features'] or 'off (--skip_fid)'}; CLIP score: `{s['clip_model']}`; epsilon error: "
        "E||eps_student - eps_teacher||^2 / E||eps_teacher||^2 at t = 100, 400, 700 (0 for the teacher).",
        "",
        "| split (prompts) | model | FID ↓ | CLIP score ↑ | epsilon error ↓ |",
        "|---|---|---|---|---|",
    ]
    for split in ALL_SPLITS:
        n = table["splits"][split]["num_prompts"]
        for model in ("teacher", "rc", "aria"):
            m = table["splits"][split]["models"][model]
            lines.append(f"| {split} ({n}) | {MODEL_NAMES[model]} | {_fmt(m['fid'])} | {_fmt(m['clip_score'])} | "
                         f"{_fmt(m['eps'])} |")
    lines += ["", "Epsilon error per ARIA region (regions with evaluation prompts; coverage: the region's share of "
              "the filtered paired captions over its share of the pool; concept share: of its pool prompts):", "",
              "| region | pool prompts | concept share | coverage | eval prompts | RC | ARIA | ARIA / RC |",
              "|---|---|---|---|---|---|---|---|"]
    for r in table["regions"]:
        lines.append(f"| {r['region']} | {r['pool_prompts']} | {_fmt(r['concept_share'], 2)} | {_fmt(r['coverage'], 2)} | "
                     f"{r['eval_prompts']} | {_fmt(r['eps_rc'])} | {_fmt(r['eps_aria'])} | {_fmt(r['aria_over_rc'])} |")
    return "\n".join(lines) + "\n"


def build_table(settings: dict, filter_report: dict, rows: Sequence[dict], metrics: dict,
                eps: dict[str, dict[int, float]], region_info: Sequence[dict]) -> dict:
    """The table's data: `metrics[model][split]` holds {"fid", "clip_score"}; `eps[arm][index]` the per-prompt
    epsilon error of each student."""
    keys = ("preset", "teacher", "student_architecture", "max_train_steps", "train_batch_size", "num_processes",
            "seed", "resolution", "inference_steps", "guidance_scale", "fid_features", "clip_model")
    splits = {}
    eps_split = {arm: epsilon_by_split(eps[arm], rows) for arm in ("rc", "aria")}
    for split in ALL_SPLITS:
        n = sum(1 for r in rows if split == "all" or r["split"] == split)
        models = {}
        for model in ("teacher", "rc", "aria"):
            m = metrics.get(model, {}).get(split, {})
            models[model] = {"fid": m.get("fid"), "clip_score": m.get("clip_score"),
                             "eps": (0.0 if n else None) if model == "teacher" else eps_split[model][split]}
        splits[split] = {"num_prompts": n, "models": models}
    return {"settings": {k: settings.get(k) for k in keys}, "filter": dict(filter_report), "splits": splits,
            "regions": region_rows(eps, rows, region_info)}


__all__ = ["ALL_SPLITS", "build_table", "epsilon_by_split", "region_rows", "render_markdown"]
