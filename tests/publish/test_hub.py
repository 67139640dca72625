"""Tests for diffusers_aria.publish.hub: secrets, upload file selection and push_to_hub (never reaching the network)."""

from __future__ import annotations

import json
import os

import pytest

from diffusers_aria.publish import hub

TOKEN = "hf_" + "abcdefghijklmnopqrstuvwxyzABCD"  # 30 letters
OTHER_TOKEN = "hf_" + "ZYXWVUTSRQPONMLKJIHGFEDCBAzyxw"


def _write(path: str, data: bytes | str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data.encode() if isinstance(data, str) else data)


@pytest.fixture
def out(tmp_path, monkeypatch) -> str:
    """A fake final training output folder with a model card; the stored-token lookup is disabled."""
    monkeypatch.setattr(hub, "get_token", lambda: None)
    d = str(tmp_path / "student")
    _write(os.path.join(d, "model_index.json"), json.dumps({"_class_name": "StableDiffusionPipeline"}))
    _write(os.path.join(d, "unet", "config.json"), json.dumps({"sample_size": 64}))
    _write(os.path.join(d, "unet", "diffusion_pytorch_model.safetensors"), b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    _write(os.path.join(d, "tokenizer", "special_tokens_map.json"), "{}")
    _write(os.path.join(d, "checkpoint-2", "optimizer.bin"), b"\x00opt")
    _write(os.path.join(d, "checkpoint-2", "aria_state.json"), "{}")
    _write(os.path.join(d, "logs", "events.out"), b"\x00events")
    _write(os.path.join(d, "aria_report.json"), json.dumps({"policy": "aria", "regions": []}))
    _write(os.path.join(d, "aria_allocation.png"), b"\x89PNG")
    _write(os.path.join(d, "unet", "diffusion_pytorch_model.safetensors.tmp-123"), b"half")
    _write(os.path.join(d, "README.md"), "---\nlicense: mit\n---\n# student\n")
    return d


# ----------------------------------------------------------------------------------------------- secrets
def test_secret_keys_and_scrubbing():
    for key in ("hub_token", "HF_API_KEY", "db_password", "client_secret", "push_token", "Token"):
        assert hub.is_secret_key(key), key
    for key in ("learning_rate", "output_dir", "pretrained_model_name_or_path", 3):
        assert not hub.is_secret_key(key), key
    scrubbed = hub.scrub_secrets({"hub_token": TOKEN, "nested": {"api_key": "x", "note": f"with {OTHER_TOKEN}"},
                                  "runs": [f"--token {TOKEN}", 1.5], "lr": 1e-4})
    assert scrubbed == {"nested": {"note": "with ***"}, "runs": ["--token ***", 1.5], "lr": 1e-4}
    assert hub.scrub_secrets(f"a {TOKEN} b") == "a *** b" and hub.scrub_secrets(None) is None


def test_files_to_upload_excludes_training_state(out):
    files = hub.files_to_upload(out)
    for kept in ("model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "README.md",
                 "aria_report.json", "aria_allocation.png", "tokenizer/special_tokens_map.json"):
        assert kept in files
    assert not [f for f in files if f.startswith(("checkpoint-", "logs")) or ".tmp" in f]
    assert "unet/config.json" not in hub.files_to_upload(out, extra_ignore_patterns=["unet/config.json"])
    with pytest.raises(TypeError, match="extra_ignore_patterns"):
        hub.files_to_upload(out, extra_ignore_patterns="logs")
    # would_upload answers for one path what files_to_upload answers for the folder
    every = [os.path.relpath(os.path.join(r, f), out).replace(os.sep, "/") for r, _, fs in os.walk(out) for f in fs]
    assert sorted(f for f in every if hub.would_upload(f)) == files


def _patch_hub(monkeypatch) -> list[tuple[str, tuple, dict]]:
    calls: list[tuple[str, tuple, dict]] = []
    monkeypatch.setattr(hub, "create_repo", lambda *a, **k: calls.append(("create_repo", a, k)) or "repo-url")

    def fake_upload(**kw):
        calls.append(("upload_folder", (), kw))
        return "https://huggingface.co/me/aria/commit/abc123"

    monkeypatch.setattr(hub, "upload_folder", fake_upload)
    return calls


def test_push_to_hub_calls_hub_with_right_arguments(out, monkeypatch):
    calls = _patch_hub(monkeypatch)
    ref = hub.push_to_hub(out, "me/aria", token=TOKEN, private=True, extra_ignore_patterns=["samples/**"])
    assert ref == "https://huggingface.co/me/aria/commit/abc123"
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]
    _, args, kw = calls[0]
    assert args == ("me/aria",) and kw == {"token": TOKEN, "private": True, "exist_ok": True}
    kw = calls[1][2]
    assert kw["repo_id"] == "me/aria" and kw["folder_path"] == out and kw["token"] == TOKEN
    assert kw["ignore_patterns"] == hub.UPLOAD_IGNORE_PATTERNS + ["samples/**"]
    assert kw["commit_message"] == "Upload ARIA-distilled student"


def test_push_to_hub_requires_finished_model(out, monkeypatch):
    calls = _patch_hub(monkeypatch)
    os.remove(os.path.join(out, "model_index.json"))
    with pytest.raises(FileNotFoundError, match="model_index.json.*[Ff]inish training"):
        hub.push_to_hub(out, "me/aria", token=TOKEN)
    with pytest.raises(FileNotFoundError, match="finish training"):
        hub.push_to_hub(os.path.join(out, "nope"), "me/aria")
    with pytest.raises(ValueError, match="repo_id 'a/b/c'"):
        _write(os.path.join(out, "model_index.json"), "{}")
        hub.push_to_hub(out, "a/b/c")
    assert calls == []


def test_push_to_hub_refuses_files_with_the_token(out, monkeypatch):
    calls = _patch_hub(monkeypatch)
    _write(os.path.join(out, "unet", "notes.txt"), f"trained with --hub_token {TOKEN}\n")
    with pytest.raises(ValueError, match=r"'unet/notes.txt'.*the Hub token") as err:
        hub.push_to_hub(out, "me/aria", token=TOKEN)
    assert TOKEN not in str(err.value)
    assert calls == []
    # the same file is fine once it is excluded; a token only inside ignored training state is never uploaded
    _write(os.path.join(out, "checkpoint-2", "args.json"), json.dumps({"hub_token": TOKEN}))
    hub.push_to_hub(out, "me/aria", token=TOKEN, extra_ignore_patterns=["unet/notes.txt"])
    assert [c[0] for c in calls] == ["create_repo", "upload_folder"]


def test_push_to_hub_checks_the_stored_token_when_none_is_given(out, monkeypatch):
    calls = _patch_hub(monkeypatch)
    stored = "hf_storedtoken"  # short on purpose: only the exact-match check can find it
    monkeypatch.setattr(hub, "get_token", lambda: stored)
    _write(os.path.join(out, "config.yaml"), f"token: {stored}\n")
    with pytest.raises(ValueError, match="'config.yaml'"):
        hub.push_to_hub(out, "me/aria")
    assert calls == []


# ----------------------------------------------------------------------------------------------- caches
def test_files_to_upload_skips_caches_logs_and_checkpoints(out):
    ignored = ["teacher_latents/teacher_latents.safetensors", "teacher_latents/teacher_latents.json",
               "regions/embeddings-0123abcd.npy", "regions/embeddings-0123abcd.npy.json",
               "regions/embeddings-0123abcd.npy.partial.npy", "embeddings-0123abcd.npy",
               "logs/events.out", "logs/aria/events.out.tfevents.1", "checkpoint-1/model.safetensors",
               "checkpoint-1/unet/diffusion_pytorch_model.safetensors", "checkpoint-2/optimizer.bin",
               ".regions-tmp-x1y2/region_ids.npy", "regions.old-.regions-tmp-x1y2/region_ids.npy"]
    kept = ["regions/regions_config.json", "regions/centroids.safetensors", "regions/region_ids.npy",
            "model_index.json", "unet/diffusion_pytorch_model.safetensors"]
    for rel in ignored + kept:
        _write(os.path.join(out, *rel.split("/")), b"\x00data")
    files = hub.files_to_upload(out)
    for rel in ignored:
        assert os.path.isfile(os.path.join(out, *rel.split("/")))
        assert rel not in files, rel
    for rel in kept:
        assert rel in files, rel
    # huggingface_hub's own filter, with the patterns push_to_hub passes to upload_folder, agrees
    from huggingface_hub.utils import filter_repo_objects
    assert set(filter_repo_objects(ignored + kept, ignore_patterns=hub.UPLOAD_IGNORE_PATTERNS)) == set(kept)


# ----------------------------------------------------------------------------------------------- large files
def test_secret_scan_finds_a_secret_split_across_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "SCAN_BLOCK_BYTES", 16, raising=False)
    path = str(tmp_path / "blob.bin")
    for offset in range(0, 60):
        _write(path, b"\x00" * offset + TOKEN.encode() + b"\x00" * 7)
        assert hub._contains_secret(path, TOKEN) == "the Hub token", offset
        _write(path, b"a" * offset + b" " + OTHER_TOKEN.encode() + b" tail")
        assert hub._contains_secret(path, None) == "a string that looks like an HF token (hf_...)", offset
        assert hub._contains_secret(path, TOKEN) == "a string that looks like an HF token (hf_...)", offset
    _write(path, b"\x00" * 100 + b"hf_" + b"x" * 19 + b" " + b"\x00" * 40)
    assert hub._contains_secret(path, TOKEN) is None


def test_push_to_hub_refuses_a_token_inside_a_large_file(out, monkeypatch):
    calls = _patch_hub(monkeypatch)
    block = 2 * 1024 * 1024
    monkeypatch.setattr(hub, "SCAN_BLOCK_BYTES", block, raising=False)
    path = os.path.join(out, "unet", "diffusion_pytorch_model.safetensors")
    data = bytearray(6 * 1024 * 1024)  # binary: only the exact token check applies
    at = 2 * block - len(TOKEN) // 2  # the token straddles the second block boundary
    data[at:at + len(TOKEN)] = TOKEN.encode()
    _write(path, bytes(data))
    with pytest.raises(ValueError, match=r"'unet/diffusion_pytorch_model.safetensors'.*the Hub token") as err:
        hub.push_to_hub(out, "me/aria", token=TOKEN)
    assert TOKEN not in str(err.value) and calls == []
    monkeypatch.setattr(hub, "SCAN_BLOCK_BYTES", 8 * 1024 * 1024)  # the default: one block, past the old 5 MB cap
    with pytest.raises(ValueError, match="the Hub token"):
        hub.push_to_hub(out, "me/aria", token=TOKEN)
    assert calls == []
