"""Speed of building regions: embedding throughput, embedding cache, clustering time and peak memory.

  * `diffusers_aria.regions.embed_pool` against plain `SentenceTransformer.encode` on the same texts (the
    built-in pool, or PartiPrompts by path), same model object and batch size, interleaved rounds with
    alternating order; ratio = encode time / embed_pool time (throughput ratio).        target >= 0.95
  * the embedding cache: `embed_pool(..., cache_dir=d)` a second time for the same pool (time of the hit).
  * clustering n x 384 unit vectors (a normalised mixture of Gaussians) into 256 regions with
    `spherical_kmeans(method="faiss")` and `method="sklearn"`, each in its own subprocess: wall time and RSS
    high-water (ru_maxrss) with the data-only high-water subtracted. Sizes that do not finish within
    --timeout are reported as such; --n takes several sizes for an (honestly labelled) extrapolation.

    python benchmarks/regions_speed.py                       # 4000 texts, clustering n=1,000,000
    python benchmarks/regions_speed.py --n 100000 300000     # clustering sizes
    python benchmarks/regions_speed.py --quick               # seconds (smoke test)
Writes benchmarks/results/regions_speed[_quick].json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

from _common import HERE, REPO, header, loadavg, offline_env, summarize, table, write_json

offline_env()

PARTI = os.path.join(REPO, "..", "shared", "data", "PartiPrompts.tsv")


def load_texts(n: int, source: str) -> list[str]:
    if source == "parti":
        import csv

        with open(PARTI, encoding="utf-8") as fh:
            rows = [r["Prompt"] for r in csv.DictReader(fh, delimiter="\t") if r.get("Prompt", "").strip()]
        return rows[:n]
    from diffusers_aria.embedded.builtin_pool import builtin_prompt_pool

    return list(builtin_prompt_pool(num_prompts=n, seed=0)["prompt"])


def embedding(texts: list[str], rounds: int, batch_size: int) -> dict:
    from diffusers_aria.regions import embed_pool, load_embedder

    model = load_embedder()
    model.encode(texts[:64], batch_size=batch_size, show_progress_bar=False)  # warm-up
    t_pool, t_enc = [], []
    for r in range(rounds):
        order = ("pool", "encode") if r % 2 == 0 else ("encode", "pool")
        for which in order:
            t0 = time.perf_counter()
            if which == "pool":
                a = embed_pool(texts, model, batch_size=batch_size, progress=False)
                t_pool.append(time.perf_counter() - t0)
            else:
                b = model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                                 show_progress_bar=False)
                t_enc.append(time.perf_counter() - t0)
    max_diff = float(np.abs(np.asarray(a) - b).max())
    with tempfile.TemporaryDirectory() as d:
        t0 = time.perf_counter()
        embed_pool(texts, model, batch_size=batch_size, cache_dir=d, progress=False)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        cached = embed_pool(texts, model, batch_size=batch_size, cache_dir=d, progress=False)
        second = time.perf_counter() - t0
        assert cached.shape == (len(texts), 384)
    n = len(texts)
    return {
        "texts": n,
        "rounds": rounds,
        "batch_size": batch_size,
        "embed_pool_s": summarize(t_pool, scale=1.0),
        "encode_s": summarize(t_enc, scale=1.0),
        "embed_pool_texts_per_s": n / float(np.median(t_pool)),
        "encode_texts_per_s": n / float(np.median(t_enc)),
        "throughput_ratio": float(np.sum(t_enc) / np.sum(t_pool)),
        "max_abs_diff": max_diff,
        "cache_first_call_s": first,
        "cache_second_call_s": second,
    }


def _mixture(n: int, d: int, seed: int, components: int = 512) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((components, d)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = np.empty((n, d), dtype=np.float32)
    for s in range(0, n, 65_536):
        m = min(65_536, n - s)
        c = rng.integers(0, components, size=m)
        blk = centers[c] + 0.08 * rng.standard_normal((m, d), dtype=np.float32)
        x[s:s + m] = blk / np.linalg.norm(blk, axis=1, keepdims=True)
    return x


def cluster_child(method: str, n: int, k: int, seed: int) -> dict:
    from diffusers_aria.regions import spherical_kmeans

    from _common import maxrss_bytes, rss_bytes

    x = _mixture(n, 384, seed)
    if method == "sklearn":  # imports first, so their memory is not counted as clustering's
        import sklearn.cluster  # noqa: F401
    else:
        import faiss  # noqa: F401
    rss0, hwm0 = rss_bytes(), maxrss_bytes()
    t0 = time.perf_counter()
    cent, ids = spherical_kmeans(x, k, seed=seed, method=method)
    dt = time.perf_counter() - t0
    hwm1 = maxrss_bytes()
    inertia = float(np.mean(np.sum(x * cent[ids], axis=1)))
    return {"method": method, "n": n, "k": k, "regions_found": int(len(cent)), "seconds": dt,
            "data_bytes": int(x.nbytes), "rss_before_bytes": rss0,
            "peak_extra_bytes": int(hwm1 - max(hwm0, rss0)), "rss_highwater_bytes": hwm1,
            "mean_cosine_to_centroid": inertia}


def clustering(sizes: list[int], k: int, methods: list[str], seed: int, timeout: float) -> list[dict]:
    out = []
    for n in sizes:
        for method in methods:
            cmd = [sys.executable, os.path.join(HERE, "regions_speed.py"), "--_cluster", method, "--_n", str(n),
                   "--_k", str(k), "--seed", str(seed)]
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=HERE)
                if p.returncode != 0:
                    out.append({"method": method, "n": n, "k": k, "error": p.stderr[-2000:]})
                    continue
                r = json.loads(p.stdout.strip().splitlines()[-1])
            except subprocess.TimeoutExpired:
                r = {"method": method, "n": n, "k": k, "timeout_s": timeout}
            r["wall_s_with_data_generation"] = time.perf_counter() - t0
            r["loadavg_after"] = loadavg()
            out.append(r)
            print(f"  clustering {method} n={n:,}: "
                  + (f"{r['seconds']:.1f} s, peak +{r['peak_extra_bytes'] / 2**20:.0f} MiB" if "seconds" in r
                     else f"did not finish within {timeout:.0f} s"), flush=True)
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--texts", type=int, default=4000)
    ap.add_argument("--source", choices=("builtin", "parti"), default="builtin")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch_size", type=int, default=256)
    ap.add_argument("--n", type=int, nargs="+", default=[1_000_000], help="clustering sizes")
    ap.add_argument("--k", type=int, default=256)
    ap.add_argument("--methods", nargs="+", default=["faiss", "sklearn"])
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per clustering subprocess")
    ap.add_argument("--skip_embedding", action="store_true")
    ap.add_argument("--skip_clustering", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out_dir", default=None)
    ap.add_argument("--_cluster", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--_k", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._cluster:
        print(json.dumps(cluster_child(args._cluster, args._n, args._k, args.seed)))
        return {}
    if args.quick:
        args.texts, args.rounds, args.n, args.k, args.timeout = 48, 2, [3000], 16, 120.0
    res = header(argv if argv is not None else sys.argv[1:], "regions_speed.py")
    res["targets"] = {"embed_throughput_ratio": 0.95}
    if not args.skip_embedding:
        texts = load_texts(args.texts, args.source)
        e = embedding(texts, args.rounds, args.batch_size)
        e["source"] = args.source
        e["loadavg_after"] = loadavg()
        res["embedding"] = e
        res["met_embed_ratio"] = bool(e["throughput_ratio"] >= 0.95)
        print(f"\nembedding {e['texts']} {args.source} texts, {e['rounds']} interleaved rounds (load {loadavg()})")
        print(table([["embed_pool", e["embed_pool_s"]["median"], e["embed_pool_texts_per_s"]],
                     ["SentenceTransformer.encode", e["encode_s"]["median"], e["encode_texts_per_s"]]],
                    ["path", "median s", "texts/s"]))
        print(f"throughput ratio embed_pool/encode = {e['throughput_ratio']:.3f}; cache: first call "
              f"{e['cache_first_call_s']:.2f} s, second call {e['cache_second_call_s'] * 1e3:.1f} ms")
    if not args.skip_clustering:
        print(f"\nclustering into {args.k} regions (each run in a subprocess)", flush=True)
        c = clustering(args.n, args.k, args.methods, args.seed, args.timeout)
        res["clustering"] = c
        rows = []
        for r in c:
            rows.append([r["method"], r["n"], r.get("seconds", float("nan")),
                         r.get("peak_extra_bytes", float("nan")) / 2**20 if "peak_extra_bytes" in r else float("nan"),
                         r.get("data_bytes", float("nan")) / 2**20 if "data_bytes" in r else float("nan"),
                         "ok" if "seconds" in r else ("timeout" if "timeout_s" in r else "error")])
        print(table(rows, ["method", "n", "seconds", "peak extra MiB", "data MiB", "status"]))
    res["loadavg_end"] = loadavg()
    path = write_json("regions_speed_quick" if args.quick else "regions_speed", res, args.out_dir)
    print(f"wrote {path}")
    return res


if __name__ == "__main__":  # exit 1 when the embedding throughput target is missed
    sys.exit(0 if main().get("met_embed_ratio", True) else 1)
