"""Paths: whether a flag's value is meant as a local path (never sent to the Hub) or a Hub id."""

from __future__ import annotations

import os

#: the file suffixes of a prompt pool (`pool.load_prompt_pool` reads them)
POOL_SUFFIXES = (".txt", ".csv", ".tsv", ".jsonl", ".json", ".parquet")
_LOCAL_SUFFIXES = POOL_SUFFIXES + (".safetensors", ".bin", ".npy", ".arrow", ".pt", ".ckpt")


def looks_like_local_path(value: str) -> bool:
    """Whether `value` is meant as a local path rather than a Hub id ('name' or 'owner/name').

    True when it exists, is absolute or starts with '.' or '~', holds a backslash, more than one '/', ends
    with '/' or a file suffix (.txt, .csv, .parquet, ...), or when its first component is a local folder
    (`outputs/tiny-teachr` while `outputs/` exists).
    """
    value = os.fspath(value)
    if not value:
        return False
    if os.path.exists(value) or os.path.isabs(value) or value.startswith((".", "~")) or "\\" in value:
        return True
    if value.count("/") > 1 or value.endswith("/") or value.lower().endswith(_LOCAL_SUFFIXES):
        return True
    first = value.split("/", 1)[0]
    return "/" in value and os.path.isdir(first)


__all__ = ["POOL_SUFFIXES", "looks_like_local_path"]
