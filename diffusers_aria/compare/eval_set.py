"""The evaluation prompts, their reference images and their split: seen, unseen or rare.

The prompts come from a `.jsonl`, `.csv`, `.tsv` or `.parquet` file with a prompt column and, for FID, an
image column (paths relative to the file's folder); a `.txt` file (one prompt a line) has no images, so FID is
then off (`--skip_fid`). A split column (values seen / unseen / rare) gives the splits; without one:

- **unseen**: the prompt names the concept (the keywords; with a label column, the eval file's same column);
- **rare**: not unseen, and its ARIA region is underrepresented in the filtered paired data: the region's share
  of the paired captions is below `rare_coverage` (default 0.25) times its share of the pool;
- **seen**: the rest.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass

import numpy as np

from ..utils.errors import UserError
from .concepts import ConceptFilter

SPLITS: tuple[str, ...] = ("seen", "unseen", "rare")
PROMPT_COLUMNS = ("prompt", "text", "caption")
IMAGE_COLUMNS = ("image", "file_name", "image_path")


@dataclass
class EvalRow:
    index: int
    prompt: str
    image: str | None = None
    split: str | None = None
    label: object = None
    region: int | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _read_rows(path: str) -> list[dict]:
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".txt":
            with open(path, encoding="utf-8") as fh:
                return [{"prompt": line.strip()} for line in fh if line.strip()]
        if ext == ".jsonl":
            with open(path, encoding="utf-8") as fh:
                return [json.loads(line) for line in fh if line.strip()]
        if ext in (".csv", ".tsv"):
            with open(path, encoding="utf-8", newline="") as fh:
                return list(csv.DictReader(fh, delimiter="\t" if ext == ".tsv" else ","))
        if ext == ".parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path).to_pylist()
    except (OSError, ValueError) as err:
        raise UserError(f"--eval_prompts {path!r} is unreadable ({err})") from None
    raise UserError(f"--eval_prompts {path!r}: {ext or 'no extension'} is not a prompt file this reads; use .jsonl, "
                    ".csv, .tsv, .parquet (with a prompt and an image column) or .txt (prompts only, no FID)")


def _pick(columns: set[str], wanted: str | None, candidates: tuple[str, ...], flag: str, path: str,
          required: bool) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise UserError(f"{flag} {wanted!r} is not a column of {path!r}; its columns: {', '.join(sorted(columns))}")
        return wanted
    found = next((c for c in candidates if c in columns), None)
    if found is None and required:
        raise UserError(f"{path!r} has none of the columns {', '.join(candidates)}; name its prompt column with {flag}")
    return found


def read_eval_prompts(path: str, num_prompts: int, seed: int, concept: ConceptFilter, *, prompt_column=None,
                      image_column=None, split_column=None, need_images: bool = True) -> list[EvalRow]:
    """The evaluation rows: up to `num_prompts` of the file's rows (a seeded choice, in file order).

    With `need_images`, every chosen row must have an existing reference image (FID's real images).
    """
    if not os.path.isfile(path):
        raise UserError(f"--eval_prompts {path!r}: no such file; pass a .jsonl/.csv/.tsv/.parquet file with a prompt "
                        "and an image column")
    rows = _read_rows(path)
    if not rows:
        raise UserError(f"--eval_prompts {path!r} holds no prompt")
    columns = set(rows[0])
    pcol = _pick(columns, prompt_column, PROMPT_COLUMNS, "--eval_prompt_column", path, True)
    icol = _pick(columns, image_column, IMAGE_COLUMNS, "--eval_image_column", path, False)
    scol = _pick(columns, split_column, (), "--eval_split_column", path, False)
    lcol = concept.column if concept.column in columns else None
    if concept.column is not None and lcol is None and scol is None:
        raise UserError(f"the concept is the label column {concept.column!r}, which {path!r} does not have; add it to "
                        "the evaluation file or give its splits with --eval_split_column")
    if num_prompts < 1:
        raise UserError(f"--num_eval_prompts {num_prompts} is not valid; it must be at least 1")
    chosen = np.arange(len(rows))
    if num_prompts < len(rows):
        chosen = np.sort(np.random.default_rng(seed).choice(len(rows), size=num_prompts, replace=False))
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for i in chosen.tolist():
        r = rows[i]
        prompt = r.get(pcol)
        if not isinstance(prompt, str) or not prompt.strip():
            raise UserError(f"--eval_prompts {path!r}: row {i} has no prompt in column {pcol!r}")
        image = r.get(icol) if icol else None
        if isinstance(image, dict):  # a datasets Image column written to parquet
            image = image.get("path")
        if image:
            image = image if os.path.isabs(image) else os.path.join(base, image)
        split = r.get(scol) if scol else None
        if split is not None and split not in SPLITS:
            raise UserError(f"--eval_split_column {scol!r}: row {i} has {split!r}; the splits are {', '.join(SPLITS)}")
        out.append(EvalRow(index=len(out), prompt=prompt.strip(), image=image or None, split=split,
                           label=r.get(lcol) if lcol else None))
    if need_images:
        no_image = [r for r in out if not r.image]
        if no_image:
            raise UserError(f"FID needs a reference image for every evaluation prompt, and {len(no_image)} of {len(out)} "
                            f"in {path!r} have none (e.g. {no_image[0].prompt!r}); add an image column (name it with "
                            "--eval_image_column) or pass --skip_fid for CLIP score and epsilon error only")
        missing = [r.image for r in out if not os.path.isfile(r.image)]
        if missing:
            raise UserError(f"{len(missing)} reference images of --eval_prompts {path!r} do not exist (e.g. "
                            f"{missing[0]!r}); fix the paths (relative to the file's folder) or pass --skip_fid")
    return out


def region_coverage(pool_regions: np.ndarray, paired_regions: np.ndarray, num_regions: int) -> np.ndarray:
    """Per region: its share of the paired captions over its share of the pool (1 = as in the pool)."""
    pool_share = np.bincount(pool_regions, minlength=num_regions) / max(len(pool_regions), 1)
    paired_share = np.bincount(paired_regions, minlength=num_regions) / max(len(paired_regions), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(pool_share > 0, paired_share / np.where(pool_share > 0, pool_share, 1), np.inf)


def assign_splits(rows: list[EvalRow], concept: ConceptFilter, coverage: np.ndarray, rare_coverage: float) -> None:
    """Give every row without a split one (in place): unseen by the concept, rare by its region's coverage."""
    for r in rows:
        if r.split is not None:
            continue
        unseen = concept.matches_label(r.label) if concept.column else concept.matches_text(r.prompt)
        if unseen:
            r.split = "unseen"
        elif r.region is not None and coverage[r.region] < rare_coverage:
            r.split = "rare"
        else:
            r.split = "seen"


def split_counts(rows: list[EvalRow]) -> dict[str, int]:
    return {s: sum(r.split == s for r in rows) for s in SPLITS}


__all__ = ["EvalRow", "SPLITS", "assign_splits", "read_eval_prompts", "region_coverage", "split_counts"]
