"""DataLoader glue: put ARIA's sampler into a script's DataLoader and each row's region into its batches.

* `region_dataloader`: a script's shuffling DataLoader rebuilt to draw rows by region (`AdaptiveRegionSampler`).
* `RegionCollate`: a collate function that adds each example's region to the batch.
"""

from __future__ import annotations

import inspect

import numpy as np
from torch.utils.data import DataLoader, RandomSampler, SequentialSampler

from .regions import RegionsMismatchError
from .sampler import AdaptiveRegionSampler

_KEPT_DATALOADER_ARGS = ("num_workers", "pin_memory", "drop_last", "timeout", "worker_init_fn",
                         "multiprocessing_context", "generator", "prefetch_factor", "persistent_workers",
                         "pin_memory_device", "in_order")


def region_dataloader(dataloader: DataLoader, regions, num_processes: int = 1, seed: int | None = 0,
                      column: str = "aria_region", read_ahead: int | None = None) -> DataLoader:
    """`dataloader` rebuilt to draw rows by region with ARIA's sampler, its batches carrying each row's region.

    For a training script whose DataLoader shuffles a `datasets.Dataset` (`shuffle=True`) and whose rows are the
    prompt pool: the new DataLoader keeps the dataset (plus an int32 `column` of region ids), the batch size,
    the collate function (wrapped by `RegionCollate`, which adds `batch[column]`) and every other argument
    (workers, pinning, ...); only `shuffle=True` becomes `sampler=AdaptiveRegionSampler(...)`, reachable as
    `.sampler`. Call it before `accelerator.prepare`.

    Args:
        dataloader: the script's DataLoader (a `RandomSampler` or `SequentialSampler`, a `batch_size`).
        regions: a `ConditionRegions` of the dataset's rows (same order), or the region id of every row.
        num_processes: processes that share each global draw (`accelerator.num_processes`): accelerate gives
            each process one `batch_size` slice of it.
        seed: the sampler's seed (None: 0).
        column: name of the region column and of the batch key.
        read_ahead: draws the DataLoader may request before training uses them (default:
            `prefetch_factor * num_workers + 2`, which covers accelerate's one-batch look-ahead).

    Each epoch is `len(dataset)` rounded down to whole global draws (at least one), so every process gets the
    same number of batches.
    """
    if not isinstance(dataloader, DataLoader):
        raise TypeError(f"region_dataloader needs a torch DataLoader, got {type(dataloader).__name__}")
    if dataloader.batch_size is None:
        raise ValueError("region_dataloader needs a DataLoader built with batch_size=...; this one has a custom "
                         "batch_sampler. Build it with sampler=AdaptiveRegionSampler(...) yourself")
    if not isinstance(dataloader.sampler, (RandomSampler, SequentialSampler)):
        raise ValueError(f"the DataLoader already has a custom sampler ({type(dataloader.sampler).__name__}); "
                         "region_dataloader replaces shuffle=True only")
    if isinstance(num_processes, bool) or not isinstance(num_processes, (int, np.integer)) or num_processes < 1:
        raise ValueError(f"num_processes={num_processes!r} must be a positive integer (accelerator.num_processes)")
    dataset = dataloader.dataset
    ids = np.asarray(getattr(regions, "region_ids", regions))
    if len(ids) != len(dataset):
        raise RegionsMismatchError(f"the regions cover {len(ids)} rows but the DataLoader's dataset has "
                                   f"{len(dataset)}; build the regions over this dataset's captions, in its order")
    if not hasattr(dataset, "add_column"):
        raise TypeError(f"region_dataloader needs a datasets.Dataset (got {type(dataset).__name__}); for another "
                        "dataset return each row's region from __getitem__ and build the DataLoader with "
                        "sampler=AdaptiveRegionSampler(...)")
    if column in dataset.column_names:
        dataset = dataset.remove_columns(column)
    dataset = dataset.add_column(column, ids.astype(np.int32, copy=False))
    kept = {k: getattr(dataloader, k) for k in _KEPT_DATALOADER_ARGS
            if k in inspect.signature(DataLoader.__init__).parameters and hasattr(dataloader, k)}
    if read_ahead is None:
        read_ahead = (kept.get("prefetch_factor") or 0) * kept.get("num_workers", 0) + 2
    global_batch = dataloader.batch_size * int(num_processes)
    sampler = AdaptiveRegionSampler(ids, batch_size=global_batch, seed=seed, read_ahead=read_ahead,
                                    num_samples=max(len(dataset) // global_batch, 1) * global_batch)
    return DataLoader(dataset, batch_size=dataloader.batch_size, sampler=sampler,
                      collate_fn=RegionCollate(dataloader.collate_fn, column), **kept)

class RegionCollate:
    """A collate function that adds each example's region to the batch: `batch[column] = LongTensor [B]`.

    Wraps a script's own `collate_fn` (which may drop unknown columns, as diffusers' returns a dict literal)
    so the region column travels without editing it. Picklable (a plain object, not a closure), so it works
    with DataLoader workers. The examples must carry `column` (`ConditionRegions.add_to_dataset`; a
    `with_transform` function must return its input dict, as diffusers' `preprocess_train` does).
    """

    def __init__(self, collate_fn=None, column: str = "aria_region") -> None:
        if collate_fn is None:
            from torch.utils.data import default_collate

            collate_fn = default_collate
        self.collate_fn = collate_fn
        self.column = column

    def __call__(self, examples):
        import torch

        try:
            region = torch.as_tensor([int(e[self.column]) for e in examples], dtype=torch.long)
        except KeyError:
            keys = sorted(examples[0].keys()) if examples and hasattr(examples[0], "keys") else []
            raise KeyError(
                f"the examples have no {self.column!r} column (they have {keys}): add it with "
                "ConditionRegions.add_to_dataset (region_dataloader does), and make a with_transform function "
                "return its input dict"
            ) from None
        batch = self.collate_fn(examples)
        if not hasattr(batch, "__setitem__") or isinstance(batch, (list, tuple)):
            raise TypeError(f"RegionCollate needs the wrapped collate function to return a dict, got {type(batch).__name__}")
        batch[self.column] = region
        return batch

    def __repr__(self) -> str:
        return f"RegionCollate({getattr(self.collate_fn, '__name__', self.collate_fn)!r}, column={self.column!r})"


__all__ = ["RegionCollate", "region_dataloader"]
