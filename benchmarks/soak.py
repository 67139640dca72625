"""Soak test: a two-process tiny distillation run of a few hundred steps on the CPU (gloo).

Checks that it does not hang (a wall-clock limit), that each rank's resident memory stays flat after the
first steps (least-squares slope of RSS over the last 80% of the run, in MB per 100 steps), and that both
ranks end with the same ARIA state (sha256 of the state, gathered by the script into run_info.json).
Prints a table and writes benchmarks/results/soak.json. Exits 1 when a criterion is missed: the run must end
on its own (no hang, exit code 0, every step done), every rank's memory slope must stay below --max_slope_mb
(MB per 100 steps) and the ranks' ARIA states must be equal.

    python benchmarks/soak.py --steps 300
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import _common  # noqa: F401 - sets OMP_WAIT_POLICY=PASSIVE before torch loads

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--teacher", default=None, help="teacher pipeline (default: an untrained tiny teacher, cached)")
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "soak.json"))
    p.add_argument("--max_slope_mb", type=float, default=5.0,
                   help="the largest memory growth of a rank that passes, MB per 100 steps")
    a = p.parse_args(argv)
    import psutil

    from diffusers_aria.embedded.tiny_teacher import make_tiny_teacher

    teacher = a.teacher or str(ROOT / "benchmarks" / "results" / "cache" / "soak-teacher")
    if a.teacher is None:
        make_tiny_teacher(teacher, prompts=[f"a photo of thing {i}" for i in range(32)], train_steps=0, progress=False)
    work = Path(tempfile.mkdtemp(prefix="aria-soak-"))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           str(ROOT / "train_scripts" / "train_aria_distill.py"), "--pretrained_model_name_or_path", teacher,
           "--output_dir", str(work / "out"), "--image_free", "--num_teacher_latents", "32",
           "--teacher_inference_steps", "2", "--builtin_pool_size", "1000", "--num_regions", "16",
           "--resolution", "32", "--train_batch_size", "4", "--max_train_steps", str(a.steps),
           "--checkpointing_steps", str(max(a.steps // 3, 1)), "--checkpoints_total_limit", "1",
           "--aria_log_every", "10", "--report_to", "tensorboard", "--rc_schedule", "constant",
           "--write_stream", str(work / "stream.jsonl")]
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1")
    t0 = time.time()
    launcher = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=open(work / "stderr.log", "w"))
    samples: dict[int, list[tuple[float, float, int]]] = {}
    lp = psutil.Process(launcher.pid)
    hung = False
    while launcher.poll() is None:
        if time.time() - t0 > a.timeout:
            hung = True
            for c in lp.children(recursive=True):
                c.kill()
            launcher.kill()
            break
        steps_done = sum(1 for _ in open(work / "stream.jsonl")) if (work / "stream.jsonl").exists() else 0
        for c in lp.children(recursive=True):
            try:
                if "train_aria_distill.py" in " ".join(c.cmdline()):
                    samples.setdefault(c.pid, []).append((time.time() - t0, c.memory_info().rss / 2**20, steps_done))
            except psutil.Error:
                pass
        time.sleep(0.5)
    wall = time.time() - t0
    ranks = []
    for pid, rows in sorted(samples.items()):
        arr = np.array(rows)
        steps = arr[:, 2]
        keep = steps >= 0.2 * a.steps  # after the first steps (and the start-up)
        slope = float(np.polyfit(steps[keep], arr[keep, 1], 1)[0] * 100) if keep.sum() > 3 else float("nan")
        ranks.append({"pid": pid, "rss_start_mb": float(arr[keep, 1][0]) if keep.any() else None,
                      "rss_end_mb": float(arr[-1, 1]), "rss_max_mb": float(arr[:, 1].max()),
                      "slope_mb_per_100_steps": slope, "samples": int(len(rows))})
    info_path = work / "out" / "run_info.json"
    info = json.load(open(info_path)) if info_path.exists() else {}
    result = {
        "command": "python benchmarks/soak.py " + " ".join(argv or sys.argv[1:]),
        "steps": a.steps, "wall_s": wall, "returncode": launcher.returncode, "hung": hung,
        "num_processes": info.get("num_processes"), "global_step": info.get("global_step"),
        "same_aria_state_on_all_ranks": len(set(info.get("aria_state_hashes", []))) == 1 and
        len(info.get("aria_state_hashes", [])) == 2,
        "ranks": ranks,
    }
    result["failures"] = failures(result, a.max_slope_mb)
    print(f"{'pid':>8} {'rss start MB':>13} {'rss end MB':>11} {'max MB':>8} {'slope MB/100 steps':>19}")
    for r in ranks:
        print(f"{r['pid']:>8} {r['rss_start_mb'] or float('nan'):>13.1f} {r['rss_end_mb']:>11.1f} "
              f"{r['rss_max_mb']:>8.1f} {r['slope_mb_per_100_steps']:>19.2f}")
    print(f"steps {result['global_step']}/{a.steps} in {wall:.0f} s, processes {result['num_processes']}, "
          f"hung {hung}, same ARIA state on both ranks: {result['same_aria_state_on_all_ranks']}")
    print("PASSED" if not result["failures"] else "FAILED: " + "; ".join(result["failures"]))
    os.makedirs(os.path.dirname(a.output), exist_ok=True)
    with open(a.output + ".tmp", "w") as fh:
        json.dump(result, fh, indent=1)
    os.replace(a.output + ".tmp", a.output)
    return result


def failures(result: dict, max_slope_mb: float = 5.0) -> list[str]:
    """The criteria a soak result misses (empty: it passed)."""
    out = []
    if result["hung"]:
        out.append(f"the run did not finish within the time limit ({result['wall_s']:.0f} s)")
    elif result["returncode"] != 0:
        out.append(f"the run exited with code {result['returncode']}")
    if result.get("global_step") != result["steps"]:
        out.append(f"{result.get('global_step')} of {result['steps']} steps done")
    if not result["same_aria_state_on_all_ranks"]:
        out.append("the ranks' ARIA states differ (or a rank's is missing)")
    for r in result["ranks"]:
        if not r["slope_mb_per_100_steps"] <= max_slope_mb:  # NaN (too few samples) fails too
            out.append(f"rank pid {r['pid']} grew {r['slope_mb_per_100_steps']:.2f} MB per 100 steps "
                       f"(at most {max_slope_mb})")
    if not result["ranks"]:
        out.append("no memory samples of the training processes")
    return out


if __name__ == "__main__":
    sys.exit(1 if main()["failures"] else 0)
