"""`diffusers-aria compare`: RC's unseen-concept experiment, RC vs ARIA, in one resumable command.

    diffusers-aria compare --preset smoke --output_dir outputs/compare-smoke
    diffusers-aria compare --preset one-gpu --train_data_dir coco-train/ --eval_prompts coco-val.jsonl \
        --output_dir outputs/compare-1gpu [-- extra training flags for both arms]

Stages (`stages.STAGES`), each skipped when finished:
1. prepare: the concept filter drops the unseen rows from the paired data (a filtered copy in the work
   folder), the pool keeps every caption; the regions of the pool; the evaluation prompts and their splits.
2. train-rc, train-aria: the training script through `accelerate launch`, same teacher, student, data, seeds
   and steps, `--allocation rc` and `--allocation aria`; each resumes from its latest checkpoint. The first
   steps of the RC arm are timed, and the measured cost is printed.
3. generate: the teacher and both students generate the evaluation prompts, sharded over processes.
4. metrics: FID and CLIP score per split (`metrics.Scorer`); the epsilon errors come from generation.
5. table: `compare_table.md` and `compare_table.json`.

Every check of the inputs runs before anything heavy and fails in one line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from ..utils.atomic import atomic_write_json, atomic_write_text
from ..utils.errors import UserError
from .concepts import ConceptFilter, make_filter
from .presets import PRESETS, Preset, apply_overrides, get_preset, measured_cost, nominal_cost
from .stages import PLAN_NAME, STAGES, WorkFolder, check_stage_name

SMOKE_INPUTS = "smoke-inputs"


class StageFailed(RuntimeError):
    """A stage's process failed (its own output says why); a second launch resumes it."""
#: the flags that override a preset's value (flag name = Preset field)
OVERRIDES = ("teacher", "student_architecture", "resolution", "train_batch_size", "gradient_accumulation_steps",
             "max_train_steps", "checkpointing_steps", "learning_rate", "mixed_precision", "num_processes",
             "num_eval_prompts", "inference_steps", "guidance_scale", "shard_size", "num_regions", "fid_features",
             "clip_model", "timing_steps")


def add_parser(subparsers, parents=()) -> argparse.ArgumentParser:
    """Register `compare` on the `diffusers-aria` subparsers."""
    c = subparsers.add_parser("compare", parents=list(parents),
                              help="RC vs ARIA on RC's unseen-concept protocol: both trainings, generation, FID, "
                                   "CLIP score and epsilon error per split, one table",
                              description=__doc__.split("\n\n")[0])
    c.add_argument("--output_dir", required=True, help="the work folder (one per comparison; run again to resume)")
    c.add_argument("--preset", default="smoke", choices=list(PRESETS),
                   help="smoke: CPU, tiny teacher, minutes (CI); one-gpu: SD 1.5 -> BK-SDM-Small at 256 px; paper: "
                        "RC's recipe on 8 GPUs")
    c.add_argument("--stop_after", default=None, choices=list(STAGES), help="stop after this stage (run again to go on)")
    c.add_argument("--seed", type=int, default=0, help="the seed of both arms, the choice of prompts and the images")
    g = c.add_argument_group("teacher, student and training (default: the preset's)")
    g.add_argument("--teacher", default=None, help="teacher pipeline (folder or Hub id)")
    g.add_argument("--student_architecture", default=None)
    for name, typ in (("resolution", int), ("train_batch_size", int), ("gradient_accumulation_steps", int),
                      ("max_train_steps", int), ("checkpointing_steps", int), ("learning_rate", float),
                      ("num_processes", int), ("timing_steps", int)):
        g.add_argument(f"--{name}", type=typ, default=None)
    g.add_argument("--mixed_precision", default=None, choices=["no", "fp16", "bf16"])
    g.add_argument("--report_to", default=None, help="the arms' trackers (default: none for smoke, else tensorboard)")
    g = c.add_argument_group("paired data, prompt pool, concept filter")
    g.add_argument("--train_data_dir", default=None, help="paired data: an imagefolder with metadata.jsonl")
    g.add_argument("--dataset_name", default=None, help="paired data: a Hub dataset or a save_to_disk folder")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--caption_column", default="text")
    g.add_argument("--image_column", default="image")
    g.add_argument("--prompt_pool", default=None,
                   help="the swap pool (default: every caption of the paired data, the unseen ones included)")
    g.add_argument("--prompt_pool_column", default=None)
    g.add_argument("--regions_dir", default=None, help="prebuilt regions of the pool (default: built in the work folder)")
    g.add_argument("--num_regions", type=int, default=None)
    g.add_argument("--concept_keywords", default=None,
                   help="a file of keywords (one a line) that define the unseen concept (default: the built-in "
                        "'animals' list)")
    g.add_argument("--concept_column", default=None, help="a label column of the paired data that defines it instead")
    g.add_argument("--concept_labels", nargs="+", default=None,
                   help="the --concept_column values that mark a row unseen (default: a true value)")
    g = c.add_argument_group("evaluation")
    g.add_argument("--eval_prompts", default=None,
                   help=".jsonl/.csv/.tsv/.parquet with a prompt column and reference images (.txt: prompts only, "
                        "with --skip_fid)")
    g.add_argument("--eval_prompt_column", default=None)
    g.add_argument("--eval_image_column", default=None)
    g.add_argument("--eval_split_column", default=None, help="a column of seen / unseen / rare (default: computed)")
    g.add_argument("--num_eval_prompts", type=int, default=None)
    g.add_argument("--rare_coverage", type=float, default=0.25,
                   help="a prompt is rare when its region's share of the paired captions is below this times its "
                        "share of the pool")
    g.add_argument("--inference_steps", type=int, default=None)
    g.add_argument("--guidance_scale", type=float, default=None)
    g.add_argument("--shard_size", type=int, default=None, help="prompts per generation shard (the unit of resume)")
    g.add_argument("--fid_features", default=None, help="inception, clip, or package.module:factory")
    g.add_argument("--clip_model", default=None, help="CLIP for the CLIP score (Hub id or folder)")
    g.add_argument("--skip_fid", action="store_true", help="no FID (evaluation prompts without reference images)")
    c.set_defaults(compare_handler=run)
    return c


# ------------------------------------------------------------------------------------------ settings


def resolve_settings(a: argparse.Namespace, extra: list[str]) -> tuple[Preset, dict]:
    """The preset with the user's flags applied, and the settings the plan records."""
    preset = apply_overrides(get_preset(a.preset), {k: getattr(a, k, None) for k in OVERRIDES})
    for name in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                 "num_processes", "num_eval_prompts", "inference_steps", "shard_size", "num_regions", "timing_steps"):
        if getattr(preset, name) < 1:
            raise UserError(f"--{name} {getattr(preset, name)} is not valid; it must be at least 1")
    if not 0 < a.rare_coverage:
        raise UserError(f"--rare_coverage {a.rare_coverage} is not valid; it must be above 0 (0.25: a quarter of the "
                        "region's pool share)")
    if a.train_data_dir and a.dataset_name:
        raise UserError("--train_data_dir and --dataset_name both give the paired data; pass one of them")
    smoke_root = os.path.join(os.path.abspath(a.output_dir), SMOKE_INPUTS)
    from .smoke import smoke_paths

    auto = smoke_paths(smoke_root) if preset.name == "smoke" else {}
    data_given = bool(a.train_data_dir or a.dataset_name)
    if preset.name != "smoke":
        missing = [flag for flag, given in (("--train_data_dir or --dataset_name", data_given),
                                            ("--eval_prompts", a.eval_prompts)) if not given]
        if missing:
            raise UserError(f"--preset {preset.name} needs {' and '.join(missing)}: the paired data (e.g. COCO train "
                            "captions with their images) and the evaluation prompts with reference images "
                            "(docs/compare.md shows how to write them)")
    if "--prediction_type" in extra:
        raise UserError("--prediction_type changes what the students predict; the epsilon error compares the teacher's "
                        "and the students' predictions as they are, so compare keeps the teacher's: drop it")
    fid = None if a.skip_fid else preset.fid_features
    settings = {
        "preset": preset.name, "teacher": preset.teacher or auto["teacher"],
        "student_architecture": preset.student_architecture, "resolution": preset.resolution,
        "train_batch_size": preset.train_batch_size, "gradient_accumulation_steps": preset.gradient_accumulation_steps,
        "max_train_steps": preset.max_train_steps, "checkpointing_steps": preset.checkpointing_steps,
        "learning_rate": preset.learning_rate, "mixed_precision": preset.mixed_precision,
        "num_processes": preset.num_processes, "num_eval_prompts": preset.num_eval_prompts,
        "inference_steps": preset.inference_steps, "guidance_scale": preset.guidance_scale,
        "shard_size": preset.shard_size, "num_regions": preset.num_regions, "fid_features": fid,
        "clip_model": preset.clip_model or auto["clip"], "timing_steps": preset.timing_steps, "seed": a.seed,
        "train_data_dir": _abs(a.train_data_dir) or (None if data_given else auto.get("paired")),
        "dataset_name": _abs(a.dataset_name) if a.dataset_name and os.path.isdir(a.dataset_name) else a.dataset_name,
        "dataset_config_name": a.dataset_config_name, "caption_column": a.caption_column,
        "image_column": a.image_column,
        "prompt_pool": _abs(a.prompt_pool) if a.prompt_pool and os.path.exists(a.prompt_pool) else a.prompt_pool,
        "prompt_pool_column": a.prompt_pool_column,
        "regions_dir": _abs(a.regions_dir), "concept_keywords": _abs(a.concept_keywords),
        "concept_column": a.concept_column, "concept_labels": a.concept_labels,
        "eval_prompts": _abs(a.eval_prompts) or auto.get("eval"), "eval_prompt_column": a.eval_prompt_column,
        "eval_image_column": a.eval_image_column, "eval_split_column": a.eval_split_column,
        "rare_coverage": a.rare_coverage,
        "report_to": a.report_to or ("none" if preset.name == "smoke" else "tensorboard"),
        "extra_train_args": list(preset.extra_train_args) + list(extra),
    }
    if preset.name == "smoke" and not a.prompt_pool and not data_given:
        settings["prompt_pool"], settings["prompt_pool_column"] = auto["pool"], a.prompt_pool_column or "prompt"
    if preset.teacher is None and a.teacher is None:
        settings["smoke_teacher"] = True
    if a.teacher and os.path.exists(a.teacher):
        settings["teacher"] = os.path.abspath(a.teacher)
    if settings["clip_model"] and os.path.exists(settings["clip_model"]):
        settings["clip_model"] = os.path.abspath(settings["clip_model"])
    return preset, settings


def say(message: str) -> None:
    """Print a progress line at once (the launched processes write to the same terminal)."""
    print(message, flush=True)


def _abs(path: str | None) -> str | None:
    return os.path.abspath(path) if path else None


def concept_of(settings: dict) -> ConceptFilter:
    return make_filter(settings["concept_keywords"], settings["concept_column"], settings["concept_labels"])


def print_plan(preset: Preset, settings: dict, work: WorkFolder, log=print) -> None:
    cost = nominal_cost(preset)
    log(f"compare, preset {preset.name}: {preset.description}")
    log(f"  teacher {settings['teacher']}, student {settings['student_architecture']}; 2 arms (RC, ARIA) x "
        f"{preset.max_train_steps} steps of batch {preset.train_batch_size} x {preset.num_processes} process(es); "
        f"{preset.num_eval_prompts} evaluation prompts x 3 models")
    log(f"  cost: {cost.describe()} on {preset.nominal_device}; the measured plan follows the first "
        f"{preset.timing_steps} steps of the RC arm")
    log(f"  resume: run the same command again. Finished stages are skipped, training continues from its latest "
        f"checkpoint (every {preset.checkpointing_steps} steps), generation from its finished shards")
    log(f"  work folder: {work.root}")


# ------------------------------------------------------------------------------------------ checks


def check_inputs(settings: dict, concept: ConceptFilter) -> dict:
    """Every check of the inputs, before anything heavy: the teacher, the paired data and the filter, the
    evaluation prompts and their reference images, the metrics' extractor. Returns what the checks read."""
    from ..training import preflight
    from .eval_set import read_eval_prompts
    from .metrics import check_fid_features
    from .paired import check_filter_result, read_paired, unseen_rows

    preflight.check_pipeline_dir(settings["teacher"], "--teacher")
    preflight.check_teacher_family(settings["teacher"], settings["student_architecture"], "--teacher")
    if settings["fid_features"]:
        check_fid_features(settings["fid_features"])
    if settings["clip_model"]:
        preflight.check_local_path(settings["clip_model"], "--clip_model", "CLIP model folder", hub="a Hub model id")
    if settings["prompt_pool"]:
        preflight.check_pool(settings["prompt_pool"], settings["prompt_pool_column"], flag="--prompt_pool",
                             column_flag="--prompt_pool_column")
    if settings["regions_dir"]:
        preflight.read_regions_config(settings["regions_dir"], "--regions_dir")
    source = read_paired(settings["train_data_dir"], settings["dataset_name"], settings["caption_column"], concept,
                         settings["dataset_config_name"])
    unseen = unseen_rows(source, concept)
    check_filter_result(unseen, concept, settings["train_data_dir"] or settings["dataset_name"])
    rows = read_eval_prompts(settings["eval_prompts"], settings["num_eval_prompts"], settings["seed"], concept,
                             prompt_column=settings["eval_prompt_column"], image_column=settings["eval_image_column"],
                             split_column=settings["eval_split_column"], need_images=bool(settings["fid_features"]))
    from ..utils.errors import parse_briefly
    from .launch import load_train_parser, script_args, training_command

    cmd = training_command(settings, "rc", "RC_OUTPUT", {"train_data_dir": settings["train_data_dir"],
                                                         "dataset_name": settings["dataset_name"]},
                           "REGIONS", settings["prompt_pool"] or "POOL.txt")
    parse_briefly(load_train_parser(), script_args(cmd))  # the arms' flags (and those after --) parse
    return {"source": source, "unseen": unseen, "eval_rows": rows}


# ------------------------------------------------------------------------------------------ stages


def stage_prepare(work: WorkFolder, settings: dict, concept: ConceptFilter, checked: dict, log=print) -> None:
    """Filtered paired data, the pool, the regions, the evaluation rows with their split and region."""
    import numpy as np

    from ..regions import load_or_build_regions
    from ..training.inputs import load_pool
    from .eval_set import assign_splits, region_coverage, split_counts
    from .paired import write_filtered

    source, unseen, rows = checked["source"], checked["unseen"], checked["eval_rows"]
    data_flags = write_filtered(source, ~unseen, work.path("data", "paired"))
    pool_path, pool_column = settings["prompt_pool"], settings["prompt_pool_column"]
    if pool_path is None:  # every caption of the paired data, the unseen ones included: RC's unseen setting
        seen_texts, texts = set(), []
        for t in source.all_captions():
            t = " ".join(t.split())
            if t and t not in seen_texts:
                seen_texts.add(t)
                texts.append(t)
        pool_path = work.path("data", "pool.txt")
        atomic_write_text(pool_path, "\n".join(texts) + "\n")
    pool, _ = load_pool(pool_path, pool_column, seed=settings["seed"])
    regions_dir = settings["regions_dir"] or work.path("regions")
    regions = load_or_build_regions(regions_dir, pool, check=() if settings["regions_dir"] else None,
                           num_regions=settings["num_regions"], seed=settings["seed"], progress=False)
    pool_regions = np.asarray(regions.region_ids)
    kept_captions = [c for c, drop in zip(source.first_captions(), unseen) if not drop]
    paired_regions = regions.assign(kept_captions)
    coverage = region_coverage(pool_regions, paired_regions, regions.num_regions)
    for r, k in zip(rows, regions.assign([r.prompt for r in rows])):
        r.region = int(k)
    assign_splits(rows, concept, coverage, settings["rare_coverage"])
    pool_matched, concept_share = None, [None] * regions.num_regions
    if concept.uses_keywords:
        from ..pool import iter_prompt_batches

        hits = np.concatenate([np.asarray(concept.mask_texts(b), dtype=bool) for b in iter_prompt_batches(pool)])
        pool_matched = int(hits.sum())
        sizes = np.bincount(pool_regions, minlength=regions.num_regions)
        per = np.bincount(pool_regions[hits], minlength=regions.num_regions)
        concept_share = [float(per[k] / sizes[k]) if sizes[k] else None for k in range(regions.num_regions)]
    report = {"concept": concept.describe(), "paired_rows": int(len(unseen)), "paired_rows_dropped": int(unseen.sum()),
              "pool_prompts": len(pool), "pool_prompts_matched": pool_matched, "splits": split_counts(rows)}
    sizes = np.bincount(pool_regions, minlength=regions.num_regions)
    region_info = [{"region": k, "pool_prompts": int(sizes[k]), "concept_share": concept_share[k],
                    "coverage": float(coverage[k]) if np.isfinite(coverage[k]) else None}
                   for k in range(regions.num_regions)]
    atomic_write_text(work.path("data", "eval.jsonl"), "".join(json.dumps(r.to_json()) + "\n" for r in rows))
    atomic_write_json(work.path("data", "filter.json"), report)
    atomic_write_json(work.path("data", "regions.json"), region_info)
    work.mark_done("prepare", data_flags=data_flags, pool=pool_path, pool_column=pool_column, regions_dir=regions_dir)
    log(f"concept filter {report['concept']}: {report['paired_rows_dropped']} of {report['paired_rows']} paired rows "
        f"dropped; {pool_matched if pool_matched is not None else 'n/a (a label column)'} of {len(pool)} pool prompts "
        f"match it and stay in the pool")
    log(f"evaluation prompts: {len(rows)} ({', '.join(f'{k} {v}' for k, v in report['splits'].items())})")


def _check_training_command(cmd: list[str]) -> None:
    from ..training.preflight import check_train_args
    from ..utils.errors import parse_briefly
    from .launch import load_train_parser, script_args

    check_train_args(parse_briefly(load_train_parser(), script_args(cmd)))


def arm_command(work: WorkFolder, settings: dict, arm: str, stream: str | None = None) -> list[str]:
    from .launch import training_command

    prep = work.stage_info("prepare")
    extra = ["--num_regions", str(settings["num_regions"])] if not settings["regions_dir"] else []
    pool = prep["pool"]
    s = dict(settings, prompt_pool_column=prep["pool_column"])
    return training_command(s, arm, work.path(arm), prep["data_flags"], prep["regions_dir"], pool, stream_path=stream,
                            extra=extra)


def _watch(proc: subprocess.Popen, stream: str, timing_steps: int) -> tuple[float | None, float | None]:
    """Wait for `proc`; returns (startup seconds, seconds per step) from when the step stream grew."""
    t0 = time.perf_counter()
    base = _count_lines(stream)
    seen: list[float] = []
    while proc.poll() is None:
        n = _count_lines(stream) - base
        while len(seen) < n:
            seen.append(time.perf_counter() - t0)
        if len(seen) > timing_steps:
            break
        time.sleep(0.05)
    if len(seen) < 2:
        return (seen[0] if seen else None), None
    return seen[0], (seen[-1] - seen[0]) / (len(seen) - 1)


def _count_lines(path: str) -> int:
    try:
        with open(path, "rb") as fh:
            return sum(1 for _ in fh)
    except FileNotFoundError:
        return 0


def stage_train(work: WorkFolder, preset: Preset, settings: dict, arm: str, log=print) -> None:
    from .launch import launch_env

    os.makedirs(work.path("logs"), exist_ok=True)
    timing = arm == "rc" and not os.path.isfile(work.path("cost.json"))
    stream = work.path("logs", "rc-steps.jsonl") if arm == "rc" else None
    cmd = arm_command(work, settings, arm, stream)
    _check_training_command(cmd)
    log(f"train-{arm}: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, env=launch_env())
    if timing:
        steps = preset.gradient_accumulation_steps * min(preset.timing_steps, preset.max_train_steps)
        startup, step_seconds = _watch(proc, stream, steps)
        if step_seconds is not None:
            step_seconds *= preset.gradient_accumulation_steps
            cost = measured_cost(preset, step_seconds, startup or 0.0, _count_lines(work.path("data", "eval.jsonl")))
            atomic_write_json(work.path("cost.json"), cost.to_json())
            log(f"cost: {cost.describe()}")
    rc = proc.wait()
    if rc != 0:
        raise StageFailed(f"the {arm} arm's training failed (exit code {rc}); run the same command again to resume it "
                           f"from its latest checkpoint in {work.path(arm)}")
    info_path = work.path(arm, "run_info.json")
    with open(info_path) as fh:
        info = json.load(fh)
    if info.get("global_step") != preset.max_train_steps:
        raise StageFailed(f"the {arm} arm stopped at step {info.get('global_step')} of {preset.max_train_steps}")
    work.mark_done(f"train-{arm}", global_step=info["global_step"])


def stage_generate(work: WorkFolder, settings: dict, log=print) -> None:
    """The generation worker: in this process for one process, else through `accelerate launch`."""
    from .generate import MODELS, missing_shards, read_eval_rows, run_worker
    from .launch import generation_command, launch_env

    if settings["num_processes"] == 1:
        run_worker(work.root, log=log)
        rc = 0
    else:
        cmd = generation_command(settings, work.root)
        log(f"generate: {' '.join(cmd)}")
        rc = subprocess.call(cmd, env=launch_env())
    rows = read_eval_rows(work.root)
    missing = {m: missing_shards(work.root, m, len(rows), settings["shard_size"]) for m in MODELS}
    if rc != 0 or any(missing.values()):
        raise StageFailed(f"generation stopped (exit code {rc}; shards left: "
                           f"{ {m: len(v) for m, v in missing.items()} }); run the same command again to generate "
                           "the rest")
    work.mark_done("generate")


def read_epsilon(work_dir: str) -> dict[str, dict[int, float]]:
    """Per student, the epsilon error of every evaluation prompt (from the shard records)."""
    out: dict[str, dict[int, float]] = {}
    for arm in ("rc", "aria"):
        folder = os.path.join(work_dir, "generate", arm, "shards")
        vals: dict[int, float] = {}
        for name in sorted(os.listdir(folder)):
            with open(os.path.join(folder, name)) as fh:
                rec = json.load(fh)
            vals.update(zip(rec["indices"], rec["eps"]))
        out[arm] = vals
    return out


def stage_metrics(work: WorkFolder, settings: dict, log=print) -> None:
    from .generate import MODELS, image_path, read_eval_rows
    from .metrics import Scorer
    from .table import ALL_SPLITS

    rows = read_eval_rows(work.root)
    size = settings["resolution"] or 512
    scorer = Scorer(settings["fid_features"], settings["clip_model"], image_size=size)
    results: dict[str, dict] = {m: {} for m in MODELS}
    for split in ALL_SPLITS:
        members = [r for r in rows if split == "all" or r["split"] == split]
        if not members:
            continue
        if settings["fid_features"]:
            scorer.set_reference(split, [r["image"] for r in members])
        for model in MODELS:
            paths = [image_path(work.root, model, r["index"]) for r in members]
            results[model][split] = {"fid": scorer.fid(split, paths) if settings["fid_features"] else None,
                                     "clip_score": scorer.clip(paths, [r["prompt"] for r in members])}
        log(f"metrics: {split} ({len(members)} prompts) done")
    atomic_write_json(work.path("metrics.json"), results)
    work.mark_done("metrics")


def stage_table(work: WorkFolder, settings: dict, log=print) -> dict:
    from .generate import read_eval_rows
    from .table import build_table, render_markdown

    with open(work.path("metrics.json")) as fh:
        metrics = json.load(fh)
    with open(work.path("data", "filter.json")) as fh:
        report = json.load(fh)
    with open(work.path("data", "regions.json")) as fh:
        region_info = json.load(fh)
    table = build_table(settings, report, read_eval_rows(work.root), metrics, read_epsilon(work.root), region_info)
    markdown = render_markdown(table)
    atomic_write_json(work.path("compare_table.json"), table)
    atomic_write_text(work.path("compare_table.md"), markdown)
    work.mark_done("table")
    log(markdown)
    return table


# ------------------------------------------------------------------------------------------ the command


def run(a: argparse.Namespace, extra: list[str], log=None) -> int:
    """The `compare` command (see the module doc). Returns the exit code: 0, 2 for a mistake in the inputs (one
    line), 1 when a stage's process failed (a second launch resumes it)."""
    try:
        return _run(a, extra, log or say)
    except StageFailed as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1


def _run(a: argparse.Namespace, extra: list[str], log) -> int:
    check_stage_name(a.stop_after)
    preset, settings = resolve_settings(a, extra)
    concept = concept_of(settings)
    work = WorkFolder(a.output_dir)
    allowed = frozenset({SMOKE_INPUTS})
    if work.read_plan() is not None or os.path.isdir(work.root) and set(os.listdir(work.root)) - allowed:
        work.check_or_write_plan(settings, allowed)  # the same settings, or a folder of something else: one line
    print_plan(preset, settings, work, log)
    if not work.is_done("prepare"):
        smoke_root = work.path(SMOKE_INPUTS)
        if any(isinstance(v, str) and v.startswith(smoke_root) for v in settings.values()):
            from .smoke import build_smoke_inputs

            build_smoke_inputs(smoke_root, None if settings.get("smoke_teacher") else settings["teacher"],
                               seed=settings["seed"], log=log)
        checked = check_inputs(settings, concept)
        work.check_or_write_plan(settings, allowed)
        stage_prepare(work, settings, concept, checked, log)
    if _stop(a, "prepare", log):
        return 0
    for arm in ("rc", "aria"):
        if not work.is_done(f"train-{arm}"):
            stage_train(work, preset, settings, arm, log)
        if _stop(a, f"train-{arm}", log):
            return 0
    if not work.is_done("generate"):
        stage_generate(work, settings, log)
    if _stop(a, "generate", log):
        return 0
    if not work.is_done("metrics"):
        stage_metrics(work, settings, log)
    if _stop(a, "metrics", log):
        return 0
    stage_table(work, settings, log)
    log(f"done: {work.path('compare_table.md')} and compare_table.json")
    return 0


def _stop(a: argparse.Namespace, stage: str, log) -> bool:
    if a.stop_after == stage:
        log(f"stopped after {stage} (--stop_after); run the same command without it to go on")
        return True
    return False


__all__ = ["PLAN_NAME", "add_parser", "resolve_settings", "run"]
