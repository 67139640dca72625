"""The model card of an ARIA-distilled student: `output_dir/README.md`.

Public API:
    write_model_card -- write the card (front matter + ARIA's sections), atomically
    teacher_license  -- the `license:` of the teacher's model card (local folder, or the locally cached Hub card)
    resolve_license  -- the license for the student's card: the explicit one, else the teacher's, else an error

The front matter is huggingface_hub's `ModelCardData` (license, base_model, pipeline_tag, inference) completed by
diffusers' `populate_model_card` (library_name, tags): the metadata diffusers' training scripts publish. Their
`load_or_create_model_card` is not called: it first loads the card already at `repo_id_or_path` (a Hub download
for anything but an existing local file, or the stale card of an earlier run) and otherwise fills a template of
TODO placeholders. This card is rebuilt from the run every time, and the body is ARIA's own sections: model
description, how to use, ARIA settings, per-region allocation, allocation plot, validation images, training
settings, teacher and student initialisation, limitations and bias.

What a card never publishes: secrets (`hub.scrub_secrets` drops secret-named settings and masks token-like
strings, and the finished text is scrubbed again), local paths (`base_model` is only ever a Hub id; local paths in
the settings tables are reduced to their last component). Images are linked relatively; an image outside the
output folder, or one `push_to_hub` would not upload, is copied into `images/` first.

Nothing here looks anything up on the network: a Hub teacher's license is read from the local Hugging Face cache
only.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote

from diffusers.utils.hub_utils import populate_model_card
from huggingface_hub import ModelCard, ModelCardData, hf_hub_download
from huggingface_hub.utils import validate_repo_id

from ..utils.atomic import atomic_copy, atomic_write_text
from ..utils.file_names import TEACHER_REPORT
from .hub import MODEL_INDEX, scrub_secrets, would_upload

logger = logging.getLogger(__name__)

PAPER_ARXIV = "2606.23898"
STUDENT_MODES: tuple[str, ...] = ("full", "lora")
CARD_TAGS: tuple[str, ...] = ("stable-diffusion", "text-to-image", "diffusers", "distillation", "aria", "bk-sdm")
#: The first tag of a card by the saved pipeline's class (CARD_TAGS' "stable-diffusion" for SD 1.x/2.x).
PIPELINE_TAGS = {"StableDiffusionXLPipeline": "stable-diffusion-xl", "PixArtAlphaPipeline": "pixart-alpha",
                 "PixArtSigmaPipeline": "pixart-sigma", "StableDiffusion3Pipeline": "sd3"}


def card_tags(pipeline_class: str, architecture: str, student_mode: str) -> list[str]:
    """The card's tags: the family's, the library's, the student design's (BK-SDM or KOALA), and lora."""
    tags = [PIPELINE_TAGS.get(pipeline_class, "stable-diffusion"), *CARD_TAGS[1:5]]
    if architecture.startswith("bk_"):
        tags.append("bk-sdm")
    elif architecture.startswith("koala_"):
        tags.append("koala")
    return tags + (["lora"] if student_mode == "lora" else [])
MAX_REGION_ROWS = 64
#: The `torch_dtype` values the card's usage snippet can use.
TORCH_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
CARD_IMAGE_DIR = "images"

_DEVICE_RE = re.compile(r"[A-Za-z_]+(:[0-9]+)?")


# ----------------------------------------------------------------------------------------------- tables
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
        "| region | name | size | prompt share | probability | estimate | draw_share |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in shown:
        lines.append(
            f"| {_md_cell(r.get('region'))} | {_md_cell(r.get('name'), 60)} | {_num(r.get('size'), 'd')} | "
            f"{_num(r.get('prompt_share', r.get('prior')), '.4f')} | {_num(r.get('probability'), '.4f')} | "
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
        if would_upload(rel):
            return rel
    rel = f"{CARD_IMAGE_DIR}/{os.path.basename(real)}"
    if not would_upload(rel):
        raise ValueError(f"{what} file name {os.path.basename(real)!r} matches an upload ignore pattern; rename it.")
    atomic_copy(real, os.path.join(root, *rel.split("/")))
    return rel


# ----------------------------------------------------------------------------------------------- the teacher
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


def _teacher_hub_id(base_model: str, base_model_id: str | None) -> str | None:
    """The teacher's Hub id for `base_model:` (never a local path): `base_model_id`, else the Hub id a local folder
    records, else `base_model` itself when it is a Hub id; None for a local teacher with no recorded Hub id."""
    if base_model_id is not None:
        return base_model_id
    if _is_local_model(base_model):
        return _folder_hub_id(base_model) if os.path.isdir(base_model) else None
    return base_model


# ----------------------------------------------------------------------------------------------- license
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


# ----------------------------------------------------------------------------------------------- sections
def _description(architecture: str, student_mode: str, hub_id: str | None, local_name: str | None) -> str:
    teacher_ref = (f"[`{hub_id}`](https://huggingface.co/{hub_id})" if hub_id is not None
                   else f"a local teacher model (`{local_name}`)")
    text = (
        "## Model description\n\n"
        f"A compressed student (architecture `{architecture}`) distilled from "
        f"{teacher_ref} with output- and feature-level knowledge "
        "distillation. Conditioning prompts were drawn with Random Conditioning and allocated across prompt "
        "regions by ARIA (adaptive region-based importance allocation), which shifts sampling towards the "
        "regions where the student disagrees most with the teacher. "
        f"See the paper: [arXiv:{PAPER_ARXIV}](https://arxiv.org/abs/{PAPER_ARXIV}).\n\n"
        f"Student mode: `{student_mode}`"
        + (" (LoRA adapter weights on the student)." if student_mode == "lora" else " (all student weights).")
    )
    if hub_id is None:
        text += (f"\n\nThe teacher was a local model (`{local_name}`), not a Hub model, so this card has no "
                 "`base_model`.")
    return text


def _usage(model_ref: str, base_pipeline: str | None, torch_dtype: str, device: str,
           pipeline_class: str = "StableDiffusionPipeline", lora_load: Callable[[str], str] | None = None) -> str:
    """The "How to use" snippet; `base_pipeline` is where a LoRA student's base pipeline loads from (None: full);
    `lora_load(model_ref)` the lines that load the adapter (default `pipe.load_lora_weights(model_ref)`)."""
    dtype = f"torch.{torch_dtype}"
    if base_pipeline is not None:
        load = (f'pipe = {pipeline_class}.from_pretrained("{base_pipeline}", torch_dtype={dtype})\n'
                + (lora_load(model_ref) if lora_load else f'pipe.load_lora_weights("{model_ref}")\n'))
    else:
        load = f'pipe = {pipeline_class}.from_pretrained("{model_ref}", torch_dtype={dtype})\n'
    return (
        f"## How to use\n\n```python\nimport torch\nfrom diffusers import {pipeline_class}\n\n"
        + load
        + f'pipe = pipe.to("{device}")\n'
        'image = pipe("a photo of an astronaut riding a horse on mars", num_inference_steps=25).images[0]\n'
        'image.save("astronaut.png")\n```'
    )


def _allocation(report: Mapping[str, Any] | None) -> str:
    text = "No ARIA report was given."
    if report is not None:
        text = ""
        if report.get("policy") is not None or report.get("step") is not None:
            text = f"Policy `{_md_cell(report.get('policy'))}` at step {_md_cell(report.get('step'))}.\n\n"
        text += _region_table(report)
    return "## Per-region allocation\n\n" + text


def _limitations(teacher_name: str) -> str:
    return (
        "## Limitations and bias\n\n"
        "- The student is smaller than the teacher and is expected to be worse in image quality and text "
        "alignment, especially on prompts far from the distillation prompt pool.\n"
        "- ARIA re-weights the regions of the prompt pool that it was given; regions missing from the pool are "
        "not covered, and the per-region estimates describe this run only.\n"
        f"- The student inherits the limitations, biases and license terms of the teacher {teacher_name}.\n"
        "- Not intended for generating harmful, deceptive or non-consensual content."
    )


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
    pipeline_class: str = "StableDiffusionPipeline",
    lora_load: Callable[[str], str] | None = None,
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
        pipeline_class: the saved pipeline's class (the teacher's), named in the usage snippet.
        lora_load: the snippet's lines loading a LoRA student's adapter, from the card's model reference
            (`families.Family.lora_usage`; default `pipe.load_lora_weights(...)`).

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

    local_name = _local_name(base_model) if _is_local_model(base_model) else None
    hub_id = _teacher_hub_id(base_model, base_model_id)
    if license is None and base_model_id is not None:
        license = teacher_license(base_model) or teacher_license(base_model_id)
    license = resolve_license(base_model, license)

    plot_rel = _card_image(output_dir, allocation_plot, "allocation_plot") if allocation_plot is not None else None
    grid_rel = _card_image(output_dir, validation_image, "validation_image") if validation_image is not None else None

    model_ref = repo_id or f"your-username/{os.path.basename(os.path.abspath(output_dir)) or 'aria-student'}"
    base_pipeline = None
    if student_mode == "lora":  # a folder with model_index.json holds the base student pipeline next to the LoRA
        has_pipeline = os.path.isfile(os.path.join(output_dir, MODEL_INDEX))
        base_pipeline = model_ref if has_pipeline else (hub_id or f"path/to/{local_name}")
    teacher_name = f"`{hub_id}`" if hub_id is not None else f"`{local_name}` (a local model)"

    sections = [
        f"# {model_ref.split('/')[-1]}",
        _description(architecture, student_mode, hub_id, local_name),
        _usage(model_ref, base_pipeline, torch_dtype, device, pipeline_class, lora_load),
        "## ARIA settings\n\n" + (_settings_table(aria) if aria else "No ARIA settings were recorded."),
        _allocation(report),
    ]
    if plot_rel is not None:
        sections.append(f"## Allocation over training\n\n![ARIA allocation plot]({quote(plot_rel)})")
    if grid_rel is not None:
        sections.append(f"## Validation images\n\n![validation images]({quote(grid_rel)})")
    if train:
        sections.append("## Training settings\n\n" + _settings_table(train))
    if teacher:
        sections.append("## Teacher and student initialisation\n\n" + _settings_table(teacher))
    sections.append(_limitations(teacher_name))

    card_data = ModelCardData(license=license, base_model=hub_id, pipeline_tag="text-to-image", inference=True)
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")
    populate_model_card(card, tags=card_tags(pipeline_class, architecture, student_mode))
    text = scrub_secrets(str(card))  # last line of defence: nothing token-like ever reaches the card
    path = os.path.join(output_dir, "README.md")
    atomic_write_text(path, text)
    return path
