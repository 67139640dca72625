"""The paired (image, caption) data of the comparison, with the unseen concept dropped.

The training script is given a filtered copy of the user's paired data, written into the work folder, and
nothing else changes: an imagefolder becomes an imagefolder of links to the kept images with its own
`metadata.jsonl` (`--train_data_dir`), a `datasets` dataset (a Hub name or a `save_to_disk` folder) becomes a
`save_to_disk` folder of the kept rows (`--dataset_name`). A row is dropped when any of its captions names
the concept (keywords) or its label says so (a label column). The prompt pool is not filtered: by default it
is every caption of the paired data, the dropped ones included, as in RC's unseen setting.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import uuid
from dataclasses import dataclass

import numpy as np

from ..utils.atomic import atomic_write_text, replace_dir
from ..utils.errors import UserError
from .concepts import ConceptFilter

METADATA_NAMES = ("metadata.jsonl", "metadata.csv")


@dataclass
class PairedSource:
    """The user's paired data as the filter sees it: one entry per row (its captions and, for a label column,
    its label value); `records` holds an imagefolder's metadata rows, `dataset` a loaded `datasets.Dataset`."""

    kind: str  # "imagefolder" or "dataset"
    location: str
    captions: list[list[str]]
    labels: list | None = None
    records: list[dict] | None = None
    dataset: object = None

    def __len__(self) -> int:
        return len(self.captions)

    def first_captions(self) -> list[str]:
        return [c[0] if c else "" for c in self.captions]

    def all_captions(self) -> list[str]:
        return [text for row in self.captions for text in row]


def _as_captions(value: object) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value if v is not None]


def _read_metadata(folder: str) -> tuple[str, list[dict]]:
    for name in METADATA_NAMES:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        try:
            with open(path, encoding="utf-8") as fh:
                if name.endswith(".jsonl"):
                    rows = [json.loads(line) for line in fh if line.strip()]
                else:
                    rows = list(csv.DictReader(fh))
        except (OSError, ValueError) as err:
            raise UserError(f"--train_data_dir {folder!r}: {name} is unreadable ({err}); write one JSON object a "
                            "line with file_name and the caption column") from None
        return name, rows
    raise UserError(f"--train_data_dir {folder!r} has no metadata.jsonl or metadata.csv; an imagefolder of paired "
                    "data needs one (file_name and a caption column per image)")


def read_paired(train_data_dir: str | None, dataset_name: str | None, caption_column: str,
                concept: ConceptFilter, dataset_config_name: str | None = None) -> PairedSource:
    """Read the captions (and the concept's label column) of the paired data, checking the columns."""
    if (train_data_dir is None) == (dataset_name is None):
        raise UserError("paired data: pass exactly one of --train_data_dir (an imagefolder with metadata.jsonl) "
                        "and --dataset_name (a Hub dataset or a save_to_disk folder)")
    if train_data_dir is not None:
        if not os.path.isdir(train_data_dir):
            raise UserError(f"--train_data_dir {train_data_dir!r}: no such folder; pass an imagefolder with a "
                            "metadata.jsonl")
        name, rows = _read_metadata(train_data_dir)
        if not rows:
            raise UserError(f"--train_data_dir {train_data_dir!r}: {name} has no rows")
        columns = set(rows[0])
        for col, flag in ((caption_column, "--caption_column"), ("file_name", "file_name"),
                          (concept.column, "--concept_column")):
            if col is not None and col not in columns:
                raise UserError(f"{flag} {col!r} is not a column of {os.path.join(train_data_dir, name)}; its columns: "
                                f"{', '.join(sorted(columns))}")
        missing = [r["file_name"] for r in rows[:1000] if not os.path.isfile(os.path.join(train_data_dir, r["file_name"]))]
        if missing:
            raise UserError(f"--train_data_dir {train_data_dir!r}: {len(missing)} of the first {min(len(rows), 1000)} "
                            f"images of {name} are missing (e.g. {missing[0]!r})")
        return PairedSource("imagefolder", os.path.abspath(train_data_dir),
                            [_as_captions(r.get(caption_column)) for r in rows],
                            [r.get(concept.column) for r in rows] if concept.column else None, records=rows)
    from ..training.data import load_image_caption_dataset

    ds = load_image_caption_dataset(dataset_name=dataset_name, dataset_config_name=dataset_config_name)
    for col, flag in ((caption_column, "--caption_column"), (concept.column, "--concept_column")):
        if col is not None and col not in ds.column_names:
            raise UserError(f"{flag} {col!r} is not a column of --dataset_name {dataset_name!r}; its columns: "
                            f"{', '.join(ds.column_names)}")
    return PairedSource("dataset", dataset_name, [_as_captions(c) for c in ds[caption_column]],
                        list(ds[concept.column]) if concept.column else None, dataset=ds)


def unseen_rows(source: PairedSource, concept: ConceptFilter) -> np.ndarray:
    """A boolean mask of the rows the concept marks unseen (any caption matches, or the label says so)."""
    if concept.column is not None:
        return np.array([concept.matches_label(v) for v in source.labels], dtype=bool)
    return np.array([any(concept.matches_text(c) for c in row) for row in source.captions], dtype=bool)


def check_filter_result(unseen: np.ndarray, concept: ConceptFilter, where: str) -> None:
    """A filter that matches no paired row, or every row, makes no experiment: a one-line error."""
    n = len(unseen)
    if not unseen.any():
        raise UserError(f"the concept filter {concept.describe()} matches none of the {n} paired rows of {where}; "
                        "pass other --concept_keywords (one keyword a line) or another --concept_column / "
                        "--concept_labels")
    if unseen.all():
        raise UserError(f"the concept filter {concept.describe()} matches all {n} paired rows of {where}, leaving no "
                        "paired data to train on; pass narrower --concept_keywords or --concept_labels")


def write_filtered(source: PairedSource, keep: np.ndarray, dest: str) -> dict:
    """Write the kept rows into `dest` (built under a temporary name, then moved into place).

    Returns the training script's data flags for it (`--train_data_dir` or `--dataset_name`).
    """
    parent = os.path.dirname(os.path.abspath(dest))
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(dest)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if source.kind == "imagefolder":
            os.makedirs(tmp)
            lines = []
            for row, kept in zip(source.records, keep):
                if not kept:
                    continue
                target = os.path.join(tmp, row["file_name"])
                os.makedirs(os.path.dirname(target), exist_ok=True)
                original = os.path.join(source.location, row["file_name"])
                try:
                    os.symlink(os.path.abspath(original), target)
                except OSError:  # a file system without links: a copy
                    shutil.copyfile(original, target)
                lines.append(json.dumps(row))
            atomic_write_text(os.path.join(tmp, "metadata.jsonl"), "\n".join(lines) + "\n")
            flags = {"train_data_dir": os.path.abspath(dest)}
        else:
            kept = source.dataset.select(np.flatnonzero(keep).tolist())
            kept.save_to_disk(tmp)
            flags = {"dataset_name": os.path.abspath(dest)}
        replace_dir(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return flags


__all__ = ["PairedSource", "check_filter_result", "read_paired", "unseen_rows", "write_filtered"]
