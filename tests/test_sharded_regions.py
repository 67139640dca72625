"""Tests of `diffusers_aria.sharded_regions`: layout, determinism, resumption, 2 processes on CPU (gloo), and the
benchmark's quick mode. The stand-in `HashingEmbedder` keeps them fast; the real MiniLM runs on 100 prompts."""

from __future__ import annotations

import glob
import importlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from diffusers_aria.pool import PromptPoolError
from diffusers_aria.regions import build_regions
from diffusers_aria.sharded_regions import (
    HashingEmbedder,
    ShardedBuildError,
    build_regions_sharded,
    chunk_bounds,
    default_sample_size,
    num_chunks,
    resolve_build_embedder,
    sample_indices,
    shard_chunks,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = [f"a photo of thing {i} in style {i % 23}" for i in range(3000)]
BUILD = {"num_regions": 12, "seed": 3, "sample_size": 1500, "chunk_size": 250, "method": "sklearn", "progress": False}


class CountingEmbedder(HashingEmbedder):
    """The stand-in embedder, counting `encode` calls and raising (a kill) on call `fail_on_call`."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        super().__init__(dim=32)
        self.calls, self.fail_on_call = 0, fail_on_call

    def encode(self, texts, **kwargs):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt("killed mid-way")
        return super().encode(texts, **kwargs)


def _ids(regions) -> np.ndarray:
    return np.asarray(regions.region_ids)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted one-process build of PROMPTS."""
    return build_regions_sharded(PROMPTS, work_dir=str(tmp_path_factory.mktemp("ref")), embedder=HashingEmbedder(32),
                                 **BUILD)


@pytest.mark.parametrize("n,chunk,procs", [(1, 4, 1), (10, 3, 4), (3000, 250, 2), (3001, 250, 3), (5, 10, 3)])
def test_shards_are_contiguous_and_cover_the_pool(n, chunk, procs):
    chunks = [shard_chunks(n, chunk, procs, r) for r in range(procs)]
    flat = [c for ch in chunks for c in ch]
    assert flat == list(range(num_chunks(n, chunk)))
    rows = [i for c in flat for i in range(*chunk_bounds(c, n, chunk))]
    assert rows == list(range(n))
    with pytest.raises(ValueError, match="process_index=3"):
        shard_chunks(n, chunk, 3, 3)


def test_sample_depends_on_seed_n_and_size_only():
    a = sample_indices(10_000, 500, seed=1)
    assert np.array_equal(a, sample_indices(10_000, 500, seed=1))
    assert len(np.unique(a)) == 500 and np.all(np.diff(a) > 0) and a.max() < 10_000
    assert not np.array_equal(a, sample_indices(10_000, 500, seed=2))
    assert np.array_equal(sample_indices(50, 80, seed=0), np.arange(50))
    assert default_sample_size(16, 10**9) == 4096 and default_sample_size(16, 100) == 100


def test_full_sample_equals_build_regions(tmp_path):
    emb = HashingEmbedder(32)
    sharded = build_regions_sharded(PROMPTS, 12, str(tmp_path), embedder=emb, seed=3, sample_size=None,
                                    chunk_size=700, method="sklearn", progress=False)
    assert sharded.metadata["sample_size"] == len(PROMPTS)  # 256 x 12 > 3000
    full = build_regions(PROMPTS, 12, embedder=emb, seed=3, method="sklearn", progress=False)
    assert np.array_equal(_ids(sharded), full.region_ids)
    np.testing.assert_allclose(sharded.centroids, full.centroids, atol=1e-6)
    # the sharded build makes the same region tree (12 regions: 2 coarse nodes)
    assert sharded.tree is not None and sharded.tree.level_sizes() == [2, 12]
    np.testing.assert_array_equal(sharded.tree.ancestors, full.tree.ancestors)
    sharded.save(str(tmp_path / "regions"))
    from diffusers_aria.regions import ConditionRegions

    loaded = ConditionRegions.load(str(tmp_path / "regions"))
    loaded.check_pool(PROMPTS)
    assert np.array_equal(loaded.region_ids, full.region_ids) and loaded.metadata["embedder"] == "hashing:32"


def test_killed_build_resumes_with_identical_regions(tmp_path, reference):
    work = str(tmp_path / "work")
    with pytest.raises(KeyboardInterrupt):
        build_regions_sharded(PROMPTS, work_dir=work, embedder=CountingEmbedder(fail_on_call=5), **BUILD)
    assert len(glob.glob(os.path.join(work, "chunks", "*.json"))) == 4  # 4 of 12 chunks recorded
    again = CountingEmbedder()
    resumed = build_regions_sharded(PROMPTS, work_dir=work, embedder=again, **BUILD)
    assert again.calls == 12 - 4  # only the missing chunks were embedded
    s = resumed.metadata["sharded_build"]
    assert (s["chunks_embedded"], s["chunks_reused"], s["chunks"]) == (8, 4, 12)
    assert np.array_equal(_ids(resumed), _ids(reference))
    np.testing.assert_array_equal(resumed.centroids, reference.centroids)


def test_torn_records_and_changed_prompts_are_embedded_again(tmp_path, reference):
    work = str(tmp_path / "work")
    build_regions_sharded(PROMPTS, work_dir=work, embedder=HashingEmbedder(32), **BUILD)
    with open(os.path.join(work, "chunks", "000000002.json"), "w") as fh:
        fh.write('{"chunk": 2, "sha2')  # a record cut short (a rename never leaves one; a disk error could)
    with open(os.path.join(work, "chunks", "000000003.json.tmp-1"), "w") as fh:
        fh.write("{}")  # a kill between write and rename leaves only a temporary file
    changed = list(PROMPTS)
    changed[1800] = "a different prompt in chunk seven"
    counting = CountingEmbedder()
    out = build_regions_sharded(changed, work_dir=work, embedder=counting, **BUILD)
    assert counting.calls == 2  # chunk 2 (torn record) and chunk 7 (its prompts changed)
    resumed = build_regions_sharded(PROMPTS, work_dir=work, embedder=CountingEmbedder(), **BUILD)
    assert resumed.metadata["sharded_build"]["chunks_embedded"] == 1  # chunk 7 again
    assert np.array_equal(_ids(resumed), _ids(reference))
    assert out.metadata["fingerprint"] != resumed.metadata["fingerprint"]


def test_work_dir_of_another_build_is_refused(tmp_path):
    build_regions_sharded(PROMPTS, work_dir=str(tmp_path), embedder=HashingEmbedder(32), **BUILD)
    with pytest.raises(ShardedBuildError, match="chunk_size 250 was saved, this build has 300"):
        build_regions_sharded(PROMPTS, work_dir=str(tmp_path), embedder=HashingEmbedder(32),
                              **{**BUILD, "chunk_size": 300})
    with pytest.raises(ShardedBuildError, match="embedder 'hashing:32' was saved"):
        build_regions_sharded(PROMPTS, work_dir=str(tmp_path), embedder="hashing:16", **BUILD)


def test_bad_arguments_name_the_value(tmp_path):
    with pytest.raises(PromptPoolError, match="num_regions=5 is larger than the number of unique prompts"):
        build_regions_sharded(["a", "b", "a", "b"] * 10, 5, str(tmp_path), embedder="hashing", progress=False)
    with pytest.raises(ValueError, match="chunk_size=0"):
        build_regions_sharded(PROMPTS, 4, str(tmp_path), embedder="hashing", chunk_size=0)
    with pytest.raises(ValueError, match="method='kmeans'"):
        build_regions_sharded(PROMPTS, 4, str(tmp_path), embedder="hashing", method="kmeans")
    with pytest.raises(ValueError, match="'hashing:x' is not valid"):
        resolve_build_embedder("hashing:x")
    assert resolve_build_embedder("some/model") == "some/model"


def test_callable_embedder(tmp_path, reference):
    emb = HashingEmbedder(32)
    out = build_regions_sharded(PROMPTS, work_dir=str(tmp_path), embedder=lambda texts: emb.encode(texts), **BUILD)
    assert np.array_equal(_ids(out), _ids(reference))


def test_real_minilm_on_a_tiny_pool(tmp_path, minilm_embedder, topic_pool):
    prompts, _ = topic_pool
    sharded = build_regions_sharded(prompts, 5, str(tmp_path), embedder=minilm_embedder, seed=0, chunk_size=16,
                                    method="sklearn", progress=False)
    full = build_regions(prompts, 5, embedder=minilm_embedder, seed=0, method="sklearn", progress=False)
    assert sharded.metadata["sample_size"] == len(prompts)
    assert np.array_equal(_ids(sharded), full.region_ids)


# ------------------------------------------------------------------------------------ two processes (gloo)


def _launch(args: list[str]) -> None:
    """`accelerate launch` of the entry point on 2 CPU processes (gloo), on a free port: `debug_launcher`'s fixed
    port 29500 collides with another test run on the same machine."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
           str(port), "-m", "diffusers_aria.cli", "regions", "build", "--no_progress"] + args
    env = dict(os.environ, ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", PYTHONPATH=REPO)
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]


def _stats(work: str) -> list[dict]:
    return [json.loads(open(f).read()) for f in sorted(glob.glob(os.path.join(work, "build-stats-rank*.json")))]


def test_two_processes_build_the_same_regions_as_one(tmp_path, reference):
    pool = tmp_path / "pool.csv"
    pool.write_text("id,text\n" + "".join(f'{i},"{p}"\n' for i, p in enumerate(PROMPTS)))
    work = str(tmp_path / "work")
    _launch(["--pool", str(pool), "--column", "text", "--num_regions", "12", "--seed", "3", "--sample_size", "1500",
             "--chunk_size", "250", "--method", "sklearn", "--embedder", "hashing:32",
             "--output", str(tmp_path / "regions"), "--work_dir", work])
    stats = _stats(work)
    assert [s["num_processes"] for s in stats] == [2, 2] and [s["process_index"] for s in stats] == [0, 1]
    assert [s["chunks_embedded"] for s in stats] == [6, 6]
    from diffusers_aria.regions import ConditionRegions

    two = ConditionRegions.load(str(tmp_path / "regions"))
    assert np.array_equal(two.region_ids, _ids(reference))
    np.testing.assert_array_equal(two.tree.ancestors, reference.tree.ancestors)  # every process, one tree
    np.testing.assert_array_equal(two.centroids, reference.centroids)
    assert two.metadata["fingerprint"] == reference.metadata["fingerprint"]
    for r in (0, 1):  # every process holds the full ids
        assert np.array_equal(np.load(os.path.join(work, f"region_ids-rank0000{r}.npy")), _ids(reference))


def test_build_killed_on_one_process_resumes_on_two(tmp_path):
    from diffusers_aria.regions import ConditionRegions
    from diffusers_aria.training.inputs import load_pool

    pool, _ = load_pool("builtin", builtin_size=600, seed=1)
    kw = {"num_regions": 6, "seed": 1, "chunk_size": 50, "sample_size": 400, "method": "sklearn", "progress": False}
    ref = build_regions_sharded(pool, work_dir=str(tmp_path / "ref"), embedder=HashingEmbedder(32), **kw)
    work = str(tmp_path / "work")
    with pytest.raises(KeyboardInterrupt):
        build_regions_sharded(pool, work_dir=work, embedder=CountingEmbedder(fail_on_call=8), **kw)
    _launch(["--pool", "builtin", "--builtin_pool_size", "600", "--num_regions", "6", "--seed", "1",
             "--chunk_size", "50", "--sample_size", "400", "--method", "sklearn", "--embedder", "hashing:32",
             "--min_region_size", "1", "--batch_size", "64", "--work_dir", work, "--output", str(tmp_path / "regions")])
    stats = _stats(work)
    assert [s["num_processes"] for s in stats] == [2, 2]
    # 12 chunks; the killed 1-process build recorded 7 (process 0's 0-5 and chunk 6, now process 1's)
    assert [(s["chunks_copied"], s["chunks_embedded"]) for s in stats] == [(6, 0), (1, 5)]
    two = ConditionRegions.load(str(tmp_path / "regions"))
    assert np.array_equal(two.region_ids, _ids(ref))


def test_benchmark_quick(tmp_path):
    bench = os.path.join(REPO, "benchmarks")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    importlib.import_module("regions_scale").main(["--quick", "--out_dir", str(tmp_path)])
    data = json.loads((tmp_path / "regions_scale_quick.json").read_text())
    for key in ("command", "machine", "loadavg_start", "loadavg_end", "runs", "inertia", "projection"):
        assert key in data, key
    for run in data["runs"]:
        for key in ("n", "processes", "embedder", "wall_s", "prompts_per_s_per_process", "peak_rss_anon_mib",
                    "agreement_with_1_process", "loadavg"):
            assert key in run, key
        assert run["agreement_with_1_process"] == 1.0
    assert all(r["ratio"] > 0 for r in data["inertia"])
