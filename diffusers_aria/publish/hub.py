"""The Hub boundary: what leaves the machine when an output folder is published, and what (secrets) never does.

Public API:
    is_secret_key          -- whether a setting's name marks a secret (the one list of secret names in the package)
    scrub_secrets          -- a copy of a value without secret-named keys and with token-like strings masked
    UPLOAD_IGNORE_PATTERNS -- glob patterns that are never uploaded (training state, caches, logs, temp and token files)
    files_to_upload        -- the relative paths `push_to_hub` would upload (dry run)
    would_upload           -- whether `push_to_hub` would upload one relative path
    push_to_hub            -- create the repo and upload the folder, refusing to upload a token

The model card (`write_model_card`, `teacher_license`, `resolve_license`) lives in `model_card`.

Patterns follow `huggingface_hub.upload_folder` semantics (`fnmatch` on posix paths relative to the folder,
where `*` also matches `/`), so `files_to_upload` lists exactly what `upload_folder` would send.

The token given to `push_to_hub` is only passed on to `huggingface_hub`: it is never written to disk, logged or
put into an error message, and the upload is refused when any file to be uploaded contains it (every file is
scanned in full, whatever its size).
"""

from __future__ import annotations

import fnmatch
import logging
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from huggingface_hub import create_repo, get_token, upload_folder
from huggingface_hub.utils import validate_repo_id

logger = logging.getLogger(__name__)

#: Files are scanned for tokens in blocks of this size (no file is too large to be scanned).
SCAN_BLOCK_BYTES = 8 * 1024 * 1024
MODEL_INDEX = "model_index.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"

#: Matches strings that look like a Hugging Face access token.
HF_TOKEN_RE = re.compile(r"hf_[A-Za-z0-9]{20,}")
_HF_TOKEN_RE_BYTES = re.compile(HF_TOKEN_RE.pattern.encode("ascii"))
_MIN_TOKEN_LIKE_LEN = 23  # "hf_" + 20: the shortest string HF_TOKEN_RE matches
#: Setting names containing any of these (case-insensitive) are never shown, logged or uploaded.
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


# ----------------------------------------------------------------------------------------------- secrets
def is_secret_key(key: Any) -> bool:
    """Whether a setting's name marks a secret (token, password, secret, key): such settings are never shown,
    logged or uploaded. The one list of secret names in the package."""
    k = str(key).lower()
    return any(part in k for part in SECRET_KEY_PARTS)


def scrub_secrets(value: Any) -> Any:
    """A copy of `value` without secret-named mapping keys and with token-looking strings replaced by '***'."""
    if isinstance(value, Mapping):
        return {k: scrub_secrets(v) for k, v in value.items() if not is_secret_key(k)}
    if isinstance(value, (list, tuple)):
        return [scrub_secrets(v) for v in value]
    if isinstance(value, str):
        return HF_TOKEN_RE.sub("***", value)
    return value


# ----------------------------------------------------------------------------------------------- upload policy
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


def would_upload(relpath: str) -> bool:
    """Whether `push_to_hub` (without extra patterns) uploads the file at `relpath` (posix, relative to the
    output folder): `UPLOAD_IGNORE_PATTERNS` and huggingface_hub's default ignores, as in `files_to_upload`."""
    return not _is_ignored(relpath, UPLOAD_IGNORE_PATTERNS + list(_HUB_DEFAULT_IGNORE))


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


# ----------------------------------------------------------------------------------------------- push
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
