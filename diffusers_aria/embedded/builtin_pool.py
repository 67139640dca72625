"""Built-in, generated prompt pool for ARIA experiments.

The project may not ship (or copy) any downloaded prompt dataset, so this module *generates* a pool
of English image prompts from small hand-written word lists with a seeded random number generator.
The word lists are package data, ``diffusers_aria/embedded/resources/builtin_pool_words.json``, read once.

The pool is deliberately imbalanced: prompts belong to one of twelve groups of clearly different
subject matter (animals, food, landscapes, ... down to microscopy) whose shares range from 30 % to
0.5 % (see :data:`BUILTIN_GROUP_SHARES`).  Within a group every prompt is built from the same
subject / attribute / setting vocabulary, so prompts of one group are semantically close and land
near each other in a sentence-embedding space, while different groups are well separated.  That makes
the pool a useful, fully offline test bed for region-based prompt allocation: a uniform sampler
over-represents the big groups, and the small groups are the "rare regions" an adaptive allocator has
to find.

Public API:

* :data:`BUILTIN_GROUP_SHARES` -- group name -> target share of the pool (sums to 1).
* :func:`builtin_prompt_pool` -- a :class:`datasets.Dataset` with columns ``prompt`` and ``group``.
* :func:`builtin_prompt_records` -- the same rows as a plain ``list[dict]`` (no ``datasets`` needed).
* :func:`write_builtin_pool` -- write the pool atomically to ``.txt`` (one prompt per line) or
  ``.jsonl`` (``{"prompt": ..., "group": ...}`` per line).
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ..utils.atomic import atomic_write_text

if TYPE_CHECKING:  # pragma: no cover - typing only
    import datasets

__all__ = [
    "BUILTIN_GROUP_SHARES",
    "builtin_group_counts",
    "builtin_prompt_pool",
    "builtin_prompt_records",
    "max_builtin_pool_size",
    "write_builtin_pool",
]

#: Target share of each group in the pool (strongly imbalanced, sums to 1.0).
BUILTIN_GROUP_SHARES: dict[str, float] = {
    "animals": 0.30,
    "food": 0.20,
    "landscapes": 0.14,
    "vehicles": 0.10,
    "architecture": 0.08,
    "portraits": 0.06,
    "abstract_art": 0.045,
    "space": 0.03,
    "underwater": 0.02,
    "musical_instruments": 0.012,
    "typography": 0.008,
    "microscopy": 0.005,
}


@dataclass(frozen=True)
class _GroupVocab:
    """Word lists of one group; a prompt fills one template with one entry of each list."""

    subjects: tuple[str, ...]
    attributes: tuple[str, ...]
    settings: tuple[str, ...]
    styles: tuple[str, ...]
    templates: tuple[str, ...]

    def capacity(self) -> int:
        """Number of distinct prompts this vocabulary can produce (upper bound)."""
        return (
            len(self.subjects)
            * len(self.attributes)
            * len(self.settings)
            * len(self.styles)
            * len(self.templates)
        )


# The word lists: package data (``diffusers_aria/embedded/resources/``, listed in setup.cfg's package_data).
_WORDS_FILE = ("resources", "builtin_pool_words.json")
_FIELDS = ("subjects", "attributes", "settings", "styles")


@functools.lru_cache(maxsize=1)
def _vocab() -> dict[str, _GroupVocab]:
    """Group name -> word lists, read once from ``diffusers_aria/embedded/resources/builtin_pool_words.json``.

    The templates are shared by all groups; every slot is filled from the group's own lists, so the wording of
    a prompt always stays on-topic for its group.
    """
    resource = importlib.resources.files("diffusers_aria.embedded")
    for part in _WORDS_FILE:
        resource = resource.joinpath(part)
    data = json.loads(resource.read_text(encoding="utf-8"))
    groups = data["groups"]
    if set(groups) != set(BUILTIN_GROUP_SHARES):
        raise ValueError(f"{'/'.join(_WORDS_FILE)} must hold word lists for exactly the groups "
                         f"{sorted(BUILTIN_GROUP_SHARES)}, got {sorted(groups)}")
    templates = tuple(data["templates"])
    return {group: _GroupVocab(*(tuple(words[f]) for f in _FIELDS), templates=templates)
            for group, words in groups.items()}


assert math.isclose(sum(BUILTIN_GROUP_SHARES.values()), 1.0), "group shares must sum to 1"

# "a" before a vowel becomes "an" ("a old man" -> "an old man").
_ARTICLE = re.compile(r"\b([Aa]) (?=[aeiouAEIOU])")

# Only this fraction of a group's combinatorial capacity is used, so rejection sampling of unique
# prompts stays fast even for the biggest pools.
_MAX_FILL = 0.5


def max_builtin_pool_size() -> int:
    """Largest ``num_prompts`` :func:`builtin_prompt_pool` accepts.

    Limited by the group with the smallest capacity relative to its share.
    """
    return min(
        int(_MAX_FILL * _vocab()[g].capacity() / share) for g, share in BUILTIN_GROUP_SHARES.items()
    )


def builtin_group_counts(num_prompts: int) -> dict[str, int]:
    """Number of prompts per group for a pool of ``num_prompts`` (largest-remainder rounding).

    Counts sum exactly to ``num_prompts``; tiny pools may give the rarest groups zero prompts.
    """
    _check_num_prompts(num_prompts)
    exact = {g: share * num_prompts for g, share in BUILTIN_GROUP_SHARES.items()}
    counts = {g: int(math.floor(v)) for g, v in exact.items()}
    remainder = num_prompts - sum(counts.values())
    # Hand the leftover prompts to the largest fractional parts (ties: larger share first).
    order = sorted(exact, key=lambda g: (exact[g] - counts[g], BUILTIN_GROUP_SHARES[g]), reverse=True)
    for g in order[:remainder]:
        counts[g] += 1
    return counts


def _check_num_prompts(num_prompts: int) -> None:
    if isinstance(num_prompts, bool) or not isinstance(num_prompts, int):
        raise TypeError(f"num_prompts must be an int, got {num_prompts!r} ({type(num_prompts).__name__})")
    limit = max_builtin_pool_size()
    if not 1 <= num_prompts <= limit:
        raise ValueError(f"num_prompts must be between 1 and {limit}, got {num_prompts}")


def _check_seed(seed: int) -> None:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, got {seed!r} ({type(seed).__name__})")


def _sample_prompt(rng: random.Random, vocab: _GroupVocab) -> tuple[str, dict[str, str]]:
    template = rng.choice(vocab.templates)
    parts = {
        "subject": rng.choice(vocab.subjects),
        "attribute": rng.choice(vocab.attributes),
        "setting": rng.choice(vocab.settings),
        "style": rng.choice(vocab.styles),
    }
    text = _ARTICLE.sub(r"\1n ", template.format(**parts))
    return text[0].upper() + text[1:], parts


def builtin_prompt_records(num_prompts: int = 4000, seed: int = 0, with_parts: bool = False
                           ) -> list[dict[str, str]]:
    """Generate the built-in pool as a list of ``{"prompt": str, "group": str}`` dicts.

    Args:
        num_prompts: Total number of prompts, between 1 and :func:`max_builtin_pool_size`.
        seed: Seed of the random number generator; the same seed always gives the same pool
            (same prompts, same order).
        with_parts: also return the words each prompt was built from (``subject``, ``attribute``,
            ``setting``, ``style``): labels of what a prompt depicts, for benchmarks.

    Returns:
        ``num_prompts`` rows in shuffled order with unique, non-empty prompts; the number of rows
        per group follows :func:`builtin_group_counts`.
    """
    _check_num_prompts(num_prompts)
    _check_seed(seed)
    rng = random.Random(f"aria-builtin-pool:{seed}")
    seen: set[str] = set()
    rows: list[dict[str, str]] = []
    for group, count in builtin_group_counts(num_prompts).items():
        vocab = _vocab()[group]
        made = 0
        while made < count:
            prompt, parts = _sample_prompt(rng, vocab)
            if prompt in seen:
                continue
            seen.add(prompt)
            rows.append({"prompt": prompt, "group": group, **(parts if with_parts else {})})
            made += 1
    rng.shuffle(rows)
    return rows


def builtin_prompt_pool(num_prompts: int = 4000, seed: int = 0) -> datasets.Dataset:
    """Generate the built-in pool as a :class:`datasets.Dataset` with columns ``prompt`` and ``group``.

    See :func:`builtin_prompt_records` for the arguments; the rows are identical.
    """
    import datasets

    rows = builtin_prompt_records(num_prompts=num_prompts, seed=seed)
    return datasets.Dataset.from_dict(
        {"prompt": [r["prompt"] for r in rows], "group": [r["group"] for r in rows]}
    )


def write_builtin_pool(path: str | os.PathLike[str], num_prompts: int = 4000, seed: int = 0) -> Path:
    """Write the built-in pool to ``path`` atomically and return the path.

    The format follows the suffix: ``.txt`` writes one prompt per line, ``.jsonl`` writes one
    ``{"prompt": ..., "group": ...}`` JSON object per line.  The file is first written to a temporary
    name in the same folder and then renamed, so ``path`` never holds a half-written pool.  Missing
    parent folders are created.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in (".txt", ".jsonl"):
        raise ValueError(f"unsupported pool file suffix {path.suffix!r} in {str(path)!r}; use '.txt' or '.jsonl'")
    rows = builtin_prompt_records(num_prompts=num_prompts, seed=seed)
    if suffix == ".txt":
        lines = [r["prompt"] for r in rows]
    else:
        lines = [json.dumps(r, ensure_ascii=False) for r in rows]
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
