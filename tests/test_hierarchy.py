"""The region tree (diffusers_aria/hierarchy.py) and the default number of regions."""

from __future__ import annotations

import numpy as np
import pytest

from diffusers_aria.hierarchy import RegionTree, build_tree, default_level_sizes
from diffusers_aria.regions import TREE_NAME, ConditionRegions, default_num_regions


def test_default_level_sizes_divide_by_the_branching_factor():
    assert default_level_sizes(4096) == [8, 64, 512]
    assert default_level_sizes(512) == [8, 64]
    assert default_level_sizes(64) == [8]
    assert default_level_sizes(100) == [2, 13]
    assert default_level_sizes(8) == [] and default_level_sizes(3) == []
    assert default_level_sizes(64, branching=4) == [4, 16]
    with pytest.raises(ValueError, match=r"branching=1 must be >= 2"):
        default_level_sizes(64, branching=1)


def test_default_num_regions_about_four_prompts_a_region():
    assert default_num_regions(2316) == 512 and default_num_regions(4000) == 1024
    assert default_num_regions(100) == 32 and default_num_regions(10 ** 7) == 4096
    assert default_num_regions(12) == 4 and default_num_regions(3) == 1


def _clustered_centroids(groups: int, per_group: int, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(groups, dim))
    c = np.repeat(centres, per_group, axis=0) + 0.05 * rng.normal(size=(groups * per_group, dim))
    return c / np.linalg.norm(c, axis=1, keepdims=True), np.repeat(np.arange(groups), per_group)


def test_build_tree_groups_nearby_leaves_and_is_nested():
    c, truth = _clustered_centroids(8, 8)
    tree = build_tree(c, np.full(64, 5))
    assert tree.level_sizes() == [8, 64] and tree.num_leaves == 64
    # every true group of leaves lands in one node
    for g in range(8):
        assert np.unique(tree.ancestors[0][truth == g]).size == 1
    deep = build_tree(_clustered_centroids(64, 8, seed=1)[0], np.full(512, 3))
    assert deep.level_sizes() == [8, 64, 512]
    # nested: leaves sharing a level-1 node share their level-0 node
    for node in range(64):
        assert np.unique(deep.ancestors[0][deep.ancestors[1] == node]).size == 1
    np.testing.assert_array_equal(deep.parents(1)[deep.ancestors[1]], deep.ancestors[0])
    same = build_tree(_clustered_centroids(64, 8, seed=1)[0], np.full(512, 3))
    np.testing.assert_array_equal(same.ancestors, deep.ancestors)  # deterministic for its seed


def test_region_tree_checks_and_bad_inputs():
    with pytest.raises(ValueError, match=r"ancestors must be \[levels, leaves\]"):
        RegionTree(np.zeros(4, dtype=np.int32))
    with pytest.raises(ValueError, match=r"level 1 is not nested in level 0"):
        RegionTree(np.array([[0, 0, 1, 1], [0, 1, 1, 2]]))
    with pytest.raises(ValueError, match=r"level 0 node ids must be 0..n-1"):
        RegionTree(np.array([[0, 2, 2, 0]]))
    c, _ = _clustered_centroids(2, 8)
    with pytest.raises(ValueError, match=r"sizes has 3 entries but there are 16 centroids"):
        build_tree(c, np.ones(3))
    with pytest.raises(ValueError, match=r"level sizes \[16\] must increase and stay below the 16 leaves"):
        build_tree(c, np.ones(16), level_sizes=[16])
    assert RegionTree.flat(5).num_levels == 0


def test_regions_save_and_load_their_tree(tmp_path):
    c, _ = _clustered_centroids(4, 8)
    ids = np.repeat(np.arange(32), 3).astype(np.int32)
    regions = ConditionRegions(region_ids=ids, centroids=c.astype(np.float32), metadata={"embedder": "x"},
                               tree=build_tree(c, np.full(32, 3)))
    regions.save(str(tmp_path / "r"))
    assert (tmp_path / "r" / TREE_NAME).is_file()
    loaded = ConditionRegions.load(str(tmp_path / "r"))
    np.testing.assert_array_equal(loaded.tree.ancestors, regions.tree.ancestors)
    assert loaded.metadata["tree_levels"] == [4]
    with pytest.raises(ValueError, match=r"the region tree has 4 leaves but there are 32 regions"):
        ConditionRegions(region_ids=ids, centroids=c.astype(np.float32), tree=RegionTree.flat(4))
