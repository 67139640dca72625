"""Regions of the conditioning space (diffusers_aria/regions.py), with the real all-MiniLM-L6-v2 embedder."""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import datasets
import numpy as np
import pytest

from diffusers_aria.pool import PromptPoolError, pool_fingerprint
from diffusers_aria.regions import (
    CENTROIDS_NAME,
    CONFIG_NAME,
    DEFAULT_EMBEDDER,
    REGION_IDS_NAME,
    ConditionRegions,
    RegionsMismatchError,
    build_regions,
    embed_pool,
    load_or_build_regions,
    spherical_kmeans,
)

PARTI_PATH = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "PartiPrompts.tsv"

# new prompts (not in the pool), one per topic of the conftest's topic pool
NEW_PROMPTS = {
    "animals": "a wild leopard animal resting in the savanna",
    "vehicles": "a red convertible car vehicle on a highway",
    "food": "a plate of delicious grilled salmon food served for dinner",
    "space": "a distant exoplanet orbiting a star in outer space",
    "music": "a bagpipe musical instrument played at a concert",
}


def _purity(ids: np.ndarray, labels: np.ndarray) -> float:
    """Share of items whose region's majority label equals their own."""
    total = 0
    for k in np.unique(ids):
        total += Counter(labels[ids == k].tolist()).most_common(1)[0][1]
    return total / len(ids)


def _topic_of_region(regions: ConditionRegions, topics: list[str]) -> dict[int, str]:
    labels = np.asarray(topics)
    ids = np.asarray(regions.region_ids)
    return {int(k): Counter(labels[ids == k].tolist()).most_common(1)[0][0] for k in np.unique(ids)}


# ------------------------------------------------------------------------------------------- building


def test_build_on_separated_topics_is_pure(topic_regions, topic_pool):
    prompts, topics = topic_pool
    r = topic_regions
    assert r.num_regions == 5
    assert r.num_prompts == len(prompts)
    assert r.region_ids.dtype == np.int32
    assert r.centroids.dtype == np.float32 and r.centroids.shape == (5, 384)
    np.testing.assert_allclose(np.linalg.norm(r.centroids, axis=1), 1.0, atol=1e-5)
    assert r.sizes.sum() == len(prompts)
    assert _purity(np.asarray(r.region_ids), np.asarray(topics)) >= 0.95
    # five different topics map to five different regions
    assert len(set(_topic_of_region(r, topics).values())) == 5
    assert r.metadata["fingerprint"] == pool_fingerprint(prompts)
    assert r.metadata["embedder"] == DEFAULT_EMBEDDER
    assert r.metadata["embedding_dim"] == 384
    assert r.metadata["method"] == "sklearn"


@pytest.mark.parametrize("method", ["sklearn", "faiss"])
def test_both_methods_recover_topics(method, minilm_embedder, topic_pool):
    prompts, topics = topic_pool
    r = build_regions(prompts, num_regions=5, seed=0, method=method, progress=False)
    assert r.metadata["method"] == method
    assert r.num_regions == 5
    assert _purity(np.asarray(r.region_ids), np.asarray(topics)) >= 0.95


def test_build_is_deterministic_for_a_seed(minilm_embedder, topic_pool, topic_regions):
    prompts, _ = topic_pool
    again = build_regions(prompts, num_regions=5, seed=0, method="sklearn", progress=False)
    np.testing.assert_array_equal(again.region_ids, topic_regions.region_ids)
    np.testing.assert_array_equal(again.centroids, topic_regions.centroids)


def test_build_from_dataset_with_column(minilm_embedder, topic_pool, topic_regions):
    prompts, topics = topic_pool
    ds = datasets.Dataset.from_dict({"topic": topics, "caption": prompts})
    r = build_regions(ds, num_regions=5, column="caption", seed=0, method="sklearn", progress=False)
    np.testing.assert_array_equal(r.region_ids, topic_regions.region_ids)


def test_assign_new_prompts_lands_in_topic_region(topic_regions, topic_pool):
    _, topics = topic_pool
    region_topic = _topic_of_region(topic_regions, topics)
    got = topic_regions.assign(list(NEW_PROMPTS.values()))
    assert got.dtype == np.int32 and got.shape == (len(NEW_PROMPTS),)
    assert [region_topic[int(k)] for k in got] == list(NEW_PROMPTS)
    assert topic_regions.assign([]).shape == (0,)


def test_assign_pool_prompts_reproduces_their_regions(topic_regions, topic_pool):
    prompts, _ = topic_pool
    np.testing.assert_array_equal(topic_regions.assign(prompts[::7]), np.asarray(topic_regions.region_ids)[::7])


def test_assign_embeddings_wrong_dimension_raises(topic_regions):
    with pytest.raises(RegionsMismatchError, match=r"embedding dimension 16 does not match .* dimension 384"):
        topic_regions.assign_embeddings(np.ones((3, 16), dtype=np.float32))
    with pytest.raises(RegionsMismatchError, match=r"does not match"):
        topic_regions.assign_embeddings(np.ones(384, dtype=np.float32))


def test_assign_embeddings_normalises_rows(topic_regions):
    c = topic_regions.centroids
    # a scaled centroid is still nearest to itself
    np.testing.assert_array_equal(topic_regions.assign_embeddings(c * 7.5), np.arange(len(c)))


def test_add_to_dataset(topic_regions, topic_pool):
    prompts, _ = topic_pool
    ds = datasets.Dataset.from_dict({"prompt": prompts, "region": [99] * len(prompts)})
    out = topic_regions.add_to_dataset(ds)
    assert out.column_names.count("region") == 1  # an existing column is replaced
    assert out["prompt"] == prompts
    np.testing.assert_array_equal(np.asarray(out["region"]), np.asarray(topic_regions.region_ids))
    named = topic_regions.add_to_dataset(datasets.Dataset.from_dict({"prompt": prompts}), column="cluster")
    np.testing.assert_array_equal(np.asarray(named["cluster"]), np.asarray(topic_regions.region_ids))
    with pytest.raises(RegionsMismatchError, match=r"dataset has 3 rows but the regions cover 100"):
        topic_regions.add_to_dataset(datasets.Dataset.from_dict({"prompt": ["a", "b", "c"]}))


def test_check_pool(topic_regions, topic_pool):
    prompts, _ = topic_pool
    topic_regions.check_pool(prompts)  # the pool it was built from: no error
    topic_regions.check_pool(datasets.Dataset.from_dict({"prompt": prompts}))
    other = list(prompts)
    other[10] = "a completely different prompt about tax law"
    with pytest.raises(RegionsMismatchError, match=r"does not match this prompt pool: fingerprint"):
        topic_regions.check_pool(other)
    with pytest.raises(RegionsMismatchError, match=r"does not match this prompt pool"):
        topic_regions.check_pool(prompts[::-1])  # same prompts, another order
    with pytest.raises(RegionsMismatchError, match=r"built for a pool of 100 prompts but this pool has 99"):
        topic_regions.check_pool(prompts[:-1])


def test_num_regions_larger_than_unique_prompts_raises(minilm_embedder):
    prompts = ["a cat", "a dog", "a cat", "a dog", "a bird"]
    with pytest.raises(PromptPoolError, match=r"num_regions=4 is larger than the number of unique prompts in the pool \(3\)"):
        build_regions(prompts, num_regions=4, progress=False)


@pytest.mark.parametrize("bad", [0, -3, 2.5, "4"])
def test_bad_num_regions_raises(bad):
    with pytest.raises(ValueError, match=r"num_regions=.* is not valid"):
        build_regions(["a", "b", "c"], num_regions=bad, progress=False)


def test_bad_method_raises():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match=r"method='kmeans' is not valid"):
        spherical_kmeans(x, 2, method="kmeans")


def test_constructor_validates_region_ids():
    with pytest.raises(ValueError, match=r"region ids must lie in \[0, 2\)"):
        ConditionRegions(region_ids=np.array([0, 1, 2], dtype=np.int32), centroids=np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match=r"must be 1-D"):
        ConditionRegions(region_ids=np.zeros((2, 2), dtype=np.int32), centroids=np.eye(2, dtype=np.float32))


def test_spherical_kmeans_every_region_used_and_min_size():
    rng = np.random.default_rng(0)
    centers = np.eye(8, dtype=np.float32)[:3]
    x = np.concatenate([c + 0.05 * rng.standard_normal((30, 8)).astype(np.float32) for c in centers])
    x = np.concatenate([x, np.ones((2, 8), dtype=np.float32)])  # two outliers
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for method in ("sklearn", "faiss"):
        c, ids = spherical_kmeans(x, 4, seed=0, method=method, min_region_size=5)
        sizes = np.bincount(ids, minlength=len(c))
        assert len(c) <= 4
        assert np.all(sizes >= 5), (method, sizes)
        assert ids.max() == len(c) - 1


# ------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip(tmp_path, topic_regions):
    folder = tmp_path / "regions"
    topic_regions.save(str(folder))
    assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, CENTROIDS_NAME, REGION_IDS_NAME])
    assert not [f for f in os.listdir(folder) if f.endswith((".pkl", ".pickle", ".pt", ".bin"))]
    # region ids load without pickle, as int32
    ids = np.load(folder / REGION_IDS_NAME, allow_pickle=False)
    assert ids.dtype == np.int32
    np.testing.assert_array_equal(ids, topic_regions.region_ids)
    with open(folder / CONFIG_NAME) as fh:
        cfg = json.load(fh)
    assert cfg["num_regions"] == 5 and cfg["num_prompts"] == 100
    assert cfg["sizes"] == topic_regions.sizes.tolist()

    for mmap in (True, False):
        loaded = ConditionRegions.load(str(folder), mmap=mmap)
        np.testing.assert_array_equal(loaded.region_ids, topic_regions.region_ids)
        np.testing.assert_array_equal(loaded.centroids, topic_regions.centroids)
        assert loaded.centroids.dtype == np.float32
        for key, value in topic_regions.metadata.items():
            assert loaded.metadata[key] == value
        assert loaded.num_regions == topic_regions.num_regions
        np.testing.assert_array_equal(loaded.sizes, topic_regions.sizes)
    assert isinstance(ConditionRegions.load(str(folder), mmap=True).region_ids, np.memmap)


def test_loaded_regions_assign_like_the_original(tmp_path, topic_regions):
    topic_regions.save(str(tmp_path / "r"))
    loaded = ConditionRegions.from_pretrained(str(tmp_path / "r"))
    prompts = list(NEW_PROMPTS.values())
    np.testing.assert_array_equal(loaded.assign(prompts), topic_regions.assign(prompts))


def test_save_overwrites_cleanly(tmp_path, topic_regions):
    folder = tmp_path / "regions"
    folder.mkdir()
    (folder / "stale_file.txt").write_text("left over from an older run")
    topic_regions.save(str(folder))
    small = ConditionRegions(region_ids=np.array([0, 1, 1], dtype=np.int32), centroids=np.eye(2, dtype=np.float32),
                             metadata={"embedder": "x"})
    small.save_pretrained(str(folder))
    assert sorted(os.listdir(folder)) == sorted([CONFIG_NAME, CENTROIDS_NAME, REGION_IDS_NAME])
    loaded = ConditionRegions.load(str(folder))
    np.testing.assert_array_equal(loaded.region_ids, [0, 1, 1])
    assert loaded.metadata["embedder"] == "x"
    # no temporary or backup folders are left beside it
    assert sorted(os.listdir(tmp_path)) == ["regions"]


def test_save_over_the_folder_it_was_loaded_from(tmp_path, topic_regions):
    folder = tmp_path / "regions"
    topic_regions.save(str(folder))
    loaded = ConditionRegions.load(str(folder), mmap=True)
    loaded.save(str(folder))
    again = ConditionRegions.load(str(folder))
    np.testing.assert_array_equal(again.region_ids, topic_regions.region_ids)
    assert sorted(os.listdir(tmp_path)) == ["regions"]


def test_failed_save_leaves_existing_folder_intact(tmp_path, topic_regions, monkeypatch):
    folder = tmp_path / "regions"
    topic_regions.save(str(folder))
    before = {f: (folder / f).read_bytes() for f in os.listdir(folder)}

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        topic_regions.save(str(folder))
    assert {f: (folder / f).read_bytes() for f in os.listdir(folder)} == before
    assert sorted(os.listdir(tmp_path)) == ["regions"]


def test_load_non_regions_folder_raises(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"is not a regions folder: regions_config.json is missing"):
        ConditionRegions.load(str(tmp_path))


def test_load_rejects_wrong_id_dtype(tmp_path, topic_regions):
    folder = tmp_path / "regions"
    topic_regions.save(str(folder))
    np.save(folder / REGION_IDS_NAME, np.asarray(topic_regions.region_ids, dtype=np.int64))
    with pytest.raises(ValueError, match=r"has dtype int64; expected int32"):
        ConditionRegions.load(str(folder))


def test_summary_lists_regions(topic_regions, topic_pool):
    prompts, _ = topic_pool
    text = topic_regions.summary(prompts)
    lines = text.splitlines()
    assert lines[0].startswith("5 regions over 100 prompts")
    assert len(lines) == 2 + 5
    first = prompts[0]
    assert first[:40] in text


# ------------------------------------------------------------------------------------------- caching


def test_embeddings_cache_is_reused(tmp_path, minilm_embedder, topic_pool, monkeypatch):
    prompts, _ = topic_pool
    calls = []
    original = minilm_embedder.encode

    def counting_encode(*args, **kwargs):
        calls.append(len(args[0]))
        return original(*args, **kwargs)

    monkeypatch.setattr(minilm_embedder, "encode", counting_encode)
    cache = tmp_path / "emb_cache"
    first = build_regions(prompts, num_regions=5, seed=0, method="sklearn", embeddings_cache_dir=str(cache),
                          progress=False)
    assert sum(calls) == len(prompts)
    cached = [f for f in os.listdir(cache) if f.endswith(".npy")]
    assert len(cached) == 1
    mtime = os.path.getmtime(cache / cached[0])
    second = build_regions(prompts, num_regions=5, seed=0, method="sklearn", embeddings_cache_dir=str(cache),
                           progress=False)
    assert sum(calls) == len(prompts)  # no new encode call
    assert os.path.getmtime(cache / cached[0]) == mtime
    np.testing.assert_array_equal(first.region_ids, second.region_ids)
    # another pool does not reuse the first pool's cache
    embed_pool(prompts[:10], DEFAULT_EMBEDDER, cache_dir=str(cache), progress=False)
    assert sum(calls) == len(prompts) + 10
    assert len([f for f in os.listdir(cache) if f.endswith(".npy")]) == 2


def test_embed_pool_matches_direct_encoding(minilm_embedder, topic_pool):
    prompts, _ = topic_pool
    emb = embed_pool(prompts[:12], DEFAULT_EMBEDDER, chunk_size=5, batch_size=4, progress=False)
    direct = minilm_embedder.encode(prompts[:12], normalize_embeddings=True, convert_to_numpy=True)
    assert emb.shape == (12, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(emb, direct, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)


def test_load_or_build_regions_builds_then_loads(tmp_path, minilm_embedder, topic_pool, monkeypatch):
    prompts, _ = topic_pool
    folder = tmp_path / "regions"
    built = load_or_build_regions(str(folder), prompts, num_regions=5, seed=0, method="sklearn", progress=False)
    assert (folder / CONFIG_NAME).is_file()

    import diffusers_aria.regions as regions_module

    def no_build(*args, **kwargs):
        raise AssertionError("build_regions must not run when the folder exists")

    monkeypatch.setattr(regions_module, "build_regions", no_build)
    loaded = load_or_build_regions(str(folder), prompts, num_regions=5)
    np.testing.assert_array_equal(loaded.region_ids, built.region_ids)
    np.testing.assert_array_equal(loaded.centroids, built.centroids)
    with pytest.raises(RegionsMismatchError):
        load_or_build_regions(str(folder), prompts[:-1], num_regions=5)


def test_cached_regions_are_reused_only_with_the_same_settings(tmp_path, minilm_embedder, topic_pool, monkeypatch):
    """Strict: saved regions are reused only for the same pool and settings (the demo's rerun with --num_regions
    5000 is refused, naming the setting); `overwrite=True` rebuilds them; `check` limits what is compared."""
    from diffusers_aria.regions import BUILD_SETTINGS, DEFAULT_EMBEDDER, RegionsMismatchError

    prompts, _ = topic_pool
    folder = str(tmp_path / "regions")
    kw = {"num_regions": 5, "embedder": DEFAULT_EMBEDDER, "seed": 0, "method": "auto", "progress": False}
    built = load_or_build_regions(folder, prompts, check=BUILD_SETTINGS, **kw)
    again = load_or_build_regions(folder, prompts, **{**kw, "method": "sklearn"})  # what "auto" resolved to
    np.testing.assert_array_equal(again.region_ids, built.region_ids)
    for change, named in [({"num_regions": 50}, "num_regions 5 (this run: 50)"), ({"seed": 3}, "seed 0 (this run: 3)"),
                          ({"embedder": "other/model"}, "embedder 'sentence-transformers/all-MiniLM-L6-v2' "
                                                        "(this run: 'other/model')"),
                          ({"method": "faiss"}, "method 'sklearn' (this run: 'faiss')")]:
        with pytest.raises(RegionsMismatchError, match=r"built with other settings than this run's: "
                                                       + named.replace("(", r"\(").replace(")", r"\)")):
            load_or_build_regions(folder, prompts, **{**kw, **change})
    with pytest.raises(RegionsMismatchError, match="built for a pool of 100 prompts but this pool has 99"):
        load_or_build_regions(folder, prompts[:-1], **kw)
    assert load_or_build_regions(folder, prompts, **kw).num_regions == 5  # nothing was changed on disk
    # regions the user named: only the listed settings count (the script checks K only when --num_regions is given)
    assert load_or_build_regions(folder, prompts, check=(), **{**kw, "seed": 3, "num_regions": 64}).num_regions == 5
    with pytest.raises(RegionsMismatchError, match=r"num_regions 5 \(this run: 64\)"):
        load_or_build_regions(folder, prompts, check=("num_regions",), **{**kw, "seed": 3, "num_regions": 64})
    rebuilt = load_or_build_regions(folder, prompts, overwrite=True, **{**kw, "num_regions": 4})
    assert rebuilt.num_regions == 4 and load_or_build_regions(folder, prompts, **{**kw, "num_regions": 4}).num_regions == 4
    other_pool = load_or_build_regions(folder, prompts[:60], overwrite=True, **{**kw, "num_regions": 4})
    assert other_pool.num_prompts == 60


# ------------------------------------------------------------------------------------------- PartiPrompts


def test_partiprompts_regions_follow_categories(tmp_path, minilm_embedder):
    if not PARTI_PATH.is_file():
        pytest.skip(f"{PARTI_PATH} is not available")
    with open(PARTI_PATH, encoding="utf-8", newline="") as fh:
        categories = np.asarray([row["Category"] for row in csv.DictReader(fh, delimiter="\t")])
    regions = build_regions(str(PARTI_PATH), num_regions=12, column="Prompt", seed=0, progress=False)
    assert regions.num_prompts == len(categories)
    assert 2 <= regions.num_regions <= 12
    ids = np.asarray(regions.region_ids)
    purity = _purity(ids, categories)
    rng = np.random.default_rng(0)
    random_purity = float(np.mean([_purity(rng.permutation(ids), categories) for _ in range(20)]))
    assert purity > random_purity + 0.15, (purity, random_purity)


def test_an_embeddings_cache_that_does_not_match_is_embedded_again(tmp_path, topic_pool):
    prompts, _ = topic_pool
    cache = tmp_path / "emb"
    first = np.array(embed_pool(prompts[:8], DEFAULT_EMBEDDER, cache_dir=str(cache), progress=False))
    [meta_file] = [f for f in cache.iterdir() if f.name.endswith(".json")]
    meta = json.loads(meta_file.read_text())
    assert meta["num"] == 8 and meta["normalized"] and meta["embedder"] == DEFAULT_EMBEDDER
    npy = Path(str(meta_file)[: -len(".json")])
    np.save(npy, np.zeros((5, 384), np.float32))  # a damaged file under the right name
    again = embed_pool(prompts[:8], DEFAULT_EMBEDDER, cache_dir=str(cache), progress=False)
    np.testing.assert_allclose(again, first, atol=1e-6)
