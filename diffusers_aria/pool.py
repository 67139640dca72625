"""The prompt pool: loading and validating the texts that Random Conditioning and ARIA draw from.

A pool is held as a `datasets.Dataset` with one string column (`prompt`), so pools of tens of millions of
prompts stay memory-mapped in Arrow instead of living in a Python list. Sources: a list of strings, a
`datasets.Dataset` (plus a column name), or a path (.txt one prompt a line, .csv/.tsv with a column,
.jsonl/.json, .parquet, or a folder written by `Dataset.save_to_disk`).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from typing import Union

import numpy as np

from .utils.errors import UserError

PROMPT_COLUMN = "prompt"
_TEXT_COLUMNS = ("prompt", "Prompt", "text", "caption", "captions")

PoolSource = Union[str, os.PathLike, Sequence[str], "datasets.Dataset"]  # noqa: F821


class PromptPoolError(UserError):
    """Raised for a prompt pool that cannot be used (missing or empty file, blank or non-string prompts, bad
    column). A `UserError`, hence a `ValueError`."""


def pick_column(names: Sequence[str], column: str | None, source: object) -> str:
    if column is not None:
        if column not in names:
            raise PromptPoolError(f"column {column!r} not found in {source!s}; available columns: {list(names)}")
        return column
    for name in _TEXT_COLUMNS:
        if name in names:
            return name
    if len(names) == 1:
        return names[0]
    raise PromptPoolError(
        f"cannot tell which column of {source!s} holds the prompts (columns: {list(names)}); "
        f"pass column=... (one of {list(names)})"
    )


def load_prompt_pool(source: PoolSource, column: str | None = None, validate: bool = True):
    """Load a prompt pool as a `datasets.Dataset` with a single `prompt` column.

    Args:
        source: list of strings, `datasets.Dataset`, or a path (.txt/.csv/.tsv/.jsonl/.json/.parquet or a
            `save_to_disk` folder).
        column: the text column for tabular sources (auto-detected from prompt/text/caption when omitted).
        validate: check every prompt is a non-blank string (raises `PromptPoolError` naming the first bad row).
    """
    import datasets

    if isinstance(source, datasets.Dataset):
        col = pick_column(source.column_names, column, "the dataset")
        ds = source.select_columns([col])
        if col != PROMPT_COLUMN:
            ds = ds.rename_column(col, PROMPT_COLUMN)
    elif isinstance(source, (str, os.PathLike)):
        ds = _load_path(os.fspath(source), column)
    elif isinstance(source, Iterable):
        prompts = list(source)
        _validate_list(prompts)
        ds = datasets.Dataset.from_dict({PROMPT_COLUMN: prompts})
        validate = False
    else:
        raise PromptPoolError(
            f"unsupported prompt pool source of type {type(source).__name__}; "
            "pass a list of strings, a datasets.Dataset, or a path to .txt/.csv/.tsv/.jsonl/.parquet"
        )
    if len(ds) == 0:
        where = f" {os.fspath(source)!r}" if isinstance(source, (str, os.PathLike)) else ""
        raise PromptPoolError(f"the prompt pool{where} is empty: it needs at least one prompt")
    if validate:
        _validate_dataset(ds)
    return ds


def _load_path(path: str, column: str | None):
    import datasets

    if not os.path.exists(path):
        raise PromptPoolError(f"prompt pool path {path!r} does not exist (looked for {os.path.abspath(path)}); pass "
                              "an existing .txt/.csv/.tsv/.jsonl/.json/.parquet file or save_to_disk folder")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "state.json")) and not os.path.isfile(
                os.path.join(path, "dataset_dict.json")):
            raise PromptPoolError(f"prompt pool folder {path!r} is not a datasets.save_to_disk folder (state.json "
                                  "missing); pass a prompt file or a folder written by Dataset.save_to_disk")
        ds = datasets.load_from_disk(path)
        if isinstance(ds, datasets.DatasetDict):
            raise PromptPoolError(f"{path!r} holds a DatasetDict; save a single split as the pool")
        return load_prompt_pool(ds, column, validate=False)
    suffix = os.path.splitext(path)[1].lower()
    if suffix == ".txt":
        with open(path, encoding="utf-8") as fh:
            prompts = [line.rstrip("\r\n") for line in fh]
        while prompts and not prompts[-1].strip():
            prompts.pop()
        _validate_list(prompts, source=path)
        return datasets.Dataset.from_dict({PROMPT_COLUMN: prompts})
    if suffix in (".csv", ".tsv"):
        ds = datasets.Dataset.from_csv(path, delimiter="\t" if suffix == ".tsv" else ",", keep_in_memory=False)
    elif suffix in (".jsonl", ".json"):
        ds = datasets.Dataset.from_json(path)
    elif suffix == ".parquet":
        ds = datasets.Dataset.from_parquet(path)
    else:
        raise PromptPoolError(
            f"unsupported prompt pool file {path!r}: use .txt (one prompt a line), .csv, .tsv, .jsonl, .json, "
            ".parquet, or a datasets.save_to_disk folder"
        )
    col = pick_column(ds.column_names, column, path)
    return load_prompt_pool(ds.select_columns([col]).rename_columns({col: PROMPT_COLUMN} if col != PROMPT_COLUMN else {}), validate=False)


def _bad_prompt(value: object) -> str | None:
    if not isinstance(value, str):
        return f"is {type(value).__name__} ({value!r}), not a string"
    if not value.strip():
        return "is blank"
    return None


def _validate_list(prompts: Sequence[object], source: str = "the prompt list") -> None:
    if len(prompts) == 0:
        raise PromptPoolError(f"{source} is empty: the prompt pool needs at least one prompt")
    for i, p in enumerate(prompts):
        why = _bad_prompt(p)
        if why:
            raise PromptPoolError(f"prompt {i} of {source} {why}; every prompt must be a non-blank string")


def _validate_dataset(ds, batch_size: int = 100_000) -> None:
    for start in range(0, len(ds), batch_size):
        chunk = ds[start : start + batch_size][PROMPT_COLUMN]
        for j, p in enumerate(chunk):
            why = _bad_prompt(p)
            if why:
                raise PromptPoolError(f"prompt {start + j} of the pool {why}; every prompt must be a non-blank string")


def iter_prompt_batches(pool, batch_size: int = 65_536):
    """Yield the pool's prompts in order, `batch_size` at a time (lists of str)."""
    if isinstance(pool, (list, tuple)):
        for start in range(0, len(pool), batch_size):
            yield list(pool[start : start + batch_size])
        return
    for start in range(0, len(pool), batch_size):
        yield pool[start : start + batch_size][PROMPT_COLUMN]


def pool_fingerprint(pool) -> str:
    """A content hash of the pool (sha256 over the prompts in order), streamed in bounded memory."""
    h = hashlib.sha256()
    n = 0
    for batch in iter_prompt_batches(pool):
        for p in batch:
            b = p.encode("utf-8")
            h.update(len(b).to_bytes(8, "little"))
            h.update(b)
        n += len(batch)
    return f"{n}:{h.hexdigest()[:32]}"


def count_unique(pool) -> int:
    """Number of distinct prompts (hash-based, 8 bytes a prompt)."""
    hashes = []
    for batch in iter_prompt_batches(pool):
        hashes.append(np.fromiter((hash(p) for p in batch), dtype=np.int64, count=len(batch)))
    return int(np.unique(np.concatenate(hashes)).size) if hashes else 0


def get_prompts(pool, indices) -> list[str]:
    """Prompts at `indices` (any int sequence/array) from a list or a pool `Dataset`."""
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if isinstance(pool, (list, tuple)):
        return [pool[i] for i in idx.tolist()]
    return pool[idx.tolist()][PROMPT_COLUMN] if idx.size else []
