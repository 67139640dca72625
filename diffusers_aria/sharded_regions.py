"""Regions for a prompt pool too big for one process: sharded, resumable embedding and a k-means fit on a sample.

`build_regions_sharded` runs the same way in one process or under `accelerate launch` on any number of
processes and machines:

1. **Embed.** The pool is cut into chunks of `chunk_size` prompts (global, fixed by N and the chunk size) and
   process r of P takes the contiguous run of chunks `[C*r//P, C*(r+1)//P)`. Each process writes its rows into
   its own `.npy` shard file under `work_dir/shards/` (a memory map of one chunk's rows at a time, flushed),
   then records the chunk in `work_dir/chunks/` (a small JSON written to a temporary name and renamed, so a
   kill never leaves a half-written record). A killed build, run again with the same `work_dir`, embeds only
   the chunks without a record (a record whose prompts' sha256 no longer matches is embedded again).
2. **Fit.** A uniform sample of `sample_size` prompts, a function of (seed, N, sample_size) only, is gathered
   on the main process, which fits `regions.spherical_kmeans` on it and broadcasts the centroids.
3. **Assign.** Every process assigns its shard chunk by chunk with `regions.nearest_centroid`; the ids are
   all-gathered round by round into a memory-mapped int32 file on every process.

Because the chunks, the sample and the fit do not depend on the number of processes, the region ids are the
same for any process count (tested: 1 against 2 processes on CPU with gloo). With `sample_size >= N` the
result equals `build_regions` on the same embeddings.

Memory per process, beyond the interpreter, torch and the embedder, with D the embedding width, S the sample
size, C the chunk size and P the process count (none of it grows with N): one chunk being embedded (C texts,
C x D x 4 bytes of vectors plus the embedder's work); the sample, all-gathered on every process
(about S x D x 4 bytes, plus padding to the largest share) and on the main process a copy for the fit and
`spherical_kmeans`' work (64k-row float64 blocks); a round of assignment (C x D x 4 read, C x K x 4 of
similarities, P x C x 4 of gathered ids). The shard and id files are mapped one window at a time, and the
pool should be Arrow (a `save_to_disk` folder or parquet), which is memory-mapped. Measured peak anonymous
RSS: the same at N = 1M and N = 10M (docs/benchmarks-speed.md, section 4).

Its command line is `diffusers-aria regions build --work_dir W`, under accelerate for several processes (the
stand-in embedder `hashing` is for tests and benchmarks):

    accelerate launch --multi_gpu --num_processes 8 -m diffusers_aria.cli regions build \\
        --pool captions.parquet --num_regions 1024 --output regions-1024/ --work_dir /scratch/regions-work
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .hierarchy import DEFAULT_BRANCHING, build_tree, default_level_sizes
from .pool import PROMPT_COLUMN, PromptPoolError, get_prompts, load_prompt_pool, pool_fingerprint
from .regions import (
    DEFAULT_EMBEDDER,
    ConditionRegions,
    _embedder_name,
    default_num_regions,
    load_embedder,
    nearest_centroid,
    region_metadata,
    resolve_embedder_path,
    resolve_method,
    spherical_kmeans,
)
from .utils.atomic import atomic_save, atomic_write
from .utils.processes import launched_state

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_SIZE = 65_536
SAMPLE_POINTS_PER_REGION = 256  # default sample: 256 x K prompts (capped at N); see docs/benchmarks-speed.md
MANIFEST_NAME = "manifest.json"
STATS_PREFIX = "build-stats-rank"
_MANIFEST_VERSION = 1


class ShardedBuildError(ValueError):
    """Raised when a work folder belongs to another build (other pool size, embedder or chunk size)."""


# --------------------------------------------------------------------------------------------- layout


def num_chunks(num_prompts: int, chunk_size: int) -> int:
    """How many chunks of `chunk_size` prompts cover a pool of `num_prompts` (the last one may be short)."""
    return -(-num_prompts // chunk_size)


def shard_chunks(num_prompts: int, chunk_size: int, num_processes: int, process_index: int) -> range:
    """The contiguous run of chunk indices process `process_index` of `num_processes` embeds and assigns."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index={process_index} is not valid for {num_processes} processes")
    c = num_chunks(num_prompts, chunk_size)
    return range(c * process_index // num_processes, c * (process_index + 1) // num_processes)


def chunk_bounds(chunk: int, num_prompts: int, chunk_size: int) -> tuple[int, int]:
    """[start, stop) of a chunk in pool order."""
    return chunk * chunk_size, min((chunk + 1) * chunk_size, num_prompts)


def default_sample_size(num_regions: int, num_prompts: int) -> int:
    """256 prompts per region, at most the pool (the inertia ratio against a full fit is measured in
    docs/benchmarks-speed.md)."""
    return int(min(num_prompts, SAMPLE_POINTS_PER_REGION * num_regions))


def sample_indices(num_prompts: int, sample_size: int, seed: int) -> np.ndarray:
    """Sorted int64 indices of a uniform sample without replacement: a function of (seed, N, size) only."""
    if sample_size >= num_prompts:
        return np.arange(num_prompts, dtype=np.int64)
    rng = np.random.default_rng([int(seed), int(num_prompts), int(sample_size), 0xA12A])
    return np.sort(rng.choice(num_prompts, size=sample_size, replace=False).astype(np.int64))


# --------------------------------------------------------------------------------------------- embedders


class HashingEmbedder:
    """A cheap, deterministic stand-in for a sentence-transformers model (tests and benchmarks only).

    A prompt's vector depends on its text alone: a blake2b hash picks one of `num_topics` random unit
    centres and two rows of a fixed noise bank, so the pool has cluster structure and equal prompts get equal
    vectors. It has the two methods `embed_pool` and `build_regions_sharded` call (`encode`,
    `get_sentence_embedding_dimension`), at several hundred thousand prompts per second and core.
    """

    def __init__(self, dim: int = 384, num_topics: int = 512, noise: float = 0.35, seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.dim = int(dim)
        self.centres = rng.standard_normal((num_topics, dim)).astype(np.float32)
        self.centres /= np.linalg.norm(self.centres, axis=1, keepdims=True)
        self.bank = (noise / np.sqrt(dim) * rng.standard_normal((4096, dim))).astype(np.float32)
        self.name = f"hashing:{dim}"

    def get_sentence_embedding_dimension(self) -> int:
        return self.dim

    def encode(self, texts, batch_size: int = 256, convert_to_numpy: bool = True, normalize_embeddings: bool = True,
               show_progress_bar: bool = False) -> np.ndarray:
        h = np.fromiter((int.from_bytes(hashlib.blake2b(t.encode("utf-8"), digest_size=8).digest(), "little")
                         for t in texts), dtype=np.uint64, count=len(texts))
        topic = (h % np.uint64(len(self.centres))).astype(np.intp)
        a = ((h >> np.uint64(20)) % np.uint64(4096)).astype(np.intp)
        b = ((h >> np.uint64(40)) % np.uint64(4096)).astype(np.intp)
        v = self.centres[topic] + self.bank[a] + self.bank[b]
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        return v


def resolve_build_embedder(embedder: str | Any) -> str | Any:
    """`"hashing"` or `"hashing:DIM"` -> a `HashingEmbedder`; anything else is returned unchanged (a
    sentence-transformers id or path, or a loaded model)."""
    if isinstance(embedder, str) and (embedder == "hashing" or embedder.startswith("hashing:")):
        _, _, dim = embedder.partition(":")
        try:
            return HashingEmbedder(dim=int(dim) if dim else 384)
        except ValueError:
            raise ValueError(f"embedder {embedder!r} is not valid; the stand-in is 'hashing' or 'hashing:DIM' "
                             "with an integer DIM") from None
    return embedder


def _embedder_id(embedder: str | Any) -> str:
    return getattr(embedder, "name", None) if isinstance(embedder, HashingEmbedder) else _embedder_name(embedder)


def _encode_fn(model: Any, batch_size: int) -> Callable[[list[str]], np.ndarray]:
    if callable(model) and not hasattr(model, "encode"):
        return lambda texts: np.asarray(model(texts), dtype=np.float32)
    return lambda texts: np.asarray(model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                                 normalize_embeddings=True, show_progress_bar=False),
                                    dtype=np.float32)


def _embedding_dim(model: Any, encode: Callable[[list[str]], np.ndarray], probe: str) -> int:
    fn = getattr(model, "get_embedding_dimension", None) or getattr(model, "get_sentence_embedding_dimension", None)
    dim = fn() if fn is not None else None
    return int(dim) if dim else int(encode([probe]).shape[1])


# --------------------------------------------------------------------------------------------- files


def _write_json_atomic(path: str, payload: dict) -> None:
    """`atomic.atomic_write`, synced to disk before the rename: after a power loss a record (the proof that a
    chunk's rows are in its shard) is absent or whole, never an empty file under the final name."""
    with atomic_write(path) as fh:
        json.dump(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())


def _read_json(path: str) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError):
        return None


def _chunk_sha(texts: list[str]) -> str:
    h = hashlib.sha256()
    for t in texts:
        b = t.encode("utf-8")
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:32]


class _ShardFile:
    """A `.npy` float32 [rows, dim] file, mapped one row range at a time (so its pages leave the process)."""

    def __init__(self, path: str, rows: int, dim: int) -> None:
        self.path, self.rows, self.dim = path, rows, dim
        ok = self.created = False
        if os.path.exists(path):
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
                ok = arr.shape == (rows, dim) and arr.dtype == np.float32
                del arr
            except (OSError, ValueError):
                ok = False
        if not ok:  # a new (sparse) file: the header, then rows x dim zeros that are written chunk by chunk
            # Only its creation is atomic; the rows are then written in place through memory maps (`write`), as
            # a copy per chunk would rewrite the whole shard: a chunk counts once its record exists.
            atomic_save(path, lambda tmp: np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32,
                                                                    shape=(rows, dim)).flush())
            self.created = True
        with open(path, "rb") as fh:
            np.lib.format.read_magic(fh)
            np.lib.format.read_array_header_1_0(fh)
            self.offset = fh.tell()

    def _map(self, start: int, stop: int, mode: str) -> np.memmap:
        return np.memmap(self.path, dtype=np.float32, mode=mode, offset=self.offset + start * self.dim * 4,
                         shape=(stop - start, self.dim))

    def write(self, start: int, values: np.ndarray) -> None:
        m = self._map(start, start + len(values), "r+")
        m[:] = values
        m.flush()
        del m

    def read(self, start: int, stop: int) -> np.ndarray:
        m = self._map(start, stop, "r")
        out = np.array(m)
        del m
        return out


# --------------------------------------------------------------------------------------------- memory probe


class _PeakMemory:
    """Samples /proc/self/status (RssAnon, RssFile) every `interval` seconds; peaks in bytes (Linux only)."""

    def __init__(self, interval: float = 0.1) -> None:
        self.interval, self.peak_anon, self.peak_file = interval, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> dict[str, int]:
        out = {}
        try:
            with open("/proc/self/status") as fh:
                for line in fh:
                    key, _, value = line.partition(":")
                    if key in ("RssAnon", "RssFile", "VmHWM", "VmRSS"):
                        out[key] = int(value.split()[0]) * 1024
        except OSError:
            pass
        return out

    def _poll(self) -> None:
        s = self.read()
        self.peak_anon = max(self.peak_anon, s.get("RssAnon", 0))
        self.peak_file = max(self.peak_file, s.get("RssFile", 0))

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self._poll()

    def __enter__(self) -> _PeakMemory:
        self._poll()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._poll()


# --------------------------------------------------------------------------------------------- collectives


@dataclass
class _Comm:
    """The few collectives the build needs, on an `Accelerator`/`PartialState` or a single process."""

    state: Any

    @property
    def size(self) -> int:
        return int(self.state.num_processes)

    @property
    def rank(self) -> int:
        return int(self.state.process_index)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.size > 1:
            self.state.wait_for_everyone()

    def all_gather(self, x: np.ndarray) -> np.ndarray:
        """Concatenate equal-shaped arrays of every process in process order."""
        if self.size == 1:
            return x
        import torch
        from accelerate.utils import gather

        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.state.device)
        return gather(t).cpu().numpy()

    def broadcast(self, x: np.ndarray) -> np.ndarray:
        """The main process's array on every process (`x` gives shape and dtype on the others)."""
        if self.size == 1:
            return x
        import torch
        from accelerate.utils import broadcast

        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.state.device)
        return broadcast(t, from_process=0).cpu().numpy()

    def all_max(self, value: int) -> int:
        return int(self.all_gather(np.asarray([value], dtype=np.int64)).max())


def _comm(accelerator: Any | None) -> _Comm:
    return _Comm(accelerator if accelerator is not None else launched_state())


# --------------------------------------------------------------------------------------------- the build


def _check_manifest(work_dir: str, settings: dict[str, Any]) -> None:
    path = os.path.join(work_dir, MANIFEST_NAME)
    saved = _read_json(path)
    if saved is not None:
        differ = [f"{k} {saved.get(k)!r} was saved, this build has {v!r}" for k, v in settings.items()
                  if saved.get(k) != v]
        if differ:
            raise ShardedBuildError(
                f"the work folder {work_dir!r} belongs to another build ({'; '.join(differ)}); pass a new "
                "--work_dir, or delete this one to start again")
        return
    _write_json_atomic(path, settings)


def _stored_chunk(record_dir: str, chunk: int, sha: str, work_dir: str) -> dict | None:
    rec = _read_json(os.path.join(record_dir, f"{chunk:09d}.json"))
    if rec is None or rec.get("sha256") != sha:
        return None
    if not os.path.isfile(os.path.join(work_dir, "shards", rec.get("shard", ""))):
        return None
    return rec


def _embed_shard(pool, model, encode, comm: _Comm, work_dir: str, n: int, dim: int, chunk_size: int,
                 progress: bool) -> tuple[_ShardFile, range, dict[str, Any]]:
    """Embed this process's chunks into its shard file, skipping recorded ones. Returns the shard, its chunks
    and counts."""
    from tqdm.auto import tqdm

    chunks = shard_chunks(n, chunk_size, comm.size, comm.rank)
    first = chunk_bounds(chunks.start, n, chunk_size)[0] if len(chunks) else 0
    last = chunk_bounds(chunks.stop - 1, n, chunk_size)[1] if len(chunks) else 0
    name = f"shard-{comm.rank:05d}-of-{comm.size:05d}.npy"
    shard = _ShardFile(os.path.join(work_dir, "shards", name), last - first, dim)
    record_dir = os.path.join(work_dir, "chunks")
    embedded = reused = copied = prompts_embedded = 0
    seconds = 0.0
    bar = tqdm(total=last - first, desc=f"embedding (process {comm.rank})", unit="prompt",
               disable=not progress, position=comm.rank)
    for c in chunks:
        start, stop = chunk_bounds(c, n, chunk_size)
        texts = list(pool[start:stop]) if isinstance(pool, list) else pool[start:stop][PROMPT_COLUMN]
        sha = _chunk_sha(texts)
        rec = _stored_chunk(record_dir, c, sha, work_dir)
        if rec is not None and rec["shard"] == name and shard.created:
            rec = None  # the shard file was (re)created empty: its old records point at nothing
        if rec is not None and rec["shard"] == name and rec["offset"] == start - first:
            reused += 1
        elif rec is not None:  # embedded by a build with another process count: copy the rows over
            src = _ShardFile(os.path.join(work_dir, "shards", rec["shard"]), *_npy_shape(work_dir, rec["shard"]))
            shard.write(start - first, src.read(rec["offset"], rec["offset"] + stop - start))
            copied += 1
        else:
            t0 = time.perf_counter()
            emb = encode(texts)
            if emb.shape != (stop - start, dim):
                raise ValueError(f"the embedder returned shape {emb.shape} for {stop - start} prompts; expected "
                                 f"({stop - start}, {dim})")
            shard.write(start - first, emb.astype(np.float32, copy=False))
            seconds += time.perf_counter() - t0
            embedded += 1
            prompts_embedded += stop - start
        if rec is None or rec["shard"] != name or rec["offset"] != start - first:
            _write_json_atomic(os.path.join(record_dir, f"{c:09d}.json"),
                               {"chunk": c, "start": start, "stop": stop, "sha256": sha, "shard": name,
                                "offset": start - first})
        bar.update(stop - start)
    bar.close()
    counts = {"chunks": len(chunks), "chunks_embedded": embedded, "chunks_reused": reused, "chunks_copied": copied,
              "prompts_embedded": prompts_embedded, "embed_seconds": seconds,
              "prompts_per_second": prompts_embedded / seconds if seconds > 0 else None}
    return shard, chunks, {**counts, "shard_rows": last - first, "shard_first": first}


def _npy_shape(work_dir: str, name: str) -> tuple[int, int]:
    arr = np.load(os.path.join(work_dir, "shards", name), mmap_mode="r", allow_pickle=False)
    return int(arr.shape[0]), int(arr.shape[1])


def _gather_sample(shard: _ShardFile, first: int, idx: np.ndarray, comm: _Comm, n: int, chunk_size: int,
                   dim: int) -> np.ndarray | None:
    """The sample's rows, in sample order, on the main process (None elsewhere); every process sends its rows
    padded to the largest share."""
    counts = []
    for r in range(comm.size):
        ch = shard_chunks(n, chunk_size, comm.size, r)
        lo = chunk_bounds(ch.start, n, chunk_size)[0] if len(ch) else 0
        hi = chunk_bounds(ch.stop - 1, n, chunk_size)[1] if len(ch) else 0
        counts.append(int(np.searchsorted(idx, hi) - np.searchsorted(idx, lo)))
    mine = idx[(idx >= first) & (idx < first + shard.rows)] - first
    rows = np.zeros((max(counts), dim), dtype=np.float32)
    for lo in range(0, shard.rows, chunk_size):  # the shard read in windows of chunk_size rows
        a, b = np.searchsorted(mine, [lo, lo + chunk_size])
        if b > a:
            window = shard.read(lo, min(lo + chunk_size, shard.rows))
            rows[a:b] = window[mine[a:b] - lo]
            del window
    gathered = comm.all_gather(rows)
    if not comm.is_main:
        return None
    pad = max(counts)
    return np.concatenate([gathered[r * pad:r * pad + counts[r]] for r in range(comm.size)])


def _assign_ids(path: str, shard: _ShardFile, first: int, chunks: range, centroids: np.ndarray, comm: _Comm,
                n: int, chunk_size: int) -> None:
    """Write every prompt's region id into a new int32 `.npy` at `path`: each process assigns its shard's chunks,
    one per round, and every process writes all of a round's gathered ids in place through a memory map (so the
    N ids never sit in memory). The caller gives a temporary name and renames it when complete."""
    np.lib.format.open_memmap(path, mode="w+", dtype=np.int32, shape=(n,)).flush()
    rounds = comm.all_max(len(chunks))
    for j in range(rounds):
        local = np.full(chunk_size, -1, dtype=np.int32)
        if j < len(chunks):
            start, stop = chunk_bounds(chunks[j], n, chunk_size)
            local[:stop - start] = nearest_centroid(shard.read(start - first, stop - first), centroids)
        chunk_of = np.asarray([chunks[j] if j < len(chunks) else -1], dtype=np.int64)
        all_ids = comm.all_gather(local)
        all_chunks = comm.all_gather(chunk_of)
        out = np.load(path, mmap_mode="r+")
        for r, c in enumerate(all_chunks.tolist()):
            if c >= 0:
                start, stop = chunk_bounds(c, n, chunk_size)
                out[start:stop] = all_ids[r * chunk_size:r * chunk_size + stop - start]
        out.flush()
        del out


def build_regions_sharded(
    pool,
    num_regions: int | None,
    work_dir: str,
    embedder: str | Any = DEFAULT_EMBEDDER,
    seed: int = 0,
    sample_size: int | None = None,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    batch_size: int = 256,
    method: str = "auto",
    max_iter: int = 50,
    min_region_size: int = 1,
    column: str | None = None,
    accelerator: Any | None = None,
    progress: bool = True,
    branching: int | None = DEFAULT_BRANCHING,
) -> ConditionRegions:
    """Partition a (very large) prompt pool into regions, sharded over the processes of `accelerator`, and group
    them into a region tree (`hierarchy.build_tree` over the centroids and region sizes, on every process).

    Args:
        pool: a list of strings, a `datasets.Dataset` or a path (see `load_prompt_pool`; for 10M+ prompts use a
            `save_to_disk` folder or parquet, which stay memory-mapped).
        num_regions: K (None: `regions.default_num_regions` of the pool's size).
        work_dir: shard files, chunk records, and the region ids; run again with the same folder to resume.
            Every process needs it (a shared or a per-machine folder: the processes exchange data through
            collectives, not files).
        embedder: a sentence-transformers id or path, a loaded model, any object with
            `encode(texts, batch_size=..., convert_to_numpy=True, normalize_embeddings=True, show_progress_bar=False)`,
            a callable `texts -> float32 [n, D]` (L2-normalised), or "hashing[:DIM]" (`HashingEmbedder`, a
            stand-in for tests and benchmarks).
        seed: seed of the sample and of k-means.
        sample_size: prompts the k-means fit sees (default `default_sample_size`: 256 x K, at most N).
        chunk_size: prompts per chunk: the unit of work, of resumption and of memory.
        method: k-means backend for the sample ("auto", "faiss", "sklearn"; `regions.resolve_method`).
        accelerator: an `accelerate.Accelerator` or `PartialState` (default: `launched_state()`, one process
            unless launched with `accelerate launch`).
        branching: the region tree shrinks by about this factor per level; None or 0: no tree.

    Returns the same `ConditionRegions` on every process; `region_ids` is memory-mapped from
    `work_dir/region_ids.npy`. `metadata["sharded_build"]` holds this process's counts and timings (also written
    to `work_dir/build-stats-rankNNNNN.json`).
    """
    if num_regions is not None and (not isinstance(num_regions, (int, np.integer)) or num_regions < 1):
        raise ValueError(f"num_regions={num_regions!r} is not valid; it must be a positive integer (or None)")
    if not isinstance(chunk_size, (int, np.integer)) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} is not valid; it must be a positive integer")
    comm = _comm(accelerator)
    t_start = time.perf_counter()
    pool = pool if isinstance(pool, (list, tuple)) else load_prompt_pool(pool, column=column, validate=False)
    if isinstance(pool, (list, tuple)):
        pool = list(pool)
    n = len(pool)
    if n == 0:
        raise PromptPoolError("the prompt pool is empty: it needs at least one prompt")
    if num_regions is None:
        num_regions = default_num_regions(n)
    sample_size = default_sample_size(int(num_regions), n) if sample_size is None else int(sample_size)
    if sample_size < 1:
        raise ValueError(f"sample_size={sample_size} is not valid; it must be a positive integer")
    sample_size = min(sample_size, n)
    idx = sample_indices(n, sample_size, seed)
    n_unique = len(set(get_prompts(pool, idx)))
    if num_regions > n_unique:
        raise PromptPoolError(
            f"num_regions={num_regions} is larger than the number of unique prompts in the k-means sample "
            f"({n_unique} of {sample_size} sampled from {n}); choose num_regions <= {n_unique} or a larger "
            "sample_size")
    fitted_method = resolve_method(method, sample_size)
    embedder = resolve_build_embedder(embedder)
    model = load_embedder(embedder) if isinstance(embedder, str) else embedder
    encode = _encode_fn(model, batch_size)
    dim = _embedding_dim(model, encode, get_prompts(pool, [0])[0])
    name = _embedder_id(embedder)
    for sub in ("shards", "chunks"):
        os.makedirs(os.path.join(work_dir, sub), exist_ok=True)
    _check_manifest(work_dir, {"format_version": _MANIFEST_VERSION, "num_prompts": n, "chunk_size": int(chunk_size),
                               "embedding_dim": dim, "embedder": name,
                               "embedder_path": resolve_embedder_path(name) if isinstance(embedder, str) else name})
    if comm.size > 1 and num_chunks(n, int(chunk_size)) < 4 * comm.size and comm.is_main:
        logger.warning("the pool is only %d chunks of %d prompts for %d processes: some processes idle; pass a "
                       "chunk_size of at most %d", num_chunks(n, int(chunk_size)), chunk_size, comm.size,
                       max(1, n // (4 * comm.size)))
    comm.barrier()
    with _PeakMemory() as mem:
        shard, chunks, stats = _embed_shard(pool, model, encode, comm, work_dir, n, dim, int(chunk_size), progress)
        t_embed = time.perf_counter()
        sample = _gather_sample(shard, stats["shard_first"], idx, comm, n, int(chunk_size), dim)
        if comm.is_main:
            centroids, _ = spherical_kmeans(sample, int(num_regions), seed=seed, method=method, max_iter=max_iter,
                                            min_region_size=min_region_size)
            k = np.asarray([len(centroids)], dtype=np.int64)
        else:
            k = np.zeros(1, dtype=np.int64)
        del sample
        k = int(comm.broadcast(k)[0])
        centroids = comm.broadcast(centroids if comm.is_main else np.zeros((k, dim), dtype=np.float32))
        t_fit = time.perf_counter()
        ids_path = os.path.join(work_dir, f"region_ids-rank{comm.rank:05d}.npy")
        atomic_save(ids_path, lambda tmp: _assign_ids(tmp, shard, stats["shard_first"], chunks, centroids, comm, n,
                                                      int(chunk_size)))
        t_assign = time.perf_counter()
    fingerprint = pool_fingerprint(pool) if comm.is_main else None
    fingerprint = _broadcast_str(comm, fingerprint)
    stats.update(process_index=comm.rank, num_processes=comm.size, num_prompts=n, chunk_size=int(chunk_size),
                 sample_size=sample_size, embed_phase_seconds=t_embed - t_start, fit_seconds=t_fit - t_embed,
                 assign_seconds=t_assign - t_fit, total_seconds=time.perf_counter() - t_start,
                 peak_rss_anon_bytes=mem.peak_anon, peak_rss_file_bytes=mem.peak_file,
                 vm_hwm_bytes=_PeakMemory.read().get("VmHWM", 0))
    _write_json_atomic(os.path.join(work_dir, f"{STATS_PREFIX}{comm.rank:05d}.json"), stats)
    meta = region_metadata(name, dim, num_regions, seed, fitted_method, min_region_size, fingerprint,
                           branching=int(branching) if branching else None, sample_size=sample_size,
                           sharded_build=stats)
    if k < num_regions:
        logger.warning("%d of %d regions were empty or below min_region_size in the sample and were dissolved",
                       num_regions - k, num_regions)
    region_ids = np.load(ids_path, mmap_mode="r", allow_pickle=False)
    tree = None
    if branching and default_level_sizes(k, branching):  # the same on every process: same centroids and sizes
        sizes = np.zeros(k, dtype=np.int64)
        for s0 in range(0, n, 1 << 22):
            sizes += np.bincount(region_ids[s0:s0 + (1 << 22)], minlength=k)
        tree = build_tree(centroids, sizes, branching=branching, seed=seed)
    regions = ConditionRegions(region_ids=region_ids, centroids=centroids, metadata=meta, tree=tree)
    comm.barrier()
    return regions


def _broadcast_str(comm: _Comm, value: str | None, width: int = 128) -> str:
    buf = np.zeros(width, dtype=np.uint8)
    if comm.is_main:
        raw = value.encode("utf-8")[:width]
        buf[:len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return bytes(comm.broadcast(buf)).rstrip(b"\0").decode("utf-8")


__all__ = [
    "HashingEmbedder",
    "ShardedBuildError",
    "build_regions_sharded",
    "chunk_bounds",
    "default_sample_size",
    "num_chunks",
    "resolve_build_embedder",
    "sample_indices",
    "shard_chunks",
]

