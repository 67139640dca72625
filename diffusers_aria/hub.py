"""Publishing an ARIA-distilled student to the Hugging Face Hub.

Public API:
    UPLOAD_IGNORE_PATTERNS -- glob patterns that are never uploaded (training state, caches, logs, temp and token files)
    files_to_upload        -- the relative paths `push_to_hub` would upload (dry run)
    teacher_license        -- the `license:` of the teacher's model card (local folder, or the locally cached Hub card)
    resolve_license        -- the license for the student's card: the explicit one, else the teacher's, else an error
    write_model_card       -- write `output_dir/README.md` (YAML front matter + ARIA report), atomically
    push_to_hub            -- create the repo and upload the folder, refusing to upload a token

Patterns follow `huggingface_hub.upload_folder` semantics (`fnmatch` on posix paths relative to the folder,
where `*` also matches `/`), so `files_to_upload` lists exactly what `upload_folder` would send.

The token given to `push_to_hub` is only passed on to `huggingface_hub`: it is never written to disk, logged or
put into an error message, and the upload is refused when any file to be uploaded contains it (every file is
scanned in full, whatever its size).

Nothing here looks anything up on the network except `push_to_hub` itself: a Hub teacher's license is read from
the local Hugging Face cache only.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from huggingface_hub import create_repo, get_token, hf_hub_download, upload_folder
from huggingface_hub.utils import validate_repo_id

logger = logging.getLogger(__name__)

PAPER_ARXIV = "2606.23898"
STUDENT_MODES: tuple[str, ...] = ("full", "lora")
CARD_TAGS: tuple[str, ...] = ("stable-diffusion", "text-to-image", "diffusers", "distillation", "aria", "bk-sdm")
MAX_REGION_ROWS = 64
#: Files are scanned for tokens in blocks of this size (no file is too large to be scanned).
SCAN_BLOCK_BYTES = 8 * 1024 * 1024
#: The `torch_dtype` values the card's usage snippet can use.
TORCH_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
MODEL_INDEX = "model_index.json"
#: Written by `tiny_teacher.make_tiny_teacher` into the teacher folder; its `hub_id` (if any) names the teacher.
TEACHER_REPORT = "aria_teacher_report.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
CARD_IMAGE_DIR = "images"

#: Matches strings that look like a Hugging Face access token.
HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_HF_TOKEN_RE_BYTES = re.compile(HF_TOKEN_RE.pattern.encode("ascii"))
_MIN_TOKEN_LIKE_LEN = 23  # "hf_" + 20: the shortest string HF_TOKEN_RE matches
_DEVICE_RE = re.compile(r"[A-Za-z_]+(:[0-9]+)?")
#: Setting names containing any of these (case-insensitive) are never written into a model card.
SECRET_KEY_PARTS: tuple[str, ...] = ("token", "password", "secret", "key")

UPLOAD_IGNORE_PATTERNS: list[str] = [
    # accelerate / ARIA checkpoints and resumable training state
    "checkpoint-*",
    "checkpoint-*/**",
    "**/checkpoint-*/**",
    "optimizer*.bin",
    "**/optimizer*.bin",
    "**/optimizer.bin",
    "optimizer*.pt",
    "**/optimizer*.pt",
    "random_states_*.pkl",
    "**/random_states_*.pkl",
    "scheduler.bin",
    "**/scheduler.bin",
    "scaler.pt",
    "**/scaler.pt",
    "custom_checkpoint_*.pkl",
    "**/custom_checkpoint_*.pkl",
    "aria_state.safetensors",
    "aria_state.json",
    "**/aria_state.safetensors",
    "**/aria_state.json",
    # caches written into the output folder during training: teacher-generated latents (--image_free) and
    # `regions.embed_pool`'s prompt embeddings (embeddings-<key>.npy, .npy.json, .npy.partial.npy). The regions
    # folder itself (regions_config.json, centroids.safetensors, region_ids.npy) is the region assignment the
    # card and report describe, and is uploaded.
    "teacher_latents",
    "teacher_latents/**",
    "**/teacher_latents/**",
    "embeddings-*.npy*",
    "**/embeddings-*.npy*",
    # half-saved / replaced regions folders (`ConditionRegions.save`)
    ".regions-tmp-*",
    "**/.regions-tmp-*",
    "*.old-.regions-tmp-*",
    # half-written files (atomic writes use `<name>.tmp-<pid>` or `*.tmp`) and ARIA scratch files
    "*.tmp*",
    ".aria-*",
    "**/.aria-*",
    # tracker logs
    "logs",
    "logs/**",
    "wandb",
    "wandb/**",
    "runs",
    "runs/**",
    "*.lock",
    # token / credential looking files (never tokenizer files: "tokenizer/" and "*tokens_map.json" are kept)
    "token",
    "**/token",
    "*.token",
    "hf_token*",
    "**/hf_token*",
    "stored_tokens",
    "**/stored_tokens",
    ".huggingface",
    ".huggingface/**",
    ".env",
    "**/.env",
    ".netrc",
    "**/.netrc",
    "*.pem",
]

try:  # upload_folder always adds these (.git, .cache/huggingface)
    from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS as _HUB_DEFAULT_IGNORE
except ImportError:  # pragma: no cover - older/newer huggingface_hub layouts
    _HUB_DEFAULT_IGNORE = [".git", ".git/*", "*/.git", "**/.git/**", ".cache/huggingface",
                           ".cache/huggingface/*", "*/.cache/huggingface", "**/.cache/huggingface/**"]

try:
    from huggingface_hub.utils import filter_repo_objects as _filter_repo_objects
except ImportError:  # pragma: no cover - fallback with the same semantics
    _filter_repo_objects = None


# ----------------------------------------------------------------------------------------------- helpers
def _fallback_filter(paths: Iterable[str], ignore_patterns: list[str]) -> list[str]:
    """`filter_repo_objects` semantics: posix paths, `fnmatchcase`, a pattern ending in '/' gets '*'."""
    pats = [p.replace("\\", "/") for p in ignore_patterns]
    pats = [p + "*" if p.endswith("/") else p for p in pats]
    return [p for p in paths if not any(fnmatch.fnmatchcase(p, pat) for pat in pats)]


def _check_patterns(extra_ignore_patterns: list[str] | None) -> list[str]:
    if extra_ignore_patterns is None:
        return []
    if isinstance(extra_ignore_patterns, str) or not all(isinstance(p, str) and p for p in extra_ignore_patterns):
        raise TypeError(
            f"extra_ignore_patterns must be a list of non-empty glob strings (e.g. ['samples/**']), "
            f"got {extra_ignore_patterns!r}."
        )
    return list(extra_ignore_patterns)


def _is_ignored(relpath: str, patterns: list[str]) -> bool:
    """Whether `relpath` (posix, relative to the output folder) is dropped by `patterns`."""
    return not _filter([relpath], patterns)


def _filter(paths: list[str], patterns: list[str]) -> list[str]:
    if _filter_repo_objects is not None:
        return list(_filter_repo_objects(paths, ignore_patterns=patterns))
    return _fallback_filter(paths, patterns)


def _atomic_write_text(path: str, text: str) -> None:
    """Write `text` to a temporary file next to `path`, then rename it over `path`."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _atomic_copy(src: str, dst: str) -> None:
    """Copy `src` to a temporary file next to `dst`, then rename it over `dst`."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(dst)}.", suffix=".tmp", dir=os.path.dirname(dst))
    os.close(fd)
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _is_secret_key(key: Any) -> bool:
    k = str(key).lower()
    return any(part in k for part in SECRET_KEY_PARTS)


def scrub_secrets(value: Any) -> Any:
    """A copy of `value` without secret-named mapping keys and with token-looking strings replaced by '***'."""
    if isinstance(value, Mapping):
        return {k: scrub_secrets(v) for k, v in value.items() if not _is_secret_key(k)}
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(v) for v in value]
    if isinstance(value, str):
        return HF_TOKEN_RE.sub("***", value)
    return value


def _md_cell(value: Any, max_len: int = 120) -> str:
    """Render `value` for a markdown table cell (one line, '|' escaped, long values shortened)."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float):
        text = "nan" if math.isnan(value) else f"{value:.6g}"
    elif isinstance(value, (dict, list, tuple)):
        text = json.dumps(value, default=str, sort_keys=True)
    else:
        text = str(value)
    text = " ".join(text.split()).replace("|", "\\|")
    if len(text) > max_len:
        text = text[: max_len - 1] + "…"
    return text


def _settings_table(settings: Mapping[str, Any]) -> str:
    lines = ["| setting | value |", "|---|---|"]
    for k in sorted(settings, key=str):
        lines.append(f"| `{_md_cell(k, 80)}` | {_md_cell(settings[k])} |")
    return "\n".join(lines)


def _num(value: Any, fmt: str) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return _md_cell(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, fmt)


def _sort_estimate(row: Mapping[str, Any]) -> float:
    est = row.get("estimate")
    if isinstance(est, bool) or not isinstance(est, (int, float)) or math.isnan(est):
        return -math.inf
    return float(est)


def _region_table(aria_report: Mapping[str, Any], max_rows: int = MAX_REGION_ROWS) -> str:
    regions = aria_report.get("regions")
    if regions is None:
        return "The ARIA report has no per-region table."
    if not isinstance(regions, list) or not all(isinstance(r, Mapping) for r in regions):
        raise TypeError(
            f"aria_report['regions'] must be a list of dicts (as written by ARIACallback.summary()), "
            f"got {type(regions).__name__}."
        )
    rows = sorted(regions, key=_sort_estimate, reverse=True)
    shown = rows[:max_rows]
    lines = [
        "| region | name | size | prior | probability | estimate | draw_share |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in shown:
        lines.append(
            f"| {_md_cell(r.get('region'))} | {_md_cell(r.get('name'), 60)} | {_num(r.get('size'), 'd')} | "
            f"{_num(r.get('prior'), '.4f')} | {_num(r.get('probability'), '.4f')} | "
            f"{_num(r.get('estimate'), '.3f')} | {_num(r.get('draw_share'), '.4f')} |"
        )
    text = (f"{len(regions)} regions, sorted by discrepancy estimate (1 = average), highest first.\n\n"
            + "\n".join(lines))
    if len(rows) > max_rows:
        text += (f"\n\n{len(rows) - max_rows} of {len(rows)} regions were left out "
                 f"(only the {max_rows} with the highest estimates are shown).")
    return text


def _card_image(output_dir: str, path: str, what: str) -> str:
    """Relative posix link to `path` inside `output_dir`; copies the file into `images/` when needed."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what} must be a path to an image file, got {type(path).__name__}.")
    path = os.fspath(path)
    candidates = [path] if os.path.isabs(path) else [os.path.join(output_dir, path), path]
    found = next((c for c in candidates if os.path.isfile(c)), None)
    if found is None:
        raise FileNotFoundError(
            f"{what} {path!r} does not exist (looked at {candidates!r}); pass an existing image file, "
            f"absolute or relative to the output folder, or None to leave it out."
        )
    root = os.path.realpath(output_dir)
    real = os.path.realpath(found)
    if os.path.commonpath([root, real]) == root:
        rel = Path(os.path.relpath(real, root)).as_posix()
        if not _is_ignored(rel, UPLOAD_IGNORE_PATTERNS + list(_HUB_DEFAULT_IGNORE)):
            return rel
    rel = f"{CARD_IMAGE_DIR}/{os.path.basename(real)}"
    if _is_ignored(rel, UPLOAD_IGNORE_PATTERNS):
        raise ValueError(f"{what} file name {os.path.basename(real)!r} matches an upload ignore pattern; rename it.")
    _atomic_copy(real, os.path.join(root, *rel.split("/")))
    return rel


def _looks_like_path(value: str) -> bool:
    """Whether `value` reads as a filesystem path rather than a Hub id ('name' or 'namespace/name')."""
    return (os.path.isabs(value) or value.startswith((".", "~")) or value.count("/") > 1 or "\\" in value)


def _is_hub_id(value: Any) -> bool:
    """Whether `value` is a valid Hub repo id that does not look like a filesystem path (no existence check)."""
    if not isinstance(value, str) or not value or _looks_like_path(value):
        return False
    try:
        validate_repo_id(value)
    except Exception:
        return False
    return True


def _is_local_model(name_or_path: str) -> bool:
    """An existing local folder, or something that is a path (or no valid Hub id) rather than a Hub id."""
    return os.path.isdir(name_or_path) or not _is_hub_id(name_or_path)


def _folder_hub_id(folder: str) -> str | None:
    """The Hub id a local model folder was made from: `model_index.json`'s `_name_or_path`, else the
    `hub_id` of its `aria_teacher_report.json`; only values that are Hub ids (never paths) count."""
    for name, key in ((MODEL_INDEX, "_name_or_path"), (TEACHER_REPORT, "hub_id")):
        try:
            with open(os.path.join(folder, name), encoding="utf-8") as fh:
                data = json.load(fh)
        except (OSError, ValueError):
            continue
        value = data.get(key) if isinstance(data, dict) else None
        if _is_hub_id(value):
            return value
    return None


def _local_name(path: str) -> str:
    """The basename of a local model path (never the absolute path)."""
    return os.path.basename(os.path.normpath(os.path.expanduser(path))) or path


def _public(settings: dict[str, Any]) -> dict[str, Any]:
    """Settings with every local path reduced to its last component: a card never publishes the trainer's
    folders (`/home/me/data/prompts.txt` -> `prompts.txt`); Hub ids and other values stay as given."""
    def public(value: Any) -> Any:
        if isinstance(value, str) and value and (_looks_like_path(value) or os.path.exists(value)):
            return _local_name(value)
        return value

    return {k: public(v) for k, v in settings.items()}


def _card_license(readme: str) -> str | None:
    """The `license:` of a model card's YAML front matter, or None (no card, no front matter, no license)."""
    try:
        from huggingface_hub.repocard import metadata_load

        meta = metadata_load(readme)
    except Exception as err:  # missing file, undecodable text, malformed YAML
        logger.debug("could not read the license of %s: %s", readme, err)
        return None
    value = meta.get("license") if isinstance(meta, dict) else None
    if isinstance(value, str) and value.strip() and "\n" not in value:
        return value.strip()
    return None


def _cached_hub_license(repo_id: str) -> str | None:
    """The license of the Hub model card of `repo_id` if it is in the local cache; never looks it up online."""
    try:
        readme = hf_hub_download(repo_id, "README.md", local_files_only=True)
    except Exception as err:  # not cached (LocalEntryNotFoundError), invalid id, unreadable cache
        logger.debug("no locally cached model card for %s: %s", repo_id, err)
        return None
    return _card_license(readme)


def teacher_license(name_or_path: str) -> str | None:
    """The `license:` in the front matter of the teacher's model card, or None when it cannot be found offline.

    For a local folder, `<folder>/README.md`; when that has no license and the folder records the Hub id it was
    made from (`model_index.json` `_name_or_path`, or `hub_id` in `aria_teacher_report.json`), that model's
    locally cached card. For a Hub id, only the card in the local Hugging Face cache: nothing is downloaded.
    """
    if not isinstance(name_or_path, str) or not name_or_path:
        raise ValueError(f"name_or_path must be a Hub model id or a local folder of the teacher, got {name_or_path!r}.")
    if os.path.isdir(name_or_path):
        found = _card_license(os.path.join(name_or_path, "README.md"))
        if found is None:
            hub_id = _folder_hub_id(name_or_path)
            found = _cached_hub_license(hub_id) if hub_id is not None else None
        return found
    if not _is_hub_id(name_or_path):  # a path that does not exist
        return None
    return _cached_hub_license(name_or_path)


def resolve_license(teacher: str, license: str | None) -> str:
    """The license for the student's model card: `license` when given, else the teacher's (`teacher_license`).

    Raises ValueError, naming the teacher, when neither is known.
    """
    if license is not None:
        _check_str("license", license, "a Hub license id such as 'apache-2.0' or 'creativeml-openrail-m'")
        if "\n" in license:
            raise ValueError(f"license must be a single-line Hub license id, got {license!r}.")
        return license.strip()
    found = teacher_license(teacher)
    if found is not None:
        return found
    raise ValueError(
        f"No license for the model card: the teacher {teacher!r} has no 'license:' in its model card (README.md "
        f"front matter, local folder or local Hub cache) and none was given; pass --license, e.g. "
        f"--license creativeml-openrail-m for a Stable Diffusion v1 teacher or --license apache-2.0 for a "
        f"teacher of your own."
    )


def _yaml_str(value: str) -> str:
    """A YAML double-quoted scalar (JSON strings are valid YAML)."""
    return json.dumps(value, ensure_ascii=False)


def _check_str(name: str, value: Any, hint: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{name} must be a non-empty string ({hint}), got {value!r}.")
    return value


def _check_mapping(name: str, value: Any, allow_none: bool = True) -> dict[str, Any] | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a dict{' or None' if allow_none else ''}, got {type(value).__name__}.")
    return dict(value)


# ----------------------------------------------------------------------------------------------- model card
def write_model_card(
    output_dir: str,
    *,
    base_model: str,
    repo_id: str | None,
    architecture: str,
    student_mode: str,
    aria_settings: dict,
    aria_report: dict | None = None,
    validation_image: str | None = None,
    allocation_plot: str | None = None,
    train_settings: dict | None = None,
    teacher_report: dict | None = None,
    license: str | None = None,
    base_model_id: str | None = None,
    torch_dtype: str = "float32",
    device: str = "cuda",
) -> str:
    """Write `output_dir/README.md`: a model card for an ARIA-distilled BK-SDM-style student.

    Args:
        output_dir: the final training output folder (must exist).
        base_model: the teacher checkpoint, a Hub id or a local folder/path. A Hub id becomes the front matter's
            `base_model`; a local path never does: its Hub id is used when the folder records one
            (`model_index.json` `_name_or_path`, or `hub_id` in `aria_teacher_report.json`), else the
            `base_model` line is left out and the card names only the folder's basename.
        repo_id: the Hub repo the card is written for (used in the usage snippet); None for a placeholder.
        architecture: the student architecture name (e.g. "bk_small").
        student_mode: "full" (a distilled student pipeline) or "lora" (LoRA weights, loaded with `load_lora_weights`).
        aria_settings: the ARIA configuration, shown as a table.
        aria_report: `ARIACallback.summary()` output; its "regions" become the per-region table (64 rows at most).
        validation_image: a validation grid image; linked relatively, copied into `output_dir/images/` if outside.
        allocation_plot: the ARIA allocation plot; same handling as `validation_image`.
        train_settings: training hyper-parameters; secret-named keys are dropped, token-like values scrubbed,
            local paths reduced to their last component.
        teacher_report: optional notes on the teacher/student initialisation, shown as a table (same handling).
        license: the front matter license; None takes the teacher's (`resolve_license`, then the license of
            `base_model_id`'s cached card) and raises ValueError when the teacher's card has none.
        base_model_id: the teacher's Hub id, overriding what is derived from `base_model`.
        torch_dtype: the dtype of the usage snippet, one of "float32", "float16", "bfloat16".
        device: the device of the usage snippet (`pipe.to(device)`), e.g. "cuda", "cuda:0", "cpu", "mps".

    Returns:
        The path of the written README.md. The card never contains an HF token.
    """
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"output_dir {output_dir!r} is not an existing directory; create it (train) first.")
    base_model = _check_str("base_model", base_model, "a Hub model id or a local path of the teacher")
    architecture = _check_str("architecture", architecture, "the student architecture, e.g. 'bk_small'")
    if "\n" in base_model:
        raise ValueError(f"base_model must be a single-line Hub id or path, got {base_model!r}.")
    if base_model_id is not None and not _is_hub_id(base_model_id):
        raise ValueError(
            f"base_model_id must be a Hub model id such as 'runwayml/stable-diffusion-v1-5' (not a path), "
            f"got {base_model_id!r}."
        )
    if student_mode not in STUDENT_MODES:
        raise ValueError(f"student_mode must be one of {list(STUDENT_MODES)}, got {student_mode!r}.")
    if torch_dtype not in TORCH_DTYPES:
        raise ValueError(f"torch_dtype must be one of {list(TORCH_DTYPES)}, got {torch_dtype!r}.")
    if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
        raise ValueError(f"device must be a torch device string such as 'cuda', 'cuda:0', 'cpu' or 'mps', got {device!r}.")
    if repo_id is not None:
        _check_str("repo_id", repo_id, "'namespace/name', or None")
    aria = scrub_secrets(_check_mapping("aria_settings", aria_settings, allow_none=False))
    report = _check_mapping("aria_report", aria_report)
    train = _public(scrub_secrets(_check_mapping("train_settings", train_settings))) if train_settings is not None else None
    teacher = (_public(scrub_secrets(_check_mapping("teacher_report", teacher_report)))
               if teacher_report is not None else None)

    local = _is_local_model(base_model)
    local_name = _local_name(base_model) if local else None
    if base_model_id is not None:
        hub_id: str | None = base_model_id
    elif local:
        hub_id = _folder_hub_id(base_model) if os.path.isdir(base_model) else None
    else:
        hub_id = base_model
    if license is None and base_model_id is not None:
        license = teacher_license(base_model) or teacher_license(base_model_id)
    license = resolve_license(base_model, license)

    plot_rel = _card_image(output_dir, allocation_plot, "allocation_plot") if allocation_plot is not None else None
    grid_rel = _card_image(output_dir, validation_image, "validation_image") if validation_image is not None else None

    model_ref = repo_id or f"your-username/{os.path.basename(os.path.abspath(output_dir)) or 'aria-student'}"
    tags = list(CARD_TAGS) + (["lora"] if student_mode == "lora" else [])
    front = ["---", f"license: {_yaml_str(license)}"]
    if hub_id is not None:
        front.append(f"base_model: {_yaml_str(hub_id)}")
    front += ["library_name: diffusers", "tags:", *[f"- {t}" for t in tags],
              "pipeline_tag: text-to-image", "inference: true", "---"]

    if hub_id is not None:
        teacher_ref = f"[`{hub_id}`](https://huggingface.co/{hub_id})"
        teacher_name = f"`{hub_id}`"
    else:
        teacher_ref = f"a local teacher model (`{local_name}`)"
        teacher_name = f"`{local_name}` (a local model)"

    title = model_ref.split("/")[-1]
    parts: list[str] = ["\n".join(front), f"# {title}"]
    description = (
        "## Model description\n\n"
        f"A BK-SDM-style compressed student UNet (architecture `{architecture}`) distilled from "
        f"{teacher_ref} with output- and feature-level knowledge "
        "distillation. Conditioning prompts were drawn with Random Conditioning and allocated across prompt "
        "regions by ARIA (adaptive region-based importance allocation), which shifts sampling towards the "
        "regions where the student disagrees most with the teacher. "
        f"See the paper: [arXiv:{PAPER_ARXIV}](https://arxiv.org/abs/{PAPER_ARXIV}).\n\n"
        f"Student mode: `{student_mode}`"
        + (" (LoRA adapter weights on the student UNet)." if student_mode == "lora" else " (all student weights).")
    )
    if hub_id is None:
        description += (f"\n\nThe teacher was a local model (`{local_name}`), not a Hub model, so this card has no "
                        "`base_model`.")
    parts.append(description)

    dtype = f"torch.{torch_dtype}"
    if student_mode == "lora":
        if os.path.isfile(os.path.join(output_dir, MODEL_INDEX)):
            pipe_src = model_ref  # the folder holds the base student pipeline next to the LoRA weights
        else:
            pipe_src = hub_id or f"path/to/{local_name}"
        load = (f'pipe = StableDiffusionPipeline.from_pretrained("{pipe_src}", torch_dtype={dtype})\n'
                f'pipe.load_lora_weights("{model_ref}")\n')
    else:
        load = f'pipe = StableDiffusionPipeline.from_pretrained("{model_ref}", torch_dtype={dtype})\n'
    parts.append(
        "## How to use\n\n```python\nimport torch\nfrom diffusers import StableDiffusionPipeline\n\n"
        + load
        + f'pipe = pipe.to("{device}")\n'
        'image = pipe("a photo of an astronaut riding a horse on mars", num_inference_steps=25).images[0]\n'
        'image.save("astronaut.png")\n```'
    )

    parts.append("## ARIA settings\n\n" + (_settings_table(aria) if aria else "No ARIA settings were recorded."))

    region_text = "No ARIA report was given."
    if report is not None:
        region_text = ""
        if report.get("policy") is not None or report.get("step") is not None:
            region_text = f"Policy `{_md_cell(report.get('policy'))}` at step {_md_cell(report.get('step'))}.\n\n"
        region_text += _region_table(report)
    parts.append("## Per-region allocation\n\n" + region_text)

    if plot_rel is not None:
        parts.append(f"## Allocation over training\n\n![ARIA allocation plot]({quote(plot_rel)})")
    if grid_rel is not None:
        parts.append(f"## Validation images\n\n![validation images]({quote(grid_rel)})")
    if train:
        parts.append("## Training settings\n\n" + _settings_table(train))
    if teacher:
        parts.append("## Teacher and student initialisation\n\n" + _settings_table(teacher))

    parts.append(
        "## Limitations and bias\n\n"
        "- The student is smaller than the teacher and is expected to be worse in image quality and text "
        "alignment, especially on prompts far from the distillation prompt pool.\n"
        "- ARIA re-weights the regions of the prompt pool that it was given; regions missing from the pool are "
        "not covered, and the per-region estimates describe this run only.\n"
        f"- The student inherits the limitations, biases and license terms of the teacher {teacher_name}.\n"
        "- Not intended for generating harmful, deceptive or non-consensual content."
    )

    text = "\n\n".join(parts) + "\n"
    text = HF_TOKEN_RE.sub("***", text)  # last line of defence: nothing token-like ever reaches the card
    path = os.path.join(output_dir, "README.md")
    _atomic_write_text(path, text)
    return path


# ----------------------------------------------------------------------------------------------- upload
def files_to_upload(output_dir: str, extra_ignore_patterns: list[str] | None = None) -> list[str]:
    """Sorted posix paths (relative to `output_dir`) that `push_to_hub` would upload.

    Uses the same listing and `filter_repo_objects` matching as `huggingface_hub.upload_folder`, with
    `UPLOAD_IGNORE_PATTERNS`, `extra_ignore_patterns` and huggingface_hub's default ignores (.git, .cache).
    """
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(f"output_dir {output_dir!r} is not an existing directory.")
    extra = _check_patterns(extra_ignore_patterns)
    root = Path(output_dir).expanduser().resolve()
    rel = [p.relative_to(root).as_posix() for p in sorted(root.glob("**/*")) if p.is_file()]
    return _filter(rel, UPLOAD_IGNORE_PATTERNS + extra + list(_HUB_DEFAULT_IGNORE))


def _contains_secret(path: str, token: str | None) -> str | None:
    """Why `path` must not be uploaded ('the Hub token' / 'a string that looks like an HF token'), or None.

    The whole file is read in `SCAN_BLOCK_BYTES` blocks, each searched together with the last bytes of the
    previous one, so a secret split across two blocks is found. The token-like pattern is only searched in text
    files (no NUL byte in the first 8 KiB); the exact token is searched in every file.
    """
    needle = token.encode("utf-8") if token else b""
    keep = max(len(needle), _MIN_TOKEN_LIKE_LEN) - 1  # longest prefix of a match that can end a block
    block_size = max(int(SCAN_BLOCK_BYTES), 1)
    is_text: bool | None = None
    token_like = False
    tail = b""
    try:
        with open(path, "rb") as fh:
            while True:
                block = fh.read(block_size)
                if not block:
                    break
                if is_text is None:
                    is_text = b"\x00" not in block[:8192]
                window = tail + block if tail else block
                if needle and needle in window:
                    return "the Hub token"
                if is_text and not token_like and _HF_TOKEN_RE_BYTES.search(window):
                    token_like = True
                    if not needle:
                        break
                tail = window[-keep:]
    except OSError:
        return None
    return "a string that looks like an HF token (hf_...)" if token_like else None


def push_to_hub(
    output_dir: str,
    repo_id: str,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload ARIA-distilled student",
    extra_ignore_patterns: list[str] | None = None,
) -> str:
    """Create `repo_id` (if needed) and upload `output_dir` to it, minus training state; returns the commit URL.

    Refuses (before anything is sent) when `output_dir` holds no finished model (`model_index.json`, or
    `pytorch_lora_weights.safetensors` for a LoRA student) or when a file to upload (of any size) contains the
    token (the given one, else the locally stored one) or, in a text file, an HF-token-like string.
    """
    if not os.path.isdir(output_dir):
        raise FileNotFoundError(
            f"output_dir {output_dir!r} does not exist; finish training (the final save writes the pipeline "
            f"there) before pushing to the Hub."
        )
    if not (os.path.isfile(os.path.join(output_dir, MODEL_INDEX))
            or os.path.isfile(os.path.join(output_dir, LORA_WEIGHTS))):
        raise FileNotFoundError(
            f"{output_dir!r} contains no {MODEL_INDEX} (nor {LORA_WEIGHTS}): it is not a finished model. "
            f"Finish training so the final pipeline is saved there before pushing to the Hub."
        )
    try:
        validate_repo_id(repo_id)
    except Exception as err:
        raise ValueError(f"repo_id {repo_id!r} is not valid; use 'name' or 'namespace/name' ({err}).") from None
    if token is not None and (not isinstance(token, str) or not token):
        raise TypeError("token must be a non-empty string or None (None uses the locally stored login).")
    if private is not None and not isinstance(private, bool):
        raise TypeError(f"private must be True, False or None, got {private!r}.")
    if not isinstance(commit_message, str) or not commit_message.strip():
        raise ValueError(f"commit_message must be a non-empty string, got {commit_message!r}.")
    extra = _check_patterns(extra_ignore_patterns)

    effective = token if token else get_token()
    if (effective and effective in commit_message) or HF_TOKEN_RE.search(commit_message):
        raise ValueError("commit_message contains a token; remove it.")
    files = files_to_upload(output_dir, extra)
    if not files:
        raise ValueError(f"Nothing to upload from {output_dir!r}: every file matches an ignore pattern.")
    if "README.md" not in files:
        logger.warning("%s has no README.md; call write_model_card() first to publish a model card.", output_dir)
    for rel in files:
        why = _contains_secret(os.path.join(output_dir, *rel.split("/")), effective)
        if why is not None:
            raise ValueError(
                f"Refusing to upload: {rel!r} in {output_dir!r} contains {why}. Remove the secret from the "
                f"file or exclude it with extra_ignore_patterns, then push again."
            )

    create_repo(repo_id, token=token, private=private, exist_ok=True)
    logger.info("Uploading %d files from %s to %s", len(files), output_dir, repo_id)
    result = upload_folder(
        repo_id=repo_id,
        folder_path=output_dir,
        commit_message=commit_message,
        ignore_patterns=UPLOAD_IGNORE_PATTERNS + extra,
        token=token,
    )
    return str(getattr(result, "commit_url", None) or result)
