"""The `diffusers-aria` command line: regions, reports, evaluation, the tiny teacher, and the embedded demo.

    diffusers-aria regions build --pool prompts.txt --num_regions 256 --output regions/
    diffusers-aria regions show regions/ [--pool prompts.txt]
    diffusers-aria report OUTPUT_OR_CHECKPOINT_DIR
    diffusers-aria evaluate --teacher T --student S [--pool builtin] [--regions DIR]
    diffusers-aria make-tiny-teacher OUTPUT_DIR [--train_steps N] [--num_prompts N] [--force]
    diffusers-aria make-tiny-teacher OUTPUT_DIR --family {sdxl,pixart,sd3} [--seed N] [--force]
    diffusers-aria demo [--output_dir outputs/demo]
    diffusers-aria train --pretrained_model_name_or_path T --output_dir OUT ...   (the training script)
    diffusers-aria compare --preset {smoke,one-gpu,paper} --output_dir DIR [...] (docs/compare.md)

A mistake in the arguments (a missing file, an empty pool, a bad column, --num_regions above the pool's size,
an output folder that holds something else, a damaged checkpoint) ends in one line `error: ...` and exit code 2,
found by the checks of `diffusers_aria.training.preflight` before the models load; `--debug` shows the traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import runpy
import subprocess
import sys

from .embedded import TINY_TEACHER_RECIPE, TINY_TEACHER_TRAIN_STEPS
from .hierarchy import DEFAULT_BRANCHING
from .regions import DEFAULT_EMBEDDER
from .training import preflight
from .utils.errors import OneLineArgumentParser, UserError, run_main, split_debug_flag

#: the training script, shipped in the package (`train_scripts/train_aria_distill.py` of the repository):
#: `diffusers-aria train ...`, or `accelerate launch -m diffusers_aria.training.train_aria_distill ...`
TRAIN_MODULE = "diffusers_aria.training.train_aria_distill"


def default_cpu_env() -> None:
    """Default `OMP_WAIT_POLICY` to PASSIVE, keeping a value the user set.

    OpenMP threads that spin while waiting make 2 torch threads ~7x slower than 1 on a busy 2-core machine.
    OpenMP reads the variable once, when torch loads: `main` calls this before anything loads torch (this
    module and `import diffusers_aria` do not), so it reaches this process and the ones it starts.
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _cmd_regions_build(a: argparse.Namespace) -> int:
    preflight.check_regions_output(a.output, "--output")
    preflight.check_pool(a.pool, a.column, builtin_size=a.builtin_pool_size, num_regions=a.num_regions)
    if not (a.work_dir is not None and a.embedder.split(":")[0] == "hashing"):  # the sharded build's stand-in
        preflight.check_embedder(a.embedder)
    from .regions import build_regions
    from .training.inputs import load_pool

    if a.work_dir is not None:
        return _regions_build_sharded(a)
    pool, _ = load_pool(a.pool, a.column, builtin_size=a.builtin_pool_size, seed=a.seed)
    regions = build_regions(pool, num_regions=a.num_regions, embedder=a.embedder, seed=a.seed, method=a.method,
                            embeddings_cache_dir=a.embeddings_cache, branching=a.region_branching)
    regions.save(a.output)
    print(regions.summary(pool))
    print(f"saved {regions.num_regions} regions to {a.output}")
    return 0


def _regions_build_sharded(a: argparse.Namespace) -> int:
    """`regions build --work_dir W`: every process of the launch embeds its shard (see `sharded_regions`)."""
    from .pool import load_prompt_pool
    from .sharded_regions import build_regions_sharded
    from .training.inputs import load_pool
    from .utils.processes import launched_state

    state = launched_state()
    with state.main_process_first():  # a parquet/json pool is converted to Arrow once, by the main process
        if a.pool == "builtin":
            pool, _ = load_pool(a.pool, a.column, builtin_size=a.builtin_pool_size, seed=a.seed)
        else:  # memory-mapped, not validated row by row (pools of tens of millions of prompts)
            pool = load_prompt_pool(a.pool, column=a.column, validate=False)
    regions = build_regions_sharded(pool, a.num_regions, a.work_dir, embedder=a.embedder, seed=a.seed,
                                    sample_size=a.sample_size, chunk_size=a.chunk_size, batch_size=a.batch_size,
                                    method=a.method, min_region_size=a.min_region_size, accelerator=state,
                                    progress=state.is_main_process and not a.no_progress,
                                    branching=a.region_branching)
    if state.is_main_process:
        regions.save(a.output)
        s = regions.metadata["sharded_build"]
        if not a.no_progress:
            print(regions.summary(pool))
        print(f"saved {regions.num_regions} regions of {regions.num_prompts} prompts to {a.output} "
              f"({s['num_processes']} processes; this one embedded {s['chunks_embedded']} of {s['chunks']} chunks)")
    state.wait_for_everyone()
    return 0


def _cmd_regions_show(a: argparse.Namespace) -> int:
    config = preflight.read_regions_config(a.regions_dir, "REGIONS_DIR")
    if a.pool:
        info = preflight.check_pool(a.pool, a.column, builtin_size=a.builtin_pool_size)
        preflight.check_regions_match_pool(config, a.regions_dir, info, "--pool")
    from .regions import ConditionRegions
    from .training.inputs import load_pool

    regions = ConditionRegions.load(a.regions_dir)
    pool = None
    if a.pool:
        pool, _ = load_pool(a.pool, a.column, builtin_size=a.builtin_pool_size, seed=a.seed)
        regions.check_pool(pool)
    print(regions.summary(pool))
    return 0


def _read_report(path: str) -> dict:
    """The summary of a run's `aria_report.json` or a checkpoint's `aria_state.json` (or of such a file)."""
    from .callback import STATE_JSON

    if not os.path.exists(path):
        raise UserError(f"report {path!r}: no such folder; pass a run's output folder (e.g. outputs/demo) or one of "
                        "its checkpoint-N folders")
    candidates = [path] if os.path.isfile(path) else [os.path.join(path, "aria_report.json"),
                                                      os.path.join(path, STATE_JSON)]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        raise UserError(f"{path!r} holds no aria_report.json or {STATE_JSON}; pass a run's output folder (e.g. "
                        "outputs/demo) or one of its checkpoint-N folders")
    try:
        with open(found) as fh:
            data = json.load(fh)
        summary = data.get("summary", data)
        for key in ("policy", "step", "metrics", "regions"):
            summary[key]  # noqa: B018 - a report without these is not one
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{found!r} is damaged (not valid JSON: {getattr(err, 'msg', err)}); take the report of "
                        "a checkpoint-N folder of the run, or another run") from None
    except (AttributeError, KeyError, TypeError) as err:
        raise UserError(f"{found!r} is not an ARIA report ({type(err).__name__}: {err} missing); pass a run's "
                        "output folder or a checkpoint-N folder") from None
    return summary


def _cmd_report(a: argparse.Namespace) -> int:
    summary = _read_report(a.path)
    print(f"policy {summary['policy']} at step {summary['step']}")
    for k, v in summary["metrics"].items():
        print(f"  {k}: {v:.4g}")
    # the columns of aria_report.md: draws is the share of the run's draws the region got
    print(f"{'region':>6} {'size':>7} {'share':>8} {'prob':>8} {'estimate':>9} {'draws':>8}  name")
    for r in sorted(summary["regions"], key=lambda r: -r["estimate"])[: a.top]:
        draws = r.get("draw_share")
        print(f"{r['region']:>6} {r['size']:>7} {r.get('prompt_share', r.get('prior')):>8.4f} {r['probability']:>8.4f} "
              f"{r['estimate']:>9.3f} {'-' if draws is None else format(draws, '.4f'):>8}  {r.get('name') or ''}")
    return 0


def _cmd_evaluate(a: argparse.Namespace) -> int:
    preflight.check_pipeline_dir(a.teacher, "--teacher")
    preflight.check_pipeline_dir(a.student, "--student")
    info = preflight.check_pool(a.pool, a.column, builtin_size=a.builtin_pool_size)
    if a.regions:
        config = preflight.read_regions_config(a.regions, "--regions")
        preflight.check_regions_match_pool(config, a.regions, info, "--pool")
    if a.num_prompts < 1:
        raise UserError(f"--num_prompts {a.num_prompts} is not valid; it must be at least 1")
    preflight.check_output_file(a.output, "--output")
    import numpy as np

    from .pool import get_prompts
    from .regions import ConditionRegions
    from .training.evaluation import evaluate_student
    from .training.inputs import load_pool

    pool, groups = load_pool(a.pool, a.column, builtin_size=a.builtin_pool_size, seed=a.seed)
    rng = np.random.default_rng(a.seed + 1)
    idx = np.sort(rng.choice(len(pool), size=min(a.num_prompts, len(pool)), replace=False))
    region_ids = None
    if a.regions:
        regions = ConditionRegions.load(a.regions)
        regions.check_pool(pool)
        region_ids = np.asarray(regions.region_ids)[idx].tolist()
    if a.output and os.path.dirname(a.output):
        os.makedirs(os.path.dirname(a.output), exist_ok=True)
    res = evaluate_student(a.teacher, a.student, get_prompts(pool, idx), region_ids,
                           [groups[i] for i in idx] if groups else None, seed=a.seed, output_json=a.output,
                           num_regions=regions.num_regions if a.regions else None)
    print(evaluation_table(res, a.pool))
    if a.output:
        print(f"all values: {a.output}")
    return 0


def evaluation_table(res: dict, pool: str) -> str:
    """`evaluate`'s result as text: overall, per timestep, per region (hardest first) and per group, with the
    number of held-out prompts behind each value, and the regions that had none."""
    lines = [f"held-out gap of the student to the teacher on {res['num_prompts']} prompts of {pool} (normalised "
             "prediction error, 0 = the same as the teacher)",
             f"overall {res['overall']:.4f}; by timestep: "
             + ", ".join(f"t={t} {v:.4f}" for t, v in res["per_timestep"].items())]
    for key, title in (("region", "region"), ("group", "group")):
        values = res.get(f"per_{key}")
        if not values:
            continue
        counts = res.get(f"per_{key}_prompts", {})
        width = max(len(title), *(len(k) for k in values))
        lines += ["", f"{title:>{width}}  prompts     gap"]
        lines += [f"{k:>{width}}  {counts.get(k, 0):>7}  {v:.4f}"
                  for k, v in sorted(values.items(), key=lambda kv: -kv[1])]
    missing = res.get("regions_without_prompts")
    if missing:
        shown = ", ".join(map(str, missing[:20])) + (f", ... ({len(missing)} regions)" if len(missing) > 20 else "")
        lines += ["", f"no held-out prompt fell in {len(missing)} of the regions, so they have no value: {shown}; "
                      "raise --num_prompts to cover them"]
    return "\n".join(lines)


def _cmd_make_tiny_teacher(a: argparse.Namespace) -> int:
    preflight.check_teacher_output_dir(a.output_dir, "OUTPUT_DIR")
    preflight.check_offline_minilm("make-tiny-teacher")
    if a.family != "sd":
        return _make_tiny_family_teacher(a)
    if a.train_steps < 0:
        raise UserError(f"--train_steps {a.train_steps} is not valid; it must be 0 or more")
    if a.num_prompts is not None and a.num_prompts < 2:
        raise UserError(f"--num_prompts {a.num_prompts} is not valid; the teacher needs at least 2 prompts")
    from .embedded.tiny_teacher import make_tiny_teacher

    prompts = None
    if a.num_prompts is not None:
        from .embedded.builtin_pool import builtin_prompt_records

        prompts = [r["prompt"] for r in builtin_prompt_records(num_prompts=a.num_prompts, seed=0)]
    report = make_tiny_teacher(a.output_dir, prompts=prompts, train_steps=a.train_steps, seed=a.seed, force=a.force)
    _print_teacher_report(report)
    return 0


def _make_tiny_family_teacher(a: argparse.Namespace) -> int:
    """`--family sdxl|pixart|sd3`: a random-weight teacher of that family (nothing to train, no prompts)."""
    for flag, value in (("--train_steps", a.train_steps), ("--num_prompts", a.num_prompts)):
        if value is not None:
            raise UserError(f"{flag} applies only to --family sd; the {a.family} teacher has random weights")
    from .embedded.tiny_families import make_tiny_family_teacher

    path = make_tiny_family_teacher(a.output_dir, a.family, seed=a.seed, force=a.force)
    print(f"tiny {a.family} teacher (random weights) at {path}")
    return 0


def _print_teacher_report(report) -> None:
    state = "reused cached teacher" if report.cached else f"trained for {report.train_steps} steps in {report.seconds:.0f} s"
    print(f"tiny teacher at {report.path} ({state})")
    print("text sensitivity E||eps(c1)-eps(c2)||^2 / E||eps||^2 by timestep:")
    for t in sorted(report.sensitivity_after):
        print(f"  t={t:>4}: before {report.sensitivity_before[t]:.3f}  after {report.sensitivity_after[t]:.3f}")


DEMO_NUM_REGIONS = 16  # regions of the built-in pool in the demo (a user's pool gets the library's default)


def _has_flag(args: list[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def demo_command(output_dir: str, teacher_dir: str, max_train_steps: int, num_processes: int, extra: list[str],
                 pool_size: int = 4000) -> list[str]:
    """The `accelerate launch` command line of the embedded default run. `extra` (the arguments after `--`) comes
    last and so overrides the demo's own; with a pool of the user's (`--prompt_pool`), the number of regions is
    the library's default for its size unless `--num_regions` is among them."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--num_processes", str(num_processes)]
    launch += ["--multi_gpu"] if num_processes > 1 else ["--cpu"]
    regions = [] if _has_flag(extra, "--prompt_pool") else ["--num_regions", str(DEMO_NUM_REGIONS)]
    return launch + [
        "-m", TRAIN_MODULE, "--pretrained_model_name_or_path", teacher_dir, "--output_dir", output_dir,
        "--image_free", "--num_teacher_latents", "256", "--teacher_inference_steps", "15",
        "--prompt_pool", "builtin", "--builtin_pool_size", str(pool_size), *regions,
        "--resolution", "32", "--train_batch_size", str(max(16 // num_processes, 1)),
        "--max_train_steps", str(max_train_steps), "--learning_rate", "3e-4", "--lr_warmup_steps", "10",
        "--rc_schedule", "constant", "--rc_constant", "0.5", "--allocation", "aria",
        "--checkpointing_steps", str(max(max_train_steps // 3, 1)), "--checkpoints_total_limit", "2",
        "--validation_prompts", "a red fox in the snow", "a bowl of ramen with chopsticks",
        "a saxophone on a stage", "an astronaut floating near a nebula",
        "--validation_inference_steps", "20", "--aria_log_every", "10", "--report_to", "tensorboard",
    ] + extra


def _tiny_teachers_beside(path: str) -> list[str]:
    """Tiny teacher folders beside `path` (for the hint when --teacher_dir names none)."""
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return []
    from .utils.file_names import TEACHER_REPORT

    shown = os.path.dirname(os.path.normpath(path))
    return sorted(os.path.join(shown, n) for n in os.listdir(parent)
                  if os.path.isfile(os.path.join(parent, n, TEACHER_REPORT)))


def check_demo_teacher(teacher_dir: str, explicit: bool, new_teacher: bool, train_steps: int,
                       num_prompts: int) -> bool:
    """The demo's tiny teacher folder: returns True when a teacher is there to reuse, False when the demo trains
    one. A `--teacher_dir` the user named that does not exist is refused unless `new_teacher` (a misspelt folder
    would otherwise start a new training of minutes), and a teacher made with other settings is never replaced."""
    from .utils.file_names import TEACHER_REPORT

    preflight.check_teacher_output_dir(teacher_dir, "--teacher_dir")
    if not os.path.exists(teacher_dir):
        if explicit and not new_teacher:
            found = _tiny_teachers_beside(teacher_dir)
            beside = f" (tiny teachers beside it: {', '.join(found)})" if found else ""
            raise UserError(f"--teacher_dir {teacher_dir!r}: no tiny teacher there{beside}; pass the folder of one made "
                            "before, or add --new_teacher to train one there (a few minutes)")
        return False
    try:
        with open(os.path.join(teacher_dir, TEACHER_REPORT)) as fh:
            made = json.load(fh).get("settings") or {}
    except (OSError, ValueError, AttributeError):
        made = {}
    asked = {"train_steps": (train_steps, "--teacher_train_steps"),
             "num_prompts": (num_prompts, "--builtin_pool_size"), "seed": (0, None),
             "recipe_version": (TINY_TEACHER_RECIPE, None)}
    differ = [(key, made[key], value, flag) for key, (value, flag) in asked.items()
              if key in made and made[key] != value]
    if differ:
        what = "; ".join(f"{k} {old} (this demo: {new})" for k, old, new, _ in differ)
        same = " ".join(f"{flag} {old}" for _, old, _, flag in differ if flag)
        use = f"pass {same} to use it, or " if same and all(flag for *_, flag in differ) else ""
        raise UserError(f"--teacher_dir {teacher_dir!r} holds a tiny teacher made with other settings ({what}); the "
                        f"demo never replaces a teacher: {use}name another --teacher_dir with --new_teacher to train "
                        "one with these settings")
    return True


def check_demo_args(a: argparse.Namespace, extra: list[str]) -> list[str]:
    """Check the demo's folders and the training script's arguments (with those after `--`) before the teacher
    is made; returns the `accelerate launch` command."""
    for flag, value, least in (("--max_train_steps", a.max_train_steps, 1), ("--num_processes", a.num_processes, 1),
                               ("--teacher_train_steps", a.teacher_train_steps, 0)):
        if value < least:
            raise UserError(f"{flag} {value} is not valid; it must be at least {least}")
    if not _has_flag(extra, "--prompt_pool") and not _has_flag(extra, "--num_regions") \
            and 1 <= a.builtin_pool_size < DEMO_NUM_REGIONS:
        raise UserError(f"--builtin_pool_size {a.builtin_pool_size}: the demo builds {DEMO_NUM_REGIONS} regions of the "
                        f"built-in pool and needs at least {DEMO_NUM_REGIONS} prompts; pass a larger --builtin_pool_size, "
                        f"or fewer regions after --: -- --num_regions N (N <= {a.builtin_pool_size})")
    teacher_dir = a.teacher_dir
    if teacher_dir is None:  # beside the output folder, spelt as the output folder is (relative or absolute)
        teacher_dir = os.path.join(os.path.dirname(os.path.abspath(a.output_dir)), "tiny-teacher")
        teacher_dir = teacher_dir if os.path.isabs(a.output_dir) else os.path.relpath(teacher_dir)
    previous_run = preflight.check_demo_output_dir(a.output_dir, teacher_dir)
    check_demo_teacher(teacher_dir, a.teacher_dir is not None, a.new_teacher, a.teacher_train_steps,
                       a.builtin_pool_size)
    preflight.check_offline_minilm("the demo's tiny teacher")
    cmd = demo_command(a.output_dir, teacher_dir, a.max_train_steps, a.num_processes, extra, a.builtin_pool_size)
    if previous_run and not _has_flag(extra, "--resume_from_checkpoint"):
        cmd += ["--overwrite_output_dir"]  # the script moves the earlier run aside (never mixes the two)
    from .training.args import parse_args
    from .utils.errors import parse_briefly

    script_args = cmd[cmd.index(TRAIN_MODULE) + 1:]
    preflight.check_train_args(parse_briefly(parse_args, script_args), check_teacher=False)
    return cmd


def _cmd_demo(a: argparse.Namespace, extra: list[str]) -> int:
    cmd = check_demo_args(a, extra)
    teacher_dir = cmd[cmd.index("--pretrained_model_name_or_path") + 1]
    if "--overwrite_output_dir" in cmd:
        print(f"{a.output_dir} holds an earlier run: it is moved aside to {os.path.normpath(a.output_dir)}.previous-"
              "<date-time> when the training starts (nothing is deleted)", flush=True)
    if not os.path.exists(teacher_dir):
        print(f"no tiny teacher in {teacher_dir} yet: training one ({a.teacher_train_steps} steps, a few minutes; "
              "reused by later runs)", flush=True)
    from .embedded.builtin_pool import builtin_prompt_pool
    from .embedded.tiny_teacher import make_tiny_teacher

    report = make_tiny_teacher(teacher_dir, prompts=list(builtin_prompt_pool(a.builtin_pool_size)["prompt"]),
                               train_steps=a.teacher_train_steps)
    _print_teacher_report(report)
    env = dict(os.environ, ACCELERATE_USE_CPU="true") if a.num_processes > 1 else None
    print("running:", " ".join(cmd), flush=True)
    rc = subprocess.call(cmd, env=env)
    if rc != 0:
        return rc
    print(f"\nDone. Look at {a.output_dir}/:\n"
          "  validation_final.png  teacher (top row) vs student (bottom row), same prompts and seeds\n"
          "  aria_allocation.png   how ARIA moved sampling between regions over training\n"
          "  aria_report.md        per-region table: size, prompt share, probability, discrepancy estimate, draws\n"
          "  README.md             the model card; model_index.json + unet/ ...: the student pipeline\n"
          f"  logs/                 tensorboard --logdir {a.output_dir}/logs\n"
          f"Next: diffusers-aria report {a.output_dir} (docs/usage.md's \"Command line\" section lists more).")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The command line's parser (usage errors are one line, exit code 2)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on an error, show the traceback instead of one line")
    p = OneLineArgumentParser(prog="diffusers-aria", description="ARIA for diffusers distillation",
                              parents=[common])
    sub = p.add_subparsers(dest="command", required=True)

    def pool_args(sp):
        sp.add_argument("--pool", default="builtin", help="'builtin' or a prompt file / dataset")
        sp.add_argument("--column", default=None)
        sp.add_argument("--builtin_pool_size", type=int, default=4000)
        sp.add_argument("--seed", type=int, default=0)

    regions = sub.add_parser("regions", help="build or show the regions of a prompt pool")
    rsub = regions.add_subparsers(dest="regions_command", required=True)
    b = rsub.add_parser("build", parents=[common])
    pool_args(b)
    b.add_argument("--num_regions", type=int, default=None,
                   help="K (default: about 4 prompts a region, a power of 2, at most 4096)")
    b.add_argument("--region_branching", type=int, default=DEFAULT_BRANCHING,
                   help="the region tree shrinks by this factor per level (0: no tree)")
    b.add_argument("--embedder", default=DEFAULT_EMBEDDER)
    b.add_argument("--method", default="auto", choices=["auto", "faiss", "sklearn"])
    b.add_argument("--embeddings_cache", default=None)
    b.add_argument("--output", required=True)
    b.add_argument("--work_dir", default=None,
                   help="a sharded, resumable build in this folder: run under `accelerate launch` on any number of "
                        "processes and machines; a killed build resumes where it stopped")
    b.add_argument("--sample_size", type=int, default=None, help="with --work_dir: k-means sample (default 256 x K)")
    b.add_argument("--chunk_size", type=int, default=65_536, help="with --work_dir: prompts per chunk")
    b.add_argument("--batch_size", type=int, default=256, help="with --work_dir: prompts per embedder call")
    b.add_argument("--min_region_size", type=int, default=1, help="with --work_dir: merge smaller regions")
    b.add_argument("--no_progress", action="store_true", help="with --work_dir: no progress bars or summary")
    s = rsub.add_parser("show", parents=[common])
    s.add_argument("regions_dir")
    pool_args(s)
    s.set_defaults(pool=None)

    r = sub.add_parser("report", help="print the ARIA report of a run or checkpoint", parents=[common])
    r.add_argument("path")
    r.add_argument("--top", type=int, default=32)

    e = sub.add_parser("evaluate", help="held-out teacher-student discrepancy per region and group",
                       parents=[common])
    e.add_argument("--teacher", required=True)
    e.add_argument("--student", required=True)
    pool_args(e)
    e.add_argument("--regions", default=None)
    e.add_argument("--num_prompts", type=int, default=256)
    e.add_argument("--output", default=None)

    t = sub.add_parser("make-tiny-teacher", help="build the tiny offline teacher pipeline (cached)",
                       parents=[common])
    t.add_argument("output_dir")
    t.add_argument("--family", choices=("sd", "sdxl", "pixart", "sd3"), default="sd",
                   help="sd: the trained Stable Diffusion 1.x-style teacher (default); sdxl, pixart, sd3: a "
                        "random-weight test teacher of that pipeline family")
    t.add_argument("--train_steps", type=int, default=None)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--force", action="store_true")
    t.add_argument("--num_prompts", type=int, default=None,
                   help="train on the first N prompts of the built-in pool (default: its 4000)")

    sub.add_parser("train", add_help=False,
                   help="the distillation script (train_scripts/train_aria_distill.py); `diffusers-aria train "
                        "--help` lists its flags")

    d = sub.add_parser(
        "demo", help="the embedded default: tiny teacher, built-in pool, ARIA distillation on CPU", parents=[common],
        description="The embedded default on the CPU, offline: a tiny teacher (trained once, then reused), the "
                    f"built-in prompt pool, {DEMO_NUM_REGIONS} regions, and an ARIA distillation through accelerate "
                    "launch.",
        epilog="Arguments after `--` go to the training script (train_scripts/train_aria_distill.py; `diffusers-aria "
               "train --help` lists them) and override the demo's own, e.g. `diffusers-aria demo -- --seed 1`. Your "
               "own prompts: `diffusers-aria demo -- --prompt_pool my_prompts.txt` (regions: the library's default "
               "for the pool's size; add --num_regions N to choose).")
    d.add_argument("--output_dir", default="outputs/demo",
                   help="the run's folder (default: %(default)s); an earlier run there is moved aside to a sibling "
                        "folder, OUTPUT_DIR.previous-<date-time>, never mixed with the new one")
    d.add_argument("--teacher_dir", default=None,
                   help="the tiny teacher's folder (default: tiny-teacher beside --output_dir, trained there the first "
                        "time and reused after); a folder you name must hold a tiny teacher, unless --new_teacher")
    d.add_argument("--new_teacher", action="store_true",
                   help="train a tiny teacher in --teacher_dir when it holds none (a few minutes); without it a "
                        "misspelt --teacher_dir is an error instead of a new training")
    d.add_argument("--teacher_train_steps", type=int, default=None,
                   help=f"training steps of a new tiny teacher (default: {TINY_TEACHER_TRAIN_STEPS}); a teacher made "
                        "with other settings is never replaced")
    d.add_argument("--max_train_steps", type=int, default=300, help="distillation steps (default: %(default)s)")
    d.add_argument("--num_processes", type=int, default=1,
                   help="CPU processes of the distillation (default: %(default)s; 2 runs two over gloo)")
    d.add_argument("--builtin_pool_size", type=int, default=4000,
                   help="prompts of the built-in pool, for the teacher and the run (default: %(default)s)")
    from .compare import add_parser as add_compare_parser

    add_compare_parser(sub, parents=[common])  # `compare`: arguments after `--` go to both training arms
    return p


def _cmd_train(argv: list[str]) -> int:
    """`diffusers-aria train ARGS`: the training script, run in this process as `python train_aria_distill.py
    ARGS` would run it (its flags, one-line errors and exit codes; several processes: `accelerate launch -m
    diffusers_aria.training.train_aria_distill ARGS`)."""
    saved = sys.argv
    sys.argv = ["diffusers-aria train", *argv]
    try:
        runpy.run_module(TRAIN_MODULE, run_name="__main__")
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 1
    finally:
        sys.argv = saved
    return 0


def main(argv: list[str] | None = None) -> int:
    """The `diffusers-aria` entry point: the exit code (2 and one line on stderr for a mistake in the arguments;
    `--debug` raises it with its traceback instead)."""
    default_cpu_env()
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["train"]:  # every argument, --help and --debug included, belongs to the training script
        return _cmd_train(argv[1:])
    argv, debug = split_debug_flag(argv)
    try:
        return run_main(_main, argv, debug=debug)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    except BrokenPipeError:  # `diffusers-aria report ... | head`: the reader left; no traceback for that
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _main(argv: list[str]) -> int:
    extra: list[str] = []
    if "--" in argv:  # everything after `--` goes to the training script (demo)
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    a = build_parser().parse_args(argv)
    if a.command == "make-tiny-teacher" and a.family == "sd" and a.train_steps is None:
        a.train_steps = TINY_TEACHER_TRAIN_STEPS
    if a.command == "demo" and a.teacher_train_steps is None:
        a.teacher_train_steps = TINY_TEACHER_TRAIN_STEPS
    if a.command == "regions":
        return _cmd_regions_build(a) if a.regions_command == "build" else _cmd_regions_show(a)
    handlers = {"report": _cmd_report, "evaluate": _cmd_evaluate, "make-tiny-teacher": _cmd_make_tiny_teacher}
    if a.command == "demo":
        return _cmd_demo(a, extra)
    if a.command == "compare":
        return a.compare_handler(a, extra)
    return handlers[a.command](a)


if __name__ == "__main__":
    sys.exit(main())
