"""The tiny training step on a busy CPU, through each entry point: is every way of starting a run fast?

OpenMP threads that spin while they wait make 2 torch threads several times slower than 1 when another process
wants a core (issue 27: teacher latents took 45-76 s a batch when the training script ran directly, 1.8 s through
the demo). Every entry point now sets `OMP_WAIT_POLICY=PASSIVE` before torch loads (a value the user set is
kept). This measures the time per optimizer step of the tiny distillation (the tiny teacher, batch 16 at 32 px)
with one competing CPU-bound process running, for

  * entry points: `script` (python train_scripts/train_aria_distill.py), `accelerate` (accelerate launch of that
    file), `demo` (diffusers-aria demo, which launches the packaged script);
  * the user's environment: OMP_WAIT_POLICY `unset` or `PASSIVE` exported;
  * a control, `torch-first` (unset): the script run from a harness that imports torch before the script's first
    line, as a script without the default behaved; it shows what the default saves on this machine.

Each run is a real process of its entry point. Its step times are read from `--write_stream` (one line per step,
read as it grows): the median of the differences after `--warmup` steps. Exit code 1 when the slowest entry point
(over both environments, control excluded) is more than `--max_ratio` times the fastest (default 2.0: the
issue's gap was 25-40x; run-to-run noise on a shared 2-core machine is within about 1.5x).

    python benchmarks/busy_cpu.py                                  # about 4-6 minutes on 2 cores
    python benchmarks/busy_cpu.py --out_dir benchmarks/results     # the tracked result
    python benchmarks/busy_cpu.py --steps 4 --entries script demo --envs unset --no_control   # a smoke run

Prints a Markdown table; writes busy_cpu.json to outputs/benchmarks/ (untracked) unless --out_dir is given.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

from _common import REPO, header, loadavg, offline_env, summarize, table, write_json

offline_env()

SCRIPT = os.path.join(REPO, "train_scripts", "train_aria_distill.py")
DEFAULT_OUT_DIR = os.path.join(REPO, "outputs", "benchmarks")
ENTRIES = ("script", "accelerate", "demo")
ENVS = ("unset", "passive")
POOL_SIZE, NUM_REGIONS = 200, 6
# the control: torch is loaded before the script's first line runs (the script's default comes too late)
TORCH_FIRST = "import runpy, sys, torch\nsys.argv = sys.argv[1:]\nrunpy.run_path(sys.argv[0], run_name='__main__')\n"


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def prepare(work: str) -> tuple[str, str]:
    """A tiny teacher (untrained: the step's cost does not depend on its weights) and regions of the pool."""
    teacher, regions = os.path.join(work, "teacher"), os.path.join(work, "regions")
    subprocess.run([_bin("diffusers-aria"), "make-tiny-teacher", teacher, "--train_steps", "0",
                    "--num_prompts", str(POOL_SIZE)], check=True, capture_output=True, text=True)
    subprocess.run([_bin("diffusers-aria"), "regions", "build", "--pool", "builtin", "--builtin_pool_size",
                    str(POOL_SIZE), "--num_regions", str(NUM_REGIONS), "--method", "sklearn", "--output", regions],
                   check=True, capture_output=True, text=True)
    return teacher, regions


def run_args(teacher: str, regions: str, out: str, stream: str, steps: int) -> list[str]:
    """The training script's arguments, the same for every entry point."""
    return ["--output_dir", out, "--image_free", "--num_teacher_latents", "16", "--teacher_inference_steps", "2",
            "--prompt_pool", "builtin", "--builtin_pool_size", str(POOL_SIZE), "--regions_dir", regions,
            "--num_regions", str(NUM_REGIONS), "--resolution", "32", "--train_batch_size", "16",
            "--max_train_steps", str(steps), "--checkpointing_steps", "0", "--report_to", "none",
            "--validation_prompts", "--write_stream", stream]


def command(entry: str, teacher: str, regions: str, out: str, stream: str, steps: int) -> list[str]:
    args = run_args(teacher, regions, out, stream, steps)
    if entry == "script":
        return [sys.executable, SCRIPT, "--pretrained_model_name_or_path", teacher, *args]
    if entry == "torch-first":
        return [sys.executable, "-c", TORCH_FIRST, SCRIPT, "--pretrained_model_name_or_path", teacher, *args]
    if entry == "accelerate":
        return [sys.executable, "-m", "accelerate.commands.launch", "--quiet", "--cpu", "--num_processes", "1",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", SCRIPT,
                "--pretrained_model_name_or_path", teacher, *args]
    if entry == "demo":  # the demo's own settings, then the same run's (the arguments after -- override them)
        return [_bin("diffusers-aria"), "demo", "--output_dir", out, "--teacher_dir", teacher, "--teacher_train_steps",
                "0", "--builtin_pool_size", str(POOL_SIZE), "--max_train_steps", str(steps), "--", *args]
    raise ValueError(f"entry {entry!r}: choose one of {ENTRIES + ('torch-first',)}")


def measure(cmd: list[str], env: dict[str, str], stream: str, steps: int, timeout: float) -> dict:
    """Run `cmd` beside one busy process; the arrival time of each line of the step stream."""
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    start = time.perf_counter()
    arrivals: list[float] = []
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    try:
        while proc.poll() is None and time.perf_counter() - start < timeout:
            if os.path.exists(stream):
                with open(stream, "rb") as fh:
                    lines = fh.read().count(b"\n")
                now = time.perf_counter()
                arrivals += [now] * (lines - len(arrivals))
            time.sleep(0.01)
        timed_out = proc.poll() is None
        if timed_out:
            proc.kill()
        proc.wait()
    finally:
        busy.kill()
        busy.wait()
    if os.path.exists(stream):  # lines written after the last look (the run ended)
        with open(stream, "rb") as fh:
            lines = fh.read().count(b"\n")
        arrivals += [time.perf_counter()] * (lines - len(arrivals))
    log.seek(0)
    tail = log.read().decode(errors="replace")[-2000:]
    log.close()
    return {"returncode": proc.returncode, "timed_out": timed_out, "wall_s": time.perf_counter() - start,
            "arrivals": [a - start for a in arrivals], "log_tail": tail if proc.returncode else ""}


def step_stats(arrivals: list[float], warmup: int) -> dict | None:
    gaps = [b - a for a, b in zip(arrivals[warmup:], arrivals[warmup + 1:])]
    return summarize(gaps, scale=1.0) if gaps else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="optimizer steps per run (default %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="first steps left out of the times (default %(default)s)")
    p.add_argument("--entries", nargs="+", choices=ENTRIES, default=list(ENTRIES))
    p.add_argument("--envs", nargs="+", choices=ENVS, default=list(ENVS), help="OMP_WAIT_POLICY as the user has it")
    p.add_argument("--no_control", action="store_true", help="leave out the torch-first control")
    p.add_argument("--max_ratio", type=float, default=2.0,
                   help="exit 1 when the slowest entry point's median step is more than this times the fastest's")
    p.add_argument("--timeout", type=float, default=240, help="seconds per run before it is stopped (default %(default)s)")
    p.add_argument("--out_dir", default=None, help=f"folder of busy_cpu.json (default {DEFAULT_OUT_DIR}, untracked)")
    a = p.parse_args(argv)
    if a.steps < a.warmup + 2:
        p.error(f"--steps {a.steps} is too few: at least --warmup + 2 ({a.warmup + 2}) for one step time")
    rec = header(argv if argv is not None else sys.argv[1:], "busy_cpu.py")
    rec.update(settings={k: v for k, v in vars(a).items() if k != "out_dir"}, competing_processes=1,
               workload=f"tiny distillation step: tiny teacher, batch 16 at 32 px, built-in pool of {POOL_SIZE}, "
                        f"{NUM_REGIONS} regions")
    conditions = [(e, v) for v in a.envs for e in a.entries] + ([] if a.no_control else [("torch-first", "unset")])
    work = tempfile.mkdtemp(prefix="busy-cpu-")
    runs = []
    try:
        teacher, regions = prepare(work)
        for i, (entry, env_name) in enumerate(conditions):
            env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
            if env_name == "passive":
                env["OMP_WAIT_POLICY"] = "PASSIVE"
            out, stream = os.path.join(work, f"run-{i}"), os.path.join(work, f"stream-{i}.jsonl")
            res = measure(command(entry, teacher, regions, out, stream, a.steps), env, stream, a.steps, a.timeout)
            res.update(entry=entry, omp_wait_policy=env_name, step_s=step_stats(res["arrivals"], a.warmup),
                       loadavg_end=loadavg())
            runs.append(res)
            s = res["step_s"]
            print(f"{entry:>11} {env_name:>7}: " + (f"median {s['median']:.3f} s/step over {s['n']} steps"
                                                    if s else "no step time") +
                  (f" (exit {res['returncode']}{', timed out' if res['timed_out'] else ''})"
                   if res["returncode"] else ""), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [[r["entry"], r["omp_wait_policy"], r["step_s"]["median"] if r["step_s"] else float("nan"),
             r["step_s"]["p90"] if r["step_s"] else float("nan"), r["step_s"]["n"] if r["step_s"] else 0,
             round(r["wall_s"], 1), "ok" if r["returncode"] == 0 else ("timed out" if r["timed_out"] else "failed")]
            for r in runs]
    print()
    print(table(rows, ["entry point", "OMP_WAIT_POLICY", "median s/step", "p90 s/step", "steps", "wall s", "run"]))
    measured = [r for r in runs if r["entry"] != "torch-first"]
    medians = {(r["entry"], r["omp_wait_policy"]): r["step_s"]["median"] for r in measured
               if r["returncode"] == 0 and r["step_s"]}
    failed = [f"{r['entry']}/{r['omp_wait_policy']}" for r in measured if (r["entry"], r["omp_wait_policy"]) not in medians]
    ratio = max(medians.values()) / min(medians.values()) if len(medians) >= 2 else float("nan")
    ok = not failed and len(medians) >= 2 and ratio <= a.max_ratio
    control = next((r for r in runs if r["entry"] == "torch-first" and r["step_s"]), None)
    verdict = {"ratio_slowest_to_fastest": ratio, "max_ratio": a.max_ratio, "failed_runs": failed, "ok": ok,
               "control_over_fastest": (control["step_s"]["median"] / min(medians.values())
                                        if control and medians else None)}
    rec.update(runs=runs, verdict=verdict, loadavg_end=loadavg(), finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    print(f"\nslowest / fastest entry point: {ratio:.2f}x (limit {a.max_ratio}x)"
          + (f"; the torch-first control: {verdict['control_over_fastest']:.2f}x the fastest"
             if verdict["control_over_fastest"] else "")
          + (f"; runs without a step time: {', '.join(failed)}" if failed else ""))
    print("wrote", write_json("busy_cpu", rec, a.out_dir or DEFAULT_OUT_DIR))
    if not ok:
        print(f"FAIL: the entry points are not within {a.max_ratio}x of each other", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
