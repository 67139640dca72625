"""`RegionTree`: coarser, nested groupings of the regions, so that ARIA can look at the pool at several scales.

The regions (the leaves) are the finest partition of the prompt pool; the sampler draws them and the tracker keeps
their statistics. The tree groups them into nodes level by level (e.g. 512 leaves -> 64 -> 8), built bottom-up by
size-weighted spherical k-means of the leaf centroids, then of the node centroids, and so on: cheap however large
the pool is (it sees centroids, never prompts), so the sharded build gets it too. The allocation reads the
statistics of a node as the sums of its leaves' (they are linear), estimates how much each node differs from its
parent, and shrinks every difference by how sure it is of it: a small concept stands out at the leaves without
the noise of thousands of leaves moving the allocation (`allocation.tree_excess`, docs/architecture.md).

Storage: `ancestors`, int32 [L, K]: `ancestors[l, k]` is the node of leaf k at level l, coarsest level first;
nodes of one level are numbered 0..K_l-1 and nested (two leaves in one node at level l+1 share their node at
level l).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

DEFAULT_BRANCHING = 8


@dataclass
class RegionTree:
    """Nested groupings of K leaves: `ancestors[l, k]` is the level-l node of leaf k (level 0 the coarsest)."""

    ancestors: np.ndarray

    def __post_init__(self) -> None:
        a = np.asarray(self.ancestors)
        if a.ndim != 2:
            raise ValueError(f"ancestors must be [levels, leaves], got shape {a.shape}")
        self.ancestors = np.ascontiguousarray(a, dtype=np.int32)
        for lvl in range(self.num_levels):
            ids = self.ancestors[lvl]
            if ids.size and (ids.min() < 0 or np.unique(ids).size != ids.max() + 1):
                raise ValueError(f"level {lvl} node ids must be 0..n-1 with every node used")
            if lvl + 1 < self.num_levels:
                # nested: each finer node has exactly one parent
                child, parent = self.ancestors[lvl + 1], ids
                first = np.full(child.max() + 1, -1)
                first[child] = parent
                if np.any(first[child] != parent):
                    raise ValueError(f"level {lvl + 1} is not nested in level {lvl}: a node has two parents")

    @property
    def num_levels(self) -> int:
        """Levels above the leaves."""
        return int(self.ancestors.shape[0])

    @property
    def num_leaves(self) -> int:
        return int(self.ancestors.shape[1])

    def level_sizes(self) -> list[int]:
        """Nodes per level, coarsest first, then the leaves."""
        return [int(a.max()) + 1 for a in self.ancestors] + [self.num_leaves]

    def parents(self, level: int) -> np.ndarray:
        """Parent (at `level - 1`) of each node of `level` (level == num_levels: the leaves); level 0 -> zeros."""
        child = np.arange(self.num_leaves) if level == self.num_levels else self.ancestors[level]
        if level == 0:
            return np.zeros(int(child.max()) + 1, dtype=np.int64)
        out = np.zeros(int(child.max()) + 1, dtype=np.int64)
        out[child] = self.ancestors[level - 1]
        return out

    @classmethod
    def flat(cls, num_leaves: int) -> RegionTree:
        """No levels: every leaf hangs from the root."""
        return cls(np.zeros((0, int(num_leaves)), dtype=np.int32))

    def to_dict(self) -> dict:
        return {"level_sizes": self.level_sizes()}


def default_level_sizes(num_leaves: int, branching: int = DEFAULT_BRANCHING) -> list[int]:
    """Node counts above `num_leaves` leaves, coarsest first: divide by `branching` (rounding up) while more than
    `branching` nodes remain (4096 leaves, branching 8: [8, 64, 512]; 512: [8, 64]; 100: [2, 13]; 8 or fewer: [])."""
    if branching < 2:
        raise ValueError(f"branching={branching!r} must be >= 2")
    sizes = []
    n = int(num_leaves)
    while n > branching:
        n = -(-n // branching)
        sizes.append(n)
    return sizes[::-1]


def _weighted_spherical_kmeans(x: np.ndarray, weights: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Cluster ids of `x` (unit rows) into `k` groups by size-weighted k-means, every group non-empty."""
    from sklearn.cluster import KMeans

    if k >= len(x):
        return np.arange(len(x), dtype=np.int32)
    km = KMeans(n_clusters=k, n_init=3, max_iter=100, random_state=seed, init="k-means++")
    ids = km.fit_predict(x, sample_weight=weights)
    _, ids = np.unique(ids, return_inverse=True)  # drop empty clusters, renumber 0..k'-1
    return ids.astype(np.int32)


def build_tree(centroids: np.ndarray, sizes: np.ndarray, branching: int = DEFAULT_BRANCHING, seed: int = 0,
               level_sizes: list[int] | None = None) -> RegionTree:
    """Group K leaves bottom-up: size-weighted spherical k-means of the leaf centroids into the finest level's
    nodes, then of those nodes' (size-weighted, normalised) mean centroids into the next, up to the coarsest.

    Args:
        centroids: float [K, D] unit-norm leaf centroids.
        sizes: prompts per leaf [K] (weights).
        branching: nodes shrink by about this factor per level (`default_level_sizes`).
        seed: k-means seed.
        level_sizes: explicit node counts, coarsest first (each smaller than the next and than K).
    """
    c = np.asarray(centroids, dtype=np.float64)
    w = np.asarray(sizes, dtype=np.float64)
    k = len(c)
    if w.shape != (k,):
        raise ValueError(f"sizes has {w.size} entries but there are {k} centroids")
    levels = default_level_sizes(k, branching) if level_sizes is None else [int(s) for s in level_sizes]
    for coarse, fine in zip(levels, levels[1:] + [k]):
        if not 1 <= coarse < fine:
            raise ValueError(f"level sizes {levels} must increase and stay below the {k} leaves")
    node_of_leaf = np.arange(k)
    node_c, node_w = c, w
    ancestors = []
    for lvl, n_nodes in enumerate(reversed(levels)):
        ids = _weighted_spherical_kmeans(node_c, node_w, n_nodes, seed + lvl)
        node_of_leaf = ids[node_of_leaf]
        ancestors.append(node_of_leaf.copy())
        m = int(ids.max()) + 1
        sums = np.zeros((m, c.shape[1]))
        np.add.at(sums, ids, node_c * node_w[:, None])
        node_w = np.bincount(ids, weights=node_w, minlength=m)
        node_c = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)
    return RegionTree(np.array(ancestors[::-1], dtype=np.int32).reshape(len(levels), k))


__all__ = ["DEFAULT_BRANCHING", "RegionTree", "build_tree", "default_level_sizes"]
