"""Built-in, generated prompt pool for ARIA experiments.

The project may not ship (or copy) any downloaded prompt dataset, so this module *generates* a pool
of English image prompts from small hand-written word lists with a seeded random number generator.

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

import json
import math
import os
import random
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

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


# Templates shared by all groups; every slot is filled from the group's own lists so the wording of
# a prompt always stays on-topic for its group.
_TEMPLATES: tuple[str, ...] = (
    "{style} of a {attribute} {subject} {setting}",
    "a {attribute} {subject} {setting}, {style}",
    "{attribute} {subject} {setting}, {style}",
    "close view of a {attribute} {subject} {setting}, {style}",
)

_VOCAB: dict[str, _GroupVocab] = {
    "animals": _GroupVocab(
        subjects=(
            "fox", "wolf", "tiger", "lion", "red panda", "owl", "eagle", "deer", "rabbit", "bear",
            "kitten", "puppy", "horse", "elephant", "giraffe", "squirrel", "raccoon", "hedgehog",
            "parrot", "leopard",
        ),
        attributes=(
            "fluffy", "sleepy", "curious", "majestic", "playful", "young", "wild", "furry",
            "alert", "hungry", "tiny", "graceful",
        ),
        settings=(
            "resting in a meadow", "hunting in the snow", "sitting on a tree branch",
            "drinking from a stream", "running through tall grass", "curled up in its den",
            "walking through an autumn forest", "looking out from behind a bush",
            "grooming its fur", "standing on a mossy log", "playing with its cubs",
            "peeking out of a burrow",
        ),
        styles=(
            "wildlife photograph", "nature documentary still", "detailed animal portrait",
            "telephoto wildlife shot", "national park photo", "zoo photograph",
        ),
        templates=_TEMPLATES,
    ),
    "food": _GroupVocab(
        subjects=(
            "pizza", "bowl of ramen", "chocolate cake", "cheeseburger", "plate of sushi",
            "stack of pancakes", "fruit salad", "bowl of pasta", "croissant", "taco",
            "cup of cappuccino", "cheesecake", "steak dinner", "bowl of curry", "sandwich",
            "plate of dumplings", "apple pie", "bowl of soup",
        ),
        attributes=(
            "delicious", "freshly baked", "steaming hot", "homemade", "crispy", "juicy",
            "savory", "sweet", "gourmet", "spicy", "tasty", "glazed",
        ),
        settings=(
            "served on a wooden table", "on a white ceramic plate", "in a cozy cafe",
            "on a restaurant menu table", "garnished with fresh herbs", "next to a glass of wine",
            "on a kitchen counter", "with a fork and knife", "at a breakfast buffet",
            "on a picnic blanket", "in a street food stall", "on a marble countertop",
        ),
        styles=(
            "food photography", "recipe book photo", "overhead food shot", "menu photograph",
            "restaurant food photo", "culinary magazine photo",
        ),
        templates=_TEMPLATES,
    ),
    "landscapes": _GroupVocab(
        subjects=(
            "mountain range", "valley", "waterfall", "desert dune", "lake", "river canyon",
            "rolling hills", "glacier", "pine forest", "volcano", "coastal cliff", "prairie",
            "fjord", "rice terrace", "sandy beach", "tundra",
        ),
        attributes=(
            "vast", "misty", "snow-capped", "sunlit", "remote", "serene", "rugged", "green",
            "golden", "foggy", "dramatic", "peaceful",
        ),
        settings=(
            "at sunrise", "under a stormy sky", "at golden hour", "after the rain",
            "under a clear blue sky", "in early autumn", "at dusk with scattered clouds",
            "seen from a hiking trail", "in the morning fog", "in the middle of winter",
            "under the midday sun", "with a rainbow on the horizon",
        ),
        styles=(
            "landscape photograph", "scenic panorama", "wide-angle nature photo",
            "travel postcard photo", "drone shot of the scenery", "outdoor landscape painting",
        ),
        templates=_TEMPLATES,
    ),
    "vehicles": _GroupVocab(
        subjects=(
            "sports car", "pickup truck", "motorcycle", "city bus", "steam locomotive",
            "vintage convertible", "race car", "delivery van", "tractor", "bicycle",
            "fire truck", "electric scooter", "taxi cab", "police car", "jeep", "school bus",
        ),
        attributes=(
            "shiny", "red", "rusty", "brand new", "fast", "classic", "muddy", "black",
            "electric", "old", "yellow", "polished",
        ),
        settings=(
            "parked on a city street", "driving on a highway", "in a car showroom",
            "on a race track", "at a gas station", "on a dirt road", "in a parking garage",
            "at a traffic light", "in a mechanic's workshop", "crossing a bridge",
            "on a mountain road", "at a car show",
        ),
        styles=(
            "automotive photograph", "car advertisement photo", "vehicle product shot",
            "motorsport photo", "street photo of traffic", "car magazine cover photo",
        ),
        templates=_TEMPLATES,
    ),
    "architecture": _GroupVocab(
        subjects=(
            "gothic cathedral", "glass skyscraper", "medieval castle", "brick townhouse",
            "modern villa", "ancient temple", "stone bridge", "lighthouse", "mosque",
            "pagoda", "concrete office tower", "wooden cabin", "palace", "train station hall",
        ),
        attributes=(
            "towering", "ornate", "minimalist", "historic", "abandoned", "brutalist",
            "restored", "symmetrical", "grand", "weathered", "futuristic", "elegant",
        ),
        settings=(
            "in the city center", "with arched windows", "on a cobblestone square",
            "seen from street level", "with a tall facade", "next to a busy avenue",
            "with marble columns", "surrounded by scaffolding", "with a domed roof",
            "along a canal", "with a grand staircase", "with stained glass windows",
        ),
        styles=(
            "architectural photograph", "building exterior photo", "urban architecture shot",
            "architecture magazine photo", "facade photograph", "real estate photo",
        ),
        templates=_TEMPLATES,
    ),
    "portraits": _GroupVocab(
        subjects=(
            "old man", "young woman", "smiling child", "elderly woman", "bearded man",
            "teenage girl", "businessman", "ballet dancer", "farmer", "nurse", "chef",
            "soldier", "grandmother", "firefighter",
        ),
        attributes=(
            "smiling", "thoughtful", "freckled", "tired", "joyful", "serious", "confident",
            "shy", "wrinkled", "laughing", "pensive", "friendly",
        ),
        settings=(
            "looking into the camera", "with soft window light on her face",
            "with a neutral studio background", "wearing a knitted sweater",
            "with short curly hair", "wearing glasses", "with a warm smile on his face",
            "with a shallow depth of field", "in a headshot pose", "wearing a denim jacket",
            "with wind in their hair", "with rim lighting on the face",
        ),
        styles=(
            "portrait photograph", "studio headshot", "close-up face portrait",
            "black and white portrait", "editorial portrait photo", "passport-style photo",
        ),
        templates=_TEMPLATES,
    ),
    "abstract_art": _GroupVocab(
        subjects=(
            "composition of geometric shapes", "swirl of paint", "pattern of colored lines",
            "fractal pattern", "color field", "splatter of paint", "grid of squares",
            "gradient of colors", "cluster of circles", "mosaic of triangles",
            "flow of liquid colors", "arrangement of cubes",
        ),
        attributes=(
            "vibrant", "chaotic", "minimal", "colorful", "psychedelic", "pastel",
            "monochrome", "bold", "layered", "surreal", "textured", "neon",
        ),
        settings=(
            "with no recognizable objects", "in contrasting complementary colors",
            "with thick impasto brushstrokes", "on a blank canvas", "with dripping paint",
            "with overlapping translucent layers", "in the style of cubism",
            "with sharp angular forms", "with soft blurred edges", "in primary colors",
            "with rhythmic repetition", "with generative noise",
        ),
        styles=(
            "abstract painting", "abstract digital art", "modern art canvas",
            "expressionist artwork", "generative art print", "contemporary gallery piece",
        ),
        templates=_TEMPLATES,
    ),
    "space": _GroupVocab(
        subjects=(
            "spiral galaxy", "nebula", "ringed planet", "star cluster", "comet", "black hole",
            "moon crater", "supernova", "gas giant", "asteroid belt", "milky way",
            "solar eclipse",
        ),
        attributes=(
            "distant", "glowing", "colossal", "swirling", "luminous", "cosmic", "icy",
            "radiant", "faint", "brilliant", "ancient", "dusty",
        ),
        settings=(
            "in deep space", "against a field of stars", "seen through a telescope",
            "in the night sky", "surrounded by interstellar dust", "orbiting a bright star",
            "light years away", "in the outer solar system", "in infrared light",
            "beyond the edge of the galaxy", "next to a pale moon", "in a dark starry void",
        ),
        styles=(
            "astronomy photograph", "space telescope image", "astrophotography shot",
            "cosmic illustration", "observatory image", "deep sky image",
        ),
        templates=_TEMPLATES,
    ),
    "underwater": _GroupVocab(
        subjects=(
            "coral reef", "sea turtle", "jellyfish", "school of fish", "octopus",
            "shipwreck", "manta ray", "seahorse", "kelp forest", "reef shark", "clownfish",
            "sea anemone",
        ),
        attributes=(
            "colorful", "drifting", "translucent", "glowing", "tropical", "sunken",
            "gliding", "bright", "delicate", "swaying", "hidden", "shimmering",
        ),
        settings=(
            "deep under the ocean surface", "in clear turquoise water", "beneath the waves",
            "near the sandy sea floor", "with sun rays piercing the water",
            "surrounded by bubbles", "in a tropical lagoon", "at the bottom of the sea",
            "next to a scuba diver", "in the blue depths", "among sea plants",
            "in the open ocean",
        ),
        styles=(
            "underwater photograph", "scuba diving photo", "marine life photo",
            "ocean documentary still", "snorkeling photo", "aquarium photograph",
        ),
        templates=_TEMPLATES,
    ),
    "musical_instruments": _GroupVocab(
        subjects=(
            "violin", "grand piano", "acoustic guitar", "electric guitar", "saxophone",
            "drum kit", "cello", "trumpet", "harp", "flute", "accordion", "double bass",
        ),
        attributes=(
            "polished", "antique", "wooden", "brass", "handcrafted", "gleaming", "vintage",
            "well-worn", "glossy", "black lacquered", "shiny", "ornate",
        ),
        settings=(
            "on a concert stage", "in a music shop window", "leaning against a wall",
            "in an open instrument case", "next to sheet music", "in a recording studio",
            "under a spotlight", "on a velvet cloth", "in an orchestra pit",
            "on a music stand", "in a jazz club", "in a rehearsal room",
        ),
        styles=(
            "musical instrument photograph", "instrument product photo", "concert photo",
            "music catalog photo", "studio photo of the instrument", "orchestra photograph",
        ),
        templates=_TEMPLATES,
    ),
    "typography": _GroupVocab(
        subjects=(
            "word 'hello'", "letter A", "word 'dream'", "alphabet", "word 'open'",
            "headline text", "number 42", "word 'love'", "monogram", "word 'coffee'",
            "calligraphy quote", "word 'sale'",
        ),
        attributes=(
            "bold serif", "hand-lettered", "neon", "bold sans-serif", "embossed",
            "italic", "stenciled", "gold foil", "chalk-written", "pixelated",
            "typewritten", "outlined",
        ),
        settings=(
            "written in capital letters", "in a clean font", "centered on a plain background",
            "printed on a poster", "with letter spacing", "in a logo design",
            "on a shop sign", "set in a magazine layout", "with a drop shadow",
            "in a typeface specimen", "spelled out in block letters", "on a book cover",
        ),
        styles=(
            "typography design", "lettering artwork", "font showcase", "graphic design text",
            "typographic poster", "signage text design",
        ),
        templates=_TEMPLATES,
    ),
    "microscopy": _GroupVocab(
        subjects=(
            "bacteria colony", "blood cells", "neuron", "diatom", "pollen grain",
            "cancer cell", "virus particle", "plant cell", "tissue sample", "amoeba",
            "yeast cells", "mitochondria",
        ),
        attributes=(
            "stained", "magnified", "fluorescent", "microscopic", "dividing", "infected",
            "cultured", "cross-sectioned", "labeled", "dyed", "single-celled", "dense",
        ),
        settings=(
            "under a microscope", "on a glass slide", "in a petri dish",
            "at 1000x magnification", "in a laboratory sample", "in a histology slide",
            "under an electron microscope", "in a biopsy specimen", "in a cell culture",
            "with a stained nucleus", "in a blood smear", "in a medical lab",
        ),
        styles=(
            "microscopy image", "electron micrograph", "histology photo",
            "biomedical imaging", "scientific micrograph", "pathology slide image",
        ),
        templates=_TEMPLATES,
    ),
}

assert set(_VOCAB) == set(BUILTIN_GROUP_SHARES), "every group needs a vocabulary"
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
        int(_MAX_FILL * _VOCAB[g].capacity() / share) for g, share in BUILTIN_GROUP_SHARES.items()
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
        vocab = _VOCAB[group]
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
