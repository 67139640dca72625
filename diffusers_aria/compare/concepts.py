"""The concept filter that defines "unseen": RC's unseen-concept protocol.

Random Conditioning's unseen setting removes every animal-related caption from the paired (image, caption)
data while the swap pool keeps all text, then scores the students on seen and unseen prompts. A concept is
given either by keywords (whole words, case-insensitive; the default is `ANIMAL_KEYWORDS`, or one keyword a
line from the user's file) or by a label column of the paired data (a row is unseen when its value, or any
value of a list, is one of the given labels; without labels, when the value is true).

Only the standard library is used, so the command can check a filter before anything heavy loads.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ..utils.errors import UserError

#: The default concept, "animals": COCO's ten animal categories (bird, cat, dog, horse, sheep, cow, elephant,
#: bear, zebra, giraffe) with their plurals and common names for them, and other frequent animal words.
#: RC's paper describes its unseen split as animal-related captions; its exact word list is not published
#: with the paper, so this list is ours. Matching is by whole word, case-insensitive.
ANIMAL_KEYWORDS: tuple[str, ...] = (
    "animal", "animals",
    "bird", "birds", "cat", "cats", "kitten", "kittens", "kitty", "dog", "dogs", "puppy", "puppies", "pup",
    "horse", "horses", "pony", "ponies", "foal", "sheep", "lamb", "lambs", "cow", "cows", "cattle", "calf",
    "bull", "bulls", "ox", "oxen", "elephant", "elephants", "bear", "bears", "zebra", "zebras", "giraffe",
    "giraffes",
    "pigeon", "pigeons", "seagull", "seagulls", "gull", "gulls", "duck", "ducks", "goose", "geese", "swan",
    "swans", "parrot", "parrots", "owl", "owls", "eagle", "eagles", "hawk", "chicken", "chickens", "hen",
    "rooster", "penguin", "penguins",
    "goat", "goats", "pig", "pigs", "donkey", "donkeys", "mule", "camel", "camels", "deer", "moose", "elk",
    "lion", "lions", "tiger", "tigers", "leopard", "cheetah", "wolf", "wolves", "fox", "foxes", "monkey",
    "monkeys", "ape", "gorilla", "panda", "pandas", "rabbit", "rabbits", "bunny", "squirrel", "squirrels",
    "mouse", "mice", "rat", "rats", "hedgehog", "raccoon", "kangaroo", "hippo", "rhino", "fish", "shark",
    "whale", "dolphin", "turtle", "frog", "snake", "lizard", "butterfly", "insect", "bee",
)

KEYWORDS_DEFAULT_NAME = "animals"


@dataclass(frozen=True)
class ConceptFilter:
    """What makes a caption or a row "unseen": keywords, or a label column of the paired data.

    `keywords`: whole words (or phrases), matched case-insensitively. `column` (with `labels`): a row is unseen
    when its value (or any value of a list) is one of `labels`, or, without labels, when the value is true.
    `name` says where the concept came from (the default list, a file, a column), for the table.
    """

    name: str
    keywords: tuple[str, ...] = ()
    column: str | None = None
    labels: tuple[str, ...] = ()
    _pattern: re.Pattern | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.column is None and not self.keywords:
            raise UserError(f"the concept filter {self.name!r} has no keywords; give at least one keyword (one a "
                            "line) or a label column")
        if self.keywords:
            words = sorted({k.strip().lower() for k in self.keywords if k.strip()}, key=len, reverse=True)
            body = "|".join(re.escape(w).replace(r"\ ", r"\s+") for w in words)
            object.__setattr__(self, "_pattern", re.compile(rf"(?<![\w-])(?:{body})(?![\w-])", re.IGNORECASE))

    @property
    def uses_keywords(self) -> bool:
        return self.column is None

    def matches_text(self, text: str) -> bool:
        """Whether a caption or prompt names the concept (keywords only)."""
        if self._pattern is None:
            raise ValueError("this concept is a label column; it matches rows, not text")
        return bool(self._pattern.search(text or ""))

    def matched_keyword(self, text: str) -> str | None:
        """The first keyword found in `text` (lower case), or None."""
        m = self._pattern.search(text or "") if self._pattern is not None else None
        return m.group(0).lower() if m else None

    def matches_label(self, value: object) -> bool:
        """Whether a row's label-column value marks it unseen."""
        values = value if isinstance(value, (list, tuple)) else [value]
        if not self.labels:
            return any(_truthy(v) for v in values)
        wanted = {str(lab).strip().lower() for lab in self.labels}
        return any(str(v).strip().lower() in wanted for v in values if v is not None)

    def mask_texts(self, texts: Iterable[str]) -> list[bool]:
        return [self.matches_text(t) for t in texts]

    def describe(self) -> str:
        if self.column is not None:
            labels = ", ".join(self.labels) if self.labels else "true"
            return f"label column {self.column!r} in ({labels})"
        return f"{self.name} ({len(self.keywords)} keywords)"


def _truthy(value: object) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y", "unseen")
    return bool(value)


def read_keyword_file(path: str, flag: str = "--concept_keywords") -> tuple[str, ...]:
    """Keywords from a text file: one a line; blank lines and lines starting with '#' are skipped."""
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path!r}: no such file; pass a text file with one keyword a line, or leave the "
                        f"flag out for the default {KEYWORDS_DEFAULT_NAME!r} list")
    with open(path, encoding="utf-8") as fh:
        words = tuple(line.strip() for line in fh if line.strip() and not line.lstrip().startswith("#"))
    if not words:
        raise UserError(f"{flag} {path!r} holds no keyword (one a line; '#' starts a comment)")
    return words


def make_filter(keyword_file: str | None = None, column: str | None = None,
                labels: Sequence[str] | None = None) -> ConceptFilter:
    """The filter the flags ask for: a label column, a keyword file, or the default animal keywords."""
    if column is not None and keyword_file is not None:
        raise UserError("--concept_keywords and --concept_column both define the concept; pass one of them")
    if labels and column is None:
        raise UserError("--concept_labels needs --concept_column (the column whose values they are)")
    if column is not None:
        return ConceptFilter(name=f"column {column}", column=column, labels=tuple(str(v) for v in labels or ()))
    if keyword_file is not None:
        return ConceptFilter(name=os.path.basename(keyword_file), keywords=read_keyword_file(keyword_file))
    return ConceptFilter(name=KEYWORDS_DEFAULT_NAME, keywords=ANIMAL_KEYWORDS)


__all__ = ["ANIMAL_KEYWORDS", "ConceptFilter", "make_filter", "read_keyword_file"]
