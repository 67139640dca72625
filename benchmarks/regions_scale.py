"""Scale of the sharded regions build (`diffusers_aria.sharded_regions`): 1 against 2 processes.

For each pool size and process count, `diffusers-aria regions build --work_dir` (`python -m diffusers_aria.cli`) runs in a subprocess (2
processes: `accelerate launch --multi_gpu`, gloo on CPU), every process with OMP_NUM_THREADS=1. Reported:
wall time of the launch, embedding prompts/s per process, fit and assignment seconds, peak anonymous RSS and
VmHWM per process, and the agreement of the region ids with the 1-process build. Then, on the 1-process
build's embeddings, the mean cosine to the assigned centroid of the sample fit over that of a fit on all N
points (the "inertia ratio", target >= 0.98), for a few sample sizes. Last, a projection of 100M and 1B
prompts on 8 GPUs from the measured rates (a projection, not a measurement).

    python benchmarks/regions_scale.py                                  # 1M stand-in, 20k MiniLM
    python benchmarks/regions_scale.py --n 1000000 10000000 --minilm_n 100000
    python benchmarks/regions_scale.py --quick                          # seconds (smoke test)
Writes benchmarks/results/regions_scale[_quick].json.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

from _common import REPO, header, loadavg, offline_env, table, write_json

offline_env()

RATIO_MAX_N = 2_000_000  # the full fit of the inertia ratio (refinement passes over all N) is skipped above this


def make_pool(n: int, kind: str, folder: str) -> str:
    """A `save_to_disk` pool folder: synthetic captions (stand-in runs) or the built-in pool's prompts."""
    import datasets
    import pyarrow as pa

    path = os.path.join(folder, f"pool-{kind}-{n}")
    if os.path.isdir(path):
        return path
    if kind == "builtin":
        from diffusers_aria.embedded.builtin_pool import builtin_prompt_pool

        texts = list(builtin_prompt_pool(num_prompts=n, seed=0)["prompt"])
        table_ = pa.table({"prompt": texts})
    else:
        parts = [pa.array([f"synthetic caption {i}: subject {i % 9973}, scene {i % 613}, style {i % 97}"
                           for i in range(s, min(s + 1_000_000, n))]) for s in range(0, n, 1_000_000)]
        table_ = pa.table({"prompt": pa.chunked_array(parts)})
    datasets.Dataset(table_).save_to_disk(path)
    return path


def run_build(pool: str, n: int, processes: int, embedder: str, k: int, chunk: int, work: str, out: str,
              timeout: float) -> dict:
    args = ["-m", "diffusers_aria.cli", "regions", "build", "--pool", pool, "--num_regions", str(k), "--embedder", embedder,
            "--chunk_size", str(chunk), "--work_dir", work, "--output", out, "--seed", "0", "--no_progress"]
    if processes == 1:
        cmd = [sys.executable] + args
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"] + args
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    load0 = loadavg()
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"build failed ({' '.join(cmd)}):\n{p.stderr[-3000:]}")
    stats = [json.load(open(f)) for f in sorted(glob.glob(os.path.join(work, "build-stats-rank*.json")))]
    return {"n": n, "processes": processes, "embedder": embedder, "k": k, "chunk_size": chunk,
            "sample_size": stats[0]["sample_size"], "wall_s": wall,
            "build_s": max(s["total_seconds"] for s in stats),
            "embed_s_per_process": [s["embed_seconds"] for s in stats],
            "prompts_per_s_per_process": [s["prompts_per_second"] for s in stats],
            "fit_s": stats[0]["fit_seconds"], "assign_s": max(s["assign_seconds"] for s in stats),
            "peak_rss_anon_mib": [s["peak_rss_anon_bytes"] / 2**20 for s in stats],
            "vm_hwm_mib": [s["vm_hwm_bytes"] / 2**20 for s in stats],
            "loadavg": [load0, loadavg()]}


def inertia_ratios(work: str, out: str, k: int, multiples: list[int], seed: int = 0) -> list[dict]:
    """Mean cosine to the assigned centroid: sample fits (the build's and other sizes) over a fit on all N."""
    from diffusers_aria.regions import ConditionRegions, nearest_centroid, spherical_kmeans
    from diffusers_aria.sharded_regions import sample_indices

    emb = np.load(glob.glob(os.path.join(work, "shards", "shard-00000-of-00001.npy"))[0], mmap_mode="r")
    n = len(emb)

    def mean_cos(centroids: np.ndarray) -> float:
        total = 0.0
        for s in range(0, n, 65_536):
            e = np.asarray(emb[s:s + 65_536])
            total += float(np.sum(e * centroids[nearest_centroid(e, centroids)]))
        return total / n

    t0 = time.perf_counter()
    full_c, _ = spherical_kmeans(emb, k, seed=seed)
    full_s = time.perf_counter() - t0
    full = mean_cos(full_c)
    built = ConditionRegions.load(out)
    rows = [{"sample_size": built.metadata["sample_size"], "source": "build", "mean_cos": mean_cos(built.centroids),
             "full_fit_mean_cos": full, "full_fit_s": full_s}]
    for m in multiples:
        size = min(n, m * k)
        if size == built.metadata["sample_size"]:
            continue
        idx = sample_indices(n, size, seed)
        t0 = time.perf_counter()
        c, _ = spherical_kmeans(np.asarray(emb[idx]), k, seed=seed)
        rows.append({"sample_size": size, "source": f"{m} x K", "mean_cos": mean_cos(c), "full_fit_mean_cos": full,
                     "sample_fit_s": time.perf_counter() - t0})
    for r in rows:
        r["ratio"] = r["mean_cos"] / r["full_fit_mean_cos"]
        r["n"], r["k"], r["loadavg"] = n, k, loadavg()
    return rows


def projection(runs: list[dict], gpu_rate: float, gpus: int) -> list[dict]:
    """Hours for 100M and 1B prompts on `gpus` GPUs: embedding at `gpu_rate` prompts/s per GPU (an assumed
    rate, not measured here), fit time as measured (independent of N), assignment at the measured CPU rate per
    process (an upper bound for a GPU)."""
    best = max((r for r in runs if r["embedder"] == "hashing:384"), key=lambda r: r["n"], default=runs[0])
    assign_rate = best["n"] / best["processes"] / best["assign_s"]
    out = []
    for n in (100_000_000, 1_000_000_000):
        embed_h = n / (gpus * gpu_rate) / 3600
        assign_h = n / gpus / assign_rate / 3600
        out.append({"n": n, "gpus": gpus, "assumed_gpu_prompts_per_s": gpu_rate, "embed_h": embed_h,
                    "fit_s_measured_on_cpu": best["fit_s"], "assign_h_at_cpu_rate": assign_h,
                    "total_h": embed_h + assign_h + best["fit_s"] / 3600,
                    "shard_disk_gb_total": n * 384 * 4 / 1e9, "ids_file_gb_per_process": n * 4 / 1e9,
                    "kind": "projection from measured rates, not a measurement"})
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int, nargs="+", default=[1_000_000], help="stand-in (hashing:384) pool sizes")
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--minilm_n", type=int, default=20_000, help="MiniLM pool size (0: skip)")
    ap.add_argument("--minilm_k", type=int, default=64)
    ap.add_argument("--processes", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--chunk_size", type=int, default=65_536)
    ap.add_argument("--multiples", type=int, nargs="+", default=[64, 256], help="sample sizes (x K) for the ratio")
    ap.add_argument("--gpu_rate", type=float, default=3000.0, help="assumed MiniLM prompts/s on one GPU")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--work_root", default=None, help="default: a temporary folder, deleted at the end")
    ap.add_argument("--out_dir", default=None)
    args = ap.parse_args(argv)
    if args.quick:
        args.n, args.k, args.minilm_n, args.processes, args.chunk_size, args.multiples = [3000], 8, 0, [1], 500, [64]
    res = header(argv if argv is not None else sys.argv[1:], "regions_scale.py")
    res["settings"] = {k: v for k, v in vars(args).items() if k not in ("out_dir", "work_root")}
    res["targets"] = {"inertia_ratio": 0.98, "agreement_with_1_process": 1.0}
    root = args.work_root or tempfile.mkdtemp(prefix="aria-regions-scale-")
    os.makedirs(root, exist_ok=True)
    plan = [(n, "synthetic", "hashing:384", args.k) for n in args.n]
    if args.minilm_n:
        plan.append((args.minilm_n, "builtin", "all-MiniLM-L6-v2", args.minilm_k))
    runs, ratios = [], []
    try:
        for n, kind, embedder, k in plan:
            pool = make_pool(n, kind, root)
            chunk = min(args.chunk_size, max(1, n // (4 * max(args.processes))))  # >= 4 chunks per process
            one = None
            for procs in args.processes:
                tag = f"{kind}-{n}-p{procs}"
                work, out = os.path.join(root, "work-" + tag), os.path.join(root, "regions-" + tag)
                r = run_build(pool, n, procs, embedder, k, chunk, work, out, args.timeout)
                ids = np.load(os.path.join(out, "region_ids.npy"), mmap_mode="r")
                if procs == 1:
                    one = out
                ref = np.load(os.path.join(one, "region_ids.npy"), mmap_mode="r") if one else None
                r["agreement_with_1_process"] = float(np.mean(ids == ref)) if ref is not None else None
                runs.append(r)
                print(f"  {embedder} n={n:,} processes={procs}: {r['wall_s']:.1f} s, "
                      f"{[round(x) for x in r['prompts_per_s_per_process'] if x]} prompts/s per process, "
                      f"agreement {r['agreement_with_1_process']} (load {loadavg()})", flush=True)
                if procs == 1 and n <= RATIO_MAX_N:
                    ratios += inertia_ratios(work, out, k, args.multiples)
                    print(f"  inertia ratios: {[(x['sample_size'], round(x['ratio'], 4)) for x in ratios[-3:]]}",
                          flush=True)
                shutil.rmtree(work, ignore_errors=True)  # 1.5 GB of shards per million prompts
    finally:
        if args.work_root is None:
            shutil.rmtree(root, ignore_errors=True)
    res["runs"], res["inertia"] = runs, ratios
    res["projection"] = projection(runs, args.gpu_rate, 8)
    res["loadavg_end"] = loadavg()
    print(table([[r["embedder"], r["n"], r["processes"], r["wall_s"], r["build_s"],
                  " / ".join(f"{x:,.0f}" for x in r["prompts_per_s_per_process"] if x), r["fit_s"], r["assign_s"],
                  " / ".join(f"{x:.0f}" for x in r["peak_rss_anon_mib"]),
                  " / ".join(f"{x:.0f}" for x in r["vm_hwm_mib"]), r["agreement_with_1_process"],
                  f"{r['loadavg'][0][0]} -> {r['loadavg'][1][0]}"] for r in runs],
                ["embedder", "N", "procs", "wall s", "build s", "prompts/s per proc", "fit s", "assign s",
                 "peak anon MiB", "VmHWM MiB", "ids = 1-proc", "load"]))
    print(table([[r["n"], r["k"], r["source"], r["sample_size"], r["mean_cos"], r["full_fit_mean_cos"], r["ratio"]]
                 for r in ratios], ["N", "K", "sample", "size", "mean cos", "full-fit mean cos", "ratio"]))
    print(table([[p["n"], p["gpus"], p["assumed_gpu_prompts_per_s"], p["embed_h"], p["assign_h_at_cpu_rate"],
                  p["total_h"], p["shard_disk_gb_total"]] for p in res["projection"]],
                ["N (projection)", "GPUs", "assumed prompts/s/GPU", "embed h", "assign h", "total h", "shard GB"]))
    path = write_json("regions_scale_quick" if args.quick else "regions_scale", res, args.out_dir)
    print(f"wrote {path}")
    return res


if __name__ == "__main__":
    main()
